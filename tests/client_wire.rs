//! What an HTTP/1.1 client of an event stream reads off its socket, byte for
//! byte: the proxy writes these streams' chunks to the socket itself
//! (src/direct.rs), around hyper, which still writes the head and the last
//! chunk. The chunk framing must be exact, the connection must serve the
//! next request after a stream, a stream's end must come in the packet of
//! its last event when the upstream ended with it, a client reading slowly and a burst of
//! upstream chunks must get every byte in order, a client leaving, or
//! taking nothing for `limits.send_timeout`, must close the upstream
//! response, an HTTP/1.0 upstream's
//! stream must still reach an HTTP/1.1 client chunked, and HTTP/1.0 and
//! `HEAD` requests must get no chunks.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::time::Duration;

use support::{config, parse_sse, read_head, read_until, Ev, ManualUpstream, Proxy, RawUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSE: &[(&str, &str)] = &[("content-type", "text/event-stream")];

/// A proxy in front of a manual SSE upstream, and a client connection to it.
async fn start() -> (ManualUpstream, Proxy, TcpStream) {
    let up = ManualUpstream::start(200, SSE).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    (up, proxy, s)
}

/// A client connection with a receive buffer of a few KiB.
async fn small_window_client(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// An event-stream request head.
fn request(method: &str, path: &str, version: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/{version}\r\nhost: ssegate\r\naccept: text/event-stream\r\n\r\n").into_bytes()
}

fn ev(id: &str, data: &str) -> Ev {
    Ev { id: Some(id.into()), event: None, data: data.into() }
}

/// Decodes a chunked body strictly: every size line, every CRLF after a
/// chunk's data, and the last chunk must be there, with nothing after it.
/// Returns the body and the chunk sizes.
fn strict_dechunk(mut raw: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let (mut body, mut sizes) = (Vec::new(), Vec::new());
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").expect("a chunk size line without CRLF");
        let line = std::str::from_utf8(&raw[..eol]).expect("size line is not UTF-8");
        let size = usize::from_str_radix(line, 16).unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
        raw = &raw[eol + 2..];
        if size == 0 {
            assert_eq!(raw, b"\r\n", "the last chunk must end the body");
            return (body, sizes);
        }
        assert!(raw.len() >= size + 2, "chunk of {size} bytes cut short");
        body.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n", "chunk data must be followed by CRLF");
        sizes.push(size);
        raw = &raw[size + 2..];
    }
}

/// Reads one chunked response from `s` (whose head is already read, `rest`
/// being what came after it) through its last chunk, 10 s at most.
async fn read_chunked_body(s: &mut TcpStream, mut rest: Vec<u8>) -> Vec<u8> {
    read_until(s, &mut rest, b"\r\n0\r\n\r\n").await;
    rest
}

/// Asks for `path` on `s`, lets the upstream send one event `text` and end,
/// and checks the whole chunked response.
async fn one_event_stream(up: &mut ManualUpstream, s: &mut TcpStream, path: &str, text: &str) {
    s.write_all(&request("GET", path, "1.1")).await.unwrap();
    let feed = up.next().await;
    assert_eq!(feed.seen.uri.path(), path);
    feed.send(format!("data: {text}\n\n")).await;
    feed.finish();
    let (head, rest) = read_head(s).await;
    // Nothing of an earlier response came before this head.
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (body, _) = strict_dechunk(&read_chunked_body(s, rest).await);
    assert_eq!(parse_sse(std::str::from_utf8(&body).unwrap()), vec![ev("1", text)]);
}

#[tokio::test]
async fn stream_chunks_are_framed_exactly_and_the_connection_serves_the_next_request() {
    let (mut up, _proxy, mut s) = start().await;
    s.write_all(&request("GET", "/v1/first", "1.1")).await.unwrap();
    let feed = up.next().await;
    // The first event goes out with the upstream's head, so that it may be
    // ready before hyper has written the client's head.
    let texts = ["one", "two", &"x".repeat(300), "four"];
    feed.send(format!("data: {}\n\n", texts[0])).await;
    let (head, mut rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    // Then one event at a time: each is on the wire before the next is sent.
    for (i, text) in texts.iter().enumerate() {
        if i > 0 {
            feed.send(format!("data: {text}\n\n")).await;
        }
        read_until(&mut s, &mut rest, format!("id: {}\ndata: {text}\n\n", i + 1).as_bytes()).await;
    }
    feed.finish();
    let raw = read_chunked_body(&mut s, rest).await;
    let (body, sizes) = strict_dechunk(&raw);
    let want: Vec<Ev> = texts.iter().enumerate().map(|(i, t)| ev(&(i + 1).to_string(), t)).collect();
    assert_eq!(parse_sse(std::str::from_utf8(&body).unwrap()), want);
    assert_eq!(sizes.len(), texts.len(), "one chunk per event: {sizes:?}");

    // The same connection, a second stream: hyper's framing state held.
    one_event_stream(&mut up, &mut s, "/v1/second", "again").await;
}

#[tokio::test]
async fn a_client_with_a_small_receive_window_gets_every_large_event_whole_and_in_order() {
    let mut up = ManualUpstream::start(200, SSE).await;
    let proxy = Proxy::start(config(up.addr)).await;
    // The proxy's writes of 64 KiB events cannot go out at once and are
    // finished as the client reads.
    let mut s = small_window_client(proxy.addr).await;
    s.write_all(&request("GET", "/v1/big", "1.1")).await.unwrap();
    let feed = up.next().await;
    const EVENTS: usize = 48;
    let payload = |i: usize| format!("{i:04}-{}", char::from(b'a' + (i % 26) as u8).to_string().repeat(64 * 1024));
    let feeder = tokio::spawn(async move {
        for i in 0..EVENTS {
            feed.send(format!("data: {}\n\n", payload(i))).await;
        }
        feed.finish();
    });
    let mut raw = Vec::new();
    // Small reads, as a slow client makes them.
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(30), async {
        while !raw.ends_with(b"\r\n0\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the stream ended");
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("stream did not end within 30 s");
    feeder.await.unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let (body, _) = strict_dechunk(&raw[end..]);
    let events = parse_sse(std::str::from_utf8(&body).unwrap());
    assert_eq!(events.len(), EVENTS);
    for (i, got) in events.iter().enumerate() {
        assert_eq!(got.id.as_deref(), Some((i + 1).to_string().as_str()));
        assert!(got.data == payload(i), "event {i} differs (length {})", got.data.len());
    }
}

#[tokio::test]
async fn an_http_1_0_client_gets_the_events_unframed_until_the_connection_closes() {
    let (mut up, _proxy, mut s) = start().await;
    s.write_all(&request("GET", "/v1/old", "1.0")).await.unwrap();
    let feed = up.next().await;
    let (head, mut rest) = read_head(&mut s).await;
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    for text in ["one", "two"] {
        feed.send(format!("data: {text}\n\n")).await;
        read_until(&mut s, &mut rest, format!("data: {text}\n\n").as_bytes()).await;
    }
    feed.finish();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the connection stayed open after the stream")
        .unwrap();
    assert_eq!(std::str::from_utf8(&rest).unwrap(), "id: 1\ndata: one\n\nid: 2\ndata: two\n\n");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_send_timeout_and_its_upstream_closed() {
    // 1.1: the stream writes its own chunks; 1.0: hyper writes the body.
    for version in ["1.1", "1.0"] {
        let mut up = ManualUpstream::start(200, SSE).await;
        let mut cfg = config(up.addr);
        cfg.limits.send_timeout = Duration::from_millis(300);
        let proxy = Proxy::start(cfg).await;
        let mut s = small_window_client(proxy.addr).await;
        s.write_all(&request("GET", "/v1/stuck", version)).await.unwrap();
        let feed = std::sync::Arc::new(up.next().await);
        feed.send("data: first\n\n").await;
        let (head, _) = read_head(&mut s).await;
        assert!(head.starts_with(&format!("HTTP/{version} 200")), "{head}");
        // From here the client reads nothing, and the model has plenty.
        let feeder = feed.flood();
        // The proxy gives up on the client and lets go of the model's answer.
        feed.closed().await;
        assert!(feeder.await.unwrap(), "HTTP/{version}: the upstream took all 64 MiB");
        // And closes the connection: what is left to read ends without the
        // chunked body's last chunk.
        let mut rest = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("HTTP/{version}: the proxy kept the connection open"));
        assert!(!rest.ends_with(b"\r\n0\r\n\r\n"), "HTTP/{version}: the stream ended as if complete");
        // Counted as stalled: the stream the proxy wrote itself, and hyper's
        // (HTTP/1.0), whose connection's send timeout gave up.
        let series = "ssegate_streams_ended_total{route=\"/v1\",outcome=\"send_timeout\"}";
        handoff_support::wait_metric(proxy.admin, series, 1.0).await;
    }
}

/// A client that leaves while the stream's large last event goes out (the
/// upstream's body has ended by then) did not get the stream whole: it is
/// counted `client_gone`, not `complete`.
#[tokio::test]
async fn a_client_leaving_during_a_large_last_event_is_not_counted_complete() {
    let mut up = RawUpstream::start().await;
    // Three times the most a socket's send buffer grows to
    // (`net.ipv4.tcp_wmem`), so that the event cannot all be handed to the
    // kernel before the client leaves.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let size = 3 * wmem_max;
    let mut cfg = config(up.addr);
    cfg.limits.max_event_bytes = size as u64 + 1024;
    let proxy = Proxy::start(cfg).await;
    let mut s = small_window_client(proxy.addr).await;
    s.write_all(&request("GET", "/v1/last", "1.1")).await.unwrap();
    let mut upstream = up.accept().await;
    read_head(&mut upstream).await;
    // The body's length ends it in the read that completes the large event.
    let body = format!("data: first\n\ndata: {}\n\n", "y".repeat(size));
    let answer =
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let writer = tokio::spawn(async move {
        upstream.write_all(answer.as_bytes()).await.unwrap();
        upstream
    });
    // The client reads until the large event has begun, then leaves.
    read_until(&mut s, &mut Vec::new(), b"yyyy").await;
    drop(s);
    let _upstream = writer.await.unwrap();
    let series = "ssegate_streams_ended_total{route=\"/v1\",outcome=\"client_gone\"}";
    let text = handoff_support::wait_metric(proxy.admin, series, 1.0).await;
    let complete = "ssegate_streams_ended_total{route=\"/v1\",outcome=\"complete\"}";
    assert_eq!(handoff_support::metric(&text, complete), 0.0, "{text}");
}

#[tokio::test]
async fn a_head_request_gets_no_body_and_the_next_request_its_whole_stream() {
    let (mut up, _proxy, mut s) = start().await;
    s.write_all(&request("HEAD", "/v1/peek", "1.1")).await.unwrap();
    let feed = up.next().await;
    feed.finish();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(rest.is_empty(), "bytes after a HEAD response's head: {:?}", String::from_utf8_lossy(&rest));
    one_event_stream(&mut up, &mut s, "/v1/then", "body").await;
}

#[tokio::test]
async fn a_client_leaving_in_the_middle_of_a_stream_closes_its_upstream_response() {
    let (mut up, proxy, mut s) = start().await;
    s.write_all(&request("GET", "/v1/leave", "1.1")).await.unwrap();
    let feed = up.next().await;
    feed.send("data: one\n\n").await;
    let (_, mut rest) = read_head(&mut s).await;
    read_until(&mut s, &mut rest, b"data: one\n\n").await;
    // Sent after the head went out: the proxy writes these itself.
    for text in ["two", "three"] {
        feed.send(format!("data: {text}\n\n")).await;
        read_until(&mut s, &mut rest, format!("data: {text}\n\n").as_bytes()).await;
    }
    drop(s);
    // The model's work stops: the proxy lets go of the upstream response.
    feed.closed().await;
    // And the proxy serves the next client.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    one_event_stream(&mut up, &mut s, "/v1/next", "next").await;
}

#[tokio::test]
async fn a_burst_of_upstream_chunks_arrives_whole_and_in_order() {
    let (mut up, _proxy, mut s) = start().await;
    s.write_all(&request("GET", "/v1/burst", "1.1")).await.unwrap();
    let feed = up.next().await;
    // 200 upstream chunks of 5 events each, sent as fast as the proxy
    // takes them: several are ready at once and share a write.
    let feeder = tokio::spawn(async move {
        for c in 0..200 {
            let chunk: String = (0..5).map(|i| format!("data: e{}\n\n", c * 5 + i)).collect();
            feed.send(chunk).await;
        }
        feed.finish();
    });
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (body, _) = strict_dechunk(&read_chunked_body(&mut s, rest).await);
    feeder.await.unwrap();
    let want: Vec<Ev> = (0..1000).map(|i| ev(&(i + 1).to_string(), &format!("e{i}"))).collect();
    assert_eq!(parse_sse(std::str::from_utf8(&body).unwrap()), want);
}

/// A proxy in front of a raw upstream, a client that asked it for `path`,
/// and the upstream connection whose request head was read.
async fn raw_exchange(path: &str) -> (Proxy, TcpStream, TcpStream) {
    let mut up = RawUpstream::start().await;
    let proxy = Proxy::start(config(up.addr)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&request("GET", path, "1.1")).await.unwrap();
    let mut upstream = up.accept().await;
    read_head(&mut upstream).await;
    (proxy, s, upstream)
}

#[tokio::test]
async fn an_http_1_0_upstreams_stream_reaches_an_http_1_1_client_chunked() {
    let (_proxy, mut s, mut upstream) = raw_exchange("/v1/old-upstream").await;
    // An unframed body that ends when the upstream closes, as HTTP/1.0 servers send it.
    upstream.write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: one\n\n").await.unwrap();
    let (head, mut rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    read_until(&mut s, &mut rest, b"data: one\n\n").await;
    upstream.write_all(b"data: two\n\n").await.unwrap();
    read_until(&mut s, &mut rest, b"data: two\n\n").await;
    drop(upstream);
    let (body, _) = strict_dechunk(&read_chunked_body(&mut s, rest).await);
    assert_eq!(parse_sse(std::str::from_utf8(&body).unwrap()), vec![ev("1", "one"), ev("2", "two")]);
}

/// Data segments the client's socket has received (`TCP_INFO`).
fn data_segments_in(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain data, and the kernel writes at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_data_segs_in
}

/// A chunk of a chunked body.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

#[tokio::test]
async fn a_streams_end_reaches_the_client_with_its_last_event_in_one_packet() {
    // An SSE upstream's last event, and a JSON-lines upstream's last line
    // with the `end` event the proxy adds: each arrives in one upstream
    // write with the response's end.
    for (content_type, first, last, want_last) in [
        ("text/event-stream", "data: one\n\n", "data: two\n\n", "id: 2\ndata: two\n\n"),
        ("application/x-ndjson", "{\"n\":1}\n", "{\"n\":2}\n", "event: end\n"),
    ] {
        let (_proxy, mut s, mut upstream) = raw_exchange("/v1/stream").await;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n");
        upstream.write_all(format!("{head}{}", chunk(first)).as_bytes()).await.unwrap();
        let (head, mut rest) = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{content_type}: {head}");
        read_until(&mut s, &mut rest, b"\n\n\r\n").await;
        let before = data_segments_in(&s);
        upstream.write_all(format!("{}0\r\n\r\n", chunk(last)).as_bytes()).await.unwrap();
        let raw = read_chunked_body(&mut s, rest).await;
        let (body, _) = strict_dechunk(&raw);
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains(want_last), "{content_type}: {body:?}");
        assert_eq!(
            data_segments_in(&s) - before,
            1,
            "{content_type}: the last event and the end of the body came in more than one packet: {body:?}"
        );
    }
}
