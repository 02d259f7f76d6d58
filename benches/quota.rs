//! Quota benchmark, GCRA and the exact limiter side by side in one run: the share of the
//! upstream's allowance used under a flood, the most the upstream saw in any window, upstream
//! 429s, against sliding windows and fixed windows at a random phase; and the queue wait of a
//! burst of N/2 and of N after idle. `cargo bench --bench quota`.
//!
//! Windows are scaled down so a run takes a couple of minutes: N per W with W = 6 s instead of
//! 60 s. The safety margin stays at its default of 100 ms (it absorbs the time between a slot
//! and the request's arrival upstream, which does not shrink with the window), so the
//! physical limit of the allowance is N per (W + margin): 98.4% of N per W here, 99.8% with
//! real one-minute windows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
mod common;

use meetgate::simulator::{self, SimApp, SimConfig, SimLimit, SimLimits, WindowKind};

const N: u32 = 100;
const W: Duration = Duration::from_secs(6);
const MARGIN: Duration = Duration::from_millis(100);
const APP_ID: &str = "bench-quota-app-0123456789abcdef";
const APP_KEY: &str = "bench-quota-key";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The limiters compared: name and `[quota]` lines.
const ALGORITHMS: [(&str, &str); 2] = [
    ("gcra", "algorithm = \"gcra\"\nburst = 10\n"),
    ("exact", "algorithm = \"exact\"\n"),
];

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
    algorithm: &str,
    max_wait: &str,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    Arc<meetgate::Gateway>,
) {
    let quota = format!(
        "[quota]\n{algorithm}max_wait = \"{max_wait}\"\nper_api_per_minute = {N}\nper_api_window = \"6s\"\n\
         all_env_per_second = 200\nsafety_margin = \"100ms\"\n"
    );
    common::gateway_handle(sim, APP_ID, APP_KEY, &quota).await
}

async fn steady_flood(name: &str, algorithm: &str, window: WindowKind, label: &str, windows: u32) {
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
    let (addr, stop, _) = quota_gateway(&sim, algorithm, "60s").await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Warm up the token, then wait a window so the flood starts after idle.
    while post(&client, addr).await != 200 {}
    tokio::time::sleep(W + MARGIN).await;
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
    let span = W + MARGIN;
    let (spans, per_w) = common::steady_share(&sim, start + run_for, W, MARGIN);
    println!(
        "{name:>5} {label:>24}: {ok:>4} forwarded in {:>4.1} s, upstream 429s {}, steady share {:>5.1}% of N per W ({:>5.1}% of the physical N per W + margin) over {spans} spans, most in any {W:?} window {} (limit {N}), {refused} refused by meetgate",
        elapsed.as_secs_f64(),
        sim.rejected_429(),
        100.0 * per_w / f64::from(N),
        100.0 * per_w / f64::from(N) * span.as_secs_f64() / W.as_secs_f64(),
        sim.max_in_any_window("start_meeting", W),
    );
    let _ = stop.send(());
}

/// The queue waits of the burst's requests, from the gateway's own histogram: how many waited
/// at most 1 ms and 5 ms, and the bucket p99 falls in.
fn queue_waits(gateway: &meetgate::Gateway, before: &[(f64, u64)]) -> String {
    let text = gateway.metrics().encode();
    let now = buckets(&text);
    let count = |b: &[(f64, u64)], le: f64| {
        b.iter()
            .find(|(l, _)| (*l - le).abs() < 1e-9)
            .map_or(0, |(_, c)| *c)
    };
    let total = now.last().map_or(0, |(_, c)| *c) - before.last().map_or(0, |(_, c)| *c);
    let within = |le: f64| count(&now, le) - count(before, le);
    let p99 = now
        .iter()
        .find(|(le, _)| within(*le) as f64 >= total as f64 * 0.99)
        .map_or(f64::INFINITY, |(le, _)| *le);
    format!(
        "queue wait <= 1 ms: {}/{total}, <= 8 ms: {}/{total}, p99 <= {:.1} ms",
        within(0.001),
        within(0.008),
        p99 * 1000.0
    )
}

