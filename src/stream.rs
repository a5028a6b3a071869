//! The event-stream body of direct mode: upstream chunks re-framed as SSE,
//! a keep-alive comment when nothing was written for `sse.keepalive`, an
//! `end` or `error` event last, and one log line when it is over.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{response, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::AbortOnDropHandle;

use crate::body::{BoxError, ResponseBody};
use crate::decompress::Decoded;
use crate::direct::{ClientSocket, Direct};
use crate::error::json_error;
use crate::metrics::{Metrics, OutcomeLabels, RouteMeters};
use crate::reframe::{Reframer, Wire};
use crate::router::Route;
use crate::send_timeout::ConnWrites;
use crate::sse::KEEPALIVE;
use crate::wake::{Gate, OnWake};
use crate::App;

/// How long a stream is quiet before it lets go of its read and frame
/// buffers. A busy stream reuses them from event to event (no allocation
/// per event); an idle one, most of a stream's life at typing pace between
/// answers or while a model thinks, holds none.
const TRIM_AFTER: Duration = Duration::from_secs(1);

/// How long a stream that was busy when last checked must be quiet before
/// it lets go of its buffers. The check is a timer wake-up, which costs as
/// much as a few events: a busy stream is checked every 8 s, not every
/// second (at 10 events/s that was 5% of the instructions of an event).
const TRIM_AFTER_BUSY: Duration = Duration::from_secs(8);

/// Upstream reads between two timer wake-ups that make a stream busy.
const BUSY_READS: u32 = 4;

