//! The event stream of direct mode, through the real proxy: one test per
//! upstream format and per way a stream can end, asserting the bytes the
//! client receives.

mod support;

use std::io::Write;
use std::time::Duration;

use ssegate::config::Format;
use support::*;

const SSE: &str = "text/event-stream";
const END: &str = "event: end\ndata: {\"reason\":\"complete\"}\n\n";

/// POSTs to the proxy with `Accept: text/event-stream`.
async fn post_events(proxy: &Proxy, path: &str) -> reqwest::Response {
    client()
        .post(proxy.url(path))
        .header("accept", SSE)
        .header("content-type", "application/json")
        .body(r#"{"model":"m","stream":true}"#)
        .send()
        .await
        .unwrap()
}

/// POSTs with no `Accept` at all (what many scripts send).
async fn post_plain(proxy: &Proxy, path: &str) -> reqwest::Response {
    client().post(proxy.url(path)).body("{}").send().await.unwrap()
}

/// The head the contract gives every event stream.
fn assert_event_stream_head(resp: &reqwest::Response) {
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h.get("content-type").unwrap(), "text/event-stream; charset=utf-8");
    assert_eq!(h.get("cache-control").unwrap(), "no-cache, no-transform");
    assert_eq!(h.get("x-accel-buffering").unwrap(), "no");
    assert!(h.get("content-length").is_none(), "content-length on an event stream: {h:?}");
    assert!(h.get("content-encoding").is_none(), "content-encoding on an event stream: {h:?}");
}

/// Splits a stream's tail at its last event and checks that it is the
/// error event with `id`, `name` and JSON `type`; returns the text before.
fn split_error<'a>(body: &'a str, id: u64, name: &str, kind: &str) -> &'a str {
    let head = format!("id: {id}\nevent: {name}\ndata: ");
    let at = body.rfind(&head).unwrap_or_else(|| panic!("no `{name}` event with id {id} in {body:?}"));
    let data = body[at + head.len()..]
        .strip_suffix("\n\n")
        .unwrap_or_else(|| panic!("error event not last or unterminated: {body:?}"));
    assert!(!data.contains('\n'), "error data spans lines: {data:?}");
    let v: serde_json::Value =
        serde_json::from_str(data).unwrap_or_else(|e| panic!("error data not JSON ({e}): {data:?}"));
    assert_eq!(v["error"]["type"], kind, "in {data}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "no message in {data}");
    assert_eq!(v.as_object().unwrap().len(), 1, "only `error` at the top: {data}");
    &body[..at]
}

