//! Many replicas, one quota: three gateways sharing limits and tokens through a real Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    replicas(
        sim,
        redis,
        quota,
        3,
        &format!("t{}:", rand::random::<u32>()),
    )
    .await
}

/// `n` gateways on one Redis (keys under `prefix`, `max_replicas = n`) and one simulator.
async fn replicas(
    sim: &SimHandle,
    redis: &RedisServer,
    quota: &str,
    n: usize,
    prefix: &str,
) -> Vec<Arc<TestGateway>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(
            spawn_gateway(
                sim,
                GatewayOptions {
                    quota: quota.to_owned(),
                    extra: cluster_toml(redis, prefix)
                        .replace("max_replicas = 3", &format!("max_replicas = {n}")),
                    ..Default::default()
                },
            )
            .await,
        ));
    }
    out
}

/// The simulator with [`small_limits`].
pub(crate) async fn limited_sim() -> SimHandle {
    start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: small_limits(),
        ..SimConfig::default()
    })
    .await
}

/// The upstream limits of the shared-quota tests (also the network-fault tests').
pub(crate) fn small_limits() -> SimLimits {
    SimLimits {
        per_api: Some(SimLimit::new(20, Duration::from_secs(2))),
        all_env: Some(SimLimit::new(50, Duration::from_secs(1))),
        window: WindowKind::Sliding,
    }
}

/// The margin is 300 ms, not the default 100 ms: thirty flooding connections across three
/// gateways on a 2-core machine, beside the rest of the suite, can delay a request's trip to the
/// upstream past 100 ms (as in `fair.rs`).
const QUOTA: &str =
    "[quota]\nmax_wait = \"20s\"\nper_api_per_minute = 20\nper_api_window = \"2s\"\n\
    all_env_per_second = 50\nall_env_window = \"1s\"\nburst = 5\nsafety_margin = \"300ms\"\n";

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
    let sim = limited_sim().await;
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
    let sim = limited_sim().await;
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

/// A second outage soon after the first: the replica that fell back the first time starts a
/// new share, blocked for a window as every outage's is, rather than going on with the old one
/// (which has not counted what the other replica admitted through Redis in between). Two
/// replicas, so a share is half of each limit: A falls back and resumes while B never notices
/// the outage; B then takes the window through Redis; Redis goes again and A floods at once.
#[tokio::test]
async fn a_second_outage_starts_a_new_blocked_share() {
    let mut redis = RedisServer::start();
    let sim = limited_sim().await;
    let prefix = format!("t{}:", rand::random::<u32>());
    // No burst cap: B takes its slots at once, and A's old share would too.
    let pair = replicas(&sim, &redis, &QUOTA.replace("burst = 5\n", ""), 2, &prefix).await;
    let (a, b) = (pair[0].clone(), pair[1].clone());
    for gw in &pair {
        assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    }

    // The first outage: only A calls, falls back, and admits on its share once it opens.
    redis.kill();
    assert_eq!(a.start_meeting().await.status, StatusCode::OK);
    assert!(a.gateway.degraded().is_some());
    assert!(
        b.gateway.degraded().is_none(),
        "B made no call in the outage"
    );

    // Redis returns. As after a partition rather than a restart, it has its data (redis-server
    // here comes back empty: its marker is set by hand), and B's call opens the window's sets,
    // so the window is not counted as spent and B can take all of it.
    redis.restart();
    mark_kept(&mut redis_conn(&redis).await, &prefix).await;
    assert_eq!(b.start_meeting().await.status, StatusCode::OK);
    // A resumes on a call a second after its last failure, and calls only that often: the old
    // share, which it books those calls in, keeps room it could hand out in a next outage.
    let last_call = Arc::new(std::sync::Mutex::new(Instant::now()));
    eventually(Duration::from_secs(20), "A resumed shared mode", || {
        let (a, last_call) = (a.clone(), last_call.clone());
        async move {
            if last_call.lock().unwrap().elapsed() >= Duration::from_millis(1100) {
                assert_eq!(a.start_meeting().await.status, StatusCode::OK);
                *last_call.lock().unwrap() = Instant::now();
            }
            a.gateway.degraded().is_none()
        }
    })
    .await;
    let filled = flood_fleet(std::slice::from_ref(&b), 20).await;
    assert!(filled.iter().all(|s| *s == StatusCode::OK), "{filled:?}");

    // The second outage: A floods at once.
    let failed = Instant::now();
    redis.kill();
    let statuses = flood_fleet(std::slice::from_ref(&a), 10).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert!(a.gateway.degraded().is_some());
    // B made no call since: every request the upstream received after the failure is A's, and
    // none came before a whole upstream window had passed.
    let first = sim
        .requests()
        .iter()
        .filter(|r| r.at > failed && r.path_and_query.ends_with("/conferences/start"))
        .map(|r| r.at)
        .min()
        .expect("A's requests reached the upstream");
    assert!(
        first - failed >= Duration::from_secs(2),
        "A's first admission in the second outage came {:?} after it began",
        first - failed
    );
    assert_eq!(sim.rejected_429(), 0);
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
}

