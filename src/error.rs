//! The one error enum at the edge, and the one place it becomes a status
//! and a JSON body `{"error":{"type":…,"message":…}}`.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, ResponseBody};

/// Everything a request can fail with before its response head is sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Downstream: no route, unknown token, admin path on the public port.
    #[error("no route for this path")]
    NotFound,
    /// Downstream: no valid bearer token while `[auth]` is on.
    #[error("{0}")]
    Unauthorized(String),
    /// Downstream: the client has `limits.streams_per_client` streams open.
    #[error("too many open streams for this client (limits.streams_per_client)")]
    TooManyForClient,
    /// Downstream: the request body stalled for `header_timeout`.
    #[error("request body stalled for {0:?}")]
    RequestTimeout(std::time::Duration),
    /// Downstream: a method the endpoint does not take.
    #[error("method not allowed here")]
    MethodNotAllowed,
    /// Downstream: a stream token that is unknown, expired or forgotten.
    #[error("unknown or expired token")]
    UnknownToken,
    /// Downstream: the request body is over `limits.max_body`.
    #[error("request body is larger than limits.max_body ({0} bytes)")]
    PayloadTooLarge(u64),
    /// Downstream: a request the proxy cannot forward.
    #[error("{0}")]
    BadRequest(String),
    /// Downstream: a bound was reached; the client may retry later.
    #[error("{0}")]
    Overloaded(&'static str),
    /// Upstream: refused, unreachable, TLS failure, or closed before its head.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// Upstream: no response head within `limits.first_byte_timeout`.
    #[error("upstream sent no response head within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    /// Internal: the shared store (Redis) does not answer.
    #[error("{0}")]
    StoreUnavailable(String),
    /// Internal: a bug or a resource failure in the proxy itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status a client sees for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NotFound | Error::UnknownToken => StatusCode::NOT_FOUND,
            Error::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::TooManyForClient => StatusCode::TOO_MANY_REQUESTS,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `type` field of the JSON error body, and the metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound | Error::UnknownToken => "not_found",
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::BadRequest(_) => "bad_request",
            Error::RequestTimeout(_) => "request_timeout",
            Error::Unauthorized(_) => "unauthorized",
            Error::TooManyForClient => "rate_limited",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Overloaded(_) => "overloaded",
            Error::UpstreamUnavailable(_) => "upstream_unavailable",
            Error::UpstreamTimeout(_) => "upstream_timeout",
            Error::Internal(_) => "internal",
        }
    }

    /// The response a client gets.
    pub fn into_response(self) -> Response<ResponseBody> {
        let mut resp = Response::new(full(json_error(self.kind(), &self.to_string())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if matches!(self, Error::Overloaded(_) | Error::StoreUnavailable(_) | Error::TooManyForClient) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Error::Unauthorized(_)) {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// `{"error":{"type":…,"message":…}}`, the shape the OpenAI and Anthropic
/// SDKs raise as an API error.
pub fn json_error(kind: &str, message: &str) -> Bytes {
    let body = serde_json::json!({ "error": { "type": kind, "message": message } });
    Bytes::from(body.to_string())
}
