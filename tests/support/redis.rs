//! Helpers for the Redis store tests (tests/redis*.rs) and benches/store.rs:
//! a real `redis-server` on a free port per test, killed on drop; a proxy
//! instance on its own runtime that can "die" (every task dropped at once,
//! as when its process is killed); SSE helpers shared by those files.
//! Included with `#[path = "support/redis.rs"] mod redis_support;` next to
//! `mod support;` (it uses `crate::support`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ssegate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{body_text, client, error_type, parse_sse, Ev, Proxy};

pub const SSE: &str = "text/event-stream";

/// A `redis-server` child process on 127.0.0.1, without persistence.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until PING answers.
    pub async fn start() -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None };
            if server.spawn_and_wait().await {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// A port that is free now; the server is started later with
    /// [`RedisServer::start_on`] (for a proxy that starts before its Redis).
    pub fn reserve() -> RedisServer {
        RedisServer { port: free_port(), child: None }
    }

    /// Starts (or restarts) the server on its port, waiting until PING answers.
    pub async fn start_on(&mut self) {
        assert!(self.child.is_none(), "redis-server already runs on {}", self.port);
        assert!(self.spawn_and_wait().await, "redis-server did not start again on port {}", self.port);
    }

    /// `redis://127.0.0.1:PORT/0`, the `handoff.store` value.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A connection for inspecting keys.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("cannot connect to the test redis-server")
    }

    /// Every key (the test server holds only this test's keys).
    pub async fn keys(&self) -> Vec<String> {
        let mut conn = self.conn().await;
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
        keys.sort();
        keys
    }

    /// `PTTL key`: -2 when the key is gone, -1 when it has no TTL.
    pub async fn pttl(&self, key: &str) -> i64 {
        let mut conn = self.conn().await;
        redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap()
    }

    /// `used_memory` from `INFO memory`, in bytes.
    pub async fn used_memory(&self) -> u64 {
        let mut conn = self.conn().await;
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("no used_memory in INFO memory")
    }

    async fn spawn_and_wait(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not on PATH): run scripts/test.sh, which installs it with apt-get"
            ),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: most likely the port was taken meanwhile
            }
            if ping(self.port).await {
                self.child = Some(child);
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free port below the kernel's ephemeral range (`ip_local_port_range`),
/// so that while a test has its Redis stopped, no outgoing connection or
/// `bind` to port 0 elsewhere in the suite takes the port it restarts on.
/// Each test process walks its own stretch of 20,000 up to the range.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral <= 21_000 {
        return std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    let span = ephemeral - 20_000;
    let start = std::process::id() * 37 % span;
    loop {
        let port = 20_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// Whether a Redis answers PING on the port (raw RESP, one round trip).
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    tokio::time::timeout(Duration::from_millis(500), attempt).await.ok().flatten().unwrap_or(false)
}

/// The test config of [`crate::support::config`] with the Redis store.
pub fn redis_config(upstream: SocketAddr, redis: &RedisServer) -> Config {
    let mut c = crate::support::config(upstream);
    c.handoff.store = redis.url();
    c
}

/// A proxy instance on a runtime of its own, so that the test can make it
/// die at once: [`Instance::kill`] drops every task of that runtime (its
/// listeners, streams, upstream requests, Redis connections and heartbeat),
/// as killing its process would, without a drain.
pub struct Instance {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    pub async fn start(mut config: Config) -> Instance {
        // Everything on the instance's own runtime, so that `kill` stops all
        // of it at once, as a crash would: worker threads would go on
        // serving for a moment after the runtime that owns them is gone.
        config.server.workers = 0;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let proxy = rt.block_on(Proxy::start(config));
            let _ = ready_tx.send((proxy.addr, proxy.admin));
            let _ = kill_rx.recv();
            rt.shutdown_background();
            drop(proxy);
        });
        let (addr, admin) = ready_rx.await.expect("the instance's runtime did not start");
        Instance { addr, admin, kill: Some(kill_tx), thread: Some(thread) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Drops every task of the instance at once.
    pub fn kill(&mut self) {
        if let Some(tx) = self.kill.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Anything with a public base URL: a [`Proxy`] or an [`Instance`].
pub trait Base {
    fn base(&self) -> String;
}

impl Base for Proxy {
    fn base(&self) -> String {
        self.url("")
    }
}

impl Base for Instance {
    fn base(&self) -> String {
        self.url("")
    }
}

/// `GET {base}{url}` with `accept: text/event-stream` and an optional
/// Last-Event-ID; 10 s for the response head.
pub async fn get(base: &impl Base, url: &str, last_event_id: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("{}{url}", base.base())).header("accept", SSE);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    tokio::time::timeout(Duration::from_secs(10), req.send()).await.expect("no response head").expect("GET failed")
}

/// GET the stream and read it to the end; asserts 200.
pub async fn get_all(base: &impl Base, url: &str, last_event_id: Option<&str>) -> Vec<Ev> {
    let resp = get(base, url, last_event_id).await;
    assert_eq!(resp.status(), 200, "GET {url} on {} (Last-Event-ID {last_event_id:?})", base.base());
    assert_eq!(resp.headers()["content-type"], "text/event-stream; charset=utf-8");
    parse_sse(&body_text(resp).await)
}

/// `DELETE {base}{url}`; the status.
pub async fn delete(base: &impl Base, url: &str) -> u16 {
    let req = client().delete(format!("{}{url}", base.base())).send();
    tokio::time::timeout(Duration::from_secs(10), req)
        .await
        .expect("DELETE hung")
        .expect("DELETE failed")
        .status()
        .as_u16()
}

/// `GET /readyz` on an admin address; the status (a hang counts as 0).
pub async fn readyz(admin: SocketAddr) -> u16 {
    let req = client().get(format!("http://{admin}/readyz")).send();
    match tokio::time::timeout(Duration::from_secs(10), req).await {
        Ok(Ok(resp)) => resp.status().as_u16(),
        _ => 0,
    }
}

/// Polls /readyz until it answers `want`, failing after `within`.
pub async fn wait_ready(admin: SocketAddr, want: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = readyz(admin).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz answered {got}, never {want} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An SSE upstream body of `n` events `data: e1` … `data: eN`, one per chunk.
pub fn sse_chunks(n: usize) -> Vec<Vec<u8>> {
    (1..=n).map(|i| format!("data: e{i}\n\n").into_bytes()).collect()
}

pub fn reply_sse(chunks: &[Vec<u8>]) -> crate::support::Reply {
    let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
    crate::support::Reply::chunks(SSE, &refs)
}

pub fn ids(evs: &[Ev]) -> Vec<u64> {
    evs.iter().map(|e| e.id.as_deref().expect("event without id").parse().expect("id is not a number")).collect()
}

pub fn datas(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.data.clone()).collect()
}

/// Checks that `ev` is the `end` event with `reason`.
pub fn assert_end(ev: &Ev, reason: &str) {
    assert_eq!(ev.event.as_deref(), Some("end"), "not an end event: {ev:?}");
    let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(v, serde_json::json!({ "reason": reason }), "end data: {}", ev.data);
}

/// The `error.type` of an `error` event.
pub fn error_event_type(ev: &Ev) -> String {
    assert_eq!(ev.event.as_deref(), Some("error"), "not an error event: {ev:?}");
    error_type(&ev.data)
}
