//! Failing parts, and what a client sees for each: an upstream reset
//! mid-stream, an upstream that hangs before its head or mid-stream,
//! garbage instead of HTTP, a 10 MB single line, and SIGTERM with 1,000
//! open streams. (Redis faults: tests/redis.rs.)

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use ssegate::config::{Config, Format};
use support::{
    body_text, client, error_type, parse_sse, read_head, wait_for, BinaryProxy, BodyReader, End, Ev, ManualUpstream,
    Proxy, RawUpstream, Reply, Upstream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A direct event-stream request; returns the status and the events.
async fn direct(proxy: &Proxy, path: &str) -> (StatusCode, String) {
    let resp = client().post(proxy.url(path)).header("accept", "text/event-stream").body("{}").send().await.unwrap();
    let status = resp.status();
    (status, body_text(resp).await)
}

/// A handoff POST then GET; returns the events of the stream.
async fn handoff(proxy: &Proxy, path: &str) -> Vec<Ev> {
    let c = client();
    let created = handoff_support::create(&c, &proxy.url(""), path, "{}").await;
    let resp = c.get(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    parse_sse(&body_text(resp).await)
}

/// The `error.type` of an error event, checking its shape.
fn error_event(ev: &Ev) -> String {
    assert_eq!(ev.event.as_deref(), Some("error"), "{ev:?}");
    error_type(&ev.data)
}

fn ids(events: &[Ev]) -> Vec<String> {
    events.iter().map(|e| e.id.clone().unwrap_or_default()).collect()
}

fn datas(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.data.as_str()).collect()
}

fn config_with(upstream: std::net::SocketAddr, edit: impl FnOnce(&mut Config)) -> Config {
    let mut c = support::config(upstream);
    edit(&mut c);
    c
}

/// Feeds `a` and `b`, each once the client has it, then cuts the upstream
/// connection; returns what the client read.
async fn reset_after_two(upstream: &mut ManualUpstream, resp: reqwest::Response) -> Vec<Ev> {
    assert_eq!(resp.status(), StatusCode::OK);
    let mut reader = BodyReader::new(resp);
    let feed = upstream.next().await;
    feed.send("data: a\n\n").await;
    let mut text = reader.until("a\n\n").await;
    feed.send("data: b\n\n").await;
    text.push_str(&reader.until("b\n\n").await);
    feed.reset().await;
    text.push_str(&reader.rest().await);
    parse_sse(&text)
}

#[tokio::test]
async fn an_upstream_reset_mid_stream_ends_the_stream_with_upstream_reset() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let c = client();

    let resp = c.post(proxy.url("/v1/chat")).header("accept", "text/event-stream").body("{}").send().await.unwrap();
    let events = reset_after_two(&mut upstream, resp).await;
    assert_eq!(datas(&events)[..2], ["a", "b"]);
    assert_eq!(ids(&events), ["1", "2", "3"]);
    assert_eq!(error_event(&events[2]), "upstream_reset");

    let created = handoff_support::create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    let resp = c.get(proxy.url(&created.stream_url)).send().await.unwrap();
    let events = reset_after_two(&mut upstream, resp).await;
    assert_eq!(datas(&events)[..2], ["a", "b"]);
    assert_eq!(ids(&events), ["1", "2", "3"]);
    assert_eq!(error_event(&events[2]), "upstream_reset");

    // An NDJSON upstream too (a route with a fixed format).
    let mut config = support::config(upstream.addr);
    config.routes[0].format = Format::Ndjson;
    let proxy = Proxy::start(config).await;
    let resp = c.post(proxy.url("/v1/chat")).body("{}").send().await.unwrap();
    let feed = upstream.next().await;
    feed.send("{\"n\":1}\n").await;
    let mut reader = BodyReader::new(resp);
    let mut text = reader.until("\n\n").await;
    feed.reset().await;
    text.push_str(&reader.rest().await);
    let events = parse_sse(&text);
    assert_eq!(ids(&events), ["1", "2"]);
    assert_eq!(events[0].data, r#"{"n":1}"#);
    assert_eq!(error_event(&events[1]), "upstream_reset");
}

#[tokio::test]
async fn an_upstream_that_hangs_before_its_head_is_504_direct_and_an_error_event_by_handoff() {
    let mut upstream = RawUpstream::start().await;
    let first_byte_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(config_with(upstream.addr, |c| c.limits.first_byte_timeout = first_byte_timeout)).await;

    // Direct: 504 with the JSON error, and the upstream connection closed.
    let started = Instant::now();
    let request = tokio::spawn(direct_plain(proxy.url("/v1/chat")));
    let mut up = upstream.accept().await;
    read_head(&mut up).await;
    let (status, body) = request.await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_type(&body), "upstream_timeout");
    assert!(took >= first_byte_timeout && took < first_byte_timeout * 10, "{took:?}");
    assert_closed(&mut up).await;

    // Handoff: the stream's head went out at once; then the error event.
    let c = client();
    let created = handoff_support::create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    let resp = c.get(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut up = upstream.accept().await;
    read_head(&mut up).await;
    let events = parse_sse(&body_text(resp).await);
    assert_eq!(ids(&events), ["1"], "{events:?}");
    assert_eq!(error_event(&events[0]), "upstream_timeout");
    assert_closed(&mut up).await;
}

/// A POST asking for an event stream; returns status and body.
async fn direct_plain(url: String) -> (StatusCode, String) {
    let resp = client().post(url).header("accept", "text/event-stream").body("{}").send().await.unwrap();
    let status = resp.status();
    (status, body_text(resp).await)
}

/// Waits until the proxy closes a raw upstream connection (10 s at most).
async fn assert_closed(up: &mut tokio::net::TcpStream) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match up.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the proxy kept the upstream connection open");
}

