//! Upstream host names, looked up once per `limits.dns_ttl` and shared by
//! both upstream clients.
//!
//! Without it every new upstream connection to a named host (`vllm:8000`,
//! `localhost`) cost a `getaddrinfo` on tokio's blocking pool: a thread
//! hand-off, `/etc/hosts` read again, maybe a DNS query. nginx resolves its
//! `proxy_pass` host once, at start. Here the addresses stay for `dns_ttl`,
//! and a streaming client's connect that failed on every one of them
//! (refused, unreachable, timed out: the upstream moved) drops them, so
//! that the next connection looks the name up again at once (hyper-util's
//! pooled client has no hook for that: it waits out the TTL). An IP address
//! is never looked up.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::dns::Name;
use prometheus_client::metrics::counter::Counter;

/// The cache of looked-up names.
pub struct Resolver {
    ttl: Duration,
    names: Mutex<HashMap<String, Found>>,
    /// `ssegate_dns_lookups_total`.
    lookups: Counter,
}

/// The addresses a lookup found, and when.
struct Found {
    ips: Arc<[IpAddr]>,
    at: Instant,
}

impl Resolver {
    /// Keeps what a lookup finds for `ttl` (zero looks up every time),
    /// counting lookups in `lookups`.
    pub fn new(ttl: Duration, lookups: Counter) -> Arc<Resolver> {
        Arc::new(Resolver { ttl, names: Mutex::new(HashMap::new()), lookups })
    }

    /// The addresses of `host` (without IPv6 brackets) with `port`: an IP
    /// address as it is, a name from the cache or from a lookup.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Addrs> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Addrs { ip: Some(ip), ips: None, port, next: 0 });
        }
        if let Some(ips) = self.cached(host) {
            return Ok(Addrs { ip: None, ips: Some(ips), port, next: 0 });
        }
        self.lookups.inc();
        let ips: Arc<[IpAddr]> = tokio::net::lookup_host((host, port)).await?.map(|a| a.ip()).collect();
        if ips.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the host has no address"));
        }
        if !self.ttl.is_zero() {
            let found = Found { ips: ips.clone(), at: Instant::now() };
            self.names.lock().unwrap_or_else(|e| e.into_inner()).insert(host.to_string(), found);
        }
        Ok(Addrs { ip: None, ips: Some(ips), port, next: 0 })
    }

    /// Drops what is known of `host`: none of its addresses took a connection.
    pub fn forget(&self, host: &str) {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).remove(host);
    }

    fn cached(&self, host: &str) -> Option<Arc<[IpAddr]>> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let found = names.get(host)?;
        if found.at.elapsed() < self.ttl {
            return Some(found.ips.clone());
        }
        names.remove(host);
        None
    }
}

/// The addresses to try, in the order the lookup gave them.
pub struct Addrs {
    /// An IP address given as the host (no allocation for it).
    ip: Option<IpAddr>,
    /// What a lookup found.
    ips: Option<Arc<[IpAddr]>>,
    port: u16,
    next: usize,
}

impl Iterator for Addrs {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        let ip = match (self.ip.take(), &self.ips) {
            (Some(ip), _) => ip,
            (None, Some(ips)) => *ips.get(self.next)?,
            (None, None) => return None,
        };
        self.next += 1;
        Some(SocketAddr::new(ip, self.port))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ip_address_is_not_looked_up_or_kept() -> io::Result<()> {
        let r = Resolver::new(Duration::from_secs(60), Counter::default());
        let addrs: Vec<SocketAddr> = r.lookup("::1", 8000).await?.collect();
        assert_eq!(addrs, vec!["[::1]:8000".parse::<SocketAddr>().map_err(io::Error::other)?]);
        assert!(r.names.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn a_name_is_kept_for_the_ttl_and_forgotten_on_request() -> io::Result<()> {
        let r = Resolver::new(Duration::from_secs(60), Counter::default());
        let first: Vec<SocketAddr> = r.lookup("localhost", 8000).await?.collect();
        assert!(!first.is_empty() && first.iter().all(|a| a.ip().is_loopback() && a.port() == 8000), "{first:?}");
        // Kept: a second lookup is served from the cache, with its own port.
        let ips = r.cached("localhost").ok_or_else(|| io::Error::other("localhost was not kept"))?;
        assert_eq!(ips.len(), first.len());
        let second: Vec<u16> = r.lookup("localhost", 9000).await?.map(|a| a.port()).collect();
        assert_eq!(second, vec![9000; first.len()]);
        r.forget("localhost");
        assert!(r.cached("localhost").is_none());
        Ok(())
    }

    #[tokio::test]
    async fn nothing_is_kept_with_a_zero_ttl_or_after_the_ttl() -> io::Result<()> {
        let r = Resolver::new(Duration::ZERO, Counter::default());
        r.lookup("localhost", 8000).await?;
        assert!(r.cached("localhost").is_none());
        // An entry older than the TTL is dropped when next asked for.
        let r = Resolver::new(Duration::from_secs(60), Counter::default());
        let old = Instant::now().checked_sub(Duration::from_secs(61)).ok_or_else(|| io::Error::other("clock"))?;
        let ips: Arc<[IpAddr]> = Arc::new([IpAddr::from([127, 0, 0, 2])]);
        r.names.lock().unwrap_or_else(|e| e.into_inner()).insert("stale.test".into(), Found { ips, at: old });
        assert!(r.cached("stale.test").is_none());
        assert!(r.names.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
        Ok(())
    }
}
