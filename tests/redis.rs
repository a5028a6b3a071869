//! The Redis store: several proxy instances sharing tokens and streams
//! through a real `redis-server` (one per test, on a free port).
//! CONTRACT.md "Handoff" and `handoff.store`; issue [4/7 redis].

#[path = "support/handoff.rs"]
mod handoff_support;
#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use handoff_support::{create, parse_created};
use redis_support::*;
use ssegate::config::Config;
use support::*;
use tokio::time::Instant;

/// `n` proxy instances sharing `redis`, in front of `upstream`, with `edit`
/// applied to each config.
async fn instances(
    n: usize,
    upstream: std::net::SocketAddr,
    redis: &RedisServer,
    edit: impl Fn(&mut Config),
) -> Vec<Proxy> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c = redis_config(upstream, redis);
        edit(&mut c);
        out.push(Proxy::start(c).await);
    }
    out
}

/// An upstream whose path says what to send: `/v1/slow`: 200 events 50 ms
/// apart (10 s, still running while a test looks); anything else: 3 events
/// at once.
async fn slow_or_fast_upstream() -> Upstream {
    Upstream::start(|seen| {
        if seen.uri.path().ends_with("/slow") {
            reply_sse(&sse_chunks(200)).paced(Duration::from_millis(50))
        } else {
            reply_sse(&sse_chunks(3))
        }
    })
    .await
}

/// Reads a stream until an event with id `id` has been read whole.
async fn until_id(reader: &mut BodyReader, id: u64) -> Vec<Ev> {
    let mut text = reader.until(&format!("id: {id}\n")).await;
    text.push_str(&reader.until("\n\n").await);
    parse_sse(&text)
}

/// Asserts that `evs` carry the ids `from`, `from + 1`, … without a gap or
/// a repeat.
fn assert_contiguous(evs: &[Ev], from: u64) {
    let got = ids(evs);
    let want: Vec<u64> = (from..from + got.len() as u64).collect();
    assert_eq!(got, want, "ids are not contiguous from {from}");
}

// ------------------------------------------------ 1. one token, any instance

#[tokio::test]
async fn post_on_a_stream_on_b_every_event_once_and_one_upstream_request() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(20)).paced(Duration::from_millis(10))).await;
    let p = instances(2, up.addr, &redis, |_| {}).await;
    let (a, b) = (&p[0], &p[1]);
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = client()
        .post(a.url("/handoff/v1/chat?x=1"))
        .header("authorization", "Bearer sk-client")
        .header("content-type", "application/json")
        .header("x-custom", "kept")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created = parse_created(&resp.text().await.unwrap());
    assert_eq!(up.count(), 0, "nothing goes upstream before the GET");

    let evs = get_all(b, &created.stream_url, None).await;
    assert_eq!(ids(&evs), (1..=21).collect::<Vec<_>>(), "ids 1..N, the end event too");
    assert_eq!(datas(&evs[..20]), (1..=20).map(|i| format!("e{i}")).collect::<Vec<_>>());
    assert!(evs[..20].iter().all(|e| e.event.is_none()));
    assert_end(&evs[20], "complete");

    // The request stored by A went upstream from B, unchanged.
    assert_eq!(up.count(), 1);
    let seen = up.last();
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/v1/chat?x=1");
    assert_eq!(&seen.body[..], body.as_bytes());
    assert_eq!(seen.headers["authorization"], "Bearer sk-client");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["x-custom"], "kept");

    // A replays it from Redis, B from its own log: the same events.
    assert_eq!(get_all(a, &created.stream_url, None).await, evs);
    assert_eq!(get_all(b, &created.stream_url, None).await, evs);
    assert_eq!(up.count(), 1, "a replay started another upstream request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_redeemed_at_once_on_two_instances_starts_one_upstream_request() {
    const TOKENS: usize = 20;
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(3)).paced(Duration::from_millis(20))).await;
    let p = instances(2, up.addr, &redis, |_| {}).await;
    let c = client();
    let mut urls = Vec::new();
    for i in 0..TOKENS {
        urls.push(create(&c, &p[i % 2].url(""), &format!("/v1/chat/{i}"), "{}").await.stream_url);
    }
    // Every token's first GETs race: two on A and two on B at the same time.
    let p = &p;
    let gets = urls.iter().flat_map(|url| {
        (0..4).map(move |k| async move {
            let resp = get(&p[k % 2], url, None).await;
            assert_eq!(resp.status(), 200, "a racing first GET");
            body_text(resp).await
        })
    });
    futures_util::future::join_all(gets).await;
    let mut completed = up.completed.clone();
    wait_for(&mut completed, TOKENS).await;
    assert_eq!(up.count(), TOKENS, "{TOKENS} tokens redeemed on two instances at once");
    let mut paths: Vec<String> = up.seen.lock().unwrap().iter().map(|s| s.uri.path().to_string()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), TOKENS, "some token went upstream twice");
    for url in &urls {
        for proxy in p {
            let evs = get_all(proxy, url, None).await;
            assert_eq!(ids(&evs), [1, 2, 3, 4]);
            assert_eq!(datas(&evs[..3]), ["e1", "e2", "e3"]);
            assert_end(&evs[3], "complete");
        }
    }
}

