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
pub struct BounceRegion {
    base: NonNull<u8>,
    slot_bytes: usize,
    len_bytes: usize,
}

// SAFETY: the region is plain anonymous memory owned by this value; the engine
// hands disjoint slot buffers to the kernel and to its own thread only.
unsafe impl Send for BounceRegion {}

impl BounceRegion {
    /// Maps `slots` page-aligned buffers of `slot_bytes` each.
    pub fn new(slots: usize, slot_bytes: usize) -> io::Result<Self> {
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
    pub fn empty() -> Self {
        BounceRegion {
            base: NonNull::dangling(),
            slot_bytes: 0,
            len_bytes: 0,
        }
    }

    /// Size of one slot's buffer.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Start of slot `index`'s buffer (page-aligned when `slot_bytes` is).
    pub fn slot_ptr(&self, index: usize) -> *mut u8 {
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

/// Copies `src` iovecs into `dst` (gather). Returns bytes copied.
///
/// # Safety
/// Every iovec must describe memory valid for reads of its length, and `dst`
/// must be valid for writes of the total length; the ranges must not overlap.
pub unsafe fn gather(segments: &[libc::iovec], dst: *mut u8) -> usize {
    let mut done = 0;
    for seg in segments {
        let to = dst.wrapping_add(done);
        // SAFETY: the caller guarantees both ranges are valid and disjoint.
        unsafe { std::ptr::copy_nonoverlapping(seg.iov_base as *const u8, to, seg.iov_len) };
        done += seg.iov_len;
    }
    done
}

/// Copies from `src` into the `dst` iovecs (scatter). Returns bytes copied.
///
/// # Safety
/// Every iovec must describe memory valid for writes of its length, and `src`
/// must be valid for reads of the total length; the ranges must not overlap.
pub unsafe fn scatter(src: *const u8, segments: &[libc::iovec]) -> usize {
    let mut done = 0;
    for seg in segments {
        let from = src.wrapping_add(done);
        // SAFETY: the caller guarantees both ranges are valid and disjoint.
        unsafe { std::ptr::copy_nonoverlapping(from, seg.iov_base as *mut u8, seg.iov_len) };
        done += seg.iov_len;
    }
    done
}

/// Fills the iovecs with zeroes.
///
/// # Safety
/// Every iovec must describe memory valid for writes of its length.
pub unsafe fn zero(segments: &[libc::iovec]) {
    for seg in segments {
        // SAFETY: the caller guarantees the range is valid for writes.
        unsafe { std::ptr::write_bytes(seg.iov_base as *mut u8, 0, seg.iov_len) };
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

    #[test]
    fn gather_scatter_round_trip() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 5];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let mut flat = [0u8; 8];
        // SAFETY: all buffers are live locals of the stated lengths.
        assert_eq!(unsafe { gather(&iov, flat.as_mut_ptr()) }, 8);
        assert_eq!(flat, [1, 1, 1, 2, 2, 2, 2, 2]);
        let src = [9u8, 8, 7, 6, 5, 4, 3, 2];
        // SAFETY: as above.
        assert_eq!(unsafe { scatter(src.as_ptr(), &iov) }, 8);
        // SAFETY: as above.
        unsafe { zero(&iov[..1]) };
        assert_eq!(a, [0, 0, 0]);
        assert_eq!(b, [6, 5, 4, 3, 2]);
    }
}
