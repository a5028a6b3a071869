//! `config.toml`: serde structs with the contract's defaults, `${NAME}`
//! substitution, `validate()`, and the report `ssegate check` prints.
//!
//! Every problem is reported as a [`ConfigError`] naming the key and the line
//! it sits on, so that an operator can go straight to it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub sse: SseConfig,
    pub handoff: HandoffConfig,
    pub limits: LimitsConfig,
    pub cors: CorsConfig,
    /// Without it the proxy does not authenticate clients.
    pub auth: Option<AuthConfig>,
    pub routes: Vec<RouteConfig>,
    /// Set by `ssegate demo`, never from a file: serves the chat page at `/`
    /// and the demo's "drop connection" endpoint.
    #[serde(skip)]
    pub demo: bool,
}

/// `[server]`: where to listen and how to stop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Health, readiness and metrics; never served on the public listener.
    #[serde(deserialize_with = "socket_addr")]
    pub admin_listen: SocketAddr,
    /// How long open streams may run on after SIGINT/SIGTERM.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    pub tls: Option<TlsConfig>,
    /// Threads that serve public connections, each with its own event loop
    /// (a connection, its upstream requests and its timers stay on one);
    /// 0 serves them on the runtime that runs the proxy. Fixed at start.
    pub workers: usize,
}

/// One worker per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            drain_timeout: Duration::from_secs(10),
            tls: None,
            workers: default_workers(),
        }
    }
}

/// `server.tls`: PEM files; enables HTTPS with ALPN h2 + http/1.1.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(deserialize_with = "path")]
    pub cert: PathBuf,
    #[serde(deserialize_with = "path")]
    pub key: PathBuf,
}

/// `[sse]`: how event streams are written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// A comment line goes out when nothing was written for this long, so
    /// that idle timeouts in between do not cut a slow generation.
    #[serde(deserialize_with = "duration")]
    pub keepalive: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry: Duration,
    #[serde(deserialize_with = "string")]
    pub end_event: String,
    #[serde(deserialize_with = "string")]
    pub error_event: String,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            keepalive: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            end_event: "end".into(),
            error_event: "error".into(),
        }
    }
}

/// `[handoff]`: POST first, then EventSource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    #[serde(deserialize_with = "string")]
    pub prefix: String,
    #[serde(deserialize_with = "string")]
    pub stream_prefix: String,
    #[serde(deserialize_with = "duration")]
    pub ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub resume_grace: Duration,
    #[serde(deserialize_with = "size")]
    pub replay_bytes: u64,
    #[serde(deserialize_with = "string")]
    pub store: String,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            prefix: "/handoff".into(),
            stream_prefix: "/stream".into(),
            ttl: Duration::from_secs(30),
            resume_grace: Duration::from_secs(30),
            replay_bytes: 1 << 20,
            store: "memory".into(),
        }
    }
}

/// `[limits]`: every bound the proxy keeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    #[serde(deserialize_with = "size")]
    pub max_body: u64,
    pub max_streams: usize,
    pub max_tokens: usize,
    /// Open client connections; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// How long the addresses of an upstream host name are used for new
    /// connections before it is looked up again (`crate::resolve`).
    #[serde(deserialize_with = "duration")]
    pub dns_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub first_byte_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A client that takes none of the bytes waiting for it for this long
    /// is dropped (nginx's `send_timeout`).
    #[serde(deserialize_with = "duration")]
    pub send_timeout: Duration,
    #[serde(deserialize_with = "size")]
    pub max_event_bytes: u64,
    pub streams_per_client: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body: 1 << 20,
            max_streams: 10_000,
            max_tokens: 100_000,
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            dns_ttl: Duration::from_secs(30),
            first_byte_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(120),
            send_timeout: Duration::from_secs(60),
            max_event_bytes: 1 << 20,
            streams_per_client: 0,
        }
    }
}

/// `[cors]`: which browser origins may use the handoff endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    #[serde(deserialize_with = "strings")]
    pub allow_origins: Vec<String>,
}

/// `[auth]`: client authentication with JWTs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default, deserialize_with = "opt_secret")]
    pub jwt_hs256_secret: Option<Secret>,
    #[serde(default, deserialize_with = "opt_path")]
    pub jwks_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_string")]
    pub audience: Option<String>,
}

/// `[[routes]]`: one upstream and the path prefix that leads to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(deserialize_with = "string")]
    pub prefix: String,
    #[serde(deserialize_with = "string")]
    pub upstream: String,
    #[serde(default)]
    pub format: Format,
    #[serde(default)]
    pub strip_prefix: bool,
    /// Set on every upstream request, replacing the client's.
    #[serde(default, deserialize_with = "secret_map")]
    pub headers: BTreeMap<String, Secret>,
}

