//! The keeper: a process other than the mount daemons (the snapshotter)
//! that holds a copy of each mount's `/dev/fuse` file, so a mount outlives
//! its daemon. The kernel keeps a FUSE connection while any process holds
//! its device: reads made while no daemon runs wait, and a daemon started
//! with `--takeover` gets the device from the keeper and serves them.
//!
//! The protocol, on a `SOCK_SEQPACKET` unix socket, one JSON message per
//! packet:
//! - a daemon that serves sends [`ToKeeper::Keep`] with its device
//!   (SCM_RIGHTS) and keeps the connection open while it lives. The
//!   connection ending without [`ToKeeper::Unmounted`] first means the
//!   daemon died, and the keeper is told ([`Keeper::listen`]'s `on_lost`).
//!   A daemon whose keeper went away connects again and sends it again, so
//!   a restarted keeper adopts the mounts that still serve;
//! - a daemon taking over sends [`ToKeeper::Take`] and gets
//!   [`FromKeeper::Device`] with the device, or [`FromKeeper::Unknown`].

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::Frontend;

/// The largest message: a record with two paths and an image name.
const MAX_MESSAGE: usize = 64 << 10;
/// How often a daemon whose keeper is gone tries to reach it again.
const RECONNECT_EVERY: Duration = Duration::from_millis(100);

/// A mount as its keeper knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Where the image is mounted.
    pub mountpoint: PathBuf,
    /// The image, as the daemon was told it.
    pub image: String,
    /// How the kernel sees the mount.
    pub frontend: Frontend,
    /// The devices directory the FUSE connection serves (kernel frontend).
    pub devices: Option<PathBuf>,
    /// The daemon serving it.
    pub pid: u32,
    /// What the kernel offered the connection at FUSE_INIT, for a daemon
    /// taking it over to replay.
    pub abi: darter_fuse::KernelAbi,
    /// The API socket of the node daemon serving it, where a restarted
    /// daemon is to serve (None: a foreground `darter mount`).
    #[serde(default)]
    pub daemon_socket: Option<PathBuf>,
}

/// From a daemon to its keeper.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToKeeper {
    /// Keep this mount's device (attached); the daemon serves it while the
    /// connection is open.
    Keep(MountRecord),
    /// The mount is gone and the daemon ends: forget it.
    Unmounted,
    /// The device of the mount at `mountpoint`, to take it over.
    Take {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
}

/// From the keeper to a daemon taking over.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromKeeper {
    /// The mount's record; its device is attached.
    Device(MountRecord),
    /// The keeper keeps nothing at that mountpoint.
    Unknown,
}

/// Why talking to a keeper failed.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// A socket operation failed.
    #[error("{op} keeper socket {}: {source}", socket.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The keeper's socket.
        socket: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A message was not what the protocol allows.
    #[error("bad message on keeper socket {}: {reason}", socket.display())]
    Protocol {
        /// The keeper's socket.
        socket: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The keeper keeps no mount at the mountpoint.
    #[error("the keeper at {} keeps no mount at {}", socket.display(), mountpoint.display())]
    Unknown {
        /// The keeper's socket.
        socket: PathBuf,
        /// The mountpoint asked for.
        mountpoint: PathBuf,
    },
}

/// One end of a keeper connection, with the socket path for errors.
struct Channel<'a> {
    fd: BorrowedFd<'a>,
    socket: &'a Path,
}

