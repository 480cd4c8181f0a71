//! The daemon's event stream: what `events_subscribe` clients read. Emitted
//! by the control plane (the daemon's operations, a job's copier thread, a
//! vhost-user export's connection thread), never by a queue's request path:
//! an emit takes a mutex and clones the event for every subscriber.
//!
//! Each subscriber's queue holds at most [`EVENT_QUEUE_EVENTS`]: one that
//! does not keep up (its client stopped reading, and the socket's write
//! timeout has not ended it yet) is dropped, and its stream ends, rather
//! than let the daemon's memory grow for it.

use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use crate::api::Event;
use crate::limits::EVENT_QUEUE_EVENTS;

/// The subscribers of the daemon's events; clones share them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Events {
    subscribers: Arc<Mutex<Vec<mpsc::SyncSender<Event>>>>,
}

impl Events {
    fn lock(&self) -> MutexGuard<'_, Vec<mpsc::SyncSender<Event>>> {
        // Every change is one push or retain: consistent after a panic.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream of the events from now on; it ends when every clone of
    /// this `Events` is gone, or when the subscriber falls
    /// [`EVENT_QUEUE_EVENTS`] behind.
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE_EVENTS);
        self.lock().push(tx);
        rx
    }

    /// Sends `event` to every subscriber; one that went away or whose queue
    /// is full is dropped (never waited for).
    pub(crate) fn emit(&self, event: Event) {
        self.lock().retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::TrySendError::Disconnected(_)) => false,
            Err(mpsc::TrySendError::Full(_)) => {
                tracing::warn!(
                    "an events subscriber fell {EVENT_QUEUE_EVENTS} events behind: its stream is ended"
                );
                false
            }
        });
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

    #[test]
    fn a_subscriber_that_does_not_read_is_dropped_when_its_queue_is_full() {
        let events = Events::default();
        let slow = events.subscribe();
        let e = Event::NodeClosed { node: "n".into() };
        for _ in 0..EVENT_QUEUE_EVENTS {
            events.emit(e.clone());
        }
        assert_eq!(events.lock().len(), 1, "a full queue is not over-full yet");
        events.emit(e.clone());
        assert!(
            events.lock().is_empty(),
            "one event past the bound drops it"
        );
        // What it had queued is still delivered, then the stream ends.
        assert_eq!(slow.try_iter().count(), EVENT_QUEUE_EVENTS);
        assert!(matches!(
            slow.try_recv(),
            Err(mpsc::TryRecvError::Disconnected)
        ));
    }
}