/// Drops the keep-alive comments from a piece of stream.
fn without_comments(text: &str) -> String {
    text.split_inclusive("\n\n").filter(|frame| !frame.starts_with(':')).collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

// ---------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------

const OPENAI_CHUNKS: [&str; 4] = [
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo: a\\nb"},"finish_reason":"stop"}]}"#,
    "[DONE]",
];

#[tokio::test]
async fn openai_style_sse_arrives_intact_with_ids_and_nothing_added() {
    let frames: Vec<String> = OPENAI_CHUNKS.iter().map(|c| format!("data: {c}\n\n")).collect();
    let upstream = Upstream::start(move |_| {
        let chunks: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
        Reply::chunks(SSE, &chunks).paced(Duration::from_millis(2))
    })
    .await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let expected: String =
        OPENAI_CHUNKS.iter().enumerate().map(|(i, c)| format!("id: {}\ndata: {c}\n\n", i + 1)).collect();

    // With Accept: text/event-stream …
    let resp = post_events(&proxy, "/v1/chat/completions").await;
    assert_event_stream_head(&resp);
    assert_eq!(body_text(resp).await, expected);

    // … and with what the OpenAI SDK sends (Accept: application/json): the
    // upstream's own content type makes it an event stream.
    let resp = client()
        .post(proxy.url("/v1/chat/completions"))
        .header("accept", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_event_stream_head(&resp);
    assert_eq!(body_text(resp).await, expected);
}

const OLLAMA_LINES: [&str; 3] = [
    r#"{"model":"llama3","created_at":"2024-01-01T00:00:00Z","response":"Hel","done":false}"#,
    r#"{"model":"llama3","created_at":"2024-01-01T00:00:00Z","response":"lo ✓","done":false}"#,
    r#"{"model":"llama3","created_at":"2024-01-01T00:00:01Z","response":"","done":true,"eval_count":2}"#,
];

/// Ollama's body cut so that one line spans two chunks and one chunk holds
/// two lines.
fn ollama_chunks() -> Vec<Vec<u8>> {
    let body = format!("{}\n{}\n{}\n", OLLAMA_LINES[0], OLLAMA_LINES[1], OLLAMA_LINES[2]);
    let b = body.as_bytes();
    let cut1 = OLLAMA_LINES[0].len() / 2;
    let cut2 = OLLAMA_LINES[0].len() + 1 + OLLAMA_LINES[1].len() + 1 + 10;
    vec![b[..cut1].to_vec(), b[cut1..cut2].to_vec(), b[cut2..].to_vec()]
}

fn ollama_expected() -> String {
    let mut s: String = OLLAMA_LINES.iter().enumerate().map(|(i, l)| format!("id: {}\ndata: {l}\n\n", i + 1)).collect();
    s.push_str(&format!("id: 4\n{END}"));
    s
}

#[tokio::test]
async fn ollama_ndjson_with_accept_event_stream_gives_one_event_per_line_then_end() {
    let upstream = Upstream::start(|_| {
        let chunks = ollama_chunks();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        Reply::chunks("application/x-ndjson", &refs).paced(Duration::from_millis(2))
    })
    .await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let resp = post_events(&proxy, "/v1/api/generate").await;
    assert_event_stream_head(&resp);
    assert_eq!(body_text(resp).await, ollama_expected());
}

#[tokio::test]
async fn route_format_ndjson_converts_without_accept() {
    // Content type that says nothing about lines: the route decides.
    let upstream = Upstream::start(|_| {
        let chunks = ollama_chunks();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        Reply::chunks("application/json", &refs)
    })
    .await;
    let mut c = config(upstream.addr);
    c.routes[0].format = Format::Ndjson;
    let proxy = Proxy::start(c).await;
    let resp = post_plain(&proxy, "/v1/api/chat").await;
    assert_event_stream_head(&resp);
    assert_eq!(body_text(resp).await, ollama_expected());
}

/// TGI writes `data:` without a space and ends lines in CRLF. The proxy
/// must dispatch on a CR that ends a chunk without waiting for the next
/// byte (which may be an LF, or may never come), and treat the LF that
/// then starts the next chunk as part of that line ending.
#[tokio::test]
async fn tgi_style_sse_with_crlf_split_across_chunks() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let mut reader = BodyReader::new(post_events(&proxy, "/v1/generate_stream").await);
    let feed = upstream.next().await;

    let t1 =
        r#"{"token":{"id":15043,"text":"Hello","logprob":-0.2,"special":false},"generated_text":null,"details":null}"#;
    let t2 =
        r#"{"token":{"id":29991,"text":"!","logprob":-0.9,"special":false},"generated_text":"Hello!","details":null}"#;
    feed.send(format!("data:{t1}\r")).await;
    feed.send("\n\r").await; // CRLF, then an empty line (a lone CR): dispatch now
    assert_eq!(reader.until("\n\n").await, format!("id: 1\ndata: {t1}\n\n"));
    feed.send(format!("\ndata:{t2}\r\n\r\n")).await; // the LF belongs to the CR before
    assert_eq!(reader.until("\n\n").await, format!("id: 2\ndata: {t2}\n\n"));
    feed.finish();
    assert_eq!(reader.rest().await, "", "nothing added after an SSE upstream's own last event");
}

#[tokio::test]
async fn upstream_comments_ids_and_retry_are_dropped_names_and_multiline_data_kept() {
    let body =
        "\u{FEFF}: upstream comment\nretry: 5000\nid: 41\nevent: message_start\ndata: {\"type\":\"message_start\"}\n\n\
                event: ping\ndata: {\"type\": \"ping\"}\n\n\
                id: 42\ndata: line one\ndata: line two\ndata:\n\n\
                event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let upstream = Upstream::start(move |_| Reply::chunks(SSE, &[body.as_bytes()])).await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let resp = post_events(&proxy, "/v1/messages").await;
    assert_event_stream_head(&resp);
    assert_eq!(
        body_text(resp).await,
        "id: 1\nevent: message_start\ndata: {\"type\":\"message_start\"}\n\n\
         id: 2\nevent: ping\ndata: {\"type\": \"ping\"}\n\n\
         id: 3\ndata: line one\ndata: line two\ndata: \n\n\
         id: 4\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    );
}

/// No upstream byte can forge a field or an event: CR, LF and CRLF inside a
/// payload become separate `data:` lines.
#[tokio::test]
async fn payload_line_breaks_cannot_forge_fields_or_events() {
    let line = "{\"x\":1}\rid: 99\revent: evil\r\rdata: forged";
    let upstream = Upstream::start(move |_| Reply::chunks("application/x-ndjson", &[line.as_bytes(), b"\n"])).await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let body = body_text(post_events(&proxy, "/v1/x").await).await;
    assert_eq!(
        body,
        format!(
            "id: 1\ndata: {{\"x\":1}}\ndata: id: 99\ndata: event: evil\ndata: \ndata: data: forged\n\nid: 2\n{END}"
        )
    );
    let events = parse_sse(&body);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].event, None);
    assert_eq!(events[0].data, "{\"x\":1}\nid: 99\nevent: evil\n\ndata: forged");
}

