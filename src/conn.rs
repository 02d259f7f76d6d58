//! One client connection of the proxy listener, from its first bytes to its close: HTTP/1.1 or
//! h2c by the preface, served by hyper, parked between HTTP/1.1 requests with none of hyper's
//! state, and drained on shutdown.
//!
//! Why park: hyper keeps an HTTP/1.1 connection's read buffer (8–16 KiB), its header write
//! buffer (8 KiB) and its dispatcher for the connection's whole life, idle or not: about 19 KB
//! per idle keep-alive connection, which is most of what ten thousand of them cost. When a
//! response is out, both of its bodies are dropped and the next read finds nothing, the task
//! takes the socket back from hyper (`into_parts`, which also hands back any bytes hyper read
//! ahead) and waits for readability on the socket alone; the next request gets a fresh hyper
//! connection. nginx frees an idle connection's buffers the same way.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::activity::{Activity, Open};
use crate::body::ClientBody;
use crate::framing::FramingWatch;
use crate::limits::LimitsConfig;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::upstream::Upstream;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long an HTTP/1.1 connection stays idle in hyper before it is parked. A client sending
/// request after request (its next one well within this) keeps its hyper connection and pays
/// nothing for parking; parking at once measured 2–5 us more CPU per request at 16 and 64
/// connections (load bench). Short, so that only the connections that went idle in the last
/// few milliseconds hold buffers, and glibc reuses what parked ones freed.
const PARK_AFTER: Duration = Duration::from_millis(10);

/// Above this many client connections on a worker, an idle one is parked at once instead: the
/// buffers it frees then go straight to the next request, where freed 10 ms later they leave
/// the heap fragmented (10,000 idle connections took 3.2 KB each so, 3.0 KB parked at once).
/// Below it, what waiting costs is bounded by the count.
const PARK_AT_ONCE_ABOVE: usize = 128;

/// The listener's HTTP/1.1 and HTTP/2 settings, from `[limits]`, shared by its connections.
pub struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// Bounds the wait for a request: the first bytes, a parked connection's next request, and
    /// (hyper's own timer) a request head once it has begun.
    header_read_timeout: Duration,
}

impl Protocols {
    pub fn new(limits: &LimitsConfig) -> Arc<Protocols> {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes)
            .max_headers(limits.max_headers);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(limits.header_read_timeout))
            .keep_alive_timeout(limits.header_read_timeout);
        Arc::new(Protocols {
            http1: h1,
            http2: h2,
            header_read_timeout: limits.header_read_timeout,
        })
    }
}

/// Tells every connection to finish: an active one after the requests in flight (hyper's
/// graceful shutdown), a parked or silent one at once.
pub struct Drain {
    tx: watch::Sender<()>,
}

/// One connection's end of [`Drain`].
#[derive(Clone)]
pub struct DrainWatch(watch::Receiver<()>);

impl Drain {
    pub fn new() -> Drain {
        Drain {
            tx: watch::channel(()).0,
        }
    }

    pub fn watch(&self) -> DrainWatch {
        DrainWatch(self.tx.subscribe())
    }

    /// Signals every connection, then resolves when all have closed.
    pub async fn drained(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

impl Default for Drain {
    fn default() -> Drain {
        Drain::new()
    }
}

/// How a parked connection learns that its client sent something, or closed.
pub trait Park: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// `Some` from the socket's readiness; `None` for a stream that cannot tell without
    /// reading (an in-memory one): a parked connection then reads a few bytes to wake.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>>;
}

impl Park for TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        Some(self.poll_read_ready(cx))
    }
}

// A parked TLS connection has no plaintext left in rustls: it was parked after a read that
// returned Pending, which tokio-rustls returns only once the socket would block and rustls
// holds no plaintext. So the socket's readiness is the stream's.
impl Park for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        Some(self.get_ref().0.poll_read_ready(cx))
    }
}

impl Park for tokio::io::DuplexStream {
    fn poll_readable(&self, _: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        None
    }
}

impl<S: Park> Park for FramingWatch<S> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        self.get_ref().poll_readable(cx)
    }
}

