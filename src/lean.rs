//! The lean path: a plain-TCP HTTP/1.1 `GET` whose answer is an event
//! stream is served without hyper.
//!
//! When the client's first read holds a whole request head that is a plain
//! `GET` (HTTP/1.1, origin-form target, no body, no `Expect`, `Upgrade` or
//! `Connection` other than `keep-alive`), the request is parsed here
//! (httparse, header values sharing the read buffer) and routed as hyper's
//! requests are. When the answer is an event stream (`crate::stream`), the
//! stream's task writes all of it: the head with the first chunk, the
//! events as they come, the last chunk. From the request on, the
//! connection's task watches the socket, as hyper does: a client that
//! leaves, before the answer or during the stream, ends the routing or the
//! stream (and the upstream request), and what it sends meanwhile (its next
//! request) is read once and kept for later. The next requests on the
//! connection are taken the same way, or by hyper once one is not for the
//! lean path.
//!
//! Any other answer (an error, a body that is not an event stream, a
//! handoff stream) goes to hyper, which reads the same request head again
//! and sends the answer already made for it; any other request is hyper's
//! from the start. A stream set up this way costs no hyper connection (its
//! read and write buffers, its dispatcher, its head encoder) and no request
//! future boxed for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::body::{ClientBody, ResponseBody};
use crate::direct::{ClientSocket, Socket};
use crate::proxy::ConnInfo;
use crate::stream::Inline;
use crate::{router, App};

/// The most request headers the lean path takes; a request with more is
/// hyper's.
const MAX_HEADERS: usize = 64;

/// The most read at once from a client while its stream goes out.
const AHEAD_READ: usize = 4096;

/// `first`'s request, when it is one for the lean path, and the length of
/// its head.
pub fn request(first: &Bytes) -> Option<(Request<ClientBody>, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(first) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path.filter(|p| p.starts_with('/'))?;
    let uri = Uri::from_maybe_shared(first.slice_ref(path.as_bytes())).ok()?;
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let body_or_upgrade = name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE;
        if body_or_upgrade || (name == header::CONNECTION && !h.value.eq_ignore_ascii_case(b"keep-alive")) {
            return None;
        }
        map.append(name, HeaderValue::from_maybe_shared(first.slice_ref(h.value)).ok()?);
    }
    let mut req = Request::new(ClientBody::Right(http_body_util::Empty::new()));
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    Some((req, len))
}

/// How a request on the lean path went.
pub enum Served {
    /// The stream went out whole. What the client sent after the request
    /// (its next requests) is for hyper.
    Done(Bytes),
    /// The answer is not an event stream: hyper sends it, to the request
    /// it reads again from the bytes given back.
    Fallback(Response<ResponseBody>, Bytes),
    /// The connection is over: the client left, or a write failed.
    Closed,
}

/// Routes `req` (from [`request`] on `read`) and writes its event stream to
/// `socket`.
pub async fn serve(
    app: Arc<App>,
    req: Request<ClientBody>,
    read: Bytes,
    socket: &Arc<Socket>,
    info: ConnInfo,
) -> Served {
    let mut ahead = BytesMut::new();
    // The routing, while the socket is watched too: a client that leaves
    // before the answer's head ends it, and the upstream request with it.
    // In a block, so that the answer and the stream, taken after the
    // routing's await, take no room in the connection's future.
    let mut task = {
        let mut routing = std::pin::pin!(route(app, req, socket, info));
        let routed = std::future::poll_fn(|cx| {
            if ahead.is_empty() && watch(socket.tcp(), &mut ahead, cx).is_ready() {
                return Poll::Ready(None);
            }
            routing.as_mut().poll(cx).map(Some)
        })
        .await;
        let Some((resp, inline)) = routed else {
            tracing::debug!("client left before the answer");
            return Served::Closed;
        };
        let Some(mut stream) = inline.take() else {
            // hyper reads the request again, and what came after it.
            let again = if ahead.is_empty() { read } else { [read, ahead.freeze()].concat().into() };
            return Served::Fallback(resp, again);
        };
        stream.set_head(encode_head(&resp.into_parts().0));
        stream.spawn_whole()
    };
    // Not held for the stream's life (the request's header values shared it).
    drop(read);
    // Woken by the client's socket and by the stream's end only: the
    // stream's task writes the events.
    let ended = std::future::poll_fn(|cx| {
        // As hyper: the socket is read until something came (the next
        // request, pipelined), then left until the stream is over.
        if ahead.is_empty() && watch(socket.tcp(), &mut ahead, cx).is_ready() {
            // hyper (without `half_close`) takes the end of the client's
            // side as the client gone, and so does this: dropping the
            // handle ends the stream, as hyper drops a body.
            return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
        }
        Pin::new(&mut task).poll(cx).map(|r| match r {
            Ok(r) => r.map(drop),
            Err(e) => Err(std::io::Error::other(e)),
        })
    })
    .await;
    drop(task);
    match ended {
        Ok(()) => Served::Done(ahead.freeze()),
        Err(e) => {
            tracing::debug!(error = %e, "event stream ended early");
            Served::Closed
        }
    }
}

