//! A worker's HTTP/1.1 connections to the upstream, driven through hyper's connection API with
//! a stack of idle connections in front instead of hyper-util's pool.
//!
//! hyper-util's pooled client costs about 8,000 instructions per request on top of the
//! exchange itself (its pool hashes the host key with SipHash three times, checks a connection
//! out and back in through its own locks and channels, and moves its futures into place), a
//! tenth of all a request costs. A worker has one upstream, so its idle connections need no
//! key: a request takes the most recently used connection that is ready (its last response
//! read to the end), or opens one, and puts it back once the response head is in; the most
//! recent is the warmest and the likeliest to be still open. Every buffered request to an
//! HTTP/1.1 upstream goes this way, and those of a worker's single client connection whatever
//! the upstream speaks (`upstream.http1_for_single_client`); streamed bodies still take the
//! pooled client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::{connect_error, error_chain, UpstreamConnector};
use crate::body::ProxyBody;
use crate::cold::out_of_line;
use crate::error::{GatewayError, Phase};

/// An open connection waiting for a request.
struct Idle {
    send: SendRequest<ProxyBody>,
    /// When it was last handed back (its last response head arrived).
    since: Instant,
}

pub(crate) struct Direct {
    connector: UpstreamConnector,
    /// Scheme and authority of the upstream, for the connector.
    target: Uri,
    host: Option<HeaderValue>,
    idle_timeout: Duration,
    /// Idle connections kept at most; at least one, so a lone client's connection is kept.
    max_idle: usize,
    /// Most recently used last. A connection whose response body is still being read is here
    /// too (it went back with the response head) and is skipped until it is ready.
    idle: Arc<Mutex<Vec<Idle>>>,
    /// Whether the idle sweep runs (started with the first connection, on the worker).
    sweeping: AtomicBool,
}

impl Direct {
    pub(crate) fn new(
        connector: UpstreamConnector,
        target: Uri,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Direct {
        let host = host_header(&target);
        Direct {
            connector,
            target,
            host,
            idle_timeout,
            max_idle: max_idle.max(1),
            idle: Arc::default(),
            sweeping: AtomicBool::new(false),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A list of connections, valid whatever a panicking holder was doing.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection that can take a request now; closed and expired
    /// ones met on the way are dropped.
    fn checkout(&self) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.send.is_closed() || c.since.elapsed() >= self.idle_timeout {
                idle.remove(i);
            } else if c.send.is_ready() {
                return Some(idle.remove(i).send);
            }
        }
        None
    }

    /// Hands a connection back after a response head, unless enough are idle already (then
    /// hyper closes it once its response body has been read).
    fn checkin(&self, send: SendRequest<ProxyBody>) {
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }

    /// Sends `req` (absolute URI) over an idle connection, or a new one, and waits for the
    /// response head until `deadline`. A request the upstream never received (a kept-alive
    /// connection found closed) is sent once more on a new connection.
    pub(crate) async fn send(
        &self,
        mut req: Request<ProxyBody>,
        deadline: Instant,
        request_timeout: Duration,
    ) -> Result<Response<Incoming>, GatewayError> {
        if let Some(path) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(path);
        }
        if let Some(host) = &self.host {
            req.headers_mut()
                .entry(HOST)
                .or_insert_with(|| host.clone());
        }
        let timeout = || GatewayError::UpstreamTimeout {
            phase: Phase::ResponseHeaders,
            after: request_timeout,
        };
        let mut conn = self.checkout();
        let mut fresh = conn.is_none();
        loop {
            let mut send = match conn.take() {
                Some(send) => send,
                // Out of line (see `cold`): the handshake's state and code would otherwise be
                // part of every request's.
                None => tokio::time::timeout_at(deadline, out_of_line(self.connect()))
                    .await
                    .map_err(|_| timeout())??,
            };
            // Dropped with the request (deadline, or the caller gone): hyper then closes the
            // connection, which is never handed back mid-exchange.
            match tokio::time::timeout_at(deadline, send.try_send_request(req)).await {
                Err(_) => return Err(timeout()),
                Ok(Ok(resp)) => {
                    self.checkin(send);
                    return Ok(resp);
                }
                Ok(Err(mut e)) => match e.take_message() {
                    // Never written: a kept-alive connection the upstream had closed. Once more,
                    // on a new one.
                    Some(unsent) if !fresh => {
                        req = unsent;
                        fresh = true;
                    }
                    _ => {
                        return Err(GatewayError::UpstreamUnreachable {
                            phase: Phase::ResponseHeaders,
                            detail: error_chain(e.error()),
                        })
                    }
                },
            }
        }
    }

    /// A new connection.
    async fn connect(&self) -> Result<SendRequest<ProxyBody>, GatewayError> {
        let io = self
            .connector
            .tls(self.target.clone())
            .await
            .map_err(|e| connect_error(&e))?;
        let (send, conn) = http1::Builder::new()
            .handshake::<_, ProxyBody>(TokioIo::new(io))
            .await
            .map_err(|e| GatewayError::UpstreamUnreachable {
                phase: Phase::Connect,
                detail: format!("HTTP/1.1 handshake: {}", error_chain(&e)),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %error_chain(&e), "Upstream HTTP/1.1 connection ended");
            }
        });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(&self.idle), self.idle_timeout));
        }
        Ok(send)
    }
}

/// Drops connections idle for `idle_timeout`, looking every half of it (so one stays open at
/// most one and a half times that), until the pool is gone: with its sender dropped, hyper
/// closes a connection.
async fn sweep(idle: Weak<Mutex<Vec<Idle>>>, idle_timeout: Duration) {
    loop {
        tokio::time::sleep(idle_timeout / 2).await;
        let Some(idle) = idle.upgrade() else { return };
        idle.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|c| !c.send.is_closed() && c.since.elapsed() < idle_timeout);
    }
}

/// `Host` as hyper-util's pooled client (the fallback) writes it, so it does not change with
/// the way a request takes: the host, and the port only when it is not the scheme's default.
fn host_header(target: &Uri) -> Option<HeaderValue> {
    let default_port = if target.scheme() == Some(&http::uri::Scheme::HTTP) {
        80
    } else {
        443
    };
    let host = target.host()?;
    let value = match target.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_written_as_the_pooled_client_writes_it() {
        let host = |uri: &str| host_header(&uri.parse().expect("uri")).expect("host");
        assert_eq!(host("https://api.example.com"), "api.example.com");
        assert_eq!(host("https://api.example.com:443"), "api.example.com");
        assert_eq!(host("https://127.0.0.1:8443"), "127.0.0.1:8443");
        assert_eq!(host("http://h:80"), "h");
        // Userinfo never reaches the header.
        assert_eq!(host("https://user:pw@h:9443"), "h:9443");
    }
}
