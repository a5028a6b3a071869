//! Handoff: POST → one-time token → EventSource GET, resume by
//! Last-Event-ID, takeover, grace, DELETE (Stop), limits, CORS, metrics.
//! CONTRACT.md "Handoff" and "The event stream"; issue [3/7 handoff].

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use handoff_support::{create, metric, metrics_text, parse_created, parse_raw, wait_metric};
use ssegate::config::Config;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SSE: &str = "text/event-stream";

/// Starts a proxy in front of `upstream` with `edit` applied to the test config.
async fn proxy_with(upstream: std::net::SocketAddr, edit: impl FnOnce(&mut Config)) -> Proxy {
    let mut c = config(upstream);
    edit(&mut c);
    Proxy::start(c).await
}

/// An SSE upstream body of `n` events `data: e1` … `data: eN`, one per chunk.
fn sse_chunks(n: usize) -> Vec<Vec<u8>> {
    (1..=n).map(|i| format!("data: e{i}\n\n").into_bytes()).collect()
}

fn reply_sse(chunks: &[Vec<u8>]) -> Reply {
    let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
    Reply::chunks(SSE, &refs)
}

fn ids(evs: &[Ev]) -> Vec<u64> {
    evs.iter().map(|e| e.id.as_deref().expect("event without id").parse().expect("id is not a number")).collect()
}

fn datas(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.data.clone()).collect()
}

/// Checks that `ev` is the `end` event with `reason`.
fn assert_end(ev: &Ev, reason: &str) {
    assert_eq!(ev.event.as_deref(), Some("end"), "not an end event: {ev:?}");
    let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(v, serde_json::json!({ "reason": reason }), "end data: {}", ev.data);
}

/// The `error.type` of an `error` event.
fn error_event_type(ev: &Ev) -> String {
    assert_eq!(ev.event.as_deref(), Some("error"), "not an error event: {ev:?}");
    error_type(&ev.data)
}

/// GET the stream with an optional Last-Event-ID.
async fn get(proxy: &Proxy, url: &str, last_event_id: Option<&str>) -> reqwest::Response {
    let mut req = client().get(proxy.url(url)).header("accept", SSE);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    tokio::time::timeout(Duration::from_secs(10), req.send()).await.expect("no response head").expect("GET failed")
}

/// GET the stream and read it to the end; asserts 200 and the event-stream head.
async fn get_all(proxy: &Proxy, url: &str, last_event_id: Option<&str>) -> Vec<Ev> {
    let resp = get(proxy, url, last_event_id).await;
    assert_eq!(resp.status(), 200, "GET {url} (Last-Event-ID {last_event_id:?})");
    assert_event_stream_head(resp.headers());
    parse_sse(&body_text(resp).await)
}

fn assert_event_stream_head(h: &reqwest::header::HeaderMap) {
    assert_eq!(h["content-type"], "text/event-stream; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache, no-transform");
    assert_eq!(h["x-accel-buffering"], "no");
    assert!(h.get("content-length").is_none(), "an event stream has no content-length");
    assert!(h.get("content-encoding").is_none(), "an event stream is never compressed");
}

// ---------------------------------------------------------------- 1. POST

#[tokio::test]
async fn post_stores_the_request_and_answers_201_with_a_token() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = client()
        .post(proxy.url("/handoff/v1/chat?x=1"))
        .header("authorization", "Bearer sk-client")
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, br")
        .header("x-custom", "kept")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["cache-control"], "no-store");
    let created = parse_created(&resp.text().await.unwrap());
    assert_eq!(h["location"].to_str().unwrap(), format!("/stream/{}", created.token));
    assert_eq!(created.stream_url, format!("/stream/{}", created.token));
    assert_eq!(created.expires_in, 30, "expires_in is handoff.ttl in seconds");
    assert_eq!(up.count(), 0, "nothing goes upstream before the GET");

    let evs = get_all(&proxy, &created.stream_url, None).await;
    assert_eq!(datas(&evs)[0], "e1");
    let seen = up.last();
    assert_eq!(up.count(), 1);
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/v1/chat?x=1");
    assert_eq!(&seen.body[..], body.as_bytes());
    assert_eq!(seen.headers["authorization"], "Bearer sk-client");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["x-custom"], "kept");
    let ae: Vec<_> = seen.headers.get_all("accept-encoding").iter().collect();
    assert_eq!(ae, ["identity"], "a handoff goes upstream with accept-encoding: identity only");
    assert!(seen.headers.get("x-forwarded-for").is_some(), "stored as direct mode would forward it");
}