/// `text`: each piece the proxy reads is one event at once; a UTF-8
/// character cut by a chunk boundary waits until whole; invalid UTF-8
/// becomes U+FFFD.
#[tokio::test]
async fn text_format_events_per_chunk_with_utf8_held_until_whole() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", "text/plain; charset=utf-8")]).await;
    let mut c = config(upstream.addr);
    c.routes[0].format = Format::Text;
    let proxy = Proxy::start(c).await;
    let resp = post_plain(&proxy, "/v1/completions").await;
    assert_event_stream_head(&resp);
    let mut reader = BodyReader::new(resp);
    let feed = upstream.next().await;

    feed.send(b"Hello w\xC3").await; // "ö" is C3 B6
    assert_eq!(reader.until("\n\n").await, "id: 1\ndata: Hello w\n\n");
    feed.send(b"\xB6rld\n").await;
    assert_eq!(reader.until("\n\n").await, "id: 2\ndata: örld\ndata: \n\n");
    feed.send(b"\xF0\x9F").await; // half an emoji: nothing to send yet
    feed.send(b"\x8E\x89 \xFF!").await;
    assert_eq!(reader.until("\n\n").await, "id: 3\ndata: 🎉 \u{FFFD}!\n\n");
    feed.finish();
    assert_eq!(reader.rest().await, format!("id: 4\n{END}"));
}

#[tokio::test]
async fn text_from_an_auto_route_when_the_client_asks_for_events() {
    let upstream = Upstream::start(|_| Reply::chunks("text/plain", &[b"plain words"])).await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let resp = post_events(&proxy, "/v1/x").await;
    assert_event_stream_head(&resp);
    assert_eq!(body_text(resp).await, format!("id: 1\ndata: plain words\n\nid: 2\n{END}"));
}

// ---------------------------------------------------------------------------
// Keep-alive and the ways a stream ends
// ---------------------------------------------------------------------------

#[tokio::test]
async fn keepalive_comment_is_sent_while_the_upstream_is_silent() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let mut c = config(upstream.addr);
    c.sse.keepalive = Duration::from_millis(200);
    let proxy = Proxy::start(c).await;
    let mut reader = BodyReader::new(post_events(&proxy, "/v1/x").await);
    let feed = upstream.next().await;

    feed.send("data: a\n\n").await;
    assert_eq!(reader.until("\n\n").await, "id: 1\ndata: a\n\n");
    // The upstream says nothing until the keep-alive has arrived.
    let frame = reader.until("\n\n").await;
    assert!(frame.starts_with(':'), "expected a comment, got {frame:?}");
    assert!(frame.trim_end().lines().all(|l| l.starts_with(':')), "keep-alive is comment lines only: {frame:?}");

    feed.send("data: b\n\n").await;
    feed.finish();
    assert_eq!(without_comments(&reader.rest().await), "id: 2\ndata: b\n\n");
}

