//! The Redis store: tokens and streams shared by every instance.
//!
//! Keys of one stream share the hash tag `{token}`, so the design works on
//! Redis Cluster, and every key has a TTL:
//!
//! - `ssegate:{T}:req`   the stored request (string, PX `handoff.ttl`)
//! - `ssegate:{T}:meta`  hash: `state`, `final`, `attached`
//! - `ssegate:{T}:ev`    Redis Stream of encoded events, entry id `N-1` for
//!   event id N, trimmed by MINID to `handoff.replay_bytes`
//! - `ssegate:{T}:alive` set while the producing instance is alive
//! - `ssegate:tokens`    sorted set token → expiry, for `max_tokens`
//! - `ssegate:instance:{id}` each instance's heartbeat (5 s TTL): clients
//!   counted on a dead instance do not keep a stream's upstream running
//! - channel `ssegate:ctl` takeover and Stop messages between instances
//!
//! The first GET claims the token with one Lua script (GET + DEL + HSET),
//! so exactly one instance ever sends it upstream. That instance keeps the
//! stream's log locally and publishes each event (`XADD`); an instance whose
//! client resumes a stream it does not produce follows it with
//! `XREAD BLOCK` into a local copy.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::StreamReadReply;
use redis::AsyncCommands;
use tokio::sync::mpsc;

use super::log::Published;
use super::{BoxFuture, Redeem, Store, StoreError, StoredRequest, StreamLog};
use crate::error::json_error;
use crate::metrics::Metrics;

/// How long a running stream's keys live without a heartbeat.
const RUNNING_TTL: Duration = Duration::from_secs(60);
/// How often the producing instance says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long the `alive` key outlives a missed heartbeat.
const ALIVE_TTL: Duration = Duration::from_secs(5);
/// How long one `XREAD BLOCK` waits before the follower checks liveness.
const BLOCK: Duration = Duration::from_secs(1);
const CONTROL: &str = "ssegate:ctl";
const TOKENS: &str = "ssegate:tokens";

/// Claims a token: GET + DEL of the request and creation of the stream's
/// meta hash, atomically.
const REDEEM: &str = r#"
local req = redis.call('GET', KEYS[1])
if req then
  if ARGV[1] == '0' then return {'noroom'} end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'state', 'running', 'attached', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  return {'first', req}
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'existing'} end
return {'unknown'}
"#;

/// Counts a client attaching (+1) or leaving (-1) on instance ARGV[3], in
/// the stream's meta hash, only while the stream exists (never creating a
/// key without a TTL); a leave records when, for the grace period.
const ATTACH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(ARGV[1]) < 0 then redis.call('HSET', KEYS[1], 'left_at', ARGV[2]) end
return redis.call('HINCRBY', KEYS[1], 'att:' .. ARGV[3], ARGV[1])
"#;

/// Counts a client's open streams per instance in one hash; refuses when
/// the total (over instances) is at ARGV[2]. Counts of an instance that
/// died expire with the key (ARGV[3] ms after the last stream opened).
const CLIENT_ACQUIRE: &str = r#"
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

const CLIENT_RELEASE: &str = r#"
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"#;

/// How long a client's stream count outlives its last new stream.
const CLIENT_TTL: Duration = Duration::from_secs(3600);

fn client_key(client: &str) -> String {
    format!("ssegate:client:{client}")
}

fn instance_key(instance: &str) -> String {
    format!("ssegate:instance:{instance}")
}

fn key(token: &str, part: &str) -> String {
    format!("ssegate:{{{token}}}:{part}")
}

/// Names and bounds the store needs to write events of its own.
#[derive(Clone)]
pub struct RedisOptions {
    pub ttl: Duration,
    pub max_tokens: usize,
    pub replay_bytes: usize,
    pub resume_grace: Duration,
    pub error_event: String,
}