#[tokio::test]
async fn event_names_multi_line_data_and_utf8_reach_another_instance_unchanged() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| {
        let body: [&[u8]; 3] = [
            b"event: tool\ndata: {\"x\":1}\n\n",
            b"data: line one\ndata: line two\n\n",
            "data: caf\u{e9} \u{1f642}\n\n".as_bytes(),
        ];
        Reply::chunks(SSE, &body)
    })
    .await;
    let p = instances(2, up.addr, &redis, |_| {}).await;
    let created = create(&client(), &p[0].url(""), "/v1/chat", "{}").await;
    let produced = get_all(&p[0], &created.stream_url, None).await;
    assert_eq!(ids(&produced), [1, 2, 3, 4]);
    assert_eq!(produced[0].event.as_deref(), Some("tool"));
    assert_eq!(datas(&produced[..3]), ["{\"x\":1}", "line one\nline two", "caf\u{e9} \u{1f642}"]);
    // Byte for byte the same on the instance that read it from Redis.
    let raw = |proxy: &Proxy| {
        let url = proxy.url(&created.stream_url);
        async move { body_text(client().get(url).send().await.unwrap()).await }
    };
    assert_eq!(raw(&p[1]).await, raw(&p[0]).await);
}

#[tokio::test]
async fn max_tokens_counts_unused_tokens_of_every_instance() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let p = instances(2, up.addr, &redis, |c| c.limits.max_tokens = 2).await;
    let c = client();
    create(&c, &p[0].url(""), "/v1/chat", "{}").await;
    let second = create(&c, &p[1].url(""), "/v1/chat", "{}").await;
    for proxy in &p {
        let resp = c.post(proxy.url("/handoff/v1/chat")).body("{}").send().await.unwrap();
        assert_eq!(resp.status(), 503, "a third unused token on {}", proxy.addr);
        assert!(resp.headers().contains_key("retry-after"));
    }
    // Redeeming one (on the other instance) makes room again.
    assert_eq!(ids(&get_all(&p[0], &second.stream_url, None).await), [1, 2]);
    create(&c, &p[1].url(""), "/v1/chat", "{}").await;
}

#[tokio::test]
async fn an_unused_token_expires_after_ttl_on_every_instance() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let ttl = Duration::from_millis(300);
    let p = instances(2, up.addr, &redis, |c| c.handoff.ttl = ttl).await;
    let created = create(&client(), &p[0].url(""), "/v1/chat", "{}").await;
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    for proxy in &p {
        assert_eq!(get(proxy, &created.stream_url, None).await.status(), 404, "expired token on {}", proxy.addr);
    }
    assert_eq!(up.count(), 0);
}

// ------------------------------------------------ 2. cut and resume elsewhere

#[tokio::test]
async fn cut_on_b_and_resume_on_c_replays_after_last_event_id_then_follows_live() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let p = instances(3, up.addr, &redis, |_| {}).await;
    let (a, b, c) = (&p[0], &p[1], &p[2]);
    let created = create(&client(), &a.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(b, &created.stream_url, None).await);
    let feed = up.next().await;
    for i in 1..=3 {
        feed.send(format!("data: e{i}\n\n")).await;
        first.until(&format!("data: e{i}\n\n")).await;
    }
    drop(first); // the connection is cut mid-stream

    let resp = get(c, &created.stream_url, Some("2")).await;
    assert_eq!(resp.status(), 200);
    let mut second = BodyReader::new(resp);
    let replayed = parse_sse(&second.until("data: e3\n\n").await);
    assert_eq!(ids(&replayed), [3], "exactly the events after Last-Event-ID");
    feed.send("data: e4\n\n").await;
    let live = parse_sse(&second.until("data: e4\n\n").await);
    assert_eq!((ids(&live), datas(&live)), (vec![4], vec!["e4".to_string()]));
    feed.send("data: e5\n\n").await;
    feed.finish();
    let rest = parse_sse(&second.rest().await);
    assert_eq!(ids(&rest), [5, 6]);
    assert_eq!(rest[0].data, "e5");
    assert_end(&rest[1], "complete");
}

