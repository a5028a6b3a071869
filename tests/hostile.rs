//! Hostile clients: slowloris heads, a client that never reads, a flood of
//! bogus stream tokens, oversized headers, an HTTP/2 client opening more
//! streams than allowed, and a handoff body trickled byte by byte. Each
//! test also checks that the proxy goes on serving everyone else.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use handoff_support::{metric, metrics_text, parse_raw};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{body_text, client, error_type, read_head, BinaryProxy, End, Proxy, RawUpstream, Reply, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plain request through the proxy answers within `within`.
async fn still_serves(proxy_url: String, within: Duration) {
    let started = Instant::now();
    let resp = tokio::time::timeout(within, client().get(proxy_url).send())
        .await
        .expect("the proxy did not answer a normal request in time")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "fine");
    assert!(started.elapsed() < within);
}

/// How a slow client's connection ended: after how long, and what the
/// proxy wrote before closing it.
#[derive(Debug)]
struct Closed {
    after: Duration,
    response: Vec<u8>,
}

/// Connects and sends `prefix`, then one more byte of a never-ending
/// header every `every` (none if `None`), until the proxy closes the
/// connection; fails after 20 s.
async fn slow_client(addr: SocketAddr, prefix: &'static [u8], every: Option<Duration>) -> Closed {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => response.extend_from_slice(&buf[..n]),
                },
                _ = tick.tick() => {
                    if s.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
    .expect("the proxy kept a slow client's connection open for 20 s");
    Closed { after: started.elapsed(), response }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_closed_after_header_timeout_while_others_are_served() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "fine")).await;
    let mut config = support::config(upstream.addr);
    let header_timeout = Duration::from_secs(1);
    config.limits.header_timeout = header_timeout;
    let proxy = Proxy::start(config).await;

    let mut slow = Vec::new();
    for _ in 0..6 {
        // A head that never ends, one byte every 100 ms.
        let prefix: &[u8] = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-slow: ";
        slow.push(tokio::spawn(slow_client(proxy.addr, prefix, Some(Duration::from_millis(100)))));
    }
    for _ in 0..2 {
        // A request line only, then a byte every 100 ms.
        slow.push(tokio::spawn(slow_client(proxy.addr, b"G", Some(Duration::from_millis(100)))));
        // Connected, never a byte.
        slow.push(tokio::spawn(slow_client(proxy.addr, b"", None)));
    }
    // Others are served meanwhile, again and again, well within the timeout.
    let until = Instant::now() + header_timeout;
    let mut served = 0;
    while Instant::now() < until {
        still_serves(proxy.url("/v1/models"), Duration::from_millis(500)).await;
        served += 1;
    }
    assert!(served >= 2);

    for task in slow {
        let closed = task.await.unwrap();
        eprintln!(
            "slow client closed after {:?}, having been sent {:?}",
            closed.after,
            String::from_utf8_lossy(&closed.response)
        );
        assert!(
            closed.after >= header_timeout - Duration::from_millis(100) && closed.after < header_timeout * 3,
            "a slow client was closed after {:?} (header_timeout {header_timeout:?})",
            closed.after
        );
        // What the proxy writes before closing: nothing, or a 408.
        let text = String::from_utf8_lossy(&closed.response);
        assert!(closed.response.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert_eq!(upstream.count(), served, "a slow head went upstream");
    still_serves(proxy.url("/v1/models"), Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_client_that_never_reads_a_direct_stream_backpressures_the_upstream() {
    let mut upstream = RawUpstream::start().await;
    let fine = Upstream::start(|_| Reply::full(200, "text/plain", "fine")).await;
    let mut config = support::config(upstream.addr);
    config.routes.push(support::route("/ok", &format!("http://{}", fine.addr)));
    config.limits.idle_timeout = Duration::from_secs(1);
    let proxy = Proxy::start(config).await;

    // The client asks for a stream and never reads a byte of it.
    let mut lazy = TcpStream::connect(proxy.addr).await.unwrap();
    lazy.write_all(b"GET /v1/chat HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n").await.unwrap();

    // The upstream writes as fast as it can until a write stalls for 1 s.
    let mut up = upstream.accept().await;
    read_head(&mut up).await;
    up.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n").await.unwrap();
    let event = Bytes::from(format!("data: {}\n\n", "x".repeat(16 * 1024 - 8)));
    const CAP: usize = 512 << 20;
    let mut written = 0usize;
    let stalled = loop {
        match tokio::time::timeout(Duration::from_secs(1), up.write_all(&event)).await {
            Err(_) => break true,
            Ok(r) => r.expect("the proxy closed the upstream connection"),
        }
        written += event.len();
        if written >= CAP {
            break false;
        }
    };
    eprintln!("never-reading client: the upstream stalled after {} KiB", written >> 10);
    assert!(stalled, "the proxy took {} MiB from the upstream for a client that reads nothing", written >> 20);
    // Socket buffers on both sides plus the proxy's own: tens of MiB at most.
    assert!(written < 64 << 20, "{} MiB went in before the upstream stalled", written >> 20);

    // The stream is held, neither cut nor timed out (the upstream is not
    // idle: the proxy is not reading it); others are served meanwhile.
    still_serves(proxy.url("/ok/x"), Duration::from_secs(2)).await;
    let mut probe = [0u8; 1];
    let cut = tokio::time::timeout(Duration::from_millis(1500), up.read(&mut probe)).await;
    assert!(cut.is_err(), "the proxy cut the upstream of a stalled client: {cut:?}");
    let m = metrics_text(proxy.admin).await;
    assert_eq!(metric(&m, "ssegate_streams_active{route=\"/v1\"}"), 1.0, "{m}");

    // The client goes away: the upstream request is cancelled.
    drop(lazy);
    let mut sink = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match up.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    // The proxy may still be blocked writing into the dead client's socket:
    // the upstream side is closed once that fails.
    if closed.is_err() {
        let _ = up.write_all(&event).await;
    }
    handoff_support::wait_metric(
        proxy.admin,
        "ssegate_streams_ended_total{route=\"/v1\",outcome=\"client_gone\"}",
        1.0,
    )
    .await;
}

/// The proxy's /metrics series names and label sets (values dropped).
fn series(text: &str) -> HashSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()).unwrap_or_default())
        .filter(|s| !s.contains("_bucket{") && !s.contains("le="))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bogus_token_gets_are_404_and_leave_nothing_behind() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "fine")).await;
    let mut proxy = BinaryProxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
         [[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    ))
    .await;
    let c = client();
    let base = proxy.url("/stream/");
    let bogus = |i: usize| match i % 5 {
        0 => format!("{base}{:022}", i),
        1 => format!("{base}AAAAAAAAAAAAAAAAAAAAA{i}"),
        2 => format!("{base}{}", "Z".repeat(2000 + i % 100)),
        3 => format!("{base}..%2F..%2Fetc%2Fpasswd{i}"),
        _ => format!("{base}tok-{i}?x=%00"),
    };
    let run = |range: std::ops::Range<usize>| {
        let c = c.clone();
        let bogus = &bogus;
        async move {
            let statuses: Vec<(StatusCode, String)> = futures_util::stream::iter(range)
                .map(|i| {
                    let c = c.clone();
                    let url = bogus(i);
                    async move {
                        let resp = c.get(url).send().await.unwrap();
                        let status = resp.status();
                        (status, resp.text().await.unwrap())
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            statuses
        }
    };
    // Warm up, then measure.
    for (status, body) in run(0..1000).await {
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let before = metrics_text(proxy.admin).await;
    let rss_before = proxy.rss_kib();
    let started = Instant::now();
    let results = run(1000..11000).await;
    let took = started.elapsed();
    let mut by_status = BTreeMap::new();
    for (status, body) in &results {
        *by_status.entry(status.as_u16()).or_insert(0) += 1;
        assert_eq!(error_type(body), "not_found");
    }
    assert_eq!(by_status, BTreeMap::from([(404, 10_000)]));
    let rss_after = proxy.rss_kib();
    let after = metrics_text(proxy.admin).await;
    eprintln!("10,000 bogus GETs in {took:?}; proxy RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(rss_after < rss_before + rss_before / 5 + 2048, "RSS grew from {rss_before} KiB to {rss_after} KiB");
    // No new series (no token ever becomes a label), nothing issued or held.
    assert_eq!(series(&before), series(&after), "new metric series:\n{after}");
    for name in ["ssegate_tokens_issued_total", "ssegate_tokens_redeemed_total", "ssegate_resumes_total"] {
        assert_eq!(metric(&after, name), 0.0, "{name}");
    }
    assert!(!after.contains("AAAAAAAAAAAAAAAAAAAAA") && !after.contains("tok-"), "a token in /metrics");
    assert_eq!(upstream.count(), 0);
    // No log line per bogus GET, and none carries a token.
    proxy.signal("TERM");
    assert_eq!(proxy.wait().await, Some(0));
    let log = proxy.seen.join("\n");
    assert!(!log.contains("AAAAAAAAAAAAAAAAAAAAA") && !log.contains("tok-"), "a token in the log");
    assert!(proxy.seen.len() < 100, "{} log lines for 11,000 bogus GETs", proxy.seen.len());
}

#[tokio::test]
async fn oversized_headers_are_refused_and_the_proxy_serves_others() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "fine")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;

    // HTTP/1.1: one 100 KB header.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(100 * 1024));
    // The proxy may close while the head is still being written.
    let _ = s.write_all(head.as_bytes()).await;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let read = read.expect("the connection stayed open");
    let text = String::from_utf8_lossy(&raw);
    eprintln!("HTTP/1.1 with a 100 KB header: read {read:?}, response {:?}", text.lines().next());
    assert!(text.starts_with("HTTP/1.1 431") || raw.is_empty(), "{text}");
    // Many headers summing up over the limit.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut head = String::from("GET /v1/models HTTP/1.1\r\nhost: x\r\n");
    for i in 0..2000 {
        head.push_str(&format!("x-h{i}: {}\r\n", "b".repeat(40)));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.expect("stayed open");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 431") || raw.is_empty(), "{text}");
    assert_eq!(upstream.count(), 0);
    still_serves(proxy.url("/v1/models"), Duration::from_secs(2)).await;

    // HTTP/2 (prior knowledge): the same 100 KB header.
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let result = h2.get(proxy.url("/v1/models")).header("x-big", "a".repeat(100 * 1024)).send().await;
    match &result {
        Ok(resp) => {
            eprintln!("HTTP/2 with a 100 KB header: {}", resp.status());
            assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        Err(e) => eprintln!("HTTP/2 with a 100 KB header: error {e:?}"),
    }
    assert_eq!(upstream.count(), 1, "only the normal request went upstream");
    let resp = h2.get(proxy.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "fine");
    still_serves(proxy.url("/v1/models"), Duration::from_secs(2)).await;
}

/// An HTTP/2 frame as read off the wire.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Ok(Frame { kind: head[3], flags: head[4], stream, payload })
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A HPACK string literal without Huffman coding (length < 127).
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The header block of `GET {path}` asking for an event stream, encoded
/// without the dynamic table.
fn get_headers(authority: &str, path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    b.push(0x04); // :path, literal without indexing
    hpack_str(&mut b, path);
    b.push(0x01); // :authority, literal without indexing
    hpack_str(&mut b, authority);
    b.push(0x00); // a new name, literal without indexing
    hpack_str(&mut b, "accept");
    hpack_str(&mut b, "text/event-stream");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_opening_1000_streams_at_once_gets_the_excess_refused() {
    let mut upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: hello\n\n"]).ending(End::Hang)).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let authority = proxy.addr.to_string();

    // A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS: 1,000 HEADERS
    // frames in one burst, each a stream the upstream holds open.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[])); // SETTINGS
                                     // A large connection window so that no stream waits for WINDOW_UPDATE.
    out.extend(frame(8, 0, 0, &(1u32 << 30).to_be_bytes()));
    for i in 0..1000u32 {
        out.extend(frame(1, 0x5, 2 * i + 1, &get_headers(&authority, &format!("/v1/chat?i={i}"))));
    }
    s.write_all(&out).await.unwrap();

    let mut max_streams = None;
    let mut answered = HashSet::new();
    let mut refused = HashSet::new();
    let mut other_resets = Vec::new();
    let mut goaway = None;
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        while answered.len() + refused.len() + other_resets.len() < 1000 && goaway.is_none() {
            let f = read_frame(&mut s).await?;
            match f.kind {
                4 if f.flags & 1 == 0 => {
                    for setting in f.payload.chunks(6) {
                        if u16::from_be_bytes([setting[0], setting[1]]) == 3 {
                            max_streams = Some(u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]));
                        }
                    }
                    s.write_all(&frame(4, 1, 0, &[])).await?; // SETTINGS ACK
                }
                1 => {
                    answered.insert(f.stream);
                }
                3 => {
                    let code = u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
                    if code == 7 {
                        refused.insert(f.stream);
                    } else {
                        other_resets.push((f.stream, code));
                    }
                }
                6 if f.flags & 1 == 0 => s.write_all(&frame(6, 1, 0, &f.payload)).await?, // PING ACK
                7 => {
                    let last = u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
                    let code = u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]);
                    goaway = Some((last & 0x7fff_ffff, code));
                }
                _ => {}
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    eprintln!(
        "HTTP/2, 1,000 streams at once: SETTINGS_MAX_CONCURRENT_STREAMS {max_streams:?}; {} answered, {} refused \
         (RST_STREAM REFUSED_STREAM), other resets {other_resets:?}, GOAWAY {goaway:?}, read {outcome:?}",
        answered.len(),
        refused.len()
    );
    assert_eq!(max_streams, Some(256));
    assert!(outcome.is_ok(), "the proxy neither answered nor refused every stream within 20 s");
    assert_eq!(goaway, None, "the proxy ended the connection");
    assert!(other_resets.is_empty(), "{other_resets:?}");
    assert_eq!(answered.len(), 256, "streams over the limit were served");
    assert_eq!(refused.len(), 744);
    // The first 256 streams are the ones served.
    assert!(answered.iter().all(|id| *id <= 511), "{answered:?}");
    assert_eq!(upstream.count(), 256, "refused streams went upstream");

    // The client leaves: every held stream's upstream is cancelled.
    drop(s);
    support::wait_for(&mut upstream.cancelled, 256).await;

    // Later requests work, over HTTP/1.1 and HTTP/2.
    let resp = client().get(proxy.url("/v1/chat")).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let resp = h2.get(proxy.url("/v1/chat")).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_behaved_http2_client_with_1000_requests_on_one_connection_is_queued_not_refused() {
    let upstream = Upstream::start(|_| {
        Reply::chunks("text/event-stream", &[b"data: a\n\n", b"data: [DONE]\n\n"]).paced(Duration::from_millis(20))
    })
    .await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    // One connection by construction: hyper's HTTP/2 client, which honours
    // SETTINGS_MAX_CONCURRENT_STREAMS by holding requests back.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let started = Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let mut sender = sender.clone();
            let uri = format!("http://{}/v1/chat?i={i}", proxy.addr);
            tokio::spawn(async move {
                let req =
                    http::Request::get(uri).header("accept", "text/event-stream").body(Empty::<Bytes>::new()).unwrap();
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, body))
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), task).await.unwrap().unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
        ok += 1;
    }
    eprintln!(
        "HTTP/2, 1,000 requests on one connection (client-side queueing): all {ok} served in {:?}",
        started.elapsed()
    );
    assert_eq!(upstream.count(), 1000);
}

/// Whether `raw` holds a whole response with a `content-length` body.
fn whole_response(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let len = parse_raw(raw).header("content-length").map_or(0, |l| l.parse::<usize>().unwrap());
    raw.len() >= end + 4 + len
}

/// Sends the head of a handoff POST with a 12-byte body, then body bytes,
/// the i-th after `delays[i]` (fewer delays than bytes: the rest is never
/// sent). Returns the response and how long after the last byte sent it
/// was complete.
async fn trickled_post(addr: SocketAddr, delays: &[Duration]) -> (Vec<u8>, Duration) {
    let body = br#"{"q":"abcd"}"#;
    assert_eq!(body.len(), 12);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head =
        "POST /handoff/v1/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut last = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    for (byte, delay) in body.iter().zip(delays) {
        // Waiting for this byte's time, or for an early answer.
        if let Ok(r) = tokio::time::timeout(*delay, s.read(&mut buf)).await {
            raw.extend_from_slice(&buf[..r.unwrap()]);
            break;
        }
        s.write_all(&[*byte]).await.unwrap();
        last = Instant::now();
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while !whole_response(&raw) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("no response within 10 s");
    (raw, last.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_body_trickled_slower_than_header_timeout_is_408_faster_is_accepted() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "fine")).await;
    let mut config = support::config(upstream.addr);
    let gap = Duration::from_millis(500);
    config.limits.header_timeout = gap;
    let proxy = Proxy::start(config).await;

    // Four bytes, then nothing: after `header_timeout` of silence, 408.
    let (raw, after) = trickled_post(proxy.addr, &[Duration::ZERO; 4]).await;
    let resp = parse_raw(&raw);
    assert_eq!(resp.status, 408, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(error_type(&resp.text()), "request_timeout");
    assert!(after >= gap - Duration::from_millis(50) && after < gap * 4, "408 came {after:?} after the last byte");

    // A byte every 2 x header_timeout: 408 within the first gap.
    let (raw, after) = trickled_post(proxy.addr, &[gap * 2; 12]).await;
    assert_eq!(parse_raw(&raw).status, 408, "{}", String::from_utf8_lossy(&raw));
    assert!(after < gap * 2, "{after:?}");

    // A byte every header_timeout / 3: 2 s in all, but accepted.
    let started = Instant::now();
    let (raw, _) = trickled_post(proxy.addr, &[gap / 3; 12]).await;
    let resp = parse_raw(&raw);
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&raw));
    assert!(started.elapsed() > gap * 3, "{:?}", started.elapsed());
    let created = handoff_support::parse_created(&resp.text());
    let m = metrics_text(proxy.admin).await;
    assert_eq!(metric(&m, "ssegate_tokens_issued_total"), 1.0);
    let resp = client().get(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body_text(resp).await.contains("fine"));
    assert_eq!(&upstream.last().body[..], br#"{"q":"abcd"}"#);
    assert_eq!(upstream.count(), 1);
    still_serves(proxy.url("/v1/models"), Duration::from_secs(2)).await;
}
