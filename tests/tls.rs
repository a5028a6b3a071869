//! HTTPS on the public listener with a certificate generated here: HTTP/2
//! by ALPN, HTTP/1.1 for clients that only speak that, and
//! `limits.send_timeout` for a client that stops reading.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::time::Duration;

use http::{StatusCode, Version};
use ssegate::config::TlsConfig;
use support::{body_text, parse_sse, ManualUpstream, Proxy, Reply, Upstream};

struct Tls {
    _dir: tempfile::TempDir,
    config: TlsConfig,
    root: reqwest::Certificate,
    der: rustls::pki_types::CertificateDer<'static>,
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM
/// files into a temporary directory.
fn certificate() -> Tls {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&key_path, key.signing_key.serialize_pem()).unwrap();
    let root = reqwest::Certificate::from_pem(key.cert.pem().as_bytes()).unwrap();
    Tls { _dir: dir, config: TlsConfig { cert, key: key_path }, root, der: key.cert.der().clone() }
}

fn https_client(tls: &Tls, http1_only: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(tls.root.clone())
        .timeout(Duration::from_secs(20));
    let builder = if http1_only { builder.http1_only() } else { builder };
    builder.build().unwrap()
}

async fn tls_proxy(tls: &Tls, upstream: &Upstream) -> Proxy {
    let mut config = support::config(upstream.addr);
    config.server.tls = Some(tls.config.clone());
    Proxy::start(config).await
}

#[tokio::test]
async fn http2_is_negotiated_over_tls() {
    let tls = certificate();
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "over tls")).await;
    let proxy = tls_proxy(&tls, &upstream).await;
    let c = https_client(&tls, false);

    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{}/v1/models", proxy.addr.port());
        let resp = c.get(&url).send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        assert_eq!(resp.version(), Version::HTTP_2, "{url}");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "over tls");
    }
    let seen = upstream.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.uri.path(), "/v1/models");
}