/// How an upstream body is cut into events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Decided per response from its content type.
    #[default]
    Auto,
    Sse,
    Ndjson,
    Text,
}

/// A value that must not show up in logs: `Debug` prints `MASKED`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// One thing wrong with a configuration: the key, the line it is on, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: `{}`: {}", self.file, line, self.key, self.reason),
            None => write!(f, "{}: `{}`: {}", self.file, self.key, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            line: None,
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates config text; relative TLS and JWKS paths are
    /// taken from `base`, the directory the file sits in.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let doc = toml_edit::Document::parse(text).map_err(|e| ConfigError {
            file: file.into(),
            key: "(syntax)".into(),
            line: e.span().map(|s| line_of_offset(text, s.start)),
            reason: e.message().trim().to_string(),
        })?;
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            ConfigError {
                file: file.into(),
                key: offset.and_then(|o| key_at(doc.as_item(), o)).unwrap_or_else(|| "(document)".into()),
                line: offset.map(|o| line_of_offset(text, o)),
                reason: e.message().trim().to_string(),
            }
        })?;
        config.resolve_paths(base);
        config.validate().map_err(|(key, reason)| ConfigError {
            file: file.into(),
            line: line_of_key(&doc, text, &key),
            key,
            reason,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.server.tls {
            join(&mut tls.cert);
            join(&mut tls.key);
        }
        if let Some(jwks) = self.auth.as_mut().and_then(|a| a.jwks_file.as_mut()) {
            join(jwks);
        }
    }

    /// Checks what serde cannot: the first problem found, as (key, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, reason: &str| Err((key.to_string(), reason.to_string()));
        if self.routes.is_empty() {
            return fail("routes", "at least one [[routes]] entry is needed");
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            if !route.prefix.starts_with('/') {
                return Err((key("prefix"), "must start with `/`".into()));
            }
            if let Err(reason) = validate_upstream(&route.upstream) {
                return Err((key("upstream"), reason));
            }
            for (name, value) in &route.headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err((key("headers"), format!("`{name}` is not a valid header name")));
                }
                if http::HeaderValue::from_str(&value.0).is_err() {
                    return Err((key("headers"), format!("the value of `{name}` is not a valid header value")));
                }
            }
            let dup = self.routes[..i].iter().any(|r| r.prefix == route.prefix);
            if dup {
                return Err((key("prefix"), format!("`{}` is used by an earlier route", route.prefix)));
            }
        }
        if self.server.workers > 1024 {
            return fail("server.workers", "must be at most 1024 (one per core is the default)");
        }
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            return fail("server.admin_listen", "must differ from server.listen");
        }
        if let Some(tls) = &self.server.tls {
            crate::tls::server_config(tls).map_err(|e| (e.key.to_string(), e.reason))?;
        }
        for (key, value) in
            [("handoff.prefix", &self.handoff.prefix), ("handoff.stream_prefix", &self.handoff.stream_prefix)]
        {
            if !value.starts_with('/') || value.len() < 2 || value.ends_with('/') {
                return fail(key, "must start with `/`, have a name, and not end with `/`");
            }
        }
        if self.handoff.prefix == self.handoff.stream_prefix {
            return fail("handoff.stream_prefix", "must differ from handoff.prefix");
        }
        if self.handoff.store != "memory" && !self.handoff.store.starts_with("redis://") {
            return fail("handoff.store", "must be \"memory\" or \"redis://HOST:PORT/DB\"");
        }
        for (key, value) in [("sse.end_event", &self.sse.end_event), ("sse.error_event", &self.sse.error_event)] {
            if value.is_empty() || value.contains(['\r', '\n']) {
                return fail(key, "must be a non-empty name on one line");
            }
        }
        if self.sse.keepalive.is_zero() {
            return fail("sse.keepalive", "must be more than 0s");
        }
        let zero_checks = [
            ("limits.max_body", self.limits.max_body == 0),
            ("limits.max_streams", self.limits.max_streams == 0),
            ("limits.max_tokens", self.limits.max_tokens == 0),
            ("limits.max_connections", self.limits.max_connections == 0),
            ("limits.max_event_bytes", self.limits.max_event_bytes == 0),
            ("limits.header_timeout", self.limits.header_timeout.is_zero()),
            ("limits.connect_timeout", self.limits.connect_timeout.is_zero()),
            ("limits.first_byte_timeout", self.limits.first_byte_timeout.is_zero()),
            ("limits.idle_timeout", self.limits.idle_timeout.is_zero()),
            ("limits.send_timeout", self.limits.send_timeout.is_zero()),
            ("handoff.ttl", self.handoff.ttl.is_zero()),
            ("handoff.replay_bytes", self.handoff.replay_bytes == 0),
        ];
        if let Some((key, _)) = zero_checks.iter().find(|(_, bad)| *bad) {
            return fail(key, "must be more than 0");
        }
        for (i, origin) in self.cors.allow_origins.iter().enumerate() {
            let ok = origin == "*" || origin.starts_with("http://") || origin.starts_with("https://");
            if !ok || origin.ends_with('/') {
                return Err((
                    format!("cors.allow_origins[{i}]"),
                    "must be \"*\" or an origin such as \"https://app.example\"".into(),
                ));
            }
        }
        if let Some(auth) = &self.auth {
            if auth.jwks_file.is_some() && auth.jwt_hs256_secret.is_none() {
                crate::auth::Authenticator::new(auth)?;
            }
            match (&auth.jwt_hs256_secret, &auth.jwks_file) {
                (None, None) => return fail("auth", "needs jwt_hs256_secret or jwks_file"),
                (Some(_), Some(_)) => return fail("auth", "set jwt_hs256_secret or jwks_file, not both"),
                (Some(s), None) if s.0.len() < 16 => return fail("auth.jwt_hs256_secret", "must be at least 16 bytes"),
                _ => {}
            }
        }
        Ok(())
    }

    /// Warnings `ssegate check` prints for a config that is valid but risky.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.auth.is_none() && !self.server.listen.ip().is_loopback() {
            out.push(format!(
                "server.listen = {} is not a loopback address and there is no [auth]: anyone who can reach it can use every route and its upstream credentials",
                self.server.listen
            ));
        }
        out
    }
}

