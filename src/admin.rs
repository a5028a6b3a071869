//! The admin listener: `/healthz`, `/readyz`, `/metrics`. Plain HTTP, never
//! on the public listener.

use std::sync::atomic::Ordering;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::{full, ResponseBody};
use crate::App;

/// Answers one admin request.
pub async fn handle<B>(app: &App, req: Request<B>) -> Response<ResponseBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if app.ready.load(Ordering::Acquire) && app.store.ready().await {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            let mut resp = Response::new(full(app.metrics.encode()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
