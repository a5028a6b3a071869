//! A small HTTP/1.1 client for streamed upstream responses.
//!
//! Event streams (direct mode when the client asks for events, and every
//! handoff stream) go upstream through this client instead of the pooled
//! hyper client: the response body is read from the upstream socket by the
//! task that writes to the client, with no connection task, channel or
//! cross-thread wake-up in between, into one 4 KiB buffer that chunks are cut
//! from without a copy. A connection whose response ended cleanly goes back
//! to a small pool for the next stream to the same upstream.
//!
//! Requests go out whole (`Content-Length`); responses may be chunked,
//! length-delimited or close-delimited; `1xx` heads are skipped.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::resolve::{Resolver, Source};

/// Bytes read for a response head at a time (nginx's `proxy_buffer_size`).
const READ_SIZE: usize = 4096;
/// The body's read size adapts between these: it doubles while reads fill
/// the buffer (a fast stream: fewer reads per event) and halves while they
/// use a quarter of it (a slow one: an idle stream holds 1 KiB).
const MIN_BODY_READ: usize = 1024;
const MAX_BODY_READ: usize = 16 * 1024;
/// The largest response head (and the largest trailer section) accepted.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// How long a pooled connection may sit unused.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream (and per worker: each worker has its
/// own). nginx's `keepalive 256` keeps as many per worker: a burst of
/// streams leaves that many for the next burst.
const POOL_PER_UPSTREAM: usize = 256;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect to {0} failed: {1}")]
    Connect(String, io::Error),
    #[error("connect to {0} timed out after {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(String, io::Error),
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("upstream response is malformed: {0}")]
    Malformed(&'static str),
    #[error("upstream closed the connection before the response was complete")]
    Eof,
    #[error("invalid upstream URI: {0}")]
    Uri(&'static str),
}

/// Which pool a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tls: bool,
    /// As in the URI (IPv6 in brackets), for `Host`.
    host: String,
    port: u16,
    /// Whether the URI named the port (then `Host` carries it).
    explicit_port: bool,
    /// The worker thread whose event loop serves the connection.
    worker: usize,
}

