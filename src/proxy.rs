//! Direct mode: the proxy in the request path. Builds the upstream request
//! (path, hop-by-hop headers, X-Forwarded-*, the route's headers), sends it,
//! and hands the response on, passed through or re-framed as events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;

use crate::body::{ClientBody, LimitedBody, ResponseBody};
use crate::error::Error;
use crate::passthrough::PassThrough;
use crate::router::Route;
use crate::App;

/// What the server knows of the client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Forwards a direct-mode request and answers with the upstream's response.
pub async fn forward(
    app: &Arc<App>,
    route: &Arc<Route>,
    req: Request<ClientBody>,
    conn: ConnInfo,
) -> Result<Response<ResponseBody>, Error> {
    let started = Instant::now();
    let max_body = app.config.limits.max_body;
    if content_length(req.headers()).is_some_and(|len| len > max_body) {
        return Err(Error::PayloadTooLarge(max_body));
    }
    let client = app.authenticate(req.headers(), conn.peer)?;
    let wants_events = accepts_event_stream(req.headers()) || route.format != crate::config::Format::Auto;
    let mut slot = None;
    let mut client_slot = None;
    if wants_events {
        client_slot = app.client_slot(&client).await?;
        slot = Some(app.stream_slot().ok_or(Error::Overloaded("too many streams (limits.max_streams)"))?);
    }
    let (parts, body) = req.into_parts();
    let body = LimitedBody::new(body, max_body);
    let authenticated = app.auth.is_some();
    let sent = if wants_events {
        // An event stream: the body (a prompt) is read whole first, as
        // nginx's proxy_request_buffering does, and the answer streams
        // through the streaming client.
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if crate::body::caused_by::<crate::body::BodyTooLarge>(&*e) => {
                return Err(Error::PayloadTooLarge(max_body))
            }
            Err(e) => return Err(Error::BadRequest(format!("request body could not be read: {e}"))),
        };
        let upstream_req = upstream_request(route, &parts, body, conn, wants_events, authenticated)?;
        app.upstream.send_stream(upstream_req).await
    } else {
        let upstream_req = upstream_request(route, &parts, body.boxed_unsync(), conn, wants_events, authenticated)?;
        app.upstream.send(upstream_req, max_body).await
    };
    let (resp, head_time) = match sent {
        Ok(ok) => ok,
        Err(e) => {
            if matches!(e, Error::UpstreamUnavailable(_) | Error::UpstreamTimeout(_)) {
                app.metrics.upstream_error(&route.prefix, e.kind());
            }
            return Err(e);
        }
    };
    route.meters.upstream_head_seconds.observe(head_time.as_secs_f64());
    let (mut head, body) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let is_event_stream = is_event_stream(&head.headers);
    if head.status.as_u16() < 400 && (wants_events || is_event_stream) {
        let slot = match slot {
            Some(s) => s,
            None => app.stream_slot().ok_or(Error::Overloaded("too many streams (limits.max_streams)"))?,
        };
        let client_slot = match client_slot {
            Some(c) => Some(c),
            None => app.client_slot(&client).await?,
        };
        use crate::stream::Writer;
        let stalled = || parts.extensions.get::<crate::send_timeout::ConnWrites>().cloned();
        let writer = if parts.version == http::Version::HTTP_2 {
            Writer::Relay(stalled())
        } else if let Some(client) = parts.extensions.get::<crate::direct::ClientSocket>() {
            Writer::Direct(client.clone(), parts.extensions.get::<crate::stream::Inline>().cloned())
        } else {
            Writer::Hyper(stalled())
        };
        return Ok(crate::stream::direct_response(app, route, head, body, started, (slot, client_slot), writer));
    }
    let body = PassThrough::new(body, app.config.limits.idle_timeout, app.drain.clone())
        .into_response_body(parts.version, app.config.limits.send_timeout);
    Ok(Response::from_parts(head, body))
}

/// Builds the request that goes upstream, as direct mode forwards it.
pub fn upstream_request<B>(
    route: &Route,
    parts: &http::request::Parts,
    body: B,
    conn: ConnInfo,
    wants_events: bool,
    authenticated: bool,
) -> Result<Request<B>, Error> {
    let headers = forwarded_headers(parts, conn, wants_events, authenticated);
    build_request(route, parts.method.clone(), parts.uri.path(), parts.uri.query(), headers, body)
}

