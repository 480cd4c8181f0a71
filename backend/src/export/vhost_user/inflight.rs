//! Inflight I/O tracking for split rings (the vhost-user spec's "Inflight I/O
//! tracking"): a buffer in shared memory that records, for each queue, which
//! descriptor chains the backend took from the ring and has not answered, so
//! that a backend started after a crash can run them again.
//!
//! The frontend keeps the buffer across backend restarts. QEMU asks the first
//! backend for one (`GET_INFLIGHT_FD`: [`create`] makes a sealed memfd) and
//! hands it to every backend process it connects to (`SET_INFLIGHT_FD`:
//! [`InflightRegion::map`]) each time it starts the device. Its contents and
//! the message that describes it come from the frontend and are hostile until
//! checked: the mapping's size must be exactly what the message's queue count
//! and size need, the file must be sealed against shrinking (a file truncated
//! under the mapping would fault the daemon at its next access), every header
//! is checked when mapped and again, with every descriptor's state, when its
//! ring starts ([`QueueInflight::recover`]). The request path computes offsets
//! only from the queue size checked then, never from what the region says.
//!
//! Layout (the spec's; numbers in native byte order): one queue region per
//! queue, each starting on a [`QUEUE_REGION_ALIGN`]-byte boundary (as
//! libvhost-user and DPDK place them, so their buffers and ours have the same
//! size for the same queues):
//!
//! | offset | field |
//! |---|---|
//! | 0 | `u64 features` (none are defined: 0) |
//! | 8 | `u16 version` (0: never initialized, 1) |
//! | 10 | `u16 desc_num` (the ring size) |
//! | 12 | `u16 last_batch_head` |
//! | 14 | `u16 used_idx` |
//! | 16 + 16·i | descriptor `i`: `u8 inflight`, 5 bytes padding, `u16 next`, `u64 counter` |
//!
//! The request path (one queue's worker thread; no lock, no allocation; every
//! store is a release store so the order below is the order a successor
//! process finds):
//! - at pop ([`QueueInflight::mark`]): `counter` of the head gets the queue's
//!   next counter, then `inflight` = 1;
//! - at completion ([`QueueInflight::link`] before the used ring is written,
//!   [`QueueInflight::clear`] after): `next` = `last_batch_head`,
//!   `last_batch_head` = head; the used element and index are published (a
//!   batch of one); `inflight` = 0; `used_idx` = the used ring's index.
//!
//! So at any instant every chain taken from the ring is either counted in the
//! used ring or marked in flight, except the one completion between its used
//! index and its `used_idx`, which the spec's check repairs: when the ring
//! starts, a `used_idx` behind the used ring's index means the last batch was
//! published but not yet cleared, and its entries are cleared. What is still
//! marked then is resubmitted in counter order, and the ring goes on from the
//! used index plus that count.

use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{MemfdFlags, SealFlags};
use vhost::vhost_user::message::VhostUserInflight;

/// Bytes of a queue region's header: features, version, desc_num,
/// last_batch_head, used_idx.
pub(crate) const HEADER_BYTES: usize = 16;
/// Bytes of one descriptor's state (`DescStateSplit`).
pub(crate) const DESC_STATE_BYTES: usize = 16;
/// Each queue region starts on this boundary.
pub(crate) const QUEUE_REGION_ALIGN: usize = 64;
/// The region version this code writes and reads.
pub(crate) const REGION_VERSION: u16 = 1;

// Field offsets in a queue region's header.
const FEATURES: usize = 0;
const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
// Field offsets in a descriptor's state.
const DESC_INFLIGHT: usize = 0;
const DESC_NEXT: usize = 6;
const DESC_COUNTER: usize = 8;

/// Bytes of one queue region for a ring of `queue_size` descriptors.
pub(crate) fn queue_region_bytes(queue_size: u16) -> usize {
    (HEADER_BYTES + DESC_STATE_BYTES * usize::from(queue_size)).next_multiple_of(QUEUE_REGION_ALIGN)
}

