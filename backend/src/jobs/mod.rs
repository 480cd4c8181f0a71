//! Block jobs: background work that holds node references.

mod mirror;

pub use crate::api::JobStatus;
pub use mirror::{JobError, MirrorJob, MIRROR_CHUNK_BYTES, MIRROR_MAX_IN_FLIGHT};
