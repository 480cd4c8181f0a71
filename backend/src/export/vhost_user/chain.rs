//! A split ring's descriptor chain rebuilt from its head index alone, for the
//! requests a restarted sluice resubmits: virtio-queue builds chains only
//! while popping them from the available ring (its chain constructor is
//! private), and a resubmitted head is no longer there.
//!
//! The walk follows the rules virtio-queue's pop applies, so a resubmitted
//! chain decodes exactly as it did when it was first popped (the unit tests
//! compare the two on the same rings): at most as many descriptors as the
//! table has (so a loop in `next` ends), a `next` outside the table ends the
//! chain, an indirect descriptor switches to its table once (never from inside
//! one, and only when its length is whole descriptors), and the chain ends
//! before its bytes would pass 4 GiB. Everything is read from guest memory
//! through `GuestMemoryMmap`, so an address outside it ends the chain too; the
//! decoder then refuses what is left.

use virtio_bindings::virtio_ring::VRING_DESC_ALIGN_SIZE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The descriptors of the chain that starts at `head` in a descriptor table
/// of `size` entries at `table`.
pub(super) struct Chain<'m> {
    mem: &'m GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    next: u16,
    /// Descriptors the current table may still yield.
    left: u16,
    in_indirect: bool,
    bytes: u32,
}

impl<'m> Chain<'m> {
    pub(super) fn new(mem: &'m GuestMemoryMmap, table: GuestAddress, size: u16, head: u16) -> Self {
        Chain {
            mem,
            table,
            size,
            next: head,
            left: size,
            in_indirect: false,
            bytes: 0,
        }
    }

