//! Shared test helpers: the proxy on port 0, a scriptable fake upstream, and
//! a reader that splits an event stream into events.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ssegate::body::{ChannelBody, ResponseBody};
use ssegate::config::{Config, RouteConfig};
use ssegate::Listeners;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), ssegate::StartError>>,
}

impl Proxy {
    /// Starts the proxy with `config` on ephemeral ports.
    pub async fn start(config: Config) -> Proxy {
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Proxy::start_on(config, Listeners { public, admin })
    }

    /// Starts the proxy with `config` on listeners bound already (clients
    /// may have connected to them meanwhile).
    pub fn start_on(config: Config, listeners: Listeners) -> Proxy {
        let (addr, admin_addr) = (listeners.public.local_addr().unwrap(), listeners.admin.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(ssegate::run(config, listeners, async move {
            let _ = rx.await;
        }));
        Proxy { addr, admin: admin_addr, stop: Some(tx), task }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends the shutdown signal.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A port that refuses connections for as long as this value lives.
///
/// The socket is bound but never listens, and without `SO_REUSEADDR`, so no
/// later bind in the same test (the proxy's own ports on port 0) can take the
/// port over. Dropping a listener to get a "closed" port does not ensure
/// that: the proxy started next was once given the same port, and the dead
/// upstream answered 404.
pub struct RefusingPort {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl RefusingPort {
    pub fn new() -> RefusingPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        RefusingPort { addr: socket.local_addr().unwrap(), _socket: socket }
    }
}

/// A config with one route `/v1` → `upstream`, short timeouts for tests.
pub fn config(upstream: SocketAddr) -> Config {
    let mut c = Config::default();
    c.routes.push(route("/v1", &format!("http://{upstream}")));
    c.server.drain_timeout = Duration::from_secs(2);
    c
}

/// A route config.
pub fn route(prefix: &str, upstream: &str) -> RouteConfig {
    RouteConfig {
        prefix: prefix.into(),
        upstream: upstream.into(),
        format: Default::default(),
        strip_prefix: false,
        headers: Default::default(),
    }
}

/// What the fake upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How the fake upstream answers.
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, String)>,
    /// Chunks, each after its delay.
    pub chunks: Vec<(Duration, Bytes)>,
    pub end: End,
    /// Wait this long before sending the head.
    pub head_delay: Duration,
}

/// How the fake upstream ends its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Clean,
    /// The connection is cut mid-body.
    Reset,
    /// The body never ends.
    Hang,
}

impl Reply {
    /// 200 with a content type and chunks sent at once, ending cleanly.
    pub fn chunks(content_type: &str, chunks: &[&[u8]]) -> Reply {
        Reply {
            status: StatusCode::OK,
            headers: vec![("content-type", content_type.to_string())],
            chunks: chunks.iter().map(|c| (Duration::ZERO, Bytes::copy_from_slice(c))).collect(),
            end: End::Clean,
            head_delay: Duration::ZERO,
        }
    }

    /// A whole body with a status.
    pub fn full(status: u16, content_type: &str, body: &str) -> Reply {
        let mut r = Reply::chunks(content_type, &[body.as_bytes()]);
        r.status = StatusCode::from_u16(status).unwrap();
        r
    }

    pub fn paced(mut self, delay: Duration) -> Reply {
        for c in &mut self.chunks {
            c.0 = delay;
        }
        self
    }

    pub fn ending(mut self, end: End) -> Reply {
        self.end = end;
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }
}

/// A fake model server on port 0 that records what it saw and whether its
/// response was cut short by the proxy.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// How many responses the proxy abandoned before their end.
    pub cancelled: watch::Receiver<usize>,
    /// How many responses were sent whole.
    pub completed: watch::Receiver<usize>,
}

