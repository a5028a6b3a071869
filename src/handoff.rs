//! Handoff: `POST {prefix}{path}` stores the request and answers a one-time
//! token; `GET {stream_prefix}/{token}` starts it upstream (once, ever) and
//! follows its replay log, resuming after `Last-Event-ID`; `DELETE` is Stop.
//!
//! The producer task reads the upstream at its own pace into the stream's
//! replay log; each GET runs a follower task that writes the log to its
//! client. A slow or absent client therefore neither stalls the model nor
//! grows memory past `replay_bytes`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::body::{full, ChannelBody, ClientBody, Cut, ResponseBody};
use crate::decompress::{ChunkError, Decoded};
use crate::error::{json_error, Error};
use crate::metrics::ReasonLabel;
use crate::proxy::{self, ConnInfo};
use crate::reframe::{Reframer, Wire};
use crate::send_timeout::Stall;
use crate::sse::{write_retry, KEEPALIVE, OPEN_COMMENT};
use crate::store::log::Read;
use crate::store::{Redeem, StoreError, StoredRequest, StreamLog};
use crate::stream::{event_stream_head, StreamStats};
use crate::App;

/// How much of the replay log one write to a client carries at most.
const READ_CHUNK: usize = 64 * 1024;
/// How much of an upstream error body goes into the `upstream_status` event.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// A new token: 128 bits from the OS CSPRNG, URL-safe base64 without padding.
pub fn new_token() -> Result<String, Error> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

/// `POST {handoff.prefix}{path}`: stores the request, answers 201 + token.
pub async fn create(app: &Arc<App>, req: Request<ClientBody>, conn: ConnInfo) -> Result<Response<ResponseBody>, Error> {
    let cfg = &app.config;
    let path = req.uri().path()[cfg.handoff.prefix.len()..].to_string();
    let route = app.routes.find(&path).cloned().ok_or(Error::NotFound)?;
    let client = app.authenticate(req.headers(), conn.peer)?;
    if !app.client_has_room(&client).await {
        return Err(Error::TooManyForClient);
    }
    let max_body = cfg.limits.max_body;
    if proxy::content_length(req.headers()).is_some_and(|len| len > max_body) {
        return Err(Error::PayloadTooLarge(max_body));
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body, max_body, cfg.limits.header_timeout).await?;
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let stored = StoredRequest {
        route: route.prefix.clone(),
        method: parts.method.clone(),
        path_and_query,
        headers: proxy::forwarded_headers(&parts, conn, true, app.auth.is_some()),
        body,
        client,
    };
    let token = new_token()?;
    app.store.issue(token.clone(), stored).await.map_err(store_error)?;
    app.metrics.tokens_issued.inc();
    let stream_url = format!("{}/{}", cfg.handoff.stream_prefix, token);
    let json = serde_json::json!({
        "token": token,
        "stream_url": stream_url,
        "expires_in": cfg.handoff.ttl.as_millis().div_ceil(1000) as u64,
    });
    let mut resp = Response::new(full(json.to_string()));
    *resp.status_mut() = StatusCode::CREATED;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(location) = HeaderValue::from_str(&stream_url) {
        h.insert(header::LOCATION, location);
    }
    Ok(resp)
}

/// Reads a handoff body whole, up to `max_body`. Like nginx's
/// `client_body_timeout`, each piece must follow the last within
/// `header_timeout`, so a body trickled byte by byte cannot hold a
/// connection forever (and `max_body` bounds the memory).
async fn read_body(mut body: ClientBody, max_body: u64, gap: Duration) -> Result<Bytes, Error> {
    let mut out = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(gap, body.frame()).await {
            Err(_) => return Err(Error::RequestTimeout(gap)),
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Err(e))) => return Err(Error::BadRequest(format!("request body could not be read: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if (out.len() + data.len()) as u64 > max_body {
                return Err(Error::PayloadTooLarge(max_body));
            }
            out.extend_from_slice(&data);
        }
    }
}

