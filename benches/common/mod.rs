//! What the in-process benchmarks share: a gateway in front of a simulator on loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use meetgate::simulator::{self, SimApp, SimConfig, SimHandle, SimLimits};
use tokio::sync::oneshot;

#[allow(dead_code)]
/// Runs a gateway in this process in front of `sim`, signing in as (app_id, app_key), with
/// `extra` TOML appended (sections only). Returns its address and its stop switch.
pub(crate) async fn gateway(
    sim: &SimHandle,
    app_id: &str,
    app_key: &str,
    extra: &str,
) -> (SocketAddr, oneshot::Sender<()>) {
    let (addr, stop, _) = gateway_handle(sim, app_id, app_key, extra).await;
    (addr, stop)
}

/// As [`gateway`], also returning the gateway itself (its metrics, its quota state).
#[allow(dead_code)]
pub(crate) async fn gateway_handle(
    sim: &SimHandle,
    app_id: &str,
    app_key: &str,
    extra: &str,
) -> (SocketAddr, oneshot::Sender<()>, Arc<meetgate::Gateway>) {
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
    let gateway = meetgate::Gateway::new(Arc::new(config), Arc::new(meetgate::clock::SystemClock))
        .expect("gateway");
    let served = gateway.clone();
    tokio::spawn(async move {
        meetgate::serve(served, listener, None, async {
            let _ = rx.await;
        })
        .await;
    });
    (addr, tx, gateway)
}

#[allow(dead_code)]
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

/// The steady share of a flood that started at `start` and stopped submitting at `stop`:
/// admissions upstream over whole spans of `window + margin` after the first one (the burst
/// that starts a flood after idle is not a rate), as (spans measured, admissions per window).
#[allow(dead_code)]
pub(crate) fn steady_share(
    sim: &SimHandle,
    stop: std::time::Instant,
    window: std::time::Duration,
    margin: std::time::Duration,
) -> (f64, f64) {
    let mut times: Vec<std::time::Instant> = sim
        .requests()
        .iter()
        .filter(|r| r.status == 200 && r.path().ends_with("/start"))
        .map(|r| r.at)
        .collect();
    times.sort();
    let Some(&first) = times.first() else {
        return (0.0, 0.0);
    };
    let span = window + margin;
    let t1 = first + span;
    let spans = (stop.saturating_duration_since(t1).as_secs_f64() / span.as_secs_f64()).floor();
    if spans < 1.0 {
        return (0.0, 0.0);
    }
    let t2 = t1 + span.mul_f64(spans);
    let in_steady = times.iter().filter(|t| **t > t1 && **t <= t2).count();
    (
        spans,
        in_steady as f64 / (t2 - t1).as_secs_f64() * window.as_secs_f64(),
    )
}
