//! Pushing the blobs a build writes to a registry as they are written, and
//! picking up what an interrupted push of the same build left behind.
//!
//! A data blob is buffered while small (then pushed whole, after a HEAD
//! that skips it if present) and streamed once it is not; its digest is
//! known only at the end. With a push journal ([`crate::journal`]), a rerun
//! of an interrupted push streams a blob the journal names in one of two
//! ways instead, both keeping a copy of the bytes (the spool) so that a
//! wrong hint costs an upload, never a wrong image:
//!
//! - **verify**: the journal names the blob's digest and the registry has
//!   it: the bytes are only hashed and spooled, and at the end pushed from
//!   the spool unless the registry has the blob they hash to.
//! - **resume**: the journal names an upload session the registry still
//!   holds `n` bytes of: the first `n` bytes are only hashed and spooled,
//!   the rest is sent to that session, and the registry checks the whole
//!   blob's digest when it is finished; should it refuse, the blob is
//!   pushed from the spool.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use darter_builder::{BlobSink, BuildError};
use darter_oci::{OciDigest, Sha256Writer};
use darter_registry::{PushOutcome, RegistryError, Repository, StreamingUpload, UploadCheckpoint};
use tracing::{debug, info, warn};

use crate::journal::{BlobHint, PushJournal};
use crate::stores::{Remote, registry_digest};

/// Blobs up to this size are buffered and pushed whole (after a HEAD that
/// skips them if present); larger ones stream as they are written.
const BUFFERED_BLOB_LIMIT: usize = 8 << 20;
/// A streaming upload sends this much per append.
const STREAM_PIECE: usize = 8 << 20;

/// A push to one registry repository, shared by the sink and its uploads.
pub(crate) struct Pusher {
    pub(crate) remote: Arc<Remote>,
    pub(crate) repository: Repository,
    sent: AtomicU64,
    journal: Option<Mutex<PushJournal>>,
    /// Data blobs begun so far: the next one's ordinal in the journal.
    blobs_begun: AtomicUsize,
}

impl Pusher {
    pub(crate) fn new(
        remote: Arc<Remote>,
        repository: Repository,
        journal: Option<PushJournal>,
    ) -> Self {
        Pusher {
            remote,
            repository,
            sent: AtomicU64::new(0),
            journal: journal.map(Mutex::new),
            blobs_begun: AtomicUsize::new(0),
        }
    }

    pub(crate) fn name(&self) -> String {
        self.repository.to_string()
    }

    pub(crate) fn fail(&self, e: impl std::fmt::Display) -> BuildError {
        BuildError::Destination {
            destination: self.name(),
            detail: e.to_string(),
        }
    }

    pub(crate) fn count_sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Pushes blob `digest` of `size` bytes from `source` unless the
    /// registry has it; counts what it sends.
    pub(crate) fn push(
        &self,
        digest: &OciDigest,
        size: u64,
        source: &darter_registry::BlobSource,
    ) -> Result<PushOutcome, RegistryError> {
        let outcome = self.remote.rt.block_on(self.remote.client.push_blob(
            &self.repository,
            &registry_digest(digest),
            source,
            None,
        ))?;
        if outcome == PushOutcome::Uploaded {
            self.count_sent(size);
        }
        Ok(outcome)
    }

    /// Starts the next data blob.
    pub(crate) fn begin_blob(self: &Arc<Self>) -> RegistryUpload {
        RegistryUpload {
            pusher: self.clone(),
            ordinal: self.blobs_begun.fetch_add(1, Ordering::Relaxed),
            hasher: Sha256Writer::new(io::sink()),
            buffer: Vec::new(),
            buffer_start: 0,
            mode: Mode::Buffering,
        }
    }

    /// The image is complete: the journal has served its purpose.
    pub(crate) fn complete(&self) {
        if let Some(mut journal) = self.journal() {
            journal.complete();
        }
    }

