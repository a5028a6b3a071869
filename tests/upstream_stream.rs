//! The streaming upstream client (src/h1.rs) seen from a client of the
//! proxy: event-stream requests to a raw upstream socket scripted byte by
//! byte — connection reuse and its limits, every response framing
//! (chunked with extensions and trailers, length, close-delimited,
//! HTTP/1.0), interim `1xx` heads, malformed and truncated bodies, an
//! oversized head, an oversized request body, and the connect timeout
//! covering the TLS handshake.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use ssegate::config::Config;
use support::{
    client, error_type, parse_sse, read_head, read_until, streamed_body, BodyReader, Ev, Proxy, RawUpstream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n";

fn config_with(upstream: SocketAddr, edit: impl FnOnce(&mut Config)) -> Config {
    let mut c = support::config(upstream);
    edit(&mut c);
    c
}

/// Starts a POST asking for an event stream; the response arrives once the
/// test has answered upstream.
fn stream_request(proxy: &Proxy, path: &str, body: &str) -> JoinHandle<reqwest::Response> {
    let (url, body) = (proxy.url(path), body.to_string());
    tokio::spawn(async move {
        client()
            .post(url)
            .header("accept", "text/event-stream")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request to the proxy failed")
    })
}

/// The response of a request started with [`stream_request`], 10 s at most.
async fn response(request: JoinHandle<reqwest::Response>) -> reqwest::Response {
    tokio::time::timeout(Duration::from_secs(10), request).await.expect("no response within 10 s").unwrap()
}

/// The whole body of a response, 10 s at most.
async fn text(resp: reqwest::Response) -> String {
    tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("body did not end").unwrap()
}

/// Writes `bytes` upstream and returns the events the client then reads to
/// the end of the stream.
async fn answer(up: &mut TcpStream, request: JoinHandle<reqwest::Response>, bytes: &[u8]) -> Vec<Ev> {
    up.write_all(bytes).await.expect("writing upstream failed");
    parse_sse(&text(response(request).await).await)
}

/// One request as the upstream read it off the socket.
struct Wire {
    /// The request line, without CRLF.
    line: String,
    /// Header names lowercased, values as sent, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    /// Every value of header `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    /// The one value of header `name`, failing if it is absent or repeated.
    fn one(&self, name: &str) -> &str {
        match self.all(name)[..] {
            [v] => v,
            ref vs => panic!("expected one {name} header, got {vs:?} in {:?}", self.headers),
        }
    }
}

/// Reads one request (head, then a `content-length` body) from a raw
/// upstream socket, checking that nothing follows it.
async fn read_request(up: &mut TcpStream) -> Wire {
    let (head, mut rest) = read_head(up).await;
    let mut lines = head.trim_end_matches("\r\n").split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("bad header line {l:?} in {head:?}"));
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse::<usize>().unwrap_or_else(|_| panic!("bad content-length in {head:?}")));
    tokio::time::timeout(Duration::from_secs(10), async {
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = up.read(&mut chunk).await.expect("read failed");
            assert!(n > 0, "EOF inside the request body; got {:?}", String::from_utf8_lossy(&rest));
            rest.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("request body did not arrive");
    assert_eq!(rest.len(), len, "bytes after the request body: {:?}", String::from_utf8_lossy(&rest));
    Wire { line, headers, body: rest }
}

/// Waits until the proxy closes a raw upstream connection (10 s at most),
/// failing if it sends anything first.
async fn assert_closed(up: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), up.read(&mut buf))
        .await
        .expect("the proxy kept the upstream connection open");
    if let Ok(n) = read {
        assert_eq!(n, 0, "unexpected bytes from the proxy: {:?}", String::from_utf8_lossy(&buf[..n]));
    }
}

fn datas(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.data.as_str()).collect()
}

fn names(events: &[Ev]) -> Vec<Option<&str>> {
    events.iter().map(|e| e.event.as_deref()).collect()
}

/// The `error.type` of an `error` event, checking its shape.
fn error_event(ev: &Ev) -> String {
    assert_eq!(ev.event.as_deref(), Some("error"), "{ev:?}");
    error_type(&ev.data)
}

/// A stream request through `proxy`, the upstream connection it came on,
/// and the request as the upstream read it.
async fn sent(
    upstream: &mut RawUpstream,
    proxy: &Proxy,
    path: &str,
    body: &str,
) -> (JoinHandle<reqwest::Response>, TcpStream, Wire) {
    let request = stream_request(proxy, path, body);
    let mut up = upstream.accept().await;
    let wire = read_request(&mut up).await;
    (request, up, wire)
}

