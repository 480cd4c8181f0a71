//! The monitor's protocol vocabulary: JSON-RPC error codes, the error type
//! the methods return, and why the daemon should stop. Shared by the
//! framing (`mod.rs`) and the methods (`methods.rs`), which need nothing
//! else of each other.

use crate::daemon::OpError;

/// JSON-RPC 2.0 error codes.
pub mod code {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Wrong parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The operation failed.
    pub const FAILED: i64 = -32000;
    /// The named node, export or job does not exist.
    pub const NOT_FOUND: i64 = -32001;
    /// The request conflicts with the current state (in use, name taken).
    pub const CONFLICT: i64 = -32002;
    /// The daemon is shutting down.
    pub const SHUTTING_DOWN: i64 = -32003;
}

/// Why the daemon should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The monitor's `shutdown` method.
    Monitor,
}

/// A JSON-RPC error: code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// JSON-RPC code.
    pub code: i64,
    /// What went wrong and what to do.
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
}

impl From<OpError> for RpcError {
    fn from(e: OpError) -> Self {
        use crate::daemon::OpErrorKind;
        let c = match e.kind() {
            OpErrorKind::NotFound => code::NOT_FOUND,
            OpErrorKind::Conflict => code::CONFLICT,
            OpErrorKind::Invalid => code::INVALID_PARAMS,
            OpErrorKind::Failed => code::FAILED,
            OpErrorKind::ShuttingDown => code::SHUTTING_DOWN,
        };
        RpcError::new(c, e.to_string())
    }
}
