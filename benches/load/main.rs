//! Load harness for ssegate (issue 6/7): a fast fake upstream, a load client,
//! and the table. Run everything with `benches/load/run.sh`.
//!
//! ```text
//! ssegate-load upstream --listen 127.0.0.1:18080
//! ssegate-load client --url 'http://127.0.0.1:18081/v1/stream?n=200&size=64&interval_ms=20&format=sse' \
//!      --streams 100 [--handoff] [--pid PID] [--idle-hold-ms 2000] --scenario typing --target ssegate
//! ssegate-load report results.jsonl
//! ssegate-load summary runs/1.jsonl runs/2.jsonl …
//! ```
//!
//! The upstream answers `GET`/`POST /ANY/PATH?n=N&size=S&interval_ms=I&format=sse|ndjson|text`
//! with N events whose payload is S bytes of JSON, `{"t":T,"i":I,"p":"xx…"}`,
//! where T is CLOCK_MONOTONIC in nanoseconds (zero-padded to 20 digits) taken
//! when the event is made. The first event goes at once, then one every I ms;
//! with I = 0 the events are written flat out, as many per write as fit in
//! 16 KiB. The client reads CLOCK_MONOTONIC once per body frame it receives
//! and records, for every event, the time from T to the frame that completed
//! the event (for SSE: the blank line that dispatches it, as a browser would).
//!
//! The client prints one JSON line per run; with `--pid` it adds the CPU
//! seconds (utime + stime) and RSS of that process and its children (nginx's
//! workers), read from /proc before and after.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use http::{header, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use memchr::memmem;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "ssegate-load", about = "ssegate load harness: fake upstream, load client, table")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A fast fake upstream: `/ANY?n=N&size=S&interval_ms=I&format=sse|ndjson|text`.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: SocketAddr,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Opens `--streams` concurrent streams on `--url` and prints one JSON line.
    Client(ClientArgs),
    /// Reads the client's JSON lines and prints the side-by-side table.
    Report {
        /// The JSON-lines file the clients wrote.
        file: std::path::PathBuf,
    },
    /// The issue's goals over several runs (`RUNS=N benches/load/run.sh`):
    /// each goal's ratio (median, lowest, highest) and how many runs met it.
    Summary {
        /// One JSON-lines file per run.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
}

#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// `http://127.0.0.1:PORT/path?query`; with `--handoff` the POST URL.
    #[arg(long)]
    url: String,
    /// Concurrent streams.
    #[arg(long)]
    streams: usize,
    /// POST `--url` (ssegate handoff), then GET the `stream_url` it answers.
    #[arg(long)]
    handoff: bool,
    /// The proxy's pid: its CPU seconds and RSS (with its children's) are reported.
    #[arg(long)]
    pid: Option<u32>,
    /// The upstream's pid: its CPU seconds are reported, so that the CPU of
    /// other processes during the run (a disturbed measurement) can be told.
    #[arg(long)]
    upstream_pid: Option<u32>,
    /// Idle mode: wait until every stream has its first event, hold this
    /// long, read the proxy's RSS with all streams open, then close them.
    #[arg(long)]
    idle_hold_ms: Option<u64>,
    /// Connections being opened at once (the rest wait), so that a large
    /// ramp does not overflow the listen backlog.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Stream starts are spread evenly over this many ms, so that paced
    /// streams do not all tick at the same instant. Default: the URL's
    /// `interval_ms` (0 in idle mode).
    #[arg(long)]
    spread_ms: Option<u64>,
    /// The latency of each stream's first N events is not recorded (they
    /// are still counted): steady state only, without the connection ramp.
    #[arg(long, default_value_t = 0)]
    warmup_events: u64,
    /// Streams still open after this are cut and counted as errors.
    #[arg(long, default_value_t = 90)]
    timeout_s: u64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Labels copied into the JSON line.
    #[arg(long, default_value = "")]
    scenario: String,
    #[arg(long, default_value = "")]
    target: String,
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Report { .. } | Cmd::Summary { .. }) {
        presize_fd_table();
    }
    match cli.cmd {
        Cmd::Upstream { listen, threads } => runtime(threads).block_on(upstream(listen)),
        Cmd::Client(args) => {
            let line = runtime(args.threads).block_on(client(args));
            println!("{line}");
        }
        Cmd::Report { file } => report(&file),
        Cmd::Summary { files } => summary(&files),
    }
}

/// Grows this process's descriptor table to its open-files limit (at most
/// 65,536) before any thread starts. Grown on demand instead, by doubling
/// while threads run, each step waits for an RCU grace period and holds up
/// every thread that opens a socket meanwhile: a delay in the middle of a
/// burst of connects that is the harness's own (ssegate sizes its table at
/// start the same way, `src/open_files.rs`; a copy, as this package does
/// not depend on ssegate's, so that the harness builds without it).
fn presize_fd_table() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let Ok(top) = libc::c_int::try_from(lim.rlim_cur.min(65_536).saturating_sub(1)) else { return };
    let Ok(root) = std::fs::File::open("/") else { return };
    // SAFETY: F_DUPFD_CLOEXEC duplicates an open descriptor onto the lowest
    // free one at or above `top`, which nothing else owns.
    let dup = unsafe { libc::fcntl(root.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    if dup >= 0 {
        // SAFETY: `dup` was just opened and is owned here alone.
        drop(unsafe { OwnedFd::from_raw_fd(dup) });
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build().expect("runtime")
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process.
fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------- upstream

/// Where every payload starts; the timestamp's 20 digits follow.
const MARK: &[u8] = b"{\"t\":";
const TS_DIGITS: usize = 20;
/// `{"t":<20>,"i":<10>,"p":""}`: a payload is never smaller.
const MIN_PAYLOAD: usize = 48;
/// Flat out, events are gathered into writes of about this size.
const BATCH: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fmt {
    Sse,
    Ndjson,
    Text,
}

async fn upstream(listen: SocketAddr) {
    let sock = if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.expect("socket");
    sock.set_reuseaddr(true).expect("SO_REUSEADDR");
    sock.bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    let listener = sock.listen(4096).expect("listen");
    eprintln!("upstream listening on {}", listener.local_addr().expect("addr"));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("upstream: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(false)
                .serve_connection(TokioIo::new(stream), service_fn(serve_events))
                .await;
        });
    }
}

async fn serve_events(req: Request<Incoming>) -> Result<Response<EventBody>, Infallible> {
    let (mut n, mut size, mut interval_ms, mut fmt) = (10u64, 64usize, 0u64, Fmt::Sse);
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "n" => n = v.parse().unwrap_or(n),
            "size" => size = v.parse().unwrap_or(size),
            "interval_ms" => interval_ms = v.parse().unwrap_or(interval_ms),
            "format" => {
                fmt = match v {
                    "ndjson" => Fmt::Ndjson,
                    "text" => Fmt::Text,
                    _ => Fmt::Sse,
                }
            }
            _ => {}
        }
    }
    // A POST (ssegate's handoff) has a small body: read it so that the
    // connection can be reused.
    let _ = req.into_body().collect().await;
    let content_type = match fmt {
        Fmt::Sse => "text/event-stream",
        Fmt::Ndjson => "application/x-ndjson",
        Fmt::Text => "text/plain; charset=utf-8",
    };
    let body = EventBody::new(n, size.max(MIN_PAYLOAD), Duration::from_millis(interval_ms), fmt);
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// N events, one every `interval` (the first at once), or flat out.
struct EventBody {
    n: u64,
    sent: u64,
    size: usize,
    fmt: Fmt,
    interval: Duration,
    next: tokio::time::Instant,
    sleep: Pin<Box<Sleep>>,
    buf: BytesMut,
}