impl Key {
    fn of(uri: &http::Uri) -> Result<Key, H1Error> {
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(H1Error::Uri("scheme must be http or https")),
        };
        let host = uri.host().ok_or(H1Error::Uri("no host"))?.to_string();
        let port = uri.port_u16();
        Ok(Key {
            tls,
            host,
            port: port.unwrap_or(if tls { 443 } else { 80 }),
            explicit_port: port.is_some(),
            worker: crate::server::worker_index(),
        })
    }

    /// The host without IPv6 brackets, to resolve and to check a certificate against.
    fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    fn name(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The upstream socket, plain or TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether an idle connection can still be used: the upstream has
    /// neither closed it nor sent anything unasked.
    fn alive(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        self.tcp().poll_peek(&mut cx, &mut buf).is_pending()
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The pool hashes its keys with FNV-1a: they come from the configuration,
/// not from clients, so the standard SipHash's defence against chosen keys
/// buys nothing here, and it cost about 800 instructions a stream (a lookup
/// to take a connection, one to give it back).
type Pool = Arc<Mutex<HashMap<Key, Vec<(Io, Instant)>, fnv::FnvBuildHasher>>>;

/// The streaming client, shared by every route.
#[derive(Clone)]
pub struct Client {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    resolver: Arc<Resolver>,
    pool: Pool,
}

impl Client {
    /// A client that connects (TCP and TLS) within `connect_timeout`, to
    /// the addresses `resolver` has for a host.
    pub fn new(tls: Arc<rustls::ClientConfig>, connect_timeout: Duration, resolver: Arc<Resolver>) -> Client {
        Client { tls: tokio_rustls::TlsConnector::from(tls), connect_timeout, resolver, pool: Pool::default() }
    }

    /// Sends `req` and reads the response head; the body streams from the
    /// returned [`Body`].
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<Body>, H1Error> {
        let key = Key::of(req.uri())?;
        let wire = encode_request(&req, &key);
        let method = req.method();
        if let Some(io) = self.checkout(&key) {
            match exchange(io, &wire, method).await {
                Ok(head) => return Ok(self.response(head, key)),
                // The upstream closed a pooled connection as it was reused:
                // the request never got there, or (idempotent only) got no answer.
                Err(Failure::Unsent(_)) => {}
                Err(Failure::Unanswered(_)) if method == Method::GET || method == Method::HEAD => {}
                Err(f) => return Err(f.into_error()),
            }
        }
        let io = self.connect(&key).await?;
        let head = exchange(io, &wire, method).await.map_err(Failure::into_error)?;
        Ok(self.response(head, key))
    }

    fn response(&self, (head, io, buf, framing, reusable): Head, key: Key) -> Response<Body> {
        let reuse = reusable.then(|| (key, self.pool.clone()));
        let done = matches!(framing, Framing::Length(0) | Framing::Empty);
        let mut body = Body { io: Some(io), buf, framing, reuse, read_size: MIN_BODY_READ };
        if done {
            body.finish();
        }
        Response::from_parts(head, body)
    }

    async fn connect(&self, key: &Key) -> Result<Io, H1Error> {
        // The name only goes into errors: formatted when one happens.
        let name = || key.name();
        // The lookup the addresses came from: a failure forgets only that one.
        let mut tried = Source::default();
        let connect = async {
            let addrs =
                self.resolver.lookup(key.bare_host(), key.port).await.map_err(|e| H1Error::Connect(name(), e))?;
            tried = addrs.source();
            let mut last = None;
            let mut tcp = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        tcp = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let tcp = tcp.ok_or_else(|| {
                let e = last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address"));
                H1Error::Connect(name(), e)
            })?;
            let _ = tcp.set_nodelay(true);
            if !key.tls {
                return Ok(Io::Plain(tcp));
            }
            let server = rustls::pki_types::ServerName::try_from(key.bare_host().to_string())
                .map_err(|e| H1Error::Tls(name(), io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let tls = self.tls.connect(server, tcp).await.map_err(|e| H1Error::Tls(name(), e))?;
            Ok(Io::Tls(Box::new(tls)))
        };
        let result = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(H1Error::ConnectTimeout(name(), self.connect_timeout)),
        };
        // No address took the connection in time (refused, unreachable,
        // timed out, the TLS handshake included): the upstream may have
        // moved, and the next connection looks the name up again.
        if matches!(result, Err(H1Error::Connect(..) | H1Error::ConnectTimeout(..))) {
            self.resolver.forget(key.bare_host(), &tried);
        }
        result
    }

    /// The newest idle connection to `key` that is still usable.
    fn checkout(&self, key: &Key) -> Option<Io> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let idle = pool.get_mut(key)?;
        while let Some((io, since)) = idle.pop() {
            if since.elapsed() < POOL_IDLE && io.alive() {
                return Some(io);
            }
        }
        None
    }
}

fn checkin(pool: &Pool, key: Key, io: Io) {
    let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
    let idle = pool.entry(key).or_default();
    // Oldest first (each goes in at the back): only the front can have
    // expired, so one clock read prunes them.
    let now = Instant::now();
    let expired = idle.iter().take_while(|(_, since)| now.duration_since(*since) >= POOL_IDLE).count();
    idle.drain(..expired);
    if idle.len() < POOL_PER_UPSTREAM {
        idle.push((io, now));
    }
}

/// The request as it goes on the wire: head, then the body.
fn encode_request(req: &Request<Bytes>, key: &Key) -> Vec<u8> {
    let body = req.body();
    let mut out = Vec::with_capacity(256 + body.len());
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = req.headers();
    if !headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(key.host.as_bytes());
        if key.explicit_port {
            out.push(b':');
            out.extend_from_slice(itoa::Buffer::new().format(key.port).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let method = req.method();
    if !body.is_empty() || method == Method::POST || method == Method::PUT || method == Method::PATCH {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// How an exchange on a connection failed.
enum Failure {
    /// Writing the request failed.
    Unsent(H1Error),
    /// The connection closed before any byte of a response.
    Unanswered(H1Error),
    Other(H1Error),
}

impl Failure {
    fn into_error(self) -> H1Error {
        match self {
            Failure::Unsent(e) | Failure::Unanswered(e) | Failure::Other(e) => e,
        }
    }
}

/// A response head, its connection with the bytes read past the head, how
/// the body is framed, and whether the connection may be reused after it.
type Head = (http::response::Parts, Io, BytesMut, Framing, bool);

/// Writes the request and reads the response head.
async fn exchange(mut io: Io, wire: &[u8], method: &Method) -> Result<Head, Failure> {
    if let Err(e) = io.write_all(wire).await {
        return Err(Failure::Unsent(e.into()));
    }
    if let Err(e) = io.flush().await {
        return Err(Failure::Unsent(e.into()));
    }
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut answered = false;
    loop {
        if let Some((head, framing, reusable)) = parse_head(&mut buf, method).map_err(Failure::Other)? {
            return Ok((head, io, buf, framing, reusable));
        }
        if buf.len() >= MAX_HEAD {
            return Err(Failure::Other(H1Error::Malformed("response head is larger than 64 KiB")));
        }
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        match io.read_buf(&mut buf).await {
            Ok(0) if !answered && buf.is_empty() => return Err(Failure::Unanswered(H1Error::Eof)),
            Ok(0) => return Err(Failure::Other(H1Error::Eof)),
            Ok(_) => answered = true,
            Err(e) if !answered => return Err(Failure::Unanswered(e.into())),
            Err(e) => return Err(Failure::Other(e.into())),
        }
    }
}

/// Parses a complete final response head off the front of `buf`, skipping
/// interim `1xx` heads; `None` while the head is incomplete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<(http::response::Parts, Framing, bool)>, H1Error> {
    loop {
        // Uninitialised slots: zeroing 128 of them cost more than parsing a
        // small head.
        let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Malformed("more than 128 headers")),
            Err(_) => return Err(H1Error::Malformed("invalid response head")),
        };
        let code = resp.code.ok_or(H1Error::Malformed("no status"))?;
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("invalid status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(H1Error::Malformed("unexpected 101 Switching Protocols"));
            }
            buf.advance(len);
            continue;
        }
        let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        let mut headers = HeaderMap::with_capacity(resp.headers.len());
        for h in resp.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| H1Error::Malformed("invalid header"))?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| H1Error::Malformed("invalid header"))?;
            headers.append(name, value);
        }
        buf.advance(len);
        let (framing, reusable) = framing(method, status, version, &headers)?;
        let mut head = Response::new(()).into_parts().0;
        head.status = status;
        head.version = version;
        head.headers = headers;
        return Ok(Some((head, framing, reusable)));
    }
}