/// The test config with one worker thread: each worker keeps its own pool
/// of upstream connections, and these tests say which connection a request
/// goes on, so all of a test's client connections share one pool.
fn one_worker(upstream: std::net::SocketAddr) -> ssegate::config::Config {
    let mut config = support::config(upstream);
    config.server.workers = 1;
    config
}

/// A 200 event-stream response with a `content-length` body.
fn length_response(body: &str) -> Vec<u8> {
    let mut out = SSE_HEAD.to_vec();
    out.extend_from_slice(format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes());
    out
}

#[tokio::test]
async fn two_streams_in_a_row_reuse_one_upstream_connection() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;
    let host = format!("127.0.0.1:{}", upstream.addr.port());

    let body = r#"{"prompt":"one"}"#;
    let (request, mut up, first) = sent(&mut upstream, &proxy, "/v1/chat/completions?x=1", body).await;
    assert_eq!(first.line, "POST /v1/chat/completions?x=1 HTTP/1.1");
    assert_eq!(first.one("host"), host);
    assert_eq!(first.one("content-length"), body.len().to_string());
    assert_eq!(first.body, body.as_bytes());
    assert_eq!(first.one("accept"), "text/event-stream");
    assert_eq!(first.one("content-type"), "application/json");
    assert_eq!(first.one("accept-encoding"), "identity");
    assert_eq!(first.one("x-forwarded-for"), "127.0.0.1");
    assert!(first.all("transfer-encoding").is_empty(), "{:?}", first.headers);
    assert!(first.all("connection").is_empty(), "{:?}", first.headers);
    up.write_all(&length_response("data: a\n\ndata: b\n\n")).await.unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let events = parse_sse(&text(resp).await);
    assert_eq!(datas(&events), ["a", "b"]);

    // The second request comes on the same socket: reading it from there
    // is the proof that the proxy opened no second connection.
    let body = r#"{"prompt":"second, longer"}"#;
    let request = stream_request(&proxy, "/v1/completions", body);
    let second = read_request(&mut up).await;
    assert_eq!(second.line, "POST /v1/completions HTTP/1.1");
    assert_eq!(second.one("host"), host);
    assert_eq!(second.one("content-length"), body.len().to_string());
    assert_eq!(second.body, body.as_bytes());
    up.write_all(&length_response("data: c\n\n")).await.unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let events = parse_sse(&text(resp).await);
    assert_eq!(datas(&events), ["c"]);
    assert_eq!(names(&events), [None]);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_reused() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    let events = answer(&mut up, request, &length_response("data: a\n\n")).await;
    assert_eq!(datas(&events), ["a"]);

    // The upstream closes the idle connection (as servers do after their
    // keep-alive timeout). A POST is not retried, so a reuse would fail.
    drop(up);

    let (request, mut up, second) = sent(&mut upstream, &proxy, "/v1/chat", r#"{"n":2}"#).await;
    assert_eq!(second.line, "POST /v1/chat HTTP/1.1");
    assert_eq!(second.body, br#"{"n":2}"#);
    up.write_all(&length_response("data: b\n\ndata: c\n\n")).await.unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let events = parse_sse(&text(resp).await);
    assert_eq!(datas(&events), ["b", "c"]);
    assert!(events.iter().all(|e| e.event.is_none()), "{events:?}");
}

#[tokio::test]
async fn chunked_responses_with_extensions_and_trailers_arrive_whole_and_the_connection_is_reused() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    up.write_all(&[SSE_HEAD, b"transfer-encoding: chunked\r\ntrailer: x-usage\r\n\r\n"].concat()).await.unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut reader = BodyReader::new(resp);
    // An event cut across chunks, sizes with extensions (quoted, bare,
    // after whitespace), upper-case hex.
    up.write_all(b"5;x=y\r\ndata:\r\n4;name=\"v;1\"\r\n one\r\n2 ;ext\r\n\n\n\r\n").await.unwrap();
    let mut got = reader.until("one\n\n").await;
    let big = format!("data: {}\n\n", "x".repeat(300));
    up.write_all(format!("{:X};a=b;c\r\n{big}\r\n", big.len()).as_bytes()).await.unwrap();
    got.push_str(&reader.until(&big).await);
    up.write_all(b"c\r\ndata: last\n\n\r\n0;final=1\r\nx-usage: 42\r\nx-other: y\r\n\r\n").await.unwrap();
    got.push_str(&reader.rest().await);
    let events = parse_sse(&got);
    assert_eq!(datas(&events), ["one", &big["data: ".len()..big.len() - 2], "last"]);
    assert!(events.iter().all(|e| e.event.is_none()), "{events:?}");

    // The trailer section was read to its end: the next stream reuses the socket.
    let request = stream_request(&proxy, "/v1/next", "{}");
    let second = read_request(&mut up).await;
    assert_eq!(second.line, "POST /v1/next HTTP/1.1");
    up.write_all(&[SSE_HEAD, b"transfer-encoding: chunked\r\n\r\n9\r\ndata: z\n\n\r\n0\r\n\r\n"].concat())
        .await
        .unwrap();
    let events = parse_sse(&text(response(request).await).await);
    assert_eq!(datas(&events), ["z"]);
}

