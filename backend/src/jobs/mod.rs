//! Block jobs: background work that holds node references.

mod bitmap;

pub use bitmap::DirtyBitmap;
mod mirror;
mod tap;

pub use tap::MirrorTap;

pub use mirror::{JobPhase, JobStatus, MirrorJob, MIRROR_CHUNK_BYTES, MIRROR_MAX_IN_FLIGHT};
