//! Serving a FUSE connection that another process mounted and
//! initialised: a restarted daemon takes over a mount whose `/dev/fuse`
//! file someone else (the keeper) kept open while no daemon ran.
//!
//! The kernel sends FUSE_INIT once per connection, but `fuser` insists on
//! a handshake. So the session gets one end of a `SOCK_SEQPACKET` socket
//! pair (which keeps message boundaries, as `/dev/fuse` does), a synthetic
//! FUSE_INIT with the ABI and capabilities the kernel offered the first
//! daemon, and its reply is dropped. Then two relay threads copy requests
//! and replies between the real device and the socket, and a
//! FUSE_NOTIFY_RESEND has the kernel queue again every request the dead
//! daemon had read but not answered. The relay copies each message once
//! more than a freshly mounted session does; only taken-over mounts pay.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::{Filesystem, KernelConfig, SessionACL};
use rustix::io::Errno;
use rustix::net::{AddressFamily, Shutdown, SocketFlags, SocketType};

/// FUSE_INIT's opcode (`enum fuse_opcode` in `include/uapi/linux/fuse.h`).
const FUSE_INIT: u32 = 26;
/// `enum fuse_notify_code`: queue again every request read but not answered.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `fuse_init_in.flags`: the high half of the capabilities is in `flags2`.
const FUSE_INIT_EXT: u64 = 1 << 30;
/// Size of `struct fuse_in_header`.
const IN_HEADER_LEN: usize = 40;
/// Size of `struct fuse_init_in` (ABI 7.36 and later).
const INIT_IN_LEN: usize = 64;
/// Size of `struct fuse_out_header`.
const OUT_HEADER_LEN: usize = 16;
/// The unique id of the synthetic FUSE_INIT (the kernel's are even; this
/// one never reaches the kernel).
const SYNTHETIC_UNIQUE: u64 = 2;
/// The largest message either way: the kernel wants room for a write of
/// `max_write` (fuser asks for 16 MiB) plus headers in every read.
const MAX_MESSAGE: usize = (16 << 20) + 4096;
/// Socket buffers big enough for the largest message.
const SOCKET_BUFFER: usize = 2 * MAX_MESSAGE;

/// What the kernel offered a connection at FUSE_INIT, recorded by the first
/// daemon so a later one can replay it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelAbi {
    /// FUSE protocol major version.
    pub major: u32,
    /// FUSE protocol minor version.
    pub minor: u32,
    /// The capability flags the kernel offered.
    pub capabilities: u64,
}

impl KernelAbi {
    /// What `config` (given to `Filesystem::init`) says the kernel offered.
    pub fn of(config: &KernelConfig) -> KernelAbi {
        let version = config.kernel_abi();
        KernelAbi {
            major: version.0,
            minor: version.1,
            capabilities: config.capabilities().bits(),
        }
    }
}

/// Where a filesystem records the [`KernelAbi`] of its session's FUSE_INIT.
pub type AbiSlot = Arc<std::sync::OnceLock<KernelAbi>>;

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// A system call on the socket pair or the device failed.
    #[error("{op} for the taken-over FUSE connection: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The session refused the replayed FUSE_INIT.
    #[error("the FUSE session answered the replayed FUSE_INIT ({abi:?}) with error {errno}")]
    InitRefused {
        /// The ABI replayed.
        abi: KernelAbi,
        /// The errno it answered.
        errno: i32,
    },
    /// The session answered something else than the replayed FUSE_INIT.
    #[error("the FUSE session's answer to the replayed FUSE_INIT is malformed ({len} bytes)")]
    BadInitReply {
        /// Bytes received.
        len: usize,
    },
}

fn io(op: &'static str) -> impl FnOnce(Errno) -> TakeoverError {
    move |e| TakeoverError::Io {
        op,
        source: e.into(),
    }
}

/// A `fuser` session serving a taken-over connection through the relay.
pub struct TakenOver<FS: Filesystem> {
    session: fuser::Session<FS>,
    device_gone: Arc<AtomicBool>,
}

impl<FS: Filesystem> std::fmt::Debug for TakenOver<FS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakenOver")
            .field("device_gone", &self.device_gone)
            .finish_non_exhaustive()
    }
}

impl<FS: Filesystem> TakenOver<FS> {
    /// The session (for its unmounter; it mounted nothing itself).
    pub fn session_mut(&mut self) -> &mut fuser::Session<FS> {
        &mut self.session
    }