/// Answers a stream with a close-delimited body in `version`, then closes;
/// returns the events the client got.
async fn close_delimited(upstream: &mut RawUpstream, proxy: &Proxy, version: &str) -> Vec<Ev> {
    let request = stream_request(proxy, "/v1/chat", "{}");
    let mut up = upstream.accept().await;
    read_request(&mut up).await;
    up.write_all(format!("{version} 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: a\n\n").as_bytes())
        .await
        .unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK, "{version}");
    let mut reader = BodyReader::new(resp);
    let mut got = reader.until("a\n\n").await;
    up.write_all(b"event: delta\ndata: b\n\ndata: c\n\n").await.unwrap();
    drop(up);
    got.push_str(&reader.rest().await);
    parse_sse(&got)
}

#[tokio::test]
async fn close_delimited_responses_end_the_stream_normally() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let events = close_delimited(&mut upstream, &proxy, version).await;
        assert_eq!(datas(&events), ["a", "b", "c"], "{version}: {events:?}");
        assert_eq!(names(&events), [None, Some("delta"), None], "{version}: {events:?}");
    }

    // A closed connection is never pooled: the next stream connects anew
    // (accept() fails if it does not) and works.
    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    let events = answer(&mut up, request, &length_response("data: d\n\n")).await;
    assert_eq!(datas(&events), ["d"]);
}

#[tokio::test]
async fn a_malformed_chunk_size_mid_stream_is_an_upstream_reset_error_event() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    up.write_all(&[SSE_HEAD, b"transfer-encoding: chunked\r\n\r\n12\r\ndata: a\n\ndata: b\n\n\r\n"].concat())
        .await
        .unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut reader = BodyReader::new(resp);
    let mut got = reader.until("b\n\n").await;
    up.write_all(b"zz\r\ndata: never\n\n\r\n0\r\n\r\n").await.unwrap();
    got.push_str(&reader.rest().await);
    let events = parse_sse(&got);
    assert_eq!(datas(&events[..2]), ["a", "b"], "{events:?}");
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(error_event(&events[2]), "upstream_reset");
    let ids: Vec<_> = events.iter().map(|e| e.id.as_deref()).collect();
    assert_eq!(ids, [Some("1"), Some("2"), Some("3")]);
    // The broken connection is dropped, not pooled.
    assert_closed(&mut up).await;
}

#[tokio::test]
async fn a_content_length_body_cut_short_is_an_upstream_reset_error_event() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    up.write_all(&[SSE_HEAD, b"content-length: 100\r\n\r\ndata: a\n\n"].concat()).await.unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut reader = BodyReader::new(resp);
    let mut got = reader.until("a\n\n").await;
    drop(up);
    got.push_str(&reader.rest().await);
    let events = parse_sse(&got);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].data, "a");
    assert_eq!(error_event(&events[1]), "upstream_reset");
}

#[tokio::test]
async fn interim_1xx_heads_before_the_final_head_are_skipped() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    up.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
    up.write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n").await.unwrap();
    up.write_all(&length_response("data: a\n\ndata: b\n\n")).await.unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("link").is_none(), "an interim head's header leaked: {:?}", resp.headers());
    let events = parse_sse(&text(resp).await);
    assert_eq!(datas(&events), ["a", "b"]);
    assert!(events.iter().all(|e| e.event.is_none()), "{events:?}");

    // Both in one write, and the connection is still good for the next stream.
    let request = stream_request(&proxy, "/v1/chat", "{}");
    read_request(&mut up).await;
    let events =
        answer(&mut up, request, &[&b"HTTP/1.1 100 Continue\r\n\r\n"[..], &length_response("data: c\n\n")].concat())
            .await;
    assert_eq!(datas(&events), ["c"]);
}