/// `(le, cumulative count)` of the start_meeting queue-wait histogram, `+Inf` last.
fn buckets(text: &str) -> Vec<(f64, u64)> {
    text.lines()
        .filter(|l| {
            l.starts_with("meetgate_queue_wait_seconds_bucket") && l.contains("start_meeting")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

async fn burst_after_idle(name: &str, algorithm: &str, size: usize) {
    let sim = common::unlimited_sim(APP_ID, APP_KEY).await;
    let (addr, stop, gateway) = quota_gateway(&sim, algorithm, "30s").await;
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
    tokio::time::sleep(W + MARGIN + Duration::from_secs(1)).await;
    let before = buckets(&gateway.metrics().encode());
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
    let mut latencies = Vec::new();
    for t in tasks {
        let (status, d) = t.await.expect("task");
        if status == 200 {
            latencies.push(d);
        }
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:>5} burst of {size:>3} after idle: {} served, {}; end to end p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        queue_waits(&gateway, &before),
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
    );
    let _ = stop.send(());
}

/// A start_meeting as bearer client `key`: its status and end-to-end time.
async fn timed_post(
    client: HttpClient,
    addr: std::net::SocketAddr,
    key: &'static str,
) -> (u16, Duration) {
    let req = http::Request::post(format!("http://{addr}/v1/mmc/management/conferences/start"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )))
        .expect("request");
    let t = Instant::now();
    let status = client.request(req).await.map_or(0, |r| r.status().as_u16());
    (status, t.elapsed())
}

/// Three clients on one bucket: A floods (40 connections), C (weight 3) floods (40), B sends
/// one request every second; each client's admissions and end-to-end waits. The bucket allows
/// 30 per window, fewer than either flood keeps waiting, so both stay backlogged (with the
/// exact limiter a window's slots free in groups; a group larger than a flood's queue serves
/// all of it, and the rest goes to the other: work conservation, not unfairness).
const N_SHARED: u32 = 30;

async fn three_clients(seconds: u64) {
    use sha2::{Digest, Sha256};
    let sha = |k: &str| hex::encode(Sha256::digest(k.as_bytes()));
    let sim = simulator::start(SimConfig {
        apps: vec![SimApp::new(APP_ID, APP_KEY)],
        limits: SimLimits {
            per_api: Some(SimLimit::new(N_SHARED, W)),
            all_env: None,
            window: WindowKind::Sliding,
        },
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let extra = format!(
        "[quota]\nmax_wait = \"60s\"\nper_api_per_minute = {N_SHARED}\nper_api_window = \"6s\"\n\
         all_env_per_second = 100000\nsafety_margin = \"100ms\"\n\
         [[clients]]\nname = \"a\"\nkey_sha256 = \"{}\"\n\
         [[clients]]\nname = \"b\"\nkey_sha256 = \"{}\"\n\
         [[clients]]\nname = \"c\"\nkey_sha256 = \"{}\"\nweight = 3\n",
        sha("ka"),
        sha("kb"),
        sha("kc")
    );
    let (addr, stop, _) = common::gateway_handle(&sim, APP_ID, APP_KEY, &extra).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let send = move |key: &'static str| timed_post(client.clone(), addr, key);
    while send("kb").await.0 != 200 {}
    let start = Instant::now();
    let run_for = Duration::from_secs(seconds);
    let flood = |key: &'static str| {
        (0..40)
            .map(|_| {
                let send = send.clone();
                tokio::spawn(async move {
                    let mut waits = Vec::new();
                    while start.elapsed() < run_for {
                        let (status, d) = send(key).await;
                        // Counted in the steady state: not the first window (its slots went
                        // first come, first served, before anyone waited) nor what drains after
                        // the run, with no competition left.
                        let t = start.elapsed();
                        if status == 200 && t > W + MARGIN + Duration::from_secs(1) && t < run_for {
                            waits.push(d);
                        }
                    }
                    waits
                })
            })
            .collect::<Vec<_>>()
    };
    let (a, c) = (flood("ka"), flood("kc"));
    let mut b = Vec::new();
    let mut b_refused = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < run_for {
        tick.tick().await;
        let (status, d) = send("kb").await;
        if status == 200 {
            b.push(d);
        } else {
            b_refused += 1;
        }
    }
    let collect = |tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>| async move {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all.sort();
        all
    };
    let (a, c) = (collect(a).await, collect(c).await);
    b.sort();
    let at = |v: &[Duration], q: f64| {
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let total = (a.len() + b.len() + c.len()) as f64;
    for (name, v) in [
        ("A (weight 1, flood)", &a),
        ("B (weight 1, 1/s)", &b),
        ("C (weight 3, flood)", &c),
    ] {
        println!(
            "  {name}: {:>4} admitted ({:>4.1}%), wait p50 {:>7.1} ms, p99 {:>7.1} ms",
            v.len(),
            100.0 * v.len() as f64 / total,
            at(v, 0.5),
            at(v, 0.99)
        );
    }
    println!(
        "  C:A = {:.2}; B refused {b_refused}; upstream 429s {}",
        c.len() as f64 / a.len().max(1) as f64,
        sim.rejected_429()
    );
    let _ = stop.send(());
}

#[tokio::main]
async fn main() {
    println!(
        "quota bench: N = {N} per {W:?} (scaled from 1 minute), margin 100 ms; gcra with burst 10, exact with no burst cap"
    );
    let windows = std::env::var("QUOTA_WINDOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let phase = Duration::from_millis(rand::random::<u64>() % W.as_millis() as u64);
    for (name, algorithm) in ALGORITHMS {
        steady_flood(
            name,
            algorithm,
            WindowKind::Sliding,
            "sliding windows",
            windows,
        )
        .await;
        steady_flood(
            name,
            algorithm,
            WindowKind::Fixed { phase },
            &format!("fixed windows, phase {:.2}s", phase.as_secs_f64()),
            windows,
        )
        .await;
    }
    for (name, algorithm) in ALGORITHMS {
        burst_after_idle(name, algorithm, N as usize / 2).await;
        burst_after_idle(name, algorithm, N as usize).await;
    }
    let seconds = std::env::var("QUOTA_CLIENTS_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    println!("three clients on one bucket (exact, N = {N_SHARED} per {W:?}), {seconds} s:");
    three_clients(seconds).await;
}