#[tokio::test]
async fn an_upstream_that_hangs_mid_stream_ends_it_after_idle_timeout() {
    let mut upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: a\n\n"]).ending(End::Hang)).await;
    let idle = Duration::from_millis(300);
    let proxy = Proxy::start(config_with(upstream.addr, |c| c.limits.idle_timeout = idle)).await;

    let started = Instant::now();
    let (status, text) = direct(&proxy, "/v1/chat").await;
    assert_eq!(status, StatusCode::OK);
    let events = parse_sse(&text);
    assert_eq!(ids(&events), ["1", "2"]);
    assert_eq!(events[0].data, "a");
    assert_eq!(error_event(&events[1]), "upstream_timeout");
    assert!(started.elapsed() >= idle, "{:?}", started.elapsed());
    wait_for(&mut upstream.cancelled, 1).await;

    let events = handoff(&proxy, "/v1/chat").await;
    assert_eq!(ids(&events), ["1", "2"]);
    assert_eq!(events[0].data, "a");
    assert_eq!(error_event(&events[1]), "upstream_timeout");
    wait_for(&mut upstream.cancelled, 2).await;
}

#[tokio::test]
async fn garbage_instead_of_http_is_502_direct_and_an_error_event_by_handoff() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let junk: &[u8] = b"\x00\xff\xfeSSH-2.0-garbage\r\n\x16\x03\x01 not http at all\r\n\r\n";

    let request = tokio::spawn(direct_plain(proxy.url("/v1/chat")));
    let mut up = upstream.accept().await;
    read_head(&mut up).await;
    up.write_all(junk).await.unwrap();
    let (status, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(error_type(&body), "upstream_unavailable");
    assert_closed(&mut up).await;

    let c = client();
    let created = handoff_support::create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    let resp = c.get(proxy.url(&created.stream_url)).send().await.unwrap();
    let mut up = upstream.accept().await;
    read_head(&mut up).await;
    up.write_all(junk).await.unwrap();
    let events = parse_sse(&body_text(resp).await);
    assert_eq!(ids(&events), ["1"]);
    assert_eq!(error_event(&events[0]), "upstream_unavailable");

    // A good head, then a body whose chunked framing is garbage: the events
    // before it arrive, then `upstream_reset`.
    let request = tokio::spawn(direct_plain(proxy.url("/v1/chat")));
    let mut up = upstream.accept().await;
    read_head(&mut up).await;
    up.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
          9\r\ndata: a\n\n\r\nZZ-not-a-size\r\nxyz\r\n",
    )
    .await
    .unwrap();
    let (status, text) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let events = parse_sse(&text);
    assert_eq!(ids(&events), ["1", "2"], "{text}");
    assert_eq!(events[0].data, "a");
    assert_eq!(error_event(&events[1]), "upstream_reset");
}