#[tokio::test]
async fn a_response_head_over_64_kib_is_502_upstream_unavailable() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    // Under the bound (60 KiB of headers) the stream works.
    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    let under = format!("x-big: {}\r\n", "a".repeat(60 * 1024));
    up.write_all(&[SSE_HEAD, under.as_bytes(), b"content-length: 9\r\n\r\ndata: a\n\n"].concat()).await.unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(datas(&parse_sse(&text(resp).await)), ["a"]);

    // Over it, with the head still unfinished: 502, and the connection closed.
    let request = stream_request(&proxy, "/v1/chat", "{}");
    read_request(&mut up).await;
    let over = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    // The proxy may stop reading and close mid-write.
    let _ = up.write_all(&[SSE_HEAD, over.as_bytes()].concat()).await;
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_type(&text(resp).await), "upstream_unavailable");
    assert_closed(&mut up).await;
}

#[tokio::test]
async fn a_stream_request_body_over_max_body_is_413_and_never_sent_upstream() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(config_with(upstream.addr, |c| c.limits.max_body = 1000)).await;
    let c = client();

    // With a content-length over the limit.
    let resp = c
        .post(proxy.url("/v1/chat"))
        .header("accept", "text/event-stream")
        .body(vec![b'a'; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_type(&text(resp).await), "payload_too_large");

    // Without one (chunked): the limit is found while the body is read.
    let (tx, body) = streamed_body();
    let url = proxy.url("/v1/chat");
    let request =
        tokio::spawn(async move { client().post(url).header("accept", "text/event-stream").body(body).send().await });
    // The proxy may stop reading (and reqwest drop the body) before the second piece.
    let _ = tx.send(bytes::Bytes::from(vec![b'b'; 600])).await;
    let _ = tx.send(bytes::Bytes::from(vec![b'b'; 600])).await;
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("no response within 10 s")
        .unwrap()
        .expect("request failed");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_type(&text(resp).await), "payload_too_large");

    // Exactly the limit, chunked, goes through, and it is the first request
    // the upstream sees, on its first connection: read whole, sent with a
    // content-length.
    let (tx, body) = streamed_body();
    let url = proxy.url("/v1/ok");
    let request = tokio::spawn(async move {
        client().post(url).header("accept", "text/event-stream").body(body).send().await.expect("request failed")
    });
    tx.send(bytes::Bytes::from(vec![b'c'; 600])).await.unwrap();
    tx.send(bytes::Bytes::from(vec![b'd'; 400])).await.unwrap();
    drop(tx);
    let mut up = upstream.accept().await;
    let first = read_request(&mut up).await;
    assert_eq!(first.line, "POST /v1/ok HTTP/1.1");
    assert_eq!(first.one("content-length"), "1000");
    assert!(first.all("transfer-encoding").is_empty(), "{:?}", first.headers);
    assert_eq!(first.body, [vec![b'c'; 600], vec![b'd'; 400]].concat());
    let events = answer(&mut up, request, &length_response("data: ok\n\n")).await;
    assert_eq!(datas(&events), ["ok"]);
}

#[tokio::test]
async fn a_response_with_connection_close_is_not_pooled() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    // The upstream says it will close, but leaves the socket open.
    let events =
        answer(&mut up, request, &[SSE_HEAD, b"connection: close\r\ncontent-length: 9\r\n\r\ndata: a\n\n"].concat())
            .await;
    assert_eq!(datas(&events), ["a"]);
    // The proxy closes it, and the next stream connects anew.
    assert_closed(&mut up).await;
    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    let events = answer(&mut up, request, &length_response("data: b\n\n")).await;
    assert_eq!(datas(&events), ["b"]);
}

#[tokio::test]
async fn a_stream_the_client_leaves_mid_body_closes_its_upstream_connection() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    up.write_all(&[SSE_HEAD, b"transfer-encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n"].concat()).await.unwrap();
    let mut reader = BodyReader::new(response(request).await);
    reader.until("a\n\n").await;
    drop(reader);
    // Half a response is never pooled: the proxy closes the socket.
    assert_closed(&mut up).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    let events = answer(&mut up, request, &length_response("data: b\n\n")).await;
    assert_eq!(datas(&events), ["b"]);
}