/// Serves one accepted connection (TLS already done) until it closes or the drain ends it.
// Not an `async fn`: one keeps a copy of every argument beside the one it moves into its body,
// and this future is the connection's task, parked or not, for its whole life.
pub fn serve<S: Park>(
    io: S,
    peer: SocketAddr,
    gateway: Arc<Gateway>,
    upstream: Arc<Upstream>,
    protocols: Arc<Protocols>,
    mut drain: DrainWatch,
) -> impl Future<Output = ()> + Send {
    // Raised by the connection's FramingWatch, read per request. Wrapped here, outside the
    // future, so that the future holds the stream once.
    let conflicting_framing = Arc::new(AtomicBool::new(false));
    let mut io = FramingWatch::new(io, conflicting_framing.clone());
    async move {
        let metrics = gateway.metrics().clone();
        let _open = Counted::up(&metrics.client_connections);
        let activity = Activity::new();
        let drained = drain.0.changed();
        tokio::pin!(drained);
        // Boxed: its timer and buffer would otherwise size the task for the connection's life.
        let (h2, prefix) = match tokio::select! {
            biased;
            _ = &mut drained => return,
            first = Box::pin(tokio::time::timeout(protocols.header_read_timeout, preface(&mut io))) => first,
        } {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "Connection failed before a request");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "No request within the header read timeout");
                return;
            }
        };
        // Each request takes a reference to the connection's own handle: a reference to the
        // gateway itself would write its count, which every worker shares, per request.
        let gw = Arc::new(gateway);
        let service_activity = activity.clone();
        let worker = upstream.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let gw = gw.clone();
            let upstream = upstream.clone();
            let refuse = conflicting_framing.load(Ordering::Relaxed);
            let (request_open, response_open) = service_activity.start();
            let req = req.map(|body| ClientBody::new(body, Some(request_open)));
            // The request path's future (4.6 KB) is boxed per request: hyper keeps a slot the
            // size of the service's future for as long as the connection is not parked; boxed,
            // the slot holds a pointer. (Unboxed measured no gain: docs/performance.md.)
            async move {
                let resp = Box::pin(gw.handle(req, peer, refuse, &upstream)).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body,
                    _open: response_open,
                }))
            }
        });
        let stream = ClientStream {
            prefix,
            inner: io,
            activity: activity.clone(),
        };
        let result = if h2 {
            let mut conn = Box::pin(
                protocols
                    .http2
                    .serve_connection(TokioIo::new(stream), service),
            );
            let mut draining = false;
            poll_fn(|cx| {
                if !draining && drained.as_mut().poll(cx).is_ready() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                conn.as_mut().poll(cx)
            })
            .await
        } else {
            serve_http1(
                stream, service, &activity, &protocols, drained, &metrics, &worker,
            )
            .await
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "Connection ended with an error");
        }
    }
}

/// The first bytes, until they are or cannot be HTTP/2's preface: (h2, the bytes read), or
/// `None` when the client closed without sending any.
async fn preface<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Option<(bool, Bytes)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    loop {
        let read = io.read(&mut buf[n..]).await?;
        n += read;
        if read == 0 || n == buf.len() || buf[..n] != H2_PREFACE[..n] {
            break;
        }
    }
    if n == 0 {
        return Ok(None);
    }
    Ok(Some((
        &buf == H2_PREFACE,
        Bytes::copy_from_slice(&buf[..n]),
    )))
}

