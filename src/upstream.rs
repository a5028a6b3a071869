//! The pooled upstream client (hyper-util + hyper-rustls, HTTP/1.1) and the
//! mapping of its failures to [`Error`].

use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::{caused_by, BodyTooLarge, RequestBody};
use crate::error::Error;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A pooled client shared by every route.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, RequestBody>,
    first_byte_timeout: Duration,
}

impl Upstream {
    /// Builds the client with the connect timeout and TLS roots.
    pub fn new(connect_timeout: Duration, first_byte_timeout: Duration) -> Upstream {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let https = match tls {
            Ok(tls) => builder.with_tls_config(tls),
            // The ring provider supports the default versions; this is unreachable in practice.
            Err(_) => builder.with_webpki_roots(),
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(https);
        Upstream { client, first_byte_timeout }
    }

    /// Sends a request and waits for its response head, at most
    /// `first_byte_timeout`. Returns the head and how long it took.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        max_body: u64,
    ) -> Result<(Response<Incoming>, Duration), Error> {
        let started = Instant::now();
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok((resp, started.elapsed())),
            Ok(Err(e)) if caused_by::<BodyTooLarge>(&e) => Err(Error::PayloadTooLarge(max_body)),
            Ok(Err(e)) => Err(Error::UpstreamUnavailable(describe(&e))),
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