/// Before the first event too: a model that thinks for a while before its
/// first token still keeps the connection warm.
#[tokio::test]
async fn keepalive_comment_is_sent_before_the_first_event() {
    let (mut upstream, proxy) = manual("application/x-ndjson", |c| c.sse.keepalive = Duration::from_millis(150)).await;
    let resp = post_events(&proxy, "/v1/x").await;
    assert_event_stream_head(&resp);
    let mut reader = BodyReader::new(resp);
    let feed = upstream.next().await;
    let frame = reader.until("\n\n").await;
    assert!(frame.starts_with(':'), "expected a comment first, got {frame:?}");
    feed.send("{}\n").await;
    feed.finish();
    assert_eq!(without_comments(&reader.rest().await), format!("id: 1\ndata: {{}}\n\nid: 2\n{END}"));
}

/// Keep-alives are the proxy's own writes: they do not count as upstream
/// activity, so the idle timeout still fires.
#[tokio::test]
async fn idle_timeout_ends_the_stream_with_upstream_timeout() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let mut c = config(upstream.addr);
    c.limits.idle_timeout = Duration::from_millis(400);
    c.sse.keepalive = Duration::from_millis(100);
    let proxy = Proxy::start(c).await;
    let mut reader = BodyReader::new(post_events(&proxy, "/v1/x").await);
    let feed = upstream.next().await;

    feed.send("data: a\n\n").await;
    let body = reader.rest().await;
    let before = split_error(&body, 2, "error", "upstream_timeout");
    assert!(before.contains("\n\n:"), "keep-alives expected while waiting: {body:?}");
    assert_eq!(without_comments(before), "id: 1\ndata: a\n\n");
    // The upstream request is cancelled, so the model stops generating.
    feed.closed().await;
}

/// Starts a proxy in front of a hand-driven upstream answering `ct`.
async fn manual(ct: &str, tweak: impl FnOnce(&mut ssegate::Config)) -> (ManualUpstream, Proxy) {
    let upstream = ManualUpstream::start(200, &[("content-type", ct)]).await;
    let mut c = config(upstream.addr);
    tweak(&mut c);
    let proxy = Proxy::start(c).await;
    (upstream, proxy)
}

#[tokio::test]
async fn upstream_reset_mid_stream_ends_with_upstream_reset() {
    // An SSE upstream: the unfinished event is not sent.
    let (mut upstream, proxy) = manual(SSE, |_| {}).await;
    let mut reader = BodyReader::new(post_events(&proxy, "/v1/x").await);
    let feed = upstream.next().await;
    feed.send("data: a\n\n").await;
    assert_eq!(reader.until("\n\n").await, "id: 1\ndata: a\n\n");
    feed.send("data: b\n\ndata: unfinish").await;
    assert_eq!(reader.until("\n\n").await, "id: 2\ndata: b\n\n");
    feed.reset().await;
    assert_eq!(split_error(&reader.rest().await, 3, "error", "upstream_reset"), "");

    // An NDJSON one: no half line, and no `end`.
    let (mut upstream, proxy) = manual("application/x-ndjson", |_| {}).await;
    let mut reader = BodyReader::new(post_events(&proxy, "/v1/x").await);
    let feed = upstream.next().await;
    feed.send("{\"a\":1}\n{\"b\"").await;
    assert_eq!(reader.until("\n\n").await, "id: 1\ndata: {\"a\":1}\n\n");
    feed.reset().await;
    assert_eq!(split_error(&reader.rest().await, 2, "error", "upstream_reset"), "");
}