/// Serves HTTP/1.1 on `stream`, parking it whenever it goes idle between requests.
// Not an `async fn`, for the reason `serve` gives.
#[allow(clippy::manual_async_fn)]
fn serve_http1<'a, S, F, B>(
    mut stream: ClientStream<FramingWatch<S>>,
    mut service: F,
    activity: &'a Arc<Activity>,
    protocols: &'a Protocols,
    mut drained: Pin<&'a mut impl Future>,
    metrics: &'a Metrics,
    worker: &'a Upstream,
) -> impl Future<Output = Result<(), hyper::Error>> + 'a
where
    S: Park,
    F: hyper::service::HttpService<Incoming, ResBody = B> + Unpin + 'a,
    F::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async move {
        let mut draining = false;
        loop {
            let started = activity.started();
            // Boxed: inline, hyper's connection would size this task for its whole life, parked
            // or not (the task was 9.6 KB with it and the HTTP/2 one inline).
            let mut conn = Box::new(
                protocols
                    .http1
                    .serve_connection(TokioIo::new(stream), service),
            );
            // Armed when the connection goes idle, re-armed after every request it serves.
            let mut idle_timer: Option<(u64, Pin<Box<Sleep>>)> = None;
            let parked = poll_fn(|cx| {
                if !draining && drained.as_mut().poll(cx).is_ready() {
                    draining = true;
                    Pin::new(&mut *conn).graceful_shutdown();
                }
                match Pin::new(&mut *conn).poll(cx) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    Poll::Pending if !draining && activity.idle_after(started) => {
                        if worker.clients() > PARK_AT_ONCE_ABOVE {
                            return Poll::Ready(None);
                        }
                        let served = activity.started();
                        let timer = match &mut idle_timer {
                            Some((armed_for, timer)) => {
                                if *armed_for != served {
                                    *armed_for = served;
                                    timer.as_mut().reset(Instant::now() + PARK_AFTER);
                                }
                                timer
                            }
                            None => {
                                &mut idle_timer
                                    .insert((served, Box::pin(tokio::time::sleep(PARK_AFTER))))
                                    .1
                            }
                        };
                        match timer.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(None),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            drop(idle_timer);
            if let Some(result) = parked {
                return result;
            }
            // In a block of its own: the box is freed where `conn` goes out of scope, and parking
            // is to free it.
            (stream, service) = {
                let parts = conn.into_parts();
                let mut stream = parts.io.into_inner();
                // What hyper read past the last request (a pipelined client's next bytes) comes
                // before whatever of the earlier prefix hyper had not read yet.
                stream.prefix = join(parts.read_buf, std::mem::take(&mut stream.prefix));
                (stream, parts.service)
            };
            if !stream.prefix.is_empty() {
                // The next request has begun: no wait, hyper carries on from those bytes.
                continue;
            }
            // Parked: the socket, the service and this task's few hundred bytes, nothing else.
            let parked = Counted::up(&metrics.client_connections_parked);
            let woke = tokio::select! {
                biased;
                _ = drained.as_mut() => return Ok(()),
                woke = tokio::time::timeout(protocols.header_read_timeout, wake(&mut stream.inner)) => woke,
            };
            drop(parked);
            match woke {
                Ok(Ok(Some(bytes))) => stream.prefix = bytes,
                // Closed by the client, failed, or silent for the header read timeout (as hyper
                // closes an idle keep-alive connection): closed without a response, as there is
                // no request to answer.
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return Ok(()),
            }
        }
    }
}

/// A parked connection's wait for its next request: `Some` with any bytes it had to read to
/// find out (none when the socket says it is readable), `None` once the client closed.
async fn wake<S: Park>(io: &mut S) -> io::Result<Option<Bytes>> {
    let stream = &mut *io;
    let ready = poll_fn(move |cx| match stream.poll_readable(cx) {
        Some(Poll::Pending) => Poll::Pending,
        Some(Poll::Ready(r)) => Poll::Ready(Some(r)),
        None => Poll::Ready(None),
    })
    .await;
    if let Some(ready) = ready {
        // Readable: hyper reads the request (or finds the close) itself.
        return ready.map(|()| Some(Bytes::new()));
    }
    // On the heap: an array here would size every connection's task, parked or not.
    let mut buf = vec![0u8; 256];
    let n = io.read(&mut buf).await?;
    Ok((n > 0).then(|| Bytes::copy_from_slice(&buf[..n])))
}

/// One on a gauge while alive: the connection task may end at any await.
struct Counted<'a>(&'a Gauge);

impl<'a> Counted<'a> {
    fn up(gauge: &'a Gauge) -> Counted<'a> {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `first` then `then`, in a buffer of their own: a `Bytes` from hyper's read buffer, empty or
/// not, keeps that whole buffer (8–16 KiB) alive, which is what parking is meant to free.
fn join(first: Bytes, then: Bytes) -> Bytes {
    if first.is_empty() && then.is_empty() {
        return Bytes::new();
    }
    let mut both = BytesMut::with_capacity(first.len() + then.len());
    both.extend_from_slice(&first);
    both.extend_from_slice(&then);
    both.freeze()
}

/// The client's byte stream as hyper sees it: bytes already read (the preface check's, or
/// what hyper read ahead before the connection was parked) first, then the socket; every read
/// and write tells `activity` whether it had to wait.
struct ClientStream<S> {
    prefix: Bytes,
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.activity.set_read_waiting(false);
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.activity.set_read_waiting(r.is_pending());
        r
    }
}

impl<S: AsyncWrite + Unpin> ClientStream<S> {
    fn waited<T>(&self, r: Poll<T>) -> Poll<T> {
        self.activity.set_write_waiting(r.is_pending());
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.waited(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.waited(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.waited(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.waited(r)
    }
}

/// A response body holding its request open on the connection until hyper has written it all
/// (and dropped it).
struct Tracked<B> {
    body: B,
    _open: Open,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
