//! Upstream host names, looked up once per `limits.dns_ttl` and shared by
//! both upstream clients.
//!
//! Without it every new upstream connection to a named host (`vllm:8000`,
//! `localhost`) cost a `getaddrinfo` on tokio's blocking pool: a thread
//! hand-off, `/etc/hosts` read again, maybe a DNS query. nginx resolves its
//! `proxy_pass` host once, at start. Here the addresses stay for `dns_ttl`,
//! new connections take them in turn (nginx too spreads its connections
//! over a name's addresses), and a streaming client's connect that failed
//! on every one of them (refused, unreachable, timed out: the upstream
//! moved) drops them, so that the next connection looks the name up again
//! at once; so does a failed connect of hyper-util's pooled client
//! ([`Forgetting`]). An IP address is never looked up. Connections that start
//! while a name is not known each look it up (no single flight).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::metrics::counter::Counter;

/// The cache of looked-up names.
pub struct Resolver {
    ttl: Duration,
    names: Mutex<HashMap<String, Found>>,
    /// `ssegate_dns_lookups_total`.
    lookups: Counter,
}

/// The addresses a lookup found (their ports unused), when, and where the
/// next connection starts in them.
struct Found {
    addrs: Arc<[SocketAddr]>,
    at: Instant,
    turn: usize,
}

impl Resolver {
    /// Keeps what a lookup finds for `ttl` (zero looks up every time),
    /// counting lookups in `lookups`.
    pub fn new(ttl: Duration, lookups: Counter) -> Arc<Resolver> {
        Arc::new(Resolver { ttl, names: Mutex::new(HashMap::new()), lookups })
    }

    /// The addresses of `host` (without IPv6 brackets) with `port`: an IP
    /// address as it is, a name from the cache or from a lookup. New
    /// connections to a cached name start at its addresses in turn, as
    /// nginx spreads them over a name's addresses: a name for several
    /// replicas does not send them all to the first one.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Addrs> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Addrs { one: Some(SocketAddr::new(ip, port)), found: None, start: 0, taken: 0, port });
        }
        if let Some((found, start)) = self.cached(host) {
            return Ok(Addrs { one: None, found: Some(found), start, taken: 0, port });
        }
        self.lookups.inc();
        let addrs: Arc<[SocketAddr]> = tokio::net::lookup_host((host, port)).await?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the host has no address"));
        }
        if !self.ttl.is_zero() {
            let found = Found { addrs: addrs.clone(), at: Instant::now(), turn: 1 };
            self.names.lock().unwrap_or_else(|e| e.into_inner()).insert(host.to_string(), found);
        }
        Ok(Addrs { one: None, found: Some(addrs), start: 0, taken: 0, port })
    }

    /// Drops what is known of `host` when `tried` came from it: none of
    /// those addresses took a connection. A newer lookup's stays, and an IP
    /// address has nothing to drop.
    pub fn forget(&self, host: &str, tried: &Source) {
        let Some(tried) = &tried.0 else { return };
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.get(host).is_some_and(|f| Arc::ptr_eq(&f.addrs, tried)) {
            names.remove(host);
        }
    }

    /// Drops whatever is known of `host`: for a client that cannot tell
    /// which lookup its addresses came from.
    fn forget_name(&self, host: &str) {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).remove(host);
    }

    /// A fresh entry's addresses and where this connection starts in them.
    fn cached(&self, host: &str) -> Option<(Arc<[SocketAddr]>, usize)> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let found = names.get_mut(host)?;
        if found.at.elapsed() < self.ttl {
            let start = found.turn;
            found.turn = found.turn.wrapping_add(1);
            return Some((found.addrs.clone(), start));
        }
        names.remove(host);
        None
    }
}

/// The addresses to try: each of a name's once, from where its turn
/// starts, with the port asked for.
pub struct Addrs {
    /// An IP address given as the host (no allocation for it).
    one: Option<SocketAddr>,
    found: Option<Arc<[SocketAddr]>>,
    start: usize,
    taken: usize,
    port: u16,
}

/// Which lookup some [`Addrs`] came from (none for an IP address).
#[derive(Default)]
pub struct Source(Option<Arc<[SocketAddr]>>);

impl Addrs {
    pub fn source(&self) -> Source {
        Source(self.found.clone())
    }
}

impl Iterator for Addrs {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        if let Some(one) = self.one.take() {
            return Some(one);
        }
        let found = self.found.as_ref()?;
        if self.taken >= found.len() {
            return None;
        }
        let mut addr = found[self.start.wrapping_add(self.taken) % found.len()];
        self.taken += 1;
        // A link-local IPv6 address keeps its scope; only the port changes.
        addr.set_port(self.port);
        Some(addr)
    }
}

/// The resolver as hyper-util's pooled client asks for names (its
/// connector then sets the port).
#[derive(Clone)]
pub struct Lookup(pub Arc<Resolver>);