impl Upstream {
    /// Starts a fake upstream answering every request with `script`.
    pub async fn start<F>(script: F) -> Upstream
    where
        F: Fn(&Seen) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (cancel_tx, cancelled) = watch::channel(0usize);
        let (done_tx, completed) = watch::channel(0usize);
        let state = Arc::new((script, seen.clone(), cancel_tx, done_tx));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                // As model servers do: a reply written in several pieces
                // does not wait for the proxy's delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let seen = Seen { method: parts.method, uri: parts.uri, headers: parts.headers, body };
                            let reply = (state.0)(&seen);
                            state.1.lock().unwrap().push(seen);
                            Ok::<_, Infallible>(respond(reply, state.2.clone(), state.3.clone()).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen, cancelled, completed }
    }

    /// How many requests it has seen.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The last request it saw.
    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("no request seen")
    }
}

async fn respond(reply: Reply, cancel: watch::Sender<usize>, done: watch::Sender<usize>) -> Response<ResponseBody> {
    tokio::time::sleep(reply.head_delay).await;
    let (tx, body) = ChannelBody::new(4);
    let chunks = reply.chunks;
    let end = reply.end;
    tokio::spawn(async move {
        for (delay, chunk) in chunks {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tx.closed() => { cancel.send_modify(|n| *n += 1); return; }
            }
            if tx.send(chunk).await.is_err() {
                cancel.send_modify(|n| *n += 1);
                return;
            }
        }
        match end {
            End::Clean => {
                drop(tx);
                done.send_modify(|n| *n += 1);
            }
            End::Reset => {
                // Dropping the sender without an end is not a reset; an error frame is.
                let _ = tx.send(Bytes::from_static(b"\x00__reset__")).await;
            }
            End::Hang => {
                tx.closed().await;
                cancel.send_modify(|n| *n += 1);
            }
        }
    });
    let body = ResetOnMarker { inner: body }.boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = reply.status;
    for (k, v) in reply.headers {
        resp.headers_mut().append(k, v.parse().unwrap());
    }
    resp
}

/// Turns the marker chunk into a body error, which makes hyper cut the
/// connection mid-body.
struct ResetOnMarker {
    inner: ChannelBody,
}

impl http_body::Body for ResetOnMarker {
    type Data = Bytes;
    type Error = ssegate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d.starts_with(b"\x00__reset__")) => {
                std::task::Poll::Ready(Some(Err("reset".into())))
            }
            other => other,
        }
    }
}

/// One parsed SSE event as a browser would see it (plus the raw `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ev {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Parses a whole event-stream text (LF line ends, as the proxy writes it),
/// failing on a line that is not an SSE field or comment.
pub fn parse_sse(text: &str) -> Vec<Ev> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut ev = Ev { id: None, event: None, data: String::new() };
        let mut has_data = false;
        for line in block.split('\n') {
            if line.starts_with(':') || line.is_empty() {
                continue;
            }
            let (field, value) =
                line.split_once(':').map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v))).unwrap_or((line, ""));
            match field {
                "id" => ev.id = Some(value.to_string()),
                "event" => ev.event = Some(value.to_string()),
                "data" => {
                    if has_data {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                    has_data = true;
                }
                "retry" => {}
                // What the proxy writes is these fields and comments only: any
                // other line is a framing error (a stray chunk-size line, say).
                _ => panic!("a line that is no SSE field in the stream: {line:?}"),
            }
        }
        if has_data {
            out.push(ev);
        }
    }
    out
}

/// A plain HTTP client for tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Reads a response body to the end, with a deadline so a hang fails the test.
pub async fn body_text(resp: reqwest::Response) -> String {
    tokio::time::timeout(Duration::from_secs(20), resp.text()).await.expect("body did not end").unwrap()
}

/// Waits until `rx` reaches at least `n`, failing after 10 s.
pub async fn wait_for(rx: &mut watch::Receiver<usize>, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v >= n)).await.expect("timed out waiting").unwrap();
}

