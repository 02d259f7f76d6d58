//! What the in-process benchmarks share: a gateway in front of a simulator on loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use meetgate::simulator::{self, SimApp, SimConfig, SimHandle, SimLimits};
use tokio::sync::oneshot;

/// Runs a gateway in this process in front of `sim`, signing in as (app_id, app_key), with
/// `extra` TOML appended (sections only). Returns its address and its stop switch.
pub(crate) async fn gateway(
    sim: &SimHandle,
    app_id: &str,
    app_key: &str,
    extra: &str,
) -> (SocketAddr, oneshot::Sender<()>) {
    let dir = std::env::temp_dir().join(format!(
        "meetgate-bench-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, sim.ca_pem()).expect("ca");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\nca_file = {:?}\n\
         [log]\nlevel = \"warn\"\n[[apps]]\napp_id = \"{app_id}\"\napp_key = \"{app_key}\"\n{extra}",
        sim.url(),
        ca.display().to_string()
    );
    let config = meetgate::config::load_str(&toml, &Default::default()).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = meetgate::run(Arc::new(config), listener, None, async {
            let _ = rx.await;
        })
        .await;
    });
    (addr, tx)
}

/// The simulator with no rate limits, knowing the one app (app_id, app_key).
pub(crate) async fn unlimited_sim(app_id: &str, app_key: &str) -> SimHandle {
    simulator::start(SimConfig {
        apps: vec![SimApp::new(app_id, app_key)],
        limits: SimLimits::unlimited(),
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}