/// The head every event stream is sent with.
pub fn event_stream_head(head: &mut response::Parts) {
    head.status = StatusCode::OK;
    let h = &mut head.headers;
    let stale =
        [header::CONTENT_LENGTH, header::CONTENT_ENCODING, header::ETAG, header::LAST_MODIFIED, header::EXPIRES];
    // An upstream head seldom has any of them: one pass over its few
    // headers finds out for less than five lookups cost.
    if h.keys().any(|name| stale.contains(name)) {
        for name in stale {
            h.remove(name);
        }
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    h.insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
}

/// Parsed once, at compile time: a name given as text to `insert` is
/// parsed at every call.
static X_ACCEL_BUFFERING: header::HeaderName = header::HeaderName::from_static("x-accel-buffering");

/// Re-frames a direct-mode upstream response as an event stream.
pub fn direct_response(
    app: &Arc<App>,
    route: &Arc<Route>,
    mut head: response::Parts,
    body: crate::upstream::UpstreamBody,
    started: std::time::Instant,
    slot: (crate::StreamSlot, Option<crate::ClientSlot>),
    writer: Writer,
) -> Response<ResponseBody> {
    let sse = crate::proxy::is_event_stream(&head.headers);
    // An SSE upstream on an `auto` route: no second read of the content type.
    let wire = match route.format {
        crate::config::Format::Auto if sse => Wire::Sse,
        format => Wire::choose(format, &head.headers),
    };
    // The upstream's own last event ends an SSE upstream's stream.
    let add_end = !sse;
    let source = Decoded::new(body, &head.headers);
    event_stream_head(&mut head);
    // The client's version, not the upstream's: an HTTP/1.0 upstream's
    // stream still goes out chunked to an HTTP/1.1 client (hyper answers
    // an HTTP/1.0 client in 1.0), as the direct writes frame it.
    head.version = http::Version::HTTP_11;
    let cfg = &app.config;
    let send_timeout = cfg.limits.send_timeout;
    let mut events = Events {
        source,
        source_gate: Some(Gate::default()),
        reframer: Reframer::new(wire, cfg.limits.max_event_bytes as usize),
        out: BytesMut::new(),
        counted: 0,
        finished: false,
        add_end,
        keepalive: cfg.sse.keepalive,
        idle: cfg.limits.idle_timeout,
        last_write: Instant::now(),
        last_upstream: Instant::now(),
        timer: OnWake::new(tokio::time::sleep(cfg.sse.keepalive.min(cfg.limits.idle_timeout).min(TRIM_AFTER))),
        trimmed: false,
        reads: 0,
        deadline: OnWake::new(app.drain.clone().cancelled_owned()),
        names: app.event_names.clone(),
        stats: StreamStats::new(&app.metrics, route, started),
        _slot: slot,
    };
    let direct = match writer {
        Writer::Direct(client, inline) => {
            events.stats.stalled = Some(client.0.writes.clone());
            let direct = Direct::new(client, send_timeout);
            if let Some(inline) = inline {
                inline.put(EventStream { events: Some(events), direct: Some(direct), pump: None });
                return Response::from_parts(head, crate::body::empty());
            }
            Some(direct)
        }
        Writer::Hyper(stalled) => {
            events.stats.stalled = stalled;
            None
        }
        Writer::Relay(stalled) => {
            events.stats.stalled = stalled;
            return Response::from_parts(head, Relay::start(events, send_timeout).boxed_unsync());
        }
    };
    let stream = EventStream { events: Some(events), direct, pump: None };
    Response::from_parts(head, stream.boxed_unsync())
}

/// Who writes an event stream to the client.
pub enum Writer {
    /// The stream itself, on the client's plain HTTP/1.1 socket
    /// (`crate::direct`); with an [`Inline`], the lean path takes the stream
    /// from there and it writes the head too.
    Direct(ClientSocket, Option<Inline>),
    /// hyper, which polls the body (HTTP/1.1 over TLS, whose blocked writes
    /// `crate::send_timeout` times, and HTTP/1.0), with its connection's
    /// [`ConnWrites`]: a connection given up for a blocked write ends its
    /// streams as `send_timeout`, not `client_gone`.
    Hyper(Option<ConnWrites>),
    /// hyper, fed by a task of the stream's own ([`Relay`]): HTTP/2.
    Relay(Option<ConnWrites>),
}

/// The names of the proxy's own events.
#[derive(Clone)]
pub struct Names {
    pub end: Bytes,
    pub error: Bytes,
}

impl Names {
    /// `sse.end_event` and `sse.error_event` of `config`.
    pub fn of(config: &crate::config::Config) -> Names {
        Names { end: Bytes::from(config.sse.end_event.clone()), error: Bytes::from(config.sse.error_event.clone()) }
    }
}

/// The direct-mode event-stream body: on plain HTTP/1.1 it writes its
/// chunks to the client itself (`crate::direct`).
pub struct EventStream {
    events: Option<Events>,
    direct: Option<Direct>,
    /// The task writing the stream, once hyper's buffer was empty.
    pump: Option<AbortOnDropHandle<std::io::Result<Option<Bytes>>>>,
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(pump) = &mut this.pump {
            let result = ready!(Pin::new(pump).poll(cx));
            this.pump = None;
            return Poll::Ready(task_end(result));
        }
        let Some(events) = &mut this.events else {
            return Poll::Ready(None);
        };
        let Some(direct) = &mut this.direct else {
            return match ready!(events.poll_next(cx)) {
                Some(Next::Out) => Poll::Ready(Some(Ok(Frame::data(events.take_frame())))),
                Some(Next::Static(frame)) => Poll::Ready(Some(Ok(Frame::data(frame)))),
                None => Poll::Ready(None),
            };
        };
        direct.begin();
        if !direct.clear() {
            // hyper still holds bytes (the head): the frame joins them.
            let frame = match ready!(events.poll_next(cx)) {
                Some(Next::Out) => events.take_frame(),
                Some(Next::Static(frame)) => frame,
                None => return Poll::Ready(None),
            };
            direct.hand_over();
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        // Nothing of hyper's is waiting: from here the stream writes itself,
        // in a task of its own that the upstream wakes, so an event costs no
        // poll of hyper's connection. hyper still watches the socket for the
        // client leaving (dropping this body aborts the task), and writes the
        // last chunk once the task is done, with the stream's last frame when
        // the task leaves it (see `pump`).
        if let (Some(events), Some(mut direct)) = (this.events.take(), this.direct.take()) {
            this.pump = Some(spawn_stream(events, move |events, cx| pump(events, &mut direct, cx)));
        }
        self.poll_frame(cx)
    }
}

/// The lean path's (`crate::lean`) place for a request's event stream: the
/// stream is left here, not in the response body, for the lean path to
/// write, head included ([`EventStream::spawn_whole`]).
#[derive(Clone, Default)]
pub struct Inline(Arc<std::sync::Mutex<Option<EventStream>>>);

impl Inline {
    fn put(&self, stream: EventStream) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(stream);
        }
    }

    /// The stream left here, if the response was one.
    pub fn take(&self) -> Option<EventStream> {
        self.0.lock().ok()?.take()
    }
}