impl Channel<'_> {
    fn io(&self, op: &'static str) -> impl FnOnce(rustix::io::Errno) -> KeeperError {
        socket_error(op, self.socket)
    }

    fn protocol(&self, reason: impl std::fmt::Display) -> KeeperError {
        KeeperError::Protocol {
            socket: self.socket.to_owned(),
            reason: reason.to_string(),
        }
    }

    /// Sends `message`, with `device` attached if given.
    fn send(
        &self,
        message: &impl Serialize,
        device: Option<BorrowedFd<'_>>,
    ) -> Result<(), KeeperError> {
        let bytes = serde_json::to_vec(message).map_err(|e| self.protocol(e))?;
        let fds: Vec<BorrowedFd<'_>> = device.into_iter().collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(self.protocol("no room to attach the device"));
        }
        rustix::net::sendmsg(
            self.fd,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(self.io("send to"))?;
        Ok(())
    }

    /// The next message and the device attached to it, or `None` once the
    /// other end has closed the connection.
    fn receive<M: for<'de> Deserialize<'de>>(
        &self,
    ) -> Result<Option<(M, Option<OwnedFd>)>, KeeperError> {
        let mut bytes = vec![0u8; MAX_MESSAGE];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            self.fd,
            &mut [IoSliceMut::new(&mut bytes)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let received = match received {
            Ok(r) => r,
            Err(rustix::io::Errno::CONNRESET) => return Ok(None),
            Err(e) => return Err(self.io("receive from")(e)),
        };
        let mut device = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                // Any more than one is closed as it drops.
                for fd in fds {
                    device.get_or_insert(fd);
                }
            }
        }
        if received.bytes == 0 {
            return Ok(None);
        }
        let message = bytes
            .get(..received.bytes)
            .ok_or_else(|| self.protocol("message too large"))?;
        let message = serde_json::from_slice(message).map_err(|e| self.protocol(e))?;
        Ok(Some((message, device)))
    }
}

/// A `SOCK_SEQPACKET` unix socket and the address `socket`, to connect or
/// bind; errors name `socket`.
fn seqpacket(socket: &Path) -> Result<(OwnedFd, SocketAddrUnix), KeeperError> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(socket_error("create a socket for", socket))?;
    let addr = SocketAddrUnix::new(socket).map_err(socket_error("name", socket))?;
    Ok((fd, addr))
}

fn socket_error(op: &'static str, socket: &Path) -> impl FnOnce(rustix::io::Errno) -> KeeperError {
    let socket = socket.to_owned();
    move |e| KeeperError::Io {
        op,
        socket,
        source: e.into(),
    }
}

fn connect(socket: &Path) -> Result<OwnedFd, KeeperError> {
    let (fd, addr) = seqpacket(socket)?;
    rustix::net::connect(&fd, &addr).map_err(socket_error("connect to", socket))?;
    Ok(fd)
}

/// Asks the keeper at `socket` for the device of the mount at
/// `mountpoint`.
pub fn take_device(
    socket: &Path,
    mountpoint: &Path,
) -> Result<(MountRecord, OwnedFd), KeeperError> {
    let fd = connect(socket)?;
    let channel = Channel {
        fd: fd.as_fd(),
        socket,
    };
    let take = ToKeeper::Take {
        mountpoint: mountpoint.to_owned(),
    };
    channel.send(&take, None)?;
    match channel.receive::<FromKeeper>()? {
        Some((FromKeeper::Device(record), Some(device))) => Ok((record, device)),
        Some((FromKeeper::Device(_), None)) => {
            Err(channel.protocol("a device record without the device"))
        }
        Some((FromKeeper::Unknown, _)) => Err(KeeperError::Unknown {
            socket: socket.to_owned(),
            mountpoint: mountpoint.to_owned(),
        }),
        None => Err(channel.protocol("the keeper closed the connection")),
    }
}

/// A daemon's standing link to its keeper: the device stays with the
/// keeper while the daemon serves, and is handed again to a keeper that
/// restarted.
#[derive(Debug)]
pub struct KeeperLink {
    connection: Arc<Mutex<Option<OwnedFd>>>,
    socket: PathBuf,
    ended: Arc<AtomicBool>,
}

impl KeeperLink {
    /// Hands `record` and `device` to the keeper at `socket` and keeps
    /// doing so, in the background, whenever the keeper comes back. A
    /// keeper that cannot be reached now is tried again.
    pub fn start(socket: &Path, record: MountRecord, device: OwnedFd) -> KeeperLink {
        let link = KeeperLink {
            connection: Arc::new(Mutex::new(None)),
            socket: socket.to_owned(),
            ended: Arc::new(AtomicBool::new(false)),
        };
        let (connection, ended, socket) = (
            link.connection.clone(),
            link.ended.clone(),
            link.socket.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("darter-keeper".into())
            .spawn(move || keep_handing_over(&socket, &record, &device, &connection, &ended));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the keeper link; a restart will not keep the mount");
        }
        link
    }