#[tokio::test]
async fn post_without_a_route_is_404() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let resp = client().post(proxy.url("/handoff/v2/chat")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    error_type(&resp.text().await.unwrap());
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn post_body_over_max_body_is_413_with_content_length_and_chunked() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let proxy = proxy_with(up.addr, |c| c.limits.max_body = 64).await;
    let c = client();

    let at_limit = c.post(proxy.url("/handoff/v1/chat")).body(vec![b'a'; 64]).send().await.unwrap();
    assert_eq!(at_limit.status(), 201, "a body of exactly max_body is accepted");

    let over = c.post(proxy.url("/handoff/v1/chat")).body(vec![b'a'; 65]).send().await.unwrap();
    assert_eq!(over.status(), 413, "content-length over max_body");
    assert_eq!(error_type(&over.text().await.unwrap()), "payload_too_large");

    let (tx, body) = streamed_body();
    let feeder = tokio::spawn(async move {
        for _ in 0..3 {
            if tx.send(bytes::Bytes::from(vec![b'b'; 40])).await.is_err() {
                break;
            }
        }
    });
    let chunked = c.post(proxy.url("/handoff/v1/chat")).body(body).send().await.unwrap();
    assert_eq!(chunked.status(), 413, "chunked body over max_body");
    assert_eq!(error_type(&chunked.text().await.unwrap()), "payload_too_large");
    feeder.await.unwrap();
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn post_over_max_tokens_is_503_with_retry_after() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let proxy = proxy_with(up.addr, |c| c.limits.max_tokens = 2).await;
    let c = client();
    let first = create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    let third = c.post(proxy.url("/handoff/v1/chat")).body("{}").send().await.unwrap();
    assert_eq!(third.status(), 503);
    let retry_after = third.headers().get("retry-after").expect("503 without Retry-After");
    retry_after.to_str().unwrap().parse::<u64>().expect("Retry-After is not a number of seconds");
    error_type(&third.text().await.unwrap());

    // Redeeming a token frees its place.
    get_all(&proxy, &first.stream_url, None).await;
    create(&c, &proxy.url(""), "/v1/chat", "{}").await;
}

// ---------------------------------------------------------------- 2. tokens

#[tokio::test]
async fn tokens_are_128_bit_url_safe_base64_and_distinct() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let c = client();
    let mut tokens = HashSet::new();
    for _ in 0..64 {
        let t = create(&c, &proxy.url(""), "/v1/chat", "{}").await.token;
        assert!(
            t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "not URL-safe base64 without padding: {t}"
        );
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&t).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert!(raw.len() >= 16, "token {t} carries {} bits", raw.len() * 8);
        assert!(tokens.insert(t.clone()), "token {t} issued twice");
    }
    let text = metrics_text(proxy.admin).await;
    for t in &tokens {
        assert!(!text.contains(t.as_str()), "token in /metrics");
    }
}

// ---------------------------------------------------------------- 3. GET

#[tokio::test]
async fn get_sends_head_retry_and_comment_before_the_upstream_answers() {
    let mut up = RawUpstream::start().await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", r#"{"q":1}"#).await;

    let resp = get(&proxy, &created.stream_url, None).await;
    assert_eq!(resp.status(), 200);
    assert_event_stream_head(resp.headers());
    let mut reader = BodyReader::new(resp);
    let prelude = reader.until("\n:").await;
    assert!(prelude.starts_with("retry: 2000\n"), "the stream must open with retry: 2000; got {prelude:?}");
    let comment = reader.until("\n").await;
    assert!(!prelude.contains("data:") && !comment.contains("data:"), "no event before the upstream answered");

    // Only now does the upstream answer: the request is waiting for it.
    let mut conn = up.accept().await;
    let (head, _) = read_head(&mut conn).await;
    assert!(head.starts_with("POST /v1/chat HTTP/1.1\r\n"), "{head}");
    let body = "data: a\n\nevent: delta\ndata: b\n\n";
    let answer =
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    conn.write_all(answer.as_bytes()).await.unwrap();
    let evs = parse_sse(&reader.rest().await);
    assert_eq!(ids(&evs), [1, 2, 3]);
    assert_eq!(datas(&evs)[..2], ["a", "b"]);
    assert_eq!(evs[1].event.as_deref(), Some("delta"));
    assert_end(&evs[2], "complete");
}

