//! Direct mode, observed from real HTTP clients: routing, what goes
//! upstream, what comes back, and how failures look.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Version};
use ssegate::config::Config;
use support::{
    body_text, client, error_type, parse_sse, read_head, read_until, route, streamed_body, wait_for, End, Proxy,
    RawUpstream, Reply, Upstream,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Reads from a response until `want` bytes arrived, failing after 10 s.
async fn read_chunks_until(resp: &mut reqwest::Response, want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !got.windows(want.len()).any(|w| w == want) {
            let chunk = resp.chunk().await.expect("body failed").expect("body ended early");
            got.extend_from_slice(&chunk);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("did not receive {:?}", String::from_utf8_lossy(want)));
    got
}

/// Sends raw bytes to the proxy and returns its response head.
async fn raw_request(proxy: &Proxy, request: &str) -> String {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    read_head(&mut stream).await.0
}

#[tokio::test]
async fn longest_prefix_wins() {
    let general = Upstream::start(|_| Reply::full(200, "text/plain", "general")).await;
    let special = Upstream::start(|_| Reply::full(200, "text/plain", "special")).await;
    let mut config = support::config(general.addr);
    config.routes.push(route("/v1/special", &format!("http://{}", special.addr)));
    let proxy = Proxy::start(config).await;
    let c = client();

    let resp = c.get(proxy.url("/v1/special/chat")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "special");
    assert_eq!(special.last().uri.path(), "/v1/special/chat");

    let resp = c.get(proxy.url("/v1/chat")).send().await.unwrap();
    assert_eq!(body_text(resp).await, "general");
    assert_eq!(general.last().uri.path(), "/v1/chat");

    // The order of the routes in the file does not matter.
    let mut config = support::config(special.addr);
    config.routes[0].prefix = "/v1/special".into();
    config.routes.push(route("/v1", &format!("http://{}", general.addr)));
    let proxy = Proxy::start(config).await;
    assert_eq!(body_text(c.get(proxy.url("/v1/special/x")).send().await.unwrap()).await, "special");
    assert_eq!(body_text(c.get(proxy.url("/v1/x")).send().await.unwrap()).await, "general");
    assert_eq!((general.count(), special.count()), (2, 2));
}

#[tokio::test]
async fn path_and_query_are_forwarded_unchanged() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let resp = client().get(proxy.url("/v1/chat/completions?a=1&b=two%20words&a=3")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.last().uri.path_and_query().unwrap().as_str(), "/v1/chat/completions?a=1&b=two%20words&a=3");
}

#[tokio::test]
async fn strip_prefix_removes_the_prefix_and_keeps_the_query() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    let mut api = route("/api", &format!("http://{}", upstream.addr));
    api.strip_prefix = true;
    config.routes.push(api);
    let proxy = Proxy::start(config).await;
    let c = client();

    let resp = c.get(proxy.url("/api/chat/completions?stream=true&x=%2F")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.last().uri.path_and_query().unwrap().as_str(), "/chat/completions?stream=true&x=%2F");

    let resp = c.get(proxy.url("/api?q=1")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.last().uri.path_and_query().unwrap().as_str(), "/?q=1");

    // A route without strip_prefix keeps the whole path.
    c.get(proxy.url("/v1/models")).send().await.unwrap();
    assert_eq!(upstream.last().uri.path(), "/v1/models");
}

#[tokio::test]
async fn method_and_body_reach_the_upstream() {
    let upstream = Upstream::start(|_| Reply::full(201, "application/json", "{}")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let resp = client()
        .post(proxy.url("/v1/files"))
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let seen = upstream.last();
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.headers["content-type"], "application/octet-stream");
    assert_eq!(seen.body.len(), body.len());
    assert!(seen.body == body, "the upstream got a different body");

    let resp = client().put(proxy.url("/v1/files/1")).body("x").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(upstream.last().method, http::Method::PUT);
    assert_eq!(upstream.last().body, "x");
}

/// The upstream reads the first piece of the body while the client still
/// holds back the second: the proxy forwards a body as it streams.
#[tokio::test]
async fn request_body_is_streamed_to_the_upstream() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let (tx, body) = streamed_body();
    let url = proxy.url("/v1/upload");
    let request = tokio::spawn(async move { client().post(url).body(body).send().await });
    tx.send(Bytes::from_static(b"part-one|")).await.unwrap();

    let mut conn = upstream.accept().await;
    let (head, mut buf) = read_head(&mut conn).await;
    assert!(head.starts_with("POST /v1/upload HTTP/1.1\r\n"), "{head}");
    // The first piece arrives upstream before the client sends the second.
    read_until(&mut conn, &mut buf, b"part-one|").await;
    tx.send(Bytes::from_static(b"part-two")).await.unwrap();
    read_until(&mut conn, &mut buf, b"part-two").await;
    drop(tx);
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        read_until(&mut conn, &mut buf, b"0\r\n\r\n").await;
    }
    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nreceived").await.unwrap();

    let resp = tokio::time::timeout(Duration::from_secs(10), request).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "received");
}

