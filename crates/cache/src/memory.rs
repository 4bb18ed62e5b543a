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
}
