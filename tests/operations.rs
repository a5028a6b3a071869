//! Operational promises: the connection bound, JSON logs, the repository's
//! own config.toml, and an https upstream whose TLS fails.

mod support;

use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use support::{client, error_type, Proxy, Reply, Upstream};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_ssegate");

async fn get_raw(stream: &mut TcpStream, path: &str) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
}

#[tokio::test]
async fn connections_over_max_connections_wait_until_one_closes() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.limits.max_connections = 1;
    let proxy = Proxy::start(config).await;

    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    get_raw(&mut first, "/v1/a").await;
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "first connection is served");

    // The second connection is accepted by the kernel but not served while
    // the first (keep-alive) connection holds the only slot.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    get_raw(&mut second, "/v1/b").await;
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(waited.is_err(), "the second connection was served while the first held the only slot");

    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf)).await.expect("served").unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "second served once the first closed");
    assert_eq!(upstream.count(), 2);
}

#[tokio::test]
async fn https_upstream_whose_tls_fails_is_502() {
    // A plain-HTTP server behind an https:// route: the TLS handshake fails.
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.routes[0].upstream = format!("https://{}", upstream.addr);
    let proxy = Proxy::start(config).await;
    let resp = client().post(proxy.url("/v1/chat")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_type(&resp.text().await.unwrap()), "upstream_unavailable");
}

#[tokio::test]
async fn the_repository_config_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = tokio::process::Command::new(BIN).args(["check", "--config", path]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

#[tokio::test]
async fn log_format_json_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Every line is JSON; the listening one comes after any warnings (an
    // open-files limit below what `max_connections` needs).
    let mut seen = Vec::new();
    let json =
        |line: &str| -> serde_json::Value { serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")) };
    let line = support::line_matching(&mut lines, &mut seen, |l| json(l)["level"] != "WARN").await;
    let v = json(&line);
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["fields"]["message"], "ssegate listening", "{line}");
    assert!(v["fields"]["listen"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{line}");
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().unwrap().to_string()]).status();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exit").unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn one_json_log_line_per_finished_stream_with_its_figures() {
    let upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"]))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
            upstream.addr
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let next_json = |line: String| -> serde_json::Value {
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
    };
    let mut seen = Vec::new();
    let listening = support::line_matching(&mut lines, &mut seen, |l| l.contains("ssegate listening")).await;
    let listen = support::listening_addr(&listening);

    let resp =
        client().get(format!("http://{listen}/v1/chat")).header("accept", "text/event-stream").send().await.unwrap();
    assert!(resp.text().await.unwrap().contains("[DONE]"));

    let finished = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("stderr closed");
            let v = next_json(line);
            if v["fields"]["message"] == "stream finished" {
                return v;
            }
        }
    })
    .await
    .expect("no `stream finished` line");
    let f = &finished["fields"];
    assert_eq!(finished["level"], "INFO", "{finished}");
    assert_eq!(f["route"], "/v1", "{finished}");
    assert_eq!(f["outcome"], "complete", "{finished}");
    assert_eq!(f["events"], 3, "{finished}");
    assert!(f["bytes"].as_u64().is_some_and(|b| b > 30), "{finished}");
    assert!(f["duration_ms"].as_f64().is_some(), "{finished}");
    assert!(f["first_event_ms"].as_f64().is_some(), "{finished}");
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().unwrap().to_string()]).status();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exit").unwrap();
    assert!(status.success());
}