#[tokio::test]
async fn body_over_max_body_with_content_length_is_413() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.limits.max_body = 1000;
    let proxy = Proxy::start(config).await;
    let c = client();

    let resp = c.post(proxy.url("/v1/chat")).body(vec![b'a'; 1001]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(upstream.count(), 0, "nothing goes upstream");

    // Exactly the limit is fine.
    let resp = c.post(proxy.url("/v1/chat")).body(vec![b'a'; 1000]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.last().body.len(), 1000);
}

#[tokio::test]
async fn chunked_body_over_max_body_is_413() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let mut config = support::config(upstream.addr);
    config.limits.max_body = 1000;
    let proxy = Proxy::start(config).await;

    let (tx, body) = streamed_body();
    let url = proxy.url("/v1/chat");
    let request = tokio::spawn(async move { client().post(url).body(body).send().await });
    tx.send(Bytes::from(vec![b'a'; 600])).await.unwrap();
    tx.send(Bytes::from(vec![b'b'; 600])).await.unwrap();
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(10), request).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_type(&body_text(resp).await), "payload_too_large");
    // The upstream never gets a whole request out of it.
    assert!(upstream.seen.lock().unwrap().iter().all(|s| s.body.len() <= 1000));
    assert_eq!(*upstream.completed.borrow(), 0);

    // A chunked body within the limit goes through.
    let (tx, body) = streamed_body();
    let url = proxy.url("/v1/chat");
    let request = tokio::spawn(async move { client().post(url).body(body).send().await });
    tx.send(Bytes::from(vec![b'a'; 500])).await.unwrap();
    tx.send(Bytes::from(vec![b'b'; 500])).await.unwrap();
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(10), request).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.last().body.len(), 1000);
}

/// The upstream holds its second chunk back until the client has received
/// the first: nothing in the proxy waits for more.
#[tokio::test]
async fn response_chunks_are_passed_on_as_they_arrive() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let url = proxy.url("/v1/generate");
    let request = tokio::spawn(async move { client().get(url).send().await });

    let mut conn = upstream.accept().await;
    read_head(&mut conn).await;
    conn.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    )
    .await
    .unwrap();

    let mut resp = tokio::time::timeout(Duration::from_secs(10), request).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let got = read_chunks_until(&mut resp, b"first").await;
    assert_eq!(got, b"first");

    // Only now does the upstream send the rest.
    conn.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    assert_eq!(body_text(resp).await, "second");
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_dropped() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let head = raw_request(
        &proxy,
        "GET /v1/x HTTP/1.1\r\n\
         Host: gateway.example\r\n\
         Connection: keep-alive, X-Hop\r\n\
         X-Hop: secret\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         Upgrade: websocket\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         Proxy-Connection: keep-alive\r\n\
         X-End-To-End: kept\r\n\
         \r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = upstream.last();
    for name in
        ["connection", "x-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"]
    {
        // hyper's client may add its own `connection`/`te` only if it must;
        // none of the client's values may get through.
        let values: Vec<_> = seen.headers.get_all(name).iter().collect();
        assert!(values.is_empty(), "upstream got {name}: {values:?}");
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_dropped() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let url = proxy.url("/v1/x");
    let request = tokio::spawn(async move { client().get(url).send().await });
    let mut conn = upstream.accept().await;
    read_head(&mut conn).await;
    conn.write_all(
        b"HTTP/1.1 200 OK\r\n\
          content-type: text/plain\r\n\
          content-length: 2\r\n\
          Connection: keep-alive, X-Hop-Resp\r\n\
          X-Hop-Resp: 1\r\n\
          Keep-Alive: timeout=5, max=100\r\n\
          TE: trailers\r\n\
          Trailer: X-Checksum\r\n\
          Upgrade: h2c\r\n\
          Proxy-Authenticate: Basic realm=\"upstream\"\r\n\
          Proxy-Status: upstream\r\n\
          X-End-To-End: kept\r\n\
          \r\nok",
    )
    .await
    .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), request).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for name in
        ["connection", "x-hop-resp", "keep-alive", "te", "trailer", "upgrade", "proxy-authenticate", "proxy-status"]
    {
        assert!(resp.headers().get(name).is_none(), "client got {name}: {:?}", resp.headers().get(name));
    }
    assert_eq!(resp.headers()["x-end-to-end"], "kept");
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(body_text(resp).await, "ok");
}

