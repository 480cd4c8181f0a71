//! The block graph: every node and who holds it.
//!
//! Holders are explicit: an export holds the node it serves, the monitor
//! holds the nodes it created (from the config file or `node-add`), a job
//! holds its source and target. A node closes when its last holder lets go,
//! and closing flushes it before the descriptor goes. Control plane only:
//! nothing here is touched on the request path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::node::Node;

/// Who holds a reference to a node.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(tag = "kind", content = "name", rename_all = "kebab-case")]
pub enum Holder {
    /// The monitor: the node was created by configuration or `node-add`.
    Monitor,
    /// An export serving the node.
    Export(String),
    /// A block job using the node.
    Job(String),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Monitor => write!(f, "the monitor"),
            Holder::Export(n) => write!(f, "export {n}"),
            Holder::Job(n) => write!(f, "job {n}"),
        }
    }
}

/// Why a graph operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// No node has that name.
    #[error("no node named {0:?}")]
    NoSuchNode(String),
    /// The name is taken.
    #[error("a node named {0:?} already exists")]
    NameTaken(String),
    /// The node is still used by someone else.
    #[error("node {name:?} is in use by {}: remove those first", list(.holders))]
    InUse {
        /// The node.
        name: String,
        /// Everyone but the caller who holds it.
        holders: Vec<Holder>,
    },
    /// The caller does not hold the node.
    #[error("{holder} does not hold node {name:?}")]
    NotHeld {
        /// The node.
        name: String,
        /// The caller.
        holder: Holder,
    },
}

fn list(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug)]
struct Entry {
    node: Arc<Node>,
    holders: BTreeSet<Holder>,
}

/// Nodes by name with their holders.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    nodes: BTreeMap<String, Entry>,
}

impl Graph {
    /// Adds a node held by `holder`.
    pub(crate) fn insert(&mut self, node: Arc<Node>, holder: Holder) -> Result<(), GraphError> {
        let name = node.name().to_owned();
        if self.nodes.contains_key(&name) {
            return Err(GraphError::NameTaken(name));
        }
        self.nodes.insert(
            name,
            Entry {
                node,
                holders: BTreeSet::from([holder]),
            },
        );
        Ok(())
    }

    /// Whether a node of that name exists.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// The node called `name`.
    pub(crate) fn get(&self, name: &str) -> Result<&Arc<Node>, GraphError> {
        self.nodes
            .get(name)
            .map(|e| &e.node)
            .ok_or_else(|| GraphError::NoSuchNode(name.to_owned()))
    }

    /// Puts `node` in the place of the node of the same name (a reopened
    /// drive), keeping its holders; returns the old one.
    pub(crate) fn replace(&mut self, node: Arc<Node>) -> Result<Arc<Node>, GraphError> {
        let e = self
            .nodes
            .get_mut(node.name())
            .ok_or_else(|| GraphError::NoSuchNode(node.name().to_owned()))?;
        Ok(std::mem::replace(&mut e.node, node))
    }

    /// `holder` takes a reference to node `name`.
    pub(crate) fn hold(&mut self, name: &str, holder: Holder) -> Result<Arc<Node>, GraphError> {
        let e = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| GraphError::NoSuchNode(name.to_owned()))?;
        e.holders.insert(holder);
        Ok(e.node.clone())
    }

    /// `holder` gives its reference back. Returns the node when that was
    /// the last reference: it has left the graph and the caller closes it
    /// (see [`flush_bounded`]).
    pub(crate) fn release(
        &mut self,
        name: &str,
        holder: &Holder,
    ) -> Result<Option<Arc<Node>>, GraphError> {
        let e = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| GraphError::NoSuchNode(name.to_owned()))?;
        if !e.holders.remove(holder) {
            return Err(GraphError::NotHeld {
                name: name.to_owned(),
                holder: holder.clone(),
            });
        }
        if e.holders.is_empty() {
            Ok(self.nodes.remove(name).map(|e| e.node))
        } else {
            Ok(None)
        }
    }

    /// The monitor removes a node it created; refused while anyone else
    /// holds it, naming them.
    pub(crate) fn remove_by_monitor(&mut self, name: &str) -> Result<Arc<Node>, GraphError> {
        let e = self
            .nodes
            .get(name)
            .ok_or_else(|| GraphError::NoSuchNode(name.to_owned()))?;
        let others: Vec<Holder> = e
            .holders
            .iter()
            .filter(|h| **h != Holder::Monitor)
            .cloned()
            .collect();
        if !others.is_empty() {
            return Err(GraphError::InUse {
                name: name.to_owned(),
                holders: others,
            });
        }
        if !e.holders.contains(&Holder::Monitor) {
            return Err(GraphError::NotHeld {
                name: name.to_owned(),
                holder: Holder::Monitor,
            });
        }
        Ok(self.nodes.remove(name).expect("present").node)
    }

    /// Who holds node `name`.
    pub(crate) fn holders(&self, name: &str) -> Vec<Holder> {
        self.nodes
            .get(name)
            .map(|e| e.holders.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The names of the nodes `holder` holds.
    pub(crate) fn held_by(&self, holder: &Holder) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, e)| e.holders.contains(holder))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Every node, by name.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = (&str, &Arc<Node>, Vec<Holder>)> {
        self.nodes
            .iter()
            .map(|(n, e)| (n.as_str(), &e.node, e.holders.iter().cloned().collect()))
    }

    /// Whether the graph is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Flushes `node` on a helper thread and waits at most `timeout`: a device
