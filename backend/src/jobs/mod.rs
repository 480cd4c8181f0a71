//! Block jobs: background work that holds node references.

mod bitmap;

pub use bitmap::DirtyBitmap;