/// An upstream that hands each accepted connection to the test as a raw
/// socket, for exchanges the test must script byte by byte (hop-by-hop
/// response headers, a chunk held back until the client has seen the one
/// before, a request body read while the client is still sending it).
pub struct RawUpstream {
    pub addr: SocketAddr,
    conns: tokio::sync::mpsc::UnboundedReceiver<tokio::net::TcpStream>,
}

impl RawUpstream {
    /// Listens on an ephemeral loopback port.
    pub async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if tx.send(stream).is_err() {
                    break;
                }
            }
        });
        RawUpstream { addr, conns }
    }

    /// The next connection the proxy opens, failing after 10 s.
    pub async fn accept(&mut self) -> tokio::net::TcpStream {
        tokio::time::timeout(Duration::from_secs(10), self.conns.recv())
            .await
            .expect("the proxy opened no upstream connection")
            .expect("raw upstream stopped")
    }
}

/// Reads from `stream` until `buf` contains `needle`, failing after 10 s or
/// at EOF. Returns the byte offset just past the needle.
pub async fn read_until(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> usize {
    use tokio::io::AsyncReadExt;
    let find = |buf: &[u8]| buf.windows(needle.len()).position(|w| w == needle).map(|p| p + needle.len());
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(end) = find(buf) {
                return end;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read failed");
            assert!(n > 0, "EOF before {:?}; got {:?}", String::from_utf8_lossy(needle), String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("timed out waiting for {:?}; got {:?}", String::from_utf8_lossy(needle), String::from_utf8_lossy(buf))
    })
}

/// Reads an HTTP/1.1 message head (through the blank line) from a raw
/// socket; returns the head and whatever was read past it.
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let end = read_until(stream, &mut buf, b"\r\n\r\n").await;
    let rest = buf.split_off(end);
    (String::from_utf8(buf).expect("head is not UTF-8"), rest)
}

/// A request body the test feeds piece by piece: the sender and a
/// `reqwest::Body` that streams (chunked, no content-length).
pub fn streamed_body() -> (tokio::sync::mpsc::Sender<Bytes>, reqwest::Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
        );
    (tx, reqwest::Body::wrap_stream(stream))
}

/// Parses a JSON error body `{"error":{"type":…,"message":…}}` and returns
/// its type, checking the shape.
pub fn error_type(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    assert!(v["error"]["message"].is_string(), "no error.message in {body}");
    v["error"]["type"].as_str().unwrap_or_else(|| panic!("no error.type in {body}")).to_string()
}

/// A fake upstream whose responses the test writes by hand: every response
/// gets the same head, and its body is a [`Feed`] handed to the test, so a
/// test decides exactly when each chunk goes out (no sleeps).
pub struct ManualUpstream {
    pub addr: SocketAddr,
    feeds: tokio::sync::mpsc::UnboundedReceiver<Feed>,
}

/// One response body under the test's control. Dropping it ends the body
/// cleanly, like [`Feed::finish`].
pub struct Feed {
    pub seen: Seen,
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
}

