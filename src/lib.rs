//! ssegate: a reverse proxy that puts clean Server-Sent Events in front of
//! LLM inference servers.
//!
//! # Layout
//!
//! A request flows top to bottom:
//!
//! - `server`: accept loop, connection bound, header timeout, HTTP/1.1 + h2, drain
//! - `tls`: PEM files → rustls config (ALPN h2, http/1.1)
//! - `router`: request → route | 404 (`admin` serves the admin listener)
//! - `proxy`: direct mode: the upstream request, headers, X-Forwarded-*
//! - `upstream`: the pooled client, connect and first-byte timeouts
//! - `passthrough`: a response handed on chunk by chunk
//! - `decompress`: an upstream that compresses an event stream anyway
//! - `reframe`: byte-level decoders (sse, ndjson, text) and the `Reframer`
//! - `sse`: the SSE encoder and fixed frames
//! - `stream`: the event-stream body: keep-alive, end and error events
//! - `direct`: an HTTP/1.1 event stream's chunks written straight to the client socket
//! - `send_timeout`: a client that stops reading is dropped after `limits.send_timeout`
//! - `config`, `error`, `metrics`, `body`: the shared vocabulary
//! - `demo`: the built-in fake model upstream for `ssegate demo`

pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod cors;
pub mod decompress;
pub mod demo;
pub mod direct;
pub mod error;
pub mod h1;
pub mod handoff;
pub mod lean;
pub mod metrics;
#[cfg(unix)]
pub mod open_files;
pub mod passthrough;
pub mod proxy;
pub mod reframe;
pub mod resolve;
pub mod router;
pub mod send_timeout;
pub mod server;
pub mod sse;
pub mod store;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod wake;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use metrics::Metrics;
use router::Routes;
use server::Side;
use store::{MemoryStore, Store};
use upstream::Upstream;

/// How long streams get to write their `shutdown` event and close after the
/// drain deadline.
const FINAL_FLUSH: Duration = Duration::from_millis(800);

/// What every request handler shares.
pub struct App {
    pub config: Config,
    pub routes: Routes,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// Fires when `drain_timeout` has run out: open streams end with a
    /// `shutdown` error event.
    pub drain: CancellationToken,
    /// Whether the proxy accepts requests (false while draining).
    pub ready: Arc<AtomicBool>,
    /// The TLS acceptor for new connections, when `server.tls` is set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Handoff tokens and streams.
    pub store: Arc<dyn Store>,
    /// Event streams open now, against `limits.max_streams`.
    streams: Arc<AtomicUsize>,
    /// Verifies client JWTs when `[auth]` is set.
    pub auth: Option<Arc<auth::Authenticator>>,
    /// `sse.end_event` and `sse.error_event`, made once for every stream.
    pub event_names: stream::Names,
}

impl App {
    /// The next generation of the app for a reloaded config: new routes,
    /// limits, headers, CORS, auth and certificates; the same store,
    /// metrics, stream count and drain. Listener addresses and the store
    /// cannot change on reload: a warning says so and the old ones stay.
    pub fn reload(&self, mut config: Config) -> Result<App, StartError> {
        let old = &self.config;
        if config.server.listen != old.server.listen || config.server.admin_listen != old.server.admin_listen {
            tracing::warn!("reload: listener addresses cannot change on reload; restart to move them");
            config.server.listen = old.server.listen;
            config.server.admin_listen = old.server.admin_listen;
        }
        if config.limits.max_connections != old.limits.max_connections {
            tracing::warn!("reload: limits.max_connections cannot change on reload; restart to change it");
            config.limits.max_connections = old.limits.max_connections;
        }
        if config.handoff.store != old.handoff.store {
            tracing::warn!("reload: handoff.store cannot change on reload; restart to change it");
            config.handoff.store = old.handoff.store.clone();
        }
        config.demo = old.demo;
        let routes = Routes::new(&config.routes, &self.metrics).map_err(StartError::Routes)?;
        Ok(App {
            auth: authenticator(&config)?,
            tls: tls_acceptor(&config)?,
            routes,
            upstream: Upstream::new(&config.limits, &self.metrics),
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            streams: self.streams.clone(),
            drain: self.drain.clone(),
            ready: self.ready.clone(),
            event_names: stream::Names::of(&config),
            config,
        })
    }

