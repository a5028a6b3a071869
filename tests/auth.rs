//! Client authentication (`[auth]`): JWTs signed with an HS256 secret or a
//! key from a JWKS file (ES256, RS256), what is refused with 401 and that
//! nothing then goes upstream, that the client's `Authorization` never goes
//! upstream, `limits.streams_per_client` (per JWT `sub`, per client IP
//! without auth), and the `ssegate check` warning for an open listener.

#[path = "support/handoff.rs"]
mod handoff_support;
mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use handoff_support::{metric, metrics_text, parse_created};
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use ssegate::config::{AuthConfig, Config, Secret};
use support::{body_text, client, error_type, parse_sse, route, BodyReader, ManualUpstream, Proxy, Reply, Upstream};

const SECRET: &str = "0123456789abcdef-auth-test-secret";
const UPSTREAM_KEY: &str = "Bearer sk-upstream-key";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 JWT for `claims`, signed with `secret`.
fn hs256(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// A valid HS256 token for `sub` (audience `ssegate`).
fn token_for(sub: &str) -> String {
    hs256(json!({"sub": sub, "aud": "ssegate", "exp": now() + 600}), SECRET)
}

fn bearer(jwt: &str) -> String {
    format!("Bearer {jwt}")
}

fn hs256_auth(audience: Option<&str>) -> AuthConfig {
    AuthConfig {
        jwt_hs256_secret: Some(Secret(SECRET.into())),
        jwks_file: None,
        audience: audience.map(str::to_string),
    }
}

/// Route `/v1` → `upstream` with the upstream's own key in its headers,
/// route `/v2` → `upstream` without headers, and `[auth]`.
fn auth_config(upstream: SocketAddr, auth: AuthConfig) -> Config {
    let mut c = support::config(upstream);
    c.routes[0].headers.insert("authorization".into(), Secret(UPSTREAM_KEY.into()));
    c.routes.push(route("/v2", &format!("http://{upstream}")));
    c.auth = Some(auth);
    c
}

/// Asserts a 401 with the JSON `unauthorized` body and `www-authenticate`.
async fn assert_unauthorized(resp: reqwest::Response, case: &str) {
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{case}");
    let h = resp.headers();
    assert_eq!(h.get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"), "{case}");
    assert!(h["content-type"].to_str().unwrap().starts_with("application/json"), "{case}");
    let body = body_text(resp).await;
    assert_eq!(error_type(&body), "unauthorized", "{case}: {body}");
}

/// No header value the upstream saw contains the client's JWT.
fn assert_jwt_not_forwarded(seen: &support::Seen, jwt: &str) {
    for (name, value) in &seen.headers {
        assert!(!String::from_utf8_lossy(value.as_bytes()).contains(jwt), "the client's JWT went upstream in {name}");
    }
}

#[tokio::test]
async fn a_valid_hs256_token_is_accepted_and_never_forwarded() {
    let upstream = Upstream::start(|s| match s.uri.path() {
        "/v1/stream" => Reply::chunks("text/event-stream", &[b"data: a\n\n", b"data: [DONE]\n\n"]),
        _ => Reply::full(200, "text/plain", "hello"),
    })
    .await;
    let proxy = Proxy::start(auth_config(upstream.addr, hs256_auth(Some("ssegate")))).await;
    let c = client();
    let jwt = token_for("alice");

    // A plain request on a route with its own authorization header.
    let resp = c.get(proxy.url("/v1/models")).header("authorization", bearer(&jwt)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "hello");
    let seen = upstream.last();
    assert_eq!(seen.headers["authorization"], UPSTREAM_KEY);
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert_jwt_not_forwarded(&seen, &jwt);

    // A route without headers: no Authorization at all goes upstream.
    let resp = c.get(proxy.url("/v2/models")).header("authorization", bearer(&jwt)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert!(seen.headers.get("authorization").is_none(), "{:?}", seen.headers);
    assert_jwt_not_forwarded(&seen, &jwt);

    // A direct event stream, the scheme name in lower case.
    let resp = c
        .post(proxy.url("/v1/stream"))
        .header("authorization", format!("bearer {jwt}"))
        .header("accept", "text/event-stream")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let data: Vec<String> = parse_sse(&body_text(resp).await).into_iter().map(|e| e.data).collect();
    assert_eq!(data, ["a", "[DONE]"]);
    assert_eq!(upstream.last().headers["authorization"], UPSTREAM_KEY);
    assert_jwt_not_forwarded(&upstream.last(), &jwt);
    assert_eq!(upstream.count(), 3);
}

/// Tokens that must all be refused, with why; `aud` is configured.
fn bad_authorizations() -> Vec<(&'static str, Option<String>)> {
    let exp = now() + 600;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "a", "aud": "ssegate", "exp": exp}))
    );
    let hs384 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &json!({"sub": "a", "aud": "ssegate", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    vec![
        ("no Authorization", None),
        ("Basic credentials", Some("Basic dXNlcjpwYXNz".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("not a JWT", Some("Bearer not-a-jwt".into())),
        ("three garbage parts", Some("Bearer abc.def.ghi".into())),
        ("expired", Some(bearer(&hs256(json!({"sub": "a", "aud": "ssegate", "exp": now() - 3600}), SECRET)))),
        ("no exp", Some(bearer(&hs256(json!({"sub": "a", "aud": "ssegate"}), SECRET)))),
        (
            "wrong key",
            Some(bearer(&hs256(json!({"sub": "a", "aud": "ssegate", "exp": exp}), "another-secret-0123456789"))),
        ),
        ("wrong aud", Some(bearer(&hs256(json!({"sub": "a", "aud": "other", "exp": exp}), SECRET)))),
        ("no aud", Some(bearer(&hs256(json!({"sub": "a", "exp": exp}), SECRET)))),
        ("alg none", Some(bearer(&alg_none))),
        ("HS384 with the right secret", Some(bearer(&hs384))),
        ("JWT without the scheme", Some(token_for("a"))),
    ]
}

#[tokio::test]
async fn bad_tokens_get_401_and_nothing_goes_upstream() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "should not be reached")).await;
    let proxy = Proxy::start(auth_config(upstream.addr, hs256_auth(Some("ssegate")))).await;
    let c = client();
    for (case, authorization) in bad_authorizations() {
        for (method, path) in [("GET", "/v1/models"), ("POST", "/v1/chat"), ("POST", "/handoff/v1/chat")] {
            let mut req = c.request(method.parse().unwrap(), proxy.url(path)).header("accept", "text/event-stream");
            if let Some(a) = &authorization {
                req = req.header("authorization", a);
            }
            if method == "POST" {
                req = req.header("content-type", "application/json").body(r#"{"stream":true}"#);
            }
            assert_unauthorized(req.send().await.unwrap(), &format!("{case}: {method} {path}")).await;
        }
    }
    assert_eq!(upstream.count(), 0, "a refused request went upstream");
    let m = metrics_text(proxy.admin).await;
    assert_eq!(metric(&m, "ssegate_tokens_issued_total"), 0.0, "{m}");

    // The same requests with a good token go through.
    let resp = c.get(proxy.url("/v1/models")).header("authorization", bearer(&token_for("a"))).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn handoff_post_needs_a_token_the_stream_get_and_delete_do_not() {
    let upstream = Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: one\n\n", b"data: two\n\n"])).await;
    let proxy = Proxy::start(auth_config(upstream.addr, hs256_auth(None))).await;
    let c = client();
    let jwt = hs256(json!({"sub": "alice", "exp": now() + 600}), SECRET);

    let resp = c.post(proxy.url("/handoff/v1/chat")).body("{}").send().await.unwrap();
    assert_unauthorized(resp, "POST without a token").await;

    let post = |c: reqwest::Client, jwt: String| {
        let url = proxy.url("/handoff/v1/chat");
        async move {
            let resp = c
                .post(url)
                .header("authorization", bearer(&jwt))
                .header("content-type", "application/json")
                .body(r#"{"q":1}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::CREATED);
            parse_created(&resp.text().await.unwrap())
        }
    };
    let created = post(c.clone(), jwt.clone()).await;
    assert_eq!(upstream.count(), 0, "the POST alone must not go upstream");

    // The GET carries no Authorization: the token in the URL is the credential.
    let resp = c.get(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let events = parse_sse(&body_text(resp).await);
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["one", "two", r#"{"reason":"complete"}"#]);
    let seen = upstream.last();
    assert_eq!(seen.headers["authorization"], UPSTREAM_KEY, "the stored request must use the route's key");
    assert_jwt_not_forwarded(&seen, &jwt);
    assert_eq!(&seen.body[..], br#"{"q":1}"#);

    // Through a route without headers the stored request has no Authorization.
    let resp =
        c.post(proxy.url("/handoff/v2/chat")).header("authorization", bearer(&jwt)).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created2 = parse_created(&resp.text().await.unwrap());
    let resp = c.get(proxy.url(&created2.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    body_text(resp).await;
    assert!(upstream.last().headers.get("authorization").is_none(), "{:?}", upstream.last().headers);

    // DELETE without a header is the user's Stop, allowed by the token.
    let created3 = post(c.clone(), jwt.clone()).await;
    let resp = c.delete(proxy.url(&created3.stream_url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(upstream.count(), 2);
}

/// An EC P-256 key pair: the PKCS#8 DER to sign with and its JWK.
fn ec_key(kid: &str) -> (EncodingKey, serde_json::Value) {
    let pair = rcgen::KeyPair::generate().unwrap();
    assert_eq!(pair.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let point = pair.public_key_raw();
    assert_eq!((point.len(), point[0]), (65, 4), "not an uncompressed P-256 point");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": b64(&point[1..33]), "y": b64(&point[33..]),
    });
    (EncodingKey::from_ec_der(&pair.serialize_der()), jwk)
}

/// The RSA test key (PKCS#1 DER, made once with
/// `openssl genrsa -traditional 2048 | openssl rsa -traditional -outform DER`)
/// and its JWK, the modulus and exponent read from the DER.
fn rsa_key(kid: &str) -> (EncodingKey, serde_json::Value) {
    let der =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/auth/rs256-test-key.der")).unwrap();
    // RSAPrivateKey ::= SEQUENCE { version INTEGER, modulus INTEGER, publicExponent INTEGER, ... }
    fn tlv(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let (tag, first) = (b[0], b[1] as usize);
        let (len, head) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            (b[2..2 + n].iter().fold(0usize, |acc, x| acc << 8 | *x as usize), 2 + n)
        };
        (tag, &b[head..head + len], &b[head + len..])
    }
    let (tag, seq, _) = tlv(&der);
    assert_eq!(tag, 0x30);
    let (_, _version, rest) = tlv(seq);
    let (tag, n, rest) = tlv(rest);
    assert_eq!(tag, 0x02);
    let (_, e, _) = tlv(rest);
    let strip = |b: &[u8]| b.iter().skip_while(|x| **x == 0).copied().collect::<Vec<u8>>();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": b64(&strip(n)), "e": b64(&strip(e))});
    (EncodingKey::from_rsa_der(&der), jwk)
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn write_jwks(dir: &Path, keys: &[&serde_json::Value]) -> PathBuf {
    let path = dir.join("jwks.json");
    std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
    path
}

#[tokio::test]
async fn jwks_es256_and_rs256_keys_are_chosen_by_kid() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let dir = tempfile::tempdir().unwrap();
    let (ec1, ec1_jwk) = ec_key("ec-1");
    let (ec2, ec2_jwk) = ec_key("ec-2");
    let (rsa, rsa_jwk) = rsa_key("rsa-1");
    let jwks = write_jwks(dir.path(), &[&ec1_jwk, &ec2_jwk, &rsa_jwk]);
    let auth = AuthConfig { jwt_hs256_secret: None, jwks_file: Some(jwks), audience: None };
    let proxy = Proxy::start(auth_config(upstream.addr, auth)).await;
    let c = client();
    let claims = || json!({"sub": "k", "exp": now() + 600});

    let accepted = [
        ("ES256, kid ec-1", sign(Algorithm::ES256, Some("ec-1"), &ec1, claims())),
        ("ES256, kid ec-2", sign(Algorithm::ES256, Some("ec-2"), &ec2, claims())),
        ("ES256 without kid", sign(Algorithm::ES256, None, &ec2, claims())),
        ("RS256, kid rsa-1", sign(Algorithm::RS256, Some("rsa-1"), &rsa, claims())),
        ("RS256 without kid", sign(Algorithm::RS256, None, &rsa, claims())),
    ];
    for (case, jwt) in &accepted {
        let resp = c.get(proxy.url("/v1/models")).header("authorization", bearer(jwt)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{case}: {}", body_text(resp).await);
        assert_eq!(upstream.last().headers["authorization"], UPSTREAM_KEY, "{case}");
    }
    let refused = [
        ("ES256 signed by ec-1 naming ec-2", sign(Algorithm::ES256, Some("ec-2"), &ec1, claims())),
        ("ES256 with an unknown kid", sign(Algorithm::ES256, Some("nope"), &ec1, claims())),
        ("RS256 naming an EC kid", sign(Algorithm::RS256, Some("ec-1"), &rsa, claims())),
        ("ES256 expired", sign(Algorithm::ES256, Some("ec-1"), &ec1, json!({"sub": "k", "exp": now() - 3600}))),
        ("ES256 without exp", sign(Algorithm::ES256, Some("ec-1"), &ec1, json!({"sub": "k"}))),
        ("HS256 where only JWKS keys exist", hs256(claims(), SECRET)),
        ("HS256 keyed with the RSA modulus (algorithm confusion)", hs256(claims(), rsa_jwk["n"].as_str().unwrap())),
    ];
    for (case, jwt) in &refused {
        let resp = c.get(proxy.url("/v1/models")).header("authorization", bearer(jwt)).send().await.unwrap();
        assert_unauthorized(resp, case).await;
    }
    assert_eq!(upstream.count(), accepted.len());
}

/// Sends an event-stream request as `authorization` (or none) and returns
/// the response once its head arrived.
async fn open_stream(c: &reqwest::Client, url: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut req = c.post(url).header("accept", "text/event-stream").body("{}");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    tokio::time::timeout(Duration::from_secs(10), req.send()).await.expect("no response head").unwrap()
}

async fn assert_rate_limited(resp: reqwest::Response, case: &str) {
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "{case}");
    let retry_after = resp.headers().get("retry-after").unwrap_or_else(|| panic!("{case}: no retry-after"));
    assert!(retry_after.to_str().unwrap().parse::<u64>().is_ok(), "{case}: retry-after {retry_after:?}");
    assert_eq!(error_type(&body_text(resp).await), "rate_limited", "{case}");
}

/// Opens a stream for `authorization` until it is not refused with 429:
/// a stream's slot is given back once the proxy dropped the finished body,
/// which the client cannot observe exactly. Fails after 5 s.
async fn open_stream_when_free(c: &reqwest::Client, url: &str, authorization: Option<&str>) -> reqwest::Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = open_stream(c, url, authorization).await;
        if resp.status() != StatusCode::TOO_MANY_REQUESTS {
            return resp;
        }
        assert!(tokio::time::Instant::now() < deadline, "the finished stream's slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn streams_per_client_counts_open_streams_per_jwt_subject() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let mut config = auth_config(upstream.addr, hs256_auth(Some("ssegate")));
    config.limits.streams_per_client = 1;
    config.handoff.resume_grace = Duration::ZERO;
    let proxy = Proxy::start(config).await;
    let c = client();
    let (alice, bob) = (bearer(&token_for("alice")), bearer(&token_for("bob")));
    let url = proxy.url("/v1/chat");

    // alice's first stream is open.
    let first = open_stream(&c, &url, Some(&alice)).await;
    assert_eq!(first.status(), StatusCode::OK);
    let feed = upstream.next().await;
    feed.send("data: one\n\n").await;
    let mut first = BodyReader::new(first);
    first.until("data: one").await;

    // A second one of alice's, direct or by handoff, is refused; with a
    // token minted anew for the same subject too.
    assert_rate_limited(open_stream(&c, &url, Some(&alice)).await, "second direct stream").await;
    let again = bearer(&hs256(json!({"sub": "alice", "aud": "ssegate", "exp": now() + 900}), SECRET));
    assert_rate_limited(open_stream(&c, &url, Some(&again)).await, "same sub, another token").await;
    let resp = c.post(proxy.url("/handoff/v1/chat")).header("authorization", &alice).body("{}").send().await.unwrap();
    assert_rate_limited(resp, "handoff POST").await;
    assert!(upstream.try_next().is_none(), "a refused stream went upstream");

    // bob is another client.
    let b = open_stream(&c, &url, Some(&bob)).await;
    assert_eq!(b.status(), StatusCode::OK);
    let bob_feed = upstream.next().await;

    // alice's stream ends; she can open one again.
    feed.send("data: [DONE]\n\n").await;
    feed.finish();
    assert!(first.rest().await.contains("[DONE]"));
    let second = open_stream_when_free(&c, &url, Some(&alice)).await;
    assert_eq!(second.status(), StatusCode::OK);
    let feed = upstream.next().await;
    // A client that goes away gives its slot back too.
    drop(second);
    feed.closed().await;

    // A handoff stream counts from its first GET.
    let resp = c.post(proxy.url("/handoff/v1/chat")).header("authorization", &alice).body("{}").send().await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created = parse_created(&resp.text().await.unwrap());
    let stream = c.get(proxy.url(&created.stream_url)).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let handoff_feed = upstream.next().await;
    assert_rate_limited(open_stream(&c, &url, Some(&alice)).await, "direct while a handoff stream is open").await;
    let resp = c.post(proxy.url("/handoff/v1/chat")).header("authorization", &alice).body("{}").send().await.unwrap();
    assert_rate_limited(resp, "handoff POST while a handoff stream is open").await;

    handoff_feed.finish();
    let events = parse_sse(&body_text(stream).await);
    assert_eq!(events.last().unwrap().event.as_deref(), Some("end"), "{events:?}");
    // With resume_grace 0s the ended handoff stream is forgotten soon after.
    let again = open_stream_when_free(&c, &url, Some(&alice)).await;
    assert_eq!(again.status(), StatusCode::OK);
    upstream.next().await.finish();
    body_text(again).await;
    bob_feed.finish();
    body_text(b).await;
}

#[tokio::test]
async fn without_auth_streams_per_client_counts_by_client_ip() {
    let mut upstream = ManualUpstream::start(200, &[("content-type", "text/event-stream")]).await;
    let mut config = support::config(upstream.addr);
    config.limits.streams_per_client = 1;
    let proxy = Proxy::start(config).await;
    let url = proxy.url("/v1/chat");
    let from = |ip: [u8; 4]| reqwest::Client::builder().no_proxy().local_address(IpAddr::from(ip)).build().unwrap();
    let (one, two) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));

    let first = open_stream(&one, &url, None).await;
    assert_eq!(first.status(), StatusCode::OK);
    let feed = upstream.next().await;
    assert_rate_limited(open_stream(&one, &url, None).await, "same IP").await;
    // A forged X-Forwarded-For does not make another client.
    let forged = one
        .post(&url)
        .header("accept", "text/event-stream")
        .header("x-forwarded-for", "203.0.113.9")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_rate_limited(forged, "forged x-forwarded-for").await;
    // An Authorization header means nothing without [auth].
    let with_jwt = open_stream(&one, &url, Some(&bearer(&token_for("someone")))).await;
    assert_rate_limited(with_jwt, "a JWT without [auth]").await;
    assert!(upstream.try_next().is_none(), "a refused stream went upstream");

    // Another address is another client.
    let other = open_stream(&two, &url, None).await;
    assert_eq!(other.status(), StatusCode::OK);
    let other_feed = upstream.next().await;
    assert_eq!(other_feed.seen.headers["x-forwarded-for"], "127.0.0.2");

    feed.finish();
    body_text(first).await;
    let again = open_stream_when_free(&one, &url, None).await;
    assert_eq!(again.status(), StatusCode::OK);
    upstream.next().await.finish();
    body_text(again).await;
    other_feed.finish();
    body_text(other).await;
}

/// Runs `ssegate check` on a config with `listen` and optional `[auth]`.
async fn check(listen: &str, auth: bool) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let mut text = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"127.0.0.1:9901\"\n\n\
         [[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:8000\"\n"
    );
    if auth {
        text.push_str(&format!("\n[auth]\njwt_hs256_secret = \"{SECRET}\"\n"));
    }
    std::fs::write(&path, text).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssegate"))
        .args(["check", "--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("check did not exit").unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn check_warns_when_a_non_loopback_listener_has_no_auth() {
    for listen in ["0.0.0.0:8080", "[::]:8080", "192.0.2.10:8080"] {
        let (code, stderr) = check(listen, false).await;
        assert_eq!(code, Some(0), "a warning is not an error: {stderr}");
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning:")).collect();
        assert_eq!(warnings.len(), 1, "{listen}: {stderr}");
        assert!(warnings[0].contains("server.listen") && warnings[0].contains("[auth]"), "{listen}: {stderr}");
        assert!(!stderr.contains("error"), "{stderr}");
    }
    for (listen, auth) in [("0.0.0.0:8080", true), ("127.0.0.1:8080", false), ("[::1]:8080", false)] {
        let (code, stderr) = check(listen, auth).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(!stderr.contains("warning"), "{listen}, auth {auth}: {stderr}");
    }
}
