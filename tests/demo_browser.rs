//! `ssegate demo` in a real browser: the release's own binary runs the demo
//! (proxy + built-in fake model), headless Debian Chromium opens its chat
//! page at `/`, and the tests drive the page like a user — type, Send,
//! Drop connection, Stop — reading the DOM as the answer streams in.
//!
//! The first test also saves a screenshot of the finished chat to
//! docs/demo.png (for the README).
//!
//! Needs /usr/bin/chromium and /usr/bin/chromedriver (scripts/test.sh
//! installs them); without them these tests fail, they do not skip.

#[path = "support/browser.rs"]
mod chrome;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrome::{Browser, ONE_AT_A_TIME};
use fantoccini::Locator;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

/// The fake model's fixed answer, read from `ANSWER` in src/demo.rs (a
/// string literal with `\` line continuations), so this test follows it.
fn model_answer() -> String {
    let src = include_str!("../src/demo.rs");
    let head = "const ANSWER: &str = \"";
    let start = src.find(head).expect("src/demo.rs no longer has `const ANSWER: &str = \"…\"`") + head.len();
    let mut out = String::new();
    let mut chars = src[start..].chars().peekable();
    loop {
        match chars.next().expect("ANSWER's string literal does not end") {
            '"' => return out,
            '\\' => match chars.next() {
                Some('\n') => {
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                }
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                other => panic!("ANSWER has an escape this test does not read: \\{other:?}"),
            },
            c => out.push(c),
        }
    }
}

/// What the fake model answers to `prompt`, word by word (each word with
/// its trailing space, as the model sends it).
fn expected_words(prompt: &str) -> Vec<String> {
    let text = format!("You asked: \"{prompt}\". {}", model_answer());
    text.split_inclusive(' ').map(str::to_string).collect()
}

/// `ssegate demo` as a child process; killed when dropped.
struct Demo {
    child: Child,
    /// `http://127.0.0.1:PORT`, the chat page's origin.
    url: String,
    /// `http://127.0.0.1:PORT` of the admin listener (`/metrics`).
    admin: String,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Demo {
    /// Starts `ssegate demo --listen 127.0.0.1:<free port>` and waits for
    /// the line that names its URL.
    fn start() -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr.log");
        for attempt in 0.. {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = Command::new(env!("CARGO_BIN_EXE_ssegate"))
                .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .expect("could not run the ssegate binary");
            // A thread reads stdout to its end (so the demo never blocks on
            // a full pipe) and hands over the first line.
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    let (url, admin) = parse_banner(&line);
                    assert_eq!(url, format!("http://127.0.0.1:{port}"), "the demo's URL: {line}");
                    return Demo { child, url, admin, stderr, _dir: dir };
                }
                Err(_) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
                    // The port picked free may have been taken meanwhile: try again.
                    if attempt < 2 && status.is_some() {
                        eprintln!("retrying the demo ({status:?}): {log}");
                        continue;
                    }
                    panic!("`ssegate demo` printed no URL within 20 s (exit: {status:?}); stderr:\n{log}");
                }
            }
        }
        unreachable!()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// One sample of the admin listener's /metrics, 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("/metrics failed")
            .text()
            .await
            .unwrap();
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ssegate demo is running on http://A (admin: http://B)` → (A, B).
fn parse_banner(line: &str) -> (String, String) {
    let rest = line
        .strip_prefix("ssegate demo is running on ")
        .unwrap_or_else(|| panic!("the demo's first line is not its URL: {line:?}"));
    let (url, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let admin = rest
        .strip_prefix("(admin: ")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("the demo's first line names no admin address: {line:?}"));
    (url.to_string(), admin.to_string())
}

/// What the page shows at one moment.
#[derive(Debug, Clone, Deserialize)]
struct Snap {
    /// `#answer`'s text (the answer being streamed, or the last one).
    answer: String,
    /// `#status`'s `data-state`.
    state: String,
    /// `#status`'s text.
    status: String,
    /// `#events tr.ev`: (id, event, data) per event received.
    events: Vec<(String, String, String)>,
    /// `#events tr.note`: what the page noted about the connection.
    notes: Vec<String>,
}

impl Snap {
    fn show(&self) -> String {
        let events: Vec<String> = self.events.iter().map(|(i, e, d)| format!("    {i:>3} {e:<7} {d}")).collect();
        format!(
            "  status [{}] {:?}\n  answer {:?}\n  notes {:?}\n  events:\n{}",
            self.state,
            self.status,
            self.answer,
            self.notes,
            events.join("\n")
        )
    }
}

