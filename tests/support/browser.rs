//! A real browser for tests: Debian's `chromedriver` driving headless
//! Debian Chromium over WebDriver (the `fantoccini` crate), a tiny HTTP
//! server for the test page, and a TCP relay between the browser and the
//! proxy that the test can cut.
//!
//! Everything listens on 127.0.0.1 only.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// One browser at a time: Chromium is heavy on a 2-core machine, and the
/// tests' timing margins are sized for a machine that is not also starting
/// other browsers.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `chromedriver` child process; dropping it ends the browser session if
/// it is still open, kills chromedriver and anything left of its Chromium.
struct Driver {
    child: Child,
    port: u16,
    log: PathBuf,
    /// Chromium's `--user-data-dir`, made for this browser alone.
    profile: PathBuf,
    /// The WebDriver session while it is open.
    session: Option<String>,
}

impl Driver {
    fn spawn(dir: &Path, profile: &Path) -> Driver {
        let port = free_port();
        let log = dir.join("chromedriver.log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {CHROMEDRIVER}: {e}; run scripts/test.sh, which installs it"));
        Driver { child, port, log, profile: profile.to_path_buf(), session: None }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until `GET /status` says ready. `Err` if chromedriver exited
    /// (its port was taken, say) or did not answer within 10 s.
    async fn ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("chromedriver exited with {status}:\n{}", self.log_tail()));
            }
            if let Ok(resp) = http.get(format!("{}/status", self.url())).send().await {
                if let Ok(text) = resp.text().await {
                    let v: Value = serde_json::from_str(&text).unwrap_or_default();
                    if v["value"]["ready"] == json!(true) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "chromedriver did not answer on port {} within 10 s:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A test that panicked never ran `Browser::close`: ask chromedriver
        // to end the session, which quits Chromium.
        if let Some(session) = self.session.take() {
            delete_session(self.port, &session);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium runs in a process group of its own; whatever of it is left
        // names our fresh profile directory on its command line.
        kill_processes_naming(&self.profile);
    }
}

/// `DELETE /session/{id}` over a plain blocking socket (this runs in
/// `Drop`, maybe while a panic unwinds the runtime).
fn delete_session(port: u16, session: &str) {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if conn.write_all(request.as_bytes()).is_err() {
        return;
    }
    // chromedriver answers once Chromium has quit; the head is enough.
    let (mut seen, mut buf) = (Vec::new(), [0u8; 1024]);
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Kills (by pid) every process whose command line contains `path`.
fn kill_processes_naming(path: &Path) {
    let needle = path.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).stderr(Stdio::null()).status();
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Headless Chromium under a WebDriver session. Fails the test (it never
/// skips) when Chromium or chromedriver is not installed.
pub struct Browser {
    pub client: fantoccini::Client,
    // Field order: the session before the driver, the driver before the profile.
    driver: Driver,
    dir: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the browser tests need Debian's chromium and chromium-driver; \
                 run scripts/test.sh, which installs them with apt-get"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("profile");
        std::fs::create_dir(&profile).unwrap();
        // A port picked free can be taken before chromedriver binds it: try again.
        let mut tries = 0;
        let mut driver = loop {
            let mut driver = Driver::spawn(dir.path(), &profile);
            match driver.ready().await {
                Ok(()) => break driver,
                Err(e) if tries < 2 => {
                    eprintln!("retrying chromedriver: {e}");
                    tries += 1;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let Value::Object(caps) = caps else { unreachable!() };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = fantoccini::ClientBuilder::new(connector);
        builder.capabilities(caps);
        let url = driver.url();
        let session = builder.connect(&url);
        let client = match tokio::time::timeout(Duration::from_secs(30), session).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("chromedriver could not start Chromium: {e}\n{}", driver.log_tail()),
            Err(_) => panic!("Chromium did not start within 30 s\n{}", driver.log_tail()),
        };
        driver.session = client.session_id().await.ok().flatten();
        Browser { client, driver, dir }
    }

    /// Opens `url` in the browser's tab.
    pub async fn goto(&self, url: &str) {
        tokio::time::timeout(Duration::from_secs(10), self.client.goto(url))
            .await
            .unwrap_or_else(|_| panic!("loading {url} took over 10 s"))
            .unwrap_or_else(|e| panic!("loading {url} failed: {e}"));
    }

    /// The page's log: the text of every `#log li`, each parsed as JSON.
    pub async fn lines(&self) -> Vec<Value> {
        let script = "return Array.from(document.querySelectorAll('#log li')).map(li => li.textContent);";
        let v = tokio::time::timeout(Duration::from_secs(10), self.client.execute(script, vec![]))
            .await
            .expect("reading the DOM took over 10 s")
            .expect("reading the DOM failed");
        v.as_array()
            .expect("the DOM read is not an array")
            .iter()
            .map(|t| serde_json::from_str(t.as_str().expect("a line is not text")).expect("a line is not JSON"))
            .collect()
    }

    /// Polls the page's log until `done` holds, failing after `within`
    /// with the lines seen so far.
    pub async fn wait_lines(&self, what: &str, within: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.lines().await;
            if done(&lines) {
                return lines;
            }
            if Instant::now() > deadline {
                panic!("timed out after {within:?} waiting for {what}; the page shows:\n{}", show(&lines));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Ends the WebDriver session (Chromium quits), then chromedriver.
    pub async fn close(self) {
        let Browser { client, mut driver, dir } = self;
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(10), client.close()).await {
            driver.session = None;
        }
        drop(driver);
        drop(dir);
    }
}

/// The lines of a page log, one per line, for failure messages.
pub fn show(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// Serves one HTML page at `/` (any query); everything else is 404.
pub struct PageServer {
    pub addr: SocketAddr,
}

impl PageServer {
    pub async fn start(html: &'static str) -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| async move {
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        if req.uri().path() == "/" {
                            *resp.body_mut() = Full::new(Bytes::from_static(html.as_bytes()));
                            resp.headers_mut().insert("content-type", "text/html; charset=utf-8".parse().unwrap());
                            resp.headers_mut().insert("cache-control", "no-store".parse().unwrap());
                        } else {
                            *resp.status_mut() = StatusCode::NOT_FOUND;
                        }
                        Ok::<_, Infallible>(resp)
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        PageServer { addr }
    }

    /// `http://127.0.0.1:PORT`, the page's origin.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What clients sent through a relay, one buffer per connection.
type Sent = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP relay from its own port to `target` that the test can cut: every
/// connection open at the cut is closed on both sides at once; later
/// connections are relayed as usual. It keeps what the client sent on each
/// connection, so a test can read the requests the browser made.
pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    /// Client→target bytes, one buffer per connection, in accept order.
    sent: Sent,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let open = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (cut2, open2, sent2) = (cut.clone(), open.clone(), sent.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut stop = cut2.subscribe();
                let (open, sent) = (open2.clone(), sent2.clone());
                let index = {
                    let mut all = sent.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::select! {
                            _ = async { tokio::join!(pump(cr, sw, Some((sent, index))), pump(sr, cw, None)) } => {}
                            // Dropping the halves closes both sockets.
                            _ = stop.changed() => {}
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Relay { addr, cut, open, sent }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection open now, both sides; returns how many.
    pub fn cut(&self) -> usize {
        let n = self.open.load(Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
        n
    }

    /// The heads of the requests sent through the relay whose request line
    /// starts with `prefix` (e.g. `"GET /stream/"`), connection by
    /// connection in accept order, each connection's in the order sent.
    pub fn request_heads(&self, prefix: &str) -> Vec<String> {
        let all = self.sent.lock().unwrap();
        let mut heads = Vec::new();
        for conn in all.iter() {
            let mut rest = &conn[..];
            // HTTP/1.1 requests one after another; bodies have a content-length.
            while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&rest[..end]).into_owned();
                let body = head_header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
                rest = &rest[(end + 4 + body).min(rest.len())..];
                if head.starts_with(prefix) {
                    heads.push(head);
                }
            }
        }
        heads
    }
}

/// The value of header `name` in a request head, if present.
pub fn head_header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, keep: Option<(Sent, usize)>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((sent, index)) = &keep {
            sent.lock().unwrap()[*index].extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
