//! The direct HTTP/2 lane: one multiplexed upstream connection per pool, over which a request
//! with a buffered body goes out as HEADERS and DATA together, in one write.
//!
//! hyper's HTTP/2 client hands every request body with data to a task of its own, which sends
//! it only after the connection task has flushed the headers: two TLS records, two `writev`
//! and two more task wake-ups per request. Our bodies are buffered anyway (for replays), so
//! the h2 crate can take the headers and the data at once and the connection task writes
//! them, and those of every other request ready at that moment, in one go. Streamed (large)
//! bodies stay with hyper-util's pooled client; upstreams that answer ALPN with `http/1.1`, and a
//! worker's single client connection, go over the worker's own HTTP/1.1 connections (`direct`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{Reason, RecvStream};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};

use super::{connect_error, error_chain, TlsIo, UpstreamConnector};
use crate::error::{GatewayError, Phase};

/// Flow-control windows and limits as hyper's HTTP/2 client sets them: a response up to
/// 2 MiB (5 MiB over all streams) flows without waiting for our window updates.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Which way the lane goes for the next request.
enum State {
    /// No connection: the next request opens one.
    Closed,
    Open {
        id: u64,
        send: SendRequest<Bytes>,
        /// Set by each request; cleared by the idle check (see [`drive`]).
        used: bool,
    },
    /// The upstream chose HTTP/1.1 in ALPN: the worker's HTTP/1.1 connections serve it from now on.
    Http1,
}

/// Where [`Lane::send`] sent the request.
pub(crate) enum Sent {
    H2(Response<H2Body>),
    /// The upstream speaks HTTP/1.1 only: the body comes back unsent, for HTTP/1.1.
    Http1(Option<Bytes>),
}

pub(crate) struct Lane {
    connector: UpstreamConnector,
    /// Scheme and authority of the upstream, for the connector.
    target: Uri,
    idle_timeout: Duration,
    state: Mutex<State>,
    /// One connection attempt at a time: requests arriving meanwhile wait for it and share it.
    connecting: tokio::sync::Mutex<()>,
    /// Connection attempts finished, and the error of the last one if it failed: requests that
    /// waited on a failed attempt get its error rather than trying again one after another.
    attempts: AtomicU64,
    last_failure: Mutex<Option<GatewayError>>,
    next_id: AtomicU64,
}