#[tokio::test]
async fn get_with_the_final_id_is_204_on_every_instance() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(3))).await;
    let p = instances(4, up.addr, &redis, |_| {}).await;
    let created = create(&client(), &p[0].url(""), "/v1/chat", "{}").await;
    let evs = get_all(&p[1], &created.stream_url, None).await; // B produces
    assert_eq!(ids(&evs), [1, 2, 3, 4]);
    assert_eq!(get_all(&p[2], &created.stream_url, None).await, evs); // C follows
                                                                      // A took only the POST and D never saw the token: both know the stream
                                                                      // from Redis alone.
    let mut answers = Vec::new();
    for (name, proxy) in
        [("A (took the POST)", &p[0]), ("B (produced)", &p[1]), ("C (replayed)", &p[2]), ("D (new)", &p[3])]
    {
        let resp = get(proxy, &created.stream_url, Some("4")).await;
        let status = resp.status().as_u16();
        let text = body_text(resp).await;
        answers.push(format!("{name}: {status} {text:?}"));
    }
    assert!(answers.iter().all(|a| a.contains(": 204 \"\"")), "GET with the final id (4):\n{}", answers.join("\n"));
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn last_event_id_older_than_replay_bytes_is_a_replay_gap_on_another_instance() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| {
        let chunks: Vec<Vec<u8>> =
            (1..=30).map(|i| format!("data: event number {i:02} with some padding\n\n").into_bytes()).collect();
        reply_sse(&chunks)
    })
    .await;
    let p = instances(3, up.addr, &redis, |c| c.handoff.replay_bytes = 200).await;
    let created = create(&client(), &p[0].url(""), "/v1/chat", "{}").await;
    let all = get_all(&p[0], &created.stream_url, None).await;
    assert_eq!(ids(&all), (1..=31).collect::<Vec<_>>());

    for proxy in &p[1..] {
        let gap = get_all(proxy, &created.stream_url, Some("1")).await;
        let last = gap.last().expect("no event after an old Last-Event-ID");
        assert_eq!(error_event_type(last), "replay_gap", "on {}", proxy.addr);
        assert!(gap.iter().all(|e| e.event.as_deref() == Some("error")), "stale events before the gap: {gap:?}");
        // What replay_bytes still holds replays fine, on every instance.
        assert_eq!(get_all(proxy, &created.stream_url, Some("29")).await, all[29..]);
    }
    assert_eq!(up.count(), 1);
}

// ------------------------------------------------ 3. takeover

#[tokio::test]
async fn a_get_on_another_instance_ends_the_older_connection() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let p = instances(3, up.addr, &redis, |_| {}).await;
    let (a, b, c) = (&p[0], &p[1], &p[2]);
    let created = create(&client(), &c.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(a, &created.stream_url, None).await); // A produces
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;

    // B takes over from the producing instance…
    let mut second = BodyReader::new(get(b, &created.stream_url, Some("1")).await);
    let ended = first.rest().await;
    assert!(!ended.contains("data:"), "the replaced client on A got more events: {ended:?}");
    feed.send("data: e2\n\n").await;
    assert_eq!(ids(&parse_sse(&second.until("data: e2\n\n").await)), [2]);

    // …and the producing instance takes it back from B.
    let mut third = BodyReader::new(get(a, &created.stream_url, Some("2")).await);
    let ended = second.rest().await;
    assert!(!ended.contains("data:"), "the replaced client on B got more events: {ended:?}");
    feed.send("data: e3\n\n").await;
    feed.finish();
    let evs = parse_sse(&third.rest().await);
    assert_eq!(ids(&evs), [3, 4]);
    assert_eq!(evs[0].data, "e3");
    assert_end(&evs[1], "complete");
}

// ------------------------------------------------ 4. resume_grace and Stop

#[tokio::test]
async fn a_client_back_on_another_instance_within_grace_keeps_the_stream() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let grace = Duration::from_millis(800);
    let p = instances(2, up.addr, &redis, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &p[1].url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&p[0], &created.stream_url, None).await); // A produces
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first); // leaves A…
    let mut second = BodyReader::new(get(&p[1], &created.stream_url, Some("1")).await); // …back on B
    second.until(": ok\n\n").await;
    // Nothing to await: the test checks that nothing happens (no cancel on
    // A) over three times the grace while the client is attached on B.
    tokio::time::sleep(grace * 3).await;
    feed.send("data: e2\n\n").await; // panics if A dropped the upstream response
    assert_eq!(ids(&parse_sse(&second.until("data: e2\n\n").await)), [2]);
    feed.finish();
    let rest = parse_sse(&second.rest().await);
    assert_eq!(ids(&rest), [3]);
    assert_end(&rest[0], "complete");
}

