//! Handoff streams with the memory store vs the Redis store, in one process:
//! events/s and the latency each event gains between the upstream writing
//! it and the client reading it, then what a finished stream costs in
//! Redis memory.
//!
//! Run: `cargo bench --bench store` (needs `redis-server` on PATH;
//! scripts/test.sh installs it). `STORE_BENCH_SCALE=0.2` shrinks every
//! workload for a quick look; `STORE_BENCH_ROUNDS=N` (default 3) sets how
//! many interleaved runs each figure is the median of.
//!
//! The fake upstream writes its send time (ns since the start of this
//! process) into each 64-byte event; the client subtracts it from the time
//! the event's bytes arrive. Upstream, proxies, Redis clients and HTTP
//! clients share this process and its cores, the same way for every store,
//! so the ratios compare the stores rather than the machine. Latency counts
//! the events a client follows live: those the upstream wrote after the
//! client's GET was answered (in `redis, A→B` the events A produced before
//! the client reached B are replayed, not followed). Flat out, the latency
//! is mostly queueing in this one process; its events/s is the figure. Setups:
//!
//! - `memory`:        one instance, `handoff.store = "memory"`;
//! - `redis, 1 inst`: one instance on Redis (POST, GET and client on A);
//! - `redis, A→B`:    POST and first GET on A (A produces), the client on B
//!   (every event goes A → Redis → B's `XREAD` → client).

#[path = "../tests/support/redis.rs"]
mod redis_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use redis_support::RedisServer;
use ssegate::body::ChannelBody;
use support::Proxy;

/// Bytes of `data` per event.
const PAYLOAD: usize = 64;

static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The fake model: `POST /v1/bench/{events}/{interval_us}` answers an SSE
/// body of `events` events, one every `interval_us` (0: flat out), each
/// carrying its send time.
async fn timestamp_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut parts = req.uri().path().rsplit('/');
                    let interval_us: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                    let events: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(1);
                    let _ = req.into_body().collect().await;
                    let (tx, body) = ChannelBody::new(16);
                    tokio::spawn(async move {
                        let start = tokio::time::Instant::now();
                        for n in 1..=events {
                            if interval_us > 0 {
                                tokio::time::sleep_until(start + Duration::from_micros(interval_us * n)).await;
                            }
                            let mut data = format!("T{:020} n{n:06} ", now_ns());
                            data.extend(std::iter::repeat_n('x', PAYLOAD - data.len()));
                            if tx.send(Bytes::from(format!("data: {data}\n\n"))).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut resp = Response::new(body);
                    resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Memory,
    RedisOne,
    RedisCross,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Memory => "memory",
            Setup::RedisOne => "redis, 1 inst",
            Setup::RedisCross => "redis, A→B",
        }
    }
}

struct Workload {
    name: String,
    streams: usize,
    events: usize,
    /// None: flat out.
    interval: Option<Duration>,
}

/// What one run measured.
struct Outcome {
    events: usize,
    secs: f64,
    /// Per-event latency, ns, sorted.
    latency: Vec<u64>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }

    fn pct(&self, p: f64) -> f64 {
        if self.latency.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latency.len() as f64 - 1.0) * p).round() as usize;
        self.latency[i] as f64 / 1e6
    }
}

async fn start_proxies(setup: Setup, upstream: SocketAddr, redis: &RedisServer, grace: Duration) -> Vec<Proxy> {
    let n = if setup == Setup::RedisCross { 2 } else { 1 };
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c = support::config(upstream);
        c.handoff.resume_grace = grace;
        if setup != Setup::Memory {
            c.handoff.store = redis.url();
        }
        out.push(Proxy::start(c).await);
    }
    out
}

/// POSTs a handoff and returns its stream URL.
async fn post(client: &reqwest::Client, proxy: &Proxy, events: usize, interval_us: u128) -> String {
    let resp = client
        .post(proxy.url(&format!("/handoff/v1/bench/{events}/{interval_us}")))
        .body("{}")
        .send()
        .await
        .expect("POST failed");
    assert_eq!(resp.status(), 201, "POST answered {}", resp.status());
    let v: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    v["stream_url"].as_str().unwrap().to_string()
}

