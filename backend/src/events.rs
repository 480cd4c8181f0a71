//! The daemon's event stream: what `events_subscribe` clients read. Emitted
//! by the control plane (the daemon's operations, a job's copier thread, a
//! vhost-user export's connection thread), never by a queue's request path:
//! an emit takes a mutex and clones the event for every subscriber.

use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use crate::api::Event;

/// The subscribers of the daemon's events; clones share them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Events {
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Event>>>>,
}

impl Events {
    fn lock(&self) -> MutexGuard<'_, Vec<mpsc::Sender<Event>>> {
        // Every change is one push or retain: consistent after a panic.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream of the events from now on; it ends when every clone of
    /// this `Events` is gone.
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.lock().push(tx);
        rx
    }

    /// Sends `event` to every subscriber; a subscriber that went away is
    /// dropped.
    pub(crate) fn emit(&self, event: Event) {
        self.lock().retain(|tx| tx.send(event.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_gets_each_event_and_gone_ones_are_dropped() {
        let events = Events::default();
        let a = events.subscribe();
        let b = events.clone().subscribe();
        let e = Event::NodeClosed { node: "n".into() };
        events.emit(e.clone());
        assert_eq!(a.try_recv().unwrap(), e);
        assert_eq!(b.try_recv().unwrap(), e);
        drop(b);
        events.emit(e.clone());
        assert_eq!(events.lock().len(), 1);
        assert_eq!(a.try_recv().unwrap(), e);
        assert!(a.try_recv().is_err());
    }
}