/// How the body ends (RFC 9112 §6.3) and whether the connection outlives it.
fn framing(method: &Method, status: StatusCode, version: Version, h: &HeaderMap) -> Result<(Framing, bool), H1Error> {
    // The comma-separated tokens of every `name` field, trimmed, empty ones
    // left out (a value that is not text counts as empty).
    let tokens = |name: HeaderName| {
        h.get_all(name)
            .into_iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    };
    let close = version == Version::HTTP_10 || tokens(header::CONNECTION).any(|t| t.eq_ignore_ascii_case("close"));
    if method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, !close));
    }
    if let Some(last) = tokens(header::TRANSFER_ENCODING).next_back() {
        if last.eq_ignore_ascii_case("chunked") {
            let reusable = !close && !h.contains_key(header::CONTENT_LENGTH);
            return Ok((Framing::Chunked(Chunked::Size { size: 0, digits: 0, ext: false, line: 0 }), reusable));
        }
        return Ok((Framing::Close, false));
    }
    let mut lengths = tokens(header::CONTENT_LENGTH);
    if let Some(first) = lengths.next() {
        if lengths.any(|l| l != first) {
            return Err(H1Error::Malformed("conflicting Content-Length values"));
        }
        if first.is_empty() || first.len() > 19 || !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(H1Error::Malformed("invalid Content-Length"));
        }
        let len = first.parse().map_err(|_| H1Error::Malformed("invalid Content-Length"))?;
        return Ok((Framing::Length(len), !close));
    }
    Ok((Framing::Close, false))
}

/// How the response body is delimited.
#[derive(Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    Close,
    Done,
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// In a chunk-size line: the size so far, its hex digits, whether an
    /// extension (or whitespace) started, and the line's length.
    Size {
        size: u64,
        digits: u8,
        ext: bool,
        line: usize,
    },
    /// After the CR of a size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    /// After a chunk's data: its CRLF.
    DataCr,
    DataLf,
    /// In the trailer section: this line's length, and all trailers' so far.
    Trailer {
        line: usize,
        total: usize,
    },
    TrailerLf {
        line: usize,
        total: usize,
    },
}

