//! The listener: the header timeout against stalled sockets (and idle HTTP/2
//! connections), and the drain
//! on shutdown.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{body_text, client, parse_sse, wait_for, End, Proxy, Reply, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the proxy closes the socket (EOF or reset), failing after
/// 10 s. Returns whatever it sent before closing.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the proxy kept the connection open");
    out
}

/// Waits for the run task to return, failing after 10 s.
async fn stopped(proxy: Proxy) {
    let result = tokio::time::timeout(Duration::from_secs(10), proxy.task).await.expect("run did not return");
    result.expect("run panicked").expect("run failed");
}

/// A proxy in front of an upstream that answers "ok", with its config
/// changed by `tweak`.
async fn ok_proxy(tweak: impl FnOnce(&mut ssegate::config::Config)) -> (Upstream, Proxy) {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    tweak(&mut config);
    let proxy = Proxy::start(config).await;
    (upstream, proxy)
}

/// A proxy with a 300 ms `header_timeout` in front of an upstream that
/// answers "ok".
async fn short_header_timeout() -> (Upstream, Proxy) {
    ok_proxy(|c| c.limits.header_timeout = Duration::from_millis(300)).await
}

/// The HTTP/2 preface and an empty SETTINGS frame.
const PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// A connection to `proxy` that sent `sent` and then stalls, while another
/// client is served.
async fn stalled_beside_a_served_client(proxy: &Proxy, sent: &[u8]) -> TcpStream {
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled.write_all(sent).await.unwrap();
    let resp = client().get(proxy.url("/v1/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    stalled
}

#[tokio::test]
async fn a_half_sent_head_is_dropped_while_others_are_served() {
    let (upstream, proxy) = short_header_timeout().await;

    let started = Instant::now();
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled.write_all(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app").await.unwrap();

    // Another client is served meanwhile.
    let resp = client().get(proxy.url("/v1/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "ok");

    let sent = until_closed(&mut stalled).await;
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before header_timeout");
    let text = String::from_utf8_lossy(&sent);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "unexpected answer: {text}");
    assert_eq!(upstream.count(), 1, "the stalled request went upstream");
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_dropped() {
    let (_upstream, proxy) = short_header_timeout().await;

    let started = Instant::now();
    let mut silent = stalled_beside_a_served_client(&proxy, b"").await;
    until_closed(&mut silent).await;
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before header_timeout");
}

/// HTTP/2 with prior knowledge starts with "PRI * HTTP/2.0": a client that
/// sends part of that preface and stalls is dropped after header_timeout
/// too (hyper-util waits for the rest with no timeout of its own).
#[tokio::test]
async fn a_client_that_stalls_in_the_http2_preface_is_dropped() {
    let (_upstream, proxy) = short_header_timeout().await;

    for part in [&b"PRI"[..], b"PRI * HTTP/2.0\r\n"] {
        let started = Instant::now();
        let mut stalled = stalled_beside_a_served_client(&proxy, part).await;
        assert!(until_closed(&mut stalled).await.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(250), "closed before header_timeout");
    }
}

/// A client that sends the whole HTTP/2 preface and its settings, and
/// then nothing (not even an answer to a ping), is dropped too: a
/// connection with no request open gets its goodbye after one to two
/// `header_timeout`s, and is dropped when it is still idle (nothing open,
/// new or written) a whole period later.
#[tokio::test]
async fn a_client_that_sends_the_http2_preface_and_nothing_more_is_dropped() {
    let (_upstream, proxy) = short_header_timeout().await;
    let started = Instant::now();
    let mut stalled = stalled_beside_a_served_client(&proxy, PREFACE_AND_SETTINGS).await;
    until_closed(&mut stalled).await;
    // Two checks (0.3 and 0.6 s) to the goodbye, then two more (the
    // goodbye's own frames are written in the first) before the drop.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(590), "closed before two header_timeouts: {took:?}");
    assert!(took < Duration::from_secs(3), "closed late: {took:?}");
}

/// An HTTP/2 connection past its goodbye with nothing open does not hold
/// up the drain: the stop signal ends it at once.
#[tokio::test]
async fn an_idle_http2_connection_past_its_goodbye_does_not_hold_up_the_drain() {
    let (_upstream, mut proxy) = ok_proxy(|c| c.limits.header_timeout = Duration::from_secs(1)).await;
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    silent.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    // Frames until the GOAWAY (type 7), after two idle checks (2 s).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            silent.read_exact(&mut head).await.unwrap();
            let mut payload = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
            silent.read_exact(&mut payload).await.unwrap();
            if head[3] == 7 {
                break;
            }
        }
    })
    .await
    .expect("no GOAWAY");
    let started = Instant::now();
    proxy.shutdown();
    stopped(proxy).await;
    // The drain would otherwise wait for the next idle checks (1 to 2 s).
    assert!(started.elapsed() < Duration::from_millis(900), "the drain took {:?}", started.elapsed());
}

/// A proxy with a 300 ms `header_timeout` in front of an upstream whose
/// event stream runs 1.2 s (12 events 100 ms apart): four header_timeouts.
async fn slow_stream_proxy() -> (Upstream, Proxy) {
    let event: &[u8] = b"data: tick\n\n";
    let upstream =
        Upstream::start(move |_| Reply::chunks("text/event-stream", &[event; 12]).paced(Duration::from_millis(100)))
            .await;
    let mut config = support::config(upstream.addr);
    config.limits.header_timeout = Duration::from_millis(300);
    (upstream, Proxy::start(config).await)
}

/// An HTTP/2 client (which answers pings) keeps its connection while a
/// stream runs, however long, and loses it once it has had no request open
/// for `header_timeout`, as an idle HTTP/1.1 connection does.
#[tokio::test]
async fn an_http2_connection_is_kept_while_a_stream_runs_and_closed_once_idle() {
    use http_body_util::BodyExt;
    let (_upstream, proxy) = slow_stream_proxy().await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = http::Request::get(format!("http://{}/v1/slow", proxy.addr))
        .header("accept", "text/event-stream")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(get).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("the stream was cut").to_bytes();
    let events = parse_sse(std::str::from_utf8(&body).unwrap());
    assert_eq!(events.len(), 12, "{events:?}");
    let ended = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn).await.expect("the idle connection was kept").unwrap().ok();
    // Idle at two checks 0.3 s apart, the first after the stream's end.
    let idle = ended.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed before header_timeout: {idle:?}");
    assert!(idle < Duration::from_secs(3), "closed late: {idle:?}");
}

/// An HTTP/2 frame: its 9-byte head and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads one HTTP/2 frame: (type, flags, stream, payload).
async fn read_h2_frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.expect("the connection ended before a whole frame");
    let mut payload = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
    s.read_exact(&mut payload).await.expect("the connection ended inside a frame");
    (head[3], head[4], u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]), payload)
}

