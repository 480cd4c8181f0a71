//! Block jobs: background work that holds node references.

mod mirror;

pub use mirror::{
    CopyError, JobError, JobPhase, JobStatus, MirrorJob, MIRROR_CHUNK_BYTES, MIRROR_MAX_IN_FLIGHT,
};