/// Tokens and streams in Redis.
pub struct RedisStore {
    client: redis::Client,
    /// Connected on first use, so that the proxy starts while Redis is down.
    conn: std::sync::OnceLock<ConnectionManager>,
    opts: RedisOptions,
    metrics: Arc<Metrics>,
    /// Identifies this instance in control messages.
    instance: String,
    /// Streams this instance produces or follows.
    local: Mutex<HashMap<String, Arc<StreamLog>>>,
    redeem: redis::Script,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

impl RedisStore {
    /// Connects (with reconnects and short timeouts) and starts the
    /// instance's control listener and token purge task.
    pub async fn connect(url: &str, opts: RedisOptions, metrics: Arc<Metrics>) -> Result<Arc<RedisStore>, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let store = Arc::new(RedisStore {
            client,
            conn: std::sync::OnceLock::new(),
            opts,
            metrics,
            instance: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw),
            local: Mutex::new(HashMap::new()),
            redeem: redis::Script::new(REDEEM),
        });
        tokio::spawn(control(Arc::downgrade(&store), store.client.clone(), store.instance.clone()));
        tokio::spawn(purge(Arc::downgrade(&store)));
        tokio::spawn(instance_heartbeat(Arc::downgrade(&store)));
        Ok(store)
    }

    /// The shared connection, connecting (again) when there is none yet.
    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1)
            .set_max_delay(500);
        let conn = self.client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(self.conn.get_or_init(|| conn).clone())
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<StreamLog>>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, token: &str) -> Option<Arc<StreamLog>> {
        self.local().get(token).cloned()
    }

    async fn publish_control(&self, verb: &str, token: &str) {
        // The send time: a client that attached after it is not ended.
        let msg = format!("{verb} {} {} {token}", self.instance, now_ms());
        let Ok(mut conn) = self.conn().await else { return };
        let _: Result<i64, _> = conn.publish(CONTROL, msg).await;
    }

    /// A stream this instance does not produce: a local copy fed by XREAD.
    async fn follow_remote(&self, token: &str) -> Result<Arc<StreamLog>, StoreError> {
        if let Some(log) = self.find(token) {
            return Ok(log);
        }
        let conn = self.client.get_multiplexed_async_connection().await.map_err(unavailable)?;
        let log = {
            let mut local = self.local();
            if let Some(log) = local.get(token) {
                return Ok(log.clone());
            }
            let log = Arc::new(StreamLog::mirrored(self.opts.replay_bytes));
            local.insert(token.to_string(), log.clone());
            log
        };
        let mut conn = conn;
        let mut last_seen = "0-0".to_string();
        let have: Result<redis::streams::StreamRangeReply, _> = conn.xrange_all(key(token, "ev")).await;
        if let Ok(have) = have {
            for entry in have.ids {
                let id = entry.id.split('-').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
                let frame: Vec<u8> = entry.get("f").unwrap_or_default();
                let last: u8 = entry.get("l").unwrap_or(0);
                log.append(id, Bytes::from(frame), last == 1);
                last_seen = entry.id;
            }
        }
        if !log.ended() {
            tokio::spawn(mirror(conn, token.to_string(), log.clone(), self.opts.error_event.clone(), last_seen));
        }
        Ok(log)
    }

    /// A stream this instance produces: a local log whose events go to Redis.
    fn produce_here(&self, token: &str) -> (Arc<StreamLog>, mpsc::UnboundedReceiver<Published>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let log = Arc::new(StreamLog::publishing(self.opts.replay_bytes, tx));
        self.local().insert(token.to_string(), log.clone());
        (log, rx)
    }
}