impl EventBody {
    fn new(n: u64, size: usize, interval: Duration, fmt: Fmt) -> EventBody {
        let now = tokio::time::Instant::now();
        EventBody {
            n,
            sent: 0,
            size,
            fmt,
            interval,
            next: now,
            sleep: Box::pin(tokio::time::sleep_until(now + interval)),
            buf: BytesMut::new(),
        }
    }

    fn event_len(&self) -> usize {
        self.size
            + match self.fmt {
                Fmt::Sse => 8,
                Fmt::Ndjson => 1,
                Fmt::Text => 0,
            }
    }

    fn write_event(&mut self, t: u64) {
        let out = &mut self.buf;
        if self.fmt == Fmt::Sse {
            out.put_slice(b"data: ");
        }
        out.put_slice(MARK);
        put_padded(out, t, TS_DIGITS);
        out.put_slice(b",\"i\":");
        put_padded(out, self.sent, 10);
        out.put_slice(b",\"p\":\"");
        out.put_bytes(b'x', self.size - MIN_PAYLOAD);
        out.put_slice(b"\"}");
        match self.fmt {
            Fmt::Sse => out.put_slice(b"\n\n"),
            Fmt::Ndjson => out.put_u8(b'\n'),
            Fmt::Text => {}
        }
        self.sent += 1;
    }
}

fn put_padded(out: &mut BytesMut, mut v: u64, width: usize) {
    let mut digits = [b'0'; 20];
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.put_slice(&digits[..width]);
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.sent >= this.n {
            return Poll::Ready(None);
        }
        let one = this.event_len();
        if this.interval.is_zero() {
            let count = ((BATCH / one).max(1) as u64).min(this.n - this.sent);
            this.buf.reserve(one * count as usize);
            let t = now_ns();
            for _ in 0..count {
                this.write_event(t);
            }
        } else {
            if this.sent > 0 {
                ready!(this.sleep.as_mut().poll(cx));
                this.next += this.interval;
            } else {
                // The first event goes at once; the next ones are due one
                // interval apart from it (caught up in a burst when late).
                this.next = tokio::time::Instant::now() + this.interval;
            }
            this.buf.reserve(one);
            this.write_event(now_ns());
            if this.sent < this.n {
                let next = this.next;
                this.sleep.as_mut().reset(next);
            }
        }
        Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.n
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ------------------------------------------------------------------ client

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    handoff: bool,
    /// Events each stream should deliver (`n=` of the URL; 1 in idle mode).
    expect: u64,
    warmup: u64,
}

/// What one stream saw.
#[derive(Default)]
struct StreamResult {
    /// Delivery latency of every event, in ns.
    lats: Vec<u64>,
    events: u64,
    bytes: u64,
    /// From the start of the TCP connect (once a connect slot was free) to
    /// the first event.
    ttfe: Option<Duration>,
    /// Before that, the wait for one of the `--connect-concurrency` slots
    /// (held until the response head, so a slow head delays later streams).
    slot_wait: Option<Duration>,
    /// Within it: the TCP connect, and from connected to the response head
    /// (the proxy's accept queue and its set-up, the upstream's included;
    /// with `--handoff`, the POST's round trip and the GET's head). Kept
    /// for the streams that got that far, failed ones too.
    connect: Option<Duration>,
    head: Option<Duration>,
    error: Option<String>,
    /// When the stream ended (for the throughput window).
    ended: Option<Instant>,
    /// When its first and its last event arrived.
    first_event: Option<Instant>,
    last_event: Option<Instant>,
    /// Latencies of this many first events are not recorded (`--warmup-events`).
    warmup_left: u64,
}

impl StreamResult {
    fn record(&mut self, latency_ns: u64) {
        if self.warmup_left > 0 {
            self.warmup_left -= 1;
        } else {
            self.lats.push(latency_ns);
        }
    }
}

/// Counts the streams that have their first event (idle mode).
struct Gate {
    open: AtomicUsize,
    notify: Notify,
    release: CancellationToken,
}