#[tokio::test]
async fn token_starts_one_upstream_request_ever_and_later_gets_replay() {
    let chunks = {
        let mut c = sse_chunks(4);
        c.insert(2, b"event: tool\ndata: {\"x\":1}\n\n".to_vec());
        c
    };
    let up = Upstream::start(move |_| reply_sse(&chunks)).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let first = get_all(&proxy, &created.stream_url, None).await;
    assert_eq!(ids(&first), [1, 2, 3, 4, 5, 6], "ids 1..N, the end event too");
    assert_eq!(datas(&first)[..5], ["e1", "e2", "{\"x\":1}", "e3", "e4"]);
    assert_eq!(first[2].event.as_deref(), Some("tool"));
    assert_end(&first[5], "complete");

    // Without Last-Event-ID: everything again, from the replay buffer.
    assert_eq!(get_all(&proxy, &created.stream_url, None).await, first);
    // With Last-Event-ID: exactly the events after it.
    assert_eq!(get_all(&proxy, &created.stream_url, Some("3")).await, first[3..]);
    assert_eq!(get_all(&proxy, &created.stream_url, Some("5")).await, first[5..]);
    // The final id: 204, which stops EventSource.
    let done = get(&proxy, &created.stream_url, Some("6")).await;
    assert_eq!(done.status(), 204);
    assert!(body_text(done).await.is_empty());
    assert_eq!(up.count(), 1, "the token started exactly one upstream request");
}

#[tokio::test]
async fn concurrent_first_gets_start_one_upstream_request() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(3)).paced(Duration::from_millis(20))).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    let gets = (0..8).map(|_| async {
        let resp = get(&proxy, &created.stream_url, None).await;
        assert_eq!(resp.status(), 200);
        body_text(resp).await
    });
    futures_util::future::join_all(gets).await;
    let mut completed = up.completed.clone();
    wait_for(&mut completed, 1).await;
    assert_eq!(up.count(), 1, "eight racing GETs started {} upstream requests", up.count());
    // The last GET to take over saw the end; a replay now has it all.
    let evs = get_all(&proxy, &created.stream_url, None).await;
    assert_eq!(datas(&evs)[..3], ["e1", "e2", "e3"]);
    assert_end(&evs[3], "complete");
}

#[tokio::test]
async fn resume_replays_after_last_event_id_then_follows_live() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    for i in 1..=3 {
        feed.send(format!("data: e{i}\n\n")).await;
        first.until(&format!("data: e{i}\n\n")).await;
    }
    drop(first); // the connection is cut mid-stream

    let resp = get(&proxy, &created.stream_url, Some("2")).await;
    assert_eq!(resp.status(), 200);
    assert_event_stream_head(resp.headers());
    let mut second = BodyReader::new(resp);
    let replayed = parse_sse(&second.until("data: e3\n\n").await);
    assert_eq!(ids(&replayed), [3], "exactly the events after Last-Event-ID");
    // Then live.
    feed.send("data: e4\n\n").await;
    let live = parse_sse(&second.until("data: e4\n\n").await);
    assert_eq!((ids(&live), datas(&live)), (vec![4], vec!["e4".to_string()]));
    feed.send("data: e5\n\n").await;
    feed.finish();
    let rest = parse_sse(&second.rest().await);
    assert_eq!(ids(&rest), [5, 6]);
    assert_eq!(rest[0].data, "e5");
    assert_end(&rest[1], "complete");
    let m = metrics_text(proxy.admin).await;
    assert!(metric(&m, "ssegate_resumes_total") >= 1.0);
    assert!(metric(&m, "ssegate_replayed_events_total") >= 1.0);
}

