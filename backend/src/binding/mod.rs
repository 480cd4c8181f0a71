//! What binds an export's queues to a node, below every front: the node they
//! serve (switched by a mirror's pivot), the mirror tap their writes go
//! through, and the pause that lets the control plane switch safely.
//!
//! The fronts differ only in how they hold requests back while paused (a
//! vhost-user queue leaves them in the ring, a ublk queue parks their tags)
//! and how they are woken; the engine's [`SlotTable`](crate::engine::SlotTable)
//! does the tap's bookkeeping for both.

mod bitmap;
mod tap;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

pub(crate) use bitmap::DirtyBitmap;
pub(crate) use tap::MirrorTap;

use crate::node::Node;

/// Shared by an export's queues (lock-free reads on the request path) and
/// the control plane (pivot, job start and end).
#[derive(Debug)]
pub struct Binding {
    /// The node requests go to; a queue moves to a new one once it has
    /// nothing in flight.
    node: ArcSwap<Node>,
    /// The mirror job's tap while one runs on the node.
    mirror: ArcSwapOption<MirrorTap>,
    /// New requests are held back by the front (not lost, not failed).
    paused: AtomicBool,
    /// Bumped by every [`Binding::pause`]: a queue that has seen the new
    /// value has also seen `paused` and starts nothing new.
    pause_generation: AtomicU64,
    /// Bumped after every [`Binding::switch_node`]: a queue compares it
    /// with the one it saw last (one load) instead of loading `node` at
    /// every turn of its polling loop.
    node_generation: AtomicU64,
}

impl Binding {
    /// Queues bound to `node`, not paused, no mirror.
    pub fn new(node: Arc<Node>) -> Self {
        Binding {
            node: ArcSwap::new(node),
            mirror: ArcSwapOption::empty(),
            paused: AtomicBool::new(false),
            pause_generation: AtomicU64::new(0),
            node_generation: AtomicU64::new(0),
        }
    }

    /// The node requests go to now.
    pub fn node(&self) -> Arc<Node> {
        self.node.load_full()
    }

    /// Whether `node` is the one requests go to now (one lock-free load).
    pub fn serves(&self, node: &Arc<Node>) -> bool {
        Arc::ptr_eq(&self.node.load(), node)
    }

    /// Pivot (while paused): requests go to `node` from now on; returns the
    /// old one.
    pub fn switch_node(&self, node: Arc<Node>) -> Arc<Node> {
        let old = self.node.swap(node);
        self.node_generation.fetch_add(1, Ordering::Release);
        old
    }

    /// How many times the node was switched: a queue that read a new value
    /// reads the new node from [`Binding::node`].
    pub fn node_generation(&self) -> u64 {
        self.node_generation.load(Ordering::Acquire)
    }

    /// Hooks a mirror job into (or, with `None`, out of) the data path.
    pub fn set_mirror(&self, tap: Option<Arc<MirrorTap>>) {
        self.mirror.store(tap);
    }

    /// The tap a write must also go through, if a mirror runs (a reference
    /// the request holds until it completes, which keeps the target open).
    pub fn write_tap(&self) -> Option<Arc<MirrorTap>> {
        self.mirror.load_full()
    }

    /// A modification that reached only the node (not mirrored): a running
    /// mirror copies its chunks again.
    pub fn log_modification(&self, offset_bytes: u64, len_bytes: u64) {
        if let Some(tap) = &*self.mirror.load() {
            tap.log(offset_bytes, len_bytes);
        }
    }

    /// Fronts hold new requests back from now on. Returns the pause's
    /// generation, which a queue acknowledges once it will start nothing new.
    pub fn pause(&self) -> u64 {
        self.paused.store(true, Ordering::SeqCst);
        self.pause_generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Fronts take new requests again (they must still be woken).
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Whether new requests are held back.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// The latest pause's generation: a queue that read it reads
    /// `is_paused() == true` afterwards (unless resumed since).
    pub fn pause_generation(&self) -> u64 {
        self.pause_generation.load(Ordering::Acquire)
    }
}