const SNAP: &str = r##"
const q = (s) => document.querySelector(s);
const answer = q("#answer");
const status = q("#status");
const rows = (cls) => Array.from(document.querySelectorAll("#events tr." + cls));
return {
  answer: answer ? answer.textContent : "",
  state: status.dataset.state || "",
  status: status.textContent,
  events: rows("ev").map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent, tr.cells[2].textContent]),
  notes: rows("note").map((tr) => tr.cells[2].textContent),
};
"##;

/// Fails the test if a WebDriver command hangs or fails.
async fn wd<T, E: std::fmt::Display>(what: &str, fut: impl std::future::Future<Output = Result<T, E>>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what} failed: {e}"),
        Err(_) => panic!("{what} took over 10 s"),
    }
}

struct Page<'a> {
    browser: &'a Browser,
}

impl Page<'_> {
    async fn snap(&self) -> Snap {
        let v: Value = wd("reading the DOM", self.browser.client.execute(SNAP, vec![])).await;
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("unexpected DOM read ({e}): {v}"))
    }

    /// Polls the page until `done` holds, failing after `within` with what
    /// the page shows.
    async fn wait(&self, what: &str, within: Duration, done: impl Fn(&Snap) -> bool) -> Snap {
        let deadline = Instant::now() + within;
        loop {
            let snap = self.snap().await;
            if done(&snap) {
                return snap;
            }
            if Instant::now() > deadline {
                panic!("timed out after {within:?} waiting for {what}; the page shows:\n{}", snap.show());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resizes the window so that the page's viewport is `width`×`height`.
    async fn viewport(&self, width: u32, height: u32) {
        let client = &self.browser.client;
        wd("sizing the window", client.set_window_size(width, height)).await;
        let inner = wd("reading the viewport", client.execute("return [innerWidth, innerHeight];", vec![])).await;
        let (w, h) = (inner[0].as_u64().unwrap() as u32, inner[1].as_u64().unwrap() as u32);
        if (w, h) != (width, height) {
            let (w, h) = (2 * width - w.min(2 * width), 2 * height - h.min(2 * height));
            wd("sizing the window", client.set_window_size(w, h)).await;
        }
    }

    async fn click(&self, css: &str) {
        let el = wd(&format!("finding {css}"), self.browser.client.find(Locator::Css(css))).await;
        wd(&format!("clicking {css}"), el.click()).await;
    }

    /// Picks a format, types `prompt` into the (cleared) prompt box, presses Send.
    async fn ask(&self, format: &str, prompt: &str) {
        let select = wd("finding #format", self.browser.client.find(Locator::Css("#format"))).await;
        wd("choosing the format", select.select_by_value(format)).await;
        let input = wd("finding #prompt", self.browser.client.find(Locator::Css("#prompt"))).await;
        wd("clearing #prompt", input.clear()).await;
        wd("typing the prompt", input.send_keys(prompt)).await;
        self.click("#send").await;
    }
}

fn is_end(s: &Snap) -> bool {
    s.events.iter().any(|(_, e, _)| e == "end" || e == "error")
}

fn settled(s: &Snap) -> bool {
    matches!(s.state.as_str(), "done" | "stopped" | "error")
}

/// Ids in the raw events panel are 1, 2, … N, each once, in order.
fn assert_ids_in_sequence(s: &Snap) {
    let ids: Vec<&str> = s.events.iter().map(|(i, _, _)| i.as_str()).collect();
    let expected: Vec<String> = (1..=ids.len()).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected, "the raw events' ids are not 1..N each once:\n{}", s.show());
}

/// The text each message event carries, as the page extracts it.
fn texts(format: &str, s: &Snap) -> Vec<String> {
    s.events
        .iter()
        .filter(|(_, e, _)| e == "message")
        .map(|(_, _, data)| match format {
            "text" => data.clone(),
            _ if data == "[DONE]" => String::new(),
            "ndjson" => serde_json::from_str::<Value>(data).unwrap()["response"].as_str().unwrap_or("").to_string(),
            _ => serde_json::from_str::<Value>(data).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// Reads the answer while it streams: at least `reads` reads, each strictly
/// longer than the one before, each a proper prefix of the full answer,
/// each taken while the page still said "streaming".
async fn assert_grows(page: &Page<'_>, full: &str, reads: usize) -> Snap {
    let mut last = String::new();
    let mut snap = None;
    for n in 1..=reads {
        let prev = last.clone();
        let s = page
            .wait(&format!("read {n}: the answer to grow past {} bytes", prev.len()), Duration::from_secs(10), |s| {
                s.answer.len() > prev.len() || settled(s)
            })
            .await;
        assert!(!settled(&s), "read {n}: the answer was already finished, it did not stream:\n{}", s.show());
        assert_eq!(s.state, "streaming", "read {n}:\n{}", s.show());
        assert!(s.answer.len() > prev.len(), "read {n} is not longer than read {}:\n{}", n - 1, s.show());
        assert!(
            full.starts_with(&s.answer) && s.answer.len() < full.len(),
            "read {n} is not a proper prefix of the model's answer {full:?}:\n{}",
            s.show()
        );
        last = s.answer.clone();
        snap = Some(s);
    }
    snap.unwrap()
}

/// Clicks "Drop connection" mid-answer, sees the page lose and regain its
/// connection, and the answer end whole: exactly the model's words, the
/// events' ids 1..N each once. Returns the finished page.
async fn drop_and_finish(page: &Page<'_>, format: &str, prompt: &str) -> Snap {
    let words = expected_words(prompt);
    let full = words.concat();
    let before = page.snap().await;
    assert!(!is_end(&before), "the answer ended before the drop:\n{}", before.show());
    let seen_at_click = before.events.len();
    page.click("#drop").await;

    let lost = page
        .wait("the page to see its connection dropped", Duration::from_secs(10), |s| {
            s.notes.iter().any(|n| n.starts_with("connection lost")) || settled(s)
        })
        .await;
    assert_eq!(lost.state, "reconnecting", "after the drop:\n{}", lost.show());
    assert!(!is_end(&lost), "the drop came after the end:\n{}", lost.show());
    // "connection lost after event N; …": the last id the page had.
    let lost_after: usize = lost
        .notes
        .iter()
        .find_map(|n| n.strip_prefix("connection lost after event ")?.split(';').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no \"connection lost after event N\" note:\n{}", lost.show()));
    assert!(lost_after >= seen_at_click, "{}", lost.show());
    assert!(
        lost.answer.len() < full.len() && full.starts_with(&lost.answer),
        "when the connection dropped the answer was not a proper prefix:\n{}",
        lost.show()
    );

    let done = page.wait("the end of the answer", Duration::from_secs(20), settled).await;
    let shown = done.show();
    assert_eq!(done.state, "done", "{shown}");
    assert_eq!(done.answer, full, "the answer after the reconnect is not the model's answer:\n{shown}");
    assert!(done.answer.contains(prompt), "the answer does not echo the prompt:\n{shown}");
    assert_ids_in_sequence(&done);
    // The events' data, read here and not by the page, make the same answer;
    // for sse and ndjson one event per word.
    let texts = texts(format, &done);
    assert_eq!(texts.concat(), full, "{shown}");
    if format != "text" {
        assert_eq!(texts, words, "{shown}");
    }
    let last = done.events.last().unwrap();
    assert_eq!((last.1.as_str(), last.2.as_str()), ("end", r#"{"reason":"complete"}"#), "{shown}");
    if format != "text" {
        // One event per word, the model's own last event, then `end`.
        assert_eq!(done.events.len(), words.len() + 2, "{shown}");
    }
    // The page saw the drop and its EventSource came back with Last-Event-ID.
    let reconnected = format!("reconnected with Last-Event-ID: {lost_after}");
    assert!(done.notes.contains(&reconnected), "expected the note {reconnected:?}:\n{shown}");
    assert!(
        done.status.contains(&format!("resumed after event {lost_after}")),
        "the status line does not say where it resumed:\n{shown}"
    );
    done
}

async fn open<'a>(browser: &'a Browser, demo: &Demo) -> Page<'a> {
    browser.goto(&format!("{}/", demo.url)).await;
    let page = Page { browser };
    page.wait("the page to load", Duration::from_secs(10), |s| s.state == "idle").await;
    page
}

/// Type, Send: the answer streams in (it grows between reads of the DOM);
/// "Drop connection" in the middle: EventSource reconnects by itself and the
/// answer ends exactly as the model wrote it, ids 1..N each once. Saves the
/// finished chat as docs/demo.png.
#[tokio::test]
async fn the_answer_streams_in_and_resumes_after_a_dropped_connection() {
    let _one = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let browser = Browser::start().await;
    let page = open(&browser, &demo).await;
    page.viewport(1100, 800).await;

    let prompt = "Why does my chat app freeze behind nginx?";
    let full = expected_words(prompt).concat();
    page.ask("sse", prompt).await;
    let connecting = page.snap().await;
    assert!(
        matches!(connecting.state.as_str(), "connecting" | "streaming"),
        "right after Send:\n{}",
        connecting.show()
    );
    assert_grows(&page, &full, 4).await;
    let done = drop_and_finish(&page, "sse", prompt).await;
    assert!(done.events.iter().any(|(_, _, d)| d == "[DONE]"), "{}", done.show());

    // The proxy resumed the stream (it did not start a second one).
    assert_eq!(demo.metric("ssegate_resumes_total").await, 1.0, "demo stderr:\n{}", demo.stderr());
    assert_eq!(demo.metric("ssegate_tokens_redeemed_total").await, 1.0);

    // Show where the connection dropped and resumed in the raw events panel.
    // Answers after two animation frames, so that the screenshot shows the scroll.
    let script = "const done = arguments[arguments.length - 1];
                  const log = document.getElementById('log');
                  const note = document.querySelector('#events tr.note');
                  if (note) log.scrollTop += note.getBoundingClientRect().top - log.getBoundingClientRect().top - 90;
                  requestAnimationFrame(() => requestAnimationFrame(() => done(log.scrollTop)));";
    wd("scrolling the events panel", browser.client.execute_async(script, vec![])).await;
    let png = wd("taking a screenshot", browser.client.screenshot()).await;
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    let size =
        (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
    assert_eq!(size, (1100, 800), "the screenshot's size");
    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("demo.png"), &png).unwrap();
    browser.close().await;
}

/// The other two upstream formats give the same answer on the page, and
/// resume as well.
#[tokio::test]
async fn ndjson_and_raw_text_give_the_same_answer_and_resume() {
    let _one = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let browser = Browser::start().await;
    for (format, prompt) in [("ndjson", "Is NDJSON re-framed?"), ("text", "And raw text, ünïcødé included?")] {
        let page = open(&browser, &demo).await;
        page.ask(format, prompt).await;
        let full = expected_words(prompt).concat();
        assert_grows(&page, &full, 2).await;
        drop_and_finish(&page, format, prompt).await;
    }
    browser.close().await;
}

/// Stop mid-answer: the page says the model was cancelled, the stream ends
/// with `end` `{"reason":"cancelled"}`, and the answer stops growing.
#[tokio::test]
async fn stop_cancels_the_model_and_the_answer_stops_growing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let demo = Demo::start();
    let browser = Browser::start().await;
    let page = open(&browser, &demo).await;
    let prompt = "Count to a thousand, slowly.";
    let words = expected_words(prompt);
    let full = words.concat();
    page.ask("sse", prompt).await;
    page.wait("five words", Duration::from_secs(10), |s| s.answer.split_inclusive(' ').count() >= 5 || settled(s))
        .await;
    page.click("#stop").await;

    let stopped = page.wait("the end event after Stop", Duration::from_secs(10), |s| is_end(s) && settled(s)).await;
    let shown = stopped.show();
    assert_eq!(stopped.state, "stopped", "{shown}");
    assert_eq!(stopped.status, "stopped — the model was cancelled", "{shown}");
    let last = stopped.events.last().unwrap();
    assert_eq!((last.1.as_str(), last.2.as_str()), ("end", r#"{"reason":"cancelled"}"#), "{shown}");
    assert_ids_in_sequence(&stopped);
    let got = stopped.answer.split_inclusive(' ').count();
    assert!(
        full.starts_with(&stopped.answer) && got + 10 < words.len(),
        "Stop did not cut the answer short ({got} of {} words):\n{shown}",
        words.len()
    );

    // Nothing more arrives: watch the page for 1.5 s.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let now = page.snap().await;
        assert_eq!(now.answer, stopped.answer, "the answer grew after Stop:\n{}", now.show());
        assert_eq!(now.events.len(), stopped.events.len(), "events arrived after Stop:\n{}", now.show());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        demo.metric("ssegate_streams_cancelled_total{reason=\"delete\"}").await,
        1.0,
        "demo stderr:\n{}",
        demo.stderr()
    );
    browser.close().await;
}
