//! Quota benchmark: allowance share used under a steady flood, the most the upstream saw in any
//! window, and queue waits for bursts after idle. `cargo bench --bench quota`.
//!
//! Windows are scaled down so a run takes about half a minute: N per W with W = 6 s instead of
//! 60 s. The safety margin stays at its default of 100 ms, since it absorbs scheduling jitter
//! between the gateway and the upstream, which does not shrink with the window; the share of
//! the allowance used is therefore a little lower here than with real one-minute windows
//! (expected steady share: (N - b + 1) / (W + margin) per W of N).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
mod common;

use meetgate::simulator::{self, SimApp, SimConfig, SimLimit, SimLimits, WindowKind};

const N: u32 = 100;
const W: Duration = Duration::from_secs(6);
const BURST: u32 = 10;
const APP_ID: &str = "bench-quota-app-0123456789abcdef";
const APP_KEY: &str = "bench-quota-key";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn post(client: &HttpClient, addr: std::net::SocketAddr) -> u16 {
    let req = http::Request::post(format!("http://{addr}/v1/mmc/management/conferences/start"))
        .body(Full::new(Bytes::from_static(
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )))
        .expect("request");
    match client.request(req).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

async fn quota_gateway(
    sim: &simulator::SimHandle,
    max_wait: &str,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let quota = format!(
        "[quota]\nmax_wait = \"{max_wait}\"\nper_api_per_minute = {N}\nper_api_window = \"6s\"\n\
         all_env_per_second = 200\nburst = {BURST}\nsafety_margin = \"100ms\"\n"
    );
    common::gateway(sim, APP_ID, APP_KEY, &quota).await
}

async fn steady_flood(window: WindowKind, name: &str, windows: u32) {
    let sim = simulator::start(SimConfig {
        apps: vec![SimApp::new(APP_ID, APP_KEY)],
        limits: SimLimits {
            per_api: Some(SimLimit::new(N, W)),
            all_env: Some(SimLimit::new(200, Duration::from_secs(1))),
            window,
        },
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    // Clients queue rather than spin on refusals: a flood that waits for its slots.
    let (addr, stop) = quota_gateway(&sim, "60s").await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Warm up the token without spending the measured window.
    while post(&client, addr).await != 200 {}
    sim.clear_requests();
    let start = Instant::now();
    let run_for = W * windows;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                while start.elapsed() < run_for {
                    match post(&client, addr).await {
                        200 => ok += 1,
                        429 => refused += 1,
                        _ => {}
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r) = t.await.expect("task");
        ok += o;
        refused += r;
    }
    let elapsed = start.elapsed();
    let allowance = f64::from(N) * elapsed.as_secs_f64() / W.as_secs_f64();
    println!(
        "{name:>22}: {:>5.1} s, {ok} forwarded, {refused} refused by meetgate (429), upstream 429s {}, \
         allowance used {:.1}%, most in any {W:?} window {} (limit {N})",
        elapsed.as_secs_f64(),
        sim.rejected_429(),
        100.0 * ok as f64 / allowance,
        sim.max_in_any_window("start_meeting", W),
    );
    let _ = stop.send(());
}

async fn burst_after_idle(size: usize) {
    let sim = common::unlimited_sim(APP_ID, APP_KEY).await;
    let (addr, stop) = quota_gateway(&sim, "30s").await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Open the connections (client and upstream pools) first, then let the bucket refill, so
    // what is measured is the queue, not handshakes.
    let warm: Vec<_> = (0..size)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { post(&client, addr).await })
        })
        .collect();
    for w in warm {
        let _ = w.await;
    }
    tokio::time::sleep(W + Duration::from_secs(1)).await;
    let tasks: Vec<_> = (0..size)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let status = post(&client, addr).await;
                (status, t.elapsed())
            })
        })
        .collect();
    let mut waits = Vec::new();
    for t in tasks {
        let (status, d) = t.await.expect("task");
        if status == 200 {
            waits.push(d);
        }
    }
    waits.sort();
    println!(
        "burst of {size:>3} after idle: {} served; total latency p50 {:?} p90 {:?} max {:?}",
        waits.len(),
        percentile(&waits, 0.5),
        percentile(&waits, 0.9),
        percentile(&waits, 1.0)
    );
    let _ = stop.send(());
}

#[tokio::main]
async fn main() {
    println!("quota bench: N = {N} per {W:?} (scaled from 1 minute), burst {BURST}, margin 100 ms");
    let windows = std::env::var("QUOTA_WINDOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    steady_flood(WindowKind::Sliding, "sliding window", windows).await;
    steady_flood(
        WindowKind::Fixed {
            phase: Duration::from_millis(2_345),
        },
        "fixed window, phase 2.3s",
        windows,
    )
    .await;
    burst_after_idle(BURST as usize).await;
    burst_after_idle(N as usize / 2).await;
}
