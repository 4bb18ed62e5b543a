//! Darter's on-disk format.
//!
//! An image is a *bootstrap* ([`bootstrap`]: an EROFS filesystem image of
//! the whole tree, see [`erofs`]) plus *blobs* ([`blob`]: compressed chunks
//! and a chunk table). This crate owns every byte of those formats and the
//! OCI media types and annotations that carry them ([`oci`]).
//!
//! It must not do I/O: readers take a [`ReadAt`], writers a
//! [`std::io::Write`] or return bytes. No network, no files, no threads,
//! no logging. Everything read is validated; malformed input is an error
//! value, never a panic. `docs/format.md` is the normative description;
//! constants marked `ON-DISK` cannot change without a format version bump.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod blob;
pub mod bootstrap;
pub mod compress;
pub mod digest;
pub mod erofs;
mod le;
pub mod oci;
pub mod tree;

pub use digest::{Digest, DigestAlgo};

/// Positional reads from an immutable byte source (a file, a buffer, a
/// remote blob).
pub trait ReadAt {
    /// Total size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error if the range is not all there.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| short_read())?;
        let end = start.checked_add(buf.len()).ok_or_else(short_read)?;
        buf.copy_from_slice(self.get(start..end).ok_or_else(short_read)?);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

fn short_read() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "read past the end of the buffer",
    )
}
