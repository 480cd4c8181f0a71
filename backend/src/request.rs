//! The protocol-neutral request vocabulary shared by every front and the engine.

/// One block operation, as a front decoded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Read `len_bytes` at `offset_bytes` into the request's segments.
    Read,
    /// Write the request's segments at `offset_bytes`; `fua` makes the write
    /// durable before it completes.
    Write {
        /// Force unit access: durable on completion.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// The range's contents become undefined; the device may deallocate it.
    Discard,
    /// The range reads back as zeroes; `unmap` allows deallocating it.
    WriteZeroes {
        /// The front allows the range to be deallocated.
        unmap: bool,
    },
}

impl BlockOp {
    /// Whether the operation changes the medium (refused on read-only exports).
    pub fn modifies(self) -> bool {
        matches!(
            self,
            BlockOp::Write { .. } | BlockOp::Discard | BlockOp::WriteZeroes { .. }
        )
    }

    /// Whether data moves through the request's segments.
    pub fn moves_data(self) -> bool {
        matches!(self, BlockOp::Read | BlockOp::Write { .. })
    }

    /// Short lowercase name for logs and statistics.
    pub fn name(self) -> &'static str {
        match self {
            BlockOp::Read => "read",
            BlockOp::Write { fua: false } => "write",
            BlockOp::Write { fua: true } => "write-fua",
            BlockOp::Flush => "flush",
            BlockOp::Discard => "discard",
            BlockOp::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// A validated block request: offsets and lengths are in bytes and lie inside
/// the node; for reads and writes `segments` hold exactly `len_bytes` of
/// memory the front vouches for until the request completes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockRequest<'a> {
    /// What to do.
    pub op: BlockOp,
    /// Start of the range on the node.
    pub offset_bytes: u64,
    /// Length of the range; for reads and writes the sum of the segments.
    pub len_bytes: u64,
    /// Data buffers for reads and writes; empty otherwise.
    pub segments: &'a [libc::iovec],
}

/// Why a request failed, as far as the front needs to know: each front maps
/// this to its protocol status in exactly one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request is malformed or out of range (guest error).
    #[error("invalid request")]
    Invalid,
    /// The operation is not supported by this export or node.
    #[error("operation not supported")]
    Unsupported,
    /// The backing device failed it; the errno says how.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Io(i32),
}

/// The result of one request.
pub(crate) type RequestResult = Result<(), RequestError>;
