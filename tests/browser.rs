//! Handoff in a real browser: Debian's headless Chromium, driven through
//! chromedriver, loads tests/browser/page.html, which POSTs to the proxy's
//! handoff endpoint and follows the stream with its own `EventSource`,
//! writing what it sees into the DOM. The tests read the DOM.
//!
//! Needs /usr/bin/chromium and /usr/bin/chromedriver (scripts/test.sh
//! installs them); without them these tests fail, they do not skip.

#[path = "support/browser.rs"]
mod chrome;
mod support;

use std::time::Duration;

use chrome::{head_header, show, Browser, PageServer, Relay, ONE_AT_A_TIME};
use serde_json::Value;
use support::{Proxy, Reply, Upstream};

const PAGE: &str = include_str!("browser/page.html");

/// What the upstream sends for event `i` (1-based) and the data the page
/// must see for it. Event 3 has two data lines; all carry non-ASCII text.
fn event(i: usize) -> (String, String) {
    if i == 3 {
        (format!("data: line one of {i} ✓\ndata: line two\n\n"), format!("line one of {i} ✓\nline two"))
    } else {
        let data = format!("{{\"i\":{i},\"text\":\"tok {i} é\"}}");
        (format!("event: message\ndata: {data}\n\n"), data)
    }
}

/// A fake model streaming `n` SSE events, one every `pace`, after a head
/// delayed by `head_delay`.
async fn model(n: usize, pace: Duration, head_delay: Duration) -> Upstream {
    Upstream::start(move |_| {
        let chunks: Vec<String> = (1..=n).map(|i| event(i).0).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
        let mut reply = Reply::chunks("text/event-stream", &refs).paced(pace);
        reply.head_delay = head_delay;
        reply
    })
    .await
}

/// The proxy with CORS for the page's origin and a short EventSource retry.
async fn proxy(upstream: &Upstream, page: &PageServer) -> Proxy {
    let mut config = support::config(upstream.addr);
    config.cors.allow_origins = vec![page.origin()];
    config.sse.retry = Duration::from_millis(200);
    Proxy::start(config).await
}

fn kind(line: &Value) -> &str {
    line["kind"].as_str().unwrap_or("")
}

fn count(lines: &[Value], k: &str) -> usize {
    lines.iter().filter(|l| kind(l) == k).count()
}

/// The page is done, or failed in a way that waiting cannot fix.
fn settled(lines: &[Value]) -> bool {
    lines.iter().any(|l| match kind(l) {
        "closed" | "fatal" => true,
        "post" => l["status"] != 201,
        _ => false,
    })
}

