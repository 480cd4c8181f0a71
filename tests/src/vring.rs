//! A vhost-user frontend that builds the guest side itself, to play QEMU against the real
//! daemon where neither libblkio nor virtio-driver can: set up a ring in a chosen state
//! (indices, descriptors, an inflight buffer as a previous sluice left it) and start it.
//!
//! * [`negotiate`]: connects vhost's own frontend (`vhost::vhost_user::Frontend`) and
//!   negotiates the virtio and protocol features (`INFLIGHT_SHMFD`, `REPLY_ACK`, `MQ`); every
//!   later message asks for a reply, so an error the daemon reports fails the call.
//! * [`GuestMemory`]: guest memory in a memfd (one region at guest address 0), mapped here to
//!   read and write rings and buffers, and handed to the daemon with `SET_MEM_TABLE`.
//! * [`SplitRing`]: a split virtqueue laid out in that memory (descriptor table, available
//!   ring with `used_event`, used ring), written and read field by field.
//! * [`InflightBuffer`]: the inflight buffer (`GET_INFLIGHT_FD`), read and written through its
//!   file in the spec's layout (`backend/src/export/vhost_user/inflight.rs` describes it).
//! * [`start_device`]: the messages QEMU sends to start a device on one ring, in QEMU's
//!   order: `SET_FEATURES`, `SET_INFLIGHT_FD`, `SET_MEM_TABLE`, `SET_VRING_NUM`, `_BASE`,
//!   `_ADDR`, `_KICK`, `_CALL`, then `SET_VRING_ENABLE(1)`.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::MemfdFlags;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

/// Connects to the vhost-user socket `sock` of an export with `queues` queues, takes
/// ownership, acknowledges the offered virtio features that are in `ack` (with
/// `VHOST_USER_F_PROTOCOL_FEATURES`, which must be offered), negotiates `INFLIGHT_SHMFD`
/// (which must be offered), `REPLY_ACK` and `MQ`, and asks for a reply to every message
/// from then on. Returns the frontend and the features acknowledged.
///
/// # Panics
/// On any error, or when the daemon does not offer the protocol features or
/// `INFLIGHT_SHMFD`.
pub fn negotiate(sock: &Path, queues: u16, ack: u64) -> (Frontend, u64) {
    let mut f = Frontend::connect(sock, u64::from(queues)).expect("connect");
    f.set_owner().expect("SET_OWNER");
    let offered = f.get_features().expect("GET_FEATURES");
    let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert!(
        offered & protocol != 0,
        "sluice must offer VHOST_USER_F_PROTOCOL_FEATURES: {offered:#x}"
    );
    let acked = offered & (ack | protocol);
    f.set_features(acked).expect("SET_FEATURES");
    let offered = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(
        offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "sluice must offer INFLIGHT_SHMFD: {offered:?}"
    );
    f.set_protocol_features(
        offered
            & (VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ),
    )
    .expect("SET_PROTOCOL_FEATURES");
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    (f, acked)
}

/// Guest memory: a memfd of `len` bytes at guest address 0, mapped shared here. The
/// daemon maps the same file (`SET_MEM_TABLE`), so what either side writes the other
/// sees. Every access is bounds-checked; the ring indices are accessed atomically, as a
/// driver and a device that run at the same time must.
pub struct GuestMemory {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and unmapped only on drop; every access
// through it is either atomic or a copy of bytes the caller owns at that point of the
// protocol, whichever thread makes it.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// A zeroed memfd of `len` bytes (a multiple of the page size), mapped shared.
    ///
    /// # Panics
    /// When the memfd cannot be made or mapped.
    pub fn new(len: usize) -> GuestMemory {
        assert!(len > 0 && len % 4096 == 0, "guest memory of {len} bytes");
        let fd = rustix::fs::memfd_create("sluice-test-guest", MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        rustix::fs::ftruncate(&fd, len as u64).expect("size the guest memory memfd");
        // SAFETY: a new shared mapping at an address the kernel chooses aliases none of
        // our memory; the file is `len` bytes long and only we could shrink it (we never
        // do), so every page stays backed while the mapping exists.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "mmap guest memory: {}",
            std::io::Error::last_os_error()
        );
        GuestMemory {
            fd,
            base: NonNull::new(ptr.cast()).expect("mmap returned a null mapping"),
            len,
        }
    }

