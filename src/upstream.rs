//! The upstream HTTPS client: rustls with verified certificates, a direct HTTP/2 lane when ALPN
//! agrees on h2 (`lane`), a worker's own HTTP/1.1 connections otherwise and for a worker's
//! single client connection (`direct`), hyper-util's pooled client for streamed bodies, a
//! timeout per phase, and errors that name the phase.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::body::ProxyBody;
use crate::error::{GatewayError, Phase};
use crate::secret::print;

mod direct;
mod lane;

/// `[upstream]`: where requests go and how long each phase may take.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UpstreamConfig {
    /// `https://host[:port]`, no path.
    #[serde(serialize_with = "print::uri")]
    pub url: http::Uri,
    #[serde(
        serialize_with = "print::opt_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_file: Option<std::path::PathBuf>,
    /// Extra trusted roots: `ca_file`'s certificates (tests and the demo add their own).
    #[serde(skip)]
    pub extra_roots: Vec<CertificateDer<'static>>,
    #[serde(serialize_with = "print::duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "print::duration")]
    pub tls_timeout: Duration,
    #[serde(serialize_with = "print::duration")]
    pub request_timeout: Duration,
    /// Longest silence while the upstream streams a response body.
    #[serde(serialize_with = "print::duration")]
    pub body_timeout: Duration,
    /// Offer HTTP/2 in ALPN (used when the upstream accepts it); HTTP/1.1 keep-alive otherwise.
    pub http2: bool,
    /// With `http2`: while a worker serves a single HTTP/1.x client connection, which sends one
    /// request at a time, its requests go over HTTP/1.1 keep-alive, which costs both ends less
    /// per request than an HTTP/2 stream when there is nothing to multiplex.
    pub http1_for_single_client: bool,
    #[serde(serialize_with = "print::duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

pub use lane::H2Body;

/// An upstream response body: from hyper-util's pooled client or the worker's HTTP/1.1
/// connection (left) or from the direct HTTP/2 lane (right).
pub type UpstreamBody = http_body_util::Either<hyper::body::Incoming, H2Body>;
use lane::{Lane, Sent};

type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
/// A TLS connection to the upstream as the connector makes it.
type TlsIo = tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>;

/// Why a connection could not be made, carried through hyper-util's error to [`classify`].
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{phase} timed out", phase = .0.as_str())]
    Timeout(Phase, Duration),
    #[error("{phase}: {1}", phase = .0.as_str())]
    Failed(Phase, #[source] std::io::Error),
    #[error("upstream URL has no host")]
    NoHost,
}

/// TCP connect then TLS handshake, each under its own timeout, so an error says which phase
/// failed (tokio-rustls' client example does the same).
#[derive(Clone)]
pub struct UpstreamConnector {
    tcp: HttpConnector,
    tls: TlsConnector,
    connect_timeout: Duration,
    tls_timeout: Duration,
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = Stream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tls = this.tls(uri).await?;
            Ok(MaybeHttpsStream::Https(TokioIo::new(tls)))
        })
    }
}

impl UpstreamConnector {
    async fn tls(&self, uri: Uri) -> Result<TlsIo, ConnectError> {
        use tower_service::Service as _;
        let host = uri.host().ok_or(ConnectError::NoHost)?;
        // IPv6 literals come bracketed in URIs; ServerName wants them bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host)
            .map_err(|e| ConnectError::Failed(Phase::TlsHandshake, std::io::Error::other(e)))?;
        let mut tcp = self.tcp.clone();
        let tcp = tokio::time::timeout(self.connect_timeout, tcp.call(uri))
            .await
            .map_err(|_| ConnectError::Timeout(Phase::Connect, self.connect_timeout))?
            .map_err(|e| ConnectError::Failed(Phase::Connect, std::io::Error::other(e)))?;
        tokio::time::timeout(
            self.tls_timeout,
            self.tls.connect(server_name, TokioIo::new(tcp)),
        )
        .await
        .map_err(|_| ConnectError::Timeout(Phase::TlsHandshake, self.tls_timeout))?
        .map_err(|e| ConnectError::Failed(Phase::TlsHandshake, e))
    }
}

/// The pooled client for the one configured upstream. A clone shares the pools.
#[derive(Clone)]
pub struct Upstream {
    client: Client<UpstreamConnector, ProxyBody>,
    /// The direct HTTP/2 lane, when `upstream.http2` offers HTTP/2.
    lane: Option<Arc<Lane>>,
    /// The worker's HTTP/1.1 connections (its connector offers nothing else in ALPN), for
    /// buffered requests when the upstream speaks HTTP/1.1 only, and for a single client
    /// connection (`upstream.http1_for_single_client`): see [`Upstream::send_buffered`].
    direct: Arc<direct::Direct>,
    /// Client connections served with this pool (a worker's), counted by [`ClientConnection`].
    clients: Arc<AtomicUsize>,
    endpoint: Endpoint,
}