fn validate_upstream(upstream: &str) -> Result<(), String> {
    let uri: http::Uri = upstream.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    if uri.authority().is_none() {
        return Err("needs a host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query".into());
    }
    Ok(())
}

/// 1-based line of a byte offset.
fn line_of_offset(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// The line of a dotted key such as `routes[0].upstream`, or of its
/// nearest parent that is written in the file.
fn line_of_key(doc: &toml_edit::Document<&str>, text: &str, key: &str) -> Option<usize> {
    let mut item = doc.as_item();
    let mut best = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let table = item.as_table_like()?;
        let (k, next) = table.get_key_value(name)?;
        best = k.span().or(next.span()).or(best);
        item = next;
        if let Some(i) = index {
            let next = match item {
                toml_edit::Item::ArrayOfTables(a) => a.get(i).map(|t| (t.span(), t as &dyn toml_edit::TableLike)),
                _ => None,
            };
            match next {
                Some((span, _)) => {
                    best = span.or(best);
                    item = &item[i];
                }
                None => break,
            }
        }
    }
    best.map(|s| line_of_offset(text, s.start))
}

/// The dotted key whose value covers `offset`.
fn key_at(item: &toml_edit::Item, offset: usize) -> Option<String> {
    fn walk(item: &toml_edit::Item, offset: usize, path: &mut Vec<String>) -> bool {
        match item {
            toml_edit::Item::Table(_) | toml_edit::Item::Value(toml_edit::Value::InlineTable(_)) => {
                let Some(table) = item.as_table_like() else { return false };
                for (k, v) in table.iter() {
                    let key_span = table.key(k).and_then(|key| key.span());
                    let covers = |s: Option<std::ops::Range<usize>>| s.is_some_and(|s| s.contains(&offset));
                    path.push(k.to_string());
                    if walk(v, offset, path) || covers(v.span()) || covers(key_span) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    if let Some(last) = path.last_mut() {
                        last.push_str(&format!("[{i}]"));
                    }
                    let item = toml_edit::Item::Table(t.clone());
                    if walk(&item, offset, path) || t.span().is_some_and(|s| s.contains(&offset)) {
                        return true;
                    }
                    if let Some(last) = path.last_mut() {
                        let cut = last.rfind('[').unwrap_or(last.len());
                        last.truncate(cut);
                    }
                }
                false
            }
            _ => false,
        }
    }
    let mut path = Vec::new();
    walk(item, offset, &mut path).then(|| path.join("."))
}

/// Replaces each `${NAME}` with the environment variable NAME.
pub fn substitute_env(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| "`${` without a closing `}`".to_string())?;
        let name = &after[..end];
        if name.is_empty() {
            return Err("`${}` names no variable".into());
        }
        let var = std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&var);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = String::deserialize(d)?;
    substitute_env(&raw).map_err(de::Error::custom)
}

fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    string(d).map(Some)
}

fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter().map(|s| substitute_env(s).map_err(de::Error::custom)).collect()
}

fn opt_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Secret::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string(d).map(Secret)
    }
}

fn secret_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Secret>, D::Error> {
    let raw = BTreeMap::<String, Secret>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect())
}