// Names parsed once, at compile time (`from_static` outside a static or
// const parses its text at every call).
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client's end-to-end headers plus `X-Forwarded-*`, as they go
/// upstream before the route's headers are set (a handoff stores these).
///
/// With `[auth]` on, the client's `Authorization` (its JWT) is dropped: the
/// route's headers supply the upstream's credentials.
pub fn forwarded_headers(
    parts: &http::request::Parts,
    conn: ConnInfo,
    wants_events: bool,
    authenticated: bool,
) -> HeaderMap {
    let src = &parts.headers;
    let client_host = src
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let named = connection_named(src);
    let (xff, xfp, xfh) = (X_FORWARDED_FOR.clone(), X_FORWARDED_PROTO.clone(), X_FORWARDED_HOST.clone());
    // One pass over the client's headers: hop-by-hop ones, `Host`, and the
    // ones set below are left out.
    let mut headers = HeaderMap::with_capacity(src.len() + 4);
    for (name, value) in src {
        let left_out = is_hop_by_hop(name)
            || named.contains(name)
            || name == header::HOST
            || (authenticated && name == header::AUTHORIZATION)
            || name == xff
            || name == xfp
            || (name == xfh && client_host.is_some())
            || (wants_events && name == header::ACCEPT_ENCODING);
        if !left_out {
            headers.append(name.clone(), value.clone());
        }
    }
    // `X-Forwarded-For`: the client's own list (unless its `Connection`
    // named it), then the client's address, as nginx's
    // `$proxy_add_x_forwarded_for` does.
    let ip = ip_text(conn.peer.ip());
    let prior: Vec<&str> = if named.contains(&xff) {
        Vec::new()
    } else {
        src.get_all(&xff).iter().filter_map(|v| v.to_str().ok()).collect()
    };
    let value = if prior.is_empty() { ip } else { format!("{}, {ip}", prior.join(", ")) };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(xff, value);
    }
    headers.insert(xfp, HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
    if let Some(host) = client_host {
        headers.insert(xfh, host);
    }
    if wants_events {
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    headers
}

/// The upstream request for `route`: its URI, the given headers with the
/// route's headers set over them, and the body.
pub fn build_request<B>(
    route: &Route,
    method: http::Method,
    path: &str,
    query: Option<&str>,
    mut headers: HeaderMap,
    body: B,
) -> Result<Request<B>, Error> {
    let uri = route.upstream_uri(path, query)?;
    for (name, value) in &route.headers {
        headers.insert(name.clone(), value.clone());
    }
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Drops `Connection` and the headers it names, and the fixed hop-by-hop set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    let drop: Vec<HeaderName> = headers.keys().filter(|k| is_hop_by_hop(k) || named.contains(k)).cloned().collect();
    for name in drop {
        headers.remove(name);
    }
}

/// The headers a `Connection` header names (hop-by-hop by that).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// The fixed hop-by-hop set: `Connection`, `Keep-Alive`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`, and every `Proxy-*`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str().starts_with("proxy-")
}

/// An IP address as text; IPv4 written octet by octet, a tenth of the
/// instructions of its `Display` (which pads and aligns), once or twice per
/// request.
pub fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
            out
        }
        std::net::IpAddr::V6(v6) => v6.to_string(),
    }
}

/// Whether the client's `Accept` lists `text/event-stream`.
pub fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| m.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream")))
}

/// Whether a response's content type is `text/event-stream`.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
}

/// The media type of `Content-Type`, without parameters.
pub fn media_type(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    v.split(';').next().map(str::trim)
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Joins the upstream's base path with the request's path and query.
pub fn join_uri(base: &Uri, path: &str, query: Option<&str>) -> Result<Uri, Error> {
    let base_path = base.path().trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    let mut pq = String::with_capacity(base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base_path);
    if !path.starts_with('/') {
        pq.push('/');
    }
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(pq.parse().map_err(|_| Error::BadRequest("invalid request path".into()))?);
    Uri::from_parts(parts).map_err(|e| Error::BadRequest(format!("invalid request path: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_text_is_the_display_form() -> Result<(), std::net::AddrParseError> {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.4", "255.255.255.255", "::1", "2001:db8::8a2e:370:7334"] {
            let parsed: std::net::IpAddr = ip.parse()?;
            assert_eq!(ip_text(parsed), parsed.to_string());
            assert_eq!(ip_text(parsed), ip);
        }
        Ok(())
    }
}
