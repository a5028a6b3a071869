//! `ssegate demo`: a fake model upstream in the same process, so the proxy
//! can be tried with nothing else running.
//!
//! `POST /v1/chat/completions` streams a plausible answer word by word at
//! about 30 tokens/s after a first-token delay, as OpenAI-style SSE by
//! default; `?format=ndjson` gives Ollama-style NDJSON and `?format=text`
//! raw text. The generation stops as soon as the proxy closes the request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::{ChannelBody, ResponseBody};

/// The chat page served at `/` by `ssegate demo`: one static file, no
/// external assets, so it works offline.
pub const PAGE: &str = include_str!("demo.html");

/// The demo's own endpoints on the public listener: the page at `/` and
/// `POST /demo/drop/{token}`, which ends the stream's connection so that the
/// browser's EventSource reconnects and resumes with Last-Event-ID.
pub async fn page(app: &crate::App, method: &http::Method, path: &str) -> Option<Response<ResponseBody>> {
    if path == "/" && method == http::Method::GET {
        let mut resp = Response::new(crate::body::full(PAGE));
        resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
        resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
        return Some(resp);
    }
    let token = path.strip_prefix("/demo/drop/")?;
    if method != http::Method::POST {
        return None;
    }
    let status = match app.store.drop_clients(token).await {
        Ok(true) => http::StatusCode::NO_CONTENT,
        Ok(false) => http::StatusCode::NOT_FOUND,
        Err(_) => http::StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = status;
    Some(resp)
}

/// Pace of the fake model.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub first_token: Duration,
    pub per_token: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace { first_token: Duration::from_millis(400), per_token: Duration::from_millis(33) }
    }
}

const ANSWER: &str = "Server-Sent Events are a simple way to stream text from a server to a browser. \
The model writes one token at a time; ssegate numbers each event, flushes it at once, \
sends keep-alive comments when the model is thinking, and keeps a replay buffer so that \
a browser that loses its connection resumes where it left off instead of losing the answer. \
When you press Stop, the request to the model is cancelled and the GPU is free again.";

/// Starts the fake model on `listener` and serves until the task is dropped.
pub fn spawn(listener: TcpListener, pace: Pace) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = service_fn(move |req| async move { Ok::<_, Infallible>(answer(req, pace).await) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// Binds the fake model on an ephemeral loopback port.
pub async fn bind() -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

async fn answer(req: Request<Incoming>, pace: Pace) -> Response<ResponseBody> {
    let format = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("format=")))
        .unwrap_or("sse")
        .to_string();
    let prompt = match req.into_body().collect().await {
        Ok(body) => prompt_of(&body.to_bytes()),
        Err(_) => String::new(),
    };
    let (tx, body) = ChannelBody::new(16);
    let content_type = match format.as_str() {
        "ndjson" => "application/x-ndjson",
        "text" => "text/plain; charset=utf-8",
        _ => "text/event-stream",
    };
    tokio::spawn(async move {
        tokio::time::sleep(pace.first_token).await;
        let intro = if prompt.is_empty() { String::new() } else { format!("You asked: \"{prompt}\". ") };
        let text = format!("{intro}{ANSWER}");
        let words: Vec<&str> = text.split_inclusive(' ').collect();
        for (i, word) in words.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(pace.per_token).await;
            }
            if tx.send(frame(&format, word, false)).await.is_err() {
                return; // the proxy closed the request: stop generating
            }
        }
        let _ = tx.send(frame(&format, "", true)).await;
    });
    let mut resp = Response::new(http_body_util::BodyExt::boxed_unsync(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

fn frame(format: &str, word: &str, last: bool) -> Bytes {
    match (format, last) {
        ("ndjson", false) => Bytes::from(format!("{}\n", serde_json::json!({"response": word, "done": false}))),
        ("ndjson", true) => Bytes::from_static(b"{\"response\":\"\",\"done\":true}\n"),
        ("text", false) => Bytes::from(word.to_string()),
        ("text", true) => Bytes::new(),
        (_, false) => {
            let chunk = serde_json::json!({
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]
            });
            Bytes::from(format!("data: {chunk}\n\n"))
        }
        (_, true) => Bytes::from_static(b"data: [DONE]\n\n"),
    }
}

/// The last user message of an OpenAI-style request, or a `prompt` field.
fn prompt_of(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return String::new() };
    let from_messages = v["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str());
    let text = from_messages.or(v["prompt"].as_str()).unwrap_or("");
    text.chars().take(200).collect()
}