/// Reads one stream to its `end`; returns the latency (ns) of each event the
/// upstream sent after `since` (ns), that is of the events it followed
/// live rather than replayed (0: all of them).
async fn read_stream(mut resp: reqwest::Response, events: usize, since: u64) -> Vec<u64> {
    assert_eq!(resp.status(), 200);
    let mut latency = Vec::with_capacity(events);
    let mut buf: Vec<u8> = Vec::new();
    let mut next_id = 1usize;
    let mut data_events = 0usize;
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
            .await
            .expect("stream stalled")
            .expect("read failed")
            .expect("stream ended before its end event");
        let now = now_ns();
        buf.extend_from_slice(&chunk);
        while let Some(p) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..p + 2).collect();
            let text = std::str::from_utf8(&block).unwrap();
            let mut id = None;
            let mut end = false;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse::<usize>().unwrap());
                } else if line == "event: end" {
                    end = true;
                } else if let Some(t) = line.strip_prefix("data: T") {
                    let sent: u64 = t[..20].parse().unwrap();
                    data_events += 1;
                    if sent >= since {
                        latency.push(now.saturating_sub(sent));
                    }
                }
            }
            let Some(id) = id else { continue };
            assert_eq!(id, next_id, "event ids out of order");
            next_id += 1;
            if end {
                assert_eq!(data_events, events, "events lost");
                return latency;
            }
        }
    }
}

/// Runs one workload on one setup with fresh proxy instances.
async fn run(setup: Setup, w: &Workload, upstream: SocketAddr, redis: &RedisServer) -> Outcome {
    let proxies = start_proxies(setup, upstream, redis, Duration::from_secs(30)).await;
    let client = support::client();
    let interval_us = w.interval.map_or(0, |d| d.as_micros());
    let mut urls = Vec::new();
    for _ in 0..w.streams {
        urls.push(post(&client, &proxies[0], w.events, interval_us).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let client = client.clone();
            let first = proxies[0].url(&url);
            let follow = proxies.last().unwrap().url(&url);
            let events = w.events;
            tokio::spawn(async move {
                let get = |u: String| client.get(u).header("accept", "text/event-stream").send();
                let mut resp = get(first).await.expect("GET failed");
                let mut since = 0;
                if setup == Setup::RedisCross {
                    // A produces from its first GET; the client reads on B.
                    let _prelude = resp.chunk().await.expect("read failed");
                    drop(resp);
                    resp = get(follow).await.expect("GET failed");
                    since = now_ns();
                }
                read_stream(resp, events, since).await
            })
        })
        .collect();
    let mut latency = Vec::new();
    for t in tasks {
        latency.extend(t.await.expect("a stream failed"));
    }
    let events = w.streams * w.events;
    let secs = started.elapsed().as_secs_f64();
    latency.sort_unstable();
    for mut p in proxies {
        p.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut p.task).await;
    }
    Outcome { events, secs, latency }
}

