//! Many replicas, one quota: three gateways sharing limits and tokens through a real Redis.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use meetgate::simulator::{SimConfig, SimHandle, SimLimit, SimLimits, WindowKind};

use crate::support::*;

fn cluster_toml(redis: &RedisServer, prefix: &str) -> String {
    format!(
        "[cluster]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\nmax_replicas = 3\ntimeout = \"200ms\"\n",
        redis.url()
    )
}

/// Three gateways on one Redis and one simulator.
async fn fleet(sim: &SimHandle, redis: &RedisServer, quota: &str) -> Vec<Arc<TestGateway>> {
    let prefix = format!("t{}:", rand::random::<u32>());
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(Arc::new(
            spawn_gateway(
                sim,
                GatewayOptions {
                    quota: quota.to_owned(),
                    extra: cluster_toml(redis, &prefix),
                    ..Default::default()
                },
            )
            .await,
        ));
    }
    out
}

/// The upstream limits of the shared-quota tests (also the network-fault tests').
pub(crate) fn small_limits() -> SimLimits {
    SimLimits {
        per_api: Some(SimLimit::new(20, Duration::from_secs(2))),
        all_env: Some(SimLimit::new(50, Duration::from_secs(1))),
        window: WindowKind::Sliding,
    }
}

const QUOTA: &str =
    "[quota]\nmax_wait = \"20s\"\nper_api_per_minute = 20\nper_api_window = \"2s\"\n\
    all_env_per_second = 50\nall_env_window = \"1s\"\nburst = 5\nsafety_margin = \"100ms\"\n";

/// Every gateway floods with `per_gateway` requests from 10 clients each.
async fn flood_fleet(fleet: &[Arc<TestGateway>], per_gateway: usize) -> Vec<StatusCode> {
    let mut tasks = Vec::new();
    for gw in fleet {
        for c in 0..10 {
            let gw = gw.clone();
            let n = per_gateway / 10 + usize::from(c < per_gateway % 10);
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..n {
                    out.push(gw.start_meeting().await.status);
                }
                out
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

#[tokio::test]
async fn three_gateways_share_one_quota_without_upstream_429() {
    let redis = RedisServer::start();
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: small_limits(),
        ..SimConfig::default()
    })
    .await;
    let fleet = fleet(&sim, &redis, QUOTA).await;
    // 3 gateways x 20 = 3x the per-window limit.
    let statuses = flood_fleet(&fleet, 20).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(sim.rejected_429(), 0, "no upstream 429 across the fleet");
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
    // Each gateway alone would have allowed the full quota; together they stayed within one.
    assert_eq!(sim.sign_in_count(), 1, "one sign-in for the fleet");
}

#[tokio::test]
async fn two_hundred_requests_across_three_gateways_at_token_expiry_sign_in_once() {
    let redis = RedisServer::start();
    let sim = default_sim().await;
    let fleet = fleet(&sim, &redis, NO_BINDING_QUOTA).await;
    for gw in &fleet {
        assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    }
    assert_eq!(
        sim.sign_in_count(),
        1,
        "the fleet's first sign-in is shared"
    );
    sim.revoke_all_tokens();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let gw = fleet[i % 3].clone();
        tasks.push(tokio::spawn(async move { gw.start_meeting().await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(
        sim.sign_in_count(),
        2,
        "one sign-in for all three gateways after the token died"
    );
}

#[tokio::test]
async fn redis_down_falls_back_to_a_share_and_resumes_when_it_returns() {
    let mut redis = RedisServer::start();
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: small_limits(),
        ..SimConfig::default()
    })
    .await;
    let fleet = fleet(&sim, &redis, QUOTA).await;
    let statuses = flood_fleet(&fleet, 6).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));

    redis.kill();
    // Each replica now allows 1/3 of each limit on its own: still no upstream 429.
    let statuses = flood_fleet(&fleet, 12).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(sim.rejected_429(), 0);
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
    for gw in &fleet {
        let r = gw.admin("/readyz").await;
        assert_eq!(r.status, StatusCode::OK, "degraded but ready");
        assert!(r.json()["degraded"].is_string(), "{:?}", r.body);
    }

    redis.restart();
    eventually(
        Duration::from_secs(20),
        "shared mode resumed on every replica",
        || {
            let fleet = fleet.clone();
            async move {
                let mut all = true;
                for gw in &fleet {
                    let _ = gw.start_meeting().await;
                    all &= gw.admin("/readyz").await.json()["degraded"].is_null();
                }
                all
            }
        },
    )
    .await;
    let statuses = flood_fleet(&fleet, 12).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(
        sim.rejected_429(),
        0,
        "no fresh burst after Redis came back empty"
    );
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
}