/// Polls a GET with Last-Event-ID 1 on every instance until each answers
/// 404, failing at `deadline` with what they answered instead.
async fn wait_forgotten_everywhere(p: &[Proxy], redis: &RedisServer, url: &str, left: Instant, deadline: Instant) {
    let mut answers: BTreeMap<usize, String> = BTreeMap::new();
    loop {
        for (i, proxy) in p.iter().enumerate() {
            if answers.get(&i).is_some_and(|a| a.starts_with("404")) {
                continue;
            }
            let resp = get(proxy, url, Some("1")).await;
            answers.insert(i, format!("{} after {:?}", resp.status().as_u16(), left.elapsed()));
        }
        if answers.values().all(|a| a.starts_with("404")) {
            return;
        }
        if Instant::now() > deadline {
            // What a client gets instead, and what Redis holds.
            let resp = get(&p[1], url, Some("1")).await;
            let status = resp.status();
            let mut body = String::new();
            let mut resp = resp;
            let read = tokio::time::timeout(Duration::from_secs(3), async {
                while let Ok(Some(c)) = resp.chunk().await {
                    body.push_str(&String::from_utf8_lossy(&c));
                }
            })
            .await;
            let open = if read.is_err() { " (still open after 3 s)" } else { "" };
            let mut keys = Vec::new();
            for key in redis.keys().await {
                keys.push(format!("{key} PTTL {}", redis.pttl(&key).await));
            }
            panic!(
                "the abandoned stream is not forgotten {:?} after the last client left: {answers:?}; \
                 a GET on B now answers {status} {body:?}{open}; keys: {keys:?}",
                left.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_stream_abandoned_on_its_producer_is_404_on_every_instance_after_grace() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let grace = Duration::from_secs(1);
    let p = instances(3, up.addr, &redis, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &p[1].url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&p[0], &created.stream_url, None).await); // A produces
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first); // the only client leaves A, and never comes back
    let left = Instant::now();
    feed.closed().await;
    assert!(left.elapsed() >= grace, "cancelled {:?} after the client left, before resume_grace", left.elapsed());
    // Forgotten: 404 on every instance, at the latest once its keys expire
    // (resume_grace + 5 s).
    let deadline = left + grace + Duration::from_secs(8);
    wait_forgotten_everywhere(&p, &redis, &created.stream_url, left, deadline).await;
}

#[tokio::test]
async fn nobody_attached_anywhere_for_grace_cancels_the_upstream_and_forgets_the_stream() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let grace = Duration::from_secs(1);
    let p = instances(3, up.addr, &redis, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &p[2].url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&p[0], &created.stream_url, None).await); // A produces
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first);
    let mut second = BodyReader::new(get(&p[1], &created.stream_url, Some("1")).await);
    second.until(": ok\n\n").await;
    drop(second); // nobody is attached anywhere from now on
    let left = Instant::now();
    tokio::time::timeout(grace * 8, feed.closed()).await.unwrap_or_else(|_| {
        panic!("the upstream still runs {:?} after the last client left B (resume_grace {grace:?})", left.elapsed())
    });
    assert!(left.elapsed() >= grace, "cancelled {:?} after the last client left, before resume_grace", left.elapsed());

    // Forgotten: 404 on every instance, at the latest once its keys expire
    // (resume_grace + 5 s).
    let deadline = left + grace + Duration::from_secs(8);
    wait_forgotten_everywhere(&p, &redis, &created.stream_url, left, deadline).await;
}

#[tokio::test]
async fn the_grace_runs_from_when_the_last_client_left_any_instance() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let grace = Duration::from_secs(1);
    let p = instances(2, up.addr, &redis, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &p[1].url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&p[0], &created.stream_url, None).await); // A produces
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first);
    let left_a = Instant::now();
    let mut second = BodyReader::new(get(&p[1], &created.stream_url, Some("1")).await);
    second.until(": ok\n\n").await;
    // The client stays on B past A's grace, then leaves too.
    tokio::time::sleep_until(left_a + grace * 8 / 5).await;
    drop(second);
    let left_b = Instant::now();
    tokio::time::timeout(grace * 8, feed.closed()).await.unwrap_or_else(|_| {
        panic!("the upstream still runs {:?} after the last client left B (resume_grace {grace:?})", left_b.elapsed())
    });
    assert!(
        left_b.elapsed() >= grace,
        "the upstream was cancelled {:?} after the client left B, before resume_grace ({grace:?}); \
         it had left A {:?} before",
        left_b.elapsed(),
        left_b - left_a
    );
}