#[tokio::test]
async fn three_gateways_share_one_quota_under_gcra_too() {
    let redis = RedisServer::start();
    let sim = limited_sim().await;
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

/// A connection of the test's own to `redis`.
async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// Sets the marker of the keys under `prefix` (a `[cluster] key_prefix`): Redis has kept its
/// data, so windows with nothing on record start empty rather than spent.
async fn mark_kept(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let () = redis::cmd("SET")
        .arg(format!("{prefix}alive"))
        .arg("1")
        .query_async(conn)
        .await
        .expect("SET");
}

/// Now on the system clock, in µs, as Redis' `TIME` reads it (same machine).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64
}

/// The shared exact script against a real redis-server, three replicas interleaving random
/// decisions, some asking for leased slots and using them at random times within the lease
/// (or giving them back): no window of any limit holds more than its N (by Redis' own
/// admission times, and a leased slot's time of use), and under a flood each window is used
/// to the full N. Cases 0 and 1 start as after Redis lost its data (windows spent); cases 2
/// and 3 with Redis' data kept, windows empty, where the first decisions lease.
#[tokio::test]
async fn the_shared_exact_script_never_exceeds_n_and_uses_all_of_it() {
    use meetgate::cluster::{Cluster, ClusterConfig, ExactVerdict};
    use rand::Rng;
    let redis = RedisServer::start();
    let life = Duration::from_millis(60);
    for case in 0..4u32 {
        let leases = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let kept = case >= 2;
        let mut rng = rand::rng();
        // Kept data: room for a lease of 2 under half of either limit.
        let n_short: u32 = rng.random_range(if kept { 4 } else { 2 }..12);
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
                    lease: life,
                })
            })
            .collect();
        if kept {
            mark_kept(
                &mut redis_conn(&redis).await,
                &replicas[0].config().key_prefix,
            )
            .await;
        }
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
            for t in 0..3 {
                let cluster = cluster.clone();
                let admitted = admitted.clone();
                let leases = leases.clone();
                let limits = limits(&cluster);
                let keys: Vec<String> = limits.iter().map(|(k, _, _)| k.clone()).collect();
                let sparse = case % 2 == 1 && r == 0;
                // The first two tasks on each replica lease: one of them makes the first
                // decision.
                let leasing = t < 2;
                tasks.push(tokio::spawn(async move {
                    while tokio::time::Instant::now() < deadline {
                        let member = cluster.member();
                        let want = match (leasing, kept) {
                            (false, _) => 1,
                            (true, true) => rand::rng().random_range(2..=n_short / 2),
                            (true, false) => rand::rng().random_range(1..=6),
                        };
                        let asked = now_us();
                        match cluster
                            .exact(&limits, long, &member, want)
                            .await
                            .expect("redis answers")
                        {
                            ExactVerdict::Admitted { at_us, leased } => {
                                admitted.lock().expect("lock").push(at_us);
                                assert!(leased < want, "at most what was asked for");
                                if leased > 0 {
                                    leases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                // Use some leased slots, each before the lease ends (its time
                                // read first: the use happens no later), then give the rest
                                // back.
                                let mut next = 2;
                                while next <= 1 + leased && rand::rng().random_bool(0.7) {
                                    let pause = rand::rng().random_range(0..20);
                                    tokio::time::sleep(Duration::from_millis(pause)).await;
                                    let at = now_us();
                                    if at >= asked + life.as_micros() as u64 {
                                        break;
                                    }
                                    admitted.lock().expect("lock").push(at);
                                    next += 1;
                                }
                                cluster
                                    .release(&keys, &member, next, 1 + leased)
                                    .await
                                    .expect("released");
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
        if kept {
            assert!(
                leases.load(std::sync::atomic::Ordering::Relaxed) > 0,
                "case {case}: some decisions leased slots"
            );
        }
    }
}

/// A lease is granted only while every limit, with it, stays at or under half its N; leased
/// slots count against N until given back.
#[tokio::test]
async fn the_exact_script_leases_only_under_half_of_n_and_takes_slots_back() {
    use meetgate::cluster::{Cluster, ClusterConfig, ExactVerdict};
    let redis = RedisServer::start();
    let cluster = Cluster::new(ClusterConfig {
        redis_url: secrecy::SecretString::from(redis.url()),
        key_prefix: format!("l{}:", rand::random::<u32>()),
        max_replicas: std::num::NonZeroU32::new(3).expect("3"),
        timeout: Duration::from_secs(2),
        lease: Duration::from_millis(100),
    });
    let span = Duration::from_secs(60);
    let limits = vec![(cluster.key(&["b", "n"]), 10, span)];
    let keys = vec![limits[0].0.clone()];
    let decide = |want: u32| {
        let (cluster, limits) = (cluster.clone(), limits.clone());
        async move {
            let member = cluster.member();
            match cluster.exact(&limits, span, &member, want).await {
                Ok(ExactVerdict::Admitted { leased, .. }) => (member, leased),
                other => panic!("{other:?}"),
            }
        }
    };
    let conn = redis_conn(&redis).await;
    mark_kept(&mut conn.clone(), &cluster.config().key_prefix).await;
    let count = |mut conn: redis::aio::MultiplexedConnection| {
        let key = keys[0].clone();
        async move {
            let n: u32 = redis::cmd("ZCARD")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("ZCARD");
            n
        }
    };
    // 1 + 7 would pass half of 10: one slot only.
    assert_eq!(decide(8).await.1, 0);
    // 1 + 3 more: 5 of 10.
    let (member, leased) = decide(4).await;
    assert_eq!(leased, 3);
    assert_eq!(count(conn.clone()).await, 5);
    // At half: no more leases.
    assert_eq!(decide(2).await.1, 0);
    assert_eq!(count(conn.clone()).await, 6);
    // The unused slots given back free their share of N.
    cluster
        .release(&keys, &member, 3, 4)
        .await
        .expect("released");
    assert_eq!(count(conn.clone()).await, 4);
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
            // Leases off: every request decides on Redis, on its worker's connection.
            extra: format!(
                "{}lease = \"0s\"\n",
                cluster_toml(&redis, &prefix).replace("\"200ms\"", "\"2s\"")
            ),
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
    let mut conn = redis_conn(&redis).await;
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

/// The calls of `commands` Redis has run since the last `CONFIG RESETSTAT`.
async fn calls(conn: &mut redis::aio::MultiplexedConnection, commands: &[&str]) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    info.lines()
        .filter(|l| {
            commands
                .iter()
                .any(|c| l.starts_with(&format!("cmdstat_{c}:")))
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Under half its quota a replica decides most requests on slots leased ahead, without a
/// Redis round trip each, and every request is still served; with `lease = "0s"`, each
/// request is one decision on Redis.
#[tokio::test]
async fn a_replica_under_half_its_quota_serves_most_requests_on_leased_slots() {
    let redis = RedisServer::start();
    let sim = default_sim().await;
    let mut conn = redis_conn(&redis).await;
    const REQUESTS: u64 = 100;
    for (lease, most) in [("500ms", REQUESTS / 2), ("0s", REQUESTS)] {
        let prefix = format!("lease{}:", rand::random::<u32>());
        let gw = spawn_gateway(
            &sim,
            GatewayOptions {
                quota: NO_BINDING_QUOTA.to_owned(),
                extra: format!("{}lease = \"{lease}\"\n", cluster_toml(&redis, &prefix)),
                ..Default::default()
            },
        )
        .await;
        // Signed in (its token on Redis) before counting.
        assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .expect("RESETSTAT");
        for _ in 0..REQUESTS {
            assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
        }
        // The script, by hash or in full the first time.
        let scripts = calls(&mut conn, &["evalsha", "eval"]).await;
        assert_eq!(
            gw.metric("meetgate_cluster_fallback_decisions").await,
            0.0,
            "lease {lease}: no decision fell back"
        );
        // Every admission since the count began was a script call or a leased slot (the first
        // request's decision, before it, leased nothing: a new bucket asks for one slot).
        assert_eq!(
            gw.metric("meetgate_cluster_leased_admissions").await,
            (REQUESTS - scripts) as f64,
            "lease {lease}: the rest were admitted on leased slots"
        );
        if lease == "0s" {
            assert_eq!(scripts, REQUESTS, "one decision per request");
            assert_eq!(
                calls(&mut conn, &["zrem"]).await,
                0,
                "nothing leased, nothing given back"
            );
        } else {
            // Sequential requests well inside a lease each (500 ms): leases grow to 64.
            assert!(
                scripts <= most,
                "lease {lease}: {scripts} decisions on Redis for {REQUESTS} requests"
            );
        }
    }
}