    fn journal(&self) -> Option<MutexGuard<'_, PushJournal>> {
        let journal = self.journal.as_ref()?;
        Some(journal.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn hint(&self, ordinal: usize) -> Option<BlobHint> {
        self.journal()?.hint(ordinal).cloned()
    }

    fn record(&self, ordinal: usize, hint: Option<BlobHint>) {
        if let Some(mut journal) = self.journal() {
            journal.record(ordinal, hint);
        }
    }

    fn spool(&self) -> Option<Spool> {
        let dir = self.journal()?.dir().to_owned();
        match Spool::create(dir) {
            Ok(spool) => Some(spool),
            Err(e) => {
                warn!("{e}; not using the push journal for this blob");
                None
            }
        }
    }

    /// Whether the registry has blob `digest` of `size` bytes; `false` if
    /// asking fails (the blob is then pushed as if it had not been).
    fn has_blob(&self, digest: &OciDigest, size: u64) -> bool {
        let client = &self.remote.client;
        let found = self
            .remote
            .rt
            .block_on(client.blob_size(&self.repository, &registry_digest(digest)));
        match found {
            Ok(found) => found == Some(size),
            Err(e) => {
                debug!(error = %e, "cannot check for a blob the push journal names");
                false
            }
        }
    }

    fn begin_stream(&self) -> Result<StreamingUpload, RegistryError> {
        let client = &self.remote.client;
        self.remote
            .rt
            .block_on(client.begin_streaming_upload(&self.repository))
    }

    /// The upload session `checkpoint` names, if the registry still has it.
    fn resume_stream(&self, checkpoint: &UploadCheckpoint) -> Option<StreamingUpload> {
        let client = &self.remote.client;
        let resumed = self
            .remote
            .rt
            .block_on(client.resume_streaming_upload(&self.repository, checkpoint));
        match resumed {
            Ok(Some(stream)) => Some(stream),
            Ok(None) => {
                debug!("the upload session the push journal names is gone, starting over");
                None
            }
            Err(e) => {
                warn!("cannot resume the upload the push journal names, starting over: {e}");
                None
            }
        }
    }
}

/// A copy of a blob's bytes in an unnamed file, which the system deletes
/// when it is closed, also when the process is killed.
struct Spool {
    file: File,
    dir: PathBuf,
}

impl Spool {
    fn create(dir: PathBuf) -> Result<Spool, BuildError> {
        let file = std::fs::create_dir_all(&dir).and_then(|()| tempfile::tempfile_in(&dir));
        let file = file.map_err(|e| BuildError::Io {
            op: "create a spool file in",
            path: dir.display().to_string(),
            source: e,
        })?;
        Ok(Spool { file, dir })
    }

    /// The spool as a file the registry client can open (and reopen, to
    /// retry) by path: the unnamed file through its descriptor.
    fn source(&self) -> darter_registry::BlobSource {
        let path = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
        darter_registry::BlobSource::File(path)
    }
}

/// A data blob being pushed as the builder writes it (see the module doc).
pub(crate) struct RegistryUpload {
    pusher: Arc<Pusher>,
    /// The blob's place in the build, its key in the journal.
    ordinal: usize,
    hasher: Sha256Writer<io::Sink>,
    /// Bytes written and not yet sent (or skipped).
    buffer: Vec<u8>,
    /// The blob offset of `buffer[0]`.
    buffer_start: u64,
    mode: Mode,
}

/// How a data blob goes to the registry.
enum Mode {
    /// Small so far: held in the buffer.
    Buffering,
    /// Sent to an upload session as it is written.
    Streaming(StreamingUpload),
    /// Sent to the session an interrupted push left, from the offset the
    /// registry holds; kept in the spool too.
    Resuming(StreamingUpload, Spool),
    /// Only kept in the spool: the registry has what the journal names.
    Verifying(Spool),
}

impl RegistryUpload {
    /// The blob outgrew the buffer: picks how to stream it.
    fn start_streaming(&mut self) -> io::Result<()> {
        let mode = match self.pusher.hint(self.ordinal) {
            Some(BlobHint::Complete { digest, size }) => self.verify(&digest, size),
            Some(BlobHint::Partial(checkpoint)) => self.resume(&checkpoint),
            None => None,
        };
        self.mode = match mode {
            Some(mode) => mode,
            None => Mode::Streaming(self.pusher.begin_stream().map_err(io::Error::other)?),
        };
        let buffered = std::mem::take(&mut self.buffer);
        self.spool_write(&buffered)?;
        self.buffer = buffered;
        Ok(())
    }