impl EventStream {
    /// The lean path: `head`, the encoded response head, goes out with the
    /// first chunk (see [`EventStream::spawn_whole`]).
    pub fn set_head(&mut self, head: Bytes) {
        if let Some(direct) = &mut self.direct {
            direct.set_head(head);
        }
    }

    /// The lean path: writes the whole stream in a task of its own, which
    /// the upstream wakes, as `pump` does after hyper's head: the head
    /// (with the first chunk, or alone when no event is ready at the first
    /// poll), the events, and then the body's last chunk (with the stream's
    /// last frame when `pump` leaves one). Dropping the handle aborts it.
    pub fn spawn_whole(mut self) -> AbortOnDropHandle<std::io::Result<Option<Bytes>>> {
        let (events, direct) = (self.events.take(), self.direct.take());
        let (Some(events), Some(mut direct)) = (events, direct) else {
            return AbortOnDropHandle::new(tokio::spawn(std::future::ready(Ok(None))));
        };
        spawn_stream(events, move |events, cx| write_whole(events, &mut direct, cx).map_ok(|()| None))
    }
}

/// [`EventStream::spawn_whole`]'s task: ready once all of the stream is out.
fn write_whole(events: &mut Events, direct: &mut Direct, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
    loop {
        if direct.ended() {
            return direct.poll_flush(cx);
        }
        match pump(events, direct, cx) {
            Poll::Ready(Ok(last)) => direct.end(last),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                direct.head_alone();
                return match direct.poll_flush(cx) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Pending,
                };
            }
        }
    }
}

/// Whether a stream's write error is the `Stall` clock's: the client took
/// nothing for `limits.send_timeout`. Not any `TimedOut`: the kernel's own,
/// for a client whose retransmissions ran out, is `client_gone`.
fn stalled(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<crate::send_timeout::Stalled>())
}

