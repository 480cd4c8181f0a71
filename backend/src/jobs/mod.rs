//! Block jobs: background work that holds node references.

mod mirror;

pub use mirror::{JobPhase, JobStatus, MirrorJob, MIRROR_CHUNK_BYTES, MIRROR_MAX_IN_FLIGHT};
