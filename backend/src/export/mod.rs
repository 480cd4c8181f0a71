//! Exports: protocol fronts that turn one protocol's requests into block
//! requests on one node. Nothing below `export/` is known to the engine or the
//! nodes; nothing outside it knows a wire protocol.

pub mod vhost_user;

/// Why an export could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The socket path cannot be served.
    #[error("vhost-user socket {path}: {reason}")]
    Socket {
        /// The socket path.
        path: std::path::PathBuf,
        /// What failed and what to do.
        reason: String,
    },
    /// Creating the per-queue io_uring engines failed.
    #[error("export {export}: cannot set up io_uring for queue {queue}: {source}{hint}")]
    Engine {
        /// The export.
        export: String,
        /// The queue.
        queue: u16,
        /// The OS error.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// The vhost-user library refused to start.
    #[error("export {export}: {reason}")]
    Start {
        /// The export.
        export: String,
        /// What failed.
        reason: String,
    },
}
