//! What an export shares with a mirror job: the dirty bitmap, the target,
//! and per-chunk counters of the guest writes that go to both source and
//! target (the job is write-blocking).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::DirtyBitmap;
use crate::node::Node;

/// The mirror's side of an export's data path. Lock-free: queues call it
/// per request.
#[derive(Debug)]
pub struct MirrorTap {
    bitmap: DirtyBitmap,
    target: Arc<Node>,
    /// Per chunk: mirrored guest writes submitted / completed. The copier
    /// leaves a chunk with writes in flight alone, and copies it again if a
    /// write started while it copied (its copy may have landed after the
    /// guest's write on the target).
    started: Box<[AtomicU32]>,
    completed: Box<[AtomicU32]>,
}

impl MirrorTap {
    /// A tap over `capacity_bytes` in `chunk_bytes` chunks, everything dirty.
    pub fn new(capacity_bytes: u64, chunk_bytes: u64, target: Arc<Node>) -> Self {
        let bitmap = DirtyBitmap::new(capacity_bytes, chunk_bytes);
        bitmap.mark_all();
        let chunks = bitmap.chunks();
        MirrorTap {
            bitmap,
            target,
            started: (0..chunks).map(|_| AtomicU32::new(0)).collect(),
            completed: (0..chunks).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// The dirty bitmap.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// The mirror target.
    pub fn target(&self) -> &Arc<Node> {
        &self.target
    }

    fn chunks(&self, offset_bytes: u64, len_bytes: u64) -> std::ops::RangeInclusive<usize> {
        let c = self.bitmap.chunk_bytes();
        let last = self.bitmap.chunks().saturating_sub(1);
        let first = ((offset_bytes / c) as usize).min(last);
        let end = ((offset_bytes + len_bytes.max(1) - 1) / c) as usize;
        first..=end.min(last)
    }

    /// A modification that reached only the source: copy its chunks again.
    pub fn log(&self, offset_bytes: u64, len_bytes: u64) {
        self.bitmap.mark(offset_bytes, len_bytes);
    }

    /// A guest write is about to go to both nodes.
    pub fn begin_write(&self, offset_bytes: u64, len_bytes: u64) {
        for c in self.chunks(offset_bytes, len_bytes) {
            self.started[c].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A mirrored guest write completed; `both_ok` when source and target
    /// both took it (otherwise its chunks are copied again).
    pub fn end_write(&self, offset_bytes: u64, len_bytes: u64, both_ok: bool) {
        if !both_ok {
            self.bitmap.mark(offset_bytes, len_bytes);
        }
        for c in self.chunks(offset_bytes, len_bytes) {
            self.completed[c].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Before copying chunk `c`: the write generation to compare after the
    /// copy, or `None` when a mirrored write to it is in flight.
    pub fn copy_begin(&self, c: usize) -> Option<u32> {
        let started = self.started[c].load(Ordering::Acquire);
        (self.completed[c].load(Ordering::Acquire) == started).then_some(started)
    }

    /// After copying chunk `c`: whether a mirrored write started meanwhile
    /// (then the copy may be stale and the chunk must be copied again).
    pub fn copy_raced(&self, c: usize, generation: u32) -> bool {
        self.started[c].load(Ordering::Acquire) != generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::DiskSpec;

    fn tap() -> MirrorTap {
        let target = Node::open(
            "t",
            &DiskSpec::Null {
                capacity_bytes: 1 << 20,
            },
            false,
        )
        .unwrap();
        MirrorTap::new(1 << 20, 65536, Arc::new(target))
    }

    #[test]
    fn a_copy_is_redone_when_a_mirrored_write_overlaps_it() {
        let t = tap();
        assert_eq!(t.bitmap().dirty(), 16, "everything starts dirty");
        // No write in flight: the copy may start; nothing raced.
        let g = t.copy_begin(1).unwrap();
        assert!(!t.copy_raced(1, g));
        // A write in flight on chunk 1: no copy now.
        t.begin_write(65536 + 512, 4096);
        assert_eq!(t.copy_begin(1), None);
        assert!(t.copy_begin(0).is_some(), "other chunks are unaffected");
        // A copy that started before the write: it raced.
        assert!(t.copy_raced(1, g));
        t.end_write(65536 + 512, 4096, true);
        let g2 = t.copy_begin(1).unwrap();
        assert!(!t.copy_raced(1, g2));
    }

    #[test]
    fn a_failed_half_marks_the_chunks_dirty() {
        let t = tap();
        while t.bitmap().take_next(0).is_some() {}
        t.begin_write(65536 - 512, 1024); // chunks 0 and 1
        t.end_write(65536 - 512, 1024, false);
        assert_eq!(t.bitmap().dirty(), 2);
        t.log(10 * 65536, 1);
        assert_eq!(t.bitmap().dirty(), 3);
    }
}
