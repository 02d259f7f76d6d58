//! The proxy listener: accepts connections (HTTP/1.1 and h2c on one port, or TLS), bounds
//! their number, hands each to a worker (`conn` serves it), and drains on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::conn::{self, Drain, Park, Protocols};
use crate::limits::LimitsConfig;
use crate::proxy::Gateway;
use crate::tls::Tls;
use crate::workers::Workers;

/// Serves one plain connection on `io` exactly as the listener serves an accepted one (the
/// framing watch, HTTP/1.1 or h2c under `[limits]`, every request through the gateway, parked
/// when idle), until the client closes it. For in-process drivers: the fuzzer feeds it raw
/// bytes.
pub async fn serve_io<IO: Park>(
    gateway: Arc<Gateway>,
    io: IO,
    peer: std::net::SocketAddr,
    upstream: crate::upstream::Upstream,
) {
    let protocols = Protocols::new(&gateway.config().limits);
    // Kept for the connection's life: a dropped drain would end it at once.
    let drain = Drain::new();
    conn::serve(
        io,
        peer,
        gateway,
        Arc::new(upstream),
        protocols,
        drain.watch(),
    )
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
    let protocols = Protocols::new(limits);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let drain = Drain::new();
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
        let gateway = gateway.clone();
        let protocols = protocols.clone();
        let drain = drain.watch();
        let tls = tls.clone();
        let fut = async move {
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
            match tls {
                None => conn::serve(stream, peer, gateway, upstream, protocols, drain).await,
                // Boxed, with the handshake: inline, rustls' connection state would size
                // every plain connection's task too.
                Some(tls) => {
                    Box::pin(async move {
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
                        conn::serve(stream, peer, gateway, upstream, protocols, drain).await;
                    })
                    .await
                }
            }
        };
        worker.spawn(fut);
    }
    drop(listener);
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "Shutting down: draining connections"
    );
    tokio::select! {
        () = drain.drained() => true,
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