/// `GET {stream_prefix}/{token}`: the first GET starts the stream; later
/// ones replay after `Last-Event-ID` and follow live.
pub async fn attach(app: &Arc<App>, req: Request<ClientBody>, token: &str) -> Result<Response<ResponseBody>, Error> {
    let last_event_id =
        req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    // Only a first GET starts a stream; a resume reuses the one it counts as.
    let slot = app.stream_slot();
    let (log, cursor) = match app.store.redeem(token, slot.is_some()).await.map_err(store_error)? {
        Redeem::Unknown => return Err(Error::UnknownToken),
        Redeem::NoRoom => return Err(Error::Overloaded("too many streams (limits.max_streams)")),
        Redeem::First(stored, log) => {
            let Some(slot) = slot else { return Err(Error::Internal("stream started without a slot".into())) };
            // Counted from here (the POST checked there was room, but two
            // POSTs can race): over the limit, the token is put back so a
            // later GET can start it.
            let client = match app.client_slot(&stored.client).await {
                Ok(client) => client,
                Err(e) => {
                    app.store.forget(token, &log).await;
                    let _ = app.store.issue(token.to_string(), *stored).await;
                    return Err(e);
                }
            };
            log.hold(slot, client);
            app.metrics.tokens_redeemed.inc();
            tokio::spawn(produce(app.clone(), *stored, log.clone()));
            (log, 0)
        }
        Redeem::Existing(log) => {
            drop(slot);
            let cursor = last_event_id.unwrap_or(0);
            if log.final_id().is_some_and(|f| cursor >= f) {
                let mut resp = Response::new(crate::body::empty());
                *resp.status_mut() = StatusCode::NO_CONTENT;
                return Ok(resp);
            }
            app.metrics.resumes.inc();
            (log, cursor)
        }
    };
    let (tx, body) = ChannelBody::new(4);
    // HTTP/2 only: over HTTP/1.1 a client that stops reading blocks the
    // socket, which `limits.send_timeout` already ends (counting bytes).
    let send_timeout = (req.version() == http::Version::HTTP_2).then_some(app.config.limits.send_timeout);
    let reader = Reader { tx, stall: send_timeout.map(Stall::new), cut: body.cut() };
    let mut prelude = BytesMut::new();
    write_retry(&mut prelude, app.config.sse.retry);
    prelude.extend_from_slice(OPEN_COMMENT);
    // The channel is new and has room: the head and prelude go out at once.
    let _ = reader.tx.try_send(prelude.freeze());
    let (generation, owner) = log.attach();
    app.store.client_attached(token).await;
    tokio::spawn(follow(app.clone(), token.to_string(), log, cursor, reader, generation, owner));
    let (mut head, ()) = Response::new(()).into_parts();
    event_stream_head(&mut head);
    Ok(Response::from_parts(head, body.boxed_unsync()))
}

