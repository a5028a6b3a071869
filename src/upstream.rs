//! The upstream clients and the mapping of their failures to [`Error`]:
//! event streams go through [`crate::h1`], everything else through the
//! pooled hyper-util client (with hyper-rustls), both HTTP/1.1.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::{caused_by, BodyTooLarge, BoxError, RequestBody};
use crate::config::LimitsConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::resolve::{Forgetting, Lookup, Resolver};

type Connector = hyper_rustls::HttpsConnector<Forgetting>;

/// A pooled client shared by every route.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, RequestBody>,
    stream: crate::h1::Client,
    first_byte_timeout: Duration,
}

/// An upstream response body, from either client.
pub enum UpstreamBody {
    Pooled(Incoming),
    Stream(crate::h1::Body),
}

impl UpstreamBody {
    /// Lets go of an empty read buffer (a quiet stream's), where there is one.
    pub fn trim(&mut self) {
        if let UpstreamBody::Stream(b) = self {
            b.trim();
        }
    }

    /// The next piece of data (trailers skipped), with no frame to pass
    /// along: an event stream's reader takes one per upstream read.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        match self {
            UpstreamBody::Stream(b) => b.poll_data(cx).map_err(Into::into),
            UpstreamBody::Pooled(b) => loop {
                match ready!(Pin::new(&mut *b).poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => return Poll::Ready(Some(Ok(data))),
                        Err(_) => continue,
                    },
                    Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    None => return Poll::Ready(None),
                }
            },
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Stream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Pooled(b) => b.is_end_stream(),
            UpstreamBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Pooled(b) => b.size_hint(),
            UpstreamBody::Stream(b) => b.size_hint(),
        }
    }
}

impl Upstream {
    /// Builds both clients with the limits' timeouts and DNS TTL, and the
    /// TLS roots.
    pub fn new(limits: &LimitsConfig, metrics: &Metrics) -> Upstream {
        let (connect_timeout, first_byte_timeout) = (limits.connect_timeout, limits.first_byte_timeout);
        let resolver = Resolver::new(limits.dns_ttl, metrics.dns_lookups.clone());
        let mut http = HttpConnector::new_with_resolver(Lookup(resolver.clone()));
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let mut stream_tls = match &tls {
            Ok(tls) => tls.clone(),
            Err(_) => rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::from_iter(
                    webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
                ))
                .with_no_client_auth(),
        };
        stream_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let stream = crate::h1::Client::new(std::sync::Arc::new(stream_tls), connect_timeout, resolver.clone());
        let https = match tls {
            Ok(tls) => builder.with_tls_config(tls),
            // The ring provider supports the default versions; this is unreachable in practice.
            Err(_) => builder.with_webpki_roots(),
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector(Forgetting { inner: http, resolver });
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(https);
        Upstream { client, stream, first_byte_timeout }
    }

    /// Sends a request and waits for its response head, at most
    /// `first_byte_timeout`. Returns the head and how long it took.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        max_body: u64,
    ) -> Result<(Response<UpstreamBody>, Duration), Error> {
        let started = Instant::now();
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok((resp.map(UpstreamBody::Pooled), started.elapsed())),
            Ok(Err(e)) if caused_by::<BodyTooLarge>(&e) => Err(Error::PayloadTooLarge(max_body)),
            Ok(Err(e)) => Err(Error::UpstreamUnavailable(describe(&e))),
            Err(_) => Err(Error::UpstreamTimeout(self.first_byte_timeout)),
        }
    }
}

impl Upstream {
    /// Sends a request whose answer is expected to be an event stream through
    /// the streaming client; like [`send`](Upstream::send) otherwise.
    pub async fn send_stream(&self, req: Request<Bytes>) -> Result<(Response<UpstreamBody>, Duration), Error> {
        let started = Instant::now();
        match tokio::time::timeout(self.first_byte_timeout, self.stream.send(req)).await {
            Ok(Ok(resp)) => Ok((resp.map(UpstreamBody::Stream), started.elapsed())),
            Ok(Err(e)) => Err(Error::UpstreamUnavailable(e.to_string())),
            Err(_) => Err(Error::UpstreamTimeout(self.first_byte_timeout)),
        }
    }
}

/// The innermost useful message of an error chain, for the JSON body.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        msg = format!("{msg}: {e}");
        cur = e.source();
    }
    msg
}