    /// The region for `SET_MEM_TABLE`: the whole memfd at guest address 0, at our mapping's
    /// address in this process (the frontend's "userspace address" that ring addresses are
    /// given in).
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.len as u64,
            userspace_addr: self.base.as_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }

    /// The frontend's address of guest address `gpa` (what `SET_VRING_ADDR` takes).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.base.as_ptr() as u64 + gpa
    }

    /// A pointer to `len` bytes at guest address `gpa`, aligned to `align`.
    ///
    /// # Panics
    /// When the range is outside the memory or misaligned (a bug of the test).
    fn at(&self, gpa: u64, len: usize, align: usize) -> *mut u8 {
        let start = usize::try_from(gpa).expect("guest address");
        assert!(
            start % align == 0 && start.checked_add(len).is_some_and(|end| end <= self.len),
            "guest access at {gpa:#x} (+{len}, align {align}) outside its {} bytes",
            self.len
        );
        // SAFETY: the assertion keeps `start` inside the mapping.
        unsafe { self.base.as_ptr().add(start) }
    }

    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: `at` returns an aligned pointer inside the mapping, which lives as long
        // as `self`; in this process the ring fields are only ever accessed atomically
        // (the daemon's accesses are another process's).
        unsafe { AtomicU16::from_ptr(self.at(gpa, 2, 2).cast()) }
    }

    fn u32_at(&self, gpa: u64) -> &AtomicU32 {
        // SAFETY: as in `u16_at`, with 4-byte alignment checked.
        unsafe { AtomicU32::from_ptr(self.at(gpa, 4, 4).cast()) }
    }

    /// Stores a little-endian `u16` at `gpa` (release: what was written before is visible
    /// to whoever sees it).
    pub fn store_u16(&self, gpa: u64, value: u16) {
        self.u16_at(gpa).store(value.to_le(), Ordering::Release);
    }

    /// Loads a little-endian `u16` at `gpa` (acquire).
    pub fn load_u16(&self, gpa: u64) -> u16 {
        u16::from_le(self.u16_at(gpa).load(Ordering::Acquire))
    }

    /// Stores a little-endian `u32` at `gpa`.
    pub fn store_u32(&self, gpa: u64, value: u32) {
        self.u32_at(gpa).store(value.to_le(), Ordering::Release);
    }

    /// Loads a little-endian `u32` at `gpa`.
    pub fn load_u32(&self, gpa: u64) -> u32 {
        u32::from_le(self.u32_at(gpa).load(Ordering::Acquire))
    }

    /// Copies `data` to guest address `gpa`. For buffers the device does not own at the
    /// time (before the ring starts, or after it returned them).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let dst = self.at(gpa, data.len(), 1);
        // SAFETY: `at` checked that `data.len()` bytes at `dst` are inside the mapping,
        // which cannot overlap `data` (a Rust allocation, not this mapping).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// Copies `len` bytes from guest address `gpa`. For buffers the device returned (read
    /// the used index first: its acquire load orders this copy after the device's writes).
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let src = self.at(gpa, len, 1);
        let mut out = vec![0u8; len];
        // SAFETY: `at` checked that `len` bytes at `src` are inside the mapping; `out` is a
        // new allocation of `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        out
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: base/len describe exactly the mapping made in `new`, and no reference
        // into it outlives `self` (every accessor borrows `self`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One descriptor of a split ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_NEXT`, `VRING_DESC_F_WRITE`.
    pub flags: u16,
    /// The next descriptor of the chain (with `VRING_DESC_F_NEXT`).
    pub next: u16,
}

/// A split virtqueue of `size` descriptors in guest memory, laid out as the spec's legacy
/// layout would (each part on its own 4 KiB page from `base`): descriptor table, available
/// ring (`flags`, `idx`, `ring[size]`, `used_event`), used ring (`flags`, `idx`,
/// `ring[size]` of `{id, len}`, `avail_event`). Indices are free-running `u16`s; ring slots
/// are taken modulo `size`.
#[derive(Debug, Clone, Copy)]
pub struct SplitRing {
    /// Descriptors in the ring.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
}

impl SplitRing {
    /// A ring of `size` descriptors (a power of two) placed from guest address `base` (a
    /// multiple of 4096). Returns it and the first free guest address after it.
    pub fn layout(size: u16, base: u64) -> (SplitRing, u64) {
        assert!(size.is_power_of_two() && base % 4096 == 0);
        let page = |bytes: u64| bytes.next_multiple_of(4096);
        let desc = base;
        let avail = desc + page(16 * u64::from(size));
        let used = avail + page(6 + 2 * u64::from(size));
        let end = used + page(6 + 8 * u64::from(size));
        (
            SplitRing {
                size,
                desc,
                avail,
                used,
            },
            end,
        )
    }

