//! Keep-alive and idle timeout in virtual time: the runtime's clock is
//! paused and jumps to the next timer whenever everything waits, so minutes
//! of upstream silence take milliseconds and the timings are exact.

mod support;

use std::time::Duration;

use support::{client, Feed, ManualUpstream, Proxy};
use tokio::time::Instant;

/// Reads the next chunk of the response and the virtual time it came at.
async fn next(resp: &mut reqwest::Response, start: Instant) -> Option<(u64, String)> {
    let chunk = resp.chunk().await.expect("body read failed")?;
    Some((start.elapsed().as_secs(), String::from_utf8(chunk.to_vec()).expect("UTF-8")))
}

/// A stream through a proxy with the default config, its upstream fed by
/// hand, and the virtual time it opened at.
async fn open_stream() -> (ManualUpstream, Proxy, reqwest::Response, Feed, Instant) {
    let mut upstream = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let mut config = support::config(upstream.addr);
    // Served on this runtime, whose clock is paused: the worker threads'
    // runtimes keep real time.
    config.server.workers = 0;
    let proxy = Proxy::start(config).await;
    let resp = client().get(proxy.url("/v1/chat")).header("accept", "text/event-stream").send().await.expect("request");
    let feed = upstream.next().await;
    (upstream, proxy, resp, feed, Instant::now())
}

#[tokio::test(start_paused = true)]
async fn keepalive_every_15s_of_silence_reset_by_each_write_then_idle_timeout() {
    // The contract's defaults: keepalive 15s, idle_timeout 120s.
    let (_upstream, _proxy, mut resp, feed, start) = open_stream().await;

    feed.send("data: a\n\n").await;
    assert_eq!(next(&mut resp, start).await, Some((0, "id: 1\ndata: a\n\n".into())));
    assert_eq!(next(&mut resp, start).await, Some((15, ":\n\n".into())));

    // A write at 20s moves the next keep-alive to 35s, not 30s.
    tokio::time::sleep_until(start + Duration::from_secs(20)).await;
    feed.send("data: b\n\n").await;
    assert_eq!(next(&mut resp, start).await, Some((20, "id: 2\ndata: b\n\n".into())));

    // Then silence: keep-alives at 35, 50, … and the idle timeout 120s after
    // the upstream's last bytes (at 20s), as one error event.
    let mut keepalives = Vec::new();
    let error = loop {
        let (at, text) = next(&mut resp, start).await.expect("the stream ended without an error event");
        if text == ":\n\n" {
            keepalives.push(at);
        } else {
            break (at, text);
        }
    };
    assert_eq!(keepalives, vec![35, 50, 65, 80, 95, 110, 125]);
    assert_eq!(error.0, 140);
    assert!(error.1.starts_with("id: 3\nevent: error\ndata: {"), "{}", error.1);
    assert!(error.1.contains("\"type\":\"upstream_timeout\""), "{}", error.1);
    assert_eq!(next(&mut resp, start).await, None, "the stream ends after the error event");
    // The model's request was closed, so it stops generating.
    feed.closed().await;
}

#[tokio::test(start_paused = true)]
async fn an_event_cut_by_a_long_pause_arrives_whole_after_the_buffers_were_let_go() {
    let (_upstream, _proxy, mut resp, feed, start) = open_stream().await;

    feed.send("data: a\n\ndata: hel").await;
    assert_eq!(next(&mut resp, start).await, Some((0, "id: 1\ndata: a\n\n".into())));
    // Quiet for 5 s: the stream lets go of its read and frame buffers after
    // 1 s; the half event it holds is kept, and completed by the next read.
    tokio::time::sleep_until(start + Duration::from_secs(5)).await;
    feed.send("lo\n\ndata: b\n\n").await;
    assert_eq!(next(&mut resp, start).await, Some((5, "id: 2\ndata: hello\n\nid: 3\ndata: b\n\n".into())));
    feed.send("data: c\n\n").await;
    assert_eq!(next(&mut resp, start).await, Some((5, "id: 4\ndata: c\n\n".into())));
}