#[tokio::test]
async fn a_stream_whose_client_moved_to_another_instance_frees_its_max_streams_slot() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(3)).paced(Duration::from_millis(100))).await;
    let grace = Duration::from_millis(500);
    let p = instances(2, up.addr, &redis, |c| {
        c.handoff.resume_grace = grace;
        c.limits.max_streams = 1;
    })
    .await;
    let c = client();
    let created = create(&c, &p[0].url(""), "/v1/chat", "{}").await;
    let mut first = BodyReader::new(get(&p[0], &created.stream_url, None).await); // A produces
    until_id(&mut first, 1).await;
    drop(first);
    let rest = get_all(&p[1], &created.stream_url, Some("1")).await; // the client ends it on B
    assert_eq!(ids(&rest), [2, 3, 4]);
    let ended = Instant::now();

    // A forgets the stream after its grace: its one stream slot is free again.
    let deadline = ended + grace + Duration::from_secs(5);
    loop {
        let next = create(&c, &p[1].url(""), "/v1/chat", "{}").await;
        let resp = get(&p[0], &next.stream_url, None).await;
        if resp.status() == 200 {
            assert_eq!(ids(&parse_sse(&body_text(resp).await)), [1, 2, 3, 4]);
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(
            Instant::now() < deadline,
            "A still refuses a new stream (503, max_streams = 1) {:?} after the previous one ended on B",
            ended.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn delete_on_b_of_a_stream_produced_on_a_cancels_at_once() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let p = instances(2, up.addr, &redis, |_| {}).await;
    let (a, b) = (&p[0], &p[1]);
    let created = create(&client(), &a.url(""), "/v1/chat", "{}").await;

    let mut reader = BodyReader::new(get(a, &created.stream_url, None).await); // A produces, client on A
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    reader.until("data: e1\n\n").await;
    assert_eq!(delete(b, &created.stream_url).await, 204);
    tokio::time::timeout(Duration::from_secs(2), feed.closed()).await.expect("a DELETE on B did not cancel A at once");
    let rest = parse_sse(&reader.rest().await);
    assert_eq!(ids(&rest), [2]);
    assert_end(&rest[0], "cancelled");

    // Then it behaves as an ended stream, on both instances.
    for proxy in &p {
        let replay = get_all(proxy, &created.stream_url, Some("1")).await;
        assert_eq!(ids(&replay), [2]);
        assert_end(&replay[0], "cancelled");
    }
    assert_eq!(get(b, &created.stream_url, Some("2")).await.status(), 204);
    assert_eq!(delete(b, "/stream/AAAAAAAAAAAAAAAAAAAAAA").await, 404, "DELETE of an unknown token");
}

#[tokio::test]
async fn delete_on_c_ends_a_client_following_on_b_with_cancelled() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let p = instances(3, up.addr, &redis, |_| {}).await;
    let (a, b, c) = (&p[0], &p[1], &p[2]);
    let created = create(&client(), &a.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(a, &created.stream_url, None).await); // A produces
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first);
    let mut reader = BodyReader::new(get(b, &created.stream_url, Some("1")).await); // the client follows on B
    feed.send("data: e2\n\n").await;
    assert_eq!(ids(&parse_sse(&reader.until("data: e2\n\n").await)), [2]);

    assert_eq!(delete(c, &created.stream_url).await, 204);
    tokio::time::timeout(Duration::from_secs(2), feed.closed()).await.expect("a DELETE on C did not cancel A at once");
    let rest = parse_sse(&reader.rest().await);
    assert_eq!(ids(&rest), [3]);
    assert_end(&rest[0], "cancelled");
    assert_eq!(get(b, &created.stream_url, Some("3")).await.status(), 204);
}

#[tokio::test]
async fn delete_of_an_unused_token_on_another_instance_sends_nothing_upstream() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(1))).await;
    let p = instances(2, up.addr, &redis, |_| {}).await;
    let created = create(&client(), &p[0].url(""), "/v1/chat", "{}").await;
    assert_eq!(delete(&p[1], &created.stream_url).await, 204);
    for proxy in &p {
        assert_eq!(get(proxy, &created.stream_url, None).await.status(), 404);
    }
    assert_eq!(up.count(), 0);
}

// ------------------------------------------------ 5. TTLs and hash tags

/// `ssegate:{token}:part` → (token, part).
fn split_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("ssegate:{")?;
    let (token, part) = rest.split_once("}:")?;
    Some((token, part))
}

#[tokio::test]
async fn every_key_has_a_ttl_and_a_streams_keys_share_its_hash_tag() {
    let redis = RedisServer::start().await;
    let up = slow_or_fast_upstream().await;
    let p = instances(2, up.addr, &redis, |c| c.handoff.resume_grace = Duration::from_secs(2)).await;
    let (a, b) = (&p[0], &p[1]);
    let c = client();

    // Ended: POST on A, stream on B.
    let ended = create(&c, &a.url(""), "/v1/chat", "{}").await;
    assert_eq!(ids(&get_all(b, &ended.stream_url, None).await), [1, 2, 3, 4]);
    // Running, produced on A, client on A.
    let running = create(&c, &b.url(""), "/v1/slow", "{}").await;
    let mut running_reader = BodyReader::new(get(a, &running.stream_url, None).await);
    until_id(&mut running_reader, 1).await;
    // Running, produced on A, client resumed on B.
    let moved = create(&c, &a.url(""), "/v1/slow", "{}").await;
    let mut moved_first = BodyReader::new(get(a, &moved.stream_url, None).await);
    until_id(&mut moved_first, 1).await;
    drop(moved_first);
    let mut moved_reader = BodyReader::new(get(b, &moved.stream_url, Some("1")).await);
    until_id(&mut moved_reader, 2).await;
    // Stopped: produced on B, DELETE on A.
    let stopped = create(&c, &a.url(""), "/v1/slow", "{}").await;
    let mut stopped_reader = BodyReader::new(get(b, &stopped.stream_url, None).await);
    until_id(&mut stopped_reader, 1).await;
    assert_eq!(delete(a, &stopped.stream_url).await, 204);
    assert_end(parse_sse(&stopped_reader.rest().await).last().unwrap(), "cancelled");
    // Unused.
    let unused = create(&c, &b.url(""), "/v1/chat", "{}").await;

    let keys = redis.keys().await;
    let mut problems = Vec::new();
    let mut by_token: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in &keys {
        if !key.starts_with("ssegate:") {
            problems.push(format!("{key}: not under ssegate:"));
        }
        let ttl = redis.pttl(key).await;
        if ttl <= 0 && ttl != -2 {
            problems.push(format!("{key}: PTTL {ttl}"));
        }
        if let Some((token, part)) = split_key(key) {
            by_token.entry(token.to_string()).or_default().push(part.to_string());
        }
    }
    for (name, created) in
        [("ended", &ended), ("running", &running), ("moved", &moved), ("stopped", &stopped), ("unused", &unused)]
    {
        // A token appears in a key name only as the hash tag.
        for key in keys.iter().filter(|k| k.contains(&created.token)) {
            if split_key(key).map(|(t, _)| t) != Some(created.token.as_str()) {
                problems.push(format!("{name}: key {key} holds the token outside its {{hash tag}}"));
            }
        }
        let parts = by_token.get(&created.token).cloned().unwrap_or_default();
        let want: &[&str] = match name {
            "unused" => &["req"],
            "running" | "moved" => &["alive", "ev", "meta"],
            _ => &["ev", "meta"],
        };
        for part in want {
            if !parts.iter().any(|p| p == part) {
                problems.push(format!("{name}: no key ssegate:{{token}}:{part} (has {parts:?})"));
            }
        }
    }
    assert!(problems.is_empty(), "keys: {keys:#?}\nproblems:\n{}", problems.join("\n"));
    drop((running_reader, moved_reader));
}