    /// What `SET_VRING_ADDR` takes: the ring's addresses in the frontend's address space.
    pub fn config(&self, mem: &GuestMemory) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: mem.user_addr(self.desc),
            used_ring_addr: mem.user_addr(self.used),
            avail_ring_addr: mem.user_addr(self.avail),
            log_addr: None,
        }
    }

    fn slot(&self, index: u16) -> u64 {
        u64::from(index % self.size)
    }

    /// Writes descriptor `index` of the table.
    pub fn set_desc(&self, mem: &GuestMemory, index: u16, d: Desc) {
        assert!(index < self.size);
        let at = self.desc + 16 * u64::from(index);
        mem.write(at, &d.addr.to_le_bytes());
        mem.write(at + 8, &d.len.to_le_bytes());
        mem.write(at + 12, &d.flags.to_le_bytes());
        mem.write(at + 14, &d.next.to_le_bytes());
    }

    /// Writes `chain` (a list of descriptors) at table entries `heads`, linking each to the
    /// next with `VRING_DESC_F_NEXT`; the flags given for the last are kept as they are.
    pub fn set_chain(&self, mem: &GuestMemory, heads: &[u16], chain: &[Desc]) {
        assert_eq!(heads.len(), chain.len());
        for (i, (&index, d)) in heads.iter().zip(chain).enumerate() {
            let mut d = *d;
            if let Some(&next) = heads.get(i + 1) {
                d.flags |= VRING_DESC_F_NEXT as u16;
                d.next = next;
            }
            self.set_desc(mem, index, d);
        }
    }

    /// Puts `head` in the available ring at (free-running) position `pos`.
    pub fn set_avail_entry(&self, mem: &GuestMemory, pos: u16, head: u16) {
        mem.store_u16(self.avail + 4 + 2 * self.slot(pos), head);
    }

    /// The available ring's index.
    pub fn avail_idx(&self, mem: &GuestMemory) -> u16 {
        mem.load_u16(self.avail + 2)
    }

    /// Sets the available ring's index.
    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.store_u16(self.avail + 2, idx);
    }

    /// Sets `used_event` (with `VIRTIO_RING_F_EVENT_IDX`: the driver wants an interrupt
    /// when the used index passes it).
    pub fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
        mem.store_u16(self.avail + 4 + 2 * u64::from(self.size), idx);
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.load_u16(self.used + 2)
    }

    /// Sets the used ring's index.
    pub fn set_used_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.store_u16(self.used + 2, idx);
    }

    /// The used element at (free-running) position `pos`: `(id, len)`.
    pub fn used_entry(&self, mem: &GuestMemory, pos: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * self.slot(pos);
        (mem.load_u32(at), mem.load_u32(at + 4))
    }

    /// Writes the used element at (free-running) position `pos`.
    pub fn set_used_entry(&self, mem: &GuestMemory, pos: u16, id: u32, len: u32) {
        let at = self.used + 4 + 8 * self.slot(pos);
        mem.store_u32(at, id);
        mem.store_u32(at + 4, len);
    }
}

/// One queue region's header in an inflight buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InflightHeader {
    pub features: u64,
    pub version: u16,
    pub desc_num: u16,
    pub last_batch_head: u16,
    pub used_idx: u16,
}

/// One descriptor's state in an inflight queue region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InflightDesc {
    pub inflight: u8,
    pub next: u16,
    pub counter: u64,
}

/// An inflight buffer the daemon made (`GET_INFLIGHT_FD`: a sealed memfd), read and
/// written through its file. Layout per queue (each region on a 64-byte boundary): `u64
/// features`, `u16 version`, `u16 desc_num`, `u16 last_batch_head`, `u16 used_idx`, then 16
/// bytes per descriptor: `u8 inflight`, 5 bytes padding, `u16 next`, `u64 counter`.
pub struct InflightBuffer {
    pub info: VhostUserInflight,
    pub file: File,
}