impl tower_service::Service<Name> for Lookup {
    type Response = Addrs;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Addrs>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolver = self.0.clone();
        Box::pin(async move { resolver.lookup(name.as_str(), 0).await })
    }
}

/// hyper-util's connector, which drops what is known of a name when no
/// address of it took the connection, as the streaming client does.
#[derive(Clone)]
pub struct Forgetting {
    pub inner: HttpConnector<Lookup>,
    pub resolver: Arc<Resolver>,
}

/// The connector's own types (its error type is not exported by name).
type Inner = HttpConnector<Lookup>;
type Connecting = <Inner as tower_service::Service<Uri>>::Future;
type Connected = <Inner as tower_service::Service<Uri>>::Response;
type ConnectError = <Inner as tower_service::Service<Uri>>::Error;

impl tower_service::Service<Uri> for Forgetting {
    type Response = Connected;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // A name, not an IP address, is what there is to forget.
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .filter(|h| h.parse::<IpAddr>().is_err())
            .map(str::to_string);
        let connecting: Connecting = self.inner.call(uri);
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let result = connecting.await;
            if let (Err(_), Some(host)) = (&result, host) {
                resolver.forget_name(&host);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> io::Result<SocketAddr> {
        text.parse().map_err(io::Error::other)
    }

    fn kept(r: &Resolver) -> usize {
        r.names.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[tokio::test]
    async fn an_ip_address_is_not_looked_up_or_kept() -> io::Result<()> {
        let r = Resolver::new(Duration::from_secs(60), Counter::default());
        let addrs: Vec<SocketAddr> = r.lookup("::1", 8000).await?.collect();
        assert_eq!(addrs, vec![addr("[::1]:8000")?]);
        assert_eq!((kept(&r), r.lookups.get()), (0, 0));
        Ok(())
    }

    #[tokio::test]
    async fn a_name_is_kept_for_the_ttl_and_forgotten_when_its_addresses_failed() -> io::Result<()> {
        let r = Resolver::new(Duration::from_secs(60), Counter::default());
        let first = r.lookup("localhost", 8000).await?;
        let source = first.source();
        let first: Vec<SocketAddr> = first.collect();
        assert!(!first.is_empty() && first.iter().all(|a| a.ip().is_loopback() && a.port() == 8000), "{first:?}");
        assert_eq!(r.lookups.get(), 1);
        // From the cache, with this call's port: the same addresses.
        let mut second: Vec<SocketAddr> = r.lookup("localhost", 9000).await?.collect();
        assert_eq!(r.lookups.get(), 1);
        assert!(second.iter().all(|a| a.port() == 9000), "{second:?}");
        second.iter_mut().for_each(|a| a.set_port(8000));
        second.sort();
        let mut first = first;
        first.sort();
        assert_eq!(second, first);
        // Another lookup's failure leaves this one alone; its own drops it.
        r.forget("localhost", &Source(Some(Arc::from(vec![addr("127.0.0.9:1")?]))));
        assert_eq!(kept(&r), 1);
        r.forget("localhost", &source);
        assert_eq!(kept(&r), 0);
        r.lookup("localhost", 8000).await?;
        assert_eq!(r.lookups.get(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn new_connections_take_a_names_addresses_in_turn() -> io::Result<()> {
        let r = Resolver::new(Duration::from_secs(60), Counter::default());
        let three: Arc<[SocketAddr]> = Arc::from(vec![addr("10.0.0.1:0")?, addr("10.0.0.2:0")?, addr("10.0.0.3:0")?]);
        let found = Found { addrs: three, at: Instant::now(), turn: 0 };
        r.names.lock().unwrap_or_else(|e| e.into_inner()).insert("replicas.test".into(), found);
        let mut firsts = Vec::new();
        for _ in 0..4 {
            let all: Vec<SocketAddr> = r.lookup("replicas.test", 80).await?.collect();
            assert_eq!(all.len(), 3, "{all:?}");
            firsts.push(all[0]);
        }
        let want = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.1:80"];
        assert_eq!(firsts, want.iter().map(|a| addr(a)).collect::<io::Result<Vec<_>>>()?);
        assert_eq!(r.lookups.get(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn nothing_is_kept_with_a_zero_ttl_or_after_the_ttl() -> io::Result<()> {
        let r = Resolver::new(Duration::ZERO, Counter::default());
        r.lookup("localhost", 8000).await?;
        r.lookup("localhost", 8000).await?;
        assert_eq!((kept(&r), r.lookups.get()), (0, 2));
        // An entry older than the TTL is dropped when next asked for.
        let r = Resolver::new(Duration::from_millis(1), Counter::default());
        let addrs: Arc<[SocketAddr]> = Arc::from(vec![addr("127.0.0.2:0")?]);
        let found = Found { addrs, at: Instant::now(), turn: 0 };
        r.names.lock().unwrap_or_else(|e| e.into_inner()).insert("stale.test".into(), found);
        // Waiting for the TTL itself to pass.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(r.cached("stale.test").is_none());
        assert_eq!(kept(&r), 0);
        Ok(())
    }
}