/// The goodbye race: a request that a client sent after the proxy's
/// goodbye (`GOAWAY`) left but before it arrived is still served whole,
/// however long it runs; the connection is closed once it is idle again.
/// The client here never answers the goodbye's ping, so the proxy never
/// sends its final `GOAWAY` that would refuse new streams.
#[tokio::test]
async fn an_http2_request_sent_as_the_goodbye_arrives_is_served_whole() {
    let (_upstream, proxy) = slow_stream_proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    // Nothing open: the goodbye comes after two idle checks.
    tokio::time::timeout(Duration::from_secs(5), async { while read_h2_frame(&mut s).await.0 != 7 {} })
        .await
        .expect("no GOAWAY");
    // HEADERS for stream 1, END_HEADERS and END_STREAM; HPACK literals
    // without indexing: GET, http, then :path, :authority and accept.
    let mut block = vec![0x82, 0x86];
    for (index, value) in [(&[0x04u8][..], "/v1/slow"), (&[0x01], "localhost"), (&[0x0f, 0x04], "text/event-stream")] {
        block.extend_from_slice(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    s.write_all(&h2_frame(1, 0x5, 1, &block)).await.unwrap();
    let sent = Instant::now();
    let mut body = Vec::new();
    let mut status = None;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (kind, flags, stream, payload) = read_h2_frame(&mut s).await;
            assert_ne!(kind, 3, "the stream was reset");
            match (kind, stream) {
                // HEADERS: `:status 200` is static table entry 8.
                (1, 1) => status = payload.first().copied(),
                (0, 1) => {
                    body.extend_from_slice(&payload);
                    if flags & 0x1 != 0 {
                        return;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the stream did not end within 10 s");
    assert_eq!(status, Some(0x88), "not a 200");
    let events = parse_sse(std::str::from_utf8(&body).unwrap());
    assert_eq!(events.len(), 12, "{events:?}");
    assert!(sent.elapsed() >= Duration::from_millis(1000), "served in {:?}", sent.elapsed());
    // Idle again, and past its goodbye: closed.
    let ended = Instant::now();
    until_closed(&mut s).await;
    assert!(ended.elapsed() < Duration::from_secs(3), "closed late: {:?}", ended.elapsed());
}

#[tokio::test]
async fn a_slow_head_within_the_timeout_is_served() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.limits.header_timeout = Duration::from_secs(5);
    let proxy = Proxy::start(config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET /v1/x HTTP/1.1\r\n").await.unwrap();
    stream.write_all(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n").await.unwrap();
    let text = String::from_utf8(until_closed(&mut stream).await).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

/// The proxy reads a plain connection's first bytes itself (up to 4 KiB)
/// before hyper takes over: a head longer than that, sent in one write, is
/// read whole, and two requests sent back to back are both answered.
#[tokio::test]
async fn a_head_longer_than_the_first_read_and_a_pipelined_request_are_served() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let cookie = "c".repeat(10_000);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let heads = format!(
        "GET /v1/a HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n\
         GET /v1/b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(heads.as_bytes()).await.unwrap();
    let text = String::from_utf8(until_closed(&mut stream).await).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    let seen = upstream.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].uri.path(), "/v1/a");
    assert_eq!(seen[0].headers.get("cookie").map(|v| v.len()), Some(10_000));
    assert_eq!(seen[1].uri.path(), "/v1/b");
}

#[tokio::test]
async fn drain_lets_an_open_stream_finish() {
    let chunks: &[&[u8]] = &[b"one ", b"two ", b"three ", b"four ", b"five"];
    let mut upstream =
        Upstream::start(move |_| Reply::chunks("text/plain", chunks).paced(Duration::from_millis(100))).await;
    let mut proxy = Proxy::start(support::config(upstream.addr)).await;

    let mut resp = client().get(proxy.url("/v1/generate")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let first = resp.chunk().await.unwrap().expect("no first chunk");
    proxy.shutdown();

    // New connections are refused while the open stream goes on.
    let addr = proxy.addr;
    tokio::time::timeout(Duration::from_secs(5), async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the proxy still accepts connections after shutdown");

    let mut text = String::from_utf8(first.to_vec()).unwrap();
    text.push_str(&body_text(resp).await);
    assert_eq!(text, "one two three four five");
    wait_for(&mut upstream.completed, 1).await;
    stopped(proxy).await;
}

#[tokio::test]
async fn drain_timeout_ends_an_event_stream_with_a_shutdown_event() {
    let mut upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: first\n\n"]).ending(End::Hang)).await;
    let mut config = support::config(upstream.addr);
    config.server.drain_timeout = Duration::from_millis(300);
    let mut proxy = Proxy::start(config).await;

    let mut resp = client().get(proxy.url("/v1/chat")).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut text = String::new();
    while !text.contains("data: first\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk.expect("stream ended early")).unwrap());
    }
    let started = Instant::now();
    proxy.shutdown();
    text.push_str(&body_text(resp).await);
    assert!(started.elapsed() >= Duration::from_millis(250), "stream cut before drain_timeout");

    let events = parse_sse(&text);
    assert_eq!(events.first().map(|e| e.data.as_str()), Some("first"), "{text}");
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"), "{text}");
    let data: serde_json::Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(data["error"]["type"], "shutdown", "{text}");
    assert!(data["error"]["message"].is_string());
    assert_eq!(events.len(), 2, "{text}");

    wait_for(&mut upstream.cancelled, 1).await;
    stopped(proxy).await;
}

#[tokio::test]
async fn drain_timeout_cuts_a_hanging_pass_through_body() {
    let upstream = Upstream::start(|_| Reply::chunks("text/plain", &[b"partial"]).ending(End::Hang)).await;
    let mut config = support::config(upstream.addr);
    config.server.drain_timeout = Duration::from_millis(300);
    let mut proxy = Proxy::start(config).await;

    let mut resp = client().get(proxy.url("/v1/generate")).send().await.unwrap();
    let first = resp.chunk().await.unwrap().expect("no first chunk");
    assert_eq!(&first[..], b"partial");
    proxy.shutdown();
    // The body ends (cut, since a pass-through has no way to say why) and
    // the proxy stops.
    let rest = tokio::time::timeout(Duration::from_secs(10), resp.bytes()).await.expect("body did not end");
    if let Ok(rest) = rest {
        assert!(rest.is_empty());
    }
    stopped(proxy).await;
}

#[tokio::test]
async fn shutdown_with_nothing_open_returns_at_once() {
    let (_upstream, mut proxy) = ok_proxy(|c| c.server.drain_timeout = Duration::from_secs(30)).await;
    // An idle keep-alive connection must not hold the drain.
    let c = client();
    assert_eq!(c.get(proxy.url("/v1/x")).send().await.unwrap().status(), StatusCode::OK);
    let started = Instant::now();
    proxy.shutdown();
    stopped(proxy).await;
    assert!(started.elapsed() < Duration::from_secs(5), "drain waited for an idle connection");
    drop(c);
}

/// `ssegate_worker_connections` for workers 1 and 2.
async fn per_worker(proxy: &Proxy) -> (f64, f64) {
    let text = handoff_support::metrics_text(proxy.admin).await;
    let one = handoff_support::metric(&text, r#"ssegate_worker_connections{worker="1"}"#);
    let two = handoff_support::metric(&text, r#"ssegate_worker_connections{worker="2"}"#);
    (one, two)
}

/// Polls the per-worker gauge until `done` holds, failing after 10 s.
async fn per_worker_until(proxy: &Proxy, what: &str, done: impl Fn(f64, f64) -> bool) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (one, two) = per_worker(proxy).await;
        if done(one, two) {
            return (one, two);
        }
        assert!(Instant::now() < deadline, "waited 10 s for {what}; the workers hold {one} and {two}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connections_are_spread_evenly_over_the_workers() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.server.workers = 2;
    let proxy = Proxy::start(config).await;

    // 40 clients connect at once and hold their connections.
    let connects = (0..40).map(|_| TcpStream::connect(proxy.addr));
    let open: Vec<TcpStream> = futures_util::future::try_join_all(connects).await.expect("connect");
    let (one, two) = per_worker_until(&proxy, "40 connections", |a, b| a + b == 40.0).await;
    // A worker takes the next connection only while it holds at most 4 more
    // than the other.
    assert!((one - two).abs() <= 5.0, "uneven: {one} and {two}");

    // They are served where they were accepted, and counted off when closed.
    let resp = client().get(proxy.url("/v1/x")).send().await.unwrap();
    assert_eq!(body_text(resp).await, "ok");
    drop(open);
    per_worker_until(&proxy, "the connections to close", |a, b| a + b == 0.0).await;
}

#[tokio::test]
async fn connections_queued_before_the_workers_accept_are_all_served_and_spread() {
    raise_open_files();
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.server.workers = 2;
    // 200 clients connect before the proxy accepts anything, as in a burst
    // that finds the workers busy: the workers find them all in the listen
    // queue and take several per turn of their event loops.
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    let listeners = ssegate::Listeners::bind(&config).await.expect("bind");
    let addr = listeners.public.local_addr().expect("addr");
    let connects = (0..200).map(|_| TcpStream::connect(addr));
    let mut open: Vec<TcpStream> = futures_util::future::try_join_all(connects).await.expect("connect");
    let proxy = Proxy::start_on(config, listeners);

    let (one, two) = per_worker_until(&proxy, "200 connections", |a, b| a + b == 200.0).await;
    assert!((one - two).abs() <= 5.0, "uneven: {one} and {two}");
    // Every one of them is served.
    for (i, conn) in open.iter_mut().enumerate() {
        conn.write_all(b"GET /v1/x HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n0\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("connection {i}: no answer within 10 s"))
                .expect("read");
            assert!(n > 0, "connection {i} closed without an answer: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\n2\r\nok\r\n"), "connection {i}: {text:?}");
    }
    drop(open);
    per_worker_until(&proxy, "the connections to close", |a, b| a + b == 0.0).await;
}

/// Raises this process's open-files limit to its hard limit (the test opens
/// more sockets than a default soft limit of 1,024 allows).
fn raise_open_files() -> u64 {
    ssegate::open_files::prepare(0).expect("getrlimit").limit
}

#[tokio::test]
async fn a_burst_of_1500_connects_is_queued_without_a_dropped_syn() {
    let limit = raise_open_files();
    assert!(limit >= 1_600, "the test needs 1,600 open files; the hard limit is {limit}");
    let mut config = support::config("127.0.0.1:9".parse().expect("addr"));
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    // Bound and not accepting yet, as the proxy is while it is busy: every
    // connect must complete from the kernel's queue. With a backlog of
    // 1,024 the rest wait for a SYN retransmit, 1 s later.
    let listeners = ssegate::Listeners::bind(&config).await.expect("bind");
    let addr = listeners.public.local_addr().expect("addr");
    let started = Instant::now();
    let connects: Vec<_> = (0..1_500).map(|_| tokio::spawn(TcpStream::connect(addr))).collect();
    let mut open = Vec::with_capacity(connects.len());
    for c in connects {
        let stream = tokio::time::timeout(Duration::from_millis(900), c)
            .await
            .expect("a connect waited for a SYN retransmit: the listen backlog overflowed")
            .expect("join")
            .expect("connect");
        open.push(stream);
    }
    assert_eq!(open.len(), 1_500);
    assert!(started.elapsed() < Duration::from_millis(900), "took {:?}", started.elapsed());
}