async fn client(args: ClientArgs) -> Value {
    let uri: Uri = args.url.parse().expect("--url");
    let authority = uri.authority().expect("--url needs host:port").clone();
    let addr: SocketAddr =
        tokio::net::lookup_host(authority.as_str()).await.expect("resolve --url").next().expect("an address for --url");
    let query = uri.query().unwrap_or("");
    let param = |name: &str| -> Option<u64> {
        query.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('=')).and_then(|v| v.parse().ok())
    };
    let n = param("n").unwrap_or(1);
    let idle = args.idle_hold_ms.is_some();
    let target = Arc::new(Target {
        addr,
        host: authority.to_string(),
        path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into()),
        handoff: args.handoff,
        expect: if idle { 1 } else { n },
        warmup: args.warmup_events,
    });
    let pids = args.pid.map(proc_tree).unwrap_or_default();
    let up_pids: Vec<u32> = args.upstream_pid.into_iter().collect();
    let before = proc_sample(&pids);
    let up_before = proc_sample(&up_pids);
    let own_before = proc_sample(&[std::process::id()]);
    let machine_before = machine_busy_s();
    let gate = Arc::new(Gate { open: AtomicUsize::new(0), notify: Notify::new(), release: CancellationToken::new() });
    let connects = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let spread =
        Duration::from_millis(args.spread_ms.unwrap_or(if idle { 0 } else { param("interval_ms").unwrap_or(0) }));
    let started = Instant::now();
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(args.streams);
    for i in 0..args.streams {
        let (target, connects, gate) = (target.clone(), connects.clone(), gate.clone());
        let at = t0 + spread.mul_f64(i as f64 / args.streams as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            run_stream(&target, &connects, idle.then_some(&*gate)).await
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let mut open_sample = None;
    if let Some(hold) = args.idle_hold_ms {
        // Wait until every stream is open (or failed), hold, read the RSS.
        loop {
            let notified = gate.notify.notified();
            let done = gate.open.load(Ordering::Acquire) >= args.streams;
            if done || tokio::time::Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
        tokio::time::sleep(Duration::from_millis(hold)).await;
        open_sample = Some((proc_sample(&pids), gate.open.load(Ordering::Acquire)));
        gate.release.cancel();
    }
    let mut results = Vec::with_capacity(args.streams);
    for task in tasks {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let abort = task.abort_handle();
        match tokio::time::timeout(left, task).await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => results.push(StreamResult { error: Some(format!("panic: {e}")), ..Default::default() }),
            Err(_) => {
                abort.abort();
                results.push(StreamResult { error: Some("timeout".into()), ..Default::default() });
            }
        }
    }
    let last_end = results.iter().filter_map(|r| r.ended).max().unwrap_or_else(Instant::now);
    let window = last_end.duration_since(started).as_secs_f64();
    // What sets the window: when the last stream got going, and how long
    // each stream's end came after its last event.
    let last_first_event_ms =
        results.iter().filter_map(|r| r.first_event).max().map(|t| t.duration_since(started).as_secs_f64() * 1e3);
    let mut end_lags: Vec<u64> =
        results.iter().filter_map(|r| Some(r.ended?.duration_since(r.last_event?).as_nanos() as u64)).collect();
    end_lags.sort_unstable();
    let after = proc_sample(&pids);
    let machine = machine_busy_s() - machine_before;
    let own = proc_sample(&[std::process::id()]).cpu_s - own_before.cpu_s;
    let upstream = proc_sample(&up_pids).cpu_s - up_before.cpu_s;
    let mut line = summarize(&args, &target, results, window, before, after, open_sample);
    line["last_first_event_ms"] = json!(last_first_event_ms);
    line["end_lag_p50_ms"] = json!(percentile(&end_lags, 0.50).map(|ns| ns as f64 / 1e6));
    line["end_lag_p99_ms"] = json!(percentile(&end_lags, 0.99).map(|ns| ns as f64 / 1e6));
    line["client_cpu_s"] = json!(own);
    line["machine_busy_s"] = json!(machine);
    if args.upstream_pid.is_some() {
        line["upstream_cpu_s"] = json!(upstream);
        // What neither the proxy, the upstream nor the client used.
        let proxy = line["proxy_cpu_s"].as_f64().unwrap_or(0.0);
        line["other_cpu_s"] = json!((machine - proxy - upstream - own).max(0.0));
    }
    line
}

async fn run_stream(target: &Target, connects: &Semaphore, gate: Option<&Gate>) -> StreamResult {
    let mut r = StreamResult {
        lats: Vec::with_capacity(target.expect.min(1 << 20) as usize),
        warmup_left: target.warmup,
        ..Default::default()
    };
    let outcome = stream_body(target, connects, gate, &mut r).await;
    if let Err(e) = outcome {
        r.error.get_or_insert(e);
    }
    if r.error.is_none() && r.events < target.expect {
        r.error = Some("short".into());
    }
    r.ended = Some(Instant::now());
    if let Some(gate) = gate {
        if r.events == 0 {
            // A failed idle stream must not keep the client waiting.
            gate.open.fetch_add(1, Ordering::AcqRel);
            gate.notify.notify_one();
        }
    }
    r
}

fn request(target: &Target, method: http::Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("path");
    let h = req.headers_mut();
    h.insert(header::HOST, target.host.parse().expect("host"));
    h.insert(header::ACCEPT, header::HeaderValue::from_static("text/event-stream"));
    req
}

async fn stream_body(
    target: &Target,
    connects: &Semaphore,
    gate: Option<&Gate>,
    r: &mut StreamResult,
) -> Result<(), String> {
    let queued = Instant::now();
    let permit = connects.acquire().await.map_err(|_| "semaphore")?;
    let start = Instant::now();
    r.slot_wait = Some(start - queued);
    let tcp = TcpStream::connect(target.addr).await.map_err(|e| format!("connect: {}", e.kind()))?;
    let connected = Instant::now();
    r.connect = Some(connected - start);
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let path = if target.handoff {
        let mut req = request(
            target,
            http::Method::POST,
            &target.path,
            Bytes::from_static(br#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}"#),
        );
        req.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        let resp = send.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        if status != StatusCode::CREATED {
            return Err(format!("status {}", status.as_u16()));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|_| "handoff json")?;
        let url = v["stream_url"].as_str().ok_or("no stream_url")?.to_string();
        send.ready().await.map_err(|e| format!("request: {e}"))?;
        url
    } else {
        target.path.clone()
    };
    let resp = send
        .send_request(request(target, http::Method::GET, &path, Bytes::new()))
        .await
        .map_err(|e| format!("request: {e}"))?;
    drop(permit);
    r.head = Some(connected.elapsed());
    if resp.status() != StatusCode::OK {
        return Err(format!("status {}", resp.status().as_u16()));
    }
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut parser = EventParser::new(sse);
    let mut body = resp.into_body();
    let mut announced = false;
    loop {
        let frame = match gate {
            Some(g) if announced => tokio::select! {
                f = body.frame() => f,
                _ = g.release.cancelled() => return Ok(()),
            },
            _ => body.frame().await,
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                let now = now_ns();
                r.bytes += data.len() as u64;
                let before = r.events;
                parser.feed(&data, now, r);
                if r.events > before {
                    let at = Instant::now();
                    r.first_event.get_or_insert(at);
                    r.last_event = Some(at);
                }
                if r.ttfe.is_none() && r.events > 0 {
                    r.ttfe = Some(start.elapsed());
                }
                if let (Some(g), false) = (gate, announced) {
                    if r.events > 0 {
                        announced = true;
                        g.open.fetch_add(1, Ordering::AcqRel);
                        g.notify.notify_one();
                    }
                }
                if parser.ended {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(format!("body: {e}")),
            None => return Ok(()),
        }
    }
}

/// An incremental SSE parser that keeps only what it needs: the timestamps
/// of the event being read, and a line cut by a frame boundary.
struct EventParser {
    sse: bool,
    /// A line cut by the end of a frame (SSE), or the unscanned tail (raw).
    carry: Vec<u8>,
    /// Timestamps in the data of the event being read.
    pending: Vec<u64>,
    name: EventName,
    ended: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EventName {
    Message,
    End,
    Error,
}

impl EventParser {
    fn new(sse: bool) -> EventParser {
        EventParser { sse, carry: Vec::new(), pending: Vec::with_capacity(4), name: EventName::Message, ended: false }
    }

    fn feed(&mut self, data: &[u8], now: u64, r: &mut StreamResult) {
        if !self.sse {
            return self.feed_raw(data, now, r);
        }
        let mut rest = data;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            if self.carry.is_empty() {
                self.line(&rest[..i], now, r);
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(&rest[..i]);
                self.line(&line, now, r);
                line.clear();
                self.carry = line;
            }
            rest = &rest[i + 1..];
        }
        self.carry.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8], now: u64, r: &mut StreamResult) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // Dispatch.
            if !self.pending.is_empty() {
                r.events += 1;
                for &t in &self.pending {
                    r.record(now.saturating_sub(t));
                }
                self.pending.clear();
            }
            match self.name {
                EventName::Message => {}
                EventName::End => self.ended = true,
                EventName::Error => {
                    self.ended = true;
                    r.error.get_or_insert_with(|| "error event".into());
                }
            }
            self.name = EventName::Message;
        } else if let Some(v) = line.strip_prefix(b"data:") {
            scan_timestamps(v, &mut self.pending);
        } else if let Some(v) = line.strip_prefix(b"event:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            self.name = match v {
                b"end" => EventName::End,
                b"error" => EventName::Error,
                _ => EventName::Message,
            };
        }
    }

    /// NDJSON or text: every payload found in the bytes is one event.
    fn feed_raw(&mut self, data: &[u8], now: u64, r: &mut StreamResult) {
        self.carry.extend_from_slice(data);
        let buf = &self.carry;
        let mut pos = 0;
        let mut keep_from = None;
        while let Some(i) = memmem::find(&buf[pos..], MARK) {
            let at = pos + i;
            let end = at + MARK.len() + TS_DIGITS;
            if end > buf.len() {
                keep_from = Some(at);
                break;
            }
            if let Some(t) = parse_digits(&buf[at + MARK.len()..end]) {
                r.record(now.saturating_sub(t));
                r.events += 1;
            }
            pos = end;
        }
        let keep_from = keep_from.unwrap_or_else(|| pos.max(buf.len().saturating_sub(MARK.len() - 1)));
        self.carry.drain(..keep_from);
    }
}

