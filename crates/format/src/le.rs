//! Little-endian field access for fixed-size on-disk records.

/// Reads little-endian fields from a fixed-size record. Every accessor is
/// bounds-checked by construction: callers pass records of the exact size
/// their format defines, so an out-of-range offset is a programming error
/// caught by the unit tests, never by input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields<'a>(pub(crate) &'a [u8]);

impl Fields<'_> {
    pub(crate) fn u8(&self, at: usize) -> u8 {
        self.0[at]
    }
    pub(crate) fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.array(at))
    }
    pub(crate) fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.array(at))
    }
    pub(crate) fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.array(at))
    }
    pub(crate) fn array<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.0[at..at + N]);
        out
    }
    pub(crate) fn is_zero(&self, range: std::ops::Range<usize>) -> bool {
        self.0[range].iter().all(|&b| b == 0)
    }
}

/// Writes little-endian fields into a fixed-size record.
#[derive(Debug)]
pub(crate) struct FieldsMut<'a>(pub(crate) &'a mut [u8]);

impl FieldsMut<'_> {
    pub(crate) fn u8(&mut self, at: usize, v: u8) {
        self.0[at] = v;
    }
    pub(crate) fn u16(&mut self, at: usize, v: u16) {
        self.bytes(at, &v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, at: usize, v: u32) {
        self.bytes(at, &v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, at: usize, v: u64) {
        self.bytes(at, &v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, at: usize, v: &[u8]) {
        self.0[at..at + v.len()].copy_from_slice(v);
    }
}
