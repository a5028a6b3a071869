//! The replay log of one handoff stream: encoded events with their ids,
//! bounded by `handoff.replay_bytes`, followed live by the attached client.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One handoff stream's events and who is attached to it.
pub struct StreamLog {
    inner: Mutex<Inner>,
    /// The id of the newest event (or of a state change); followers wait on it.
    changed: watch::Sender<u64>,
    /// The generation of the attached client; a new GET bumps it, which
    /// ends the previous connection.
    owner: watch::Sender<u64>,
    /// Cancels the upstream request (DELETE, grace run out, shutdown).
    pub cancel: CancellationToken,
    /// Why `cancel` fired: "delete" makes the producer end with `cancelled`.
    pub stopped_by_user: std::sync::atomic::AtomicBool,
    /// The `max_streams` slot this stream holds until it is forgotten.
    slot: std::sync::OnceLock<(crate::StreamSlot, Option<crate::ClientSlot>)>,
    /// Where appended events are also published for other instances.
    sink: Option<tokio::sync::mpsc::UnboundedSender<Published>>,
    /// A copy of a stream produced by another instance (the shared store).
    pub mirror: bool,
    limit: usize,
    /// When the newest client attached (ms since the Unix epoch), so that
    /// a takeover message sent before it does not end it.
    attached_at: std::sync::atomic::AtomicU64,
}

/// An event handed to the shared store: id, encoded frame, whether last.
pub type Published = (u64, Bytes, bool);

struct Inner {
    events: VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// The id of the newest event written (0 before the first).
    last_id: u64,
    /// Set once the stream's last event (end or error) is in the log.
    final_id: Option<u64>,
    /// Clients attached now (0 or 1 after takeovers settle).
    attached: usize,
}

/// Where a reader stands after asking for events.
pub enum Read {
    /// Events after the cursor, joined into one frame; the new cursor.
    Events(Bytes, u64, usize),
    /// The cursor is at the final event: nothing more will come.
    Ended,
    /// Nothing new yet.
    Wait,
    /// The events after the cursor were dropped from the replay buffer.
    Gap,
}

impl StreamLog {
    /// An empty log holding at most `limit` bytes of events.
    pub fn new(limit: usize) -> StreamLog {
        StreamLog::build(limit, None, false)
    }

    /// A log whose appended events also go to `sink`, in order.
    pub fn publishing(limit: usize, sink: tokio::sync::mpsc::UnboundedSender<Published>) -> StreamLog {
        StreamLog::build(limit, Some(sink), false)
    }

    /// A local copy of a stream another instance produces.
    pub fn mirrored(limit: usize) -> StreamLog {
        StreamLog::build(limit, None, true)
    }