/// `DELETE {stream_prefix}/{token}`: the user's Stop.
pub async fn stop(app: &Arc<App>, token: &str) -> Result<Response<ResponseBody>, Error> {
    if !app.store.stop(token).await.map_err(store_error)? {
        return Err(Error::UnknownToken);
    }
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

fn store_error(e: StoreError) -> Error {
    match e {
        StoreError::TokensFull => Error::Overloaded("too many unused tokens (limits.max_tokens)"),
        StoreError::StreamsFull => Error::Overloaded("too many streams (limits.max_streams)"),
        StoreError::Unavailable(m) => Error::StoreUnavailable(m),
    }
}

/// Writes the log to one client from `cursor` on, until the stream ends,
/// the client leaves (or, on HTTP/2, takes nothing for
/// `limits.send_timeout`), or a newer GET takes the stream over.
async fn follow(
    app: Arc<App>,
    token: String,
    log: Arc<StreamLog>,
    mut cursor: u64,
    mut reader: Reader,
    generation: u64,
    mut owner: tokio::sync::watch::Receiver<u64>,
) {
    let mut changed = log.subscribe();
    let keepalive = app.config.sse.keepalive;
    let mut last_write = Instant::now();
    // Re-armed lazily from `last_write` when it fires (see `produce`).
    let keepalive_timer = tokio::time::sleep(keepalive);
    tokio::pin!(keepalive_timer);
    let replay_until = log.last_id();
    loop {
        if *owner.borrow() != generation {
            break; // taken over by a newer GET
        }
        match log.read(cursor, READ_CHUNK) {
            Read::Events(frame, next, count) => {
                if cursor < replay_until {
                    app.metrics.replayed_events.inc_by(count as u64);
                }
                if !reader.hand_over(frame, &mut owner).await {
                    break;
                }
                cursor = next;
                last_write = Instant::now();
            }
            Read::Ended => break,
            Read::Gap => {
                let mut out = BytesMut::new();
                let data = json_error(
                    "replay_gap",
                    "the events after Last-Event-ID are no longer held (handoff.replay_bytes)",
                );
                crate::sse::write_unnumbered(&mut out, app.config.sse.error_event.as_bytes(), &data);
                let _ = reader.hand_over(out.freeze(), &mut owner).await;
                break;
            }
            Read::Wait => {
                tokio::select! {
                    r = changed.changed() => if r.is_err() { break },
                    r = owner.changed() => if r.is_err() { break },
                    _ = &mut keepalive_timer => {
                        if last_write.elapsed() < keepalive {
                            keepalive_timer.as_mut().reset(last_write + keepalive);
                            continue;
                        }
                        keepalive_timer.as_mut().reset(Instant::now() + keepalive);
                        if !reader.hand_over(KEEPALIVE, &mut owner).await {
                            break;
                        }
                        last_write = Instant::now();
                    }
                    _ = reader.tx.closed() => break,
                    // A copy of another instance's stream has no local
                    // producer to write the `shutdown` event: write it here.
                    _ = app.drain.cancelled(), if log.mirror => {
                        let mut out = BytesMut::new();
                        let data = json_error("shutdown", "the proxy is shutting down");
                        crate::sse::write_event(&mut out, cursor + 1, Some(app.config.sse.error_event.as_bytes()), &data);
                        let _ = reader.hand_over(out.freeze(), &mut owner).await;
                        break;
                    }
                }
            }
        }
    }
    drop(reader);
    app.store.client_detached(&token).await;
    if log.detach() {
        tokio::spawn(grace(app, token, log));
    }
}

/// Where [`follow`] writes: the client's response body.
struct Reader {
    tx: mpsc::Sender<Bytes>,
    /// HTTP/2: the clock of `limits.send_timeout`, run while the body takes
    /// nothing. hyper stops polling a stream's body while the client's
    /// flow-control window is shut, so only this notices a client that
    /// stopped reading (and still answers pings).
    stall: Option<Stall>,
    /// Ends the body with an error once the clock ran out.
    cut: Cut,
}

impl Reader {
    /// Hands `frame` to the body: false once the client is gone, took
    /// nothing for the send timeout (the body then ends with an error after
    /// what is queued), or a newer GET took the stream over meanwhile.
    async fn hand_over(&mut self, frame: Bytes, owner: &mut tokio::sync::watch::Receiver<u64>) -> bool {
        let Reader { tx, stall, cut } = self;
        let sent = match tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                let stalled = std::future::poll_fn(|cx| match stall {
                    Some(stall) => stall.poll_blocked::<()>(cx),
                    None => std::task::Poll::Pending,
                });
                tokio::select! {
                    sent = tx.send(frame) => sent.is_ok(),
                    _ = owner.changed() => return false,
                    _ = stalled => {
                        tracing::debug!("a handoff client took nothing for limits.send_timeout");
                        cut.cut();
                        return false;
                    }
                }
            }
        };
        if let Some(stall) = stall {
            stall.progress();
        }
        sent
    }
}

