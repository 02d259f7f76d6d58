//! The proxy listener: accepts connections (HTTP/1.1 and h2c on one port), serves each with the
//! gateway, and drains gracefully on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::framing::FramingWatch;
use crate::limits::LimitsConfig;
use crate::tls::Tls;

use crate::proxy::Gateway;
use crate::workers::Workers;

/// The HTTP/1.1 and h2c connection settings of the proxy listener, from `[limits]`.
fn connection_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Also bounds an idle keep-alive connection: the timer runs while waiting for headers.
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(limits.header_read_timeout);
    builder
}

/// Serves one plain connection on `io` exactly as the listener serves an accepted one (the
/// framing watch, HTTP/1.1 or h2c under `[limits]`, every request through the gateway), until
/// the client closes it. For in-process drivers: the fuzzer feeds it raw bytes.
pub async fn serve_io<IO>(
    gateway: Arc<Gateway>,
    io: IO,
    peer: std::net::SocketAddr,
    upstream: crate::upstream::Upstream,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = gateway.config().limits.clone();
    let builder = connection_builder(&limits);
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch_flag = flag.clone();
    let gw = gateway.clone();
    let service = service_fn(move |req| {
        let gw = gw.clone();
        let upstream = upstream.clone();
        let refuse = flag.load(std::sync::atomic::Ordering::Relaxed);
        async move { Ok::<_, Infallible>(gw.handle(req, peer, refuse, &upstream).await) }
    });
    let stream = FramingWatch::new(io, watch_flag);
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Serves `listener` until `shutdown` resolves, then lets in-flight requests finish for up to
/// `grace`. Connections are accepted here and served on `workers`, in turn. Returns whether
/// every connection closed within the grace period.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<Tls>,
    limits: &LimitsConfig,
    workers: &Workers,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> bool {
    let builder = connection_builder(limits);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    let mut accept_backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin, then retry.
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        accept_backoff = Duration::from_millis(5);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The socket moves to the worker's own I/O driver.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "Accepted connection unusable");
                continue;
            }
        };
        let worker = workers.next();
        let upstream = worker.upstream().clone();
        let client = upstream.serve_client();
        // Each request takes a reference to the connection's own handle: a reference to the
        // gateway itself would write its count, which every worker shares, per request.
        let gw = Arc::new(gateway.clone());
        // Raised by the connection's FramingWatch, read per request.
        let conflicting_framing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch_flag = conflicting_framing.clone();
        let service = service_fn(move |req| {
            let gw = gw.clone();
            let upstream = upstream.clone();
            let refuse = conflicting_framing.load(std::sync::atomic::Ordering::Relaxed);
            // The request path's future is boxed per request: hyper keeps a slot the size of
            // the service's future for a connection's whole life, idle or not, and the request
            // path's own is about 7 KiB (scale bench); boxed, the slot holds a pointer.
            async move { Ok::<_, Infallible>(Box::pin(gw.handle(req, peer, refuse, &upstream)).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        worker.spawn(async move {
            let _permit = permit;
            // Counted while served: how the worker's pool picks a protocol (`upstream`).
            let _client = client;
            let stream = match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "Cannot register the connection");
                    return;
                }
            };
            let result = match tls {
                None => {
                    let stream = FramingWatch::new(stream, watch_flag);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(tls) => {
                    // The handshake runs in the connection's own task, under its own timeout,
                    // so a slow client never holds up accepting.
                    let stream = match tokio::time::timeout(
                        tls.handshake_timeout,
                        tls.acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let stream = FramingWatch::new(stream, watch_flag);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "Connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "Shutting down: draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep(grace) => {
            tracing::warn!("Grace period over with requests still in flight");
            false
        }
    }
}

/// Over `max_connections`: one plain 503 and the connection is closed, never left hanging.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error_code":"MEETGATE.OVERLOADED","error_msg":"too many connections","request_id":""}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json;charset=UTF-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// Resolves on the first SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
