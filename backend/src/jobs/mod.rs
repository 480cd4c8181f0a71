//! Block jobs: background work that holds node references.

mod mirror;

pub use crate::api::{JobPhase, JobStatus};
pub use mirror::{CopyError, JobError, MirrorJob, MIRROR_CHUNK_BYTES, MIRROR_MAX_IN_FLIGHT};