/// Where the upstream is and how to reach it: what every worker's pools are built from.
#[derive(Clone)]
struct Endpoint {
    connector: UpstreamConnector,
    /// Offers only HTTP/1.1 in ALPN: for `Upstream::direct`.
    connector_h1: UpstreamConnector,
    /// `upstream.http1_for_single_client` (with `upstream.http2`).
    http1_for_single_client: bool,
    pool: PoolSettings,
    scheme: Scheme,
    authority: Option<Authority>,
    request_timeout: Duration,
}

impl Endpoint {
    /// New, empty pools (and lanes) to this endpoint.
    fn pools(self) -> Upstream {
        let target = self.target();
        let pool = self.pool;
        Upstream {
            client: pool.client(self.connector.clone()),
            lane: pool.lane(&self.connector, &target),
            direct: Arc::new(direct::Direct::new(
                self.connector_h1.clone(),
                target,
                pool.idle_timeout,
                pool.max_idle_per_host,
            )),
            clients: Arc::default(),
            endpoint: self,
        }
    }

    /// `path_and_query` on the upstream, built from parts already parsed.
    fn uri(&self, path_and_query: PathAndQuery) -> Result<Uri, http::uri::InvalidUriParts> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = self.authority.clone();
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts)
    }

    /// Scheme and authority of the upstream.
    fn target(&self) -> Uri {
        self.uri(PathAndQuery::from_static("/")).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamBuildError {
    #[error("upstream TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The rustls client configuration: webpki roots plus the extra roots, ALPN h2 and http/1.1.
pub fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<ClientConfig, rustls::Error> {
    tls_config_with(extra_roots, true)
}

/// As [`tls_config`], offering HTTP/2 in ALPN only when `http2`.
pub fn tls_config_with(
    extra_roots: &[CertificateDer<'static>],
    http2: bool,
) -> Result<ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// Pool settings, kept to build a fresh pool per worker.
#[derive(Clone, Copy)]
struct PoolSettings {
    idle_timeout: Duration,
    max_idle_per_host: usize,
    http2: bool,
}

/// A client connection being served with a pool; counted while it lives.
pub struct ClientConnection(Arc<AtomicUsize>);

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PoolSettings {
    fn client(self, connector: UpstreamConnector) -> Client<UpstreamConnector, ProxyBody> {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(self.max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // A response body the client stopped reading once it had Content-Length bytes
            // cancels its stream; h2 counts those as local resets and by default closes the
            // connection (GOAWAY) after 1024 of them, failing every request in flight on it.
            // The upstream is ours to trust, so no cap.
            .http2_max_local_error_reset_streams(None)
            .build(connector)
    }

    fn lane(self, connector: &UpstreamConnector, target: &Uri) -> Option<Arc<Lane>> {
        self.http2.then(|| {
            Arc::new(Lane::new(
                connector.clone(),
                target.clone(),
                self.idle_timeout,
            ))
        })
    }
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, UpstreamBuildError> {
        let tls = tls_config_with(&cfg.extra_roots, cfg.http2)?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        let connector = UpstreamConnector {
            tcp,
            tls: TlsConnector::from(Arc::new(tls)),
            connect_timeout: cfg.connect_timeout,
            tls_timeout: cfg.tls_timeout,
        };
        let connector_h1 = if cfg.http2 {
            UpstreamConnector {
                tls: TlsConnector::from(Arc::new(tls_config_with(&cfg.extra_roots, false)?)),
                ..connector.clone()
            }
        } else {
            connector.clone()
        };
        let pool = PoolSettings {
            idle_timeout: cfg.pool_idle_timeout,
            max_idle_per_host: cfg.pool_max_idle_per_host,
            http2: cfg.http2,
        };
        let endpoint = Endpoint {
            connector,
            connector_h1,
            http1_for_single_client: cfg.http2 && cfg.http1_for_single_client,
            pool,
            scheme: cfg.url.scheme().cloned().unwrap_or(Scheme::HTTPS),
            authority: cfg.url.authority().cloned(),
            request_timeout: cfg.request_timeout,
        };
        Ok(endpoint.pools())
    }

    /// The same upstream with a pool of its own (for a worker), sharing the TLS configuration
    /// and connector already built.
    pub fn fresh_pool(&self) -> Upstream {
        self.endpoint.clone().pools()
    }

    /// Counts a client connection served with this pool until the result is dropped.
    pub fn serve_client(&self) -> ClientConnection {
        self.clients.fetch_add(1, Ordering::Relaxed);
        ClientConnection(self.clients.clone())
    }

    /// Client connections served with this pool now (the worker's).
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// The absolute URI of `path_and_query` on the upstream. Only ever the configured upstream:
    /// what the client put in `Host` or an absolute-form URI plays no part.
    /// Built from parts already parsed, so no string is copied or parsed again per request.
    pub fn uri(&self, path_and_query: PathAndQuery) -> Result<Uri, GatewayError> {
        self.endpoint
            .uri(path_and_query)
            .map_err(|_| GatewayError::BadRequest("the request target is not a valid URI"))
    }

    /// Returns once a request sent now goes out at once over HTTP/2 (the lane's connection is
    /// open, opened now if needed). Over HTTP/1.1 a connection is still opened by the send.
    pub async fn ready(&self) -> Result<(), GatewayError> {
        match &self.lane {
            Some(lane) => lane.ready(self.endpoint.request_timeout).await,
            None => Ok(()),
        }
    }

    /// Sends a request and waits for the response headers under `request_timeout` (which
    /// includes connecting when no connection is open).
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let (mut parts, body) = req.into_parts();
        match body {
            ProxyBody::Full(body) => {
                self.send_buffered(&parts.method, &parts.uri, &mut parts.headers, body, false)
                    .await
            }
            stream @ ProxyBody::Stream { .. } => {
                let deadline = tokio::time::Instant::now() + self.endpoint.request_timeout;
                self.send_pooled(&self.client, Request::from_parts(parts, stream), deadline)
                    .await
            }
        }
    }

    /// Sends a buffered request whose head the caller keeps (for a replay): the headers are
    /// copied for each HTTP/2 stream opened (once, unless the lane sends again). Over HTTP/1.1
    /// the caller's map is the one sent, and it gets an equal copy back: the worker's HTTP/1.1
    /// connections add `Host` to what they send, and the original has room for it where a copy
    /// made to size would grow.
    ///
    /// `one_at_a_time`: the request comes on an HTTP/1.x client connection. While that is the
    /// only connection this pool serves (a worker with one client), it goes over HTTP/1.1 when
    /// `upstream.http1_for_single_client` allows: with one request at a time HTTP/2 has nothing
    /// to multiplex, and its framing and header compression cost both ends more per request.
    pub async fn send_buffered(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &mut HeaderMap,
        body: Option<Bytes>,
        one_at_a_time: bool,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let deadline = tokio::time::Instant::now() + self.endpoint.request_timeout;
        let single = self.endpoint.http1_for_single_client
            && one_at_a_time
            && self.clients.load(Ordering::Relaxed) == 1;
        // Whether the request was meant for the lane: its length is announced as the lane
        // announces it, whichever protocol carries it.
        let (body, lane_rules) = match &self.lane {
            Some(lane) if !single => {
                match lane
                    .send(
                        method,
                        uri,
                        headers,
                        body,
                        deadline,
                        self.endpoint.request_timeout,
                    )
                    .await?
                {
                    Sent::H2(resp) => return Ok(resp.map(UpstreamBody::Right)),
                    Sent::Http1(body) => (body, true),
                }
            }
            _ => (body, single),
        };
        let copy = headers.clone();
        let mut sent = std::mem::replace(headers, copy);
        if lane_rules {
            lane::announce_length(method, body.as_ref(), &mut sent);
        }
        let mut req = Request::new(ProxyBody::Full(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = sent;
        let resp = self
            .direct
            .send(req, deadline, self.endpoint.request_timeout)
            .await?;
        Ok(resp.map(UpstreamBody::Left))
    }

    /// Through hyper-util's pooled client (streamed bodies).
    async fn send_pooled(
        &self,
        client: &Client<UpstreamConnector, ProxyBody>,
        req: Request<ProxyBody>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        match tokio::time::timeout_at(deadline, client.request(req)).await {
            Err(_) => Err(GatewayError::UpstreamTimeout {
                phase: Phase::ResponseHeaders,
                after: self.endpoint.request_timeout,
            }),
            Ok(Ok(resp)) => Ok(resp.map(UpstreamBody::Left)),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.endpoint.request_timeout
    }
}

/// Maps a client error to a gateway error naming the phase, from the innermost cause we know.
fn classify(err: &hyper_util::client::legacy::Error) -> GatewayError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(too_large) = s.downcast_ref::<crate::body::TooLarge>() {
            return GatewayError::BodyTooLarge {
                limit: usize::try_from(too_large.0).unwrap_or(usize::MAX),
            };
        }
        if let Some(ce) = s.downcast_ref::<ConnectError>() {
            return connect_error(ce);
        }
        source = s.source();
    }
    let phase = if err.is_connect() {
        Phase::Connect
    } else {
        Phase::ResponseHeaders
    };
    GatewayError::UpstreamUnreachable {
        phase,
        detail: error_chain(err),
    }
}

fn connect_error(ce: &ConnectError) -> GatewayError {
    match ce {
        ConnectError::Timeout(phase, after) => GatewayError::UpstreamTimeout {
            phase: *phase,
            after: *after,
        },
        ConnectError::Failed(phase, io) => GatewayError::UpstreamUnreachable {
            phase: *phase,
            detail: io.to_string(),
        },
        ConnectError::NoHost => GatewayError::UpstreamUnreachable {
            phase: Phase::Connect,
            detail: ce.to_string(),
        },
    }
}

/// "outer: inner: innermost", for messages and logs; none of our errors carry secrets.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Reads a whole (small) upstream body; used for sign-in answers and 401 checks only.
pub async fn read_body(
    body: UpstreamBody,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(GatewayError::UpstreamTimeout {
            phase: Phase::ResponseBody,
            after: timeout,
        }),
        Ok(Err(e)) => Err(GatewayError::UpstreamUnreachable {
            phase: Phase::ResponseBody,
            detail: e.to_string(),
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}
