//! `meetgate demo`: the gateway and the embedded simulator in one process, wired to trust only
//! each other, with a curl line to try.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;

use crate::simulator::{self, SimApp, SimConfig};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("simulator: {0}")]
    Simulator(#[from] simulator::SimError),
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("simulator certificate: {0}")]
    Certificate(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(#[from] crate::StartError),
}

/// The curl lines the demo prints, for a gateway on `addr`: a start with the host password,
/// then a meeting-control call with no credential at all.
pub fn curl_lines(addr: SocketAddr) -> [String; 2] {
    [
        format!(
            "curl -s -X POST http://{addr}/v1/mmc/management/conferences/start \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"conferenceID\": \"914087436\", \"password\": \"123456\"}}'"
        ),
        format!(
            "curl -s -X PUT 'http://{addr}/v1/mmc/control/conferences/lock?conferenceID=914087436' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"isLock\": 1}}'"
        ),
    ]
}

/// Starts the simulator with a fresh random app, then the gateway on `listen`, until `shutdown`.
pub async fn run(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let app_id = format!("demo{}", hex::encode(rand::random::<[u8; 8]>()));
    let app_key = hex::encode(rand::random::<[u8; 24]>());
    let sim = simulator::start(SimConfig {
        apps: vec![SimApp::new(app_id.clone(), app_key.clone())],
        token_lifetime: Duration::from_secs(3600),
        ..SimConfig::default()
    })
    .await?;
    let toml = format!(
        r#"
listen = "{listen}"
admin_listen = "127.0.0.1:0"
[upstream]
url = "{url}"
[[apps]]
name = "demo"
app_id = "{app_id}"
app_key = "{app_key}"
"#,
        url = sim.url(),
    );
    let mut config = crate::config::load_str(&toml, &HashMap::new())?;
    // The demo's key is generated and inline by design; say so once rather than warn.
    config.warnings.clear();
    let roots = CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DemoError::Certificate(e.to_string()))?;
    config.upstream.extra_roots = roots;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| DemoError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| DemoError::Bind {
        addr: listen,
        source,
    })?;
    println!("meetgate demo: gateway http://{addr} -> simulator {} (generated app {app_id}, its key stays in this process)", sim.url());
    let [start, lock] = curl_lines(addr);
    println!("Try (no credential in either; the second is a meeting-control call):\n  {start}\n  {lock}\n");
    crate::run(Arc::new(config), listener, None, shutdown).await?;
    sim.shutdown().await;
    Ok(())
}