fn scan_timestamps(data: &[u8], out: &mut Vec<u64>) {
    let mut pos = 0;
    while let Some(i) = memmem::find(&data[pos..], MARK) {
        let at = pos + i + MARK.len();
        match data.get(at..at + TS_DIGITS).and_then(parse_digits) {
            Some(t) => {
                out.push(t);
                pos = at + TS_DIGITS;
            }
            None => pos = at,
        }
    }
}

fn parse_digits(d: &[u8]) -> Option<u64> {
    d.iter().try_fold(0u64, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0')))
}

// ------------------------------------------------------------------- /proc

#[derive(Clone, Copy, Default)]
struct ProcSample {
    /// CPU seconds: the sum of the threads' run times in /proc/PID/task/*/schedstat
    /// (nanoseconds), or utime + stime (10 ms ticks) where schedstat is missing.
    /// A flat-out run lasts about 0.2 s: in ticks, one tick more or less
    /// would move its CPU figure by 5 to 10%.
    cpu_s: f64,
    /// utime + stime, and stime alone, in seconds (10 ms ticks): the share
    /// of the CPU time spent in the kernel (syscalls, TCP) is taken from them.
    tick_cpu_s: f64,
    tick_sys_s: f64,
    rss_kib: u64,
    procs: usize,
}

/// `pid` and its children (nginx's master and workers).
fn proc_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
            if stat_fields(&stat).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok())) == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// The fields of /proc/PID/stat after the command name, from field 3 on.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace().collect())
}

/// CPU seconds that processes ran on all cores since boot (/proc/stat).
fn machine_busy_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(cpu) = stat.lines().next().and_then(|l| l.strip_prefix("cpu ")) else { return 0.0 };
    let v: Vec<u64> = cpu.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // user, nice and system: what processes ran. Interrupts and softirqs
    // (where the kernel does much of the loopback TCP work of the test
    // itself) and steal are left out, as processes' own times leave them out.
    let busy = v.iter().take(3).sum::<u64>();
    busy as f64 / tck
}

