//! A small in-memory LRU of verified chunks, so the many page-sized reads
//! the kernel makes inside one chunk do not each hit the disk cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use darter_format::Digest;

/// Chunks by digest, bounded by total bytes; least recently used leave first.
#[derive(Debug)]
pub(crate) struct MemoryLru {
    capacity: usize,
    used: usize,
    tick: u64,
    entries: HashMap<Digest, (Arc<Vec<u8>>, u64)>,
    order: BTreeMap<u64, Digest>,
}

impl MemoryLru {
    pub(crate) fn new(capacity: usize) -> Self {
        MemoryLru {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub(crate) fn get(&mut self, digest: &Digest) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        let (data, used) = self.entries.get_mut(digest)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, *digest);
        Some(data.clone())
    }

    pub(crate) fn insert(&mut self, digest: Digest, data: Arc<Vec<u8>>) {
        if data.len() > self.capacity || self.entries.contains_key(&digest) {
            return;
        }
        while self.used + data.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&oldest) {
                self.used -= old.len();
            }
        }
        self.tick += 1;
        self.used += data.len();
        self.order.insert(self.tick, digest);
        self.entries.insert(digest, (data, self.tick));
    }
}

/// Compressed frames fetched ahead of need, by (blob, offset), bounded by
/// bytes; the oldest leave first. A frame is taken out when used.
#[derive(Debug)]
pub(crate) struct RawFrames {
    capacity: usize,
    used: usize,
    order: std::collections::VecDeque<(usize, u64)>,
    frames: HashMap<(usize, u64), Vec<u8>>,
}

impl RawFrames {
    pub(crate) fn new(capacity: usize) -> Self {
        RawFrames {
            capacity,
            used: 0,
            order: Default::default(),
            frames: HashMap::new(),
        }
    }

    pub(crate) fn contains(&self, key: &(usize, u64)) -> bool {
        self.frames.contains_key(key)
    }

    pub(crate) fn take(&mut self, key: &(usize, u64)) -> Option<Vec<u8>> {
        let frame = self.frames.remove(key)?;
        self.used -= frame.len();
        // Forget the order of frames already taken, now and then.
        if self.order.len() > 2 * self.frames.len() + 64 {
            let frames = &self.frames;
            self.order.retain(|k| frames.contains_key(k));
        }
        Some(frame)
    }

    pub(crate) fn insert(&mut self, key: (usize, u64), frame: Vec<u8>) {
        if frame.len() > self.capacity || self.frames.contains_key(&key) {
            return;
        }
        while self.used + frame.len() > self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(f) = self.frames.remove(&old) {
                self.used -= f.len();
            }
        }
        self.used += frame.len();
        self.order.push_back(key);
        self.frames.insert(key, frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use darter_format::DigestAlgo;

    #[test]
    fn evicts_least_recently_used() {
        let mut lru = MemoryLru::new(10);
        let d = |b: u8| DigestAlgo::Blake3.digest(&[b]);
        lru.insert(d(1), Arc::new(vec![0; 4]));
        lru.insert(d(2), Arc::new(vec![0; 4]));
        assert!(lru.get(&d(1)).is_some());
        lru.insert(d(3), Arc::new(vec![0; 4]));
        assert!(lru.get(&d(2)).is_none(), "2 was least recently used");
        assert!(lru.get(&d(1)).is_some() && lru.get(&d(3)).is_some());
        lru.insert(d(4), Arc::new(vec![0; 11]));
        assert!(lru.get(&d(4)).is_none(), "larger than the whole cache");
    }

    #[test]
    fn raw_frames_are_bounded_and_taken_once() {
        let mut raw = RawFrames::new(10);
        raw.insert((0, 1), vec![1; 6]);
        raw.insert((0, 2), vec![2; 6]);
        assert!(!raw.contains(&(0, 1)), "oldest evicted to make room");
        assert_eq!(raw.take(&(0, 2)), Some(vec![2; 6]));
        assert_eq!(raw.take(&(0, 2)), None);
        raw.insert((0, 3), vec![3; 11]);
        assert!(!raw.contains(&(0, 3)), "larger than the whole cache");
    }
}