#[tokio::test]
async fn resume_without_last_event_id_replays_everything_then_follows_live() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    for i in 1..=2 {
        feed.send(format!("data: e{i}\n\n")).await;
        first.until(&format!("data: e{i}\n\n")).await;
    }
    drop(first);
    let mut second = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    assert_eq!(ids(&parse_sse(&second.until("data: e2\n\n").await)), [1, 2]);
    feed.send("data: e3\n\n").await;
    feed.finish();
    let rest = parse_sse(&second.rest().await);
    assert_eq!(ids(&rest), [3, 4]);
    assert_end(&rest[1], "complete");
}

#[tokio::test]
async fn last_event_id_older_than_the_replay_buffer_is_a_replay_gap_error() {
    let up = Upstream::start(|_| {
        let chunks: Vec<Vec<u8>> =
            (1..=30).map(|i| format!("data: event number {i:02} with some padding\n\n").into_bytes()).collect();
        reply_sse(&chunks)
    })
    .await;
    let proxy = proxy_with(up.addr, |c| c.handoff.replay_bytes = 200).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    let all = get_all(&proxy, &created.stream_url, None).await;
    assert_eq!(ids(&all), (1..=31).collect::<Vec<_>>());

    let gap = get_all(&proxy, &created.stream_url, Some("1")).await;
    let last = gap.last().expect("no event after an old Last-Event-ID");
    assert_eq!(error_event_type(last), "replay_gap");
    assert!(gap.iter().all(|e| e.event.as_deref() == Some("error")), "no stale events before the gap: {gap:?}");
    // What the buffer still holds replays fine.
    assert_eq!(get_all(&proxy, &created.stream_url, Some("29")).await, all[29..]);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn unknown_token_is_404_json() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let resp = get(&proxy, "/stream/AAAAAAAAAAAAAAAAAAAAAA", None).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    error_type(&resp.text().await.unwrap());
    let resp = client().delete(proxy.url("/stream/AAAAAAAAAAAAAAAAAAAAAA")).send().await.unwrap();
    assert_eq!(resp.status(), 404, "DELETE of an unknown token");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn unused_token_expires_after_ttl() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(5)).paced(Duration::from_millis(100))).await;
    let proxy = proxy_with(up.addr, |c| c.handoff.ttl = Duration::from_millis(200)).await;
    let c = client();
    let unused = create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    // ttl only bounds unused tokens: a stream that outlives it still runs.
    let used = create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    let evs = get_all(&proxy, &used.stream_url, None).await;
    assert_eq!(ids(&evs), [1, 2, 3, 4, 5, 6]);
    assert_end(&evs[5], "complete");

    wait_metric(proxy.admin, "ssegate_tokens_expired_total", 1.0).await;
    let resp = get(&proxy, &unused.stream_url, None).await;
    assert_eq!(resp.status(), 404, "expired token");
    error_type(&resp.text().await.unwrap());
    assert_eq!(up.count(), 1, "the expired token sent nothing upstream");
}

#[tokio::test]
async fn a_new_get_takes_the_stream_over_and_ends_the_previous_connection() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;

    let mut second = BodyReader::new(get(&proxy, &created.stream_url, Some("1")).await);
    let ended = first.rest().await; // the previous connection's body ends
    assert!(!ended.contains("data:"), "the replaced client got more events: {ended:?}");
    feed.send("data: e2\n\n").await;
    feed.finish();
    let evs = parse_sse(&second.rest().await);
    assert_eq!(ids(&evs), [2, 3]);
    assert_eq!(evs[0].data, "e2");
    assert_end(&evs[1], "complete");
}

#[tokio::test]
async fn no_client_for_resume_grace_cancels_the_upstream_and_forgets_the_stream() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let grace = Duration::from_millis(300);
    let proxy = proxy_with(up.addr, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    let left = tokio::time::Instant::now();
    drop(first);
    feed.closed().await; // the upstream connection is closed
    assert!(left.elapsed() >= grace, "cancelled after {:?}, before resume_grace", left.elapsed());
    let resp = get(&proxy, &created.stream_url, None).await;
    assert_eq!(resp.status(), 404, "the stream is forgotten after its grace");
    wait_metric(proxy.admin, "ssegate_streams_cancelled_total{reason=\"grace\"}", 1.0).await;
}

