//! meetgate: an authenticating reverse proxy for the Huawei Cloud Meeting REST API.
//!
//! The request path is one module per step; [`run`] is the seam tests and `main` share.

pub mod body;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod headers;
pub mod operations;
pub mod proxy;
pub mod quota;
pub mod server;
pub mod simulator;
pub mod telemetry;
pub mod token;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;
pub use proxy::Gateway;

/// Runs the gateway on an already bound listener until `shutdown` resolves, then drains.
/// Returns the gateway's state so callers (tests) can inspect it, or a start-up error.
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), upstream::UpstreamBuildError> {
    let gateway = Gateway::new(config, Arc::new(clock::SystemClock))?;
    serve(gateway, listener, shutdown).await;
    Ok(())
}

/// Serves an already built gateway (tests keep a handle on it to inspect its state).
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let config = gateway.config().clone();
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, upstream = %config.upstream.url, "Listening");
    }
    server::serve(listener, gateway, shutdown, config.shutdown_grace).await;
}
