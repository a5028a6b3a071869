//! The official OpenAI and Anthropic Python SDKs, streaming through ssegate
//! in direct mode, yield exactly what they yield without it, and raise
//! their API error on the proxy's `error` event.
//!
//! The scripts live in `tests/sdk/`; the SDKs must be importable by
//! `$SSEGATE_TEST_PYTHON` (default `python3`). `scripts/test.sh` installs
//! them (`pip install -r tests/sdk/requirements.txt` into `target/pyenv`).
//! A missing SDK fails these tests: it is never a reason to skip them.

mod support;

use std::time::Duration;

use support::*;

const OPENAI: &str = "openai_stream.py";
const ANTHROPIC: &str = "anthropic_stream.py";

/// Model names the fake upstreams act on.
const RESET_MODEL: &str = "reset-model";
const LIMITED_MODEL: &str = "limited-model";

// ---------------------------------------------------------------------------
// Fake upstreams
// ---------------------------------------------------------------------------

fn openai_frames() -> Vec<String> {
    let chunk = |choices: &str, usage: &str| {
        format!(
            r#"{{"id":"chatcmpl-test","object":"chat.completion.chunk","created":1700000000,"model":"gpt-test","system_fingerprint":"fp_test","choices":[{choices}]{usage}}}"#
        )
    };
    let data = [
        chunk(
            r#"{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}"#,
            "",
        ),
        chunk(r#"{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}"#, ""),
        chunk(r#"{"index":0,"delta":{"content":" wörld ✓\nsecond line"},"logprobs":null,"finish_reason":null}"#, ""),
        chunk(r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}"#, r#","usage":null"#),
        chunk("", r#","usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}"#),
        "[DONE]".to_string(),
    ];
    data.iter().map(|d| format!("data: {d}\n\n")).collect()
}

fn anthropic_frames() -> Vec<String> {
    let events = [
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_test","type":"message","role":"assistant","content":[],"model":"claude-test","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        ("ping", r#"{"type": "ping"}"#),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" wörld ✓\nsecond line"}}"#,
        ),
        ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":5}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];
    events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect()
}

/// An upstream serving `frames` as an event stream; the request's `model`
/// picks a variant: the stream cut mid-way, or a 429 with `error_body`.
async fn sdk_upstream(frames: Vec<String>, error_body: &'static str) -> Upstream {
    Upstream::start(move |seen| {
        let model = serde_json::from_slice::<serde_json::Value>(&seen.body)
            .ok()
            .and_then(|v| v["model"].as_str().map(String::from))
            .unwrap_or_default();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
        match model.as_str() {
            // A few events, each flushed on its own, then the connection cut.
            RESET_MODEL => {
                Reply::chunks("text/event-stream", &refs[..3]).paced(Duration::from_millis(20)).ending(End::Reset)
            }
            LIMITED_MODEL => Reply::full(429, "application/json", error_body).header("x-request-id", "req_test"),
            _ => Reply::chunks("text/event-stream", &refs).paced(Duration::from_millis(2)),
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Running the scripts
// ---------------------------------------------------------------------------

fn python() -> String {
    std::env::var("SSEGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn missing_sdk(why: &str) -> ! {
    panic!(
        "{why}\nThe SDK tests need the official OpenAI and Anthropic Python SDKs. Run the test script, \
         scripts/test.sh, which installs them:\n  python3 -m venv target/pyenv && \
         target/pyenv/bin/pip install -r tests/sdk/requirements.txt\nand runs the suite with \
         SSEGATE_TEST_PYTHON=target/pyenv/bin/python (currently: {:?}).",
        python()
    )
}

/// What one script run printed, per model.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// What the SDK did for one request.
#[derive(Debug, PartialEq)]
struct Section {
    /// One JSON line per item the SDK yielded.
    items: Vec<String>,
    /// The `ERROR <Class> <message>` line, if it raised.
    error: Option<String>,
}

impl Run {
    /// The output for `model` (the script ran several, each after `=== MODEL`).
    fn section(&self, model: &str) -> Section {
        let header = format!("=== {model}");
        let mut lines = self.stdout.lines().skip_while(|l| *l != header);
        assert!(lines.next().is_some(), "no output for {model}: {self:#?}");
        let mut section = Section { items: Vec::new(), error: None };
        for line in lines.take_while(|l| !l.starts_with("=== ")) {
            if line.starts_with("ERROR ") {
                section.error = Some(line.to_string());
            } else {
                assert!(section.error.is_none(), "output after the ERROR line for {model}: {self:#?}");
                section.items.push(line.to_string());
            }
        }
        section
    }

    /// The class the SDK raised for `model`, and the details from stderr.
    fn error(&self, model: &str) -> (String, serde_json::Value) {
        let section = self.section(model);
        let line = section.error.unwrap_or_else(|| panic!("{model}: expected the SDK to raise: {self:#?}"));
        let class = line.split(' ').nth(1).unwrap_or_default().to_string();
        let details = self
            .stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|d| d["model"] == model);
        (class, details.unwrap_or_else(|| panic!("{model}: no error details on stderr: {self:#?}")))
    }
}

/// Runs `script BASE_URL MODEL...` with the SDK pointed only at loopback.
async fn run(script: &str, base_url: &str, models: &[&str]) -> Run {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(&path).arg(base_url).args(models).kill_on_drop(true);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost").env("no_proxy", "127.0.0.1,localhost");
    cmd.env("PYTHONDONTWRITEBYTECODE", "1").env("PYTHONIOENCODING", "utf-8");
    let out = match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => missing_sdk(&format!("cannot run the Python interpreter {:?}: {e}", python())),
        Err(_) => panic!("{script} {base_url} {models:?} did not finish within 60 s"),
    };
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if run.code == Some(4) || run.stdout.starts_with("IMPORT_ERROR") {
        missing_sdk(&format!("{script}: the SDK cannot be imported: {}", run.stdout.trim()));
    }
    assert!(matches!(run.code, Some(0 | 3)), "{script} crashed: {run:#?}");
    run
}

/// The same requests, directly and through the proxy: the normal stream
/// and a 429 both ways, and through the proxy a stream cut mid-way.
struct Outcomes {
    model: &'static str,
    direct: Run,
    proxied: Run,
}

async fn outcomes(
    script: &str,
    frames: Vec<String>,
    error_body: &'static str,
    suffix: &str,
    model: &'static str,
) -> Outcomes {
    let upstream = sdk_upstream(frames, error_body).await;
    let proxy = Proxy::start(config(upstream.addr)).await;
    let direct_base = format!("http://{}{suffix}", upstream.addr);
    let proxy_base = format!("http://{}{suffix}", proxy.addr);
    // Two interpreters, not one per request: importing an SDK takes seconds.
    let (direct_models, proxied_models) = ([model, LIMITED_MODEL], [model, LIMITED_MODEL, RESET_MODEL]);
    let (direct, proxied) =
        tokio::join!(run(script, &direct_base, &direct_models), run(script, &proxy_base, &proxied_models));
    // Every request really reached the upstream.
    assert_eq!(upstream.count(), 5, "requests seen by the upstream");
    Outcomes { model, direct, proxied }
}

fn assert_same_stream(o: &Outcomes, expected_items: usize) {
    let direct = o.direct.section(o.model);
    assert_eq!(direct.error, None, "direct: {:#?}", o.direct);
    assert_eq!(direct.items.len(), expected_items, "items the SDK yields directly: {:#?}", o.direct);
    assert_eq!(o.proxied.section(o.model), direct, "the SDK yields something else through the proxy");
}

/// Through the proxy, a stream cut mid-way yields its first items, then
/// the SDK raises on the proxy's `error` event (type `upstream_reset`).
fn assert_reset_raises(o: &Outcomes) -> (String, serde_json::Value) {
    let (class, details) = o.proxied.error(RESET_MODEL);
    let yielded = o.proxied.section(RESET_MODEL).items;
    assert!(!yielded.is_empty(), "the first events should reach the SDK before the error: {:#?}", o.proxied);
    let full = o.direct.section(o.model).items;
    assert_eq!(yielded[..], full[..yielded.len()], "items before the error differ from the full stream's");
    let body = &details["body"];
    let error = if body["error"].is_object() { &body["error"] } else { body };
    assert_eq!(error["type"], "upstream_reset", "error body the SDK saw: {details}");
    (class, details)
}

/// A 429 is passed through unchanged, so the SDK raises the same error.
fn assert_same_status_error(o: &Outcomes) {
    let (class, details) = o.direct.error(LIMITED_MODEL);
    assert_eq!(class, "RateLimitError", "{details}");
    assert_eq!(details["status_code"], 429);
    assert_eq!(
        o.proxied.section(LIMITED_MODEL),
        o.direct.section(LIMITED_MODEL),
        "the SDK raised something else through the proxy"
    );
}

fn mro(details: &serde_json::Value) -> Vec<&str> {
    details["mro"].as_array().map(|a| a.iter().filter_map(|c| c.as_str()).collect()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_streams_identically_through_the_proxy() {
    let error_body = r#"{"error":{"message":"Rate limit reached for gpt-test","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    let o = outcomes(OPENAI, openai_frames(), error_body, "/v1", "gpt-test").await;
    // Five chunks; `[DONE]` ends the stream and is not yielded.
    assert_same_stream(&o, 5);
    assert!(o.direct.stdout.contains(r#"wörld ✓\nsecond line"#), "{}", o.direct.stdout);

    // `openai.APIError` itself: its subclass APIConnectionError is what a
    // bare cut connection gives, which is what the proxy must not let through.
    let (class, details) = assert_reset_raises(&o);
    assert_eq!(class, "APIError", "{details}");
    assert_eq!(mro(&details)[..2], ["APIError", "OpenAIError"], "{details}");

    assert_same_status_error(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_sdk_streams_identically_through_the_proxy() {
    let error_body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your rate limit"}}"#;
    let o = outcomes(ANTHROPIC, anthropic_frames(), error_body, "", "claude-test").await;
    // Eight events; the SDK skips `ping`.
    assert_same_stream(&o, 7);
    assert!(o.direct.stdout.contains("RawMessageStopEvent"), "{}", o.direct.stdout);

    // An `anthropic.APIStatusError` (an `anthropic.APIError`).
    let (class, details) = assert_reset_raises(&o);
    let mro = mro(&details);
    assert_eq!(mro.first().copied(), Some(class.as_str()));
    assert!(mro.contains(&"APIStatusError") && mro.contains(&"APIError"), "{details}");
    assert!(!mro.contains(&"APIConnectionError"), "{details}");

    assert_same_status_error(&o);
}