/// What the decoder made of the buffered bytes.
enum Step {
    Data(Bytes),
    Done,
    More,
}

/// The state at the start of a chunk-size line.
const LINE_START: Chunked = Chunked::Size { size: 0, digits: 0, ext: false, line: 0 };

impl Chunked {
    /// Decodes from the front of `buf` until data, the end, or want of bytes.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        loop {
            match *self {
                Chunked::Data { left } => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    *self = if left == 0 { Chunked::DataCr } else { Chunked::Data { left } };
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                // The common shapes in one step: a bare `hex CRLF` size line
                // whole in the buffer, and the CRLF after a chunk's data.
                // Anything else (an extension, a bare LF, a line cut by a
                // read) goes byte by byte below.
                LINE_START => {
                    if let Some((size, len)) = size_line(buf) {
                        buf.advance(len);
                        *self = if size == 0 {
                            Chunked::Trailer { line: 0, total: 0 }
                        } else {
                            Chunked::Data { left: size }
                        };
                        continue;
                    }
                }
                Chunked::DataCr if buf.starts_with(b"\r\n") => {
                    buf.advance(2);
                    *self = LINE_START;
                    continue;
                }
                _ => {}
            }
            let Some(&b) = buf.first() else { return Ok(Step::More) };
            buf.advance(1);
            *self = match *self {
                Chunked::Size { size, digits, ext, line } => {
                    if line >= MAX_CHUNK_LINE {
                        return Err(H1Error::Malformed("chunk-size line too long"));
                    }
                    let after = |size| {
                        if size == 0 {
                            Chunked::Trailer { line: 0, total: 0 }
                        } else {
                            Chunked::Data { left: size }
                        }
                    };
                    match b {
                        b'\r' if digits > 0 => Chunked::SizeLf { size },
                        b'\n' if digits > 0 => after(size),
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' if !ext => {
                            if digits >= 15 {
                                return Err(H1Error::Malformed("chunk size too large"));
                            }
                            let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                            Chunked::Size { size: size * 16 + v, digits: digits + 1, ext, line: line + 1 }
                        }
                        b';' | b' ' | b'\t' if digits > 0 => Chunked::Size { size, digits, ext: true, line: line + 1 },
                        b if ext && b >= 0x20 && b != 0x7f => Chunked::Size { size, digits, ext, line: line + 1 },
                        _ => return Err(H1Error::Malformed("invalid chunk size")),
                    }
                }
                Chunked::SizeLf { size } => match b {
                    b'\n' if size == 0 => Chunked::Trailer { line: 0, total: 0 },
                    b'\n' => Chunked::Data { left: size },
                    _ => return Err(H1Error::Malformed("chunk-size line without LF")),
                },
                Chunked::DataCr => match b {
                    b'\r' => Chunked::DataLf,
                    b'\n' => Chunked::Size { size: 0, digits: 0, ext: false, line: 0 },
                    _ => return Err(H1Error::Malformed("chunk data not followed by CRLF")),
                },
                Chunked::DataLf => match b {
                    b'\n' => Chunked::Size { size: 0, digits: 0, ext: false, line: 0 },
                    _ => return Err(H1Error::Malformed("chunk data not followed by CRLF")),
                },
                Chunked::Trailer { line, total } => {
                    if total >= MAX_HEAD {
                        return Err(H1Error::Malformed("trailers larger than 64 KiB"));
                    }
                    match b {
                        b'\r' => Chunked::TrailerLf { line, total },
                        b'\n' if line == 0 => return Ok(Step::Done),
                        b'\n' => Chunked::Trailer { line: 0, total },
                        _ => Chunked::Trailer { line: line + 1, total: total + 1 },
                    }
                }
                Chunked::TrailerLf { line, total } => match b {
                    b'\n' if line == 0 => return Ok(Step::Done),
                    b'\n' => Chunked::Trailer { line: 0, total },
                    _ => return Err(H1Error::Malformed("trailer line without LF")),
                },
                Chunked::Data { .. } => unreachable!("handled above"),
            };
        }
    }
}

/// A whole `hex CRLF` chunk-size line at the front of `buf`: the size and
/// the line's length. `None` for anything else, which the byte-by-byte
/// decoder then reads (or rejects).
fn size_line(buf: &[u8]) -> Option<(u64, usize)> {
    let mut size = 0u64;
    for (i, &b) in buf.iter().enumerate().take(16) {
        let v = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            b'\r' if i > 0 && buf.get(i + 1) == Some(&b'\n') => return Some((size, i + 2)),
            _ => return None,
        };
        size = size * 16 + u64::from(v);
    }
    None
}