#[tokio::test]
async fn connect_timeout_covers_the_tls_handshake() {
    // Accepts TCP and never speaks: the TLS handshake hangs.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connect_timeout = Duration::from_millis(300);
    let mut config = config_with(addr, |c| {
        c.limits.connect_timeout = connect_timeout;
        c.limits.first_byte_timeout = Duration::from_secs(30);
    });
    config.routes[0].upstream = format!("https://{addr}");
    let proxy = Proxy::start(config).await;

    let started = Instant::now();
    let request = stream_request(&proxy, "/v1/chat", "{}");
    let (mut silent, _) =
        tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.expect("no connection").unwrap();
    // The ClientHello arrives: the proxy is in the handshake.
    let mut hello = Vec::new();
    read_until(&mut silent, &mut hello, b"\x16\x03").await;
    let resp = response(request).await;
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_type(&text(resp).await), "upstream_unavailable");
    assert!(took >= connect_timeout && took < Duration::from_secs(5), "{took:?}");
    // The socket was held open the whole time: the timeout, not an EOF, ended it.
    drop(silent);
}

#[tokio::test]
async fn an_error_answer_read_to_its_end_leaves_the_connection_pooled() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    // A 429 to a stream request is passed through as it is, then the
    // retry comes on the same socket.
    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    let json = r#"{"error":{"type":"rate_limited","message":"slow down"}}"#;
    up.write_all(
        format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = response(request).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(text(resp).await, json);

    let request = stream_request(&proxy, "/v1/retry", "{}");
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), up.peek(&mut byte))
        .await
        .expect("no second request on the first connection")
        .unwrap_or(0);
    assert_eq!(n, 1, "the proxy closed the upstream connection after a complete 429 instead of pooling it");
    let second = read_request(&mut up).await;
    assert_eq!(second.line, "POST /v1/retry HTTP/1.1");
    let events = answer(&mut up, request, &length_response("data: a\n\n")).await;
    assert_eq!(datas(&events), ["a"]);
}

#[tokio::test]
async fn bytes_after_a_complete_response_make_its_connection_unusable() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(one_worker(upstream.addr)).await;

    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    // A whole second response nobody asked for, right behind the first.
    let smuggled = length_response("data: smuggled\n\n");
    let events = answer(&mut up, request, &[length_response("data: a\n\n"), smuggled].concat()).await;
    assert_eq!(datas(&events), ["a"]);
    assert_closed(&mut up).await;

    // The next stream gets its own answer on a new connection.
    let (request, mut up, _) = sent(&mut upstream, &proxy, "/v1/chat", "{}").await;
    let events = answer(&mut up, request, &length_response("data: b\n\n")).await;
    assert_eq!(datas(&events), ["b"]);
}

/// A burst of concurrent streams leaves up to 256 idle upstream connections
/// per worker (nginx's `keepalive 256` in benches/load/nginx.conf), and the
/// next burst goes out on them: no new connection, no handshake.
#[tokio::test]
async fn a_burst_of_256_streams_leaves_its_upstream_connections_for_the_next_burst() {
    const BURST: usize = 256;
    // Four descriptors per stream in this one process (the client's, the
    // proxy's two, the upstream's): above a shell's default 1,024.
    let files = ssegate::open_files::prepare(2 * BURST).expect("the open-files limit");
    assert!(files.limit >= files.needed, "this test needs {} open files; the limit is {}", files.needed, files.limit);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    // Every request of a burst is answered once the whole burst has arrived,
    // so the burst needs `BURST` connections at once.
    let (arrived_tx, arrived) = tokio::sync::watch::channel(0usize);
    let arrived_tx = Arc::new(arrived_tx);
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let (arrived_tx, arrived) = (arrived_tx.clone(), arrived.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let (arrived_tx, mut arrived) = (arrived_tx.clone(), arrived.clone());
                    async move {
                        let mut nth = 0;
                        arrived_tx.send_modify(|n| {
                            *n += 1;
                            nth = *n;
                        });
                        let burst_end = nth.div_ceil(BURST) * BURST;
                        let _ = arrived.wait_for(|n| *n >= burst_end).await;
                        let body = http_body_util::Full::new(bytes::Bytes::from(format!("data: {nth}\n\n")));
                        let resp = http::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(body)
                            .expect("a valid response");
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    let proxy = Proxy::start(one_worker(addr)).await;

    for burst in 0..2 {
        let requests: Vec<_> = (0..BURST).map(|_| stream_request(&proxy, "/v1/chat", "{}")).collect();
        let mut seen = Vec::with_capacity(BURST);
        for request in requests {
            let events = parse_sse(&text(response(request).await).await);
            assert_eq!(events.len(), 1, "{events:?}");
            seen.push(events[0].data.parse::<usize>().expect("a number"));
        }
        seen.sort_unstable();
        assert_eq!(seen, (burst * BURST + 1..=(burst + 1) * BURST).collect::<Vec<_>>());
    }
    assert_eq!(accepted.load(Ordering::SeqCst), BURST, "upstream connections opened");
}
