//! sluice: a userspace block-device backend for real hardware.
//!
//! The crate is layered the way a request travels (see ARCHITECTURE.md):
//!
//! - [`export`]: protocol fronts (vhost-user-blk). The only code that knows a
//!   wire protocol; it decodes and validates guest requests into
//!   [`request::BlockRequest`]s and maps results back to protocol statuses.
//! - [`engine`]: one io_uring ring per export queue with a bounded slot table;
//!   it owns every buffer handed to the kernel until its completion is reaped.
//! - [`node`]: backing stores (block device or file opened `O_DIRECT`, or a
//!   null node) with the device profile probed by `sluice-hw`.
//! - [`api`]: the control plane's params and results as serde types, shared
//!   by the config file, the monitor and `sluice ctl`.
//! - [`daemon`]: `sluice serve`: configuration, start-up, readiness and the
//!   shutdown that drains, detaches and flushes.
//! - `fuzzing` (tests and the `fuzzing` feature): the fuzz targets' entry
//!   points, shared by `cargo fuzz` and the corpus replay test.

#![warn(unreachable_pub)]

pub mod alloc;
pub mod api;
pub(crate) mod binding;
pub mod config;
pub mod ctl;
pub(crate) mod daemon;
pub(crate) mod engine;
pub(crate) mod events;
pub(crate) mod export;
pub mod fuzzing;
pub(crate) mod graph;
pub(crate) mod hotplug;
pub(crate) mod iovec;
pub(crate) mod jobs;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod node;
pub(crate) mod qos;
pub(crate) mod request;
pub(crate) mod size;
pub mod udev;
pub(crate) mod unix_socket;