/// Checks that the page saw the `n` events, each exactly once, in order,
/// with ids 1..=n, and then `end` with id n+1 and reason `complete`.
fn assert_every_event_once(lines: &[Value], n: usize) {
    let shown = show(lines);
    let post = lines.iter().find(|l| kind(l) == "post").unwrap_or_else(|| panic!("no POST answer:\n{shown}"));
    assert_eq!(post["status"], 201, "the handoff POST failed:\n{shown}");
    let messages: Vec<(String, String)> = lines
        .iter()
        .filter(|l| kind(l) == "message")
        .map(|l| (l["id"].as_str().unwrap().to_string(), l["data"].as_str().unwrap().to_string()))
        .collect();
    let expected: Vec<(String, String)> = (1..=n).map(|i| (i.to_string(), event(i).1)).collect();
    assert_eq!(messages, expected, "the page did not see every event exactly once, in order:\n{shown}");
    let ends: Vec<&Value> = lines.iter().filter(|l| kind(l) == "end").collect();
    assert_eq!(ends.len(), 1, "expected one end event:\n{shown}");
    assert_eq!(ends[0]["id"], (n + 1).to_string(), "the end event's id:\n{shown}");
    assert_eq!(ends[0]["data"], r#"{"reason":"complete"}"#, "the end event's data:\n{shown}");
    let end_at = lines.iter().position(|l| kind(l) == "end").unwrap();
    let last_message = lines.iter().rposition(|l| kind(l) == "message").unwrap();
    assert!(end_at > last_message, "the end event came before a message:\n{shown}");
    assert_eq!(count(lines, "proxy-error"), 0, "the proxy sent an error event:\n{shown}");
    assert_eq!(count(lines, "fatal"), 0, "the page failed:\n{shown}");
}

/// The page's `fetch` POST goes through CORS (a preflight, for its JSON
/// content type), `EventSource` opens at once — before the model has even
/// answered — and every event arrives once, in order, then `end`.
#[tokio::test]
async fn eventsource_opens_at_once_and_gets_every_event_in_order() {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 12;
    // The model's head comes 1.2 s after the request: `open` must not wait for it.
    let upstream = model(N, Duration::from_millis(30), Duration::from_millis(1200)).await;
    let page = PageServer::start(PAGE).await;
    let proxy = proxy(&upstream, &page).await;
    let browser = Browser::start().await;
    browser.goto(&format!("{}/?proxy={}", page.origin(), proxy.url(""))).await;

    let at_open =
        browser.wait_lines("EventSource onopen", Duration::from_secs(15), |l| count(l, "open") > 0 || settled(l)).await;
    assert_eq!(count(&at_open, "open"), 1, "no onopen:\n{}", show(&at_open));
    assert_eq!(count(&at_open, "message"), 0, "onopen waited for the first token:\n{}", show(&at_open));

    let lines = browser.wait_lines("the end event", Duration::from_secs(15), settled).await;
    assert_every_event_once(&lines, N);
    let kinds: Vec<&str> = lines.iter().map(kind).collect();
    let mut expected = vec!["post", "open"];
    expected.extend(std::iter::repeat_n("message", N));
    expected.extend(["end", "closed"]);
    assert_eq!(kinds, expected, "the page's log:\n{}", show(&lines));

    assert_eq!(upstream.count(), 1, "the upstream saw more than one request");
    let seen = upstream.last();
    assert_eq!(seen.uri.path(), "/v1/chat/completions");
    let body: Value = serde_json::from_slice(&seen.body).expect("the upstream body is not the page's JSON");
    assert_eq!(body["messages"][0]["content"], "hi", "the upstream body: {body}");
    browser.close().await;
}

/// The reconnect users care about: the browser's connection is cut in the
/// middle of the stream; its own EventSource reconnects with
/// `Last-Event-ID`, and the page ends with every event exactly once while
/// the model saw one request.
#[tokio::test]
async fn eventsource_resumes_after_its_connection_is_cut() {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 20;
    const CUT_AFTER: usize = 5;
    let upstream = model(N, Duration::from_millis(120), Duration::ZERO).await;
    let page = PageServer::start(PAGE).await;
    let proxy = proxy(&upstream, &page).await;
    let relay = Relay::start(proxy.addr).await;
    let browser = Browser::start().await;
    browser.goto(&format!("{}/?proxy={}", page.origin(), relay.url())).await;

    let before = browser
        .wait_lines(&format!("{CUT_AFTER} events"), Duration::from_secs(15), |l| {
            count(l, "message") >= CUT_AFTER || settled(l)
        })
        .await;
    assert!(!settled(&before), "the page ended before the cut:\n{}", show(&before));
    let cut = relay.cut();
    assert!(cut >= 1, "no connection was open through the relay at the cut");

    let lines = browser.wait_lines("the end event after the cut", Duration::from_secs(20), settled).await;
    let shown = show(&lines);
    assert_every_event_once(&lines, N);

    // The cut really broke the stream in the middle, and the browser came back.
    let broke = lines
        .iter()
        .position(|l| kind(l) == "conn-error")
        .unwrap_or_else(|| panic!("the page saw no connection error after the cut:\n{shown}"));
    let got = count(&lines[..broke], "message");
    assert!((CUT_AFTER..N).contains(&got), "the cut came after {got} of {N} events:\n{shown}");
    assert!(lines[broke..].iter().any(|l| kind(l) == "open"), "EventSource did not open again after the cut:\n{shown}");
    assert_eq!(count(&lines, "closed"), 1, "{shown}");

    // What the browser itself sent: the first GET without Last-Event-ID,
    // the reconnect with the id of the last event it had.
    let gets = relay.request_heads("GET /stream/");
    assert!(gets.len() >= 2, "expected a reconnect GET through the relay, saw {gets:#?}");
    assert_eq!(head_header(&gets[0], "last-event-id"), None, "first GET: {}", gets[0]);
    let resumed: Vec<String> = gets[1..].iter().filter_map(|h| head_header(h, "last-event-id")).collect();
    assert_eq!(
        resumed.first().map(String::as_str),
        Some(got.to_string().as_str()),
        "the reconnect's Last-Event-ID should be the last id the page had ({got}); GETs: {gets:#?}"
    );

    assert_eq!(upstream.count(), 1, "the model saw the request more than once");
    browser.close().await;
}

/// A finished stream whose page keeps the EventSource open: when the
/// connection ends, the browser reconnects with the final id, gets `204`,
/// and stops for good — no duplicate events and no second model request.
#[tokio::test]
async fn eventsource_stops_after_the_end_on_204() {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 5;
    let upstream = model(N, Duration::from_millis(20), Duration::ZERO).await;
    let page = PageServer::start(PAGE).await;
    let proxy = proxy(&upstream, &page).await;
    let relay = Relay::start(proxy.addr).await;
    let browser = Browser::start().await;
    browser.goto(&format!("{}/?proxy={}&keep=1", page.origin(), relay.url())).await;

    // readyState 2 (CLOSED) on an error event: the browser gave up reconnecting.
    let stopped = |l: &[Value]| l.iter().any(|l| kind(l) == "conn-error" && l["data"] == "2") || settled(l);
    let lines = browser.wait_lines("EventSource to stop", Duration::from_secs(15), stopped).await;
    let shown = show(&lines);
    assert_every_event_once(&lines, N);
    assert_eq!(kinds_after(&lines, "end"), ["conn-error", "conn-error"], "after the end:\n{shown}");
    assert_eq!(lines.last().unwrap()["data"], "2", "EventSource is not CLOSED:\n{shown}");

    let preflights = relay.request_heads("OPTIONS /handoff/v1/");
    assert_eq!(preflights.len(), 1, "the JSON POST needs one CORS preflight: {preflights:#?}");
    let gets = relay.request_heads("GET /stream/");
    assert_eq!(gets.len(), 2, "expected the first GET and one reconnect, saw {gets:#?}");
    assert_eq!(head_header(&gets[1], "last-event-id").as_deref(), Some((N + 1).to_string().as_str()), "{gets:#?}");
    assert_eq!(upstream.count(), 1, "the model saw the request more than once");
    browser.close().await;
}

fn kinds_after<'a>(lines: &'a [Value], k: &str) -> Vec<&'a str> {
    let at = lines.iter().position(|l| kind(l) == k).expect("no such line");
    lines[at + 1..].iter().map(kind).collect()
}