#[tokio::test]
async fn resuming_an_ended_stream_never_leaves_a_key_without_a_ttl() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|_| reply_sse(&sse_chunks(3))).await;
    let grace = Duration::from_millis(500);
    let p = instances(1, up.addr, &redis, |c| c.handoff.resume_grace = grace).await;
    let created = create(&client(), &p[0].url(""), "/v1/chat", "{}").await;
    let evs = get_all(&p[0], &created.stream_url, None).await;
    assert_eq!(ids(&evs), [1, 2, 3, 4]);
    let ended = Instant::now();
    // A client that keeps replaying the ended stream, each time within the
    // grace of the last, until after its keys' TTL (grace + 5 s) ran out.
    while ended.elapsed() < grace + Duration::from_millis(6500) {
        let resp = get(&p[0], &created.stream_url, None).await;
        if resp.status() != 200 {
            break;
        }
        body_text(resp).await;
        tokio::time::sleep(grace / 3).await;
    }
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let mut problems = Vec::new();
    for key in redis.keys().await {
        let ttl = redis.pttl(&key).await;
        if ttl <= 0 && ttl != -2 {
            let mut conn = redis.conn().await;
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.unwrap();
            let dump: Vec<String> = if kind == "hash" {
                redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.unwrap()
            } else {
                Vec::new()
            };
            problems.push(format!("{key} ({kind} {dump:?}): PTTL {ttl}"));
        }
    }
    assert!(
        problems.is_empty(),
        "keys without a TTL {:?} after the stream ended:\n{}",
        ended.elapsed(),
        problems.join("\n")
    );
}

// ------------------------------------------------ 6. Redis down, an instance dying

#[tokio::test]
async fn readyz_is_503_while_redis_is_down_and_requests_work_again_when_it_returns() {
    let mut redis = RedisServer::reserve(); // not started yet
    let up = Upstream::start(|_| reply_sse(&sse_chunks(3))).await;
    let p = instances(1, up.addr, &redis, |_| {}).await;
    let proxy = &p[0];
    let c = client();

    // The proxy starts while Redis is down: not ready, POST refused.
    wait_ready(proxy.admin, 503, Duration::from_secs(10)).await;
    let resp = c.post(proxy.url("/handoff/v1/chat")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), 503, "POST while Redis is down");
    assert_eq!(error_type(&resp.text().await.unwrap()), "store_unavailable");

    redis.start_on().await;
    wait_ready(proxy.admin, 200, Duration::from_secs(10)).await;
    let created = create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    assert_eq!(ids(&get_all(proxy, &created.stream_url, None).await), [1, 2, 3, 4]);

    redis.kill();
    let killed = Instant::now();
    wait_ready(proxy.admin, 503, Duration::from_secs(10)).await;
    eprintln!("/readyz said 503 {:?} after Redis was killed", killed.elapsed());
    let resp = get(proxy, "/stream/AAAAAAAAAAAAAAAAAAAAAA", None).await;
    assert_eq!(resp.status(), 503, "GET while Redis is down");
    assert_eq!(error_type(&resp.text().await.unwrap()), "store_unavailable");

    redis.start_on().await; // same port, empty
    wait_ready(proxy.admin, 200, Duration::from_secs(10)).await;
    let created = create(&c, &proxy.url(""), "/v1/chat", "{}").await;
    assert_eq!(ids(&get_all(proxy, &created.stream_url, None).await), [1, 2, 3, 4]);
    assert_eq!(up.count(), 2);
}

