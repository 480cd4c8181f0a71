//! Decoding a ublk I/O descriptor into a block operation: the one typed
//! function the ublk front uses, unit-tested without a kernel.

use libublk::sys;

use crate::request::BlockOp;

/// ublk counts in 512-byte sectors whatever the block size.
pub(crate) const SECTOR_BYTES: u64 = 512;

/// `UBLK_IO_F_FUA`: an absolute bit of `op_flags` (bit 13).
pub(crate) const UBLK_IO_F_FUA: u32 = sys::UBLK_IO_F_FUA;
/// `UBLK_IO_F_NOUNMAP`: an absolute bit of `op_flags` (bit 15). Testing it
/// after shifting `op_flags` right by 8 reads the wrong bit.
pub(crate) const UBLK_IO_F_NOUNMAP: u32 = sys::UBLK_IO_F_NOUNMAP;

/// What a ublk queue checks an io descriptor against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IoLimits {
    /// Size of the device.
    pub capacity_bytes: u64,
    /// Largest data transfer of one request (the queue's io buffer).
    pub max_io_bytes: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
}

/// An io descriptor that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckedIo {
    /// The operation.
    pub op: BlockOp,
    /// Start on the node.
    pub offset_bytes: u64,
    /// Length of the range.
    pub len_bytes: u64,
}

/// Why an io descriptor is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoRefusal {
    /// The op code is not one we serve: answer `EOPNOTSUPP`.
    UnknownOp(u8),
    /// A known op outside the device's range or limits, or a modification
    /// of a read-only device: answer `EIO`.
    Invalid(BlockOp),
}

/// Decodes and validates one ublk io descriptor (`op_flags`, `start_sector`,
/// `nr_sectors`): the range must lie inside the device (a flush has none:
/// its offset and length are 0),
/// data ops must fit the io buffer, and read-only devices take no
/// modifications. Pure, so the fuzzer drives it without a kernel.
pub(crate) fn check_io(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    limits: &IoLimits,
) -> Result<CheckedIo, IoRefusal> {
    let op = decode_op(op_flags).map_err(IoRefusal::UnknownOp)?;
    if op == BlockOp::Flush {
        // A flush has no range, whatever the descriptor says.
        return Ok(CheckedIo {
            op,
            offset_bytes: 0,
            len_bytes: 0,
        });
    }
    // `start_sector << 9` would drop the high bits and turn a sector far
    // beyond the device into one inside it.
    let offset_bytes = start_sector
        .checked_mul(SECTOR_BYTES)
        .ok_or(IoRefusal::Invalid(op))?;
    let len_bytes = u64::from(nr_sectors) * SECTOR_BYTES;
    let in_range = offset_bytes
        .checked_add(len_bytes)
        .is_some_and(|end| end <= limits.capacity_bytes);
    if !in_range
        || (op.moves_data() && len_bytes > limits.max_io_bytes)
        || (limits.read_only && op.modifies())
    {
        return Err(IoRefusal::Invalid(op));
    }
    Ok(CheckedIo {
        op,
        offset_bytes,
        len_bytes,
    })
}

