//! The kernel EROFS frontend: the kernel mounts the image's bootstrap
//! itself, with the devices the daemon serves over FUSE.

use std::path::{Path, PathBuf};

use darter_fuse::{BOOTSTRAP_FILE, TopMount, device_file, top_mount_in};

use crate::mount::DaemonError;

/// The most a mount's option string may hold (the kernel copies one page).
const MAX_MOUNT_DATA: usize = 4095;

/// The kernel EROFS mount of an image whose devices filesystem is mounted
/// at `devices`.
#[derive(Debug, Clone)]
pub(crate) struct KernelMount {
    pub devices: PathBuf,
    pub mountpoint: PathBuf,
    pub blob_count: usize,
}

impl KernelMount {
    fn bootstrap(&self) -> PathBuf {
        self.devices.join(BOOTSTRAP_FILE)
    }

    /// `device=PATH` for every blob, in device order.
    fn options(&self) -> Result<String, DaemonError> {
        let mut options = Vec::with_capacity(self.blob_count);
        for device in 1..=self.blob_count {
            let path = self.devices.join(device_file(device));
            let path = path.to_str().filter(|p| !p.contains(',')).ok_or_else(|| {
                self.error(std::io::Error::other(format!(
                    "device path {} is not UTF-8 or holds a comma, which mount options cannot carry",
                    path.display()
                )))
            })?;
            options.push(format!("device={path}"));
        }
        // Direct reads of the devices: no page cache and no readahead of
        // their own (the driver reads ahead within each file; a device's
        // readahead would run on into files nobody opened), and no second
        // copy of the data in memory.
        options.push("directio".to_owned());
        let options = options.join(",");
        if options.len() > MAX_MOUNT_DATA {
            return Err(self.error(std::io::Error::other(format!(
                "{} blobs need {} bytes of mount options; the kernel takes {MAX_MOUNT_DATA}",
                self.blob_count,
                options.len()
            ))));
        }
        Ok(options)
    }

    fn error(&self, source: std::io::Error) -> DaemonError {
        DaemonError::Io {
            op: "mount the kernel EROFS filesystem at",
            what: self.mountpoint.display().to_string(),
            source,
        }
    }

    /// Mounts the bootstrap read-only at the mountpoint, file-backed (the
    /// kernel reads the files, no loop device), with every blob's address
    /// space as a device. The devices filesystem must already serve.
    pub fn mount(&self) -> Result<(), DaemonError> {
        let options = std::ffi::CString::new(self.options()?)
            .map_err(|e| self.error(std::io::Error::other(e)))?;
        rustix::mount::mount(
            self.bootstrap(),
            &self.mountpoint,
            "erofs",
            rustix::mount::MountFlags::RDONLY,
            options.as_c_str(),
        )
        .map_err(|e| DaemonError::KernelMount {
            bootstrap: self.bootstrap(),
            mountpoint: self.mountpoint.clone(),
            source: e.into(),
        })?;
        // The driver reads metadata through the bootstrap file's page
        // cache: fill it now, in one pass of large reads, rather than one
        // FUSE round trip per metadata block the first lookups touch.
        if let Err(e) = std::fs::read(self.bootstrap()) {
            tracing::warn!(error = %e, "cannot preload the bootstrap; metadata is read on demand");
        }
        Ok(())
    }

    /// True while our EROFS mount is the one on top at the mountpoint, in
    /// the mount table `mountinfo`.
    fn is_mounted_in(&self, mountinfo: &str) -> bool {
        matches!(
            top_mount_in(mountinfo, &self.mountpoint),
            Ok(Some(TopMount { fstype, source, .. })) if fstype == "erofs" && source == self.bootstrap()
        )
    }

    /// Calls `gone` once the EROFS mount has left the mountpoint (the user
    /// unmounted it), so the daemon can unmount its devices and end. The
    /// kernel flags `/proc/self/mountinfo` whenever the mount table changes;
    /// this thread sleeps until it does.
    pub fn watch_unmount(self, gone: impl FnOnce() + Send + 'static) {
        let spawned = std::thread::Builder::new()
            .name("darter-watch".into())
            .spawn(move || {
                if let Err(e) = self.wait_unmounted() {
                    tracing::warn!(error = %e, "cannot watch the mount table; unmount with a signal");
                    return;
                }
                gone();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the mount table watcher");
        }
    }

    fn wait_unmounted(&self) -> std::io::Result<()> {
        use rustix::event::{PollFd, PollFlags, poll};
        let mountinfo = std::fs::File::open("/proc/self/mountinfo")?;
        loop {
            // Reading the table re-arms the notification.
            let mut table = String::new();
            std::io::Read::read_to_string(&mut &mountinfo, &mut table)?;
            if !self.is_mounted_in(&table) {
                return Ok(());
            }
            let mut fds = [PollFd::new(&mountinfo, PollFlags::PRI)];
            poll(&mut fds, None)?;
            rustix::fs::seek(&mountinfo, rustix::fs::SeekFrom::Start(0))?;
        }
    }
}

/// The devices directory, created if needed (a stale FUSE mount a killed
/// daemon left there is removed).
pub(crate) fn prepare_devices_dir(devices: &Path) -> Result<(), DaemonError> {
    let create = |source| DaemonError::Io {
        op: "create",
        what: devices.display().to_string(),
        source,
    };
    if let Some(parent) = devices.parent() {
        std::fs::create_dir_all(parent).map_err(create)?;
    }
    // Not create_dir_all: it stats an existing path, which a stale mount
    // answers with ENOTCONN.
    match std::fs::create_dir(devices) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(create(e)),
        _ => {}
    }
    darter_fuse::prepare_mountpoint(devices)?;
    Ok(())
}