impl ManualUpstream {
    /// Answers every request with `status` and `headers`, body from a `Feed`.
    pub async fn start(status: u16, headers: &[(&'static str, &str)]) -> ManualUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (feed_tx, feeds) = tokio::sync::mpsc::unbounded_channel::<Feed>();
        let head: Arc<(StatusCode, Vec<(&'static str, String)>)> = Arc::new((
            StatusCode::from_u16(status).unwrap(),
            headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        ));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (feed_tx, head) = (feed_tx.clone(), head.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (feed_tx, head) = (feed_tx.clone(), head.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let seen = Seen { method: parts.method, uri: parts.uri, headers: parts.headers, body };
                            let (tx, rx) = ChannelBody::new(4);
                            let _ = feed_tx.send(Feed { seen, tx: Some(tx) });
                            let mut resp = Response::new(ResetOnMarker { inner: rx }.boxed_unsync());
                            *resp.status_mut() = head.0;
                            for (k, v) in &head.1 {
                                resp.headers_mut().append(*k, v.parse().unwrap());
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ManualUpstream { addr, feeds }
    }

    /// The body of a request the proxy has already sent, if any is waiting
    /// (for checks that the proxy sent nothing).
    pub fn try_next(&mut self) -> Option<Feed> {
        self.feeds.try_recv().ok()
    }

    /// The body of the next request the proxy sends, failing after 10 s.
    pub async fn next(&mut self) -> Feed {
        tokio::time::timeout(Duration::from_secs(10), self.feeds.recv())
            .await
            .expect("the proxy sent no upstream request")
            .expect("manual upstream stopped")
    }
}

impl Feed {
    fn sender(&self) -> &tokio::sync::mpsc::Sender<Bytes> {
        self.tx.as_ref().expect("feed already ended")
    }

    /// Sends one chunk of the body.
    pub async fn send(&self, chunk: impl AsRef<[u8]>) {
        self.sender()
            .send(Bytes::copy_from_slice(chunk.as_ref()))
            .await
            .expect("the proxy dropped the upstream response");
    }

    /// Sends one chunk of the body if the proxy still takes it: false once
    /// it let go of the response.
    pub async fn offer(&self, chunk: impl AsRef<[u8]>) -> bool {
        self.sender().send(Bytes::copy_from_slice(chunk.as_ref())).await.is_ok()
    }

    /// Offers 64 KiB events from a task of its own until the proxy lets go
    /// of the response (true) or 64 MiB went (false): a model with plenty to
    /// say to a client that reads nothing.
    pub fn flood(self: &Arc<Feed>) -> tokio::task::JoinHandle<bool> {
        let feed = self.clone();
        tokio::spawn(async move {
            let event = format!("data: {}\n\n", "x".repeat(64 * 1024));
            for _ in 0..1000 {
                if !feed.offer(&event).await {
                    return true;
                }
            }
            false
        })
    }

    /// Ends the body cleanly.
    pub fn finish(mut self) {
        self.tx.take();
    }

    /// Cuts the connection in the middle of the body.
    pub async fn reset(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Bytes::from_static(b"\x00__reset__")).await;
        }
    }

    /// Waits until the proxy abandons this response (closes its upstream
    /// connection), failing after 10 s.
    pub async fn closed(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.sender().closed())
            .await
            .expect("the proxy kept the upstream response open");
    }
}

/// Reads a response body as it arrives, so a test can wait for one frame
/// before it lets the upstream send the next.
pub struct BodyReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// How much of `buf` earlier calls returned.
    taken: usize,
    ended: bool,
}

impl BodyReader {
    pub fn new(resp: reqwest::Response) -> BodyReader {
        BodyReader { resp, buf: Vec::new(), taken: 0, ended: false }
    }

    /// Reads until the text not yet returned contains `needle`; returns that
    /// text through the needle. Fails after 10 s or at the end of the body.
    pub async fn until(&mut self, needle: &str) -> String {
        let needle = needle.as_bytes();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let fresh = &self.buf[self.taken..];
                if let Some(p) = fresh.windows(needle.len()).position(|w| w == needle) {
                    return Some(self.taken + p + needle.len());
                }
                match self.resp.chunk().await.expect("body read failed") {
                    Some(chunk) => self.buf.extend_from_slice(&chunk),
                    None => {
                        self.ended = true;
                        return None;
                    }
                }
            }
        })
        .await;
        let seen = String::from_utf8_lossy(&self.buf[self.taken..]).into_owned();
        let end = match found {
            Ok(Some(end)) => end,
            Ok(None) => panic!("body ended before {:?}; got {seen:?}", String::from_utf8_lossy(needle)),
            Err(_) => panic!("timed out waiting for {:?}; got {seen:?}", String::from_utf8_lossy(needle)),
        };
        let out = String::from_utf8(self.buf[self.taken..end].to_vec()).expect("body is not UTF-8");
        self.taken = end;
        out
    }

    /// Reads to the end of the body (10 s at most); returns what earlier
    /// calls did not.
    pub async fn rest(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !self.ended {
                match self.resp.chunk().await.expect("body read failed") {
                    Some(chunk) => self.buf.extend_from_slice(&chunk),
                    None => self.ended = true,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("body did not end; got {:?}", String::from_utf8_lossy(&self.buf[self.taken..])));
        let out = String::from_utf8(self.buf[self.taken..].to_vec()).expect("body is not UTF-8");
        self.taken = self.buf.len();
        out
    }
}

