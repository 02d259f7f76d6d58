//! Shared (Redis) mode: added latency and CPU per request against single-instance mode, and
//! three replicas on one quota with GCRA and the exact limiter side by side (the allowance
//! used under a flood, the most in any window, upstream 429s, bursts after idle).
//! `cargo bench --bench cluster` (needs `redis-server` and `redis-benchmark` on PATH).
//! Everything runs on loopback: the simulator and the gateways in this process, Redis beside
//! it. Each round also runs `redis-benchmark` (one connection, sequential) against the same
//! redis-server with the very script call the shared gateway sends (captured with MONITOR,
//! its keys renamed and its member made unique per call) and with PING: the floor meetgate's
//! added latency and CPU are compared with.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
mod common;

const APP_ID: &str = "bench-cluster-app-0123456789abcd";
const APP_KEY: &str = "bench-cluster-key";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// CPU time (user + system) of a process, from /proc: its own (`children` false) or that of
/// its children it waited for (`children` true).
fn cpu_fields(pid: u32, children: bool) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let at = if children { [13, 14] } else { [11, 12] };
    let ticks: u64 = at
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

fn cpu_of(pid: u32) -> Duration {
    cpu_fields(pid, false)
}

/// The arguments of the first EVALSHA the shared gateway at `addr` sends, read with MONITOR.
async fn capture_script_call(
    redis_port: u16,
    client: &HttpClient,
    addr: SocketAddr,
) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut monitor = tokio::net::TcpStream::connect(("127.0.0.1", redis_port))
        .await
        .expect("redis");
    monitor.write_all(b"MONITOR\r\n").await.expect("MONITOR");
    let mut lines = BufReader::new(monitor).lines();
    assert_eq!(
        lines.next_line().await.expect("+OK").as_deref(),
        Some("+OK")
    );
    let (posted, line) = tokio::join!(post(client, addr), async {
        loop {
            let line = lines.next_line().await.expect("line").expect("open");
            if line.to_ascii_uppercase().contains("\"EVALSHA\"") {
                return line;
            }
        }
    });
    assert!(posted, "shared gateway");
    // `+<time> [<db> <client>] "arg" "arg" ...`, each argument quoted with \ escapes.
    let mut args = Vec::new();
    let mut chars = line[line.find('"').expect("quoted")..].chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut arg = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => arg.push(chars.next().unwrap_or('\\')),
                c => arg.push(c),
            }
        }
        args.push(arg);
    }
    args
}

/// The same call made `n` times in a row from this process with the redis crate's
/// ConnectionManager, on the runtime that calls it: p50 per call.
async fn crate_round_trip(port: u16, n: u64, command: &[String]) -> Duration {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).expect("url");
    let mut conn = client.get_connection_manager().await.expect("redis");
    let mut lat = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut cmd = redis::cmd(&command[0]);
        for a in &command[1..] {
            cmd.arg(a.replace("__rand_int__", &i.to_string()));
        }
        let t = Instant::now();
        let _: redis::Value = cmd.query_async(&mut conn).await.expect("call");
        lat.push(t.elapsed());
    }
    lat.sort();
    lat[lat.len() / 2]
}

/// `redis-benchmark -c 1 -n n` running `command`: (p50, requests/s, CPU of redis-benchmark +
/// redis-server).
fn redis_benchmark(
    port: u16,
    n: u64,
    command: &[String],
    redis_pid: u32,
) -> (Duration, f64, Duration) {
    let me = std::process::id();
    let cpu0 = cpu_fields(me, true) + cpu_of(redis_pid);
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            "1",
            "-n",
            &n.to_string(),
        ])
        .args(["-r", "1000000000", "--csv"])
        .args(command)
        .output()
        .expect("redis-benchmark on PATH");
    let cpu = cpu_fields(me, true) + cpu_of(redis_pid) - cpu0;
    let csv = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    let row: Vec<String> = csv
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("redis-benchmark printed {csv:?}"))
        .rsplitn(7, ',')
        .map(|f| f.trim_matches('"').to_owned())
        .collect();
    let field = |i: usize| row[i].parse::<f64>().expect("number");
    // rsplitn: max, p99, p95, p50, min, avg, then "test","rps".
    let rps = row[6]
        .rsplit_once(',')
        .map_or(0.0, |(_, r)| r.trim_matches('"').parse().expect("rps"));
    (Duration::from_secs_f64(field(3) / 1000.0), rps, cpu)
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

/// Scaled windows for the quota comparison: N per W, as in `benches/quota.rs`.
const N: u32 = 100;
const W: Duration = Duration::from_secs(6);
const MARGIN: Duration = Duration::from_millis(100);