impl Store for RedisStore {
    fn issue(&self, token: String, req: StoredRequest) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let now = now_ms();
            let held: usize = conn.zcount(TOKENS, now, "+inf").await.map_err(unavailable)?;
            if held >= self.opts.max_tokens {
                return Err(StoreError::TokensFull);
            }
            let ttl_ms = self.opts.ttl.as_millis() as u64;
            redis::pipe()
                .cmd("SET")
                .arg(key(&token, "req"))
                .arg(encode_request(&req))
                .arg("PX")
                .arg(ttl_ms.max(1))
                .ignore()
                .zadd(TOKENS, &token, now + ttl_ms)
                .ignore()
                .pexpire(TOKENS, ttl_ms.max(1) as i64)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)
        })
    }

    fn redeem<'a>(&'a self, token: &'a str, may_start: bool) -> BoxFuture<'a, Result<Redeem, StoreError>> {
        Box::pin(async move {
            if let Some(log) = self.find(token) {
                return Ok(Redeem::Existing(log));
            }
            let mut conn = self.conn().await?;
            let reply: Vec<Vec<u8>> = self
                .redeem
                .key(key(token, "req"))
                .key(key(token, "meta"))
                .key(key(token, "alive"))
                .arg(if may_start { "1" } else { "0" })
                .arg(RUNNING_TTL.as_millis() as u64)
                .arg(&self.instance)
                .arg(ALIVE_TTL.as_millis() as u64)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            match reply.first().map(Vec::as_slice) {
                Some(b"first") => {
                    let _: Result<i64, _> = conn.zrem(TOKENS, token).await;
                    let req = reply.get(1).and_then(|r| decode_request(r)).ok_or_else(|| {
                        StoreError::Unavailable("redis: a stored request could not be decoded".into())
                    })?;
                    let (log, rx) = self.produce_here(token);
                    tokio::spawn(publisher(conn, token.to_string(), rx, Arc::downgrade(&log), self.opts.clone()));
                    Ok(Redeem::First(Box::new(req), log))
                }
                Some(b"existing") => Ok(Redeem::Existing(self.follow_remote(token).await?)),
                Some(b"noroom") => Ok(Redeem::NoRoom),
                _ => Ok(Redeem::Unknown),
            }
        })
    }

    fn stop<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            if let Some(log) = self.find(token).filter(|l| !l.mirror) {
                stop_local(&log);
                return Ok(true);
            }
            let mut conn = self.conn().await?;
            let (deleted, exists): (i64, i64) = redis::pipe()
                .del(key(token, "req"))
                .exists(key(token, "meta"))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if deleted > 0 {
                let _: Result<i64, _> = conn.zrem(TOKENS, token).await;
                return Ok(true);
            }
            if exists > 0 {
                self.publish_control("stop", token).await;
                return Ok(true);
            }
            Ok(false)
        })
    }

    fn drop_clients<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let found = self.find(token);
            if let Some(log) = &found {
                log.kick();
            }
            self.publish_control("kick", token).await;
            Ok(found.is_some())
        })
    }

    fn forget<'a>(&'a self, token: &'a str, log: &'a Arc<StreamLog>) -> BoxFuture<'a, ()> {
        {
            let mut local = self.local();
            if local.get(token).is_some_and(|l| Arc::ptr_eq(l, log)) {
                local.remove(token);
            }
        }
        Box::pin(async move {
            if !log.mirror && !log.ended() {
                let Ok(mut conn) = self.conn().await else { return };
                let _: Result<i64, _> = conn.del(&[key(token, "ev"), key(token, "meta"), key(token, "alive")]).await;
            }
        })
    }

    fn client_attached<'a>(&'a self, token: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else { return };
            let _: Result<i64, _> = redis::Script::new(ATTACH)
                .key(key(token, "meta"))
                .arg(1)
                .arg(now_ms())
                .arg(&self.instance)
                .invoke_async(&mut conn)
                .await;
            // A newer GET here ends the older connection on other instances.
            self.publish_control("takeover", token).await;
        })
    }

    fn client_detached<'a>(&'a self, token: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else { return };
            let _: Result<i64, _> = redis::Script::new(ATTACH)
                .key(key(token, "meta"))
                .arg(-1)
                .arg(now_ms())
                .arg(&self.instance)
                .invoke_async(&mut conn)
                .await;
        })
    }

    fn clients_elsewhere<'a>(&'a self, token: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else { return false };
            // Our own clients are detached when this is asked; an
            // unanswered Redis counts as "nobody", so the upstream does not
            // run on for a stream nobody can follow. Clients of an instance
            // whose heartbeat stopped do not count: it died with them.
            let meta: Result<HashMap<String, String>, _> = conn.hgetall(key(token, "meta")).await;
            let Ok(meta) = meta else { return false };
            let grace_ms = self.opts.resume_grace.as_millis() as u64;
            // Both times are whole milliseconds, cut down: a difference of
            // exactly `grace_ms` may be up to 1 ms short of the grace.
            if meta
                .get("left_at")
                .and_then(|t| t.parse::<u64>().ok())
                .is_some_and(|t| now_ms().saturating_sub(t) <= grace_ms)
            {
                return true;
            }
            for (field, count) in &meta {
                let Some(instance) = field.strip_prefix("att:") else { continue };
                if count.parse::<i64>().unwrap_or(0) <= 0 {
                    continue;
                }
                let alive: Result<bool, _> = conn.exists(instance_key(instance)).await;
                if alive.unwrap_or(false) {
                    return true;
                }
            }
            false
        })
    }

    fn client_acquire<'a>(&'a self, client: &'a str, max: usize) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let granted: i64 = redis::Script::new(CLIENT_ACQUIRE)
                .key(client_key(client))
                .arg(&self.instance)
                .arg(max)
                .arg(CLIENT_TTL.as_millis() as u64)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(granted == 1)
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn client_release(&self, client: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else { return };
            let _: Result<i64, _> = redis::Script::new(CLIENT_RELEASE)
                .key(client_key(&client))
                .arg(&self.instance)
                .invoke_async(&mut conn)
                .await;
        })
    }

    fn client_open<'a>(&'a self, client: &'a str) -> BoxFuture<'a, usize> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else { return 0 };
            let counts: Result<Vec<i64>, _> = conn.hvals(client_key(client)).await;
            counts.map(|c| c.into_iter().sum::<i64>().max(0) as usize).unwrap_or(0)
        })
    }

    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else { return false };
            let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
            pong.is_ok()
        })
    }
}