    /// Serves until the connection ends. The end the kernel gives a
    /// connection (ENODEV, once unmounted) is a clean end.
    pub fn run(self) -> std::io::Result<()> {
        let result = self.session.run();
        if self.device_gone.load(Ordering::SeqCst) {
            return Ok(());
        }
        result
    }
}

/// Serves `fs` on the initialised FUSE connection `device` (a `/dev/fuse`
/// file), whose kernel offered `abi` at FUSE_INIT: replays FUSE_INIT to a
/// session of `fs`, starts the relay and has the kernel resend what the
/// previous daemon left unanswered. `config` should not clone the device
/// (`clone_fd`), which the relay stands for.
pub fn take_over<FS: Filesystem>(
    fs: FS,
    device: OwnedFd,
    abi: KernelAbi,
    config: fuser::Config,
) -> Result<TakenOver<FS>, TakeoverError> {
    let (relay_end, session_end) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io("create a socket pair"))?;
    for end in [&relay_end, &session_end] {
        enlarge_buffers(end);
    }
    rustix::io::write(&relay_end, &synthetic_init(abi)).map_err(io("send FUSE_INIT"))?;
    let session =
        fuser::Session::from_fd(fs, session_end, SessionACL::All, config).map_err(|source| {
            TakeoverError::Io {
                op: "replay FUSE_INIT",
                source,
            }
        })?;
    check_init_reply(&relay_end, abi)?;
    let device_gone = Arc::new(AtomicBool::new(false));
    start_relay(&Arc::new(device), Arc::new(relay_end), device_gone.clone())?;
    Ok(TakenOver {
        session,
        device_gone,
    })
}

/// Has the kernel queue again the requests of `device`'s connection that
/// were read but never answered (by a daemon that died).
pub fn resend_unanswered(device: BorrowedFd<'_>) -> Result<(), TakeoverError> {
    let mut notify = [0u8; OUT_HEADER_LEN];
    notify[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    notify[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // unique 0: a notification, not a reply.
    rustix::io::write(device, &notify).map_err(io("send FUSE_NOTIFY_RESEND"))?;
    Ok(())
}

/// Socket buffers that hold the largest message: forced as root, else as
/// large as the system allows (and a warning: big replies may then fail).
fn enlarge_buffers(socket: &OwnedFd) {
    use rustix::net::sockopt;
    let forced = sockopt::set_socket_send_buffer_size_force(socket, SOCKET_BUFFER)
        .and_then(|()| sockopt::set_socket_recv_buffer_size_force(socket, SOCKET_BUFFER));
    if let Err(e) = forced {
        tracing::warn!(error = %e, "cannot force large relay socket buffers; large reads may fail");
        let _ = sockopt::set_socket_send_buffer_size(socket, SOCKET_BUFFER);
        let _ = sockopt::set_socket_recv_buffer_size(socket, SOCKET_BUFFER);
    }
}

/// A FUSE_INIT request as the kernel would send it, offering `abi`.
fn synthetic_init(abi: KernelAbi) -> Vec<u8> {
    let len = IN_HEADER_LEN + INIT_IN_LEN;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    msg.extend_from_slice(&SYNTHETIC_UNIQUE.to_ne_bytes());
    // nodeid, uid, gid, pid, total_extlen, padding: root, by the kernel.
    msg.resize(IN_HEADER_LEN, 0);
    let flags = abi.capabilities | FUSE_INIT_EXT;
    msg.extend_from_slice(&abi.major.to_ne_bytes());
    msg.extend_from_slice(&abi.minor.to_ne_bytes());
    // max_readahead: as much as the filesystem asks for.
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    msg.extend_from_slice(&(flags as u32).to_ne_bytes());
    msg.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes());
    msg.resize(len, 0);
    msg
}

/// Reads the session's answer to the synthetic FUSE_INIT and drops it:
/// the kernel already has the first daemon's.
fn check_init_reply(relay_end: &OwnedFd, abi: KernelAbi) -> Result<(), TakeoverError> {
    let mut reply = vec![0u8; 4096];
    let len = rustix::io::read(relay_end, &mut reply).map_err(io("read the FUSE_INIT reply"))?;
    let header = reply
        .get(..OUT_HEADER_LEN)
        .filter(|_| len >= OUT_HEADER_LEN)
        .ok_or(TakeoverError::BadInitReply { len })?;
    let field = |at: usize| [header[at], header[at + 1], header[at + 2], header[at + 3]];
    let errno = i32::from_ne_bytes(field(4));
    let unique = u64::from_ne_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    if unique != SYNTHETIC_UNIQUE {
        return Err(TakeoverError::BadInitReply { len });
    }
    if errno != 0 {
        return Err(TakeoverError::InitRefused { abi, errno: -errno });
    }
    Ok(())
}

/// Requests from the device to the session, replies back, each on a
/// thread of its own; then the resend. When the kernel ends the connection
/// the session's socket is shut down, which ends the session.
fn start_relay(
    device: &Arc<OwnedFd>,
    relay_end: Arc<OwnedFd>,
    device_gone: Arc<AtomicBool>,
) -> Result<(), TakeoverError> {
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(drop)
            .map_err(|source| TakeoverError::Io {
                op: "start the relay",
                source,
            })
    };
    let (from, to, gone) = (device.clone(), relay_end.clone(), device_gone);
    spawn(
        "darter-relay-in",
        Box::new(move || {
            let end = relay(from.as_fd(), to.as_fd());
            tracing::debug!(?end, "the relay of requests ended");
            if end == RelayEnd::SourceGone {
                gone.store(true, Ordering::SeqCst);
            }
            let _ = rustix::net::shutdown(&*to, Shutdown::Both);
        }),
    )?;
    let (from, to) = (relay_end, device.clone());
    spawn(
        "darter-relay-out",
        Box::new(move || {
            let end = relay(from.as_fd(), to.as_fd());
            tracing::debug!(?end, "the relay of replies ended");
        }),
    )?;
    resend_unanswered(device.as_fd())
}

