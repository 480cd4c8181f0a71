//! Block jobs: background work that holds node references.

mod mirror;

pub(crate) use crate::api::JobStatus;
pub(crate) use mirror::{JobError, MirrorJob, MIRROR_CHUNK_BYTES, MIRROR_MAX_IN_FLIGHT};