#[tokio::test]
async fn forwarded_headers_are_set() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let c = client();

    c.get(proxy.url("/v1/x")).header("x-forwarded-for", "10.0.0.1").send().await.unwrap();
    let seen = upstream.last();
    let xff: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["10.0.0.1, 127.0.0.1"]);
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], proxy.addr.to_string().as_str());
    // The upstream is asked for by its own name.
    assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());

    // Without a prior header the client address starts the list; a client's
    // own X-Forwarded-Proto/-Host are replaced, not believed.
    c.get(proxy.url("/v1/x"))
        .header("host", "app.example")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "spoofed.example")
        .send()
        .await
        .unwrap();
    let seen = upstream.last();
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), ["127.0.0.1"]);
    assert_eq!(seen.headers.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), ["http"]);
    assert_eq!(seen.headers.get_all("x-forwarded-host").iter().collect::<Vec<_>>(), ["app.example"]);
}

#[tokio::test]
async fn route_headers_replace_the_clients() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    std::env::set_var("SSEGATE_DIRECT_TEST_KEY", "sk-from-env");
    let text = format!(
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n[routes.headers]\n\
         authorization = \"Bearer ${{SSEGATE_DIRECT_TEST_KEY}}\"\nX-Api-Version = \"2024-01\"\n",
        upstream.addr
    );
    let config = Config::parse(&text, "direct-test.toml", Path::new(".")).unwrap();
    let proxy = Proxy::start(config).await;
    let mut client_headers = reqwest::header::HeaderMap::new();
    client_headers.insert("authorization", "Bearer client-key".parse().unwrap());
    client_headers.append("x-api-version", "1".parse().unwrap());
    client_headers.append("x-api-version", "2".parse().unwrap());
    client_headers.insert("x-other", "kept".parse().unwrap());
    let resp = client().get(proxy.url("/v1/x")).headers(client_headers).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.headers.get_all("authorization").iter().collect::<Vec<_>>(), ["Bearer sk-from-env"]);
    assert_eq!(seen.headers.get_all("x-api-version").iter().collect::<Vec<_>>(), ["2024-01"]);
    assert_eq!(seen.headers["x-other"], "kept");
}

