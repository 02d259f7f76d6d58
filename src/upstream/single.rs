//! The HTTP/1.1 lane of a worker's single client connection: one keep-alive upstream
//! connection driven through hyper's connection API, with no pool in between.
//!
//! hyper-util's pooled client costs about 8,000 instructions per request on top of the
//! exchange itself (its pool hashes the host key with SipHash three times, checks a connection
//! out and back in, and moves its futures into place), a tenth of all a request costs. One
//! client connection sends one request at a time, so one upstream connection serves it; when
//! that connection is busy (a request of a client that has just left is still on it) the
//! request takes the pooled client instead.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::{connect_error, error_chain, UpstreamConnector};
use crate::body::ProxyBody;
use crate::error::{GatewayError, Phase};

enum State {
    /// No connection: the next request opens one.
    Empty,
    /// Open and unused since `since`.
    Idle {
        send: SendRequest<ProxyBody>,
        since: Instant,
        id: u64,
    },
    /// A request has the connection.
    Busy,
}

/// What [`Single::send`] did with a request.
pub(crate) enum Sent {
    Answered(Response<Incoming>),
    /// The connection is busy: the request, untouched, for the pooled client.
    Busy(Request<ProxyBody>),
}

pub(crate) struct Single {
    connector: UpstreamConnector,
    /// Scheme and authority of the upstream, for the connector.
    target: Uri,
    host: Option<HeaderValue>,
    idle_timeout: Duration,
    state: Arc<Mutex<State>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Single {
    pub(crate) fn new(connector: UpstreamConnector, target: Uri, idle_timeout: Duration) -> Single {
        let host = host_header(&target);
        Single {
            connector,
            target,
            host,
            idle_timeout,
            state: Arc::new(Mutex::new(State::Empty)),
            next_id: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req` (absolute URI) over the connection, opening one if there is none, and waits
    /// for the response head until `deadline`. A request the upstream never received (the
    /// connection was found closed) is sent once more on a new connection.
    pub(crate) async fn send(
        &self,
        mut req: Request<ProxyBody>,
        deadline: Instant,
        request_timeout: Duration,
    ) -> Result<Sent, GatewayError> {
        let reused = {
            let mut state = self.state();
            match std::mem::replace(&mut *state, State::Busy) {
                State::Busy => return Ok(Sent::Busy(req)),
                State::Idle { send, .. } if send.is_closed() => None,
                State::Idle { since, .. } if since.elapsed() >= self.idle_timeout => None,
                State::Idle { send, since, id } if !send.is_ready() => {
                    *state = State::Idle { send, since, id };
                    return Ok(Sent::Busy(req));
                }
                State::Idle { send, id, .. } => Some((send, id)),
                State::Empty => None,
            }
        };
        // From here the state is Busy; every way out sets it again.
        let mut done = Done(self, State::Empty);
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
        let mut fresh = reused.is_none();
        let mut conn = reused;
        loop {
            let (mut send, id) = match conn.take() {
                Some(conn) => conn,
                // Boxed: the handshake's state would otherwise be part of every request's future.
                None => tokio::time::timeout_at(deadline, Box::pin(self.connect()))
                    .await
                    .map_err(|_| timeout())??,
            };
            match tokio::time::timeout_at(deadline, send.try_send_request(req)).await {
                Err(_) => return Err(timeout()),
                Ok(Ok(resp)) => {
                    done.1 = State::Idle {
                        send,
                        since: Instant::now(),
                        id,
                    };
                    return Ok(Sent::Answered(resp));
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

    /// A new connection, and its id for the idle watch.
    async fn connect(&self) -> Result<(SendRequest<ProxyBody>, u64), GatewayError> {
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
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        watch_idle(&self.state, id, self.idle_timeout);
        Ok((send, id))
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

/// Sets the state when a send ends, however it ends (an error, the deadline, or the caller
/// dropping the request): the connection goes back idle only after a complete response head.
struct Done<'a>(&'a Single, State);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        *self.0.state() = std::mem::replace(&mut self.1, State::Empty);
    }
}

/// Drops connection `id` once it has been idle for `idle` (one watch per connection, not per
/// request): with its sender gone, hyper closes it after any response body still streaming.
fn watch_idle(state: &Arc<Mutex<State>>, id: u64, idle: Duration) {
    let state = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut at = Instant::now() + idle;
        loop {
            tokio::time::sleep_until(at).await;
            let Some(state) = state.upgrade() else { return };
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            match &*s {
                State::Idle {
                    id: current, since, ..
                } if *current == id => {
                    if since.elapsed() >= idle {
                        *s = State::Empty;
                        return;
                    }
                    at = *since + idle;
                }
                // In use (perhaps this connection): look again a little later, so a connection
                // freed meanwhile stays open not much longer than `idle`.
                State::Busy => at = Instant::now() + idle / 4,
                // Replaced or dropped.
                _ => return,
            }
        }
    });
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