/// After the last client left: wait `resume_grace`; if nobody came back,
/// cancel the upstream request (if it still runs) and forget the stream.
async fn grace(app: Arc<App>, token: String, log: Arc<StreamLog>) {
    let grace = app.config.handoff.resume_grace;
    let mut wait = grace;
    loop {
        let generation = log.generation();
        tokio::time::sleep(wait).await;
        if log.is_attached() || log.generation() != generation {
            return; // a client came back here; its own detach starts a new grace
        }
        // With a shared store, a client on another instance keeps it alive.
        if !app.store.clients_elsewhere(&token).await {
            break;
        }
        wait = grace.max(Duration::from_millis(250));
    }
    if log.mirror {
        log.cancel.cancel(); // stops this instance's copy only
    } else if !log.ended() && !log.cancel.is_cancelled() {
        app.metrics.streams_cancelled.get_or_create(&ReasonLabel { reason: "grace" }).inc();
        log.cancel.cancel();
    }
    app.store.forget(&token, &log).await;
}

/// Sends the stored request upstream and writes its events into the log.
async fn produce(app: Arc<App>, stored: StoredRequest, log: Arc<StreamLog>) {
    let started = std::time::Instant::now();
    let Some(route) = app.routes.by_prefix(&stored.route) else {
        let mut p = Producer::detached(&app, &log, Wire::Text);
        p.error("upstream_unavailable", "the route of this request no longer exists");
        return;
    };
    let mut stats = StreamStats::new(&app.metrics, &route, started);
    let (path, query) = match stored.path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (stored.path_and_query.as_str(), None),
    };
    let body = stored.body.clone();
    let req = match proxy::build_request(&route, stored.method.clone(), path, query, stored.headers.clone(), body) {
        Ok(req) => req,
        Err(e) => return Producer::detached(&app, &log, Wire::Text).error(e.kind(), &e.to_string()),
    };
    let sent = tokio::select! {
        r = app.upstream.send_stream(req) => r,
        _ = log.cancel.cancelled() => return Producer::detached(&app, &log, Wire::Text).cancelled(&mut stats),
        _ = app.drain.cancelled() => return Producer::detached(&app, &log, Wire::Text).error("shutdown", "the proxy is shutting down"),
    };
    let (resp, head_time) = match sent {
        Ok(ok) => ok,
        Err(e) => {
            stats.outcome = e.kind();
            stats.upstream_error(e.kind());
            return Producer::detached(&app, &log, Wire::Text).error(e.kind(), &e.to_string());
        }
    };
    route.meters.upstream_head_seconds.observe(head_time.as_secs_f64());
    let (head, body) = resp.into_parts();
    let mut producer = Producer::detached(&app, &log, Wire::choose(route.format, &head.headers));
    if head.status.as_u16() >= 400 {
        stats.outcome = "upstream_status";
        stats.upstream_error("upstream_status");
        return producer.upstream_status(head.status, body).await;
    }
    let mut source = Decoded::new(body, &head.headers);
    let idle = app.config.limits.idle_timeout;
    // One timer for the stream, re-armed lazily from the last chunk's time
    // when it fires, so a chunk costs no timer re-registration.
    let mut last_chunk = Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        let chunk = tokio::select! {
            c = std::future::poll_fn(|cx| source.poll_chunk(cx)) => c,
            _ = &mut idle_timer => {
                if last_chunk.elapsed() < idle {
                    idle_timer.as_mut().reset(last_chunk + idle);
                    continue;
                }
                stats.outcome = "upstream_timeout";
                stats.upstream_error("upstream_timeout");
                return producer.error("upstream_timeout", &format!("upstream sent nothing for {idle:?}"));
            }
            _ = log.cancel.cancelled() => return producer.cancelled(&mut stats),
            _ = app.drain.cancelled() => {
                stats.outcome = "shutdown";
                return producer.error("shutdown", "the proxy is shutting down");
            }
        };
        let kind = match chunk {
            Some(Ok(chunk)) => {
                last_chunk = Instant::now();
                producer.reframer.feed(chunk);
                match producer.drain(&mut stats) {
                    Ok(()) => continue,
                    Err(e) => ("event_too_large", e.to_string()),
                }
            }
            Some(Err(ChunkError::Upstream(e))) => {
                ("upstream_reset", format!("upstream connection failed mid-stream: {e}"))
            }
            Some(Err(ChunkError::Decode(e))) => {
                ("upstream_decode", format!("upstream body could not be decompressed: {e}"))
            }
            None => {
                producer.reframer.feed_eof();
                if let Err(e) = producer.drain(&mut stats) {
                    ("event_too_large", e.to_string())
                } else {
                    stats.outcome = "complete";
                    return producer.end("complete", &mut stats);
                }
            }
        };
        stats.outcome = kind.0;
        stats.upstream_error(kind.0);
        return producer.error(kind.0, &kind.1);
    }
}