    /// Tells the keeper the mount is gone (so it starts no daemon for it)
    /// and stops handing it over.
    pub fn unmounted(&self) {
        self.ended.store(true, Ordering::SeqCst);
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = connection.as_ref() {
            let channel = Channel {
                fd: fd.as_fd(),
                socket: &self.socket,
            };
            if let Err(e) = channel.send(&ToKeeper::Unmounted, None) {
                tracing::warn!(error = %e, "cannot tell the keeper the mount is gone");
            }
        }
    }
}

fn keep_handing_over(
    socket: &Path,
    record: &MountRecord,
    device: &OwnedFd,
    connection: &Mutex<Option<OwnedFd>>,
    ended: &AtomicBool,
) {
    let mut warned = false;
    while !ended.load(Ordering::SeqCst) {
        match hand_over(socket, record, device) {
            Ok(fd) => {
                tracing::info!(keeper = %socket.display(), "the keeper holds the mount's device");
                warned = false;
                let watched = rustix::io::dup(&fd);
                *connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
                // The keeper never writes to this connection: a receive
                // returns when it closes.
                if let Ok(watched) = watched {
                    let channel = Channel {
                        fd: watched.as_fd(),
                        socket,
                    };
                    let _ = channel.receive::<FromKeeper>();
                }
                if !ended.load(Ordering::SeqCst) {
                    tracing::warn!(keeper = %socket.display(), "the keeper went away; handing over again when it is back");
                }
            }
            Err(e) if !warned => {
                tracing::warn!(error = %e, "cannot hand the mount's device to the keeper; trying again");
                warned = true;
            }
            Err(_) => {}
        }
        std::thread::sleep(RECONNECT_EVERY);
    }
}

fn hand_over(
    socket: &Path,
    record: &MountRecord,
    device: &OwnedFd,
) -> Result<OwnedFd, KeeperError> {
    let fd = connect(socket)?;
    Channel {
        fd: fd.as_fd(),
        socket,
    }
    .send(&ToKeeper::Keep(record.clone()), Some(device.as_fd()))?;
    Ok(fd)
}

/// A mount's device held by the keeper.
#[derive(Debug)]
struct Kept {
    record: MountRecord,
    device: OwnedFd,
    /// The connection of the daemon serving it.
    connection: u64,
}

/// The keeper's side: holds the devices daemons hand over and gives them
/// to daemons that take over.
#[derive(Debug)]
pub struct Keeper {
    socket: PathBuf,
    kept: Mutex<HashMap<PathBuf, Kept>>,
    next_connection: AtomicU64,
}

/// Called with the record of a mount whose daemon died without its mount
/// going away (its device is still kept, to be taken over).
pub type OnLost = Box<dyn Fn(MountRecord) + Send + Sync>;

impl Keeper {
    /// Listens on `socket` (a stale socket file is replaced) and serves
    /// daemons in the background.
    pub fn listen(socket: &Path, on_lost: OnLost) -> Result<Arc<Keeper>, KeeperError> {
        let _ = std::fs::remove_file(socket);
        let (listener, addr) = seqpacket(socket)?;
        rustix::net::bind(&listener, &addr).map_err(socket_error("bind", socket))?;
        rustix::net::listen(&listener, 64).map_err(socket_error("listen on", socket))?;
        let keeper = Arc::new(Keeper {
            socket: socket.to_owned(),
            kept: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
        });
        let on_lost: Arc<OnLost> = Arc::new(on_lost);
        let accepting = keeper.clone();
        std::thread::Builder::new()
            .name("darter-keeper".into())
            .spawn(move || accepting.accept(&listener, &on_lost))
            .map_err(|source| KeeperError::Io {
                op: "start serving",
                socket: socket.to_owned(),
                source,
            })?;
        Ok(keeper)
    }

    /// Stops keeping the mount at `mountpoint` (before it is unmounted on
    /// purpose); its record, if it was kept.
    pub fn forget(&self, mountpoint: &Path) -> Option<MountRecord> {
        self.lock().remove(mountpoint).map(|kept| kept.record)
    }