fn stop_local(log: &StreamLog) {
    if !log.ended() && !log.cancel.is_cancelled() {
        log.stopped_by_user.store(true, std::sync::atomic::Ordering::Release);
        log.cancel.cancel();
    }
}

fn now_ms() -> u64 {
    crate::store::unix_ms()
}

/// Listens on the control channel: a takeover or a drop on another
/// instance ends this instance's connections of that stream; a Stop
/// cancels the stream if this instance produces it. Reconnects forever.
async fn control(store: std::sync::Weak<RedisStore>, client: redis::Client, me: String) {
    use futures_util::StreamExt;
    loop {
        if store.strong_count() == 0 {
            return;
        }
        let pubsub = match client.get_async_pubsub().await {
            Ok(mut p) => match p.subscribe(CONTROL).await {
                Ok(()) => Some(p),
                Err(_) => None,
            },
            Err(_) => None,
        };
        if let Some(pubsub) = pubsub {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let Some(store) = store.upgrade() else { return };
                let Ok(text) = msg.get_payload::<String>() else { continue };
                let mut parts = text.splitn(4, ' ');
                let (Some(verb), Some(from), Some(sent), Some(token)) =
                    (parts.next(), parts.next(), parts.next().and_then(|t| t.parse::<u64>().ok()), parts.next())
                else {
                    continue;
                };
                let Some(log) = store.find(token) else { continue };
                // A client that attached here after the message was sent
                // is the newer one: it stays.
                let older = log.attached_before(sent);
                match verb {
                    "takeover" if from != me && log.is_attached() && older => log.kick(),
                    "kick" if from != me && older => log.kick(),
                    "stop" if !log.mirror => stop_local(&log),
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Says this instance is alive, so that other instances count its clients.
async fn instance_heartbeat(store: std::sync::Weak<RedisStore>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        let Ok(mut conn) = store.conn().await else { continue };
        let _: Result<(), _> = redis::cmd("SET")
            .arg(instance_key(&store.instance))
            .arg(1)
            .arg("PX")
            .arg(ALIVE_TTL.as_millis() as u64)
            .query_async(&mut conn)
            .await;
    }
}

/// Drops expired tokens from the count and counts them.
async fn purge(store: std::sync::Weak<RedisStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        let Ok(mut conn) = store.conn().await else { continue };
        let removed: Result<u64, _> = conn.zrembyscore(TOKENS, "-inf", now_ms()).await;
        if let Ok(n) = removed {
            store.metrics.tokens_expired.inc_by(n);
        }
    }
}

/// Publishes a produced stream's events in order, batching what has queued
/// up, trims the Redis Stream to `replay_bytes`, and keeps the keys alive.
/// If Redis stops answering, the local clients get a `store_unavailable`
/// error event and the upstream request is cancelled.
async fn publisher(
    mut conn: ConnectionManager,
    token: String,
    mut rx: mpsc::UnboundedReceiver<Published>,
    weak: std::sync::Weak<StreamLog>,
    opts: RedisOptions,
) {
    let (ev, meta, alive) = (key(&token, "ev"), key(&token, "meta"), key(&token, "alive"));
    let mut sizes: VecDeque<(u64, usize)> = VecDeque::new();
    let mut held = 0usize;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let after_end = (opts.resume_grace + Duration::from_secs(5)).as_millis() as u64;
    loop {
        let first = tokio::select! {
            item = rx.recv() => match item {
                Some(item) => item,
                None => return,
            },
            _ = heartbeat.tick() => {
                let beat: Result<(), _> = redis::pipe()
                    .cmd("SET").arg(&alive).arg(1).arg("PX").arg(ALIVE_TTL.as_millis() as u64).ignore()
                    .pexpire(&meta, RUNNING_TTL.as_millis() as i64).ignore()
                    .pexpire(&ev, RUNNING_TTL.as_millis() as i64).ignore()
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = beat {
                    if let Some(log) = weak.upgrade() { fail(&log, &opts, &e.to_string()); }
                    return;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while let Ok(item) = rx.try_recv() {
            batch.push(item);
        }
        let mut pipe = redis::pipe();
        let mut ended = false;
        for (id, frame, last) in &batch {
            pipe.cmd("XADD")
                .arg(&ev)
                .arg(format!("{id}-1"))
                .arg("f")
                .arg(frame.as_ref())
                .arg("l")
                .arg(*last as u8)
                .ignore();
            sizes.push_back((*id, frame.len()));
            held += frame.len();
            while held > opts.replay_bytes && sizes.len() > 1 {
                if let Some((_, n)) = sizes.pop_front() {
                    held -= n;
                }
            }
            if *last {
                ended = true;
                pipe.hset(&meta, "state", "ended").ignore().hset(&meta, "final", *id).ignore();
            }
        }
        if let Some((oldest, _)) = sizes.front() {
            pipe.cmd("XTRIM").arg(&ev).arg("MINID").arg(format!("{oldest}-1")).ignore();
        }
        let ttl = if ended { after_end } else { RUNNING_TTL.as_millis() as u64 };
        pipe.pexpire(&ev, ttl as i64).ignore().pexpire(&meta, ttl as i64).ignore();
        if ended {
            pipe.del(&alive).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            if let Some(log) = weak.upgrade() {
                fail(&log, &opts, &e.to_string());
            }
            return;
        }
        if ended {
            return;
        }
    }
}

/// Ends a stream whose store stopped answering: a final `store_unavailable`
/// error event for the local clients, and the upstream request cancelled.
fn fail(log: &StreamLog, opts: &RedisOptions, reason: &str) {
    if log.ended() {
        return;
    }
    let mut out = BytesMut::new();
    let data = json_error("store_unavailable", &format!("the shared store stopped answering: {reason}"));
    crate::sse::write_event(&mut out, log.last_id() + 1, Some(opts.error_event.as_bytes()), &data);
    log.append(log.last_id() + 1, out.freeze(), true);
    log.cancel.cancel();
}

/// Follows a stream another instance produces into a local copy.
async fn mirror(
    mut conn: MultiplexedConnection,
    token: String,
    log: Arc<StreamLog>,
    error_event: String,
    mut last_seen: String,
) {
    let (ev, alive) = (key(&token, "ev"), key(&token, "alive"));
    let opts = RedisOptions {
        ttl: Duration::ZERO,
        max_tokens: 0,
        replay_bytes: 0,
        resume_grace: Duration::ZERO,
        error_event: error_event.clone(),
    };
    loop {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(256).arg("BLOCK").arg(BLOCK.as_millis() as u64).arg("STREAMS").arg(&ev).arg(&last_seen);
        let read = cmd.query_async::<Option<StreamReadReply>>(&mut conn);
        let reply = tokio::select! {
            r = tokio::time::timeout(BLOCK + Duration::from_secs(2), read) => r,
            _ = log.cancel.cancelled() => return,
        };
        let reply = match reply {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return fail(&log, &opts, &e.to_string()),
            Err(_) => return fail(&log, &opts, "no answer"),
        };
        let entries = reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect::<Vec<_>>()).unwrap_or_default();
        if entries.is_empty() {
            let producer_alive: Result<bool, _> = conn.exists(&alive).await;
            match producer_alive {
                Ok(true) => continue,
                Ok(false) if log.ended() => return,
                Ok(false) => {
                    let mut out = BytesMut::new();
                    let id = log.last_id() + 1;
                    let data = json_error("instance_lost", "the instance running this stream stopped");
                    crate::sse::write_event(&mut out, id, Some(error_event.as_bytes()), &data);
                    log.append(id, out.freeze(), true);
                    return;
                }
                Err(e) => return fail(&log, &opts, &e.to_string()),
            }
        }
        for entry in entries {
            let id = entry.id.split('-').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            let frame: Vec<u8> = entry.get("f").unwrap_or_default();
            let last: u8 = entry.get("l").unwrap_or(0);
            log.append(id, Bytes::from(frame), last == 1);
            last_seen = entry.id;
            if last == 1 {
                return;
            }
        }
    }
}

/// The stored request as JSON, with header values and the body in base64.
fn encode_request(req: &StoredRequest) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let headers: Vec<(String, String)> =
        req.headers.iter().map(|(k, v)| (k.as_str().to_string(), b64.encode(v.as_bytes()))).collect();
    let value = serde_json::json!({
        "route": req.route,
        "method": req.method.as_str(),
        "path": req.path_and_query,
        "headers": headers,
        "body": b64.encode(&req.body),
        "client": req.client,
    });
    value.to_string().into_bytes()
}

fn decode_request(raw: &[u8]) -> Option<StoredRequest> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    let mut headers = HeaderMap::new();
    for pair in v["headers"].as_array()? {
        let name = HeaderName::from_bytes(pair[0].as_str()?.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(&b64.decode(pair[1].as_str()?).ok()?).ok()?;
        headers.append(name, value);
    }
    Some(StoredRequest {
        route: v["route"].as_str()?.to_string(),
        method: Method::from_bytes(v["method"].as_str()?.as_bytes()).ok()?,
        path_and_query: v["path"].as_str()?.to_string(),
        headers,
        body: Bytes::from(b64.decode(v["body"].as_str()?).ok()?),
        client: v["client"].as_str().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_request_round_trips() -> Result<(), &'static str> {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer x"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let req = StoredRequest {
            route: "/v1".into(),
            method: Method::POST,
            path_and_query: "/v1/chat?x=1".into(),
            headers,
            body: Bytes::from_static(b"\x00{\"a\":1}\xff"),
            client: "sub:alice".into(),
        };
        let back = decode_request(&encode_request(&req)).ok_or("the stored request does not decode")?;
        assert_eq!(back.route, req.route);
        assert_eq!(back.method, req.method);
        assert_eq!(back.path_and_query, req.path_and_query);
        assert_eq!(back.headers, req.headers);
        assert_eq!(back.body, req.body);
        assert_eq!(back.client, req.client);
        Ok(())
    }

    #[test]
    fn keys_share_the_stream_hash_tag() {
        assert_eq!(key("abc", "ev"), "ssegate:{abc}:ev");
    }
}