#[tokio::test]
async fn three_gateways_share_one_quota_under_gcra_too() {
    let redis = RedisServer::start();
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: small_limits(),
        ..SimConfig::default()
    })
    .await;
    let fleet = fleet(&sim, &redis, &format!("{QUOTA}algorithm = \"gcra\"\n")).await;
    let statuses = flood_fleet(&fleet, 20).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(sim.rejected_429(), 0);
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
}

/// Closed windows `[t, t + span]` (µs): the most admissions any one holds.
fn max_in_window_us(times: &mut [u64], span: u64) -> usize {
    times.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] > span {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// The shared exact script against a real redis-server, three replicas interleaving random
/// decisions: no window of any limit holds more than its N (by Redis' own admission times),
/// and under a flood each window is used to the full N.
#[tokio::test]
async fn the_shared_exact_script_never_exceeds_n_and_uses_all_of_it() {
    use meetgate::cluster::{Cluster, ClusterConfig, ExactVerdict};
    use rand::Rng;
    let redis = RedisServer::start();
    for case in 0..4u32 {
        let mut rng = rand::rng();
        let n_short: u32 = rng.random_range(2..12);
        let n_long: u32 = rng.random_range(n_short..40);
        let (short, long) = (Duration::from_millis(200), Duration::from_millis(700));
        let prefix = format!("p{case}x{}:", rand::random::<u32>());
        let replicas: Vec<Arc<Cluster>> = (0..3)
            .map(|_| {
                Cluster::new(ClusterConfig {
                    redis_url: secrecy::SecretString::from(redis.url()),
                    key_prefix: prefix.clone(),
                    max_replicas: std::num::NonZeroU32::new(3).expect("3"),
                    timeout: Duration::from_secs(2),
                })
            })
            .collect();
        let limits = |c: &Cluster| {
            vec![
                (c.key(&["b", "short"]), n_short, short),
                (c.key(&["b", "long"]), n_long, long),
            ]
        };
        let admitted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
        let mut tasks = Vec::new();
        for (r, cluster) in replicas.iter().enumerate() {
            for _ in 0..3 {
                let cluster = cluster.clone();
                let admitted = admitted.clone();
                let limits = limits(&cluster);
                let sparse = case % 2 == 1 && r == 0;
                tasks.push(tokio::spawn(async move {
                    while tokio::time::Instant::now() < deadline {
                        match cluster.exact(&limits, long).await.expect("redis answers") {
                            ExactVerdict::Admitted { at_us } => {
                                admitted.lock().expect("lock").push(at_us)
                            }
                            // Wait as told, capped so replicas keep interleaving.
                            ExactVerdict::Wait(w) => {
                                tokio::time::sleep(w.min(Duration::from_millis(30))).await
                            }
                        }
                        if sparse {
                            let pause = rand::rng().random_range(0..40);
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("task");
        }
        let mut times = admitted.lock().expect("lock").clone();
        let short_max = max_in_window_us(&mut times, short.as_micros() as u64);
        let long_max = max_in_window_us(&mut times, long.as_micros() as u64);
        assert!(
            short_max <= n_short as usize,
            "case {case}: {short_max} > {n_short} in 200 ms"
        );
        assert!(
            long_max <= n_long as usize,
            "case {case}: {long_max} > {n_long} in 700 ms"
        );
        // A flood uses the whole allowance: some window of the tighter limit is full.
        let tight = if f64::from(n_short) / 0.2 < f64::from(n_long) / 0.7 {
            (short_max, n_short)
        } else {
            (long_max, n_long)
        };
        assert_eq!(
            tight.0, tight.1 as usize,
            "case {case}: the allowance was used"
        );
    }
}

/// Two client connections to a gateway of two workers: connections are dealt to the workers
/// in turn, so these land on different ones.
async fn one_per_worker(gw: &TestGateway) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..2 {
        conns.push(
            tokio::net::TcpStream::connect(gw.addr)
                .await
                .expect("connect"),
        );
    }
    conns
}

/// Each request worker calls Redis on a connection of its own (its reply wakes the request on
/// the worker that reads it, not through another thread), and a worker's first connection is
/// not held back by another's: none of these first decisions falls back.
#[tokio::test]
async fn each_worker_decides_on_its_own_redis_connection_without_falling_back() {
    use crate::connections::{raw_start, read_responses};
    use tokio::io::AsyncWriteExt;
    let redis = RedisServer::start();
    let sim = default_sim().await;
    let prefix = format!("t{}:", rand::random::<u32>());
    // A generous timeout: this asserts that no decision falls back, on a busy CI machine too.
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            top: "workers = 2".to_owned(),
            quota: NO_BINDING_QUOTA.to_owned(),
            extra: cluster_toml(&redis, &prefix).replace("\"200ms\"", "\"2s\""),
            ..Default::default()
        },
    )
    .await;
    eventually(Duration::from_secs(10), "ready", || {
        let gw = &gw;
        async move { gw.admin("/readyz").await.status == StatusCode::OK }
    })
    .await;
    let mut conns = one_per_worker(&gw).await;
    for round in 0..3 {
        for (i, s) in conns.iter_mut().enumerate() {
            s.write_all(&raw_start(&format!("lane-{round}-{i}")))
                .await
                .expect("write");
            assert_eq!(read_responses(s, 1).await, [200]);
        }
    }
    assert_eq!(
        gw.metric("meetgate_cluster_fallback_decisions").await,
        0.0,
        "no decision fell back"
    );
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    // The gateway's connections (all but this test's): one per worker, and one for the
    // sign-in when it ran off the workers. One for the whole replica would be 1; one per call
    // or per request, more.
    let gateways = list
        .lines()
        .filter(|l| !l.contains(" cmd=client|list "))
        .count();
    assert!(
        (2..=3).contains(&gateways),
        "one connection per worker:\n{list}"
    );
}

/// While Redis is down a replica keeps serving on its fallback share, and its lanes together
/// try to connect about once a second, not once per request.
#[tokio::test]
async fn a_down_redis_is_retried_once_a_second_per_replica_not_per_request() {
    use crate::connections::{raw_start, read_responses};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    // Not Redis: a port that takes each connection and closes it at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            drop(s);
        }
    });
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            top: "workers = 2".to_owned(),
            // Falling back, the exact limiter's share starts blocked for a window: a short one.
            quota: "[quota]\nper_api_per_minute = 1000000\nper_api_window = \"1s\"\n\
                all_env_per_second = 1000000\nmax_wait = \"10s\"\n"
                .to_owned(),
            extra: format!(
                "[cluster]\nredis_url = \"redis://127.0.0.1:{port}/0\"\nkey_prefix = \"down:\"\nmax_replicas = 3\ntimeout = \"200ms\"\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let mut conns = one_per_worker(&gw).await;
    // Requests for a few seconds: each decision finds no connection and falls back.
    let start = std::time::Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(3) {
        for (i, s) in conns.iter_mut().enumerate() {
            s.write_all(&raw_start(&format!("down-{sent}-{i}")))
                .await
                .expect("write");
            assert_eq!(read_responses(s, 1).await, [200], "served on the fallback");
            sent += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let attempts = accepted.load(Ordering::Relaxed);
    assert_eq!(gw.metric("meetgate_cluster_degraded").await, 1.0);
    assert!(attempts >= 1, "it tried");
    // Each lane's first call may try (3 lanes at most: two workers and the sign-in's), then one
    // attempt a second; the redis crate retries a failed connection once within an attempt
    // (counted with room to spare: a retry per request would be one or more per request).
    let bound = 3 * (3 + elapsed.ceil() as usize + 1);
    assert!(
        attempts <= bound && attempts < sent,
        "{attempts} connections for {sent} requests in {elapsed:.1} s (at most {bound})"
    );
}