/// The time `pid`'s threads ran, in nanoseconds (first field of each
/// thread's schedstat); `None` when the kernel does not have schedstat.
fn run_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn proc_sample(pids: &[u32]) -> ProcSample {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut s = ProcSample::default();
    for pid in pids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if let Some(f) = stat_fields(&stat) {
            // utime and stime are fields 14 and 15.
            let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            let ticks_s = (utime + stime) as f64 / tck;
            s.cpu_s += run_ns(*pid).map(|ns| ns as f64 / 1e9).unwrap_or(ticks_s);
            s.tick_cpu_s += ticks_s;
            s.tick_sys_s += stime as f64 / tck;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                s.rss_kib += kib;
            }
        }
        s.procs += 1;
    }
    s
}

// ----------------------------------------------------------------- summary

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn summarize(
    args: &ClientArgs,
    target: &Target,
    results: Vec<StreamResult>,
    window_s: f64,
    before: ProcSample,
    after: ProcSample,
    open: Option<(ProcSample, usize)>,
) -> Value {
    let mut lats: Vec<u64> = Vec::with_capacity(results.iter().map(|r| r.lats.len()).sum());
    let mut ttfe: Vec<u64> = Vec::with_capacity(results.len());
    let (mut events, mut bytes, mut errors) = (0u64, 0u64, 0u64);
    let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
    for r in &results {
        lats.extend_from_slice(&r.lats);
        events += r.events;
        bytes += r.bytes;
        if let Some(t) = r.ttfe {
            ttfe.push(t.as_nanos() as u64);
        }
        if let Some(e) = &r.error {
            errors += 1;
            *kinds.entry(e.clone()).or_default() += 1;
        }
    }
    lats.sort_unstable();
    ttfe.sort_unstable();
    let us = |v: Option<u64>| v.map(|ns| ns as f64 / 1e3);
    let ms = |v: Option<u64>| v.map(|ns| ns as f64 / 1e6);
    // The parts of the time to first event, sorted, in ns.
    let part = |of: fn(&StreamResult) -> Option<Duration>| {
        let mut v: Vec<u64> = results.iter().filter_map(|r| of(r).map(|d| d.as_nanos() as u64)).collect();
        v.sort_unstable();
        v
    };
    let (slot_wait, connect, head) = (part(|r| r.slot_wait), part(|r| r.connect), part(|r| r.head));
    let mut out = json!({
        "scenario": args.scenario,
        "target": args.target,
        "url": args.url,
        "handoff": args.handoff,
        "warmup_events": args.warmup_events,
        "streams": args.streams,
        "expected_events": target.expect * args.streams as u64,
        "events": events,
        "bytes": bytes,
        "errors": errors,
        "error_kinds": kinds,
        "duration_s": window_s,
        "events_per_s": if window_s > 0.0 { events as f64 / window_s } else { 0.0 },
        "bytes_per_s": if window_s > 0.0 { bytes as f64 / window_s } else { 0.0 },
        "lat_p50_us": us(percentile(&lats, 0.50)),
        "lat_p99_us": us(percentile(&lats, 0.99)),
        "lat_max_us": us(lats.last().copied()),
        "ttfe_p50_ms": ms(percentile(&ttfe, 0.50)),
        "ttfe_p99_ms": ms(percentile(&ttfe, 0.99)),
        "slot_wait_p50_ms": ms(percentile(&slot_wait, 0.50)),
        "connect_p50_ms": ms(percentile(&connect, 0.50)),
        "head_p50_ms": ms(percentile(&head, 0.50)),
        "head_p99_ms": ms(percentile(&head, 0.99)),
        "ttfe_max_ms": ms(ttfe.last().copied()),
    });
    if args.pid.is_some() {
        let cpu = after.cpu_s - before.cpu_s;
        out["proxy_processes"] = json!(after.procs);
        out["proxy_cpu_s"] = json!(cpu);
        let ticks = after.tick_cpu_s - before.tick_cpu_s;
        let sys_share = if ticks > 0.0 { (after.tick_sys_s - before.tick_sys_s) / ticks } else { 0.0 };
        out["proxy_sys_s"] = json!(cpu * sys_share);
        out["proxy_cpu_s_per_m_events"] = json!(if events > 0 { cpu / events as f64 * 1e6 } else { 0.0 });
        out["proxy_rss_before_kib"] = json!(before.rss_kib);
        out["proxy_rss_after_kib"] = json!(after.rss_kib);
        if let Some((sample, open)) = open {
            out["proxy_rss_open_kib"] = json!(sample.rss_kib);
            out["streams_open"] = json!(open);
            let per =
                if open > 0 { (sample.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / open as f64 } else { 0.0 };
            out["proxy_rss_per_stream_b"] = json!(per);
        }
    } else if let Some((_, open)) = open {
        out["streams_open"] = json!(open);
    }
    out
}

// ------------------------------------------------------------------ report

/// The JSON lines one run's clients wrote.
fn read_rows(file: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The median of a list of figures.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A figure of one target in one scenario; of a scenario run several times
/// (rounds), the median.
fn figure(rows: &[Value], scenario: &str, target: &str, key: &str) -> Option<f64> {
    median(
        rows.iter()
            .filter(|r| r["scenario"] == scenario && r["target"] == target)
            .filter_map(|r| r[key].as_f64())
            .collect(),
    )
}

/// One of the issue's goals: a figure of ssegate's against the same of
/// nginx's, in the same run.
struct Goal {
    name: &'static str,
    ssegate: Option<f64>,
    nginx: Option<f64>,
    /// Whether ssegate's has to be at least nginx's (else at most).
    higher: bool,
}

impl Goal {
    fn ratio(&self) -> Option<f64> {
        quotient(self.ssegate, self.nginx)
    }

    /// `None` when the run did not measure it.
    fn met(&self) -> Option<bool> {
        let (s, n) = (self.ssegate?, self.nginx?);
        Some(if self.higher { s >= n } else { s <= n })
    }
}

/// The issue's goals (6/7, item 4), as ratios in one run: ssegate ≥ nginx
/// on events/s, ≤ nginx on CPU per million events, added latency p99 and
/// RSS per idle stream; for each scenario that has the figure. Compared
/// unrounded: the table's two decimals can hide a miss.
fn goals(rows: &[Value]) -> Vec<Goal> {
    let get = |scenario: &str, target: &str, key: &str| figure(rows, scenario, target, key);
    let added_p99 = |scenario: &str, target: &str| {
        Some(get(scenario, target, "lat_p99_us")? - get(scenario, "direct", "lat_p99_us")?)
    };
    let goal = |name, scenario: &str, key: &str, higher| Goal {
        name,
        ssegate: get(scenario, "ssegate", key),
        nginx: get(scenario, "nginx", key),
        higher,
    };
    let added = |name, scenario: &str| Goal {
        name,
        ssegate: added_p99(scenario, "ssegate"),
        nginx: added_p99(scenario, "nginx"),
        higher: false,
    };
    let cpu = "proxy_cpu_s_per_m_events";
    vec![
        added("typing: added latency p99", "typing"),
        goal("typing: CPU-s per 1M events", "typing", cpu, false),
        goal("flat out: events/s", "flat", "events_per_s", true),
        goal("flat out: CPU-s per 1M events", "flat", cpu, false),
        goal("fan-in: events/s", "fanin", "events_per_s", true),
        added("fan-in: added latency p99", "fanin"),
        goal("fan-in: CPU-s per 1M events", "fanin", cpu, false),
        goal("idle: RSS per open stream", "idle", "proxy_rss_per_stream_b", false),
        goal("large: events/s", "large", "events_per_s", true),
        goal("large: CPU-s per 1M events", "large", cpu, false),
    ]
}

/// The goals of one run, after its table: each with both figures and the
/// unrounded ratio, then which were missed.
fn print_goals(goals: &[Goal]) {
    let mut table = Table::default();
    table.row(&["goal", "ssegate", "nginx", "ssegate/nginx", "met"]);
    for g in goals {
        let met = match g.met() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not measured",
        };
        let r = g.ratio().map_or(String::new(), |r| format!("{r:.4}"));
        table.row(&[g.name, &num(g.ssegate), &num(g.nginx), &r, met]);
    }
    println!();
    table.print_aligned(1);
    let missed = missed(goals);
    let measured = goals.iter().filter(|g| g.met().is_some()).count();
    println!();
    if missed.is_empty() {
        println!("Goals: met {measured} of {measured} measured.");
    } else {
        println!("Goals: met {} of {measured} measured; missed: {}.", measured - missed.len(), missed.join("; "));
    }
}

/// The names of the goals a run missed.
fn missed(goals: &[Goal]) -> Vec<&'static str> {
    goals.iter().filter(|g| g.met() == Some(false)).map(|g| g.name).collect()
}