/// Encodes events into the log, each as its own frame.
struct Producer<'a> {
    log: &'a StreamLog,
    reframer: Reframer,
    out: BytesMut,
    end_name: &'a [u8],
    error_name: &'a [u8],
    metrics: &'a crate::metrics::Metrics,
}

impl<'a> Producer<'a> {
    fn detached(app: &'a App, log: &'a StreamLog, wire: Wire) -> Producer<'a> {
        Producer {
            log,
            reframer: Reframer::new(wire, app.config.limits.max_event_bytes as usize),
            out: BytesMut::with_capacity(4096),
            end_name: app.config.sse.end_event.as_bytes(),
            error_name: app.config.sse.error_event.as_bytes(),
            metrics: &app.metrics,
        }
    }

    fn drain(&mut self, stats: &mut StreamStats) -> Result<(), crate::reframe::TooLarge> {
        while let Some(id) = self.reframer.next_event(&mut self.out)? {
            let frame = self.out.split().freeze();
            stats.events += 1;
            stats.wrote(frame.len());
            self.log.append(id, frame, false);
        }
        Ok(())
    }

    fn push_final(&mut self, name: &[u8], data: &[u8]) {
        let id = self.reframer.push(&mut self.out, name, data);
        self.log.append(id, self.out.split().freeze(), true);
    }

    fn end(&mut self, reason: &str, stats: &mut StreamStats) {
        let data = format!("{{\"reason\":\"{reason}\"}}");
        stats.events += 1;
        let end_name = self.end_name;
        self.push_final(end_name, data.as_bytes());
    }

    fn error(&mut self, kind: &str, message: &str) {
        let error_name = self.error_name;
        self.push_final(error_name, &json_error(kind, message));
    }

    fn cancelled(&mut self, stats: &mut StreamStats) {
        if self.log.stopped_by_user.load(Ordering::Acquire) {
            self.metrics.streams_cancelled.get_or_create(&ReasonLabel { reason: "delete" }).inc();
            stats.outcome = "cancelled";
            self.end("cancelled", stats);
        } else {
            stats.outcome = "abandoned";
        }
    }

    async fn upstream_status(&mut self, status: StatusCode, body: crate::upstream::UpstreamBody) {
        let read = Limited::new(body, ERROR_BODY_LIMIT).collect();
        let bytes = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => Bytes::new(),
        };
        let body_value = serde_json::from_slice::<serde_json::Value>(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        let data = serde_json::json!({
            "error": {
                "type": "upstream_status",
                "message": format!("upstream answered {status}"),
                "status": status.as_u16(),
                "body": body_value,
            }
        });
        let error_name = self.error_name;
        self.push_final(error_name, data.to_string().as_bytes());
    }
}