/// The operation an `op_flags` word asks for: bits 0-7 are the op, the rest
/// are flags at their absolute positions. Unknown ops return `Err(op)`.
pub(crate) fn decode_op(op_flags: u32) -> Result<BlockOp, u8> {
    let op = (op_flags & 0xff) as u8;
    match u32::from(op) {
        sys::UBLK_IO_OP_READ => Ok(BlockOp::Read),
        sys::UBLK_IO_OP_WRITE => Ok(BlockOp::Write {
            fua: op_flags & UBLK_IO_F_FUA != 0,
        }),
        sys::UBLK_IO_OP_FLUSH => Ok(BlockOp::Flush),
        sys::UBLK_IO_OP_DISCARD => Ok(BlockOp::Discard),
        sys::UBLK_IO_OP_WRITE_ZEROES => Ok(BlockOp::WriteZeroes {
            unmap: op_flags & UBLK_IO_F_NOUNMAP == 0,
        }),
        _ => Err(op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_op() {
        assert_eq!(decode_op(0), Ok(BlockOp::Read));
        assert_eq!(decode_op(1), Ok(BlockOp::Write { fua: false }));
        assert_eq!(decode_op(2), Ok(BlockOp::Flush));
        assert_eq!(decode_op(3), Ok(BlockOp::Discard));
        assert_eq!(decode_op(5), Ok(BlockOp::WriteZeroes { unmap: true }));
        assert_eq!(decode_op(4), Err(4)); // WRITE_SAME
        assert_eq!(decode_op(13), Err(13)); // ZONE_APPEND
        assert_eq!(decode_op(0xff), Err(0xff));
    }

    const LIMITS: IoLimits = IoLimits {
        capacity_bytes: 1 << 30,
        max_io_bytes: 1 << 20,
        read_only: false,
    };

    #[test]
    fn checks_range_size_and_read_only() {
        let read = |start, nr| check_io(0, start, nr, &LIMITS);
        assert_eq!(
            read(8, 8),
            Ok(CheckedIo {
                op: BlockOp::Read,
                offset_bytes: 4096,
                len_bytes: 4096
            })
        );
        assert_eq!(read((1 << 21) - 8, 8).map(|io| io.len_bytes), Ok(4096));
        assert_eq!(
            read((1 << 21) - 7, 8),
            Err(IoRefusal::Invalid(BlockOp::Read))
        );
        assert_eq!(read(0, 2049), Err(IoRefusal::Invalid(BlockOp::Read)));
        assert_eq!(
            check_io(3, 0, 1 << 21, &LIMITS).map(|io| io.len_bytes),
            Ok(1 << 30),
            "a discard is not bounded by the io buffer"
        );
        let ro = IoLimits {
            read_only: true,
            ..LIMITS
        };
        let write = BlockOp::Write { fua: false };
        assert_eq!(check_io(1, 0, 8, &ro), Err(IoRefusal::Invalid(write)));
        assert_eq!(check_io(4, 0, 8, &LIMITS), Err(IoRefusal::UnknownOp(4)));
    }

    /// Found by the `ublk_io` fuzz target: the byte offset was
    /// `start_sector << 9`, so a start sector of 2^55 + 8 became byte 4096
    /// and a request far beyond the device was served at its start.
    #[test]
    fn start_sector_beyond_64_bit_bytes_is_refused() {
        for op_flags in [0, 1, 3, 5] {
            let refused = check_io(op_flags, (1 << 55) + 8, 8, &LIMITS);
            assert!(
                matches!(refused, Err(IoRefusal::Invalid(_))),
                "op {op_flags}: {refused:?}"
            );
        }
        assert_eq!(
            check_io(0, u64::MAX, 0, &LIMITS),
            Err(IoRefusal::Invalid(BlockOp::Read))
        );
        // A flush has no range: its offset and length are 0 whatever the
        // descriptor says.
        assert_eq!(
            check_io(2, 1 << 62, 5 << 24, &LIMITS),
            Ok(CheckedIo {
                op: BlockOp::Flush,
                offset_bytes: 0,
                len_bytes: 0
            })
        );
    }

    #[test]
    fn flags_are_absolute_bits() {
        assert_eq!(UBLK_IO_F_FUA, 1 << 13);
        assert_eq!(UBLK_IO_F_NOUNMAP, 1 << 15);
        assert_eq!(decode_op(1 | 1 << 13), Ok(BlockOp::Write { fua: true }));
        assert_eq!(
            decode_op(5 | 1 << 15),
            Ok(BlockOp::WriteZeroes { unmap: false })
        );
        // The bit that `(op_flags >> 8) & UBLK_IO_F_NOUNMAP` would test is
        // bit 23: setting it must not change anything.
        assert_eq!(
            decode_op(5 | 1 << 23),
            Ok(BlockOp::WriteZeroes { unmap: true })
        );
        // FUA on a read is meaningless and ignored; failfast bits too.
        assert_eq!(decode_op(1 << 13 | 1 << 8), Ok(BlockOp::Read));
    }
}
