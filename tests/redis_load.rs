//! 200 concurrent handoff streams across 3 instances sharing one Redis: the
//! POST, the first GET and the resume each land on a random instance, and
//! every stream is cut at a random event and resumed with Last-Event-ID.
//! Every stream completes with every event exactly once, in order, and the
//! upstream sees exactly one request per token. Issue [4/7 redis].

#[path = "support/handoff.rs"]
mod handoff_support;
#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::time::Duration;

use handoff_support::create;
use redis_support::{redis_config, RedisServer};
use support::*;

const STREAMS: usize = 200;
const INSTANCES: usize = 3;
const EVENTS: usize = 30;

/// xorshift64*: a small PRNG, seeded per run (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 16
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Where one stream's requests go and where it is cut.
#[derive(Debug, Clone, Copy)]
struct Plan {
    post: usize,
    first: usize,
    resume: usize,
    /// Complete events read before the cut: 0 (right after the prelude) to
    /// EVENTS + 1 (after the final `end`).
    cut: usize,
}

/// The complete events in `buf` (those followed by a blank line).
fn complete_events(buf: &[u8]) -> Vec<Ev> {
    let text = String::from_utf8_lossy(buf);
    match text.rfind("\n\n") {
        Some(end) => parse_sse(&text[..end + 2]),
        None => Vec::new(),
    }
}

/// One browser: POST, GET, cut after `plan.cut` events, resume with the
/// last id it saw, read to the end.
async fn one_stream(client: reqwest::Client, bases: Vec<String>, i: usize, plan: Plan) -> Result<(), String> {
    let created = create(&client, &bases[plan.post], &format!("/v1/chat/{i}"), &format!("{{\"n\":{i}}}")).await;
    let url = |k: usize| format!("{}{}", bases[k], created.stream_url);
    let fail = |what: String| format!("stream {i} {plan:?}: {what}");

    let mut resp = client
        .get(url(plan.first))
        .header("accept", "text/event-stream")
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if resp.status() != 200 {
        return Err(fail(format!("first GET answered {}", resp.status())));
    }
    let mut buf = Vec::new();
    let seen = loop {
        let evs = complete_events(&buf);
        let opened = String::from_utf8_lossy(&buf).contains("\n:");
        if opened && evs.len() >= plan.cut {
            break evs;
        }
        match resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            Some(c) => buf.extend_from_slice(&c),
            None => return Err(fail(format!("first body ended early: {:?}", String::from_utf8_lossy(&buf)))),
        }
    };
    drop(resp); // the cut

    let mut req = client.get(url(plan.resume)).header("accept", "text/event-stream");
    if let Some(last) = seen.last() {
        req = req.header("last-event-id", last.id.clone().unwrap_or_default());
    }
    let resp = req.send().await.map_err(|e| fail(e.to_string()))?;
    // 204 when the cut came after the final event: EventSource stops there.
    let ended = seen.last().is_some_and(|e| e.event.as_deref() == Some("end"));
    if !(resp.status() == 200 || ended && resp.status() == 204) {
        return Err(fail(format!("resume after {} events answered {}", seen.len(), resp.status())));
    }
    let rest = parse_sse(&resp.text().await.map_err(|e| fail(e.to_string()))?);
    let all: Vec<Ev> = seen.into_iter().chain(rest).collect();

    let ids: Vec<String> = all.iter().map(|e| e.id.clone().unwrap_or_default()).collect();
    let want: Vec<String> = (1..=EVENTS + 1).map(|n| n.to_string()).collect();
    if ids != want {
        return Err(fail(format!("ids {ids:?}")));
    }
    for (n, e) in all[..EVENTS].iter().enumerate() {
        if e.data != format!("s{i}e{}", n + 1) || e.event.is_some() {
            return Err(fail(format!("event {} is {e:?}", n + 1)));
        }
    }
    let end = &all[EVENTS];
    if end.event.as_deref() != Some("end") || end.data != r#"{"reason":"complete"}"# {
        return Err(fail(format!("last event {end:?}")));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cross_instance_streams_cut_and_resumed_lose_and_repeat_nothing() {
    let redis = RedisServer::start().await;
    let up = Upstream::start(|seen| {
        let i: usize = seen.uri.path().rsplit('/').next().unwrap().parse().unwrap();
        let chunks: Vec<Vec<u8>> = (1..=EVENTS).map(|n| format!("data: s{i}e{n}\n\n").into_bytes()).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        Reply::chunks("text/event-stream", &refs).paced(Duration::from_millis(10))
    })
    .await;
    let mut proxies = Vec::new();
    for _ in 0..INSTANCES {
        proxies.push(Proxy::start(redis_config(up.addr, &redis)).await);
    }
    let bases: Vec<String> = proxies.iter().map(|p| p.url("")).collect();

    // REDIS_LOAD_SEED=N replays a run.
    let seed = match std::env::var("REDIS_LOAD_SEED") {
        Ok(s) => s.parse().expect("REDIS_LOAD_SEED is not a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
    };
    eprintln!("seed {seed} (REDIS_LOAD_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let plans: Vec<Plan> = (0..STREAMS)
        .map(|_| Plan {
            post: rng.below(INSTANCES),
            first: rng.below(INSTANCES),
            resume: rng.below(INSTANCES),
            cut: rng.below(EVENTS + 2),
        })
        .collect();
    let elsewhere = plans.iter().filter(|p| p.resume != p.first).count();
    assert!(elsewhere > STREAMS / 2, "only {elsewhere} resumes on another instance (seed {seed})");

    let c = client();
    let started = std::time::Instant::now();
    let tasks: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, &plan)| tokio::spawn(one_stream(c.clone(), bases.clone(), i, plan)))
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(tasks))
        .await
        .unwrap_or_else(|_| panic!("{STREAMS} streams did not finish in 30 s (seed {seed})"));
    let errors: Vec<String> =
        results.into_iter().map(|r| r.map_err(|e| e.to_string()).and_then(|r| r)).filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{} of {STREAMS} streams failed (seed {seed}); first ones:\n{}",
        errors.len(),
        errors[..errors.len().min(10)].join("\n")
    );

    let mut completed = up.completed.clone();
    wait_for(&mut completed, STREAMS).await;
    assert_eq!(up.count(), STREAMS, "the upstream saw {} requests for {STREAMS} tokens", up.count());
    assert_eq!(*up.cancelled.borrow(), 0);
    let mut paths: Vec<String> = up.seen.lock().unwrap().iter().map(|s| s.uri.path().to_string()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), STREAMS, "some token was sent upstream twice");
    eprintln!(
        "{STREAMS} streams across {INSTANCES} instances ({elsewhere} resumed elsewhere) in {:?}",
        started.elapsed()
    );
}