#[tokio::test]
async fn a_client_back_within_resume_grace_keeps_the_stream() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let grace = Duration::from_millis(300);
    let proxy = proxy_with(up.addr, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first);
    let mut second = BodyReader::new(get(&proxy, &created.stream_url, Some("1")).await);
    second.until(": ok\n\n").await;
    // Nothing to await here: the test checks that nothing happens (no cancel)
    // over twice the grace while a client is attached.
    tokio::time::sleep(grace * 2).await;
    feed.send("data: e2\n\n").await;
    second.until("data: e2\n\n").await;
    feed.finish();
    let rest = parse_sse(&second.rest().await);
    assert_end(rest.last().unwrap(), "complete");
}

#[tokio::test]
async fn an_ended_stream_replays_within_resume_grace_then_is_forgotten() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(2))).await;
    let grace = Duration::from_millis(300);
    let proxy = proxy_with(up.addr, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    let evs = get_all(&proxy, &created.stream_url, None).await;
    assert_eq!(ids(&evs), [1, 2, 3]);
    let ended = tokio::time::Instant::now();
    // A GET with the final id attaches nothing: 204 while the stream is
    // held, 404 once it is forgotten.
    let deadline = ended + Duration::from_secs(10);
    loop {
        let resp = get(&proxy, &created.stream_url, Some("3")).await;
        match resp.status().as_u16() {
            204 => {}
            404 => break,
            s => panic!("GET with the final id answered {s}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "the ended stream was never forgotten");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ended.elapsed() >= grace, "forgotten after {:?}, before resume_grace", ended.elapsed());
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn resume_grace_zero_cancels_at_once_on_disconnect() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = proxy_with(up.addr, |c| c.handoff.resume_grace = Duration::ZERO).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first);
    tokio::time::timeout(Duration::from_secs(2), feed.closed())
        .await
        .expect("resume_grace = 0s did not cancel at once");
    let resp = get(&proxy, &created.stream_url, None).await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_send_timeout() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = proxy_with(up.addr, |c| {
        c.handoff.resume_grace = Duration::ZERO;
        c.limits.send_timeout = Duration::from_millis(300);
    })
    .await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    let resp = get(&proxy, &created.stream_url, None).await;
    assert_eq!(resp.status(), 200);
    // The client reads nothing, and the model has plenty: the producer takes
    // it into the replay buffer, the client's socket fills up.
    let feed = std::sync::Arc::new(up.next().await);
    let _feeder = feed.flood();
    // Disconnected after send_timeout; with resume_grace = 0s that cancels.
    feed.closed().await;
    drop(resp);
}

#[tokio::test]
async fn upstream_error_status_becomes_an_upstream_status_error_event() {
    let upstream_body = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
    let up = Upstream::start(move |_| Reply::full(429, "application/json", upstream_body)).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    let evs = get_all(&proxy, &created.stream_url, None).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(ids(&evs), [1]);
    assert_eq!(error_event_type(&evs[0]), "upstream_status");
    let v: serde_json::Value = serde_json::from_str(&evs[0].data).unwrap();
    assert_eq!(v["error"]["status"], 429);
    assert_eq!(v["error"]["body"], serde_json::from_str::<serde_json::Value>(upstream_body).unwrap());
    let done = get(&proxy, &created.stream_url, Some("1")).await;
    assert_eq!(done.status(), 204, "the error event is the final one");
}

// ---------------------------------------------------------------- 4. DELETE

#[tokio::test]
async fn delete_while_streaming_cancels_upstream_and_ends_the_client_with_cancelled() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut reader = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    for i in 1..=2 {
        feed.send(format!("data: e{i}\n\n")).await;
        reader.until(&format!("data: e{i}\n\n")).await;
    }
    let resp = client().delete(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert!(resp.text().await.unwrap().is_empty());
    let rest = parse_sse(&reader.rest().await);
    assert_eq!(ids(&rest), [3], "the attached client gets the end event, then its body ends");
    assert_end(&rest[0], "cancelled");
    feed.closed().await; // the upstream request is cancelled

    // The stream behaves as an ended one.
    let replay = get_all(&proxy, &created.stream_url, None).await;
    assert_eq!(ids(&replay), [1, 2, 3]);
    assert_eq!(datas(&replay)[..2], ["e1", "e2"]);
    assert_end(&replay[2], "cancelled");
    let done = get(&proxy, &created.stream_url, Some("3")).await;
    assert_eq!(done.status(), 204);
}

#[tokio::test]
async fn delete_with_no_client_attached_cancels_and_leaves_a_replayable_end() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let mut reader = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    reader.until("data: e1\n\n").await;
    drop(reader); // a dropped tab: within resume_grace (30 s)
    let resp = client().delete(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    feed.closed().await;
    let replay = get_all(&proxy, &created.stream_url, Some("1")).await;
    assert_eq!(ids(&replay), [2]);
    assert_end(&replay[0], "cancelled");
}

#[tokio::test]
async fn delete_of_an_unused_token_sends_nothing_upstream() {
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    let resp = client().delete(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    let resp = get(&proxy, &created.stream_url, None).await;
    let status = resp.status();
    let text = body_text(resp).await;
    assert_eq!(up.count(), 0, "a stopped token started an upstream request (GET answered {status}: {text:?})");
}

// ---------------------------------------------------------------- 5. max_streams

#[tokio::test]
async fn max_streams_refuses_another_stream_with_503_and_retry_after() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = proxy_with(up.addr, |c| {
        c.limits.max_streams = 1;
        c.handoff.resume_grace = Duration::from_millis(200);
    })
    .await;
    let c = client();
    let a = create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    let b = create(&c, &proxy.url(""), "/v1/chat", "{}").await;

    let mut reader = BodyReader::new(get(&proxy, &a.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    reader.until("data: e1\n\n").await;

    let refused = get(&proxy, &b.stream_url, None).await;
    assert_eq!(refused.status(), 503);
    let retry_after = refused.headers().get("retry-after").expect("503 without Retry-After");
    retry_after.to_str().unwrap().parse::<u64>().expect("Retry-After is not a number of seconds");
    error_type(&refused.text().await.unwrap());

    // A ends and is forgotten after its grace; then B's token still works.
    feed.finish();
    reader.rest().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let resp = loop {
        let resp = get(&proxy, &b.stream_url, None).await;
        if resp.status() != 503 {
            break resp;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot of a forgotten stream was never released");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(resp.status(), 200, "a refused GET must not use up its token");
    let mut reader = BodyReader::new(resp);
    let feed = up.next().await;
    feed.send("data: b1\n\n").await;
    feed.finish();
    assert_end(parse_sse(&reader.rest().await).last().unwrap(), "complete");
}

#[tokio::test]
async fn max_streams_does_not_refuse_resuming_a_held_stream() {
    // "a handoff stream counts until forgotten": resuming it is not another stream.
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = proxy_with(up.addr, |c| c.limits.max_streams = 1).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;
    let mut first = BodyReader::new(get(&proxy, &created.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first);
    let resp = get(&proxy, &created.stream_url, Some("1")).await;
    assert_eq!(resp.status(), 200, "resuming the only stream was refused (max_streams = 1)");
    let mut second = BodyReader::new(resp);
    feed.send("data: e2\n\n").await;
    feed.finish();
    let evs = parse_sse(&second.rest().await);
    assert_eq!(ids(&evs), [2, 3]);
}

// ---------------------------------------------------------------- 6. slow client

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_stall_the_producer() {
    const EVENT: usize = 100;
    const TOTAL: usize = 5 << 20;
    let events = TOTAL / EVENT;
    let up = Upstream::start(move |_| {
        let one = format!("data: {}\n\n", "x".repeat(EVENT - 8));
        let chunks: Vec<Vec<u8>> =
            (0..events).collect::<Vec<_>>().chunks(100).map(|c| one.repeat(c.len()).into_bytes()).collect();
        reply_sse(&chunks)
    })
    .await;
    let proxy = Proxy::start(config(up.addr)).await;
    let created = create(&client(), &proxy.url(""), "/v1/chat", "{}").await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(proxy.addr).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\nconnection: close\r\n\r\n",
        created.stream_url
    );
    conn.write_all(req.as_bytes()).await.unwrap();

    // The client reads nothing; the upstream is read to its end anyway.
    let mut completed = up.completed.clone();
    wait_for(&mut completed, 1).await;
    assert_eq!(*up.cancelled.borrow(), 0);

    // Now read what the client gets: contiguous events from 1, then either the
    // whole stream or (its cursor having fallen out of replay_bytes) replay_gap.
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut raw))
        .await
        .expect("stream did not end")
        .unwrap();
    let resp = parse_raw(&raw);
    assert_eq!(resp.status, 200);
    let evs = parse_sse(&resp.text());
    let (numbered, last) = evs.split_at(evs.len() - 1);
    assert_eq!(ids(numbered), (1..=numbered.len() as u64).collect::<Vec<_>>());
    let last = &last[0];
    eprintln!("the client that never read got {} of {events} events, then {:?}", numbered.len(), last.event);
    if last.event.as_deref() == Some("end") {
        assert_eq!(numbered.len(), events);
        assert_end(last, "complete");
    } else {
        assert_eq!(error_event_type(last), "replay_gap", "{last:?}");
        assert!(numbered.len() < events);
    }
}

// ---------------------------------------------------------------- 7. CORS

fn has_cors(h: &reqwest::header::HeaderMap) -> bool {
    h.keys().any(|k| k.as_str().starts_with("access-control-"))
}

fn list_contains(h: &reqwest::header::HeaderMap, name: &str, item: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(item))
}

#[tokio::test]
async fn cors_for_allowed_origins_only() {
    const ORIGIN: &str = "https://app.example";
    let up = Upstream::start(|_| reply_sse(&sse_chunks(2))).await;
    let proxy = proxy_with(up.addr, |c| c.cors.allow_origins = vec![ORIGIN.into()]).await;
    let c = client();
    let preflight = |path: String, method: &'static str, origin: &'static str| {
        let c = c.clone();
        async move {
            c.request(http::Method::OPTIONS, path)
                .header("origin", origin)
                .header("access-control-request-method", method)
                .header("access-control-request-headers", "content-type, authorization")
                .send()
                .await
                .unwrap()
        }
    };

    let pre = preflight(proxy.url("/handoff/v1/chat"), "POST", ORIGIN).await;
    assert_eq!(pre.status(), 204, "preflight for the POST");
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    for m in ["POST", "DELETE"] {
        assert!(list_contains(h, "access-control-allow-methods", m), "allow-methods lacks {m}: {h:?}");
    }
    for name in ["content-type", "authorization"] {
        assert!(list_contains(h, "access-control-allow-headers", name), "allow-headers lacks {name}: {h:?}");
    }
    assert_eq!(up.count(), 0, "a preflight goes nowhere");

    let post = c
        .post(proxy.url("/handoff/v1/chat"))
        .header("origin", ORIGIN)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 201);
    assert_eq!(post.headers()["access-control-allow-origin"], ORIGIN);
    assert!(list_contains(post.headers(), "access-control-expose-headers", "location"), "{:?}", post.headers());
    let created = parse_created(&post.text().await.unwrap());

    let pre = preflight(proxy.url(&created.stream_url), "DELETE", ORIGIN).await;
    assert_eq!(pre.status(), 204, "preflight for the DELETE");
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    assert!(list_contains(h, "access-control-allow-methods", "DELETE"), "{h:?}");
    for name in ["content-type", "authorization"] {
        assert!(list_contains(h, "access-control-allow-headers", name), "allow-headers lacks {name}: {h:?}");
    }

    let get = c.get(proxy.url(&created.stream_url)).header("origin", ORIGIN).send().await.unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.headers()["access-control-allow-origin"], ORIGIN);
    body_text(get).await;
    let del = c.delete(proxy.url(&created.stream_url)).header("origin", ORIGIN).send().await.unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(del.headers()["access-control-allow-origin"], ORIGIN);
    assert!(list_contains(del.headers(), "access-control-expose-headers", "location"));

    // Another origin, or none: no CORS headers at all.
    for origin in ["https://evil.example", "null"] {
        let pre = preflight(proxy.url("/handoff/v1/chat"), "POST", origin).await;
        assert!(!has_cors(pre.headers()), "preflight from {origin}: {:?}", pre.headers());
        let pre = preflight(proxy.url(&created.stream_url), "DELETE", origin).await;
        assert!(!has_cors(pre.headers()), "preflight from {origin}: {:?}", pre.headers());
        let post = c.post(proxy.url("/handoff/v1/chat")).header("origin", origin).body("{}").send().await.unwrap();
        assert_eq!(post.status(), 201);
        assert!(!has_cors(post.headers()), "POST from {origin}: {:?}", post.headers());
        let other = parse_created(&post.text().await.unwrap());
        let get = c.get(proxy.url(&other.stream_url)).header("origin", origin).send().await.unwrap();
        assert!(!has_cors(get.headers()), "GET from {origin}: {:?}", get.headers());
        body_text(get).await;
        let del = c.delete(proxy.url(&other.stream_url)).header("origin", origin).send().await.unwrap();
        assert!(!has_cors(del.headers()), "DELETE from {origin}: {:?}", del.headers());
    }
    let post = c.post(proxy.url("/handoff/v1/chat")).body("{}").send().await.unwrap();
    assert!(!has_cors(post.headers()), "POST without Origin: {:?}", post.headers());
}

// ---------------------------------------------------------------- 8. metrics

#[tokio::test]
async fn handoff_metrics_move() {
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = proxy_with(up.addr, |c| {
        c.handoff.ttl = Duration::from_millis(500);
        c.handoff.resume_grace = Duration::from_millis(200);
    })
    .await;
    let c = client();
    let base = proxy.url("");
    let mut tokens = Vec::new();

    // Expired: issued and never used.
    tokens.push(create(&c, &base, "/v1/chat", "{}").await.token);

    // Redeemed, then resumed by a takeover that replays two events.
    let a = create(&c, &base, "/v1/chat", "{}").await;
    let mut first = BodyReader::new(get(&proxy, &a.stream_url, None).await);
    let feed = up.next().await;
    for i in 1..=2 {
        feed.send(format!("data: e{i}\n\n")).await;
        first.until(&format!("data: e{i}\n\n")).await;
    }
    let mut second = BodyReader::new(get(&proxy, &a.stream_url, None).await);
    second.until("data: e2\n\n").await;
    first.rest().await;
    feed.finish();
    second.rest().await;
    tokens.push(a.token);

    // Cancelled after grace.
    let b = create(&c, &base, "/v1/chat", "{}").await;
    let mut reader = BodyReader::new(get(&proxy, &b.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    reader.until("data: e1\n\n").await;
    drop(reader);
    feed.closed().await;
    tokens.push(b.token);

    // Cancelled by DELETE.
    let d = create(&c, &base, "/v1/chat", "{}").await;
    let mut reader = BodyReader::new(get(&proxy, &d.stream_url, None).await);
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    reader.until("data: e1\n\n").await;
    assert_eq!(c.delete(proxy.url(&d.stream_url)).send().await.unwrap().status(), 204);
    reader.rest().await;
    feed.closed().await;
    tokens.push(d.token);

    let text = wait_metric(proxy.admin, "ssegate_tokens_expired_total", 1.0).await;
    let mut missing = Vec::new();
    for (series, at_least) in [
        ("ssegate_tokens_issued_total", 4.0),
        ("ssegate_tokens_redeemed_total", 3.0),
        ("ssegate_tokens_expired_total", 1.0),
        ("ssegate_resumes_total", 1.0),
        ("ssegate_replayed_events_total", 2.0),
        ("ssegate_streams_cancelled_total{reason=\"grace\"}", 1.0),
        ("ssegate_streams_cancelled_total{reason=\"delete\"}", 1.0),
    ] {
        let v = metric(&text, series);
        if v < at_least {
            missing.push(format!("{series} = {v}, expected >= {at_least}"));
        }
    }
    for t in &tokens {
        assert!(!text.contains(t.as_str()), "a token appears in /metrics");
    }
    assert!(missing.is_empty(), "metrics that did not move:\n{}\n\n{text}", missing.join("\n"));
}