/// 10 MB of `a` on one line after `prefix`, in 64 KiB chunks, the line
/// never ended.
fn ten_mb_line(prefix: &[u8]) -> Reply {
    let chunk = vec![b'a'; 64 * 1024];
    let mut chunks: Vec<&[u8]> = vec![prefix];
    for _ in 0..160 {
        chunks.push(&chunk);
    }
    Reply::chunks("text/event-stream", &chunks).ending(End::Hang)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_single_line_is_event_too_large_and_the_proxy_stays_responsive() {
    let mut upstream = Upstream::start(|s| match s.uri.path() {
        "/v1/fine" => Reply::full(200, "text/plain", "fine"),
        "/v1/ndjson" => {
            let mut r = ten_mb_line(b"{\"x\":\"");
            r.headers[0].1 = "application/x-ndjson".into();
            r
        }
        _ => ten_mb_line(b"data: {\"x\":\""),
    })
    .await;
    let proxy = Arc::new(Proxy::start(support::config(upstream.addr)).await);

    // While the line pours in, other requests are answered promptly.
    let flood = {
        let proxy = proxy.clone();
        tokio::spawn(async move { direct(&proxy, "/v1/chat").await })
    };
    let started = Instant::now();
    let resp = client().get(proxy.url("/v1/fine")).send().await.unwrap();
    assert_eq!(body_text(resp).await, "fine");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    let (status, text) = flood.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let events = parse_sse(&text);
    assert_eq!(ids(&events), ["1"], "{}", &text[..text.len().min(300)]);
    assert_eq!(error_event(&events[0]), "event_too_large");
    assert!(text.len() < 4096, "the oversized line reached the client ({} bytes)", text.len());
    wait_for(&mut upstream.cancelled, 1).await;

    // NDJSON (format auto, by content type): the same.
    let mut c = support::config(upstream.addr);
    c.routes[0].format = Format::Ndjson;
    let ndjson = Proxy::start(c).await;
    let (_, text) = direct(&ndjson, "/v1/ndjson").await;
    let events = parse_sse(&text);
    assert_eq!(ids(&events), ["1"]);
    assert_eq!(error_event(&events[0]), "event_too_large");
    wait_for(&mut upstream.cancelled, 2).await;

    // Handoff: the same error event.
    let events = handoff(&proxy, "/v1/chat").await;
    assert_eq!(ids(&events), ["1"]);
    assert_eq!(error_event(&events[0]), "event_too_large");
    wait_for(&mut upstream.cancelled, 3).await;

    let resp = client().get(proxy.url("/v1/fine")).send().await.unwrap();
    assert_eq!(body_text(resp).await, "fine");
}

/// Opens one stream (direct or handoff) against the binary, reads until
/// its first event, reports that on `ready`, then, once `go` is true,
/// reads it to the end.
async fn held_stream(
    c: reqwest::Client,
    base: String,
    i: usize,
    ready: tokio::sync::mpsc::Sender<()>,
    mut go: tokio::sync::watch::Receiver<bool>,
) -> String {
    let resp = if i % 2 == 0 {
        c.post(format!("{base}/v1/chat?i={i}")).header("accept", "text/event-stream").body("{}").send().await
    } else {
        let created = handoff_support::create(&c, &base, &format!("/v1/chat?i={i}"), "{}").await;
        c.get(format!("{base}{}", created.stream_url)).send().await
    };
    let resp = resp.unwrap_or_else(|e| panic!("stream {i}: {e}"));
    assert_eq!(resp.status(), StatusCode::OK, "stream {i}");
    let mut reader = support::BodyReader::new(resp);
    let mut text = reader.until("data: first\n").await;
    ready.send(()).await.unwrap();
    go.wait_for(|g| *g).await.unwrap();
    text.push_str(&reader.rest().await);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_1000_open_streams_ends_each_with_a_shutdown_event_and_exits_0_in_time() {
    const STREAMS: usize = 1000;
    let drain_timeout = Duration::from_secs(1);
    let mut upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: first\n\n"]).ending(End::Hang)).await;
    let mut proxy = BinaryProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndrain_timeout = \"1s\"\n\n\
         [limits]\nmax_connections = 2000\nmax_streams = 2000\n\n\
         [[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    ))
    .await;
    // No idle pooled connections: a spare connection that never sent a
    // request holds the drain up on its own (see the next test).
    let c = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(STREAMS);
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let opening = Instant::now();
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| tokio::spawn(held_stream(c.clone(), proxy.url(""), i, ready_tx.clone(), go_rx.clone())))
        .collect();
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..STREAMS {
            ready.recv().await.unwrap();
        }
    })
    .await
    .expect("not every stream opened");
    eprintln!("{STREAMS} streams open after {:?}", opening.elapsed());
    let m = handoff_support::metrics_text(proxy.admin).await;
    assert_eq!(handoff_support::metric(&m, "ssegate_streams_active{route=\"/v1\"}"), STREAMS as f64);
    eprintln!("connections open before SIGTERM: {}", handoff_support::metric(&m, "ssegate_connections_open"));

    go.send_replace(true);
    let signalled = Instant::now();
    proxy.signal("TERM");
    let code = proxy.wait().await;
    let took = signalled.elapsed();
    let late = proxy.seen.iter().filter(|l| l.contains("did not close in time")).count();
    eprintln!(
        "SIGTERM with {STREAMS} open streams: exit {code:?} after {took:?}; \"did not close in time\" logged: {late}"
    );

    let mut failures = Vec::new();
    for (i, task) in streams.into_iter().enumerate() {
        let text = task.await.unwrap();
        let events = parse_sse(&text);
        let last = events.last().unwrap();
        let ok = events.len() == 2
            && events[0].data == "first"
            && last.event.as_deref() == Some("error")
            && last.id.as_deref() == Some("2")
            && serde_json::from_str::<serde_json::Value>(&last.data).is_ok_and(|v| v["error"]["type"] == "shutdown");
        if !ok {
            failures.push(format!("stream {i}: {events:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} streams did not end with a shutdown event:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(code, Some(0), "{}", proxy.seen.join("\n"));
    assert!(took < drain_timeout + Duration::from_secs(1), "exit took {took:?}");
    assert!(!proxy.seen.iter().any(|l| l.contains("panicked")), "{}", proxy.seen.join("\n"));
    wait_for(&mut upstream.cancelled, STREAMS).await;
}

#[tokio::test]
async fn connections_without_a_request_in_flight_do_not_hold_up_shutdown() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "fine")).await;
    let mut config = support::config(upstream.addr);
    config.server.drain_timeout = Duration::from_secs(2);
    let mut proxy = Proxy::start(config).await;

    // Connected, nothing sent (a browser's preconnect, a pool's spare).
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Half a request head.
    let mut partial = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    partial.write_all(b"GET /v1/x HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // Idle keep-alive after one request.
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET /v1/x HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    // All three are accepted once a later connection is served.
    let resp = client().get(proxy.url("/v1/x")).send().await.unwrap();
    assert_eq!(body_text(resp).await, "fine");

    let started = Instant::now();
    proxy.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(10), &mut proxy.task).await;
    let took = started.elapsed();
    assert!(stopped.is_ok(), "the proxy did not stop");
    assert!(
        took < Duration::from_millis(500),
        "with no request in flight, shutdown took {took:?} (drain_timeout 2s): a connection that has not sent a \
         whole request head is waited for"
    );
    for (name, s) in [("silent", &mut silent), ("partial", &mut partial), ("idle", &mut idle)] {
        // Read past whatever the connection still had buffered (the rest of
        // an earlier response) to its end.
        let closed = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the {name} connection is still open");
    }
}
