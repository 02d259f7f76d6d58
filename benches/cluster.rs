//! Shared (Redis) mode against single-instance mode: added latency and CPU per request.
//! `cargo bench --bench cluster` (needs `redis-server` on PATH). Everything runs on loopback:
//! the simulator and the gateway in this process, Redis beside it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
mod common;

const APP_ID: &str = "bench-cluster-app-0123456789abcd";
const APP_KEY: &str = "bench-cluster-key";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// CPU time (user + system) of a process, from /proc.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

async fn post(client: &HttpClient, addr: std::net::SocketAddr) -> bool {
    let req = http::Request::post(format!("http://{addr}/v1/mmc/management/conferences/start"))
        .body(Full::new(Bytes::from_static(
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )))
        .expect("request");
    matches!(client.request(req).await, Ok(r) if r.status() == 200)
}

/// Sequential requests on one connection for `secs`: (requests, p50, process+redis CPU).
async fn run(
    addr: std::net::SocketAddr,
    secs: u64,
    redis_pid: Option<u32>,
) -> (u64, Duration, Duration) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    while !post(&client, addr).await {}
    let me = std::process::id();
    let cpu0 = cpu_of(me) + redis_pid.map_or(Duration::ZERO, cpu_of);
    let start = Instant::now();
    let mut lat = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        if post(&client, addr).await {
            lat.push(t.elapsed());
        }
    }
    let cpu = cpu_of(me) + redis_pid.map_or(Duration::ZERO, cpu_of) - cpu0;
    lat.sort();
    (lat.len() as u64, lat[lat.len() / 2], cpu)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("CLUSTER_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    // Ready once it accepts connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "redis-server never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sim = common::unlimited_sim(APP_ID, APP_KEY).await;
    const NO_BINDING: &str =
        "[quota]\nper_api_per_minute = 1000000\nall_env_per_second = 1000000\nburst = 100000\n";
    let (single, stop1) = common::gateway(&sim, APP_ID, APP_KEY, NO_BINDING).await;
    let (shared, stop2) = common::gateway(
        &sim,
        APP_ID,
        APP_KEY,
        &format!("{NO_BINDING}[cluster]\nredis_url = \"redis://127.0.0.1:{port}/0\"\n"),
    )
    .await;
    println!("cluster bench: 1 connection, sequential POSTs, {secs} s per mode, 2 rounds");
    for round in 1..=2 {
        for (name, addr, pid) in [
            ("single", single, None),
            ("shared", shared, Some(redis.id())),
        ] {
            let (n, p50, cpu) = run(addr, secs, pid).await;
            println!(
                "round {round} {name:>6}: {n:>6} requests, {:>7.0} req/s, p50 {:>6.1} us, CPU {:>5.1} us/request (this process{})",
                n as f64 / secs as f64,
                p50.as_secs_f64() * 1e6,
                cpu.as_secs_f64() * 1e6 / n as f64,
                if pid.is_some() { " + redis-server" } else { "" },
            );
        }
    }
    let _ = stop1.send(());
    let _ = stop2.send(());
    let _ = redis.kill();
    let _ = redis.wait();
}