/// The goals over several runs: per goal the median, lowest and highest
/// ratio and how many runs met it; then how many runs met every goal.
fn summary(files: &[std::path::PathBuf]) {
    let runs: Vec<Vec<Goal>> = files.iter().map(|f| goals(&read_rows(f))).collect();
    let mut table = Table::default();
    table.row(&["goal", "ssegate/nginx median", "lowest", "highest", "runs that met it"]);
    let Some(first) = runs.first() else { return };
    for (i, g) in first.iter().enumerate() {
        let ratios: Vec<f64> = runs.iter().filter_map(|r| r[i].ratio()).collect();
        let low = ratios.iter().copied().reduce(f64::min);
        let high = ratios.iter().copied().reduce(f64::max);
        let met = runs.iter().filter(|r| r[i].met() == Some(true)).count();
        let measured = runs.iter().filter(|r| r[i].met().is_some()).count();
        let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
        let runs_met = if measured == 0 { "not measured".to_string() } else { format!("{met} of {measured}") };
        table.row(&[g.name, &f(median(ratios)), &f(low), &f(high), &runs_met]);
    }
    println!("The goals over {} runs (ssegate/nginx, unrounded):", runs.len());
    table.print_aligned(1);
    println!();
    let missed: Vec<Vec<&str>> = runs.iter().map(|r| missed(r)).collect();
    let all = missed.iter().filter(|m| m.is_empty()).count();
    println!("Runs that met every goal they measured: {all} of {}.", runs.len());
    for (f, missed) in files.iter().zip(&missed) {
        let what =
            if missed.is_empty() { "met every goal".to_string() } else { format!("missed {}", missed.join("; ")) };
        println!("  {}: {what}", f.display());
    }
}

