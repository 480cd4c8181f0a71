//! A dirty bitmap: one bit per chunk, set by queue threads without locks,
//! taken (test-and-clear) by the job that copies.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Which chunks changed since they were last copied.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    chunk_bytes: u64,
    chunks: usize,
    dirty: AtomicUsize,
}

impl DirtyBitmap {
    /// A bitmap over `capacity_bytes` in chunks of `chunk_bytes`, all clean.
    pub fn new(capacity_bytes: u64, chunk_bytes: u64) -> Self {
        assert!(chunk_bytes.is_power_of_two());
        let chunks = capacity_bytes.div_ceil(chunk_bytes) as usize;
        DirtyBitmap {
            words: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunk_bytes,
            chunks,
            dirty: AtomicUsize::new(0),
        }
    }

    /// Chunk size.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Dirty chunks now.
    pub fn dirty(&self) -> usize {
        self.dirty.load(Ordering::Acquire)
    }

    /// Marks chunk `c` dirty.
    pub fn set(&self, c: usize) {
        let bit = 1u64 << (c % 64);
        if self.words[c / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            self.dirty.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Marks every chunk touching `[offset, offset + len)` dirty.
    pub fn mark(&self, offset_bytes: u64, len_bytes: u64) {
        if len_bytes == 0 {
            return;
        }
        let first = (offset_bytes / self.chunk_bytes) as usize;
        let last = ((offset_bytes + len_bytes - 1) / self.chunk_bytes) as usize;
        for c in first..=last.min(self.chunks.saturating_sub(1)) {
            self.set(c);
        }
    }

    /// Marks everything dirty (the bulk pass).
    pub fn mark_all(&self) {
        for c in 0..self.chunks {
            self.set(c);
        }
    }

    /// Takes the first dirty chunk at or after `from` (wrapping), clearing
    /// its bit.
    pub fn take_next(&self, from: usize) -> Option<usize> {
        if self.dirty() == 0 || self.chunks == 0 {
            return None;
        }
        let n = self.words.len();
        let from = from % self.chunks;
        let (start, skip) = (from / 64, from % 64);
        for i in 0..=n {
            let w = (start + i) % n;
            // The first word from `from` on; its low bits last, after wrapping.
            let mask = match i {
                0 => !0u64 << skip,
                _ if i == n => (1u64 << skip) - 1,
                _ => !0u64,
            };
            let mut bits = self.words[w].load(Ordering::Acquire) & mask;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                let bit = 1u64 << b;
                if self.words[w].fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    self.dirty.fetch_sub(1, Ordering::AcqRel);
                    return Some(w * 64 + b);
                }
                bits &= !bit;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_ranges_and_takes_each_chunk_once() {
        let b = DirtyBitmap::new(10 * 65536 + 1, 65536);
        assert_eq!(b.chunks(), 11);
        b.mark(65535, 2); // chunks 0 and 1
        b.mark(3 * 65536, 65536); // chunk 3 only
        b.mark(3 * 65536, 1);
        assert_eq!(b.dirty(), 3);
        let mut got = vec![];
        while let Some(c) = b.take_next(0) {
            got.push(c);
        }
        assert_eq!(got, vec![0, 1, 3]);
        assert_eq!(b.dirty(), 0);
        b.mark_all();
        assert_eq!(b.dirty(), 11);
        assert_eq!(b.take_next(10), Some(10));
        assert_eq!(b.take_next(10), Some(0), "wraps around");
    }

    #[test]
    fn concurrent_marks_are_counted_once() {
        let b = std::sync::Arc::new(DirtyBitmap::new(1 << 30, 1 << 20));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..1024u64 {
                        b.mark(i << 20, 4096);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.dirty(), 1024);
    }
}
