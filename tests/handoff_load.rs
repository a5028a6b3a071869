//! 500 handoff streams at once, each cut at a random point and resumed with
//! Last-Event-ID: every stream completes with every event exactly once, in
//! order, and the upstream sees exactly one request per token.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::time::Duration;

use handoff_support::create;
use support::*;

const STREAMS: usize = 500;
const EVENTS: usize = 40;

/// A small deterministic PRNG (xorshift64*), seeded per stream.
fn cut_point(seed: u64) -> usize {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % (EVENTS + 1)
}

/// The complete events in `buf` (those followed by a blank line).
fn complete_events(buf: &[u8]) -> Vec<Ev> {
    let text = String::from_utf8_lossy(buf);
    match text.rfind("\n\n") {
        Some(end) => parse_sse(&text[..end + 2]),
        None => Vec::new(),
    }
}

/// One browser: POST, GET, cut after `cut` events (0: right after the
/// prelude), resume with the last id it saw, read to the end.
async fn one_stream(client: reqwest::Client, base: String, i: usize) -> Result<(), String> {
    let created = create(&client, &base, &format!("/v1/chat/{i}"), &format!("{{\"n\":{i}}}")).await;
    let url = format!("{base}{}", created.stream_url);
    let cut = cut_point(i as u64);

    let mut resp = client.get(&url).header("accept", "text/event-stream").send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("stream {i}: first GET answered {}", resp.status()));
    }
    let mut buf = Vec::new();
    let seen = loop {
        let evs = complete_events(&buf);
        let opened = String::from_utf8_lossy(&buf).contains("\n:");
        if opened && evs.len() >= cut {
            break evs;
        }
        match resp.chunk().await.map_err(|e| format!("stream {i}: {e}"))? {
            Some(c) => buf.extend_from_slice(&c),
            None => return Err(format!("stream {i}: first body ended early: {:?}", String::from_utf8_lossy(&buf))),
        }
    };
    drop(resp); // the cut

    let mut req = client.get(&url).header("accept", "text/event-stream");
    if let Some(last) = seen.last() {
        req = req.header("last-event-id", last.id.clone().unwrap_or_default());
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    // 204 when the cut came after the final event: EventSource stops there.
    let ended = seen.last().is_some_and(|e| e.event.as_deref() == Some("end"));
    if !(resp.status() == 200 || ended && resp.status() == 204) {
        return Err(format!("stream {i}: resume after {} events answered {}", seen.len(), resp.status()));
    }
    let rest = parse_sse(&resp.text().await.map_err(|e| format!("stream {i}: {e}"))?);
    let all: Vec<Ev> = seen.into_iter().chain(rest).collect();

    let ids: Vec<String> = all.iter().map(|e| e.id.clone().unwrap_or_default()).collect();
    let want: Vec<String> = (1..=EVENTS + 1).map(|n| n.to_string()).collect();
    if ids != want {
        return Err(format!("stream {i} (cut at {cut}): ids {ids:?}"));
    }
    for (n, e) in all[..EVENTS].iter().enumerate() {
        if e.data != format!("s{i}e{}", n + 1) || e.event.is_some() {
            return Err(format!("stream {i}: event {} is {e:?}", n + 1));
        }
    }
    let end = &all[EVENTS];
    if end.event.as_deref() != Some("end") || end.data != r#"{"reason":"complete"}"# {
        return Err(format!("stream {i}: last event {end:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_streams_cut_and_resumed_lose_and_repeat_nothing() {
    let up = Upstream::start(|seen| {
        let i: usize = seen.uri.path().rsplit('/').next().unwrap().parse().unwrap();
        let chunks: Vec<Vec<u8>> = (1..=EVENTS).map(|n| format!("data: s{i}e{n}\n\n").into_bytes()).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        Reply::chunks("text/event-stream", &refs).paced(Duration::from_millis(5))
    })
    .await;
    let proxy = Proxy::start(config(up.addr)).await;
    let cuts: Vec<usize> = (0..STREAMS as u64).map(cut_point).collect();
    assert!(cuts.iter().filter(|&&k| k == 0).count() > 0 && cuts.iter().filter(|&&k| k >= EVENTS - 1).count() > 0);
    assert!(cuts.iter().filter(|&&k| k > 5 && k < EVENTS - 5).count() > STREAMS / 2, "cut points are not spread");
    let c = client();
    let base = proxy.url("");
    let started = std::time::Instant::now();

    let tasks: Vec<_> = (0..STREAMS).map(|i| tokio::spawn(one_stream(c.clone(), base.clone(), i))).collect();
    let results = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(tasks))
        .await
        .expect("500 streams did not finish in 30 s");
    let errors: Vec<String> =
        results.into_iter().map(|r| r.map_err(|e| e.to_string()).and_then(|r| r)).filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{} of {STREAMS} streams failed; first ones:\n{}",
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
    eprintln!("{STREAMS} handoff streams cut and resumed in {:?}", started.elapsed());
}