/// Reads the rest of a stream that must end (with an error event) within
/// `within`; the whole text.
async fn rest_within(reader: &mut BodyReader, within: Duration) -> Vec<Ev> {
    let text = tokio::time::timeout(within, reader.rest()).await.unwrap_or_else(|_| panic!("no end within {within:?}"));
    parse_sse(&text)
}

#[tokio::test]
async fn redis_killed_mid_stream_ends_clients_with_store_unavailable_and_new_streams_work_after() {
    let mut redis = RedisServer::start().await;
    let up = slow_or_fast_upstream().await;
    let p = instances(2, up.addr, &redis, |_| {}).await;
    let (a, b) = (&p[0], &p[1]);
    let c = client();

    // S1: produced on A, client on A. S2: produced on A, client on B.
    let s1 = create(&c, &a.url(""), "/v1/slow", "{}").await;
    let mut r1 = BodyReader::new(get(a, &s1.stream_url, None).await);
    let seen1 = until_id(&mut r1, 2).await;
    let s2 = create(&c, &b.url(""), "/v1/slow", "{}").await;
    let mut first = BodyReader::new(get(a, &s2.stream_url, None).await);
    until_id(&mut first, 1).await;
    drop(first);
    let mut r2 = BodyReader::new(get(b, &s2.stream_url, Some("1")).await);
    let seen2 = until_id(&mut r2, 2).await;

    redis.kill();
    let killed = Instant::now();
    for (name, reader, seen, from) in [("S1 on A", &mut r1, seen1, 1), ("S2 on B", &mut r2, seen2, 2)] {
        let evs: Vec<Ev> = seen.into_iter().chain(rest_within(reader, Duration::from_secs(10)).await).collect();
        assert_contiguous(&evs, from);
        let last = evs.last().unwrap();
        assert_eq!(error_event_type(last), "store_unavailable", "{name}: last event {last:?}");
        assert!(evs[..evs.len() - 1].iter().all(|e| e.event.is_none()), "{name}: {evs:?}");
        eprintln!("{name}: store_unavailable {:?} after Redis was killed", killed.elapsed());
    }
    // The producer stopped both upstream requests.
    let mut cancelled = up.cancelled.clone();
    wait_for(&mut cancelled, 2).await;

    redis.start_on().await;
    for proxy in &p {
        wait_ready(proxy.admin, 200, Duration::from_secs(10)).await;
    }
    // New streams work across instances without a restart of the proxies…
    let created = create(&c, &b.url(""), "/v1/chat", "{}").await;
    let evs = get_all(a, &created.stream_url, None).await;
    assert_eq!(ids(&evs), [1, 2, 3, 4]);
    assert_end(&evs[3], "complete");
    assert_eq!(get_all(b, &created.stream_url, Some("2")).await, evs[2..]);
    // …and so do the messages between instances (a Stop on B reaches A).
    let s3 = create(&c, &a.url(""), "/v1/slow", "{}").await;
    let mut r3 = BodyReader::new(get(a, &s3.stream_url, None).await);
    until_id(&mut r3, 1).await;
    let stop = Instant::now();
    assert_eq!(delete(b, &s3.stream_url).await, 204);
    let rest = rest_within(&mut r3, Duration::from_secs(10)).await;
    assert_end(rest.last().unwrap(), "cancelled");
    wait_for(&mut cancelled, 3).await;
    assert!(stop.elapsed() < Duration::from_secs(2), "a Stop on B took {:?} to cancel A", stop.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_dying_mid_stream_ends_clients_elsewhere_with_instance_lost() {
    let redis = RedisServer::start().await;
    let up = slow_or_fast_upstream().await;
    let mut a = Instance::start(redis_config(up.addr, &redis)).await;
    let p = instances(2, up.addr, &redis, |_| {}).await;
    let (b, c) = (&p[0], &p[1]);
    let cl = client();

    // S1: produced on A, the client moved to B. S2: produced on A, client on A.
    let s1 = create(&cl, &b.url(""), "/v1/slow", "{}").await;
    let mut first = BodyReader::new(get(&a, &s1.stream_url, None).await);
    until_id(&mut first, 2).await;
    drop(first);
    let mut r1 = BodyReader::new(get(b, &s1.stream_url, Some("2")).await);
    let seen1 = until_id(&mut r1, 3).await;
    let s2 = create(&cl, &b.url(""), "/v1/slow", "{}").await;
    let mut r2 = get(&a, &s2.stream_url, None).await;
    let mut text2 = String::new();
    while !text2.contains("id: 2\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r2.chunk()).await.unwrap().unwrap().unwrap();
        text2.push_str(&String::from_utf8_lossy(&chunk));
    }

    a.kill();
    let died = Instant::now();
    // The client on B: an error event, then the end of the stream.
    let evs: Vec<Ev> = seen1.into_iter().chain(rest_within(&mut r1, Duration::from_secs(15)).await).collect();
    assert_contiguous(&evs, 3);
    let last = evs.last().unwrap();
    assert_eq!(error_event_type(last), "instance_lost", "the client following on B got {last:?}");
    eprintln!("client on B: instance_lost {:?} after A died", died.elapsed());
    let lost_id = ids(&evs).last().copied().unwrap();

    // The client on A: its connection is cut (no hang).
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match r2.chunk().await {
                Ok(Some(c)) => text2.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) => return "ended",
                Err(_) => return "cut",
            }
        }
    })
    .await
    .expect("the client of the dead instance hangs");
    eprintln!("client on A: connection {cut} when A died");
    // Its EventSource reconnects elsewhere with the last id it saw: the
    // events it missed, then the same error.
    let complete = &text2[..text2.rfind("\n\n").unwrap() + 2];
    let last_seen = ids(&parse_sse(complete)).last().copied().unwrap();
    let resp = get(c, &s2.stream_url, Some(&last_seen.to_string())).await;
    assert_eq!(resp.status(), 200, "a resume of S2 on C after A died");
    let mut r2c = BodyReader::new(resp);
    let evs = rest_within(&mut r2c, Duration::from_secs(15)).await;
    assert_contiguous(&evs, last_seen + 1);
    assert_eq!(error_event_type(evs.last().unwrap()), "instance_lost", "a resume of S2 on C got {evs:?}");

    // The dead instance's upstream requests were closed with it.
    let mut cancelled = up.cancelled.clone();
    wait_for(&mut cancelled, 2).await;
    // Once the error is the final event, the final id is 204.
    assert_eq!(get(b, &s1.stream_url, Some(&lost_id.to_string())).await.status(), 204);
    // Keys of the dead streams still expire.
    for key in redis.keys().await {
        let ttl = redis.pttl(&key).await;
        assert!(ttl > 0 || ttl == -2, "{key}: PTTL {ttl} after its instance died");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_lost_with_its_instance_does_not_keep_the_upstream_running() {
    let redis = RedisServer::start().await;
    let mut up = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let grace = Duration::from_secs(1);
    let mut config = redis_config(up.addr, &redis);
    config.handoff.resume_grace = grace;
    let a = Proxy::start(config.clone()).await;
    let mut b = Instance::start(config).await;
    let created = create(&client(), &a.url(""), "/v1/chat", "{}").await;

    let mut first = BodyReader::new(get(&a, &created.stream_url, None).await); // A produces
    let feed = up.next().await;
    feed.send("data: e1\n\n").await;
    first.until("data: e1\n\n").await;
    drop(first);
    let mut second = BodyReader::new(get(&b, &created.stream_url, Some("1")).await); // the client moves to B
    feed.send("data: e2\n\n").await;
    second.until("data: e2\n\n").await;
    b.kill(); // B dies with the client attached, and the client never comes back
    let died = Instant::now();
    drop(second);
    // Nobody is attached anywhere: A cancels after the grace (plus the
    // time it takes to notice that B is gone).
    tokio::time::timeout(grace * 8, feed.closed()).await.unwrap_or_else(|_| {
        panic!(
            "the upstream still runs {:?} after the client's instance B died (resume_grace {grace:?})",
            died.elapsed()
        )
    });
    eprintln!("upstream cancelled {:?} after the client's instance died", died.elapsed());
}

/// `limits.streams_per_client` counts a client's streams on every instance
/// that shares Redis: a second stream on B while one runs on A is 429; another
/// client is not affected; once the first ends, the client may open one again.
#[tokio::test]
async fn streams_per_client_is_shared_between_instances() {
    let redis = RedisServer::start().await;
    let upstream = slow_or_fast_upstream().await;
    let secret = "a-shared-secret-of-some-length";
    let proxies = instances(2, upstream.addr, &redis, |c| {
        c.limits.streams_per_client = 1;
        c.auth = Some(ssegate::config::AuthConfig {
            jwt_hs256_secret: Some(ssegate::config::Secret(secret.into())),
            jwks_file: None,
            audience: None,
        });
    })
    .await;
    let (a, b) = (&proxies[0], &proxies[1]);
    let token = |sub: &str| {
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
        let claims = serde_json::json!({ "sub": sub, "exp": exp });
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        format!("Bearer {jwt}")
    };
    let open = |proxy: &Proxy, sub: &str| {
        client()
            .get(proxy.url("/v1/slow"))
            .header("accept", "text/event-stream")
            .header("authorization", token(sub))
            .send()
    };
    let first = open(a, "alice").await.unwrap();
    assert_eq!(first.status(), 200);
    let mut first = BodyReader::new(first);
    first.until("id: 1\n").await;

    let refused = open(b, "alice").await.unwrap();
    assert_eq!(refused.status(), 429, "a second stream of the same client on another instance");
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(error_type(&refused.text().await.unwrap()), "rate_limited");
    let other = open(b, "bob").await.unwrap();
    assert_eq!(other.status(), 200, "another client is not affected");
    drop(other);

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = open(b, "alice").await.unwrap();
        if again.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "alice's slot never came back after her stream ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
