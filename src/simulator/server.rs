//! The simulator's accept loop: TLS handshake, HTTP/1.1 or h2 per connection, shutdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::handlers::Sim;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight exchanges may run after shutdown before their tasks are aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    sim: Arc<Sim>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Small answers must not wait for Nagle and the peer's delayed ACK.
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(serve_conn(
                        tcp,
                        peer,
                        acceptor.clone(),
                        Arc::clone(&sim),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "Simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            // A value change or a dropped handle both mean stop.
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            open = conns.len(),
            "Simulator aborting connections after the grace period"
        );
    }
    conns.abort_all();
    tracing::debug!("Simulator stopped");
}

async fn serve_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    sim: Arc<Sim>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "Simulator TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "Simulator TLS handshake timed out");
            return;
        }
    };
    let _open = OpenConnection::count(&sim);
    let service = service_fn(move |req| Arc::clone(&sim).handle(req, peer));
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "Simulator connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "Simulator connection ended with an error");
            }
        }
    }
}

/// Counts a connection in [`Sim::open_connections`] for as long as it is held.
struct OpenConnection(Arc<Sim>);

impl OpenConnection {
    fn count(sim: &Arc<Sim>) -> OpenConnection {
        sim.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(sim))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}
