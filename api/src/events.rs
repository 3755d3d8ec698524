//! The VM's event log behind `GET /vm/events`: a bounded ring of the last [`EVENT_LOG_LEN`]
//! events, each with a sequence number that only grows, so a client can ask for "everything
//! after `seq`" and wait (long-poll) for the next one instead of polling `GET /vm`.
//!
//! Pushing never blocks for long (one short lock, then a condition-variable wake-up); a waiting
//! reader holds no lock while it sleeps.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How many events the log keeps; older ones are dropped (a reader asking for them is told).
pub const EVENT_LOG_LEN: usize = 1024;

/// The longest a `GET /vm/events` may wait for an event.
pub const MAX_EVENTS_TIMEOUT: Duration = Duration::from_secs(30);

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A device's backend connection was lost; hype is reconnecting.
    DeviceLost,
    /// A device's backend is connected again (its rings replayed).
    DeviceReconnected,
    /// hype stopped trying to reconnect a device's backend.
    DeviceGaveUp,
    /// A device was hot-plugged.
    DeviceAdded,
    /// A device was hot-unplugged.
    DeviceRemoved,
    /// A device moved to another backend socket.
    BackendSwitched,
    /// A device's config was re-read and had changed (a resize).
    ConfigChanged,
    /// The vCPUs were paused.
    Paused,
    /// The vCPUs were resumed.
    Resumed,
    /// A shutdown was requested (power button).
    ShutdownRequested,
    /// A forced stop was requested, or a shutdown's timeout passed.
    StopRequested,
    /// The guest powered off.
    GuestPoweredOff,
    /// The guest reset itself.
    GuestReset,
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number: 1 for the first event, one more for each after.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// The device it happened to, for device events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// More about it (a socket path, a reason), when there is any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The answer to `GET /vm/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsReply {
    /// The events after the asked-for `since`, oldest first (empty when the wait timed out).
    pub events: Vec<Event>,
    /// The `seq` of the newest event so far (0 before the first): the next `since` to ask for.
    pub last_seq: u64,
    /// Events after `since` that the log no longer holds (it keeps [`EVENT_LOG_LEN`]).
    pub dropped: u64,
}

struct Ring {
    events: VecDeque<Event>,
    last_seq: u64,
}

/// The bounded event log.
pub struct EventLog {
    ring: Mutex<Ring>,
    added: Condvar,
    cap: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new(EVENT_LOG_LEN)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// A log that keeps the last `cap` events (at least one).
    pub fn new(cap: usize) -> Self {
        EventLog {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(cap.max(1)),
                last_seq: 0,
            }),
            added: Condvar::new(),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an event and wakes the readers waiting for one; returns its `seq`.
    pub fn push(&self, kind: EventKind, device: Option<&str>, detail: Option<String>) -> u64 {
        let mut r = self.lock();
        r.last_seq += 1;
        let seq = r.last_seq;
        if r.events.len() == self.cap {
            r.events.pop_front();
        }
        r.events.push_back(Event {
            seq,
            time_ms: now_ms(),
            kind,
            device: device.map(str::to_owned),
            detail,
        });
        drop(r);
        self.added.notify_all();
        seq
    }

    fn collect(r: &Ring, since: u64) -> EventsReply {
        let events: Vec<Event> = r.events.iter().filter(|e| e.seq > since).cloned().collect();
        let first_kept = r.events.front().map_or(r.last_seq + 1, |e| e.seq);
        // Events since+1 .. first_kept-1 existed but are gone.
        let dropped = first_kept.saturating_sub(since.saturating_add(1));
        EventsReply {
            events,
            last_seq: r.last_seq,
            dropped: if since >= r.last_seq { 0 } else { dropped },
        }
    }

    /// The events after `since`; when there are none yet, waits up to `timeout` for one.
    pub fn since(&self, since: u64, timeout: Duration) -> EventsReply {
        let until = Instant::now() + timeout;
        let mut r = self.lock();
        loop {
            if r.last_seq > since {
                return Self::collect(&r, since);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Self::collect(&r, since);
            }
            r = self
                .added
                .wait_timeout(r, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The `seq` of the newest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn keeps_the_last_events_and_counts_the_dropped() {
        let log = EventLog::new(4);
        for _ in 0..10 {
            log.push(EventKind::Paused, None, None);
        }
        let r = log.since(0, Duration::ZERO);
        assert_eq!(
            r.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        assert_eq!((r.last_seq, r.dropped), (10, 6));
        let r = log.since(8, Duration::ZERO);
        assert_eq!(r.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [9, 10]);
        assert_eq!(r.dropped, 0);
        // A `since` beyond the newest (a client that saw another VMM) is not an error.
        let r = log.since(99, Duration::ZERO);
        assert!(r.events.is_empty());
        assert_eq!((r.last_seq, r.dropped), (10, 0));
    }

    #[test]
    fn a_waiting_reader_wakes_on_push_and_times_out_without() {
        let log = Arc::new(EventLog::default());
        let t0 = Instant::now();
        let r = log.since(0, Duration::from_millis(50));
        assert!(r.events.is_empty());
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let l2 = log.clone();
        let waiter = std::thread::spawn(move || l2.since(0, Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(50));
        log.push(EventKind::DeviceLost, Some("blk0"), None);
        let r = waiter.join().unwrap();
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].kind, EventKind::DeviceLost);
        assert_eq!(r.events[0].device.as_deref(), Some("blk0"));
    }
}
