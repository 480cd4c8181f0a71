//! Decoding a ublk I/O descriptor into a block operation: the one typed
//! function the ublk front uses, unit-tested without a kernel.

use libublk::sys;

use crate::request::BlockOp;

/// `UBLK_IO_F_FUA`: an absolute bit of `op_flags` (bit 13).
pub const UBLK_IO_F_FUA: u32 = sys::UBLK_IO_F_FUA;
/// `UBLK_IO_F_NOUNMAP`: an absolute bit of `op_flags` (bit 15). Testing it
/// after shifting `op_flags` right by 8 reads the wrong bit.
pub const UBLK_IO_F_NOUNMAP: u32 = sys::UBLK_IO_F_NOUNMAP;

/// The operation an `op_flags` word asks for: bits 0-7 are the op, the rest
/// are flags at their absolute positions. Unknown ops return `Err(op)`.
pub fn decode_op(op_flags: u32) -> Result<BlockOp, u8> {
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