fn report(file: &std::path::Path) {
    let rows = read_rows(file);
    let get = |scenario: &str, target: &str, key: &str| figure(&rows, scenario, target, key);
    let rounds = |scenario: &str| rows.iter().filter(|r| r["scenario"] == scenario && r["target"] == "ssegate").count();
    let median_of = |scenario: &str| match rounds(scenario) {
        n if n > 1 => format!(" (median of {n})"),
        _ => String::new(),
    };
    let mut table = Table::default();
    table.row(&["scenario", "figure", "direct", "ssegate", "nginx", "ssegate/direct", "nginx/direct", "ssegate/nginx"]);

    // A figure measured on all three: absolute values and the three ratios.
    let plain = |t: &mut Table, scenario: &str, label: &str, figure: &str, key: &str, scale: f64, proxy_only: bool| {
        let d = if proxy_only { None } else { get(scenario, "direct", key).map(|v| v * scale) };
        let s = get(scenario, "ssegate", key).map(|v| v * scale);
        let n = get(scenario, "nginx", key).map(|v| v * scale);
        t.row(&[label, figure, &num(d), &num(s), &num(n), &ratio(s, d), &ratio(n, d), &ratio(s, n)]);
    };
    // Latency added by the proxy: its figure less the direct one.
    let added = |t: &mut Table, scenario: &str, base: &str, label: &str, figure: &str, key: &str, nginx: bool| {
        let d = get(base, "direct", key);
        let s = get(scenario, "ssegate", key).zip(d).map(|(s, d)| s - d);
        let n = if nginx { get(scenario, "nginx", key).zip(d).map(|(n, d)| n - d) } else { None };
        t.row(&[label, figure, "", &num(s), &na(n, nginx), "", "", &ratio(s, n)]);
    };
    let errors = |t: &mut Table, scenario: &str, label: &str, targets: &[&str]| {
        let cell = |target: &str| {
            if !targets.contains(&target) {
                return "n/a".to_string();
            }
            match (
                get(scenario, target, "errors"),
                get(scenario, target, "expected_events"),
                get(scenario, target, "events"),
            ) {
                (Some(e), Some(x), Some(v)) => format!("{e} ({v}/{x} ev)"),
                _ => "-".into(),
            }
        };
        t.row(&[label, "errors (events/expected)", &cell("direct"), &cell("ssegate"), &cell("nginx"), "", "", ""]);
        // CPU that other processes on the machine used during the run: a
        // sign that the figures were disturbed.
        let other = |target: &str| {
            if !targets.contains(&target) {
                return "n/a".to_string();
            }
            num(get(scenario, target, "other_cpu_s").zip(get(scenario, target, "duration_s")).map(|(c, d)| c / d))
        };
        t.row(&[
            label,
            "other processes' CPU (cores)",
            &other("direct"),
            &other("ssegate"),
            &other("nginx"),
            "",
            "",
            "",
        ]);
    };

    let typing_label = format!("typing 100×50/s×64 B{}", median_of("typing"));
    let l = typing_label.as_str();
    plain(&mut table, "typing", l, "latency p50 (µs)", "lat_p50_us", 1.0, false);
    plain(&mut table, "typing", l, "latency p99 (µs)", "lat_p99_us", 1.0, false);
    plain(&mut table, "typing", l, "latency max (µs)", "lat_max_us", 1.0, false);
    added(&mut table, "typing", "typing", l, "added latency p50 (µs)", "lat_p50_us", true);
    added(&mut table, "typing", "typing", l, "added latency p99 (µs)", "lat_p99_us", true);
    plain(&mut table, "typing", l, "time to first event p50 (ms)", "ttfe_p50_ms", 1.0, false);
    plain(&mut table, "typing", l, "proxy CPU-s per 1M events", "proxy_cpu_s_per_m_events", 1.0, true);
    errors(&mut table, "typing", l, &["direct", "ssegate", "nginx"]);

    let flat_label = format!("flat out 50×20,000×64 B{}", median_of("flat"));
    let l = flat_label.as_str();
    plain(&mut table, "flat", l, "events/s", "events_per_s", 1.0, false);
    plain(&mut table, "flat", l, "proxy CPU-s per 1M events", "proxy_cpu_s_per_m_events", 1.0, true);
    let kernel = |target: &str| Some(get("flat", target, "proxy_sys_s")? / get("flat", target, "proxy_cpu_s")? * 100.0);
    let (ks, kn) = (kernel("ssegate"), kernel("nginx"));
    table.row(&[l, "of which in the kernel (%)", "", &num(ks), &num(kn), "", "", &ratio(ks, kn)]);
    plain(&mut table, "flat", l, "latency p50 (ms)", "lat_p50_us", 1e-3, false);
    plain(&mut table, "flat", l, "latency p99 (ms)", "lat_p99_us", 1e-3, false);
    errors(&mut table, "flat", l, &["direct", "ssegate", "nginx"]);

    let warmup = get("fanin", "ssegate", "warmup_events").unwrap_or(0.0);
    let fanin_label = if warmup > 0.0 {
        format!("fan-in 2,000×10/s×64 B (latency from event {})", warmup + 1.0)
    } else {
        "fan-in 2,000×10/s×64 B".to_string()
    };
    let l = fanin_label.as_str();
    plain(&mut table, "fanin", l, "events/s", "events_per_s", 1.0, false);
    // What sets events/s here: each stream runs 6 s from its first event,
    // so the window is the ramp (2,000 set-ups) plus 6 s.
    plain(&mut table, "fanin", l, "last stream's first event (ms)", "last_first_event_ms", 1.0, false);
    plain(&mut table, "fanin", l, "latency p50 (µs)", "lat_p50_us", 1.0, false);
    plain(&mut table, "fanin", l, "latency p99 (µs)", "lat_p99_us", 1.0, false);
    added(&mut table, "fanin", "fanin", l, "added latency p50 (µs)", "lat_p50_us", true);
    added(&mut table, "fanin", "fanin", l, "added latency p99 (µs)", "lat_p99_us", true);
    plain(&mut table, "fanin", l, "proxy CPU-s per 1M events", "proxy_cpu_s_per_m_events", 1.0, true);
    errors(&mut table, "fanin", l, &["direct", "ssegate", "nginx"]);

    let idle_n = get("idle", "ssegate", "streams").or(get("idle", "nginx", "streams")).unwrap_or(0.0);
    let l = format!("idle {} open streams", num(Some(idle_n)));
    plain(&mut table, "idle", &l, "streams open", "streams_open", 1.0, false);
    plain(&mut table, "idle", &l, "proxy RSS per open stream (KiB)", "proxy_rss_per_stream_b", 1.0 / 1024.0, true);
    plain(&mut table, "idle", &l, "proxy RSS with all open (MiB)", "proxy_rss_open_kib", 1.0 / 1024.0, true);
    errors(&mut table, "idle", &l, &["direct", "ssegate", "nginx"]);

    let l = "large 20×64 KiB flat out";
    plain(&mut table, "large", l, "events/s", "events_per_s", 1.0, false);
    plain(&mut table, "large", l, "MiB/s", "bytes_per_s", 1.0 / 1048576.0, false);
    plain(&mut table, "large", l, "latency p50 (ms)", "lat_p50_us", 1e-3, false);
    plain(&mut table, "large", l, "latency p99 (ms)", "lat_p99_us", 1e-3, false);
    plain(&mut table, "large", l, "proxy CPU-s per 1k events (64 MiB)", "proxy_cpu_s_per_m_events", 1e-3, true);
    errors(&mut table, "large", l, &["direct", "ssegate", "nginx"]);

    let handoff_label = format!("handoff: typing via POST+GET{}", median_of("handoff"));
    let l = handoff_label.as_str();
    let h = |key: &str| get("handoff", "ssegate", key);
    let d = |key: &str| get("typing", "direct", key);
    for (figure, key) in [("latency p50 (µs)", "lat_p50_us"), ("latency p99 (µs)", "lat_p99_us")] {
        table.row(&[l, figure, &num(d(key)), &num(h(key)), "n/a", &ratio(h(key), d(key)), "", ""]);
    }
    added(&mut table, "handoff", "typing", l, "added latency p50 (µs)", "lat_p50_us", false);
    added(&mut table, "handoff", "typing", l, "added latency p99 (µs)", "lat_p99_us", false);
    let key = "ttfe_p50_ms";
    table.row(&[l, "time to first event p50 (ms)", &num(d(key)), &num(h(key)), "n/a", &ratio(h(key), d(key)), "", ""]);
    let key = "proxy_cpu_s_per_m_events";
    table.row(&[l, "proxy CPU-s per 1M events", "", &num(h(key)), "n/a", "", "", ""]);
    errors(&mut table, "handoff", l, &["ssegate"]);
    table.print();

    // How much the machine was disturbed, and what the client cost.
    println!();
    let other = rows
        .iter()
        .filter_map(|r| Some((r["other_cpu_s"].as_f64()? / r["duration_s"].as_f64()?, r)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((share, r)) = other {
        println!(
            "Other processes on the machine: at most {:.2} CPU busy during a run ({} {}).",
            share,
            r["scenario"].as_str().unwrap_or(""),
            r["target"].as_str().unwrap_or("")
        );
    }
    for target in ["direct", "ssegate", "nginx"] {
        let (Some(cpu), Some(ev)) = (get("flat", target, "client_cpu_s"), get("flat", target, "events")) else {
            continue;
        };
        let up = get("flat", target, "upstream_cpu_s").unwrap_or(0.0);
        println!(
            "Flat out, {target}: the client used {:.2} µs of CPU per event, the upstream {:.2} µs.",
            cpu / ev * 1e6,
            up / ev * 1e6
        );
    }
    print_goals(&goals(&rows));
}

fn na(v: Option<f64>, applies: bool) -> String {
    if applies {
        num(v)
    } else {
        "n/a".into()
    }
}

/// Three significant digits, thousands grouped.
fn num(v: Option<f64>) -> String {
    let Some(v) = v else { return String::new() };
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", a);
        let mut grouped = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        format!("{}{grouped}", if v < 0.0 { "-" } else { "" })
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `a / b` when both are there, finite, and `b` is not zero.
fn quotient(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    quotient(a, b).map_or(String::new(), |r| format!("{r:.2}"))
}

#[derive(Default)]
struct Table(Vec<Vec<String>>);

impl Table {
    fn row(&mut self, cells: &[&str]) {
        self.0.push(cells.iter().map(|c| c.to_string()).collect());
    }

    fn print(&self) {
        self.print_aligned(2);
    }

    /// Prints the table with its first `left` columns aligned left, the
    /// rest (numbers) right.
    fn print_aligned(&self, left: usize) {
        let cols = self.0[0].len();
        let width: Vec<usize> =
            (0..cols).map(|c| self.0.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        for (i, row) in self.0.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, v)| {
                    let pad = width[c] - v.chars().count();
                    if c < left {
                        format!("{v}{}", " ".repeat(pad))
                    } else {
                        format!("{}{v}", " ".repeat(pad))
                    }
                })
                .collect();
            println!("| {} |", cells.join(" | "));
            if i == 0 {
                let rule: Vec<String> = (0..cols)
                    .map(|c| if c < left { "-".repeat(width[c]) } else { format!("{}:", "-".repeat(width[c] - 1)) })
                    .collect();
                println!("| {} |", rule.join(" | "));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One client line with the given figures.
    fn line(scenario: &str, target: &str, figures: &[(&str, f64)]) -> Value {
        let mut v = json!({ "scenario": scenario, "target": target });
        for (key, value) in figures {
            v[*key] = json!(value);
        }
        v
    }

    fn goal<'a>(goals: &'a [Goal], name: &str) -> &'a Goal {
        goals.iter().find(|g| g.name == name).expect("no such goal")
    }

    #[test]
    fn a_miss_the_rounded_table_hides_is_a_miss() {
        let rows = [
            line("fanin", "ssegate", &[("events_per_s", 19_145.0)]),
            line("fanin", "nginx", &[("events_per_s", 19_154.0)]),
        ];
        assert_eq!(ratio(Some(19_145.0), Some(19_154.0)), "1.00");
        let goals = goals(&rows);
        let g = goal(&goals, "fan-in: events/s");
        assert_eq!(g.met(), Some(false));
        assert!((g.ratio().unwrap() - 0.99953).abs() < 1e-5);
    }

    #[test]
    fn added_latency_is_over_the_direct_baseline() {
        // ssegate's p99 is lower than nginx's in proportion to the whole,
        // but what it adds to the direct figure is more.
        let rows = [
            line("typing", "direct", &[("lat_p99_us", 100.0)]),
            line("typing", "ssegate", &[("lat_p99_us", 300.0)]),
            line("typing", "nginx", &[("lat_p99_us", 250.0)]),
        ];
        let goals = goals(&rows);
        let g = goal(&goals, "typing: added latency p99");
        assert_eq!((g.ssegate, g.nginx), (Some(200.0), Some(150.0)));
        assert_eq!(g.met(), Some(false));
    }

    #[test]
    fn rounds_count_by_their_median_and_unrun_goals_are_not_measured() {
        let cpu = "proxy_cpu_s_per_m_events";
        let rows = [
            line("flat", "ssegate", &[(cpu, 0.09)]),
            line("flat", "nginx", &[(cpu, 0.10)]),
            line("flat", "ssegate", &[(cpu, 0.20)]),
            line("flat", "nginx", &[(cpu, 0.10)]),
            line("flat", "ssegate", &[(cpu, 0.08)]),
            line("flat", "nginx", &[(cpu, 0.10)]),
        ];
        let goals = goals(&rows);
        let g = goal(&goals, "flat out: CPU-s per 1M events");
        assert_eq!((g.ssegate, g.met()), (Some(0.09), Some(true)));
        assert_eq!(goal(&goals, "idle: RSS per open stream").met(), None);
        assert_eq!(goal(&goals, "flat out: events/s").met(), None);
    }
}