/// A response body read straight from the upstream socket.
pub struct Body {
    io: Option<Io>,
    /// Bytes read and not yet handed out; chunks are split off its front.
    buf: BytesMut,
    framing: Framing,
    /// Where the connection goes when the body ends cleanly.
    reuse: Option<(Key, Pool)>,
    /// How much to read next (`MIN_BODY_READ` to `MAX_BODY_READ`).
    read_size: usize,
}

impl Body {
    /// The body is over: the connection goes back to the pool when it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let io = self.io.take();
        if let (Some(io), Some((key, pool))) = (io, self.reuse.take()) {
            // Bytes after the body were not asked for: do not reuse.
            if self.buf.is_empty() {
                checkin(&pool, key, io);
            }
        }
        self.buf = BytesMut::new();
    }

    /// Lets go of the read buffer if it holds nothing: a stream that has
    /// been quiet for a while keeps no buffer, and one that is busy reuses
    /// the same one read after read.
    pub fn trim(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// What the buffered bytes hold, by the framing.
    fn step(&mut self) -> Result<Step, H1Error> {
        match &mut self.framing {
            Framing::Empty | Framing::Done => Ok(Step::Done),
            Framing::Length(0) => Ok(Step::Done),
            Framing::Length(left) => {
                if self.buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = self.buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                Ok(Step::Data(self.buf.split_to(n).freeze()))
            }
            Framing::Chunked(c) => c.step(&mut self.buf),
            Framing::Close => Ok(if self.buf.is_empty() { Step::More } else { Step::Data(self.buf.split().freeze()) }),
        }
    }
}