/// Bytes of the whole buffer for `num_queues` rings of `queue_size`.
pub(crate) fn region_bytes(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_bytes(queue_size)
}

/// What a frontend may ask for: at most the export's queues, rings of at
/// most the size we offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The export's queue count.
    pub queues: u16,
    /// The largest ring the export accepts (`max_queue_size`).
    pub queue_size: u16,
}

impl Limits {
    fn check(&self, num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
        if num_queues == 0 || num_queues > self.queues {
            return Err(InflightError::Queues {
                asked: num_queues,
                max: self.queues,
            });
        }
        if queue_size == 0 || queue_size > self.queue_size {
            return Err(InflightError::QueueSize {
                asked: queue_size,
                max: self.queue_size,
            });
        }
        Ok(())
    }
}

/// Why an inflight buffer, or one of its queue regions, cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InflightError {
    #[error("the frontend describes {asked} queues; this export has 1 to {max}")]
    Queues { asked: u16, max: u16 },
    #[error("the frontend describes rings of {asked} descriptors; this export takes 1 to {max}")]
    QueueSize { asked: u16, max: u16 },
    #[error(
        "mmap_size is {got} bytes; {num_queues} queues of {queue_size} descriptors take exactly {want}"
    )]
    Size {
        got: u64,
        want: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("mmap_offset {0} is not a multiple of the page size")]
    Offset(u64),
    #[error("the buffer ({size} bytes at offset {offset}) does not fit in its file ({file_bytes} bytes)")]
    PastEnd {
        offset: u64,
        size: u64,
        file_bytes: u64,
    },
    #[error(
        "the file is not sealed against shrinking (F_SEAL_SHRINK): it could be truncated under the mapping"
    )]
    NotSealed,
    #[error("cannot {what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("queue {queue}: region version {version} (known: 0 and {REGION_VERSION})")]
    Version { queue: u16, version: u16 },
    #[error("queue {queue}: region feature flags {features:#x} (none are defined)")]
    Features { queue: u16, features: u64 },
    #[error("queue {queue}: the region says desc_num {desc_num}, the buffer was described for rings of {queue_size}")]
    DescNum {
        queue: u16,
        desc_num: u16,
        queue_size: u16,
    },
    #[error("the ring has {ring_size} descriptors, its inflight region {desc_num}")]
    RingSize { ring_size: u16, desc_num: u16 },
    #[error("descriptor {head}: inflight flag {value} (0 or 1)")]
    Flag { head: u16, value: u8 },
    #[error(
        "the used ring is {batch} entries past the region's used_idx, more than the ring's {desc_num}"
    )]
    BatchTooLong { batch: u16, desc_num: u16 },
    #[error("the last batch's list reaches descriptor {index}, outside the ring's {desc_num}")]
    BatchIndex { index: u16, desc_num: u16 },
    #[error("descriptors {first} and {second} both carry submission counter {counter}")]
    DuplicateCounter {
        first: u16,
        second: u16,
        counter: u64,
    },
    #[error(
        "{in_flight} requests are marked in flight, but the guest made only {taken} available past the used index"
    )]
    MoreThanTaken { in_flight: usize, taken: u16 },
    #[error(
        "descriptor {head} carries the largest submission counter there is; nothing can follow it"
    )]
    CounterExhausted { head: u16 },
}

