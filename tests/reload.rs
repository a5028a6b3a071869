//! Reloading the config without dropping anything: 200 open streams
//! (direct and handoff) across 20 reloads, new certificates for new TLS
//! connections while old ones finish, refused reloads, and SIGHUP on the
//! binary.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use ssegate::body::{ChannelBody, ResponseBody};
use ssegate::config::{AuthConfig, Config, Secret, TlsConfig};
use support::{body_text, client, line_matching, parse_sse, route, Ev, ManualUpstream, ReloadProxy};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Events each stream's upstream sends before `[DONE]`.
const EVENTS: usize = 40;

/// A fake model whose streams send half their events, then wait for the
/// gate to open before sending the rest; `/…/probe` answers the `x-gen`
/// header it got, so a test can see which config a request used.
struct GatedUpstream {
    addr: SocketAddr,
    gate: watch::Sender<bool>,
    /// Query and `x-gen` of each stream request, in arrival order.
    streams: Arc<Mutex<Vec<(String, String)>>>,
    opened: watch::Receiver<usize>,
}

impl GatedUpstream {
    async fn start() -> GatedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate, gate_rx) = watch::channel(false);
        let (opened_tx, opened) = watch::channel(0usize);
        let streams = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new((gate_rx, opened_tx, streams.clone()));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(gated_reply(req, &state).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        GatedUpstream { addr, gate, streams, opened }
    }

    /// Waits until `n` stream requests arrived, failing after 20 s.
    async fn wait_opened(&mut self, n: usize) {
        let reached = tokio::time::timeout(Duration::from_secs(20), self.opened.wait_for(|v| *v >= n)).await.is_ok();
        assert!(reached, "only {} of {n} streams reached the upstream", *self.opened.borrow());
    }
}

type GateState = (watch::Receiver<bool>, watch::Sender<usize>, Arc<Mutex<Vec<(String, String)>>>);