/// HTTP/2: answers without a body (a `204`, an answer to `HEAD`) pass
/// through as they came, with no `content-length` added, and an answer with
/// a body arrives whole.
#[tokio::test]
async fn http2_answers_without_a_body_pass_through_unchanged() {
    let tls = certificate();
    let upstream = Upstream::start(|seen| match seen.uri.path() {
        "/v1/none" => Reply::full(204, "text/plain", ""),
        _ => Reply::full(200, "application/json", r#"{"ok":true}"#),
    })
    .await;
    let proxy = tls_proxy(&tls, &upstream).await;
    let c = https_client(&tls, false);
    let base = format!("https://localhost:{}", proxy.addr.port());
    let none = c.delete(format!("{base}/v1/none")).send().await.unwrap();
    assert_eq!(none.version(), Version::HTTP_2);
    assert_eq!(none.status(), StatusCode::NO_CONTENT);
    assert!(none.headers().get("content-length").is_none(), "{:?}", none.headers());
    let head = c.head(format!("{base}/v1/some")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert!(head.headers().get("content-length").is_none_or(|v| v != "0"), "{:?}", head.headers());
    let some = c.get(format!("{base}/v1/some")).send().await.unwrap();
    assert_eq!(some.headers()["content-type"], "application/json");
    assert_eq!(body_text(some).await, r#"{"ok":true}"#);
}

#[tokio::test]
async fn http1_works_over_tls() {
    let tls = certificate();
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "over tls")).await;
    let proxy = tls_proxy(&tls, &upstream).await;
    let c = https_client(&tls, true);
    let url = format!("https://localhost:{}/v1/models", proxy.addr.port());
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "over tls");
    assert_eq!(upstream.last().headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn event_stream_over_http2_and_tls() {
    let tls = certificate();
    let upstream = Upstream::start(|_| {
        Reply::chunks("text/event-stream", &[b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"])
    })
    .await;
    let proxy = tls_proxy(&tls, &upstream).await;
    let c = https_client(&tls, false);
    let url = format!("https://localhost:{}/v1/chat", proxy.addr.port());
    let resp = c.post(&url).header("accept", "text/event-stream").body("{}").send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let data: Vec<String> = parse_sse(&body_text(resp).await).into_iter().map(|e| e.data).collect();
    assert_eq!(data, ["one", "two", "[DONE]"]);
}

/// A client that offers no ALPN (so the proxy cannot tell HTTP/1.1 from
/// HTTP/2 before it reads), finishes the handshake and then sends nothing
/// is dropped too: hyper-util's version check has no timeout of its own,
/// and the connection, with no request open, is shut down at its second
/// idle check, `header_timeout`s apart.
#[tokio::test]
async fn a_tls_client_without_alpn_that_sends_nothing_is_dropped() {
    use tokio::io::AsyncReadExt;
    let tls = certificate();
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.server.tls = Some(tls.config.clone());
    // Long enough for a handshake on a busy machine (it is timed by it too).
    config.limits.header_timeout = Duration::from_millis(500);
    let proxy = Proxy::start(config).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.der.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let started = std::time::Instant::now();
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut silent = connector.connect(name, tcp).await.expect("TLS handshake failed");
    assert_eq!(silent.get_ref().1.alpn_protocol(), None);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the proxy kept the connection open");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(990), "closed before two header_timeouts: {took:?}");
    assert!(took < Duration::from_secs(5), "closed late: {took:?}");
}

#[tokio::test]
async fn plain_http_client_on_a_tls_listener_is_not_served() {
    let tls = certificate();
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = tls_proxy(&tls, &upstream).await;
    let result = support::client().get(proxy.url("/v1/models")).send().await;
    assert!(result.is_err() || !result.unwrap().status().is_success());
    assert_eq!(upstream.count(), 0);
}

/// A proxy over TLS with a 300 ms `limits.send_timeout` in front of a
/// manual upstream; `tweak` changes the config further.
async fn stuck_proxy(tls: &Tls, tweak: impl FnOnce(&mut ssegate::config::Config)) -> (ManualUpstream, Proxy) {
    let up = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let mut config = support::config(up.addr);
    config.server.tls = Some(tls.config.clone());
    config.limits.send_timeout = Duration::from_millis(300);
    tweak(&mut config);
    (up, Proxy::start(config).await)
}

/// Opens an event stream with `client`, reads none of it while the model
/// floods it with 64 KiB events, and waits until the proxy lets go of the
/// model's answer. Returns the unread response, to be dropped by the caller.
async fn stop_reading(
    client: &reqwest::Client,
    url: &str,
    up: &mut ManualUpstream,
    version: Version,
) -> reqwest::Response {
    let request = client.get(url).header("accept", "text/event-stream").send();
    let (resp, feed) = tokio::join!(request, up.next());
    let resp = resp.unwrap();
    assert_eq!(resp.version(), version);
    let feed = std::sync::Arc::new(feed);
    let feeder = feed.flood();
    feed.closed().await;
    assert!(feeder.await.unwrap(), "the upstream took all 64 MiB");
    resp
}

#[tokio::test]
async fn a_client_that_stops_reading_over_tls_is_dropped_after_send_timeout() {
    let tls = certificate();
    let (mut up, proxy) = stuck_proxy(&tls, |_| ()).await;
    let url = format!("https://localhost:{}/v1/stuck", proxy.addr.port());
    let resp = stop_reading(&https_client(&tls, true), &url, &mut up, Version::HTTP_11).await;
    // Counted as stalled, not as a client that left.
    let stalled = "ssegate_streams_ended_total{route=\"/v1\",outcome=\"send_timeout\"}";
    handoff_support::wait_metric(proxy.admin, stalled, 1.0).await;
    drop(resp);
}

/// An HTTP/2 client with small windows, opened only as the application reads.
fn h2_reading_client(tls: &Tls) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(tls.root.clone())
        .http2_initial_stream_window_size(65_535)
        .http2_initial_connection_window_size(1 << 20)
        .http2_adaptive_window(false)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// HTTP/2, passed through: an answer that is not an event stream (NDJSON
/// for a client that did not ask for events) goes on unchanged, and a
/// client that stops reading it is let go after `limits.send_timeout` as
/// well. Its stream ends in an error, not as if the answer were complete.
#[tokio::test]
async fn an_http2_passed_through_answer_that_is_not_read_is_let_go_after_send_timeout() {
    let tls = certificate();
    let mut up = ManualUpstream::start(200, &[("content-type", "application/x-ndjson")]).await;
    let mut config = support::config(up.addr);
    config.server.tls = Some(tls.config.clone());
    config.limits.send_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(config).await;
    let client = h2_reading_client(&tls);
    let url = format!("https://localhost:{}/v1/generate", proxy.addr.port());
    let (resp, feed) = tokio::join!(client.get(&url).send(), up.next());
    let resp = resp.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let feed = std::sync::Arc::new(feed);
    let feeder = feed.flood();
    feed.closed().await;
    assert!(feeder.await.unwrap(), "the upstream took all 64 MiB");
    let cut = resp.bytes().await.expect_err("the answer that was let go ended as if complete");
    assert!(!cut.is_timeout(), "the answer neither ended nor was cut: {cut}");
}

/// HTTP/2, handoff: a browser that stops reading its stream is let go after
/// `limits.send_timeout`, as over HTTP/1.1, so that with nobody else
/// listening the model's work stops after `handoff.resume_grace`.
#[tokio::test]
async fn an_http2_handoff_stream_that_stops_reading_is_let_go_after_send_timeout() {
    let tls = certificate();
    let (mut up, proxy) = stuck_proxy(&tls, |c| c.handoff.resume_grace = Duration::from_millis(200)).await;
    let client = h2_reading_client(&tls);
    let base = format!("https://localhost:{}", proxy.addr.port());
    let created = handoff_support::create(&client, &base, "/v1/chat", "{}").await;
    let (resp, feed) = tokio::join!(client.get(format!("{base}{}", created.stream_url)).send(), up.next());
    let resp = resp.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    // A model that keeps writing, 64 KiB events 20 ms apart: more than the
    // stream's window holds, for up to 10 s.
    let event = format!("data: {}\n\n", "x".repeat(64 * 1024));
    let mut let_go = false;
    for _ in 0..500 {
        let offered = tokio::time::timeout(Duration::from_secs(10), feed.offer(&event)).await;
        if !offered.expect("the proxy neither read the model's answer nor closed it") {
            let_go = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(let_go, "the proxy still read the model's answer 10 s after its only client stopped reading");
    // Read now, the stream gives what was queued and then an error: not an
    // end that looks complete.
    let rest = resp.bytes().await;
    assert!(rest.is_err(), "the stream that was let go ended as if complete");
}

/// HTTP/2: a stream whose client stops reading is not held by a blocked
/// socket but by its flow-control window, which hyper waits on without
/// polling the stream. The proxy still lets go of the model's answer after
/// `limits.send_timeout`, and the connection's other streams go on.
#[tokio::test]
async fn an_http2_stream_that_stops_reading_is_dropped_after_send_timeout() {
    let tls = certificate();
    let (mut up, proxy) = stuck_proxy(&tls, |_| ()).await;
    let client = h2_reading_client(&tls);
    let url = format!("https://localhost:{}/v1/stuck", proxy.addr.port());
    let resp = stop_reading(&client, &url, &mut up, Version::HTTP_2).await;
    let stalled = "ssegate_streams_ended_total{route=\"/v1\",outcome=\"send_timeout\"}";
    handoff_support::wait_metric(proxy.admin, stalled, 1.0).await;
    // The connection is still good: its next stream is answered.
    let (second, feed) = tokio::join!(client.get(&url).header("accept", "text/event-stream").send(), up.next());
    let second = second.unwrap();
    assert_eq!(second.version(), Version::HTTP_2);
    feed.send("data: next\n\n").await;
    feed.finish();
    let events = parse_sse(&body_text(second).await);
    assert_eq!(events.first().map(|e| e.data.as_str()), Some("next"));
    drop(resp);
}