impl Body {
    /// The next piece of the body: [`poll_frame`](http_body::Body::poll_frame)
    /// without the frame around it, for a reader that wants only data.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, H1Error>>> {
        let this = self;
        loop {
            match this.step() {
                Ok(Step::Data(data)) => {
                    // The last bytes of a length-delimited body: a reader that
                    // knows the length (hyper) does not poll again, so the
                    // connection goes back to the pool now.
                    if matches!(this.framing, Framing::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(Step::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    this.io = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(io) = &mut this.io else { return Poll::Ready(None) };
            // A fully consumed buffer is reused in place once the chunks
            // cut from it are dropped, so steady streaming allocates nothing;
            // one much larger than the read size is let go.
            if this.buf.is_empty() && this.buf.capacity() > 2 * this.read_size {
                this.buf = BytesMut::new();
            }
            if this.buf.capacity() - this.buf.len() < this.read_size / 4 {
                this.buf.reserve(this.read_size);
            }
            let room = this.buf.capacity() - this.buf.len();
            match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut this.buf) {
                // A quiet stream's reader lets go of the buffer (`trim`).
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.io = None;
                    if matches!(this.framing, Framing::Close) {
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(H1Error::Eof)));
                }
                Poll::Ready(Ok(n)) => {
                    if n == room {
                        this.read_size = (this.read_size * 2).min(MAX_BODY_READ);
                    } else if n <= this.read_size / 4 {
                        this.read_size = (this.read_size / 2).max(MIN_BODY_READ);
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.io = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.get_mut().poll_data(cx).map_ok(Frame::data)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Empty | Framing::Length(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_hash_is_fnv_1a() {
        use std::hash::Hasher;
        // The published 64-bit FNV-1a values of "" , "a" and "foobar".
        for (text, want) in
            [("", 0xcbf2_9ce4_8422_2325u64), ("a", 0xaf63_dc4c_8601_ec8c), ("foobar", 0x8594_4171_f739_67e8)]
        {
            let mut h = std::hash::BuildHasher::build_hasher(&fnv::FnvBuildHasher::default());
            h.write(text.as_bytes());
            assert_eq!(h.finish(), want, "{text:?}");
        }
    }

    /// The framing and reuse a response head gets, as text: `chunked`,
    /// `length N`, `close`, `empty`, with `+reuse` when the connection is
    /// kept; or the error.
    fn framed(head: &str, method: Method) -> String {
        let mut buf = BytesMut::from(head);
        match parse_head(&mut buf, &method) {
            Ok(Some((_, framing, reuse))) => {
                let kind = match framing {
                    Framing::Empty => "empty".to_string(),
                    Framing::Length(n) => format!("length {n}"),
                    Framing::Chunked(_) => "chunked".to_string(),
                    Framing::Close => "close".to_string(),
                    Framing::Done => "done".to_string(),
                };
                if reuse {
                    format!("{kind}+reuse")
                } else {
                    kind
                }
            }
            Ok(None) => "partial".to_string(),
            Err(H1Error::Malformed(m)) => m.to_string(),
            Err(e) => format!("{e}"),
        }
    }

    #[test]
    fn a_response_head_is_framed_as_rfc_9112_says() {
        let get = || Method::GET;
        let ok = "HTTP/1.1 200 OK\r\n";
        let cases: &[(&str, &str)] = &[
            ("transfer-encoding: chunked\r\n", "chunked+reuse"),
            ("Transfer-Encoding: gzip, CHUNKED\r\n", "chunked+reuse"),
            ("transfer-encoding: chunked\r\nconnection: keep-alive, Close\r\n", "chunked"),
            ("transfer-encoding: chunked, gzip\r\n", "close"),
            ("transfer-encoding: chunked\r\ncontent-length: 5\r\n", "chunked"),
            ("content-length: 12\r\n", "length 12+reuse"),
            ("content-length: 12, 12\r\ncontent-length: 12\r\n", "length 12+reuse"),
            ("content-length: 12\r\ncontent-length: 13\r\n", "conflicting Content-Length values"),
            ("content-length: -1\r\n", "invalid Content-Length"),
            ("content-length: 99999999999999999999\r\n", "invalid Content-Length"),
            ("content-type: text/event-stream\r\n", "close"),
            ("connection: ,\r\ncontent-length: 0\r\n", "length 0+reuse"),
        ];
        for (fields, want) in cases {
            assert_eq!(framed(&format!("{ok}{fields}\r\n"), get()), *want, "{fields:?}");
        }
        assert_eq!(framed("HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\n", get()), "length 3");
        assert_eq!(framed("HTTP/1.1 204 No Content\r\n\r\n", get()), "empty+reuse");
        assert_eq!(framed("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", Method::HEAD), "empty+reuse");
        assert_eq!(
            framed("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n", get()),
            "length 1+reuse"
        );
        assert_eq!(framed("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n", get()), "partial");
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("x-{i}: y\r\n")).collect();
        assert_eq!(framed(&format!("{ok}{many}\r\n"), get()), "more than 128 headers");
        let most: String = (0..MAX_HEADERS - 1).map(|i| format!("x-{i}: y\r\n")).collect();
        assert_eq!(framed(&format!("{ok}{most}content-length: 2\r\n\r\n"), get()), "length 2+reuse");
    }

    /// Runs the chunked decoder over `input` cut at every byte and whole;
    /// returns the data and whether it reached the end.
    fn dechunk(input: &[u8], piece: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let mut state = Chunked::Size { size: 0, digits: 0, ext: false, line: 0 };
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for part in input.chunks(piece.max(1)) {
            buf.extend_from_slice(part);
            loop {
                match state.step(&mut buf) {
                    Ok(Step::Data(d)) => data.extend_from_slice(&d),
                    Ok(Step::Done) => return Ok((data, true)),
                    Ok(Step::More) => break,
                    Err(H1Error::Malformed(m)) => return Err(m),
                    Err(_) => return Err("other"),
                }
            }
        }
        Ok((data, false))
    }

    fn all_splits(input: &[u8]) -> Result<(Vec<u8>, bool), &'static str> {
        let whole = dechunk(input, input.len());
        for piece in 1..input.len() {
            assert_eq!(dechunk(input, piece), whole, "pieces of {piece}");
        }
        whole
    }

    #[test]
    fn chunked_bodies_decode_the_same_however_they_arrive() {
        let body = b"6\r\ndata: \r\n19;name=\"x\"\r\n{\"choices\":[{\"delta\":1}]}\r\n0\r\nx-trailer: 1\r\n\r\n";
        assert_eq!(all_splits(body), Ok((b"data: {\"choices\":[{\"delta\":1}]}".to_vec(), true)));
        // Bare LF line ends are read too (RFC 9112 allows it).
        assert_eq!(all_splits(b"3\nabc\n0\n\n"), Ok((b"abc".to_vec(), true)));
        // Not finished yet: data so far, no end.
        assert_eq!(all_splits(b"5\r\nhel"), Ok((b"hel".to_vec(), false)));
        // Several chunks in one read, upper- and lower-case hex, and the
        // largest size line allowed (15 digits).
        let many = b"2\r\nab\r\nA\r\n0123456789\r\nb\r\nhello world\r\n0\r\n\r\n";
        assert_eq!(all_splits(many), Ok((b"ab0123456789hello world".to_vec(), true)));
        assert_eq!(all_splits(b"fffffffffffffff\r\nab"), Ok((b"ab".to_vec(), false)));
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for (input, why) in [
            (&b"zz\r\n"[..], "invalid chunk size"),
            (b"\r\n", "invalid chunk size"),
            (b"3\r\nabcX", "chunk data not followed by CRLF"),
            (b"3\rX", "chunk-size line without LF"),
            (b"1000000000000000\r\n", "chunk size too large"),
        ] {
            assert_eq!(all_splits(input), Err(why), "{:?}", String::from_utf8_lossy(input));
        }
        let long_ext = [&b"1;"[..], &[b'a'; MAX_CHUNK_LINE][..]].concat();
        assert_eq!(dechunk(&long_ext, 512), Err("chunk-size line too long"));
        let long_trailers = [&b"0\r\n"[..], &[b'a'; MAX_HEAD + 1][..]].concat();
        assert_eq!(dechunk(&long_trailers, 4096), Err("trailers larger than 64 KiB"));
    }

    #[test]
    fn framing_follows_rfc_9112() -> Result<(), H1Error> {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            m
        };
        let v11 = Version::HTTP_11;
        let f = |method: Method, status: u16, version, headers: &HeaderMap| {
            let status = StatusCode::from_u16(status).map_err(|_| H1Error::Malformed("test status"))?;
            framing(&method, status, version, headers).map(|(f, reuse)| (format!("{f:?}"), reuse))
        };
        assert_eq!(f(Method::HEAD, 200, v11, &h(&[("content-length", "5")]))?, ("Empty".into(), true));
        assert_eq!(f(Method::GET, 204, v11, &h(&[]))?, ("Empty".into(), true));
        assert_eq!(f(Method::GET, 200, v11, &h(&[("content-length", "5")]))?, ("Length(5)".into(), true));
        assert_eq!(f(Method::GET, 200, v11, &h(&[("content-length", "5, 5")]))?, ("Length(5)".into(), true));
        assert!(f(Method::GET, 200, v11, &h(&[("content-length", "5"), ("content-length", "6")])).is_err());
        assert!(f(Method::GET, 200, v11, &h(&[("content-length", "-1")])).is_err());
        let chunked = f(Method::POST, 200, v11, &h(&[("transfer-encoding", "gzip, chunked")]))?;
        assert!(chunked.0.starts_with("Chunked") && chunked.1);
        assert_eq!(f(Method::GET, 200, v11, &h(&[("transfer-encoding", "gzip")]))?, ("Close".into(), false));
        assert_eq!(f(Method::GET, 200, v11, &h(&[]))?, ("Close".into(), false));
        assert_eq!(
            f(Method::GET, 200, v11, &h(&[("content-length", "1"), ("connection", "close")]))?,
            ("Length(1)".into(), false)
        );
        assert_eq!(f(Method::GET, 200, Version::HTTP_10, &h(&[("content-length", "1")]))?, ("Length(1)".into(), false));
        Ok(())
    }

    #[test]
    fn heads_skip_interim_responses_and_reject_garbage() -> Result<(), H1Error> {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"[..]);
        let Some((head, framing, reuse)) = parse_head(&mut buf, &Method::POST)? else {
            return Err(H1Error::Malformed("incomplete"));
        };
        assert_eq!(
            (head.status, reuse, format!("{framing:?}"), &buf[..]),
            (StatusCode::OK, true, "Length(2)".into(), &b"hi"[..])
        );
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-"[..]);
        assert!(parse_head(&mut partial, &Method::GET)?.is_none());
        let mut garbage = BytesMut::from(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]);
        assert!(parse_head(&mut garbage, &Method::GET).is_err());
        let mut upgrade = BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..]);
        assert!(parse_head(&mut upgrade, &Method::GET).is_err());
        Ok(())
    }
}