/// How a relay direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayEnd {
    /// The source ended: ENODEV from the device, end of file from the socket.
    SourceGone,
    /// The destination ended.
    DestinationGone,
    /// Another error.
    Failed(Errno),
}

/// Copies messages from `from` to `to`, one read to one write, until
/// either ends. A reply the kernel no longer wants (ENOENT: its request
/// was interrupted) is dropped.
fn relay(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> RelayEnd {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let len = match rustix::io::readv(from, &mut [IoSliceMut::new(&mut buffer)]) {
            Ok(0) | Err(Errno::NODEV) => return RelayEnd::SourceGone,
            Ok(len) => len,
            Err(Errno::INTR | Errno::AGAIN | Errno::NOENT) => continue,
            Err(e) => return RelayEnd::Failed(e),
        };
        loop {
            match rustix::io::writev(to, &[IoSlice::new(&buffer[..len])]) {
                Ok(_) | Err(Errno::NOENT) => break,
                Err(Errno::INTR) => continue,
                Err(Errno::NODEV | Errno::PIPE | Errno::CONNRESET) => {
                    return RelayEnd::DestinationGone;
                }
                Err(e) => return RelayEnd::Failed(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_init_carries_the_abi_in_the_kernel_layout() {
        let abi = KernelAbi {
            major: 7,
            minor: 41,
            capabilities: (1 << 35) | (1 << 3),
        };
        let msg = synthetic_init(abi);
        let word = |at: usize| u32::from_ne_bytes(msg[at..at + 4].try_into().unwrap());
        assert_eq!(msg.len(), 104);
        assert_eq!(word(0), 104);
        assert_eq!(word(4), FUSE_INIT);
        assert_eq!(word(IN_HEADER_LEN), 7);
        assert_eq!(word(IN_HEADER_LEN + 4), 41);
        assert_eq!(word(IN_HEADER_LEN + 12), (1 << 3) | (1 << 30));
        assert_eq!(word(IN_HEADER_LEN + 16), 1 << 3);
    }

    #[test]
    fn a_relay_keeps_message_boundaries_and_ends_with_its_source() {
        let pair = || {
            rustix::net::socketpair(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )
            .unwrap()
        };
        let (source, source_peer) = pair();
        let (dest_peer, dest) = pair();
        let relay_thread =
            std::thread::spawn(move || relay(source_peer.as_fd(), dest_peer.as_fd()));
        for msg in [&b"first"[..], b"second message", b"x"] {
            rustix::io::write(&source, msg).unwrap();
            let mut buf = [0u8; 64];
            let len = rustix::io::read(&dest, &mut buf).unwrap();
            assert_eq!(&buf[..len], msg);
        }
        drop(source);
        assert_eq!(relay_thread.join().unwrap(), RelayEnd::SourceGone);
    }
}