/// Redis `used_memory` held by `n` finished streams of `k` events each
/// (kept for their resume_grace), per stream.
async fn memory_per_stream(upstream: SocketAddr, redis: &RedisServer, n: usize, k: usize) -> f64 {
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let proxies = start_proxies(Setup::RedisOne, upstream, redis, Duration::from_secs(600)).await;
    let client = support::client();
    let get = |url: &str| client.get(proxies[0].url(url)).header("accept", "text/event-stream").send();
    // Warm up: the proxy's connections exist before the first reading.
    let url = post(&client, &proxies[0], k, 0).await;
    read_stream(get(&url).await.unwrap(), k, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = redis.used_memory().await;
    let mut urls = Vec::new();
    for _ in 0..n {
        urls.push(post(&client, &proxies[0], k, 0).await);
    }
    for url in &urls {
        read_stream(get(url).await.unwrap(), k, 0).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // the last XADDs and TTL updates
    let after = redis.used_memory().await;
    for mut p in proxies {
        p.shutdown();
    }
    (after as f64 - before as f64) / n as f64
}

/// The 1-minute load average, to tell a quiet machine from a busy one.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: the
    // bench is not part of the suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("store: run it with `cargo bench --bench store`");
        return;
    }
    let scale: f64 = std::env::var("STORE_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let scaled = |n: usize| ((n as f64 * scale).round() as usize).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        now_ns();
        let redis = RedisServer::start().await;
        let upstream = timestamp_upstream().await;
        let workloads = [
            Workload {
                name: format!("{}×{} @50/s", scaled(100), scaled(200)),
                streams: scaled(100),
                events: scaled(200),
                interval: Some(Duration::from_millis(20)),
            },
            Workload {
                name: format!("{}×{} flat out", scaled(100), scaled(1000)),
                streams: scaled(100),
                events: scaled(1000),
                interval: None,
            },
        ];
        let setups = [Setup::Memory, Setup::RedisOne, Setup::RedisCross];
        let mut rows = Vec::new();
        // Every setup runs `rounds` times, interleaved, so that a burst of
        // load from elsewhere on the machine does not land on one store only;
        // the table shows the median of each figure.
        let rounds: usize = std::env::var("STORE_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
        let load_before = loadavg();
        for w in &workloads {
            let mut figures: Vec<Vec<[f64; 4]>> = vec![Vec::new(); setups.len()];
            for round in 0..rounds {
                for (k, setup) in setups.iter().enumerate() {
                    eprintln!("round {}/{rounds}: {} on {} …", round + 1, w.name, setup.name());
                    let o = run(*setup, w, upstream, &redis).await;
                    figures[k].push([o.rate(), o.pct(0.50), o.pct(0.99), o.pct(1.0)]);
                }
            }
            let median = |runs: &[[f64; 4]], i: usize| {
                let mut v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let base = [median(&figures[0], 0), median(&figures[0], 1), median(&figures[0], 2)];
            for (k, setup) in setups.iter().enumerate() {
                let f: Vec<f64> = (0..4).map(|i| median(&figures[k], i)).collect();
                let ratio = if k == 0 {
                    "      —       —       —".to_string()
                } else {
                    format!("{:>7.2} {:>7.2} {:>7.2}", f[0] / base[0], f[1] / base[1], f[2] / base[2])
                };
                rows.push(format!(
                    "{:<20} {:<14} {:>10.0} {:>8.2} {:>8.2} {:>8.2}   {ratio}",
                    w.name,
                    setup.name(),
                    f[0],
                    f[1],
                    f[2],
                    f[3],
                ));
            }
        }
        let load_after = loadavg();
        eprintln!("measuring Redis memory per stream …");
        let (n, k_small, k_big) = (scaled(500), 20, 200);
        let small = memory_per_stream(upstream, &redis, n, k_small).await;
        let big = memory_per_stream(upstream, &redis, n, k_big).await;
        let per_event = (big - small) / (k_big - k_small) as f64;
        let fixed = small - per_event * k_small as f64;

        println!();
        println!("handoff streams, memory store vs Redis store (events of {PAYLOAD} B; latency = upstream write → client read)");
        println!();
        println!(
            "{:<20} {:<14} {:>10} {:>8} {:>8} {:>8}   {:>7} {:>7} {:>7}",
            "workload", "store", "events/s", "p50 ms", "p99 ms", "max ms", "rate×", "p50×", "p99×"
        );
        for r in &rows {
            println!("{r}");
        }
        println!(
            "(median of {rounds} interleaved runs; ratios: Redis setup / memory, same workload; \
             latency of events followed live; load average {load_before} → {load_after})"
        );
        println!();
        println!("Redis memory held by a finished stream (until resume_grace + 5 s after its end):");
        println!("  {n} streams × {k_small:>3} events: {small:>8.0} B per stream");
        println!("  {n} streams × {k_big:>3} events: {big:>8.0} B per stream");
        println!("  ≈ {fixed:.0} B per stream + {per_event:.0} B per event (bounded by handoff.replay_bytes)");
    });
}
