//! `/metrics` on the admin listener, read the way Prometheus reads it: the
//! proxy runs direct and handoff streams (complete, cancelled, failed, with
//! keep-alives, an expired token, an unreachable upstream), then the test
//! scrapes `/metrics`, parses it with the `prometheus-parse` crate and checks
//! that every series the contract lists is there with the values those
//! streams imply — and that no label carries a token or a request path.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use handoff_support::{create, metrics_text};
use prometheus_parse::{LineInfo, Sample, Scrape, Value};
use support::{client, parse_sse, End, Proxy, Reply, Upstream};

/// The fake model: what it answers depends on the path.
async fn model() -> Upstream {
    Upstream::start(|seen| match seen.uri.path() {
        // Five SSE events.
        "/v1/chat/completions" => {
            let chunks: Vec<String> = (1..=5).map(|i| format!("data: {{\"i\":{i}}}\n\n")).collect();
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
            Reply::chunks("text/event-stream", &refs).paced(Duration::from_millis(10))
        }
        // Thinks 300 ms before each of two events: keep-alives go out meanwhile.
        "/v1/slow" => {
            Reply::chunks("text/event-stream", &[b"data: a\n\n", b"data: b\n\n"]).paced(Duration::from_millis(300))
        }
        // One event, then the connection breaks.
        "/v1/reset" => Reply::chunks("text/event-stream", &[b"data: a\n\n"]).ending(End::Reset),
        // One event, then nothing, ever (until cancelled).
        "/v1/hang" => Reply::chunks("text/event-stream", &[b"data: a\n\n"]).ending(End::Hang),
        // Anything else: a plain JSON answer, passed through.
        _ => Reply::full(200, "application/json", "{\"ok\":true}"),
    })
    .await
}

/// The sample whose name is `name` and whose labels are exactly `labels`.
fn find<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape.samples.iter().find(|s| {
        s.metric == name && s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    })
}

/// The value of a counter, gauge or untyped sample; fails when it is absent.
///
/// prometheus-parse types a sample by its `# TYPE` name, and OpenMetrics
/// counters are typed `x` but sampled as `x_total`: those come back untyped.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = find(scrape, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape"));
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{name}{labels:?} is not a single value: {other:?}"),
    }
}