#[tokio::test]
async fn no_route_is_404_json() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    for path in ["/", "/v2/chat", "/V1/chat", "/favicon.ico"] {
        let resp = client().get(proxy.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
        error_type(&body_text(resp).await);
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn absolute_form_uri_is_404_and_nothing_goes_upstream() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let head = raw_request(&proxy, "GET http://evil.example/v1/x HTTP/1.1\r\nHost: evil.example\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let head = raw_request(&proxy, "GET http://evil.example/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let target = format!("GET http://{}/v1/x HTTP/1.1\r\nHost: evil.example\r\n\r\n", upstream.addr);
    let head = raw_request(&proxy, &target).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let head = raw_request(&proxy, "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n").await;
    assert!(!head.starts_with("HTTP/1.1 2"), "{head}");
    assert_eq!(upstream.count(), 0, "the upstream saw a request");
}

#[tokio::test]
async fn upstream_error_status_is_passed_through() {
    let upstream = Upstream::start(|seen| match seen.uri.path() {
        "/v1/limited" => {
            Reply::full(429, "application/json", r#"{"error":{"message":"slow down","type":"rate_limit"}}"#)
                .header("retry-after", "7")
        }
        _ => Reply::full(500, "text/plain", "model crashed"),
    })
    .await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let c = client();

    let resp = c.post(proxy.url("/v1/limited")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(body_text(resp).await, r#"{"error":{"message":"slow down","type":"rate_limit"}}"#);

    // Also when the client asked for an event stream: SDKs see the error.
    let resp = c.post(proxy.url("/v1/broken")).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(body_text(resp).await, "model crashed");
}

#[tokio::test]
async fn refused_upstream_is_502_json() {
    let dead = support::RefusingPort::new();
    let proxy = Proxy::start(support::config(dead.addr)).await;
    let resp = client().post(proxy.url("/v1/chat")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    assert_eq!(error_type(&body_text(resp).await), "upstream_unavailable");
}

/// An upstream whose accept queue is full: the kernel drops further SYNs,
/// so a connect hangs until `connect_timeout`.
#[tokio::test]
async fn connect_timeout_is_honoured() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the accept queue (never accepted) until a connect hangs.
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(conn) => held.push(conn.unwrap()),
            Err(_) => break,
        }
        assert!(held.len() < 64, "the accept queue never filled");
    }
    let mut config = support::config(addr);
    config.limits.connect_timeout = Duration::from_millis(300);
    config.limits.first_byte_timeout = Duration::from_secs(30);
    let proxy = Proxy::start(config).await;
    let started = std::time::Instant::now();
    let resp = client().get(proxy.url("/v1/x")).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_type(&body_text(resp).await), "upstream_unavailable");
    assert!(elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(10), "{elapsed:?}");
    drop((held, listener));
}

#[tokio::test]
async fn first_byte_timeout_is_504_json() {
    let upstream = Upstream::start(|_| {
        let mut r = Reply::full(200, "text/plain", "too late");
        r.head_delay = Duration::from_secs(30);
        r
    })
    .await;
    let mut config = support::config(upstream.addr);
    config.limits.first_byte_timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config).await;
    let started = std::time::Instant::now();
    let resp = client().get(proxy.url("/v1/slow")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    assert_eq!(error_type(&body_text(resp).await), "upstream_timeout");
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let mut upstream = Upstream::start(|_| Reply::chunks("text/plain", &[b"first token"]).ending(End::Hang)).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let mut resp = client().get(proxy.url("/v1/generate")).send().await.unwrap();
    read_chunks_until(&mut resp, b"first token").await;
    drop(resp);
    wait_for(&mut upstream.cancelled, 1).await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_event_stream() {
    let mut upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: first\n\n"]).ending(End::Hang)).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let mut resp = client().get(proxy.url("/v1/generate")).header("accept", "text/event-stream").send().await.unwrap();
    let got = read_chunks_until(&mut resp, b"data: first\n").await;
    assert_eq!(parse_sse(&String::from_utf8_lossy(&got))[0].data, "first");
    drop(resp);
    wait_for(&mut upstream.cancelled, 1).await;
}

#[tokio::test]
async fn admin_paths_are_404_on_the_public_listener() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let resp = client().get(proxy.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let body = body_text(resp).await;
        assert!(!body.contains("ssegate_"), "{path} leaked metrics: {body}");
    }
    assert_eq!(upstream.count(), 0);
}

/// The metrics the contract names, as exposed in the Prometheus text.
const CONTRACT_METRICS: [&str; 11] = [
    "ssegate_streams_active",
    "ssegate_streams_ended",
    "ssegate_events_sent",
    "ssegate_bytes_sent",
    "ssegate_keepalives_sent",
    "ssegate_tokens_issued",
    "ssegate_tokens_redeemed",
    "ssegate_tokens_expired",
    "ssegate_upstream_errors",
    "ssegate_first_event_seconds",
    "ssegate_upstream_head_seconds",
];

async fn scrape(proxy: &Proxy) -> String {
    let resp = client().get(format!("http://{}/metrics", proxy.admin)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    body_text(resp).await
}

#[tokio::test]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let upstream = Upstream::start(|seen| match seen.uri.path() {
        "/v1/stream" => Reply::chunks("text/event-stream", &[b"data: one\n\n", b"data: [DONE]\n\n"]),
        _ => Reply::full(200, "text/plain", "ok"),
    })
    .await;
    let dead = support::RefusingPort::new();
    let mut config = support::config(upstream.addr);
    config.routes.push(route("/dead", &format!("http://{}", dead.addr)));
    let proxy = Proxy::start(config).await;
    let c = client();
    let admin = |path: &str| format!("http://{}{path}", proxy.admin);

    assert_eq!(c.get(admin("/healthz")).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(c.get(admin("/readyz")).send().await.unwrap().status(), StatusCode::OK);

    // Some traffic: a pass-through, an event stream, an upstream failure.
    body_text(c.get(proxy.url("/v1/x")).send().await.unwrap()).await;
    body_text(c.get(proxy.url("/v1/stream")).send().await.unwrap()).await;
    assert_eq!(c.get(proxy.url("/dead/x")).send().await.unwrap().status(), StatusCode::BAD_GATEWAY);
    let text = scrape(&proxy).await;
    for name in CONTRACT_METRICS {
        assert!(text.contains(&format!("# TYPE {name}")), "/metrics lacks {name}:\n{text}");
    }
    assert!(text.contains("ssegate_upstream_head_seconds_count{route=\"/v1\"} 2"), "{text}");
    assert!(text.contains("type=\"upstream_unavailable\""), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // Routes are not served on the admin listener.
    assert_eq!(c.get(admin("/v1/x")).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(upstream.count(), 2);
}

/// A dashboard or an alert on a fresh instance needs every series to
/// exist: a metric that only appears after its first event reads as "no
/// data" instead of 0.
#[tokio::test]
async fn metrics_are_exposed_before_any_traffic() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let text = scrape(&proxy).await;
    let missing: Vec<_> = CONTRACT_METRICS.iter().filter(|name| !text.contains(&format!("# TYPE {name}"))).collect();
    assert!(missing.is_empty(), "a fresh /metrics lacks {missing:?}:\n{text}");
}

#[tokio::test]
async fn h2c_prior_knowledge_works_through_the_proxy() {
    let upstream =
        Upstream::start(|seen| Reply::full(200, "text/plain", &format!("got {} bytes", seen.body.len()))).await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();

    let resp = h2.get(proxy.url("/v1/models?x=1")).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "got 0 bytes");
    assert_eq!(upstream.last().uri.path_and_query().unwrap().as_str(), "/v1/models?x=1");

    let resp = h2.post(proxy.url("/v1/chat")).body(vec![b'x'; 5000]).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(body_text(resp).await, "got 5000 bytes");
    let seen = upstream.last();
    assert_eq!(seen.headers["x-forwarded-host"], proxy.addr.to_string().as_str());
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");

    let resp = h2.get(proxy.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// One plain HTTP/1.1 connection carrying event streams (which the lean
/// path writes), a request for a plain body (hyper sends the answer made for
/// it), and another event stream (then hyper's): each answer is whole, in
/// order, and framed as hyper frames them.
#[tokio::test]
async fn event_streams_and_other_requests_share_one_connection_in_order() {
    let upstream = Upstream::start(|seen| {
        if seen.uri.path().ends_with("/events") {
            Reply::chunks("text/event-stream", &[b"data: a\n\n", b"data: b\n\n"])
        } else {
            Reply::full(200, "text/plain", "plain")
        }
    })
    .await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let get = |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\n{extra}\r\n");
    let sse = "accept: text/event-stream\r\n";
    // Two streams asked for at once (the second waits behind the first).
    s.write_all(format!("{}{}", get("/v1/events", sse), get("/v1/events", sse)).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let first = read_until(&mut s, &mut buf, b"\r\n0\r\n\r\n").await;
    let head = String::from_utf8_lossy(&buf[..first]).to_string();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\ntransfer-encoding: chunked\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let (a, b) = (head.find("data: a\n\n"), head.find("data: b\n\n"));
    assert!(a.is_some() && a < b, "{head}");
    buf.drain(..first);
    let second = read_until(&mut s, &mut buf, b"\r\n0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&buf[..second]).to_string();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("data: a") && text.contains("data: b"), "{text}");
    buf.drain(..second);
    // A plain body, then a stream on a connection the client closes.
    s.write_all(get("/v1/plain", "").as_bytes()).await.unwrap();
    let head = read_until(&mut s, &mut buf, b"\r\n\r\n").await;
    let text = String::from_utf8_lossy(&buf[..head]).to_string();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("content-type: text/plain"), "{text}");
    let end: &[u8] = if text.contains("transfer-encoding: chunked") { b"5\r\nplain\r\n0\r\n\r\n" } else { b"plain" };
    let plain = read_until(&mut s, &mut buf, end).await;
    assert_eq!(&buf[head..plain], end, "{}", String::from_utf8_lossy(&buf));
    buf.drain(..plain);
    s.write_all(get("/v1/events", &format!("{sse}connection: close\r\n")).as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest))
        .await
        .expect("the last response did not end")
        .expect("read failed");
    buf.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&buf).to_string();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("data: a") && text.contains("data: b") && text.ends_with("\r\n0\r\n\r\n"), "{text}");
    assert_eq!(upstream.count(), 4);
}

/// A client that leaves while its event stream's upstream has not answered
/// yet (a model still queued) ends the upstream request at once, not when
/// the head comes (up to `first_byte_timeout`, 120 s here).
#[tokio::test]
async fn a_client_that_leaves_before_the_head_cancels_the_upstream_request() {
    let mut upstream = RawUpstream::start().await;
    let proxy = Proxy::start(support::config(upstream.addr)).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"GET /v1/generate HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n").await.unwrap();
    let mut up = upstream.accept().await;
    let mut request = Vec::new();
    read_until(&mut up, &mut request, b"\r\n\r\n").await;
    drop(client);
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut up, &mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the upstream request was not ended within 10 s of the client leaving: {closed:?}"
    );
}