/// A 10 KB line against `max_event_bytes = 1024`, per format: the events
/// before it, then `event_too_large`, and the upstream request is dropped.
#[tokio::test]
async fn oversized_line_ends_with_event_too_large() {
    let big = "x".repeat(10 * 1024);
    // (content type, route format, a normal first piece, the big line, the first event)
    type Case = (&'static str, Format, Vec<u8>, Vec<u8>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "application/x-ndjson",
            Format::Auto,
            b"{\"ok\":1}\n".to_vec(),
            format!("{{\"big\":\"{big}\"}}\n").into_bytes(),
            "id: 1\ndata: {\"ok\":1}\n\n",
        ),
        (SSE, Format::Auto, b"data: ok\n\n".to_vec(), format!("data: {big}\n\n").into_bytes(), "id: 1\ndata: ok\n\n"),
        // The same line without its end yet: memory must stay bounded.
        (SSE, Format::Auto, b"data: ok\n\n".to_vec(), format!("data: {big}").into_bytes(), "id: 1\ndata: ok\n\n"),
        ("text/plain", Format::Text, b"ok".to_vec(), big.clone().into_bytes(), "id: 1\ndata: ok\n\n"),
    ];
    for (ct, format, first, line, expected) in cases {
        let mut upstream = ManualUpstream::start(200, &[("content-type", ct)]).await;
        let mut c = config(upstream.addr);
        c.limits.max_event_bytes = 1024;
        c.routes[0].format = format;
        let proxy = Proxy::start(c).await;
        let mut reader = BodyReader::new(post_events(&proxy, "/v1/x").await);
        let feed = upstream.next().await;
        feed.send(&first).await;
        assert_eq!(reader.until("\n\n").await, expected, "{ct}");
        feed.send(&line).await;
        if format == Format::Text {
            // Text has no lines: each read is a piece, and the proxy reads
            // 1 to 16 KiB at a time. No piece over the bound is ever sent;
            // one that is read larger ends the stream with the error.
            feed.finish();
            let events = parse_sse(&reader.rest().await);
            let (last, pieces) = events.split_last().expect("no events after the big text");
            let mut text = String::new();
            for piece in pieces {
                assert!(piece.event.is_none() && piece.data.len() <= 1024, "{piece:?}");
                text.push_str(&piece.data);
            }
            match last.event.as_deref() {
                Some("error") => {
                    let v: serde_json::Value = serde_json::from_str(&last.data).expect("error data is JSON");
                    assert_eq!(v["error"]["type"], "event_too_large");
                    assert!(big.starts_with(&text), "the pieces are the text, in order");
                }
                Some("end") => assert_eq!(text, big, "read in pieces within the bound: all of it"),
                other => panic!("the stream ended with {other:?}"),
            }
            continue;
        }
        let rest = reader.rest().await;
        assert_eq!(
            split_error(&rest, 2, "error", "event_too_large"),
            "",
            "{ct}: only the error event after the big line"
        );
        feed.closed().await;
    }
}

/// "One upstream line … larger than this ends the stream with an error":
/// a comment line counts, even when the whole line arrives in one read
/// (2 KB: small enough for one read, twice the bound).
#[tokio::test]
async fn oversized_comment_line_ends_with_event_too_large() {
    let body = format!("data: ok\n\n: {}\ndata: after\n\n", "c".repeat(2 * 1024));
    let upstream = Upstream::start(move |_| Reply::chunks(SSE, &[body.as_bytes()])).await;
    let mut c = config(upstream.addr);
    c.limits.max_event_bytes = 1024;
    let proxy = Proxy::start(c).await;
    let body = body_text(post_events(&proxy, "/v1/x").await).await;
    assert_eq!(split_error(&body, 2, "error", "event_too_large"), "id: 1\ndata: ok\n\n", "got {body:?}");
}

#[tokio::test]
async fn end_and_error_event_names_come_from_the_config() {
    let (mut upstream, proxy) = manual("application/x-ndjson", |c| {
        c.sse.end_event = "done".into();
        c.sse.error_event = "failure".into();
    })
    .await;

    let mut reader = BodyReader::new(post_events(&proxy, "/v1/ok").await);
    let feed = upstream.next().await;
    feed.send("{\"a\":1}\n").await;
    feed.finish();
    assert_eq!(
        reader.rest().await,
        "id: 1\ndata: {\"a\":1}\n\nid: 2\nevent: done\ndata: {\"reason\":\"complete\"}\n\n"
    );

    let mut reader = BodyReader::new(post_events(&proxy, "/v1/reset").await);
    let feed = upstream.next().await;
    feed.send("{\"a\":1}\n").await;
    assert_eq!(reader.until("\n\n").await, "id: 1\ndata: {\"a\":1}\n\n");
    feed.reset().await;
    assert_eq!(split_error(&reader.rest().await, 2, "failure", "upstream_reset"), "");
}