    /// Authenticates a request when `[auth]` is on; returns the client's
    /// identity for `streams_per_client`: the JWT `sub`, else its address.
    pub fn authenticate(&self, headers: &http::HeaderMap, peer: std::net::SocketAddr) -> Result<String, error::Error> {
        match &self.auth {
            Some(auth) => {
                Ok(auth.verify(headers)?.sub.map_or_else(|| proxy::ip_text(peer.ip()), |s| format!("sub:{s}")))
            }
            None => Ok(proxy::ip_text(peer.ip())),
        }
    }

    /// Counts one more open stream for `client`, or refuses with 429 when it
    /// has `limits.streams_per_client` open already (0 = no limit), on every
    /// instance that shares the store.
    pub async fn client_slot(&self, client: &str) -> Result<Option<ClientSlot>, error::Error> {
        let max = self.config.limits.streams_per_client;
        if max == 0 {
            return Ok(None);
        }
        match self.store.client_acquire(client, max).await {
            Ok(true) => Ok(Some(ClientSlot { store: self.store.clone(), client: client.to_string() })),
            Ok(false) => Err(error::Error::TooManyForClient),
            Err(e) => Err(error::Error::StoreUnavailable(e.to_string())),
        }
    }

    /// Whether `client` may open another stream now (without counting it).
    pub async fn client_has_room(&self, client: &str) -> bool {
        let max = self.config.limits.streams_per_client;
        max == 0 || self.store.client_open(client).await < max
    }

    /// A `max_streams` slot, or None when all are taken.
    pub fn stream_slot(&self) -> Option<StreamSlot> {
        let max = self.config.limits.max_streams;
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| StreamSlot(self.streams.clone()))
    }
}

/// One open stream of a client; the count drops when this does.
pub struct ClientSlot {
    store: Arc<dyn Store>,
    client: String,
}

impl std::fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSlot").finish_non_exhaustive()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let client = std::mem::take(&mut self.client);
        if !self.store.shared() {
            // The memory store counts down in the call itself, at once.
            drop(self.store.client_release(client));
            return;
        }
        // The Redis store needs the runtime, gone only when the process exits.
        let store = self.store.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { store.client_release(client).await });
        }
    }
}

/// One counted event stream; the count drops when this does.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The bound sockets `run` serves; bound by the caller so that tests can use
/// port 0 and `main` can report an address in use.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses of a config.
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let bind = |addr: std::net::SocketAddr, key: &'static str| async move {
            listen(addr).map_err(|e| StartError::Bind { key, addr, reason: e.to_string() })
        };
        Ok(Listeners {
            public: bind(config.server.listen, "server.listen").await?,
            admin: bind(config.server.admin_listen, "server.admin_listen").await?,
        })
    }
}

/// Connections the kernel queues before they are accepted: 2,000 clients
/// that connect at once must not overflow it (a dropped SYN costs the
/// client a 1 s retransmit). The kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// A listener on `addr`, as `TcpListener::bind` makes one but with
/// [`BACKLOG`] instead of 1,024.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {reason}")]
    Bind { key: &'static str, addr: std::net::SocketAddr, reason: String },
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("routes: {0}")]
    Routes(String),
    #[error("handoff.store: {0}")]
    Store(String),
    #[error("{0}: {1}")]
    Auth(String, String),
    #[error("server.workers: cannot start the worker threads: {0}")]
    Workers(String),
}

/// Serves until `shutdown` completes, then drains: new connections stop,
/// open requests get `drain_timeout`, remaining streams end with a
/// `shutdown` error event.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reload(config, listeners, shutdown, reloads).await
}

fn authenticator(config: &Config) -> Result<Option<Arc<auth::Authenticator>>, StartError> {
    match &config.auth {
        Some(a) => auth::Authenticator::new(a).map(|a| Some(Arc::new(a))).map_err(|(k, r)| StartError::Auth(k, r)),
        None => Ok(None),
    }
}