impl InflightBuffer {
    /// `GET_INFLIGHT_FD` for `num_queues` rings of `queue_size`.
    ///
    /// # Panics
    /// When the daemon refuses, or its buffer does not have the spec's size.
    pub fn get(f: &mut Frontend, num_queues: u16, queue_size: u16) -> InflightBuffer {
        let (info, file) = f
            .get_inflight_fd(&VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues,
                queue_size,
            })
            .expect("GET_INFLIGHT_FD");
        let buffer = InflightBuffer { info, file };
        assert_eq!(
            info.mmap_size,
            u64::from(num_queues) * buffer.queue_region_bytes(),
            "GET_INFLIGHT_FD's size"
        );
        buffer
    }

    fn queue_region_bytes(&self) -> u64 {
        (16 + 16 * u64::from(self.info.queue_size)).next_multiple_of(64)
    }

    fn queue_at(&self, queue: u16) -> u64 {
        assert!(queue < self.info.num_queues);
        self.info.mmap_offset + u64::from(queue) * self.queue_region_bytes()
    }

    fn desc_at(&self, queue: u16, head: u16) -> u64 {
        assert!(head < self.info.queue_size);
        self.queue_at(queue) + 16 + 16 * u64::from(head)
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        self.file
            .write_all_at(bytes, at)
            .expect("write the inflight buffer");
    }

    fn read<const N: usize>(&self, at: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.file
            .read_exact_at(&mut b, at)
            .expect("read the inflight buffer");
        b
    }

    /// Writes queue `queue`'s header.
    pub fn set_header(&self, queue: u16, h: InflightHeader) {
        let at = self.queue_at(queue);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&h.features.to_ne_bytes());
        b[8..10].copy_from_slice(&h.version.to_ne_bytes());
        b[10..12].copy_from_slice(&h.desc_num.to_ne_bytes());
        b[12..14].copy_from_slice(&h.last_batch_head.to_ne_bytes());
        b[14..16].copy_from_slice(&h.used_idx.to_ne_bytes());
        self.write(at, &b);
    }

    /// Queue `queue`'s header.
    pub fn header(&self, queue: u16) -> InflightHeader {
        let b: [u8; 16] = self.read(self.queue_at(queue));
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        InflightHeader {
            features: u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
            version: u16_at(8),
            desc_num: u16_at(10),
            last_batch_head: u16_at(12),
            used_idx: u16_at(14),
        }
    }

    /// Writes descriptor `head`'s state in queue `queue`'s region.
    pub fn set_desc(&self, queue: u16, head: u16, d: InflightDesc) {
        let mut b = [0u8; 16];
        b[0] = d.inflight;
        b[6..8].copy_from_slice(&d.next.to_ne_bytes());
        b[8..16].copy_from_slice(&d.counter.to_ne_bytes());
        self.write(self.desc_at(queue, head), &b);
    }

    /// Descriptor `head`'s state in queue `queue`'s region.
    pub fn desc(&self, queue: u16, head: u16) -> InflightDesc {
        let b: [u8; 16] = self.read(self.desc_at(queue, head));
        InflightDesc {
            inflight: b[0],
            next: u16::from_ne_bytes([b[6], b[7]]),
            counter: u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// Starts a device on ring `queue` as QEMU does when it (re)connects: `SET_FEATURES`
/// (`features`), `SET_INFLIGHT_FD` (`inflight`), `SET_MEM_TABLE` (`mem`), `SET_VRING_NUM`,
/// `SET_VRING_BASE` (`base`), `SET_VRING_ADDR`, `SET_VRING_KICK`, `SET_VRING_CALL`, and
/// `SET_VRING_ENABLE(1)`. The other rings are left alone.
///
/// # Panics
/// When the daemon refuses a message.
#[allow(clippy::too_many_arguments)]
pub fn start_device(
    f: &mut Frontend,
    features: u64,
    inflight: &InflightBuffer,
    mem: &GuestMemory,
    queue: usize,
    ring: &SplitRing,
    base: u16,
    kick: &EventFd,
    call: &EventFd,
) {
    f.set_features(features).expect("SET_FEATURES");
    f.set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    f.set_mem_table(&[mem.region()]).expect("SET_MEM_TABLE");
    f.set_vring_num(queue, ring.size).expect("SET_VRING_NUM");
    f.set_vring_base(queue, base).expect("SET_VRING_BASE");
    f.set_vring_addr(queue, &ring.config(mem))
        .expect("SET_VRING_ADDR");
    f.set_vring_kick(queue, kick).expect("SET_VRING_KICK");
    f.set_vring_call(queue, call).expect("SET_VRING_CALL");
    f.set_vring_enable(queue, true).expect("SET_VRING_ENABLE");
}

/// Waits at most `timeout` for the eventfd `fd` to become readable (signalled). Does not
/// read it.
pub fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    // SAFETY: `fd` owns the descriptor and outlives this borrow (it is borrowed for the
    // whole function).
    let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let ts = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => return true,
            Ok(_) if left.is_zero() => return false,
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
    }
}

/// Polls `cond` every 10 ms for at most `timeout`; whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