/// A histogram's buckets (upper bound, cumulative count), checked for
/// shape: bounds ascending, counts never decreasing, the last bound `+Inf`
/// with the same count as `_count`, and a `_sum` that is not negative.
/// Returns (count, sum).
fn histogram(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> (f64, f64) {
    let sample = find(scrape, name, labels).unwrap_or_else(|| panic!("no histogram {name}{labels:?} in the scrape"));
    let Value::Histogram(buckets) = &sample.value else {
        panic!("{name}{labels:?} is not a histogram: {:?}", sample.value)
    };
    assert!(buckets.len() >= 2, "{name}{labels:?} has {} buckets", buckets.len());
    for pair in buckets.windows(2) {
        assert!(pair[0].less_than < pair[1].less_than, "{name}{labels:?}: bucket bounds out of order: {buckets:?}");
        assert!(pair[0].count <= pair[1].count, "{name}{labels:?}: bucket counts decrease: {buckets:?}");
    }
    let last = buckets.last().unwrap();
    assert!(last.less_than.is_infinite(), "{name}{labels:?}: no +Inf bucket: {buckets:?}");
    let count = value(scrape, &format!("{name}_count"), labels);
    let sum = value(scrape, &format!("{name}_sum"), labels);
    assert_eq!(last.count, count, "{name}{labels:?}: the +Inf bucket is not _count");
    assert!(sum >= 0.0 && sum.is_finite(), "{name}{labels:?}: _sum is {sum}");
    (count, sum)
}

/// The number of observations at or below `bound` (the count of the
/// highest bucket whose upper bound is at most `bound`).
fn at_most(scrape: &Scrape, name: &str, labels: &[(&str, &str)], bound: f64) -> f64 {
    let Some(Sample { value: Value::Histogram(buckets), .. }) = find(scrape, name, labels) else {
        panic!("no histogram {name}{labels:?}")
    };
    buckets
        .iter()
        .filter(|b| b.less_than <= bound)
        .map(|b| b.count)
        .next_back()
        .unwrap_or_else(|| panic!("{name}{labels:?}: no bucket at or below {bound}: {buckets:?}"))
}

/// Parses an exposition with prometheus-parse, failing on any line the
/// parser would silently skip (only `# EOF` and `# UNIT` may be skipped).
fn parse(text: &str) -> Scrape {
    for line in text.lines() {
        if matches!(LineInfo::parse(line), LineInfo::Ignored) {
            assert!(
                line == "# EOF" || line.starts_with("# UNIT "),
                "prometheus-parse cannot read this line of /metrics: {line:?}"
            );
        }
    }
    assert_eq!(text.lines().last(), Some("# EOF"), "an OpenMetrics exposition ends with # EOF");
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("prometheus-parse failed")
}

/// Polls /metrics until `ok` holds for the parsed scrape, failing after 10 s.
async fn scrape_until(admin: SocketAddr, what: &str, ok: impl Fn(&Scrape) -> bool) -> (String, Scrape) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics_text(admin).await;
        let scrape = parse(&text);
        if ok(&scrape) {
            return (text, scrape);
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads an event stream to its end (10 s at most) and parses it.
async fn events(resp: reqwest::Response) -> Vec<support::Ev> {
    assert_eq!(resp.status(), 200, "{}", resp.url());
    parse_sse(&support::body_text(resp).await)
}

#[tokio::test]
async fn metrics_cover_the_contract_with_bounded_labels() {
    let upstream = model().await;
    let dead = support::RefusingPort::new();
    let mut config = support::config(upstream.addr);
    config.routes.push(support::route("/dead", &format!("http://{}", dead.addr)));
    config.sse.keepalive = Duration::from_millis(50);
    config.handoff.ttl = Duration::from_secs(1);
    let workers = config.server.workers;
    let proxy = Proxy::start(config).await;
    let http = client();
    let sse = |path: &str| {
        http.post(proxy.url(path))
            .header("accept", "text/event-stream")
            .header("content-type", "application/json")
            .body("{\"stream\":true}")
            .send()
    };

    // A fresh proxy already lists its per-route series, at zero.
    let fresh = parse(&metrics_text(proxy.admin).await);
    for route in ["/v1", "/dead"] {
        assert_eq!(value(&fresh, "ssegate_streams_active", &[("route", route)]), 0.0);
        assert_eq!(value(&fresh, "ssegate_events_sent_total", &[("route", route)]), 0.0);
        assert_eq!(histogram(&fresh, "ssegate_first_event_seconds", &[("route", route)]).0, 0.0);
    }

    // Direct mode: a complete SSE stream (with a path and a query the
    // labels must not show), one with keep-alives, one the upstream breaks,
    // a plain JSON request, an unreachable upstream.
    let direct = events(sse("/v1/chat/completions?api_key=query-secret").await.unwrap()).await;
    assert_eq!(direct.len(), 5, "{direct:?}");
    let slow = events(sse("/v1/slow").await.unwrap()).await;
    assert_eq!(slow.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let reset = events(sse("/v1/reset").await.unwrap()).await;
    assert_eq!(reset.last().and_then(|e| e.event.as_deref()), Some("error"), "{reset:?}");
    assert!(reset.last().unwrap().data.contains("upstream_reset"), "{reset:?}");
    let plain = http.get(proxy.url("/v1/users/12345/private-path")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.text().await.unwrap(), "{\"ok\":true}");
    let dead = http.get(proxy.url("/dead/models/path-on-dead")).send().await.unwrap();
    assert_eq!(dead.status(), 502);
    let nowhere = http.get(proxy.url("/nowhere/at-all")).send().await.unwrap();
    assert_eq!(nowhere.status(), 404);

    // Handoff: one stream read to its end, one stopped with DELETE, one
    // token never used (it expires).
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let done = create(&http, &proxy.url(""), "/v1/chat/completions?format=sse", body).await;
    let done_events = events(http.get(proxy.url(&done.stream_url)).send().await.unwrap()).await;
    assert_eq!(done_events.last().map(|e| e.data.as_str()), Some(r#"{"reason":"complete"}"#), "{done_events:?}");

    let stopped = create(&http, &proxy.url(""), "/v1/hang", body).await;
    let mut live = http.get(proxy.url(&stopped.stream_url)).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains("data: a\n") {
            let chunk = live.chunk().await.unwrap().expect("the stream ended before its first event");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("no first event on the handoff stream");
    let del = http.delete(proxy.url(&stopped.stream_url)).send().await.unwrap();
    assert_eq!(del.status(), 204);
    let rest = tokio::time::timeout(Duration::from_secs(10), live.text()).await.expect("no end after DELETE").unwrap();
    assert!(rest.contains(r#"{"reason":"cancelled"}"#), "after DELETE: {rest:?}");

    let unused = create(&http, &proxy.url(""), "/v1/chat/completions", body).await;
    let tokens = [&done.token, &stopped.token, &unused.token];

    // Every stream has ended and the unused token has expired.
    let (text, m) = scrape_until(proxy.admin, "the streams to end and the token to expire", |m| {
        value(m, "ssegate_tokens_expired_total", &[]) >= 1.0
            && value(m, "ssegate_streams_active", &[("route", "/v1")]) == 0.0
            && histogram(m, "ssegate_events_per_second", &[("route", "/v1")]).0 >= 5.0
    })
    .await;
    let v1 = [("route", "/v1")];
    let dead_route = [("route", "/dead")];

    // Active streams: back to 0.
    assert_eq!(value(&m, "ssegate_streams_active", &v1), 0.0);
    assert_eq!(value(&m, "ssegate_streams_active", &dead_route), 0.0);

    // Streams ended, by outcome: 3 complete (direct, slow, handoff), the
    // reset one, the cancelled one.
    let ended = |outcome: &str| value(&m, "ssegate_streams_ended_total", &[("route", "/v1"), ("outcome", outcome)]);
    assert_eq!(ended("complete"), 3.0, "\n{text}");
    assert_eq!(ended("upstream_reset"), 1.0, "\n{text}");
    assert_eq!(ended("cancelled"), 1.0, "\n{text}");
    let all_ended: f64 = m
        .samples
        .iter()
        .filter(|s| s.metric == "ssegate_streams_ended_total" && s.labels.get("route") == Some("/v1"))
        .map(|s| match s.value {
            Value::Untyped(v) | Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(all_ended, 5.0, "five event streams on /v1, each ended once:\n{text}");

    // Events and bytes sent: at least what the clients read (5 + 2 + 1 +
    // error + handoff's 5 + end + the hang's 1 + end).
    let events_sent = value(&m, "ssegate_events_sent_total", &v1);
    assert!(events_sent >= 16.0, "events_sent {events_sent}:\n{text}");
    let bytes_sent = value(&m, "ssegate_bytes_sent_total", &v1);
    assert!(bytes_sent > events_sent * 10.0, "bytes_sent {bytes_sent} for {events_sent} events:\n{text}");
    assert_eq!(value(&m, "ssegate_events_sent_total", &dead_route), 0.0);

    // Keep-alives: the slow stream was silent for 2 × 300 ms at a 50 ms keepalive.
    let keepalives = value(&m, "ssegate_keepalives_sent_total", &v1);
    assert!(keepalives >= 4.0, "keepalives_sent {keepalives}:\n{text}");

    // Tokens.
    assert_eq!(value(&m, "ssegate_tokens_issued_total", &[]), 3.0, "\n{text}");
    assert_eq!(value(&m, "ssegate_tokens_redeemed_total", &[]), 2.0, "\n{text}");
    assert_eq!(value(&m, "ssegate_tokens_expired_total", &[]), 1.0, "\n{text}");
    assert_eq!(value(&m, "ssegate_streams_cancelled_total", &[("reason", "delete")]), 1.0, "\n{text}");

    // Upstream errors by type and route.
    let errors =
        |route: &str, kind: &str| value(&m, "ssegate_upstream_errors_total", &[("route", route), ("type", kind)]);
    assert_eq!(errors("/v1", "upstream_reset"), 1.0, "\n{text}");
    assert_eq!(errors("/v1", "upstream_unavailable"), 0.0, "\n{text}");
    assert_eq!(errors("/dead", "upstream_unavailable"), 1.0, "\n{text}");

    // Requests by outcome (direct mode).
    let requests =
        |route: &str, outcome: &str| value(&m, "ssegate_requests_total", &[("route", route), ("outcome", outcome)]);
    assert_eq!(requests("/v1", "ok"), 4.0, "\n{text}");
    assert_eq!(requests("/dead", "upstream_unavailable"), 1.0, "\n{text}");

    // Time to first event: one observation per event stream; the model
    // answers at once, so each well under 10 s.
    let (count, sum) = histogram(&m, "ssegate_first_event_seconds", &v1);
    assert_eq!(count, 5.0, "\n{text}");
    assert!(sum > 0.0 && sum < 5.0 * 10.0, "first_event_seconds sum {sum}:\n{text}");
    assert_eq!(at_most(&m, "ssegate_first_event_seconds", &v1, 10.0), 5.0, "\n{text}");
    // Upstream response-head time: 4 direct requests with a head, 2 handoff streams.
    let (count, _) = histogram(&m, "ssegate_upstream_head_seconds", &v1);
    assert_eq!(count, 6.0, "\n{text}");
    assert_eq!(histogram(&m, "ssegate_upstream_head_seconds", &dead_route).0, 0.0, "\n{text}");
    // Events per second, per stream, per route.
    let (count, sum) = histogram(&m, "ssegate_events_per_second", &v1);
    assert_eq!(count, 5.0, "\n{text}");
    assert!(sum > 0.0, "events_per_second sum {sum}:\n{text}");
    assert_eq!(histogram(&m, "ssegate_events_per_second", &dead_route).0, 0.0, "\n{text}");

    // Bounded cardinality: the only labels are route (a configured
    // prefix), outcome, type, reason, worker (a worker's number) and a
    // histogram's le; their values are short identifiers, never a token, a
    // path or a query.
    let prefixes = ["/v1", "/dead"];
    let mut label_values = BTreeSet::new();
    for s in &m.samples {
        for (k, v) in s.labels.iter() {
            match k.as_str() {
                "route" => assert!(prefixes.contains(&v.as_str()), "{}: route={v:?} is not a route prefix", s.metric),
                "outcome" | "type" | "reason" => assert!(
                    !v.is_empty() && v.len() <= 32 && v.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "{}: {k}={v:?} is not a short identifier",
                    s.metric
                ),
                "worker" => assert!(
                    v.parse::<usize>().is_ok_and(|w| w >= 1 && w <= workers),
                    "{}: worker={v:?} is not a worker's number",
                    s.metric
                ),
                other => panic!("{}: unexpected label {other}={v:?}", s.metric),
            }
            label_values.insert(format!("{k}={v}"));
        }
    }
    assert!(label_values.len() < 40, "{} distinct label values: {label_values:?}", label_values.len());
    // The raw text too (labels prometheus-parse might have split oddly included).
    for secret in tokens.iter().map(|t| t.as_str()).chain([
        "query-secret",
        "12345",
        "private-path",
        "path-on-dead",
        "completions",
        "/nowhere",
        "/stream/",
        "/handoff",
    ]) {
        assert!(!text.contains(secret), "/metrics contains {secret:?}:\n{text}");
    }
}

/// An upstream named by host name is looked up once per `limits.dns_ttl`,
/// for both upstream clients, and again at once after a connect that no
/// address answered (in either client): `ssegate_dns_lookups_total` counts
/// the lookups.
#[tokio::test]
async fn upstream_host_names_are_looked_up_once_per_ttl_and_again_after_a_failed_connect() {
    let (upstream, second) = (model().await, model().await);
    let refusing = support::RefusingPort::new();
    let mut config = support::config(upstream.addr);
    config.routes[0].upstream = format!("http://localhost:{}", upstream.addr.port());
    // The same name: a route nothing has connected to yet, and one whose
    // port refuses (on every address of localhost).
    let mut v2 = support::route("/v2", &format!("http://localhost:{}/v1", second.addr.port()));
    v2.strip_prefix = true;
    config.routes.push(v2);
    config.routes.push(support::route("/dead", &format!("http://localhost:{}", refusing.addr.port())));
    config.limits.dns_ttl = Duration::from_secs(60);
    let proxy = Proxy::start(config).await;
    let stream = |path: &str| client().get(proxy.url(path)).header("accept", "text/event-stream").send();
    let lookups = || async { value(&parse(&metrics_text(proxy.admin).await), "ssegate_dns_lookups_total", &[]) };

    // The first stream looks the name up.
    assert_eq!(events(stream("/v1/chat/completions").await.unwrap()).await.len(), 5);
    assert_eq!(lookups().await, 1.0);
    // Three streams at once (two new connections at least) and a request
    // through the pooled client use what was found.
    let (a, b, c) =
        tokio::join!(stream("/v1/chat/completions"), stream("/v1/chat/completions"), stream("/v1/chat/completions"));
    for resp in [a, b, c] {
        assert_eq!(events(resp.unwrap()).await.len(), 5);
    }
    let plain = client().get(proxy.url("/v1/models")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.text().await.unwrap(), "{\"ok\":true}");
    assert_eq!(lookups().await, 1.0);

    // A connect refused at every address: 502, and what was found is
    // dropped, so the next connect looks the name up again.
    assert_eq!(stream("/dead/x").await.unwrap().status(), 502);
    assert_eq!(lookups().await, 1.0);
    assert_eq!(stream("/dead/x").await.unwrap().status(), 502);
    assert_eq!(lookups().await, 2.0);
    // The name is shared: the next new connection on a live route looks it
    // up again too, and streams.
    assert_eq!(events(stream("/v2/chat/completions").await.unwrap()).await.len(), 5);
    assert_eq!(lookups().await, 3.0);
    // The pooled client (a request that does not ask for an event stream)
    // drops the name after a refused connect too.
    let plain = || async { client().get(proxy.url("/dead/models")).send().await.unwrap().status() };
    assert_eq!(plain().await, 502);
    assert_eq!(lookups().await, 3.0);
    assert_eq!(plain().await, 502);
    assert_eq!(lookups().await, 4.0);
    drop(refusing);
}