// ---------------------------------------------------------------------------
// What is not converted, and what goes upstream
// ---------------------------------------------------------------------------

/// Status >= 400 is passed through unchanged, status and body, so SDKs see
/// their errors: even when the client asked for events, the route forces a
/// format, or the upstream labels its error an event stream.
#[tokio::test]
async fn upstream_error_status_is_passed_through_unchanged() {
    let cases: Vec<(u16, &str, &str, Format)> = vec![
        (
            429,
            "application/json",
            r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            Format::Auto,
        ),
        (500, "application/json", r#"{"error":"model crashed"}"#, Format::Ndjson),
        (503, SSE, "data: not really an event stream\n\n", Format::Auto),
    ];
    for (status, ct, body, format) in cases {
        let upstream = Upstream::start(move |_| Reply::full(status, ct, body).header("retry-after", "7")).await;
        let mut c = config(upstream.addr);
        c.routes[0].format = format;
        let proxy = Proxy::start(c).await;
        let resp = post_events(&proxy, "/v1/chat/completions").await;
        assert_eq!(resp.status(), status);
        assert_eq!(resp.headers().get("content-type").unwrap(), ct);
        assert_eq!(resp.headers().get("retry-after").unwrap(), "7");
        assert!(resp.headers().get("x-accel-buffering").is_none());
        assert_eq!(body_text(resp).await, body, "status {status}");
    }
}

#[tokio::test]
async fn compressed_event_streams_are_decompressed() {
    // gzip, cut in the middle of the compressed bytes.
    let gz = gzip(b"data: a\n\nevent: e\ndata: b\n\n");
    let (g1, g2) = gz.split_at(gz.len() / 2);
    let (g1, g2) = (g1.to_vec(), g2.to_vec());
    let upstream = Upstream::start(move |_| Reply::chunks(SSE, &[&g1, &g2]).header("content-encoding", "gzip")).await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let resp = client()
        .post(proxy.url("/v1/x"))
        .header("accept", SSE)
        .header("accept-encoding", "gzip, deflate, br")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_event_stream_head(&resp);
    assert_eq!(body_text(resp).await, "id: 1\ndata: a\n\nid: 2\nevent: e\ndata: b\n\n");
    assert_eq!(upstream.last().headers.get("accept-encoding").unwrap(), "identity");

    // deflate (zlib) NDJSON, with the end event.
    let z = zlib(b"{\"a\":1}\n{\"b\":2}\n");
    let upstream =
        Upstream::start(move |_| Reply::chunks("application/x-ndjson", &[&z]).header("content-encoding", "deflate"))
            .await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let resp = post_events(&proxy, "/v1/x").await;
    assert_event_stream_head(&resp);
    assert_eq!(body_text(resp).await, format!("id: 1\ndata: {{\"a\":1}}\n\nid: 2\ndata: {{\"b\":2}}\n\nid: 3\n{END}"));
}

/// An upstream body that claims gzip but is not: "an undecodable event"
/// after the head ends the stream with one `error` event.
#[tokio::test]
async fn undecodable_compressed_stream_ends_with_an_error_event() {
    let upstream =
        Upstream::start(|_| Reply::chunks(SSE, &[b"this is not gzip at all\n\n"]).header("content-encoding", "gzip"))
            .await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let resp = post_events(&proxy, "/v1/x").await;
    assert_event_stream_head(&resp);
    let body = body_text(resp).await;
    let events = parse_sse(&body);
    assert_eq!(events.len(), 1, "{body:?}");
    assert_eq!((events[0].id.as_deref(), events[0].event.as_deref()), (Some("1"), Some("error")), "{body:?}");
    let v: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert!(
        v["error"]["type"].as_str().is_some_and(|t| !t.is_empty()) && v["error"]["message"].is_string(),
        "{body:?}"
    );
}

/// A request that may become an event stream goes upstream with
/// `accept-encoding: identity`; any other keeps the client's.
#[tokio::test]
async fn accept_encoding_identity_when_the_answer_may_be_an_event_stream() {
    let upstream = Upstream::start(|_| Reply::full(200, "application/json", "{}")).await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let send = |accept: &'static str| {
        client()
            .post(proxy.url("/v1/x"))
            .header("accept", accept)
            .header("accept-encoding", "gzip, br")
            .body("{}")
            .send()
    };
    body_text(send("application/json, text/event-stream;q=0.9").await.unwrap()).await;
    assert_eq!(upstream.last().headers.get("accept-encoding").unwrap(), "identity");
    body_text(send("application/json").await.unwrap()).await;
    assert_eq!(upstream.last().headers.get("accept-encoding").unwrap(), "gzip, br");

    let mut c = config(upstream.addr);
    c.routes[0].format = Format::Ndjson;
    let proxy = Proxy::start(c).await;
    let resp = client().post(proxy.url("/v1/x")).header("accept-encoding", "gzip").body("{}").send().await.unwrap();
    body_text(resp).await;
    assert_eq!(upstream.last().headers.get("accept-encoding").unwrap(), "identity");
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// The value of one series in Prometheus text, if present: `name` and every
/// `label="value"` pair in `labels` must match.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        let (n, rest) = key.split_once('{').map_or((key, ""), |(n, r)| (n, r));
        if n != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}

