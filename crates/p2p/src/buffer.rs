//! Piece buffers: page-aligned (the piece store reads and writes them with
//! direct I/O) and reused. A peer moves every byte of a blob through a few
//! piece-sized buffers; fresh allocations would make the kernel find and
//! clear new pages for every piece, which costs more than the copy itself
//! on a virtual machine whose host hands memory over lazily.

use std::sync::{Arc, Mutex, PoisonError};

/// Alignment of buffers, offsets and lengths for direct I/O: the largest
/// logical block size of common devices, and the page size.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Idle buffers a pool keeps for reuse; more are freed when returned.
const IDLE_BUFFERS: usize = 12;

/// Hands out [`PieceBuf`]s of up to `capacity` bytes, reusing returned ones.
#[derive(Debug)]
pub struct BufferPool {
    capacity: usize,
    idle: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A pool of buffers that hold `capacity` bytes (a piece).
    pub fn new(capacity: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            capacity,
            idle: Mutex::default(),
        })
    }

    /// A buffer of `len` bytes, with room to round `len` up to
    /// [`DIRECT_IO_ALIGN`]. Its contents are whatever the last user left:
    /// callers fill it before reading it.
    pub fn take(self: &Arc<Self>, len: usize) -> PieceBuf {
        let storage = if len <= self.capacity {
            let reused = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            reused.unwrap_or_else(|| aligned_storage(self.capacity))
        } else {
            aligned_storage(len)
        };
        let start = storage.as_ptr().align_offset(DIRECT_IO_ALIGN);
        PieceBuf {
            storage,
            start,
            len,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, storage: Vec<u8>) {
        if storage.len() != aligned_len(self.capacity) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_BUFFERS {
            idle.push(storage);
        }
    }
}

/// Room for `len` bytes rounded up to [`DIRECT_IO_ALIGN`], starting at an
/// aligned address somewhere in the first [`DIRECT_IO_ALIGN`] bytes.
fn aligned_storage(len: usize) -> Vec<u8> {
    vec![0; aligned_len(len)]
}

fn aligned_len(len: usize) -> usize {
    round_up(len) + DIRECT_IO_ALIGN
}

/// `len` rounded up to a multiple of [`DIRECT_IO_ALIGN`].
fn round_up(len: usize) -> usize {
    len.div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
}

/// A piece's bytes in an aligned buffer that goes back to its pool when
/// dropped. Dereferences to its `len` bytes.
#[derive(Debug)]
pub struct PieceBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    pool: Option<Arc<BufferPool>>,
}

impl PieceBuf {
    /// The bytes and the slack after them up to the next multiple of
    /// [`DIRECT_IO_ALIGN`]: what a direct read fills.
    pub fn aligned_mut(&mut self) -> &mut [u8] {
        let end = self.start + round_up(self.len);
        &mut self.storage[self.start..end]
    }

    /// Shortens the buffer to `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl std::ops::Deref for PieceBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for PieceBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for PieceBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PieceBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.storage));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        let pool = BufferPool::new(3 * DIRECT_IO_ALIGN);
        let mut first = pool.take(5000);
        assert_eq!(first.len(), 5000);
        assert_eq!(first.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        assert_eq!(first.aligned_mut().len(), 2 * DIRECT_IO_ALIGN);
        first.fill(7);
        let address = first.as_ptr();
        drop(first);
        let second = pool.take(100);
        assert_eq!(second.as_ptr(), address, "the idle buffer is reused");
        assert_eq!(second.len(), 100);
    }

    #[test]
    fn oversized_buffers_are_not_kept() {
        let pool = BufferPool::new(DIRECT_IO_ALIGN);
        let big = pool.take(3 * DIRECT_IO_ALIGN);
        assert_eq!(big.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        drop(big);
        assert!(pool.idle.lock().unwrap().is_empty());
    }
}