    /// Switches to the indirect table `desc` describes; false when it may
    /// not be followed.
    fn enter_indirect(&mut self, desc: &Descriptor) -> bool {
        if self.in_indirect || desc.len() % VRING_DESC_ALIGN_SIZE != 0 {
            return false;
        }
        let Ok(entries) = u16::try_from(desc.len() / VRING_DESC_ALIGN_SIZE) else {
            return false;
        };
        self.table = desc.addr();
        self.size = entries;
        self.next = 0;
        self.left = entries;
        self.in_indirect = true;
        true
    }
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.left == 0 || self.next >= self.size {
                return None;
            }
            let at = self
                .table
                .0
                .checked_add(u64::from(self.next) * u64::from(VRING_DESC_ALIGN_SIZE))?;
            let desc: Descriptor = self.mem.read_obj(GuestAddress(at)).ok()?;
            if desc.refers_to_indirect_table() {
                if !self.enter_indirect(&desc) {
                    self.left = 0;
                    return None;
                }
                continue;
            }
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.left -= 1;
            } else {
                self.left = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    use super::*;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const SIZE: u16 = 16;

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn fields(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// Puts `table` in a fresh ring (and `indirect` at 0x8000), makes `head`
    /// available, and returns what virtio-queue's pop yields and what
    /// `Chain` yields from the head alone.
    #[allow(clippy::type_complexity)]
    fn both(
        table: &[(u16, RawDescriptor)],
        indirect: &[RawDescriptor],
        head: u16,
    ) -> (Vec<(u64, u32, u16, u16)>, Vec<(u64, u32, u16, u16)>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, SIZE);
        for &(i, raw) in table {
            vq.desc_table().store(i, raw).unwrap();
        }
        for (i, raw) in indirect.iter().enumerate() {
            mem.write_obj(*raw, GuestAddress(0x8000 + 16 * i as u64))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
        vq.avail().idx().store(u16::to_le(1));
        let mut q: Queue = vq.create_queue().unwrap();
        let popped: Vec<_> = q
            .pop_descriptor_chain(&mem)
            .expect("virtio-queue pops the head")
            .map(|d| fields(&d))
            .collect();
        let ours: Vec<_> = Chain::new(&mem, vq.desc_table_addr(), SIZE, head)
            .map(|d| fields(&d))
            .collect();
        (popped, ours)
    }

    #[track_caller]
    fn same(table: &[(u16, RawDescriptor)], indirect: &[RawDescriptor], head: u16) -> usize {
        let (popped, ours) = both(table, indirect, head);
        assert_eq!(ours, popped);
        ours.len()
    }

    #[test]
    fn direct_chains_match_virtio_queue() {
        let req = [
            (3, d(0x1000, 16, NEXT, 7)),
            (7, d(0x2000, 4096, NEXT | WRITE, 1)),
            (1, d(0x3000, 1, WRITE, 0)),
        ];
        assert_eq!(same(&req, &[], 3), 3);
        // A single descriptor, a head in the middle of a chain.
        assert_eq!(same(&req, &[], 1), 1);
        assert_eq!(same(&req, &[], 7), 2);
    }

    #[test]
    fn broken_chains_end_where_virtio_queue_ends_them() {
        // next outside the table.
        assert_eq!(same(&[(0, d(0x1000, 16, NEXT, SIZE))], &[], 0), 1);
        // A loop: at most SIZE descriptors.
        let looped = [(0, d(0x1000, 1, NEXT, 1)), (1, d(0x1000, 1, NEXT, 0))];
        assert_eq!(same(&looped, &[], 0), usize::from(SIZE));
        // Past 4 GiB in total.
        let huge = [
            (0, d(0x1000, u32::MAX, NEXT, 1)),
            (1, d(0x1000, 2, NEXT, 2)),
            (2, d(0x1000, 1, 0, 0)),
        ];
        assert_eq!(same(&huge, &[], 0), 1);
        // A table outside guest memory.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(
            Chain::new(&mem, GuestAddress(0x10_0000), SIZE, 0).count(),
            0
        );
        assert_eq!(
            Chain::new(&mem, GuestAddress(u64::MAX - 8), SIZE, 1).count(),
            0
        );
        // A head outside the table.
        assert_eq!(Chain::new(&mem, GuestAddress(0), SIZE, SIZE).count(), 0);
    }

    #[test]
    fn indirect_tables_match_virtio_queue() {
        let table = [
            d(0x1000, 16, NEXT, 1),
            d(0x2000, 512, NEXT | WRITE, 2),
            d(0x3000, 1, WRITE, 0),
        ];
        assert_eq!(same(&[(5, d(0x8000, 48, INDIRECT, 0))], &table, 5), 3);
        // NEXT beside INDIRECT is not followed after the table.
        let both_flags = [
            (5, d(0x8000, 48, INDIRECT | NEXT, 6)),
            (6, d(0x4000, 1, WRITE, 0)),
        ];
        assert_eq!(same(&both_flags, &table, 5), 3);
        // A direct descriptor that leads into an indirect one.
        let via = [(2, d(0x1000, 16, NEXT, 4)), (4, d(0x8000, 48, INDIRECT, 0))];
        assert_eq!(same(&via, &table, 2), 4);
        // Not whole descriptors, an indirect inside an indirect, an empty
        // table, a table past u16::MAX entries.
        assert_eq!(same(&[(0, d(0x8000, 40, INDIRECT, 0))], &table, 0), 0);
        let nested = [d(0x8000, 48, INDIRECT, 0)];
        assert_eq!(same(&[(0, d(0x8000, 16, INDIRECT, 0))], &nested, 0), 0);
        assert_eq!(same(&[(0, d(0x8000, 0, INDIRECT, 0))], &table, 0), 0);
        assert_eq!(
            same(&[(0, d(0x8000, 16 * 65536, INDIRECT, 0))], &table, 0),
            0
        );
        // A loop inside the table ends after its entries.
        let looped = [d(0x1000, 1, NEXT, 1), d(0x1000, 1, NEXT, 0)];
        assert_eq!(same(&[(0, d(0x8000, 32, INDIRECT, 0))], &looped, 0), 2);
    }
}