async fn gated_reply(req: Request<Incoming>, state: &GateState) -> Response<ResponseBody> {
    let gen = req.headers().get("x-gen").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let query = req.uri().query().unwrap_or_default().to_string();
    let probe = req.uri().path().ends_with("/probe");
    let _ = req.into_body().collect().await;
    if probe {
        return Response::new(ssegate::body::full(gen));
    }
    state.2.lock().unwrap().push((query, gen));
    state.1.send_modify(|n| *n += 1);
    let (tx, body) = ChannelBody::new(4);
    let mut gate = state.0.clone();
    tokio::spawn(async move {
        for n in 1..=EVENTS {
            if n == EVENTS / 2 + 1 && gate.wait_for(|open| *open).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            if tx.send(Bytes::from(format!("data: {n}\n\n"))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

/// Generation `k` of the config: route `/v1` sends `x-gen: k`; odd
/// generations add a route `/extra{k}`, which the next one removes.
fn generation(upstream: SocketAddr, k: usize) -> Config {
    let mut c = support::config(upstream);
    c.routes[0].headers.insert("x-gen".into(), Secret(k.to_string()));
    if k % 2 == 1 {
        let mut extra = route(&format!("/extra{k}"), &format!("http://{upstream}"));
        extra.headers.insert("x-gen".into(), Secret(k.to_string()));
        c.routes.push(extra);
    }
    c
}

/// Polls `/v1/probe` until the upstream sees `x-gen: k` (the reload is
/// applied asynchronously), failing after 10 s.
async fn wait_generation(c: &reqwest::Client, proxy: &ReloadProxy, k: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = c.get(proxy.url("/v1/probe")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        if body_text(resp).await == k.to_string() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "generation {k} never took effect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Opens stream `i` (direct when `direct`, else POST + GET), asserts its
/// head, and reads it to the end.
async fn run_stream(c: reqwest::Client, base: String, i: usize, direct: bool) -> Vec<Ev> {
    let resp = if direct {
        c.post(format!("{base}/v1/stream?s={i}")).header("accept", "text/event-stream").body("{}").send().await
    } else {
        let created = handoff_support::create(&c, &base, &format!("/v1/stream?s={i}"), "{}").await;
        c.get(format!("{base}{}", created.stream_url)).send().await
    };
    let resp = resp.unwrap_or_else(|e| panic!("stream {i}: {e}"));
    assert_eq!(resp.status(), StatusCode::OK, "stream {i}");
    let text = tokio::time::timeout(Duration::from_secs(60), resp.text())
        .await
        .unwrap_or_else(|_| panic!("stream {i} did not end"))
        .unwrap_or_else(|e| panic!("stream {i} was cut: {e}"));
    parse_sse(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_during_200_open_streams_drop_and_duplicate_nothing() {
    const BATCH: usize = 10;
    const RELOADS: usize = 20;
    let mut upstream = GatedUpstream::start().await;
    let proxy = ReloadProxy::start(generation(upstream.addr, 0)).await;
    let c = client();
    let mut streams = Vec::new();
    // Ten streams open under each generation, then the next one is loaded:
    // every stream stays open across at least one reload, most across many.
    for k in 0..RELOADS {
        for j in 0..BATCH {
            let i = k * BATCH + j;
            streams.push((i, tokio::spawn(run_stream(c.clone(), proxy.url(""), i, i % 2 == 0))));
        }
        upstream.wait_opened((k + 1) * BATCH).await;
        proxy.reload(generation(upstream.addr, k + 1)).await;
        wait_generation(&c, &proxy, k + 1).await;
        // The route the new generation adds works; the one it drops is gone.
        if (k + 1) % 2 == 1 {
            let resp = c.get(proxy.url(&format!("/extra{}/probe", k + 1))).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(body_text(resp).await, (k + 1).to_string());
        } else {
            let resp = c.get(proxy.url(&format!("/extra{k}/probe"))).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "route /extra{k} outlived its generation");
        }
    }
    assert_eq!(*upstream.opened.borrow(), RELOADS * BATCH);
    upstream.gate.send_replace(true);

    let mut failures = Vec::new();
    for (i, task) in streams {
        let events = task.await.unwrap_or_else(|e| panic!("stream {i}: {e}"));
        let direct = i % 2 == 0;
        let mut want: Vec<String> = (1..=EVENTS).map(|n| n.to_string()).collect();
        want.push("[DONE]".into());
        if !direct {
            want.push(r#"{"reason":"complete"}"#.into());
        }
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone().unwrap_or_default()).collect();
        let want_ids: Vec<String> = (1..=want.len()).map(|n| n.to_string()).collect();
        if data != want || ids != want_ids {
            failures.push(format!(
                "stream {i} ({}): ids {ids:?}, data {data:?}",
                if direct { "direct" } else { "handoff" }
            ));
        }
        if !direct && events.last().and_then(|e| e.event.as_deref()) != Some("end") {
            failures.push(format!("stream {i} has no end event: {events:?}"));
        }
    }
    assert!(failures.is_empty(), "{} streams were damaged:\n{}", failures.len(), failures.join("\n"));

    // Each stream went upstream once, with the config of the generation it
    // was opened under.
    let seen = upstream.streams.lock().unwrap().clone();
    assert_eq!(seen.len(), RELOADS * BATCH);
    for i in 0..RELOADS * BATCH {
        let gens: Vec<&String> = seen.iter().filter(|(q, _)| *q == format!("s={i}")).map(|(_, g)| g).collect();
        assert_eq!(gens, [&(i / BATCH).to_string()], "stream {i}");
    }
}

/// A self-signed certificate for `localhost` and `{name}.test` with CN
/// `name`, written as PEM into `dir`.
fn certificate(dir: &Path, name: &str) -> (TlsConfig, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string(), format!("{name}.test")]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (TlsConfig { cert: cert_path, key: key_path }, cert.der().clone())
}

/// A TLS client trusting both certificates, speaking HTTP/1.1.
fn tls_client(roots: &[&CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A new TLS connection: the certificate it was served and an HTTP/1.1
/// request sender on it.
async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> (CertificateDer<'static>, hyper::client::conn::http1::SendRequest<Full<Bytes>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("TLS handshake hung")
        .expect("TLS handshake failed");
    let served = tls.get_ref().1.peer_certificates().expect("no peer certificate")[0].clone();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    (served, sender)
}

fn event_request(path: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "localhost")
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// Reads a hyper body until the text read contains `needle` (10 s at most).
async fn read_until(body: &mut Incoming, text: &mut String, needle: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !text.contains(needle) {
            let frame = body.frame().await.expect("body ended").expect("body failed");
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in {text:?}"));
}

/// Reads a hyper body to its end (10 s at most).
async fn read_rest(body: &mut Incoming, text: &mut String) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body failed").into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("body did not end: {text:?}"));
}

/// The proxy's log lines, captured for tests that must see a refusal.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures the log lines of everything running on this thread (a
    /// current-thread test runtime: the proxy's tasks too).
    fn capture() -> (Logs, (tracing::subscriber::DefaultGuard, tracing::Dispatch)) {
        // With a single dispatcher registered, tracing asks only the
        // calling thread's default whether a call site is enabled, so a
        // call site first reached by another test's thread would stay off
        // here. A second registered dispatcher makes it ask every one.
        let second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, (tracing::subscriber::set_default(subscriber), second))
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    /// Waits until `n` lines contain `needle`, failing after 10 s.
    async fn wait_for(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.lines_with(needle);
            if lines.len() >= n {
                return lines;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never logged {needle:?} {n} times; the log:\n{}",
                String::from_utf8_lossy(&self.0.lock().unwrap())
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn a_new_certificate_is_served_to_new_connections_while_old_ones_finish() {
    let (logs, _guard) = Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (tls_a, der_a) = certificate(dir.path(), "ssegate-a");
    let (tls_b, der_b) = certificate(dir.path(), "ssegate-b");
    let connector = tls_client(&[&der_a, &der_b]);
    let mut upstream = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let upstream_addr = upstream.addr;
    let config = |tls: &TlsConfig, gen: &str| {
        let mut c = support::config(upstream_addr);
        c.server.tls = Some(tls.clone());
        c.routes[0].headers.insert("x-gen".into(), Secret(gen.into()));
        c
    };
    let proxy = ReloadProxy::start(config(&tls_a, "a")).await;

    // A stream is open over a connection that got certificate A.
    let (served, mut old) = tls_connect(&connector, proxy.addr).await;
    assert_eq!(served, der_a);
    let resp = old.send_request(event_request("/v1/chat")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let feed = upstream.next().await;
    assert_eq!(feed.seen.headers["x-gen"], "a");
    feed.send("data: one\n\n").await;
    let mut body = resp.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, "data: one").await;

    // Reload with certificate B: new connections get it.
    proxy.reload(config(&tls_b, "b")).await;
    logs.wait_for("config reloaded", 1).await;
    let (served, mut new) = tls_connect(&connector, proxy.addr).await;
    assert_eq!(served, der_b, "a new connection after the reload was served the old certificate");
    let resp = new.send_request(event_request("/v1/chat")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let new_feed = upstream.next().await;
    assert_eq!(new_feed.seen.headers["x-gen"], "b");
    new_feed.finish();
    let mut new_text = String::new();
    read_rest(&mut resp.into_body(), &mut new_text).await;

    // The stream on the old connection finishes whole.
    feed.send("data: two\n\n").await;
    feed.send("data: [DONE]\n\n").await;
    feed.finish();
    read_rest(&mut body, &mut text).await;
    let data: Vec<String> = parse_sse(&text).into_iter().map(|e| e.data).collect();
    assert_eq!(data, ["one", "two", "[DONE]"]);
    // The old connection's next request uses the new config.
    let resp = old.send_request(event_request("/v1/chat")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let feed = upstream.next().await;
    assert_eq!(feed.seen.headers["x-gen"], "b");
    feed.finish();
    read_rest(&mut resp.into_body(), &mut String::new()).await;

    // A reload whose certificate cannot be read is refused whole: the
    // certificate and the headers of the config in force stay.
    let mut broken = config(&tls_a, "broken");
    broken.server.tls.as_mut().unwrap().cert = dir.path().join("no-such-cert.pem");
    proxy.reload(broken).await;
    let refused = logs.wait_for("reload refused", 1).await;
    assert!(refused[0].contains("ERROR") && refused[0].contains("no-such-cert.pem"), "{refused:?}");
    let (served, mut after) = tls_connect(&connector, proxy.addr).await;
    assert_eq!(served, der_b);
    let resp = after.send_request(event_request("/v1/chat")).await.unwrap();
    let feed = upstream.next().await;
    assert_eq!(feed.seen.headers["x-gen"], "b");
    feed.finish();
    read_rest(&mut resp.into_body(), &mut String::new()).await;

    // A JWKS file that cannot be read: refused too.
    let mut broken = config(&tls_b, "broken-auth");
    broken.auth = Some(AuthConfig {
        jwt_hs256_secret: None,
        jwks_file: Some(dir.path().join("no-such-jwks.json")),
        audience: None,
    });
    proxy.reload(broken).await;
    let refused = logs.wait_for("reload refused", 2).await;
    assert!(refused[1].contains("no-such-jwks.json"), "{refused:?}");
    let (_, mut after) = tls_connect(&connector, proxy.addr).await;
    let resp = after.send_request(event_request("/v1/chat")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "auth of the refused config is in force");
    let feed = upstream.next().await;
    assert_eq!(feed.seen.headers["x-gen"], "b");
    feed.finish();
    read_rest(&mut resp.into_body(), &mut String::new()).await;
    assert_eq!(logs.lines_with("config reloaded").len(), 1);
}

const BIN: &str = env!("CARGO_BIN_EXE_ssegate");

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("already exited").to_string();
    assert!(std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success());
}

fn is_error(line: &str) -> bool {
    line.contains("\"level\":\"ERROR\"")
}

#[tokio::test]
async fn sighup_refuses_a_bad_config_with_one_error_line_and_applies_a_good_one() {
    let probe = support::Upstream::start(|s| {
        let gen = s.headers.get("x-gen").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        support::Reply::full(200, "text/plain", &gen)
    })
    .await;
    let mut streams = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let (probe_addr, streams_addr) = (probe.addr, streams.addr);
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let text = |gen: &str, extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"{admin}\"\ndrain_timeout = \"1s\"\n\n\
             [[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n[routes.headers]\nx-gen = \"{gen}\"\n\n\
             [[routes]]\nprefix = \"/s\"\nupstream = \"http://{}\"\n{extra}",
            probe_addr, streams_addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text("one", "")).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let line = line_matching(&mut log, &mut seen, |l| l.contains("ssegate listening")).await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr: SocketAddr = v["fields"]["listen"].as_str().unwrap().parse().unwrap();
    let c = client();
    let gen = || async {
        let resp = c.get(format!("http://{addr}/v1/probe")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        body_text(resp).await
    };
    assert_eq!(gen().await, "one");

    // A stream is open across both reloads.
    let resp =
        c.post(format!("http://{addr}/s/chat")).header("accept", "text/event-stream").body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let feed = streams.next().await;
    feed.send("data: one\n\n").await;
    let mut stream = support::BodyReader::new(resp);
    stream.until("data: one").await;

    // A config that fails `check`: one error line naming file and key; the
    // old config stays.
    std::fs::write(&path, text("bad", "\n[limits]\nmax_bodyy = 3\n")).unwrap();
    signal(&child, "HUP");
    let error = line_matching(&mut log, &mut seen, is_error).await;
    assert!(error.contains("config.toml") && error.contains("limits.max_bodyy"), "{error}");
    eprintln!("SIGHUP with a bad config logged: {error}");
    assert_eq!(gen().await, "one");
    let resp = c.get(format!("http://{addr}/extra/probe")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // A valid changed config takes effect; a changed listen address is
    // kept (with a warning) and the listener goes on serving.
    let good = text("two", "\n[[routes]]\nprefix = \"/extra\"\nupstream = \"http://PROBE\"\n")
        .replace("PROBE", &probe.addr.to_string())
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(&path, good).unwrap();
    signal(&child, "HUP");
    line_matching(&mut log, &mut seen, |l| l.contains("config reloaded")).await;
    assert!(seen.iter().any(|l| l.contains("WARN") && l.contains("listener addresses")), "{}", seen.join("\n"));
    assert_eq!(gen().await, "two");
    let resp = c.get(format!("http://{addr}/extra/probe")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // The stream opened under the first config finishes whole.
    feed.send("data: two\n\n").await;
    feed.send("data: [DONE]\n\n").await;
    feed.finish();
    let events = parse_sse(&format!("data: one\n\n{}", stream.rest().await));
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["one", "two", "[DONE]"]);

    signal(&child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("did not exit").unwrap();
    assert_eq!(status.code(), Some(0));
    while let Ok(Some(line)) = log.next_line().await {
        seen.push(line);
    }
    let errors: Vec<&String> = seen.iter().filter(|l| is_error(l)).collect();
    assert_eq!(errors.len(), 1, "expected exactly one error line:\n{}", seen.join("\n"));
    assert!(!seen.iter().any(|l| l.contains("panicked")), "{}", seen.join("\n"));
}

#[tokio::test]
async fn auth_turned_on_by_a_reload_applies_to_new_requests_only() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let open = support::config(upstream.addr);
    let mut closed = open.clone();
    closed.auth = Some(AuthConfig {
        jwt_hs256_secret: Some(Secret("0123456789abcdef-reload-secret".into())),
        jwks_file: None,
        audience: None,
    });
    let proxy = ReloadProxy::start(open.clone()).await;
    let c = client();
    let stream =
        |c: &reqwest::Client| c.post(proxy.url("/v1/chat")).header("accept", "text/event-stream").body("{}").send();

    // A stream opened without a token before the reload.
    let resp = stream(&c).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let feed = upstream.next().await;
    feed.send("data: one\n\n").await;
    let mut before = support::BodyReader::new(resp);
    before.until("data: one").await;

    proxy.reload(closed).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = stream(&c).await.unwrap();
        if resp.status() == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        upstream.next().await.finish();
        body_text(resp).await;
        assert!(tokio::time::Instant::now() < deadline, "[auth] never took effect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The stream that started before it goes on unharmed.
    feed.send("data: two\n\n").await;
    feed.finish();
    let data: Vec<String> = parse_sse(&before.rest().await).into_iter().map(|e| e.data).collect();
    assert_eq!(data, ["two"]);

    // And off again.
    proxy.reload(open).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = stream(&c).await.unwrap();
        if resp.status() == StatusCode::OK {
            upstream.next().await.finish();
            body_text(resp).await;
            break;
        }
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(tokio::time::Instant::now() < deadline, "[auth] never went away");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
