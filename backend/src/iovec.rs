//! Copies between a list of iovecs and one flat buffer: the bounce buffers of
//! the engine and the virtio front's GET_ID both need them, and each copy
//! through raw memory is written once, here.

/// Copies `src` iovecs into `dst` (gather). Returns bytes copied.
///
/// # Safety
/// Every iovec must describe memory valid for reads of its length, and `dst`
/// must be valid for writes of the total length; the ranges must not overlap.
pub(crate) unsafe fn gather(segments: &[libc::iovec], dst: *mut u8) -> usize {
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
pub(crate) unsafe fn scatter(src: *const u8, segments: &[libc::iovec]) -> usize {
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
pub(crate) unsafe fn zero(segments: &[libc::iovec]) {
    for seg in segments {
        // SAFETY: the caller guarantees the range is valid for writes.
        unsafe { std::ptr::write_bytes(seg.iov_base as *mut u8, 0, seg.iov_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