/// Runs a stream in a task of its own (`pump` or `relay` as `step`), which
/// the upstream wakes, until it is over; dropping the handle aborts it. It
/// ends with the frame left for hyper to send, if any. A stream the client
/// took nothing of for `limits.send_timeout` (the `Stall` clock's error)
/// ends as `send_timeout`.
fn spawn_stream(
    mut events: Events,
    mut step: impl FnMut(&mut Events, &mut Context<'_>) -> Poll<std::io::Result<Option<Bytes>>> + Send + 'static,
) -> AbortOnDropHandle<std::io::Result<Option<Bytes>>> {
    events.source_gate = None;
    let task = std::future::poll_fn(move |cx| {
        let result = step(&mut events, cx);
        if let Poll::Ready(Err(e)) = &result {
            if stalled(e) {
                events.stats.outcome = "send_timeout";
            }
        }
        result
    });
    AbortOnDropHandle::new(tokio::spawn(Box::pin(tracing::Instrument::in_current_span(task))))
}

/// A stream task's end as the body's next frame: the frame it left, none,
/// or its error.
fn task_end(
    result: Result<std::io::Result<Option<Bytes>>, tokio::task::JoinError>,
) -> Option<Result<Frame<Bytes>, BoxError>> {
    match result {
        Ok(Ok(last)) => last.map(|frame| Ok(Frame::data(frame))),
        Ok(Err(e)) => Some(Err(e.into())),
        Err(e) => Some(Err(e.into())),
    }
}

/// Writes the stream's events to the client until it is over; `Ok` once
/// all of it is out but the last frame when that is ready with the stream's
/// end (the upstream's last event in the read that ended its body, or the
/// proxy's own `end` or `error` event) and small: hyper sends it and the
/// body's last chunk in one write, so the client gets the end with the last
/// event (one packet, not two).
fn pump(events: &mut Events, direct: &mut Direct, cx: &mut Context<'_>) -> Poll<std::io::Result<Option<Bytes>>> {
    loop {
        // What the stream wrote goes out before anything else.
        ready!(direct.poll_flush(cx))?;
        match events.poll_next(cx) {
            // While more is ready at once, it is gathered into one write, as
            // hyper queues the frames of a busy body.
            Poll::Ready(Some(Next::Out)) if events.out.len() < GATHER => continue,
            Poll::Pending if events.out.is_empty() => return Poll::Pending,
            Poll::Pending => {
                events.write_out(direct)?;
                // Registers for the socket when part of it is left.
                if let Poll::Ready(Err(e)) = direct.poll_flush(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Pending;
            }
            Poll::Ready(None) if events.out.is_empty() => return Poll::Ready(Ok(None)),
            // Everything before it is out (flushed above). A large last frame
            // is written here, under the stream's own send timeout, and the
            // stream's slot let go only once it is out.
            Poll::Ready(None) if events.out.len() <= LAST_TO_HYPER => {
                return Poll::Ready(Ok(Some(events.take_frame())))
            }
            Poll::Ready(None) => events.write_out(direct)?,
            Poll::Ready(Some(Next::Static(frame))) if events.out.is_empty() => direct.send_bytes(frame)?,
            Poll::Ready(Some(next)) => {
                if let Next::Static(frame) = next {
                    events.out.extend_from_slice(&frame);
                }
                events.write_out(direct)?
            }
        }
    }
}

/// Frames an HTTP/2 stream's task may have ready ahead of hyper.
const RELAY_FRAMES: usize = 4;

/// An HTTP/2 event stream. hyper polls a stream's body only while the
/// client's flow-control windows have room, so a client that stops reading
/// (and still answers pings) would leave the body unpolled, and its upstream
/// request, stream slot and timers waiting, for as long as the connection
/// lives. The events are therefore read in a task of their own and handed
/// over through a short channel; when hyper took none of them for
/// `limits.send_timeout`, the task ends the upstream request, as a blocked
/// write does on HTTP/1.1.
struct Relay {
    frames: tokio::sync::mpsc::Receiver<Bytes>,
    task: Option<AbortOnDropHandle<std::io::Result<Option<Bytes>>>>,
}

impl Relay {
    fn start(events: Events, send_timeout: Duration) -> Relay {
        let (tx, frames) = tokio::sync::mpsc::channel(RELAY_FRAMES);
        let mut tx = tokio_util::sync::PollSender::new(tx);
        let mut stall = crate::send_timeout::Stall::new(send_timeout);
        let task = spawn_stream(events, move |events, cx| relay(events, &mut tx, &mut stall, cx).map_ok(|()| None));
        Relay { frames, task: Some(task) }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = ready!(this.frames.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        // Every frame is out: the task's end says how the stream ends.
        let Some(task) = &mut this.task else { return Poll::Ready(None) };
        let result = ready!(Pin::new(task).poll(cx));
        this.task = None;
        Poll::Ready(task_end(result))
    }
}

/// Moves the stream's frames into the channel until it is over; an error
/// once hyper took nothing for `limits.send_timeout`.
fn relay(
    events: &mut Events,
    tx: &mut tokio_util::sync::PollSender<Bytes>,
    stall: &mut crate::send_timeout::Stall,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    loop {
        // The last frame (the upstream's end, an `end` or `error` event) is
        // in the channel: the stream is over, however long hyper takes to
        // send what is queued. Waiting for room here would hold the slots
        // and then end a complete stream with the timeout's error.
        if events.finished {
            return Poll::Ready(Ok(()));
        }
        // Room for the next frame before the upstream is read again: a
        // client that does not read holds the upstream back.
        match tx.poll_reserve(cx) {
            Poll::Ready(Ok(())) => stall.progress(),
            // The body is gone (hyper dropped it): nothing is to be sent.
            Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
            Poll::Pending => return stall.poll_blocked(cx),
        }
        let frame = match ready!(events.poll_next(cx)) {
            Some(Next::Out) => events.take_frame(),
            Some(Next::Static(frame)) => frame,
            None => return Poll::Ready(Ok(())),
        };
        if tx.send_item(frame).is_err() {
            return Poll::Ready(Ok(()));
        }
    }
}

/// How much a directly written stream gathers into one write when its
/// upstream has more ready at once.
const GATHER: usize = 64 * 1024;

/// The largest last frame a directly written stream leaves to hyper, to go
/// out with the body's last chunk.
const LAST_TO_HYPER: usize = 4096;

/// Where the next frame is.
enum Next {
    /// In `Events::out`, to be taken or written out.
    Out,
    Static(Bytes),
}

/// The events of a stream, frame by frame.
struct Events {
    source: Decoded,
    /// Polls `source` only when it was ready last time or its waker fired:
    /// the connection polls the body again after each write, and the
    /// upstream socket would answer each of those polls with `Pending`.
    /// `None` in a stream's own task, which mostly the upstream wakes.
    source_gate: Option<Gate>,
    reframer: Reframer,
    out: BytesMut,
    /// How much of `out` was counted as written (it gathers several frames
    /// when written directly).
    counted: usize,
    finished: bool,
    add_end: bool,
    keepalive: Duration,
    idle: Duration,
    /// When bytes last went to the client; the keep-alive is due from here.
    last_write: Instant,
    /// When the upstream last sent bytes; the idle timeout is due from here.
    last_upstream: Instant,
    /// One timer for both and for `TRIM_AFTER`, re-armed lazily when it
    /// fires, so an event costs no timer re-registration; polled only when
    /// it fired (`OnWake`).
    timer: OnWake<Sleep>,
    deadline: OnWake<WaitForCancellationFutureOwned>,
    /// Whether the buffers were let go since the upstream last sent bytes.
    trimmed: bool,
    /// Upstream reads since the timer last woke the stream.
    reads: u32,
    names: Names,
    stats: StreamStats,
    _slot: (crate::StreamSlot, Option<crate::ClientSlot>),
}

impl Events {
    fn finish_with_error(&mut self, kind: &'static str, message: &str) -> Next {
        self.finished = true;
        self.stats.outcome = kind;
        self.stats.upstream_error(kind);
        let data = json_error(kind, message);
        let error = self.names.error.clone();
        self.reframer.push(&mut self.out, &error, &data);
        self.stats.events += 1;
        self.take_out(Instant::now())
    }

    /// The frame `out` holds; `now` is when it goes out.
    fn take_out(&mut self, now: Instant) -> Next {
        self.stats.wrote(self.out.len() - self.counted);
        self.counted = self.out.len();
        self.last_write = now;
        Next::Out
    }

    /// The frame `out` holds, taken out of it.
    fn take_frame(&mut self) -> Bytes {
        self.counted = 0;
        self.out.split().freeze()
    }

    /// Writes the frame `out` holds to the client; `out` then serves the
    /// next event.
    fn write_out(&mut self, direct: &mut Direct) -> std::io::Result<()> {
        self.counted = 0;
        direct.send(&mut self.out)
    }

    /// Drains every complete event the reframer holds into `out`.
    fn drain_events(&mut self) -> Result<(), crate::reframe::TooLarge> {
        self.reframer.drain(&mut self.out, &mut self.stats.events)
    }
}

impl Events {
    /// The next frame to send; `None` once the stream is over.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Next>> {
        let this = self;
        if this.finished {
            return Poll::Ready(None);
        }
        if Pin::new(&mut this.deadline).poll(cx).is_ready() {
            let frame = this.finish_with_error("shutdown", "the proxy is shutting down");
            return Poll::Ready(Some(frame));
        }
        loop {
            let source = &mut this.source;
            let next = match &mut this.source_gate {
                Some(gate) => gate.poll_with(cx, |cx| source.poll_chunk(cx)),
                None => source.poll_chunk(cx),
            };
            match next {
                Poll::Ready(Some(Ok(chunk))) => {
                    let now = Instant::now();
                    this.last_upstream = now;
                    this.trimmed = false;
                    this.reads = this.reads.saturating_add(1);
                    // One allocation for the frame: the events are the
                    // chunk's bytes plus an id line each.
                    this.out.reserve(chunk.len() + chunk.len() / 4 + 64);
                    this.reframer.feed(chunk);
                    if let Err(e) = this.drain_events() {
                        let frame = this.finish_with_error("event_too_large", &e.to_string());
                        return Poll::Ready(Some(frame));
                    }
                    if !this.out.is_empty() {
                        return Poll::Ready(Some(this.take_out(now)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let frame = match e {
                        crate::decompress::ChunkError::Upstream(e) => this.finish_with_error(
                            "upstream_reset",
                            &format!("upstream connection failed mid-stream: {e}"),
                        ),
                        crate::decompress::ChunkError::Decode(e) => this.finish_with_error(
                            "upstream_decode",
                            &format!("upstream body could not be decompressed: {e}"),
                        ),
                    };
                    return Poll::Ready(Some(frame));
                }
                Poll::Ready(None) => {
                    this.reframer.feed_eof();
                    if let Err(e) = this.drain_events() {
                        let frame = this.finish_with_error("event_too_large", &e.to_string());
                        return Poll::Ready(Some(frame));
                    }
                    this.finished = true;
                    this.stats.outcome = "complete";
                    if this.add_end {
                        let end = this.names.end.clone();
                        this.reframer.push(&mut this.out, &end, br#"{"reason":"complete"}"#);
                        this.stats.events += 1;
                    }
                    if this.out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(this.take_out(Instant::now())));
                }
                Poll::Pending => break,
            }
        }
        // Nothing from upstream: is the keep-alive or the idle timeout due?
        loop {
            if Pin::new(&mut this.timer).poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let idle_due = this.last_upstream + this.idle;
            if now >= idle_due {
                let msg = format!("upstream sent nothing for {:?}", this.idle);
                let frame = this.finish_with_error("upstream_timeout", &msg);
                return Poll::Ready(Some(frame));
            }
            // Quiet for TRIM_AFTER: the buffers a busy stream reuses from
            // event to event are let go, so an idle stream holds none.
            // Busy since the last wake-up: checked again in TRIM_AFTER_BUSY;
            // else in TRIM_AFTER, as a stream that slowed down.
            let trim_after = if this.reads >= BUSY_READS { TRIM_AFTER_BUSY } else { TRIM_AFTER };
            this.reads = 0;
            let trim_due = this.last_upstream + trim_after;
            if !this.trimmed && now >= trim_due && this.out.is_empty() {
                this.trimmed = true;
                this.out = BytesMut::new();
                this.source.trim();
            }
            let keepalive_due = this.last_write + this.keepalive;
            let mut next = idle_due;
            if !this.trimmed {
                next = next.min(trim_due);
            }
            if now >= keepalive_due {
                this.last_write = now;
                this.stats.meters.keepalives_sent.inc();
                this.stats.meters.bytes_sent.inc_by(KEEPALIVE.len() as u64);
                this.timer.inner_mut().reset((now + this.keepalive).min(next));
                return Poll::Ready(Some(Next::Static(KEEPALIVE)));
            }
            this.timer.inner_mut().reset(keepalive_due.min(next));
        }
    }
}

/// The route's metric handles (taken when the route was set up, so a
/// stream costs no label lookup), and the figures for the log line written
/// when the stream is dropped.
pub struct StreamStats {
    route: String,
    meters: RouteMeters,
    /// For the outcomes and errors without a handle of their own.
    metrics: Arc<Metrics>,
    started: std::time::Instant,
    first_event: Option<std::time::Duration>,
    pub events: u64,
    /// Events already added to the `events_sent` counter.
    reported: u64,
    bytes_total: u64,
    pub outcome: &'static str,
    /// The connection's writes: whether hyper gave it up for a blocked write.
    pub stalled: Option<ConnWrites>,
}

impl StreamStats {
    /// Starts counting a stream on `route`.
    pub fn new(metrics: &Arc<Metrics>, route: &Route, started: std::time::Instant) -> StreamStats {
        let meters = route.meters.clone();
        meters.streams_active.inc();
        StreamStats {
            route: route.prefix.clone(),
            meters,
            metrics: metrics.clone(),
            started,
            first_event: None,
            events: 0,
            reported: 0,
            bytes_total: 0,
            outcome: "client_gone",
            stalled: None,
        }
    }

    /// Counts bytes written to the client.
    pub fn wrote(&mut self, n: usize) {
        if self.first_event.is_none() && self.events > 0 {
            let t = self.started.elapsed();
            self.first_event = Some(t);
            self.meters.first_event_seconds.observe(t.as_secs_f64());
        }
        self.bytes_total += n as u64;
        self.meters.bytes_sent.inc_by(n as u64);
        self.meters.events_sent.inc_by(self.events - self.reported);
        self.reported = self.events;
    }

    /// Counts an upstream failure of this stream's route.
    pub fn upstream_error(&self, kind: &'static str) {
        if kind != "shutdown" {
            self.metrics.upstream_error(&self.route, kind);
        }
    }
}

impl Drop for StreamStats {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        if self.outcome == "client_gone" && self.stalled.as_ref().is_some_and(ConnWrites::stalled) {
            self.outcome = "send_timeout";
        }
        self.meters.streams_active.dec();
        self.meters.events_sent.inc_by(self.events - self.reported);
        match self.outcome {
            "complete" => self.meters.complete.inc(),
            "client_gone" => self.meters.client_gone.inc(),
            outcome => {
                self.metrics.streams_ended.get_or_create(&OutcomeLabels { route: self.route.clone(), outcome }).inc()
            }
        };
        let secs = duration.as_secs_f64();
        if self.events > 0 && secs > 0.0 {
            self.meters.events_per_second.observe(self.events as f64 / secs);
        }
        let ttfe_ms = self.first_event.map(|d| d.as_secs_f64() * 1000.0);
        tracing::info!(
            route = %self.route,
            outcome = self.outcome,
            events = self.events,
            bytes = self.bytes_total,
            duration_ms = secs * 1000.0,
            first_event_ms = ttfe_ms,
            "stream finished"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(headers: &[(&'static str, &'static str)]) -> response::Parts {
        let mut head = Response::new(()).into_parts().0;
        for (name, value) in headers {
            head.headers.append(*name, HeaderValue::from_static(value));
        }
        head
    }

    #[test]
    fn an_event_stream_head_drops_what_described_a_whole_body_and_keeps_the_rest() {
        let mut head = head_with(&[
            ("content-type", "application/x-ndjson"),
            ("content-length", "120"),
            ("content-encoding", "identity"),
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT"),
            ("expires", "0"),
            ("x-request-id", "r-1"),
        ]);
        head.status = StatusCode::CREATED;
        event_stream_head(&mut head);
        assert_eq!(head.status, StatusCode::OK);
        let h = &head.headers;
        for gone in ["content-length", "content-encoding", "etag", "last-modified", "expires"] {
            assert!(!h.contains_key(gone), "{gone} is still there");
        }
        assert_eq!(h.get("x-request-id"), Some(&HeaderValue::from_static("r-1")));
        assert_eq!(h.get("content-type"), Some(&HeaderValue::from_static("text/event-stream; charset=utf-8")));
        assert_eq!(h.get("cache-control"), Some(&HeaderValue::from_static("no-cache, no-transform")));
        assert_eq!(h.get("x-accel-buffering"), Some(&HeaderValue::from_static("no")));
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn an_event_stream_head_without_any_of_them_only_gains_its_own() {
        let mut head = head_with(&[("content-type", "text/event-stream"), ("x-request-id", "r-2")]);
        event_stream_head(&mut head);
        let names: Vec<&str> = head.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        for name in ["content-type", "x-request-id", "cache-control", "x-accel-buffering"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
    }
}
