//! The in-memory store: tokens with a TTL purge task, streams in a map.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{BoxFuture, Redeem, Store, StoreError, StoredRequest, StreamLog};
use crate::metrics::Metrics;

/// Tokens and streams of one instance.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_tokens: usize,
    replay_bytes: usize,
    metrics: Arc<Metrics>,
    /// Open streams per client, for `limits.streams_per_client`.
    clients: Mutex<HashMap<String, usize>>,
}

struct Inner {
    tokens: HashMap<String, (Instant, StoredRequest)>,
    /// Tokens in the order they expire (all share one TTL), so the purge
    /// task looks only at the expired ones.
    expiry: VecDeque<(Instant, String)>,
    streams: HashMap<String, Arc<StreamLog>>,
}

impl MemoryStore {
    /// An empty store; call [`MemoryStore::spawn_purge`] to expire tokens.
    pub fn new(ttl: Duration, max_tokens: usize, replay_bytes: usize, metrics: Arc<Metrics>) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner { tokens: HashMap::new(), expiry: VecDeque::new(), streams: HashMap::new() }),
            ttl,
            max_tokens,
            replay_bytes,
            metrics,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the task that drops expired tokens; it ends with the store.
    pub fn spawn_purge(self: &Arc<Self>) {
        let weak: Weak<MemoryStore> = Arc::downgrade(self);
        let period = (self.ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                store.purge(Instant::now());
            }
        });
    }

    /// Drops tokens whose TTL has passed.
    pub fn purge(&self, now: Instant) {
        let mut expired = 0;
        {
            let mut inner = self.lock();
            while inner.expiry.front().is_some_and(|(at, _)| *at <= now) {
                let Some((_, token)) = inner.expiry.pop_front() else { break };
                // A redeemed token is gone from `tokens` already.
                if inner.tokens.remove(&token).is_some() {
                    expired += 1;
                }
            }
        }
        self.metrics.tokens_expired.inc_by(expired);
    }

    /// Unused tokens held now.
    pub fn token_count(&self) -> usize {
        self.lock().tokens.len()
    }

    /// Streams held now.
    pub fn stream_count(&self) -> usize {
        self.lock().streams.len()
    }
}

impl Store for MemoryStore {
    fn issue(&self, token: String, req: StoredRequest) -> BoxFuture<'_, Result<(), StoreError>> {
        let result = {
            let mut inner = self.lock();
            if inner.tokens.len() >= self.max_tokens {
                Err(StoreError::TokensFull)
            } else {
                let expires = Instant::now() + self.ttl;
                inner.expiry.push_back((expires, token.clone()));
                inner.tokens.insert(token, (expires, req));
                Ok(())
            }
        };
        Box::pin(async move { result })
    }

    fn redeem<'a>(&'a self, token: &'a str, may_start: bool) -> BoxFuture<'a, Result<Redeem, StoreError>> {
        let result = {
            let mut inner = self.lock();
            if let Some(log) = inner.streams.get(token) {
                Redeem::Existing(log.clone())
            } else if !may_start {
                if inner.tokens.contains_key(token) {
                    Redeem::NoRoom
                } else {
                    Redeem::Unknown
                }
            } else {
                match inner.tokens.remove(token) {
                    Some((expires, req)) if expires > Instant::now() => {
                        let log = Arc::new(StreamLog::new(self.replay_bytes));
                        inner.streams.insert(token.to_string(), log.clone());
                        Redeem::First(Box::new(req), log)
                    }
                    _ => Redeem::Unknown,
                }
            }
        };
        Box::pin(async move { Ok(result) })
    }

    fn stop<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let found = {
            let mut inner = self.lock();
            if let Some(log) = inner.streams.get(token) {
                if !log.ended() && !log.cancel.is_cancelled() {
                    log.stopped_by_user.store(true, std::sync::atomic::Ordering::Release);
                    log.cancel.cancel();
                }
                true
            } else {
                inner.tokens.remove(token).is_some()
            }
        };
        Box::pin(async move { Ok(found) })
    }

    fn drop_clients<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let log = self.lock().streams.get(token).cloned();
        if let Some(log) = &log {
            log.kick();
        }
        Box::pin(async move { Ok(log.is_some()) })
    }

    fn forget<'a>(&'a self, token: &'a str, log: &'a Arc<StreamLog>) -> BoxFuture<'a, ()> {
        {
            let mut inner = self.lock();
            if inner.streams.get(token).is_some_and(|l| Arc::ptr_eq(l, log)) {
                inner.streams.remove(token);
            }
        }
        Box::pin(async {})
    }

    fn client_attached<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn client_detached<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn clients_elsewhere<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }

    fn client_acquire<'a>(&'a self, client: &'a str, max: usize) -> BoxFuture<'a, Result<bool, StoreError>> {
        let granted = {
            let mut counts = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(client.to_string()).or_insert(0);
            (*n < max).then(|| *n += 1).is_some()
        };
        Box::pin(async move { Ok(granted) })
    }

    fn client_release(&self, client: String) -> BoxFuture<'_, ()> {
        // Done here, not in the future, so that dropping it is enough.
        let mut counts = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&client);
            }
        }
        Box::pin(async {})
    }

    fn client_open<'a>(&'a self, client: &'a str) -> BoxFuture<'a, usize> {
        let n = self.clients.lock().unwrap_or_else(|e| e.into_inner()).get(client).copied().unwrap_or(0);
        Box::pin(async move { n })
    }

    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> StoredRequest {
        StoredRequest {
            route: "/v1".into(),
            method: http::Method::POST,
            path_and_query: "/v1/x".into(),
            headers: Default::default(),
            body: Default::default(),
            client: String::new(),
        }
    }

    #[tokio::test]
    async fn one_first_redeem_ever_and_expiry() -> Result<(), StoreError> {
        let metrics = Arc::new(Metrics::new());
        let store = MemoryStore::new(Duration::from_secs(30), 2, 1024, metrics.clone());
        store.issue("a".into(), req()).await?;
        store.issue("b".into(), req()).await?;
        assert!(matches!(store.issue("c".into(), req()).await, Err(StoreError::TokensFull)));
        assert!(matches!(store.redeem("a", true).await?, Redeem::First(..)));
        assert!(matches!(store.redeem("a", true).await?, Redeem::Existing(..)));
        store.purge(Instant::now() + Duration::from_secs(31));
        assert!(matches!(store.redeem("b", true).await?, Redeem::Unknown));
        assert_eq!(metrics.tokens_expired.get(), 1);
        assert!(matches!(store.redeem("nope", true).await?, Redeem::Unknown));
        Ok(())
    }
}
