//! Preallocated bounce memory for requests that miss the device's direct-I/O
//! alignment: one fixed-size buffer per in-flight slot, so a slot never waits
//! for bounce memory and the request path never allocates.

use std::io;
use std::ptr::NonNull;

/// An anonymous mapping carved into `slots` buffers of `slot_bytes` each.
///
/// Mapped `MAP_NORESERVE`: pages become resident only when a misaligned
/// request touches them, so the reservation costs address space, not memory.
#[derive(Debug)]
pub(super) struct BounceRegion {
    base: NonNull<u8>,
    slot_bytes: usize,
    len_bytes: usize,
}

// SAFETY: the region is plain anonymous memory owned by this value; the engine
// hands disjoint slot buffers to the kernel and to its own thread only.
unsafe impl Send for BounceRegion {}

impl BounceRegion {
    /// Maps `slots` page-aligned buffers of `slot_bytes` each.
    pub(super) fn new(slots: usize, slot_bytes: usize) -> io::Result<Self> {
        let len_bytes = slots
            .checked_mul(slot_bytes)
            .filter(|&n| n > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bounce region size"))?;
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing aliases no existing memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BounceRegion {
            base: NonNull::new(ptr.cast()).expect("mmap returned a null mapping"),
            slot_bytes,
            len_bytes,
        })
    }

    /// A region with no memory, left behind when a table leaks its mapping.
    pub(super) fn empty() -> Self {
        BounceRegion {
            base: NonNull::dangling(),
            slot_bytes: 0,
            len_bytes: 0,
        }
    }

    /// Size of one slot's buffer.
    pub(super) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Start of slot `index`'s buffer (page-aligned when `slot_bytes` is).
    pub(super) fn slot_ptr(&self, index: usize) -> *mut u8 {
        assert!((index + 1) * self.slot_bytes <= self.len_bytes);
        // SAFETY: the assertion keeps the offset inside the mapping.
        unsafe { self.base.as_ptr().add(index * self.slot_bytes) }
    }
}

impl Drop for BounceRegion {
    fn drop(&mut self) {
        if self.len_bytes == 0 {
            return;
        }
        // SAFETY: base/len describe exactly the mapping made in `new`; the
        // engine drops the region only when no slot buffer is with the kernel.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len_bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_and_page_aligned() {
        let region = BounceRegion::new(4, 1 << 20).unwrap();
        for i in 0..4 {
            assert_eq!(region.slot_ptr(i) as usize % 4096, 0);
        }
        assert_eq!(
            region.slot_ptr(1) as usize - region.slot_ptr(0) as usize,
            1 << 20
        );
    }
}