fn tls_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, StartError> {
    Ok(match &config.server.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(t)?)),
        None => None,
    })
}

/// Like [`run`], and each config received on `reloads` (SIGHUP in `main`)
/// becomes the config of new requests and connections; open streams finish
/// under the config they started with. A config that cannot be used is
/// refused with one error line and the old one stays in force.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), StartError> {
    let tls = tls_acceptor(&config)?;
    let workers = server::Workers::start(config.server.workers).map_err(|e| StartError::Workers(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let store = open_store(&config, &metrics).await?;
    let routes = Routes::new(&config.routes, &metrics).map_err(StartError::Routes)?;
    let app = Arc::new(App {
        auth: authenticator(&config)?,
        tls,
        routes,
        upstream: Upstream::new(&config.limits, &metrics),
        metrics,
        store,
        streams: Arc::new(AtomicUsize::new(0)),
        drain: CancellationToken::new(),
        ready: Arc::new(AtomicBool::new(false)),
        event_names: stream::Names::of(&config),
        config,
    });
    let stop = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    tracing::info!(
        listen = %addr(&listeners.public),
        admin = %addr(&listeners.admin),
        tls = app.tls.is_some(),
        workers = workers.len(),
        "ssegate listening"
    );
    app.ready.store(true, Ordering::Release);
    let (current_tx, current) = tokio::sync::watch::channel(app.clone());
    let workers = &workers;
    let public =
        server::accept_loop(listeners.public, Side::Public, current.clone(), stop.clone(), &tracker, Some(workers));
    // Health checks and metrics stay on this runtime: a busy worker does
    // not delay them.
    let admin = server::accept_loop(listeners.admin, Side::Admin, current, stop.clone(), &tracker, None);
    let reloader = async {
        loop {
            tokio::select! {
                next = reloads.recv() => {
                    let Some(next) = next else { return };
                    let reloaded = current_tx.borrow().reload(next);
                    match reloaded {
                        Ok(new) => {
                            current_tx.send_replace(Arc::new(new));
                            tracing::info!("config reloaded: new requests use it, open streams finish under the old one");
                        }
                        Err(e) => tracing::error!("reload refused, the old config stays in force: {e}"),
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    };
    let signalled = async {
        shutdown.await;
        tracing::info!(drain_timeout = ?app.config.server.drain_timeout, "shutting down: draining open requests");
        app.ready.store(false, Ordering::Release);
        stop.cancel();
    };
    tokio::join!(public, admin, signalled, reloader);
    tracker.close();
    let drained = tracker.wait();
    tokio::pin!(drained);
    if tokio::time::timeout(app.config.server.drain_timeout, &mut drained).await.is_err() {
        tracing::info!("drain timeout reached: ending open streams");
        app.drain.cancel();
        if tokio::time::timeout(FINAL_FLUSH, &mut drained).await.is_err() {
            tracing::warn!("some connections did not close in time");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The handoff store `handoff.store` names.
async fn open_store(config: &Config, metrics: &Arc<Metrics>) -> Result<Arc<dyn Store>, StartError> {
    let h = &config.handoff;
    if h.store == "memory" {
        let memory =
            Arc::new(MemoryStore::new(h.ttl, config.limits.max_tokens, h.replay_bytes as usize, metrics.clone()));
        memory.spawn_purge();
        return Ok(memory);
    }
    let opts = store::redis::RedisOptions {
        ttl: h.ttl,
        max_tokens: config.limits.max_tokens,
        replay_bytes: h.replay_bytes as usize,
        resume_grace: h.resume_grace,
        error_event: config.sse.error_event.clone(),
    };
    // A Redis that is down at start is not fatal: the proxy starts, /readyz
    // says 503, and requests work once Redis answers.
    let redis = store::redis::RedisStore::connect(&h.store, opts, metrics.clone())
        .await
        .map_err(|e| StartError::Store(format!("{}: {e}", h.store)))?;
    Ok(redis)
}

fn addr(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into())
}