/// Routes `req`, with the place for its event stream.
async fn route(
    app: Arc<App>,
    mut req: Request<ClientBody>,
    socket: &Arc<Socket>,
    info: ConnInfo,
) -> (Response<ResponseBody>, Inline) {
    let inline = Inline::default();
    req.extensions_mut().insert(ClientSocket(socket.clone()));
    req.extensions_mut().insert(inline.clone());
    (router::handle(app, req, info).await, inline)
}

/// Reads what the client sends while its request is served into `ahead`
/// (nothing is allocated until something came); ready once the client
/// closed its side or the socket failed.
fn watch(tcp: &TcpStream, ahead: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if ready!(tcp.poll_read_ready(cx)).is_err() {
            return Poll::Ready(());
        }
        let mut buf = [0u8; AHEAD_READ];
        match tcp.try_io(Interest::READABLE, || tcp.try_read(&mut buf)) {
            Ok(0) => return Poll::Ready(()),
            Ok(n) => {
                ahead.extend_from_slice(&buf[..n]);
                return Poll::Pending;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(()),
        }
    }
}

/// The response head as hyper writes it for a chunked body: the status
/// line, the headers, `transfer-encoding`, and `date` unless there is one.
fn encode_head(head: &http::response::Parts) -> Bytes {
    let mut out = BytesMut::with_capacity(256);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(head.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(head.status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in &head.headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"transfer-encoding: chunked\r\n");
    if !head.headers.contains_key(header::DATE) {
        out.put_slice(b"date: ");
        date(&mut out);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

thread_local! {
    /// The `date` header's value, made again once a second.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

/// Appends the current time as an HTTP date.
fn date(out: &mut BytesMut) {
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.put_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lean(head: &str) -> Option<Request<ClientBody>> {
        let first = Bytes::from(head.to_string());
        let (req, len) = request(&first)?;
        assert_eq!(len, head.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0));
        Some(req)
    }

    #[test]
    fn a_plain_get_is_taken_with_its_target_and_headers() {
        let req = lean("GET /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\nConnection: Keep-Alive\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET / HTTP/1.1\r\n")
            .expect("taken");
        assert_eq!(req.uri().path(), "/v1/chat");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(req.headers()["accept"], "text/event-stream");
        let xa: Vec<_> = req.headers().get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
    }

    #[test]
    fn anything_else_is_left_to_hyper() {
        for head in [
            "POST /v1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "HEAD /v1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /v1 HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET http://a/v1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /v1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET /v1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1 HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /v1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET /v1 HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /v1 HTTP/1.1\r\nHost: a\r\n",
            "GET /v1 HTTP/1.1\r\nBad Header: a\r\n\r\n",
        ] {
            assert!(lean(head).is_none(), "taken: {head:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(lean(&format!("GET / HTTP/1.1\r\n{many}\r\n")).is_none(), "taken with too many headers");
    }

    #[test]
    fn the_head_is_chunked_with_a_date_unless_it_has_one() {
        let mut resp = Response::new(());
        resp.headers_mut().insert("content-type", HeaderValue::from_static("text/event-stream"));
        let (mut head, ()) = resp.into_parts();
        let text = String::from_utf8(encode_head(&head).to_vec()).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"), "{text}");
        assert!(text.contains("\r\ntransfer-encoding: chunked\r\n"), "{text}");
        let date = text.split("\r\ndate: ").nth(1).and_then(|d| d.split("\r\n").next()).expect("a date");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
        assert!(text.ends_with("\r\n\r\n"));
        head.headers.insert("date", HeaderValue::from_static("Tue, 24 Nov 2026 10:00:00 GMT"));
        let text = String::from_utf8(encode_head(&head).to_vec()).expect("utf-8");
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
    }
}