async fn metrics_text(proxy: &Proxy) -> String {
    body_text(client().get(format!("http://{}/metrics", proxy.admin)).send().await.unwrap()).await
}

/// Polls `/metrics` until `check` passes (streams are counted as ended when
/// their body is dropped, just after the client read the last byte).
async fn wait_metrics(proxy: &Proxy, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(proxy).await;
        if check(&text) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics never matched:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_events_endings_and_keepalives() {
    let upstream = Upstream::start(|_| Reply::chunks(SSE, &[b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"])).await;
    let mut manual = ManualUpstream::start(200, &[("content-type", SSE)]).await;
    let mut c = config(upstream.addr);
    c.routes.push(route("/m", &format!("http://{}", manual.addr)));
    c.sse.keepalive = Duration::from_millis(100);
    let proxy = Proxy::start(c).await;

    // /v1: 3 events, complete.
    body_text(post_events(&proxy, "/v1/ok").await).await;
    // /m: 1 event and an error …
    let mut reader = BodyReader::new(post_events(&proxy, "/m/reset").await);
    let feed = manual.next().await;
    feed.send("data: a\n\n").await;
    reader.until("id: 1\ndata: a\n\n").await;
    feed.reset().await;
    reader.rest().await;
    // … then 2 events with a keep-alive between them, complete.
    let mut reader = BodyReader::new(post_events(&proxy, "/m/slow").await);
    let feed = manual.next().await;
    feed.send("data: a\n\n").await;
    reader.until("id: 1\ndata: a\n\n").await;
    reader.until(":").await;
    feed.send("data: b\n\n").await;
    feed.finish();
    reader.rest().await;

    let text = wait_metrics(&proxy, |t| {
        series(t, "ssegate_streams_ended_total", &[("route", "/v1"), ("outcome", "complete")]) == Some(1.0)
            && series(t, "ssegate_streams_ended_total", &[("route", "/m"), ("outcome", "complete")]) == Some(1.0)
            && series(t, "ssegate_streams_ended_total", &[("route", "/m"), ("outcome", "upstream_reset")]) == Some(1.0)
    })
    .await;
    assert_eq!(series(&text, "ssegate_events_sent_total", &[("route", "/v1")]), Some(3.0), "{text}");
    assert_eq!(series(&text, "ssegate_events_sent_total", &[("route", "/m")]), Some(4.0), "{text}");
    assert!(series(&text, "ssegate_keepalives_sent_total", &[("route", "/m")]).is_some_and(|n| n >= 1.0), "{text}");
    assert!(series(&text, "ssegate_bytes_sent_total", &[("route", "/v1")]).is_some_and(|n| n > 0.0), "{text}");
    assert_eq!(series(&text, "ssegate_streams_active", &[("route", "/v1")]), Some(0.0), "{text}");
    assert_eq!(series(&text, "ssegate_streams_active", &[("route", "/m")]), Some(0.0), "{text}");
    assert_eq!(
        series(&text, "ssegate_upstream_errors_total", &[("route", "/m"), ("type", "upstream_reset")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(series(&text, "ssegate_first_event_seconds_count", &[("route", "/m")]), Some(2.0), "{text}");
}
