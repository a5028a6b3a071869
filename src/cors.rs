//! CORS for the handoff endpoints: origins in `cors.allow_origins` get
//! preflight answers and `access-control-allow-origin`; others get nothing.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{empty, ResponseBody};
use crate::config::CorsConfig;

/// The `access-control-allow-origin` value for a request, if its origin is allowed.
pub fn allow_origin(cors: &CorsConfig, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let origin_str = origin.to_str().ok()?;
    if cors.allow_origins.iter().any(|o| o == origin_str) {
        Some(origin.clone())
    } else if cors.allow_origins.iter().any(|o| o == "*") {
        Some(HeaderValue::from_static("*"))
    } else {
        None
    }
}

/// Adds the CORS response headers for an allowed origin.
pub fn decorate(resp: &mut Response<ResponseBody>, allow: Option<HeaderValue>) {
    let Some(allow) = allow else { return };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("location"));
    h.append(header::VARY, HeaderValue::from_static("origin"));
}

/// Answers an `OPTIONS` preflight for the handoff POST or the stream DELETE.
pub fn preflight(cors: &CorsConfig, headers: &HeaderMap) -> Response<ResponseBody> {
    let mut resp = Response::new(empty());
    let Some(allow) = allow_origin(cors, headers) else {
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    };
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, authorization, last-event-id, accept"),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    resp
}
