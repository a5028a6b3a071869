//! Helpers for the handoff tests (tests/handoff*.rs): the POST that issues a
//! token, a raw HTTP/1.1 exchange for exact bytes, and /metrics look-ups.
//! Included with `#[path = "support/handoff.rs"] mod handoff_support;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a handoff POST answered.
#[derive(Debug, Clone)]
pub struct Created {
    pub token: String,
    pub stream_url: String,
    pub expires_in: u64,
}

/// `POST {prefix}{path}` with a JSON body; asserts 201 and returns the token.
pub async fn create(client: &reqwest::Client, base: &str, path: &str, body: &str) -> Created {
    let resp = client
        .post(format!("{base}/handoff{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("handoff POST failed");
    assert_eq!(resp.status(), 201, "handoff POST answered {}", resp.status());
    let text = resp.text().await.unwrap();
    parse_created(&text)
}

/// Parses and checks the 201 body `{"token","stream_url","expires_in"}`.
pub fn parse_created(text: &str) -> Created {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("201 body is not JSON ({e}): {text}"));
    let token = v["token"].as_str().unwrap_or_else(|| panic!("no token in {text}")).to_string();
    let stream_url = v["stream_url"].as_str().unwrap_or_else(|| panic!("no stream_url in {text}")).to_string();
    let expires_in = v["expires_in"].as_u64().unwrap_or_else(|| panic!("no integer expires_in in {text}"));
    Created { token, stream_url, expires_in }
}

/// The admin listener's /metrics text.
pub async fn metrics_text(admin: SocketAddr) -> String {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("/metrics failed");
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// The value of one sample, `series` being the name with its labels as the
/// exposition writes them (e.g. `ssegate_streams_cancelled_total{reason="delete"}`);
/// 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Polls /metrics until `series` reaches `at_least`, failing after 10 s.
pub async fn wait_metric(admin: SocketAddr, series: &str, at_least: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics_text(admin).await;
        if metric(&text, series) >= at_least {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{series} never reached {at_least}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A whole HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines as sent, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("body is not UTF-8")
    }
}

/// Sends one request with `Connection: close` on a new connection and reads
/// the whole response (10 s at most).
pub async fn raw_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("raw response did not end")
        .expect("raw read failed");
    parse_raw(&raw)
}

/// Parses a whole HTTP/1.1 response (head, then a content-length, chunked
/// or close-delimited body).
pub fn parse_raw(raw: &[u8]) -> RawResponse {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no response head") + 4;
    let head = std::str::from_utf8(&raw[..end]).expect("head is not UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("bad status line");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').expect("bad header line");
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let rest = &raw[end..];
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    RawResponse { status, headers, body }
}

/// Decodes a chunked body (the whole of it).
pub fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let size_text = std::str::from_utf8(&raw[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("bad chunk size");
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size.min(raw.len())]);
        if raw.len() < size + 2 {
            return out;
        }
        raw = &raw[size + 2..];
    }
}