impl Lane {
    pub(crate) fn new(connector: UpstreamConnector, target: Uri, idle_timeout: Duration) -> Lane {
        Lane {
            connector,
            target,
            idle_timeout,
            state: Mutex::new(State::Closed),
            connecting: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            next_id: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value, valid whatever a panicking holder was doing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open connection, marked used; `Ok(None)` when the upstream speaks HTTP/1.1 only.
    fn current(&self) -> Option<Option<(u64, SendRequest<Bytes>)>> {
        match &mut *self.state() {
            State::Closed => None,
            State::Http1 => Some(None),
            State::Open { id, send, used } => {
                *used = true;
                Some(Some((*id, send.clone())))
            }
        }
    }

    /// Forgets connection `id` (broken, or idle), unless another has replaced it already.
    fn forget(&self, id: u64) {
        let mut state = self.state();
        if matches!(&*state, State::Open { id: open, .. } if *open == id) {
            *state = State::Closed;
        }
    }

    async fn connection(
        self: &Arc<Self>,
    ) -> Result<Option<(u64, SendRequest<Bytes>)>, GatewayError> {
        if let Some(found) = self.current() {
            return Ok(found);
        }
        let seen = self.attempts.load(Ordering::Acquire);
        let _gate = self.connecting.lock().await;
        if let Some(found) = self.current() {
            return Ok(found);
        }
        if self.attempts.load(Ordering::Acquire) != seen {
            let failed = self
                .last_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(e) = failed {
                return Err(e);
            }
        }
        // Out of line (see `cold`): a TLS handshake's state is large, and inline it would take
        // room in every request's future (8.8 KB per request in flight instead of 5.1 KB), and
        // its code in every request's, though only a request that opens the connection needs
        // it.
        let attempt = crate::cold::out_of_line(self.connect()).await;
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = attempt.as_ref().err().cloned();
        self.attempts.fetch_add(1, Ordering::Release);
        attempt
    }

    async fn connect(self: &Arc<Self>) -> Result<Option<(u64, SendRequest<Bytes>)>, GatewayError> {
        let io = self
            .connector
            .tls(self.target.clone())
            .await
            .map_err(|e| connect_error(&e))?;
        if io.get_ref().1.alpn_protocol() != Some(b"h2") {
            tracing::debug!("Upstream chose HTTP/1.1 in ALPN; using HTTP/1.1 connections");
            *self.state() = State::Http1;
            return Ok(None);
        }
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            // Until the upstream's SETTINGS arrive, streams beyond this wait on our side instead
            // of being sent and refused (hyper's default, below any server's usual limit).
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            // A response body the client stopped reading once it had Content-Length bytes
            // cancels its stream; h2 counts those as local resets and by default closes the
            // connection (GOAWAY) after 1024 of them, failing every request in flight on it.
            // The upstream is ours to trust, so no cap.
            .max_local_error_reset_streams(None)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| GatewayError::UpstreamUnreachable {
                phase: Phase::Connect,
                detail: format!("HTTP/2 handshake: {}", error_chain(&e)),
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive(conn, Arc::downgrade(self), id, self.idle_timeout));
        *self.state() = State::Open {
            id,
            send: send.clone(),
            used: true,
        };
        Ok(Some((id, send)))
    }

    /// Opens the connection if none is open (or says the upstream speaks HTTP/1.1 only), so a
    /// request admitted by the quota right after goes out at once: the upstream counts a
    /// request when it arrives, and a TLS handshake over a slow link would otherwise move the
    /// arrival of the requests waiting on it by several round trips after their admission.
    pub(crate) async fn ready(self: &Arc<Self>, timeout: Duration) -> Result<(), GatewayError> {
        if self.current().is_some() {
            return Ok(());
        }
        match tokio::time::timeout(timeout, self.connection()).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(GatewayError::UpstreamTimeout {
                phase: Phase::Connect,
                after: timeout,
            }),
        }
    }

    /// `fut`'s output, unless `deadline` comes first: then connection `id` is given up, as one
    /// that may be dead without TCP knowing yet (see [`Lane::send`]).
    async fn until<T>(
        &self,
        deadline: tokio::time::Instant,
        id: u64,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, ()> {
        let outcome = tokio::time::timeout_at(deadline, fut).await;
        if outcome.is_err() {
            self.forget(id);
        }
        outcome.map_err(|_| ())
    }

    /// Sends the request on the lane's connection (opening it when needed) and waits for the
    /// response headers until `deadline`. A request the upstream provably did not process is
    /// sent once more: on a new connection when the old one was already closed or went away
    /// (GOAWAY), on the same one when only the stream was refused. A connection that leaves a
    /// request unanswered until the deadline is given up for new requests: it may be dead
    /// without TCP knowing yet.
    pub(crate) async fn send(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Option<Bytes>,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Sent, GatewayError> {
        let timed_out = || GatewayError::UpstreamTimeout {
            phase: Phase::ResponseHeaders,
            after: timeout,
        };
        // One new connection for a request that found its connection gone, and one more send
        // for a stream the upstream did not process: separate budgets, as either can follow
        // the other (a GOAWAY, then a burst refused on the new connection).
        let mut reconnected = false;
        let mut resent = false;
        loop {
            let found = tokio::time::timeout_at(deadline, self.connection())
                .await
                .map_err(|_| timed_out())??;
            let Some((id, send)) = found else {
                return Ok(Sent::Http1(body));
            };
            // h2 takes the head; the caller's stays for a send again or a replay.
            let mut head = Request::new(());
            *head.method_mut() = method.clone();
            *head.uri_mut() = uri.clone();
            *head.headers_mut() = headers.clone();
            announce_length(method, body.as_ref(), head.headers_mut());
            let opened = self
                .until(deadline, id, send.ready())
                .await
                .map_err(|()| timed_out())?
                .and_then(|mut send| send.send_request(head, body.is_none()));
            let (response, mut stream) = match opened {
                Ok(opened) => opened,
                // Nothing was sent: the connection is already gone or takes no new stream.
                Err(e) if !reconnected => {
                    tracing::debug!(error = %e, "Upstream HTTP/2 connection unusable; reconnecting");
                    self.forget(id);
                    reconnected = true;
                    continue;
                }
                Err(e) => return Err(stream_error(&e)),
            };
            if let Some(b) = &body {
                // Queued with the headers; flow control lets it out when the window allows.
                // An error here means the stream is already reset: the response says why.
                let _ = stream.send_data(b.clone(), true);
            }
            let answer = self
                .until(deadline, id, response)
                .await
                .map_err(|()| timed_out())?;
            match answer {
                Ok(resp) => {
                    let len = resp
                        .headers()
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    return Ok(Sent::H2(resp.map(|recv| H2Body::new(recv, len))));
                }
                Err(e) if !resent && unprocessed(&e) => {
                    tracing::debug!(error = %e, "Upstream did not process a stream; sending it again");
                    // A refused stream says nothing against the connection; a GOAWAY does.
                    if e.is_go_away() {
                        self.forget(id);
                    }
                    resent = true;
                }
                Err(e) => return Err(stream_error(&e)),
            }
        }
    }
}

/// Adds `Content-Length` for a buffered body, unless the client sent one: always when there is
/// a body, and as 0 for methods whose (empty) body means something, as hyper's HTTP/2 client
/// does. (Its HTTP/1.1 client leaves an empty body unannounced, which some servers answer
/// with 411.)
pub(crate) fn announce_length(method: &Method, body: Option<&Bytes>, headers: &mut HeaderMap) {
    let len = body.map_or(0, Bytes::len);
    if len > 0 || !matches!(*method, Method::GET | Method::HEAD | Method::DELETE) {
        headers
            .entry(http::header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
    }
}

/// Whether the upstream said it did not act on the stream: refused, or above a GOAWAY's last
/// processed stream (RFC 9113 §8.7), so sending it again cannot do anything twice.
fn unprocessed(e: &h2::Error) -> bool {
    (e.is_reset() && e.is_remote() && e.reason() == Some(Reason::REFUSED_STREAM))
        || (e.is_go_away() && e.is_remote())
}

fn stream_error(e: &h2::Error) -> GatewayError {
    GatewayError::UpstreamUnreachable {
        phase: Phase::ResponseHeaders,
        detail: error_chain(e),
    }
}

/// Runs a connection until it ends; closes it once idle.
///
/// Every `idle_timeout` the check clears the lane's `used` flag; a connection found unused is
/// dropped from the lane, and h2 closes it once its last stream and handle are gone.
async fn drive(conn: Connection<TlsIo, Bytes>, lane: Weak<Lane>, id: u64, idle_timeout: Duration) {
    let mut conn = std::pin::pin!(conn);
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %error_chain(&e), "Upstream HTTP/2 connection ended");
                }
                break;
            }
            () = tokio::time::sleep(idle_timeout) => {
                let Some(lane) = lane.upgrade() else {
                    // Nobody can start a stream any more; let those running finish.
                    if let Err(e) = conn.as_mut().await {
                        tracing::debug!(error = %error_chain(&e), "Upstream HTTP/2 connection ended");
                    }
                    return;
                };
                let mut state = lane.state();
                if let State::Open { id: open, used, .. } = &mut *state {
                    if *open == id {
                        // Streams still running keep the connection open after this.
                        if !*used {
                            *state = State::Closed;
                        } else {
                            *used = false;
                        }
                    }
                }
            }
        }
    }
    if let Some(lane) = lane.upgrade() {
        lane.forget(id);
    }
}

/// A response body from the lane: the stream's data, then its trailers; each chunk read gives
/// its flow-control window back to the upstream.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// What `content-length` announced and has not arrived yet (h2 enforces the total).
    remaining: Option<u64>,
}

impl H2Body {
    fn new(recv: RecvStream, content_length: Option<u64>) -> H2Body {
        H2Body {
            recv,
            data_done: false,
            remaining: content_length,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window is the connection's, not ours to hold: give it back at once.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut this.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