    /// Verify mode, if the registry has the blob an earlier run completed.
    fn verify(&self, digest: &OciDigest, size: u64) -> Option<Mode> {
        if !self.pusher.has_blob(digest, size) {
            return None;
        }
        let spool = self.pusher.spool()?;
        info!(blob = self.ordinal, %digest, "the registry has this blob from an interrupted push; checking the rebuilt bytes against it instead of sending them");
        Some(Mode::Verifying(spool))
    }

    /// Resume mode, if the registry still has the session an earlier run
    /// was uploading to.
    fn resume(&self, checkpoint: &UploadCheckpoint) -> Option<Mode> {
        let stream = self.pusher.resume_stream(checkpoint)?;
        let uploaded = stream.uploaded();
        if uploaded == 0 {
            return Some(Mode::Streaming(stream));
        }
        let Some(spool) = self.pusher.spool() else {
            // Without a copy, a refused resumption could not be redone.
            self.abandon(stream);
            return None;
        };
        info!(
            blob = self.ordinal,
            uploaded, "resuming the upload of an interrupted push"
        );
        Some(Mode::Resuming(stream, spool))
    }

    /// Sends the buffered bytes the session lacks (a resumed session has
    /// some already), and records where the session stands.
    fn send_buffer(&mut self) -> io::Result<()> {
        let data = Bytes::from(std::mem::take(&mut self.buffer));
        let start = self.buffer_start;
        self.buffer_start += data.len() as u64;
        let (Mode::Streaming(stream) | Mode::Resuming(stream, _)) = &mut self.mode else {
            return Ok(());
        };
        let held = stream.uploaded().saturating_sub(start);
        let skip = usize::try_from(held).map_or(data.len(), |held| held.min(data.len()));
        if skip == data.len() {
            return Ok(());
        }
        let piece = data.slice(skip..);
        let len = piece.len() as u64;
        let pusher = &self.pusher;
        match pusher.remote.rt.block_on(stream.append(piece)) {
            Ok(()) => {
                pusher.count_sent(len);
                pusher.record(self.ordinal, Some(BlobHint::Partial(stream.checkpoint())));
                Ok(())
            }
            Err(e) => self.append_failed(e),
        }
    }

    /// A resumed upload that fails goes on as a verified one (the spool
    /// has every byte); a fresh one fails the blob.
    fn append_failed(&mut self, e: RegistryError) -> io::Result<()> {
        match std::mem::replace(&mut self.mode, Mode::Buffering) {
            Mode::Resuming(stream, spool) => {
                warn!(
                    blob = self.ordinal,
                    "the resumed upload failed ({e}); the blob will be pushed whole"
                );
                self.abandon(stream);
                self.mode = Mode::Verifying(spool);
                Ok(())
            }
            other => {
                self.mode = other;
                Err(io::Error::other(e))
            }
        }
    }

    /// Cancels an upload session, which the journal then forgets.
    fn abandon(&self, stream: StreamingUpload) {
        self.pusher.remote.rt.block_on(stream.cancel());
        self.pusher.record(self.ordinal, None);
    }