impl InflightError {
    fn os(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> InflightError {
        move |e| InflightError::Os {
            what,
            source: e.into(),
        }
    }
}

/// `GET_INFLIGHT_FD`: a zeroed buffer for what `request` describes, in a memfd
/// sealed against growing, shrinking and further seals. Every queue region
/// starts at version 0 (never initialized): its ring's first start
/// initializes it.
pub(crate) fn create(
    request: &VhostUserInflight,
    limits: Limits,
) -> Result<(VhostUserInflight, File), InflightError> {
    limits.check(request.num_queues, request.queue_size)?;
    let bytes = region_bytes(request.num_queues, request.queue_size) as u64;
    let fd = rustix::fs::memfd_create(
        "sluice-inflight",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(InflightError::os("create a memfd"))?;
    rustix::fs::ftruncate(&fd, bytes).map_err(InflightError::os("size the memfd"))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(InflightError::os("seal the memfd"))?;
    let reply = VhostUserInflight {
        mmap_size: bytes,
        mmap_offset: 0,
        num_queues: request.num_queues,
        queue_size: request.queue_size,
    };
    Ok((reply, File::from(fd)))
}

fn page_size() -> u64 {
    // SAFETY: sysconf takes no pointers and only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// A mapped inflight buffer, shared with the frontend (which may write it at
/// any time): touched only through atomic loads and stores at offsets inside
/// the mapping that [`InflightRegion::map`] checked.
#[derive(Debug)]
pub(crate) struct InflightRegion {
    base: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is owned by this value and only accessed through atomics
// (see `atomic`), which any thread may use at once; it is unmapped only when
// the last reference goes.
unsafe impl Send for InflightRegion {}
// SAFETY: as above: shared access is through atomics only.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// `SET_INFLIGHT_FD`: checks `msg` against `limits` and `file` (exact size,
    /// page-aligned offset, inside the file, sealed against shrinking), maps
    /// it shared, and checks every queue region's header.
    pub(crate) fn map(
        file: &File,
        msg: &VhostUserInflight,
        limits: Limits,
    ) -> Result<Arc<Self>, InflightError> {
        limits.check(msg.num_queues, msg.queue_size)?;
        let want = region_bytes(msg.num_queues, msg.queue_size) as u64;
        if msg.mmap_size != want {
            return Err(InflightError::Size {
                got: msg.mmap_size,
                want,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
            });
        }
        let offset = libc::off_t::try_from(msg.mmap_offset)
            .ok()
            .filter(|_| msg.mmap_offset % page_size() == 0)
            .ok_or(InflightError::Offset(msg.mmap_offset))?;
        let file_bytes = file
            .metadata()
            .map_err(|source| InflightError::Os {
                what: "stat the inflight file",
                source,
            })?
            .len();
        let past_end = InflightError::PastEnd {
            offset: msg.mmap_offset,
            size: msg.mmap_size,
            file_bytes,
        };
        match msg.mmap_offset.checked_add(msg.mmap_size) {
            Some(end) if end <= file_bytes => {}
            _ => return Err(past_end),
        }
        // Not a memfd (EINVAL), or a memfd that can still shrink.
        let seals = rustix::fs::fcntl_get_seals(file).map_err(|_| InflightError::NotSealed)?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(InflightError::NotSealed);
        }
        let len = want as usize;
        // SAFETY: a new shared mapping at an address of the kernel's choosing
        // aliases none of our memory. `len` bytes at `offset` lie inside the
        // file (checked above), and the file cannot shrink (sealed), so every
        // page of the mapping stays backed while it exists.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(file),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Os {
                what: "map the inflight buffer",
                source: io::Error::last_os_error(),
            });
        }
        let region = Arc::new(InflightRegion {
            base: NonNull::new(ptr.cast()).expect("mmap returned a null mapping"),
            len,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        });
        for q in 0..msg.num_queues {
            region.check_header(q)?;
        }
        Ok(region)
    }

    /// Queues the buffer covers.
    pub(crate) fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Ring size the buffer was made for.
    pub(crate) fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s region, to be used by that queue's worker only.
    pub(crate) fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        (index < self.num_queues).then(|| QueueInflight {
            region: self.clone(),
            index,
            offset: usize::from(index) * queue_region_bytes(self.queue_size),
            desc_num: self.queue_size,
            counter: 1,
            last_batch_head: 0,
        })
    }

    /// A queue region's header as the frontend left it: version 0, or
    /// version 1 with no feature flags and `desc_num` our queue size.
    fn check_header(&self, queue: u16) -> Result<(), InflightError> {
        let at = usize::from(queue) * queue_region_bytes(self.queue_size);
        let version = self.u16_at(at + VERSION).load(Ordering::Acquire);
        match version {
            0 => Ok(()),
            REGION_VERSION => {
                let features = self.u64_at(at + FEATURES).load(Ordering::Acquire);
                if features != 0 {
                    return Err(InflightError::Features { queue, features });
                }
                let desc_num = self.u16_at(at + DESC_NUM).load(Ordering::Acquire);
                if desc_num != self.queue_size {
                    return Err(InflightError::DescNum {
                        queue,
                        desc_num,
                        queue_size: self.queue_size,
                    });
                }
                Ok(())
            }
            version => Err(InflightError::Version { queue, version }),
        }
    }

    /// The `T`-sized atomic at byte `offset` of the mapping.
    ///
    /// # Panics
    /// If `offset` is misaligned or the value would end past the mapping: the
    /// callers compute offsets from the checked queue size only, so this is a
    /// bug of ours, never the frontend's input.
    fn atomic<T>(&self, offset: usize) -> *mut T {
        let size = std::mem::size_of::<T>();
        assert!(
            offset % std::mem::align_of::<T>() == 0
                && offset.checked_add(size).is_some_and(|end| end <= self.len),
            "inflight region access at {offset} (+{size}) outside its {} bytes",
            self.len
        );
        // SAFETY: the assertion keeps `offset` inside the mapping.
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    fn u8_at(&self, offset: usize) -> &AtomicU8 {
        // SAFETY: `atomic` returns a pointer inside the mapping, which lives as
        // long as `self`; the memory is only ever accessed atomically by us
        // (the frontend's writes are those of another process).
        unsafe { AtomicU8::from_ptr(self.atomic(offset)) }
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: as in `u8_at`; `atomic` checked the 2-byte alignment.
        unsafe { AtomicU16::from_ptr(self.atomic(offset)) }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: as in `u8_at`; `atomic` checked the 8-byte alignment.
        unsafe { AtomicU64::from_ptr(self.atomic(offset)) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: base/len describe exactly the mapping made in `map`, and
        // nothing refers to it any more (every `QueueInflight` holds an Arc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The buffer the frontend set on a connection, handed to each queue's worker
/// when its ring starts. Locked only by `SET_INFLIGHT_FD` and at a ring's
/// start, never on the request path.
#[derive(Debug)]
pub(crate) struct Handoff {
    region: Mutex<Option<Arc<InflightRegion>>>,
    /// Per queue: a buffer was set since the queue's worker last took it.
    pending: Box<[AtomicBool]>,
}

impl Handoff {
    /// For a connection to an export of `queues` queues; nothing set yet.
    pub(crate) fn new(queues: u16) -> Self {
        Handoff {
            region: Mutex::new(None),
            pending: (0..queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// `SET_INFLIGHT_FD`: every queue takes `region` at its ring's next start
    /// (a queue the buffer does not cover goes untracked).
    pub(crate) fn install(&self, region: Arc<InflightRegion>) {
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) = Some(region);
        for p in self.pending.iter() {
            p.store(true, Ordering::Release);
        }
    }

    /// Whether queue `queue` has a buffer to take. One relaxed load: the
    /// worker looks before every batch of pops.
    pub(crate) fn pending(&self, queue: u16) -> bool {
        self.pending
            .get(usize::from(queue))
            .is_some_and(|p| p.load(Ordering::Relaxed))
    }

    /// Takes queue `queue`'s part of the buffer set last (`None`: the buffer
    /// does not cover this queue).
    pub(crate) fn take(&self, queue: u16) -> Option<QueueInflight> {
        let pending = self.pending.get(usize::from(queue))?;
        pending.swap(false, Ordering::AcqRel);
        let region = self.region.lock().unwrap_or_else(|p| p.into_inner());
        region.as_ref()?.queue(queue)
    }
}

/// Where a ring stands when it starts (read from guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingIndices {
    /// Descriptors in the ring.
    pub size: u16,
    /// The used ring's index.
    pub used: u16,
    /// The available ring's index.
    pub avail: u16,
}

/// What a queue's region says when its ring starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// The region had never been used (version 0); it is initialized now and
    /// the ring goes on from where the frontend says.
    Fresh,
    /// The heads still in flight, in the order they were taken from the ring
    /// (their counters): they are submitted again before anything new, and
    /// the ring goes on from the used index plus their count.
    Resume { resubmit: Vec<u16> },
}

/// One queue's part of an inflight buffer, owned by that queue's worker.
#[derive(Debug)]
pub(crate) struct QueueInflight {
    region: Arc<InflightRegion>,
    /// The queue's index in the buffer.
    index: u16,
    /// Where the queue's region starts in the mapping.
    offset: usize,
    /// The queue size checked when mapped: every head used below it.
    desc_num: u16,
    /// The next submission counter.
    counter: u64,
    /// Our copy of `last_batch_head` (the region's may be overwritten by the
    /// frontend; ours is what we wrote last).
    last_batch_head: u16,
}

impl QueueInflight {
    fn desc(&self, head: u16) -> usize {
        self.offset + HEADER_BYTES + usize::from(head) * DESC_STATE_BYTES
    }

    /// The ring size this region tracks.
    #[cfg(test)]
    pub(crate) fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// At pop: `head` was taken from the ring. A head the ring cannot hold
    /// (the guest's error; such a chain is refused) is not tracked.
    pub(crate) fn mark(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let d = self.desc(head);
        let r = &self.region;
        r.u64_at(d + DESC_COUNTER)
            .store(self.counter, Ordering::Release);
        self.counter = self.counter.wrapping_add(1);
        r.u8_at(d + DESC_INFLIGHT).store(1, Ordering::Release);
    }

    /// At completion, before the used ring is written: `head` joins the
    /// last batch.
    pub(crate) fn link(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let d = self.desc(head);
        let r = &self.region;
        r.u16_at(d + DESC_NEXT)
            .store(self.last_batch_head, Ordering::Release);
        r.u16_at(self.offset + LAST_BATCH_HEAD)
            .store(head, Ordering::Release);
        self.last_batch_head = head;
    }

    /// At completion, after the used ring's index became `used_idx`: `head`
    /// is no longer in flight.
    pub(crate) fn clear(&mut self, head: u16, used_idx: u16) {
        let r = &self.region;
        if head < self.desc_num {
            r.u8_at(self.desc(head) + DESC_INFLIGHT)
                .store(0, Ordering::Release);
        }
        r.u16_at(self.offset + USED_IDX)
            .store(used_idx, Ordering::Release);
    }

    /// When the ring starts: checks the region against the ring, repairs the
    /// last batch (the spec's `used_idx` check), and returns what is still in
    /// flight. Reads every field once and checks everything before it writes
    /// anything; a region that does not check out is left as it was.
    pub(crate) fn recover(&mut self, ring: RingIndices) -> Result<Recovery, InflightError> {
        let RingIndices {
            size: ring_size,
            used: used_idx,
            avail: avail_idx,
        } = ring;
        if ring_size != self.desc_num {
            return Err(InflightError::RingSize {
                ring_size,
                desc_num: self.desc_num,
            });
        }
        let r = self.region.clone();
        let at = self.offset;
        let version = r.u16_at(at + VERSION).load(Ordering::Acquire);
        if version == 0 {
            // Never used: start it from the ring as it is.
            for head in 0..self.desc_num {
                let d = self.desc(head);
                r.u8_at(d + DESC_INFLIGHT).store(0, Ordering::Release);
                r.u16_at(d + DESC_NEXT).store(0, Ordering::Release);
                r.u64_at(d + DESC_COUNTER).store(0, Ordering::Release);
            }
            r.u64_at(at + FEATURES).store(0, Ordering::Release);
            r.u16_at(at + DESC_NUM)
                .store(self.desc_num, Ordering::Release);
            r.u16_at(at + LAST_BATCH_HEAD).store(0, Ordering::Release);
            r.u16_at(at + USED_IDX).store(used_idx, Ordering::Release);
            r.u16_at(at + VERSION)
                .store(REGION_VERSION, Ordering::Release);
            self.last_batch_head = 0;
            self.counter = 1;
            return Ok(Recovery::Fresh);
        }
        // The header again: the frontend may have changed it since the map.
        r.check_header(self.index)?;
        let last_batch_head = r.u16_at(at + LAST_BATCH_HEAD).load(Ordering::Acquire);
        let region_used = r.u16_at(at + USED_IDX).load(Ordering::Acquire);
        let mut flags = Vec::with_capacity(usize::from(self.desc_num));
        let mut nexts = Vec::with_capacity(usize::from(self.desc_num));
        let mut counters = Vec::with_capacity(usize::from(self.desc_num));
        for head in 0..self.desc_num {
            let d = self.desc(head);
            let flag = r.u8_at(d + DESC_INFLIGHT).load(Ordering::Acquire);
            if flag > 1 {
                return Err(InflightError::Flag { head, value: flag });
            }
            flags.push(flag);
            nexts.push(r.u16_at(d + DESC_NEXT).load(Ordering::Acquire));
            counters.push(r.u64_at(d + DESC_COUNTER).load(Ordering::Acquire));
        }
        // The last batch was published in the used ring but not cleared here:
        // its entries are answered.
        let batch = used_idx.wrapping_sub(region_used);
        if batch > self.desc_num {
            return Err(InflightError::BatchTooLong {
                batch,
                desc_num: self.desc_num,
            });
        }
        let mut answered = Vec::with_capacity(usize::from(batch));
        let mut index = last_batch_head;
        for step in 0..batch {
            if index >= self.desc_num {
                return Err(InflightError::BatchIndex {
                    index,
                    desc_num: self.desc_num,
                });
            }
            answered.push(index);
            flags[usize::from(index)] = 0;
            if step + 1 < batch {
                index = nexts[usize::from(index)];
            }
        }
        let mut resubmit: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| flags[usize::from(h)] == 1)
            .map(|h| (counters[usize::from(h)], h))
            .collect();
        resubmit.sort_unstable();
        if let Some(w) = resubmit.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(InflightError::DuplicateCounter {
                first: w[0].1,
                second: w[1].1,
                counter: w[0].0,
            });
        }
        // Each head in flight was taken from the available ring after the
        // last answered one: the guest must have made that many available.
        let taken = avail_idx.wrapping_sub(used_idx);
        if resubmit.len() > usize::from(taken) {
            return Err(InflightError::MoreThanTaken {
                in_flight: resubmit.len(),
                taken,
            });
        }
        let next_counter = match resubmit.last() {
            Some(&(counter, head)) => counter
                .checked_add(1)
                .ok_or(InflightError::CounterExhausted { head })?,
            None => 1,
        };
        // Checked: now repair, in the spec's order (entries, then used_idx).
        for head in answered {
            r.u8_at(self.desc(head) + DESC_INFLIGHT)
                .store(0, Ordering::Release);
        }
        r.u16_at(at + USED_IDX).store(used_idx, Ordering::Release);
        self.last_batch_head = last_batch_head;
        self.counter = next_counter;
        Ok(Recovery::Resume {
            resubmit: resubmit.into_iter().map(|(_, head)| head).collect(),
        })
    }
}

#[cfg(test)]
mod tests;