    fn build(limit: usize, sink: Option<tokio::sync::mpsc::UnboundedSender<Published>>, mirror: bool) -> StreamLog {
        StreamLog {
            inner: Mutex::new(Inner { events: VecDeque::new(), bytes: 0, last_id: 0, final_id: None, attached: 0 }),
            changed: watch::channel(0).0,
            owner: watch::channel(0).0,
            cancel: CancellationToken::new(),
            stopped_by_user: std::sync::atomic::AtomicBool::new(false),
            slot: std::sync::OnceLock::new(),
            sink,
            mirror,
            limit,
            attached_at: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent:
        // every update is a single push or pop.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an encoded event; `last` marks the stream's final event.
    pub fn append(&self, id: u64, frame: Bytes, last: bool) {
        {
            let mut inner = self.lock();
            if inner.final_id.is_some() {
                return;
            }
            inner.bytes += frame.len();
            if let Some(sink) = &self.sink {
                // Sent under the lock so the store sees events in id order.
                let _ = sink.send((id, frame.clone(), last));
            }
            inner.events.push_back((id, frame));
            inner.last_id = id;
            if last {
                inner.final_id = Some(id);
            }
            while inner.bytes > self.limit && inner.events.len() > 1 {
                if let Some((_, old)) = inner.events.pop_front() {
                    inner.bytes -= old.len();
                }
            }
        }
        self.changed.send_replace(id);
    }

    /// Reads events with id > `after`, up to about `max` bytes.
    pub fn read(&self, after: u64, max: usize) -> Read {
        let inner = self.lock();
        if inner.final_id.is_some_and(|f| after >= f) {
            return Read::Ended;
        }
        if after >= inner.last_id {
            return Read::Wait;
        }
        let first = inner.events.front().map_or(inner.last_id + 1, |(id, _)| *id);
        if after + 1 < first {
            return Read::Gap;
        }
        let start = (after + 1 - first) as usize;
        let mut out = BytesMut::new();
        let mut cursor = after;
        let mut count = 0;
        for (id, frame) in inner.events.range(start..) {
            if !out.is_empty() && out.len() + frame.len() > max {
                break;
            }
            out.extend_from_slice(frame);
            cursor = *id;
            count += 1;
        }
        Read::Events(out.freeze(), cursor, count)
    }

    /// Keeps a `max_streams` slot for as long as the stream is held.
    pub fn hold(&self, slot: crate::StreamSlot, client: Option<crate::ClientSlot>) {
        let _ = self.slot.set((slot, client));
    }

    /// The id of the newest event (0 before the first).
    pub fn last_id(&self) -> u64 {
        self.lock().last_id
    }

    /// The final event's id, once the stream has ended.
    pub fn final_id(&self) -> Option<u64> {
        self.lock().final_id
    }

    /// Whether the stream's last event is in the log.
    pub fn ended(&self) -> bool {
        self.final_id().is_some()
    }

    /// A receiver that wakes when an event is appended.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Attaches a client, taking the stream over from any earlier one;
    /// returns its generation and a receiver that tells it when it lost
    /// the stream.
    pub fn attach(&self) -> (u64, watch::Receiver<u64>) {
        self.lock().attached += 1;
        self.attached_at.store(crate::store::unix_ms(), std::sync::atomic::Ordering::Release);
        let mut generation = 0;
        self.owner.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        (generation, self.owner.subscribe())
    }

    /// Ends the attached client's connection without taking the stream
    /// over, so that its EventSource reconnects (the demo's "drop").
    pub fn kick(&self) {
        self.owner.send_modify(|g| *g += 1);
    }

    /// Detaches a client; true when no client is attached any more.
    pub fn detach(&self) -> bool {
        let mut inner = self.lock();
        inner.attached = inner.attached.saturating_sub(1);
        inner.attached == 0
    }

    /// Whether the newest client attached before `ms` (Unix epoch; in the
    /// same millisecond counts as after, and stays).
    pub fn attached_before(&self, ms: u64) -> bool {
        self.attached_at.load(std::sync::atomic::Ordering::Acquire) < ms
    }

    /// Whether a client is attached now.
    pub fn is_attached(&self) -> bool {
        self.lock().attached > 0
    }

    /// The current owner generation.
    pub fn generation(&self) -> u64 {
        *self.owner.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u64) -> Bytes {
        Bytes::from(format!("id: {id}\ndata: x\n\n"))
    }

    #[test]
    fn replay_follow_gap_and_end() {
        let log = StreamLog::new(3 * frame(1).len());
        assert!(matches!(log.read(0, 1 << 20), Read::Wait));
        for id in 1..=5 {
            log.append(id, frame(id), false);
        }
        // Only 3 … 5 are held.
        assert!(matches!(log.read(0, 1 << 20), Read::Gap));
        assert!(matches!(log.read(1, 1 << 20), Read::Gap));
        match log.read(2, 1 << 20) {
            Read::Events(b, cursor, n) => {
                assert_eq!((cursor, n), (5, 3));
                assert!(b.starts_with(b"id: 3\n"));
            }
            _ => panic!("expected events"),
        }
        assert!(matches!(log.read(5, 1 << 20), Read::Wait));
        log.append(6, frame(6), true);
        assert!(matches!(log.read(5, 1 << 20), Read::Events(_, 6, 1)));
        assert!(matches!(log.read(6, 1 << 20), Read::Ended));
        assert_eq!(log.final_id(), Some(6));
        log.append(7, frame(7), false);
        assert!(matches!(log.read(6, 1 << 20), Read::Ended), "nothing after the final event");
    }

    #[test]
    fn takeover_bumps_generation() {
        let log = StreamLog::new(1024);
        let (g1, rx) = log.attach();
        let (g2, _) = log.attach();
        assert!(g2 > g1);
        assert_eq!(*rx.borrow(), g2);
        assert!(!log.detach());
        assert!(log.detach());
    }
}