/// that never answers costs a thread, never the caller. Closing a node that
/// left the graph is this flush; its descriptor goes with the last reference.
pub(crate) fn flush_bounded(node: Arc<Node>, timeout: Duration) -> Result<(), FlushError> {
    let name = node.name().to_owned();
    if node.is_removed() {
        // Its data went with the drive; there is nothing to flush it to.
        tracing::warn!(node = name, "the node's drive was removed: not flushed");
        return Ok(());
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(node.flush());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(FlushError::Failed(e)),
        Err(_) => Err(FlushError::Timeout {
            node: name,
            timeout_ms: timeout.as_millis(),
        }),
    }
}

/// Why a node's flush did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The device or file answered with an error.
    #[error(transparent)]
    Failed(#[from] crate::node::NodeError),
    /// It did not answer in time (the flush is left running on its thread).
    #[error("flush of node {node:?} did not finish within {timeout_ms} ms")]
    Timeout {
        /// The node.
        node: String,
        /// How long it was given.
        timeout_ms: u128,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::DiskSpec;

    fn null(name: &str) -> Arc<Node> {
        Arc::new(
            Node::open(
                name,
                &DiskSpec::Null {
                    capacity_bytes: 1 << 20,
                },
                false,
            )
            .unwrap(),
        )
    }

    #[test]
    fn last_holder_closes_the_node() {
        let mut g = Graph::default();
        g.insert(null("a"), Holder::Monitor).unwrap();
        g.hold("a", Holder::Export("vm0".into())).unwrap();
        assert_eq!(
            g.release("a", &Holder::Monitor)
                .unwrap()
                .map(|n| n.name().to_owned()),
            None
        );
        let last = g.release("a", &Holder::Export("vm0".into())).unwrap();
        assert_eq!(last.unwrap().name(), "a");
        assert!(g.is_empty());
    }

    #[test]
    fn removing_a_node_in_use_names_its_users() {
        let mut g = Graph::default();
        g.insert(null("a"), Holder::Monitor).unwrap();
        g.hold("a", Holder::Export("vm0".into())).unwrap();
        g.hold("a", Holder::Job("mirror0".into())).unwrap();
        let err = g.remove_by_monitor("a").unwrap_err().to_string();
        assert_eq!(
            err,
            "node \"a\" is in use by export vm0, job mirror0: remove those first"
        );
        g.release("a", &Holder::Export("vm0".into())).unwrap();
        g.release("a", &Holder::Job("mirror0".into())).unwrap();
        assert_eq!(g.remove_by_monitor("a").unwrap().name(), "a");
    }

    #[test]
    fn names_are_unique_and_unknown_names_are_errors() {
        let mut g = Graph::default();
        g.insert(null("a"), Holder::Monitor).unwrap();
        assert_eq!(
            g.insert(null("a"), Holder::Monitor),
            Err(GraphError::NameTaken("a".into()))
        );
        assert_eq!(
            g.hold("b", Holder::Monitor).unwrap_err(),
            GraphError::NoSuchNode("b".into())
        );
        assert!(matches!(
            g.release("a", &Holder::Job("j".into())),
            Err(GraphError::NotHeld { .. })
        ));
        assert_eq!(g.held_by(&Holder::Monitor), vec!["a".to_owned()]);
    }
}
