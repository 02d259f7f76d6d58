//! meetgate: an authenticating reverse proxy for the Huawei Cloud Meeting REST API.
//!
//! The request path is one module per step; [`run`] is the seam tests and `main` share.

pub mod access;
pub mod accesslog;
pub mod activity;
pub mod admin;
pub mod body;
pub mod clock;
pub mod cluster;
pub mod cold;
pub mod config;
pub mod conn;
pub mod control;
pub mod demo;
pub mod error;
pub mod framing;
pub mod headers;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod operations;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod sdk;
pub mod secret;
pub mod server;
pub mod session;
pub mod simulator;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod trace;
pub mod upstream;
pub mod workers;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;
pub use proxy::Gateway;

/// Runs the gateway on an already bound proxy listener, with the admin listener bound from
/// `config.admin_listen`, until `shutdown` resolves; then drains.
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    reload: Option<reload::ConfigSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "admin_listen",
            addr: config.admin_listen,
            source,
        })?;
    let gateway = Gateway::new(config, Arc::new(clock::SystemClock))?;
    let (stop_reload, reload_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(source) = reload {
        tokio::spawn(reload::watch(gateway.clone(), source, async {
            let _ = reload_stopped.await;
        }));
    }
    serve(gateway, listener, Some(admin), shutdown).await;
    let _ = stop_reload.send(());
    Ok(())
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamBuildError),
}

/// Serves an already built gateway (tests keep a handle on it to inspect its state). On
/// shutdown, requests waiting for quota are refused, in-flight ones get `shutdown_grace`.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    let config = gateway.config();
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, upstream = %config.upstream.url, "Listening");
    }
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(admin) = admin {
        if let Ok(addr) = admin.local_addr() {
            tracing::info!(%addr, "Admin listening");
        }
        tokio::spawn(admin::serve(admin, gateway.clone(), async {
            let _ = admin_stopped.await;
        }));
    }
    let gw = gateway.clone();
    let shutdown = async move {
        shutdown.await;
        gw.begin_shutdown();
    };
    let tls = match config.tls.as_ref().map(tls::Tls::new) {
        Some(Ok(tls)) => Some(tls),
        Some(Err(e)) => {
            tracing::error!(error = %e, "TLS configuration unusable; serving nothing");
            return;
        }
        None => None,
    };
    let workers = match workers::Workers::start(config.workers, gateway.upstream()) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the workers; serving nothing");
            return;
        }
    };
    let drained = server::serve(
        listener,
        gateway,
        tls,
        &config.limits,
        &workers,
        shutdown,
        config.shutdown_grace,
    )
    .await;
    let _ = admin_stop.send(());
    if drained {
        tracing::info!("Drained; exiting");
    }
}