/// A running proxy started with [`ssegate::run_with_reload`]: each config
/// sent with [`ReloadProxy::reload`] becomes the config of new requests.
pub struct ReloadProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    reloads: tokio::sync::mpsc::Sender<Config>,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), ssegate::StartError>>,
}

impl ReloadProxy {
    /// Starts the proxy with `config` on ephemeral ports.
    pub async fn start(config: Config) -> ReloadProxy {
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (public.local_addr().unwrap(), admin.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let (reloads, reload_rx) = tokio::sync::mpsc::channel(1);
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(ssegate::run_with_reload(config, Listeners { public, admin }, shutdown, reload_rx));
        ReloadProxy { addr, admin: admin_addr, reloads, stop: Some(tx), task }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Hands the proxy a new config. It is applied (or refused) shortly
    /// after; the caller observes which through requests.
    pub async fn reload(&self, config: Config) {
        self.reloads.send(config).await.expect("the proxy stopped taking reloads");
    }

    /// Sends the shutdown signal.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The `ssegate` binary running a config file; its log (JSON lines on
/// stderr) is read all the time, so that a full pipe never blocks it.
pub struct BinaryProxy {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every log line read so far.
    pub seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl BinaryProxy {
    /// Writes `config` (TOML; `listen` and `admin_listen` may be port 0)
    /// into a new temporary directory and runs the binary on it until it
    /// logs that it listens (20 s at most).
    pub async fn start(config: &str) -> BinaryProxy {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssegate"))
            .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut proxy = BinaryProxy { child, addr: unknown, admin: unknown, log, seen: Vec::new(), _dir: dir };
        let line = proxy.line_matching(|l| l.contains("ssegate listening")).await;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        proxy.addr = v["fields"]["listen"].as_str().unwrap().parse().unwrap();
        proxy.admin = v["fields"]["admin"].as_str().unwrap().parse().unwrap();
        proxy
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Reads log lines until one matches `pred`, failing after 20 s.
    pub async fn line_matching(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = self.log.recv().await {
                self.seen.push(line.clone());
                if pred(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the log ended without the line; got:\n{}", self.seen.join("\n")),
            Err(_) => panic!("no such log line within 20 s; got:\n{}", self.seen.join("\n")),
        }
    }

    /// Sends a signal (`"TERM"`, `"HUP"`) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("already exited").to_string();
        let ok = std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success();
        assert!(ok, "kill -{name} failed");
    }

    /// The process's resident set size in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("already exited");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("no VmRSS");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Waits for the process to exit (20 s at most) and reads the rest of
    /// its log; returns its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        let status =
            tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("did not exit").unwrap();
        while let Some(line) = self.log.recv().await {
            self.seen.push(line);
        }
        status.code()
    }
}

/// Reads `lines` (a child's log) into `seen` until one matches `pred`,
/// failing after 20 s or at the end of the output.
pub async fn line_matching<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<R>>,
    seen: &mut Vec<String>,
    pred: impl Fn(&str) -> bool,
) -> String {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
        panic!("output ended without the line; got:\n{}", seen.join("\n"))
    })
    .await
    .unwrap_or_else(|_| panic!("no such line within 20 s; got:\n{}", seen.join("\n")))
}

/// The address in the "ssegate listening" JSON log line.
pub fn listening_addr(line: &str) -> SocketAddr {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    v["fields"]["listen"].as_str().unwrap_or_else(|| panic!("no listen field: {line}")).parse().unwrap()
}