    /// Copies `data` to the spool, if there is one. Bytes only spooled
    /// cannot be had again: on failure the build fails, and the journal
    /// forgets the hint that led here so the next run does not spool.
    fn spool_write(&mut self, data: &[u8]) -> io::Result<()> {
        let (Mode::Resuming(_, spool) | Mode::Verifying(spool)) = &mut self.mode else {
            return Ok(());
        };
        spool.file.write_all(data).map_err(|e| {
            self.pusher.record(self.ordinal, None);
            let dir = spool.dir.display();
            io::Error::new(
                e.kind(),
                format!("spooling blob {} in {dir}: {e}", self.ordinal),
            )
        })
    }

    /// Finishes the blob: pushes it whole if it stayed small, completes its
    /// upload session, or pushes the spool (when verifying, or when the
    /// registry refused to complete a resumed session).
    fn finish(&mut self, digest: &OciDigest, size: u64) -> Result<(), BuildError> {
        let pusher = self.pusher.clone();
        if !matches!(self.mode, Mode::Buffering) {
            self.send_buffer()
                .map_err(|e| pusher.fail(format!("sending blob {digest}: {e}")))?;
        }
        let rt = &pusher.remote.rt;
        let spool = match std::mem::replace(&mut self.mode, Mode::Buffering) {
            Mode::Buffering => {
                let data = Bytes::from(std::mem::take(&mut self.buffer));
                pusher
                    .push(digest, size, &data.into())
                    .map_err(|e| pusher.fail(e))?;
                return Ok(());
            }
            Mode::Streaming(stream) => {
                rt.block_on(stream.finish(&registry_digest(digest)))
                    .map_err(|e| pusher.fail(e))?;
                return Ok(());
            }
            Mode::Resuming(stream, spool) => {
                match rt.block_on(stream.finish(&registry_digest(digest))) {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        info!(blob = self.ordinal, %digest, "the resumed upload does not complete as this blob (did the source change?), pushing it whole: {e}")
                    }
                }
                spool
            }
            Mode::Verifying(spool) => spool,
        };
        match pusher.push(digest, size, &spool.source()) {
            Ok(PushOutcome::Uploaded) => {
                info!(blob = self.ordinal, %digest, "the blob differs from what the interrupted push sent; uploaded it");
                Ok(())
            }
            Ok(_) => {
                debug!(blob = self.ordinal, %digest, "the registry has the rebuilt blob; nothing sent");
                Ok(())
            }
            Err(e) => Err(pusher.fail(e)),
        }
    }
}

impl Write for RegistryUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.write_all(buf)?;
        self.spool_write(buf)?;
        let limit = match self.mode {
            Mode::Buffering => BUFFERED_BLOB_LIMIT,
            Mode::Streaming(_) | Mode::Resuming(..) => STREAM_PIECE,
            // The spool holds the bytes.
            Mode::Verifying(_) => return Ok(buf.len()),
        };
        self.buffer.extend_from_slice(buf);
        if self.buffer.len() >= limit {
            if let Mode::Buffering = self.mode {
                self.start_streaming()?;
            }
            self.send_buffer()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobSink for RegistryUpload {
    fn commit(mut self: Box<Self>) -> io::Result<(OciDigest, u64)> {
        let hasher = std::mem::replace(&mut self.hasher, Sha256Writer::new(io::sink()));
        let (_, digest, size) = hasher.finish();
        let streamed = !matches!(self.mode, Mode::Buffering);
        self.finish(&digest, size).map_err(io::Error::other)?;
        if streamed {
            let complete = BlobHint::Complete {
                digest: digest.clone(),
                size,
            };
            self.pusher.record(self.ordinal, Some(complete));
        }
        Ok((digest, size))
    }
}

impl Drop for RegistryUpload {
    fn drop(&mut self) {
        // An upload dropped before commit (a failed build) is abandoned so
        // the registry can discard its session.
        if let Mode::Streaming(stream) | Mode::Resuming(stream, _) =
            std::mem::replace(&mut self.mode, Mode::Buffering)
        {
            self.abandon(stream);
        }
    }
}