fn path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    string(d).map(PathBuf::from)
}

fn opt_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    path(d).map(Some)
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let raw = string(d)?;
    raw.parse().map_err(|_| de::Error::custom(format!("`{raw}` is not an address such as \"127.0.0.1:8080\"")))
}

/// The longest duration a key takes: deadlines are added to the clock, and
/// one past the clock's range would be an error at run time.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = string(d)?;
    let parsed = humantime::parse_duration(&raw).map_err(|e| {
        de::Error::custom(format!("`{raw}` is not a duration such as \"250ms\", \"15s\" or \"2m\": {e}"))
    })?;
    if parsed > MAX_DURATION {
        return Err(de::Error::custom(format!("`{raw}` is longer than 10 years")));
    }
    Ok(parsed)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    let raw = Raw::deserialize(d)
        .map_err(|_| de::Error::custom("expected a size: an integer number of bytes or a string such as \"64KiB\""))?;
    match raw {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => {
            let s = substitute_env(&s).map_err(de::Error::custom)?;
            s.trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|e| de::Error::custom(format!("`{s}` is not a size such as \"64KiB\" or \"1MiB\": {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "t.toml", Path::new("."))
    }

    const ROUTE: &str = "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:8000\"\n";

    #[test]
    fn defaults_match_the_contract() -> Result<(), ConfigError> {
        let c = parse(ROUTE)?;
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.server.workers, default_workers());
        assert_eq!(c.handoff.replay_bytes, 1024 * 1024);
        assert_eq!(c.limits.max_streams, 10_000);
        assert_eq!(c.limits.first_byte_timeout, Duration::from_secs(120));
        assert_eq!(c.routes[0].format, Format::Auto);
        Ok(())
    }

    #[test]
    fn sizes_and_durations_parse() -> Result<(), ConfigError> {
        let text = format!("[sse]\nkeepalive = \"250ms\"\n[limits]\nmax_body = \"64KiB\"\nmax_event_bytes = 100\nidle_timeout = \"2m\"\n{ROUTE}");
        let c = parse(&text)?;
        assert_eq!(c.sse.keepalive, Duration::from_millis(250));
        assert_eq!(c.limits.max_body, 65536);
        assert_eq!(c.limits.max_event_bytes, 100);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(120));
        Ok(())
    }

    #[test]
    fn env_substitution_and_missing_variable() -> Result<(), ConfigError> {
        std::env::set_var("SSEGATE_TEST_KEY", "sk-123");
        let text = format!("{ROUTE}[routes.headers]\nAuthorization = \"Bearer ${{SSEGATE_TEST_KEY}}\"\n");
        let c = parse(&text)?;
        assert_eq!(c.routes[0].headers["authorization"].0, "Bearer sk-123");
        assert_eq!(format!("{:?}", c.routes[0].headers["authorization"]), "MASKED");
        let text = format!("{ROUTE}[routes.headers]\nx = \"${{SSEGATE_TEST_MISSING_VAR}}\"\n");
        let err = parse(&text).unwrap_err();
        assert!(err.reason.contains("SSEGATE_TEST_MISSING_VAR is not set"), "{err}");
        assert_eq!(err.line, Some(5), "{err}");
        Ok(())
    }

    #[test]
    fn input_that_crashed_toml_edit_0_23_is_a_plain_error() {
        // Found by the `config` fuzz target: toml_edit 0.23 panicked on it.
        let raw = include_bytes!("../tests/fixtures/invalid/fuzz_crash_toml_edit.bin");
        let err = parse(&String::from_utf8_lossy(raw)).unwrap_err();
        assert_eq!(err.key, "(syntax)");
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn errors_name_key_and_line() {
        let err = parse(&format!("{ROUTE}[limits]\nmax_bodyy = 3\n")).unwrap_err();
        assert_eq!(err.key, "limits.max_bodyy");
        assert_eq!(err.line, Some(5));
        let err = parse("[[routes]]\nprefix = \"v1\"\nupstream = \"http://x\"\n").unwrap_err();
        assert_eq!((err.key.as_str(), err.line), ("routes[0].prefix", Some(2)));
        let err = parse(&format!("{ROUTE}[[routes]]\nprefix = \"/b\"\nupstream = \"ftp://x\"\n")).unwrap_err();
        assert_eq!((err.key.as_str(), err.line), ("routes[1].upstream", Some(6)));
        let err = parse(&format!("[server]\nworkers = 5000\n{ROUTE}")).unwrap_err();
        assert_eq!(err.key, "server.workers");
        let err = parse(&format!("[server]\nworkers = -1\n{ROUTE}")).unwrap_err();
        assert_eq!((err.key.as_str(), err.line), ("server.workers", Some(2)), "{err}");
    }
}