    /// The record of the mount kept at `mountpoint`.
    pub fn record(&self, mountpoint: &Path) -> Option<MountRecord> {
        self.lock().get(mountpoint).map(|kept| kept.record.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn accept(self: Arc<Self>, listener: &OwnedFd, on_lost: &Arc<OnLost>) {
        loop {
            let connection = match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, socket = %self.socket.display(), "the keeper stops accepting");
                    return;
                }
            };
            let (keeper, on_lost) = (self.clone(), on_lost.clone());
            let spawned = std::thread::Builder::new()
                .name("darter-kept".into())
                .spawn(move || {
                    if let Err(e) = keeper.serve(&connection, &on_lost) {
                        tracing::warn!(error = %e, "a keeper connection failed");
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot serve a keeper connection");
            }
        }
    }

    fn serve(&self, connection: &OwnedFd, on_lost: &OnLost) -> Result<(), KeeperError> {
        let channel = Channel {
            fd: connection.as_fd(),
            socket: &self.socket,
        };
        let Some((message, device)) = channel.receive::<ToKeeper>()? else {
            return Ok(());
        };
        match (message, device) {
            (ToKeeper::Take { mountpoint }, _) => {
                let kept = self
                    .lock()
                    .get(&mountpoint)
                    .map(|k| (k.record.clone(), k.device.try_clone()));
                match kept {
                    Some((record, Ok(device))) => {
                        channel.send(&FromKeeper::Device(record), Some(device.as_fd()))
                    }
                    Some((_, Err(e))) => Err(KeeperError::Io {
                        op: "duplicate a device for",
                        socket: self.socket.clone(),
                        source: e,
                    }),
                    None => channel.send(&FromKeeper::Unknown, None),
                }
            }
            (ToKeeper::Keep(record), Some(device)) => self.keep(&channel, record, device, on_lost),
            (ToKeeper::Keep(_), None) => Err(channel.protocol("Keep without a device")),
            (ToKeeper::Unmounted, _) => Err(channel.protocol("Unmounted before Keep")),
        }
    }

    /// Keeps `device` while the daemon's connection lasts; tells `on_lost`
    /// if it ends without the daemon saying its mount is gone.
    fn keep(
        &self,
        channel: &Channel<'_>,
        record: MountRecord,
        device: OwnedFd,
        on_lost: &OnLost,
    ) -> Result<(), KeeperError> {
        let id = self.next_connection.fetch_add(1, Ordering::SeqCst);
        let mountpoint = record.mountpoint.clone();
        tracing::info!(mountpoint = %mountpoint.display(), pid = record.pid, "keeping the mount's device");
        self.lock().insert(
            mountpoint.clone(),
            Kept {
                record,
                device,
                connection: id,
            },
        );
        let said = channel.receive::<ToKeeper>();
        let mut kept = self.lock();
        let ours = kept.get(&mountpoint).is_some_and(|k| k.connection == id);
        if !ours {
            // Forgotten on purpose, or served by a newer daemon.
            return said.map(drop);
        }
        if let Ok(Some((ToKeeper::Unmounted, _))) = said {
            kept.remove(&mountpoint);
            tracing::info!(mountpoint = %mountpoint.display(), "the mount is gone; forgotten");
            return Ok(());
        }
        let record = kept.get(&mountpoint).map(|k| k.record.clone());
        drop(kept);
        if let Some(record) = record {
            on_lost(record);
        }
        said.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn record(mountpoint: &str) -> MountRecord {
        MountRecord {
            mountpoint: mountpoint.into(),
            image: "oci:/images:t".into(),
            frontend: Frontend::Fuse,
            devices: None,
            pid: 42,
            abi: darter_fuse::KernelAbi {
                major: 7,
                minor: 41,
                capabilities: 1 << 35,
            },
            daemon_socket: Some("/run/darter/daemon.sock".into()),
        }
    }

    fn keeper(dir: &Path) -> (Arc<Keeper>, PathBuf, mpsc::Receiver<MountRecord>) {
        let socket = dir.join("keeper.sock");
        let (lost, losses) = mpsc::channel();
        let lost = Mutex::new(lost);
        let on_lost: OnLost = Box::new(move |r| {
            let _ = lost.lock().unwrap().send(r);
        });
        (Keeper::listen(&socket, on_lost).unwrap(), socket, losses)
    }

    /// Keeps one end of a socket pair as the "device"; returns the other
    /// end and the daemon's connection.
    fn hand_over_a_device(socket: &Path, mountpoint: &str) -> (OwnedFd, OwnedFd) {
        let (read, write) = std::os::unix::net::UnixStream::pair().unwrap();
        let connection = hand_over(socket, &record(mountpoint), &write.into()).unwrap();
        (read.into(), connection)
    }

    fn wait_kept(keeper: &Keeper, mountpoint: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while keeper.record(Path::new(mountpoint)).is_none() {
            assert!(std::time::Instant::now() < deadline, "never kept");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_kept_device_is_given_to_the_daemon_taking_over() {
        let dir = tempfile::tempdir().unwrap();
        let (keeper, socket, _losses) = keeper(dir.path());
        let (read, _connection) = hand_over_a_device(&socket, "/mnt/a");
        wait_kept(&keeper, "/mnt/a");
        let (got, device) = take_device(&socket, Path::new("/mnt/a")).unwrap();
        assert_eq!(got, record("/mnt/a"));
        // The same file: what is written to the taken device comes out of
        // other end.
        rustix::io::write(&device, b"same").unwrap();
        let mut buf = [0u8; 4];
        rustix::io::read(&read, &mut buf).unwrap();
        assert_eq!(&buf, b"same");
        let unknown = take_device(&socket, Path::new("/mnt/b"));
        assert!(
            matches!(unknown, Err(KeeperError::Unknown { ref mountpoint, .. }) if mountpoint == Path::new("/mnt/b")),
            "{unknown:?}"
        );
    }

    #[test]
    fn a_connection_ending_without_unmounted_is_a_lost_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let (keeper, socket, losses) = keeper(dir.path());
        let (_read, connection) = hand_over_a_device(&socket, "/mnt/a");
        wait_kept(&keeper, "/mnt/a");
        drop(connection);
        let lost = losses.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(lost, record("/mnt/a"));
        // Still kept, for the daemon that takes over.
        assert!(keeper.record(Path::new("/mnt/a")).is_some());
    }

    #[test]
    fn an_unmounted_or_forgotten_mount_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (keeper, socket, losses) = keeper(dir.path());
        let (_read, connection) = hand_over_a_device(&socket, "/mnt/a");
        wait_kept(&keeper, "/mnt/a");
        let channel = Channel {
            fd: connection.as_fd(),
            socket: &socket,
        };
        channel.send(&ToKeeper::Unmounted, None).unwrap();
        drop(connection);

        let (_read, connection) = hand_over_a_device(&socket, "/mnt/b");
        wait_kept(&keeper, "/mnt/b");
        assert_eq!(keeper.forget(Path::new("/mnt/b")), Some(record("/mnt/b")));
        drop(connection);

        // A third mount's loss arrives, and is the only one.
        let (_read, connection) = hand_over_a_device(&socket, "/mnt/c");
        wait_kept(&keeper, "/mnt/c");
        drop(connection);
        let lost = losses.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(lost.mountpoint, Path::new("/mnt/c"));
        assert!(keeper.record(Path::new("/mnt/a")).is_none());
    }

    #[test]
    fn a_malformed_message_ends_only_its_own_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (_keeper, socket, _losses) = keeper(dir.path());
        let fd = connect(&socket).unwrap();
        let channel = Channel {
            fd: fd.as_fd(),
            socket: &socket,
        };
        rustix::io::write(&fd, b"{not json").unwrap();
        // The keeper drops the connection, and keeps serving others.
        assert!(channel.receive::<FromKeeper>().unwrap().is_none());
        assert!(matches!(
            take_device(&socket, Path::new("/mnt/a")),
            Err(KeeperError::Unknown { .. })
        ));
    }
}