/// Three gateways on one Redis (a fresh key prefix) with `algorithm`, in front of `sim`.
async fn replicas(
    sim: &meetgate::simulator::SimHandle,
    redis_port: u16,
    algorithm: &str,
) -> Vec<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let prefix = format!("b{}:", rand::random::<u32>());
    let quota = format!(
        "[quota]\n{algorithm}max_wait = \"60s\"\nper_api_per_minute = {N}\nper_api_window = \"6s\"\n\
         all_env_per_second = 200\nsafety_margin = \"100ms\"\n\
         [cluster]\nredis_url = \"redis://127.0.0.1:{redis_port}/0\"\nkey_prefix = \"{prefix}\"\nmax_replicas = 3\n"
    );
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(common::gateway(sim, APP_ID, APP_KEY, &quota).await);
    }
    out
}

async fn fleet_flood(redis_port: u16, name: &str, algorithm: &str) {
    use meetgate::simulator::{SimApp, SimConfig, SimLimit, SimLimits, WindowKind};
    let sim = meetgate::simulator::start(SimConfig {
        apps: vec![SimApp::new(APP_ID, APP_KEY)],
        limits: SimLimits {
            per_api: Some(SimLimit::new(N, W)),
            all_env: Some(SimLimit::new(200, Duration::from_secs(1))),
            window: WindowKind::Sliding,
        },
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let fleet = replicas(&sim, redis_port, algorithm).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for (addr, _) in &fleet {
        while !post(&client, *addr).await {}
    }
    tokio::time::sleep(W + MARGIN).await;
    sim.clear_requests();
    let start = Instant::now();
    let run_for = W * 5;
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let client = client.clone();
            let addr = fleet[i % 3].0;
            tokio::spawn(async move {
                let mut ok = 0u64;
                while start.elapsed() < run_for {
                    ok += u64::from(post(&client, addr).await);
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("task");
    }
    let (spans, per_w) = common::steady_share(&sim, start + run_for, W, MARGIN);
    println!(
        "{name:>5} 3 replicas, flood: {ok} forwarded, upstream 429s {}, steady share {:.1}% of N per W ({:.1}% of the physical N per W + margin) over {spans} spans, most in any {W:?} window {} (limit {N})",
        sim.rejected_429(),
        100.0 * per_w / f64::from(N),
        100.0 * per_w / f64::from(N) * (W + MARGIN).as_secs_f64() / W.as_secs_f64(),
        sim.max_in_any_window("start_meeting", W),
    );
    for size in [N as usize / 2, N as usize] {
        tokio::time::sleep(W + MARGIN + Duration::from_secs(1)).await;
        let tasks: Vec<_> = (0..size)
            .map(|i| {
                let client = client.clone();
                let addr = fleet[i % 3].0;
                tokio::spawn(async move {
                    let t = Instant::now();
                    (post(&client, addr).await, t.elapsed())
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            let (ok, d) = t.await.expect("task");
            if ok {
                lat.push(d);
            }
        }
        lat.sort();
        let at = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
        println!(
            "{name:>5} 3 replicas, burst of {size:>3} after idle: {} served, end to end p50 {:.1} ms, p99 {:.1} ms",
            lat.len(),
            at(0.5).as_secs_f64() * 1000.0,
            at(0.99).as_secs_f64() * 1000.0
        );
    }
    for (_, stop) in fleet {
        let _ = stop.send(());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("CLUSTER_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
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
    // Shared with leases (the default) and with a decision on Redis per request, each on
    // keys of its own.
    let (shared, stop2) = common::gateway(
        &sim,
        APP_ID,
        APP_KEY,
        &format!("{NO_BINDING}[cluster]\nredis_url = \"redis://127.0.0.1:{port}/0\"\nkey_prefix = \"lease:\"\n"),
    )
    .await;
    let (per_request, stop3) = common::gateway(
        &sim,
        APP_ID,
        APP_KEY,
        &format!("{NO_BINDING}[cluster]\nredis_url = \"redis://127.0.0.1:{port}/0\"\nkey_prefix = \"each:\"\nlease = \"0s\"\n"),
    )
    .await;
    // The script call meetgate makes for one request's decision, replayed by redis-benchmark
    // on keys of its own ("rb:" before each), its member unique per call.
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    while !post(&client, shared).await {}
    while !post(&client, per_request).await {}
    let mut script = capture_script_call(port, &client, per_request).await;
    let keys: usize = script[2].parse().expect("numkeys");
    for k in &mut script[3..3 + keys] {
        k.insert_str(0, "rb:");
    }
    // ARGV ends with the member, the slots asked for (1) and the lease's life (0).
    let member = script.len() - 3;
    script[member] = "rb:__rand_int__".to_owned();
    let rb_n: u64 = std::env::var("CLUSTER_RB_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rounds: usize = std::env::var("CLUSTER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
        .max(1);
    println!("cluster bench: 1 connection, sequential POSTs, {secs} s per mode, {rounds} paired rounds (the order of single and shared alternating); redis-benchmark -c 1 -n {rb_n}");
    println!(
        "script call: {} ({} keys, {} args)",
        script[..2].join(" "),
        keys,
        script.len() - 3 - keys
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // Per mode with Redis: the ratio of its added p50 to the script's round trip, per round.
    let mut ratios = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        let mut modes = [
            ("single", single, None),
            ("shared", shared, Some(redis.id())),
            ("shared, lease off", per_request, Some(redis.id())),
        ];
        if round % 2 == 0 {
            modes.reverse();
        }
        let mut measured = [(Duration::ZERO, 0.0); 3];
        for (i, (name, addr, pid)) in modes.into_iter().enumerate() {
            let (n, p50, cpu) = run(addr, secs, pid).await;
            let per = cpu.as_secs_f64() * 1e6 / n as f64;
            println!(
                "round {round} {name:>17}: {n:>6} requests, {:>7.0} req/s, p50 {:>6.1} us, CPU {per:>5.1} us/request (this process{})",
                n as f64 / secs as f64,
                us(p50),
                if pid.is_some() { " + redis-server" } else { "" },
            );
            measured[if round % 2 == 0 { 2 - i } else { i }] = (p50, per);
        }
        let mut floor = Vec::new();
        for (name, command) in [
            ("script", script.clone()),
            ("PING", vec!["PING".to_owned()]),
        ] {
            let (p50, rps, cpu) = redis_benchmark(port, rb_n, &command, redis.id());
            let per = cpu.as_secs_f64() * 1e6 / rb_n as f64;
            println!(
                "round {round} redis-benchmark {name:>6}: {rb_n:>6} calls, {rps:>7.0} calls/s, p50 {:>6.1} us, CPU {per:>5.1} us/call (redis-benchmark + redis-server)",
                us(p50),
            );
            floor.push((p50, per));
        }
        let crate_calls = rb_n / 2;
        let here = crate_round_trip(port, crate_calls, &script).await;
        // The same on a single-threaded runtime, as on one of meetgate's workers: the
        // connection's driver task and the caller on one thread.
        let one_thread = {
            let script = script.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(crate_round_trip(port, crate_calls, &script))
            })
            .join()
            .expect("thread")
        };
        println!(
            "round {round} redis crate (ConnectionManager, this process) script: p50 {:>6.1} us from this multi-threaded runtime, {:>6.1} us on a single-threaded one",
            us(here),
            us(one_thread)
        );
        for (m, name) in [(1, "shared"), (2, "shared, lease off")] {
            let added = us(measured[m].0) - us(measured[0].0);
            let ratio = added / us(floor[0].0);
            ratios[m - 1].push(ratio);
            println!(
                "round {round} {name} - single: p50 {added:+.1} us = {ratio:.2}x the script's round trip ({:.1} us; PING {:.1} us), CPU {:+.1} us/request (the script call: {:.1} us)",
                us(floor[0].0),
                us(floor[1].0),
                measured[m].1 - measured[0].1,
                floor[0].1,
            );
        }
    }
    for (ratios, name) in ratios.iter_mut().zip(["shared", "shared, lease off"]) {
        ratios.sort_by(f64::total_cmp);
        let mid = ratios.len() / 2;
        let median = if ratios.len() % 2 == 0 {
            (ratios[mid - 1] + ratios[mid]) / 2.0
        } else {
            ratios[mid]
        };
        println!(
            "{name} - single over the script's round trip: median {median:.2}x [{:.2}-{:.2}], at or under 1.5x in {} of {rounds} rounds",
            ratios[0],
            ratios[ratios.len() - 1],
            ratios.iter().filter(|r| **r <= 1.5).count(),
        );
    }
    let _ = stop1.send(());
    let _ = stop2.send(());
    let _ = stop3.send(());
    if std::env::var_os("CLUSTER_SKIP_QUOTA").is_none() {
        println!("three replicas, one quota: N = {N} per {W:?} (scaled from 1 minute), margin 100 ms, 30 clients");
        for (name, algorithm) in [
            ("gcra", "algorithm = \"gcra\"\nburst = 10\n"),
            ("exact", "algorithm = \"exact\"\n"),
        ] {
            fleet_flood(port, name, algorithm).await;
        }
    }
    let _ = redis.kill();
    let _ = redis.wait();
}
