//! A handoff token never appears in a log line (even at trace level) or in
//! /metrics. CONTRACT.md "Handoff" item 2.
//!
//! The proxy runs on its own thread, in a current-thread runtime, under a
//! trace-level fmt subscriber that writes into a buffer; the test's client
//! runs elsewhere, so that only the proxy's own logs are captured.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handoff_support::{create, metrics_text, raw_exchange};
use support::*;
use tracing_subscriber::fmt::format::FmtSpan;

/// A `MakeWriter` target: every log line lands in the shared buffer.
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the logged proxy listens.
struct Addrs {
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Addrs {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Starts the proxy (and the fake upstream) on a thread of its own whose
/// logs go into `logs` at TRACE level; returns its addresses and a stop.
fn start_logged_proxy(
    logs: Arc<Mutex<Vec<u8>>>,
) -> (Addrs, std::thread::JoinHandle<()>, tokio::sync::oneshot::Sender<()>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let capture = Capture(logs);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_writer(move || capture.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let up = Upstream::start(|s| {
                if s.uri.path().ends_with("/slow") {
                    Reply::chunks("text/event-stream", &[b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"])
                        .paced(Duration::from_millis(300))
                        .ending(End::Hang)
                } else {
                    Reply::chunks("text/event-stream", &[b"data: a\n\n", b"data: b\n\n"])
                }
            })
            .await;
            let mut proxy = Proxy::start(config(up.addr)).await;
            ready_tx.send(Addrs { addr: proxy.addr, admin: proxy.admin }).unwrap();
            let _ = stop_rx.await;
            proxy.shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut proxy.task).await;
        });
    });
    let proxy = ready_rx.recv_timeout(Duration::from_secs(10)).expect("proxy thread did not start");
    (proxy, thread, stop_tx)
}

#[tokio::test]
async fn tokens_never_appear_in_logs_or_metrics() {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (proxy, thread, stop) = start_logged_proxy(logs.clone());
    let mut tokens = Vec::new();

    // HTTP/1.1, raw: POST, GET to the end, a resume, a 204, a DELETE.
    let post =
        raw_exchange(proxy.addr, "POST", "/handoff/v1/chat?x=1", &[("content-type", "application/json")], b"{}").await;
    assert_eq!(post.status, 201, "{}", post.text());
    let created = handoff_support::parse_created(&post.text());
    let get = raw_exchange(proxy.addr, "GET", &created.stream_url, &[("accept", "text/event-stream")], b"").await;
    assert_eq!(get.status, 200);
    assert_eq!(parse_sse(&get.text()).len(), 3);
    let resume = raw_exchange(proxy.addr, "GET", &created.stream_url, &[("last-event-id", "1")], b"").await;
    assert_eq!(parse_sse(&resume.text()).len(), 2);
    let done = raw_exchange(proxy.addr, "GET", &created.stream_url, &[("last-event-id", "3")], b"").await;
    assert_eq!(done.status, 204);
    let del = raw_exchange(proxy.addr, "DELETE", &created.stream_url, &[], b"").await;
    assert_eq!(del.status, 204);
    tokens.push(created.token);

    // A DELETE of a running stream, with a client attached (reqwest, h2c
    // prior knowledge, so the h2 code paths log too).
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let created = create(&h2, &proxy.url(""), "/v1/slow", "{}").await;
    let resp = h2.get(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut reader = BodyReader::new(resp);
    reader.until("data: a\n\n").await;
    assert_eq!(h2.delete(proxy.url(&created.stream_url)).send().await.unwrap().status(), 204);
    let rest = reader.rest().await;
    assert!(rest.contains("cancelled"), "{rest:?}");
    tokens.push(created.token);

    // An unused token, and refusals that name a token.
    let unused = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    tokens.push(unused.token.clone());
    let wrong = format!("{}x", unused.token);
    let r = raw_exchange(proxy.addr, "GET", &format!("/stream/{wrong}"), &[], b"").await;
    assert_eq!(r.status, 404);
    let r = raw_exchange(proxy.addr, "DELETE", &format!("/stream/{wrong}"), &[], b"").await;
    assert_eq!(r.status, 404);
    let r = raw_exchange(proxy.addr, "PUT", &format!("/stream/{}", unused.token), &[], b"").await;
    assert!(r.status >= 400);
    let r = raw_exchange(proxy.addr, "GET", &format!("/stream/{}/more", unused.token), &[], b"").await;
    assert!(r.status >= 400);

    let metrics = metrics_text(proxy.admin).await;
    let _ = stop.send(());
    tokio::task::spawn_blocking(move || thread.join()).await.unwrap().expect("proxy thread panicked");

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!logs.trim().is_empty(), "nothing was logged: the capture does not work");
    assert!(logs.contains("ssegate"), "the proxy's own log lines were not captured:\n{logs}");
    assert!(logs.lines().count() > 10, "too few log lines to mean anything:\n{logs}");
    if std::env::var_os("HANDOFF_LOGS_DUMP").is_some() {
        eprintln!("{logs}");
    }
    for t in &tokens {
        for needle in [t.as_str(), &t[..12]] {
            assert!(!metrics.contains(needle), "token {t} appears in /metrics");
            if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
                panic!("token {t} appears in a log line:\n{line}");
            }
        }
    }
}
