//! Where handoff tokens and streams live: the [`Store`] trait (in memory
//! here; Redis shares them between instances) and the per-stream replay
//! [`log::StreamLog`] that clients read from.

pub mod log;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method};

pub use log::StreamLog;
pub use memory::MemoryStore;

/// A boxed future, so that the store can be a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A request stored by a handoff POST, as direct mode would forward it
/// (the route's headers are added when it is sent, so that upstream
/// credentials are never stored).
#[derive(Debug, Clone)]
pub struct StoredRequest {
    /// The prefix of the route it matched.
    pub route: String,
    pub method: Method,
    /// Path and query as the client sent them after the handoff prefix.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Who posted it, for `limits.streams_per_client`.
    pub client: String,
}

/// What a stream GET finds under a token.
pub enum Redeem {
    /// The first GET: this caller must send the request upstream, once.
    First(Box<StoredRequest>, Arc<StreamLog>),
    /// The stream already runs (or ended within `resume_grace`).
    Existing(Arc<StreamLog>),
    /// Unknown, expired or forgotten.
    Unknown,
    /// An unused token, left unused because the caller may not start a
    /// stream now (`limits.max_streams`).
    NoRoom,
}

/// Why the store refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("too many unused tokens (limits.max_tokens)")]
    TokensFull,
    #[error("too many streams (limits.max_streams)")]
    StreamsFull,
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Tokens and streams, shared by every request of an instance.
pub trait Store: Send + Sync {
    /// Stores a request under a new token for `handoff.ttl`.
    fn issue(&self, token: String, req: StoredRequest) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Claims a token for its first GET (atomically: one caller ever gets
    /// `First`), or finds its stream. With `may_start` false an unused token
    /// is left alone and `NoRoom` returned.
    fn redeem<'a>(&'a self, token: &'a str, may_start: bool) -> BoxFuture<'a, Result<Redeem, StoreError>>;
    /// The user's Stop: cancels a running stream, or drops an unused token.
    /// False when the token is unknown.
    fn stop<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Ends the connections of a stream's clients, so that they reconnect
    /// (the demo's "drop connection"). False when there is no such stream.
    fn drop_clients<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Forgets a stream whose grace has run out.
    fn forget<'a>(&'a self, token: &'a str, log: &'a Arc<StreamLog>) -> BoxFuture<'a, ()>;
    /// A client attached to the stream on this instance.
    fn client_attached<'a>(&'a self, token: &'a str) -> BoxFuture<'a, ()>;
    /// A client of this instance left the stream.
    fn client_detached<'a>(&'a self, token: &'a str) -> BoxFuture<'a, ()>;
    /// Whether a client is attached on another instance (so the grace
    /// period has not begun).
    fn clients_elsewhere<'a>(&'a self, token: &'a str) -> BoxFuture<'a, bool>;
    /// Counts one more open stream for `client` unless it has `max` open
    /// already (on every instance sharing the store); false when refused.
    fn client_acquire<'a>(&'a self, client: &'a str, max: usize) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Counts one stream of `client` less. A store that is not `shared`
    /// does it in the call itself, so the future need not be run.
    fn client_release(&self, client: String) -> BoxFuture<'_, ()>;
    /// Whether the store is shared with other instances (and its futures
    /// must run to do their work).
    fn shared(&self) -> bool {
        false
    }
    /// Open streams of `client`.
    fn client_open<'a>(&'a self, client: &'a str) -> BoxFuture<'a, usize>;
    /// Whether the store answers (for `/readyz`).
    fn ready(&self) -> BoxFuture<'_, bool>;
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
