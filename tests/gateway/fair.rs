//! One upstream quota, many clients: weighted fair share of a bucket's slots, per-client bounds
//! and inbound rates, against the simulator's own throttling.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use meetgate::simulator::{SimConfig, SimLimit, SimLimits, WindowKind};
use sha2::{Digest, Sha256};

use crate::support::*;

const N: u32 = 50;

fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Bearer clients "a" (max_queued 30), "b" and "c" (weight 3); or one client "all" for the
/// flood without fairness to compare with.
fn clients(fair: bool) -> String {
    if fair {
        format!(
            "[[clients]]\nname = \"a\"\nkey_sha256 = \"{}\"\nmax_queued = 30\n\n\
             [[clients]]\nname = \"b\"\nkey_sha256 = \"{}\"\n\n\
             [[clients]]\nname = \"c\"\nkey_sha256 = \"{}\"\nweight = 3\n",
            sha("key-a"),
            sha("key-b"),
            sha("key-c")
        )
    } else {
        format!(
            "[[clients]]\nname = \"all\"\nkey_sha256 = \"{}\"\n",
            sha("key-all")
        )
    }
}

/// The safety margin covers a request's trip to the upstream; 180 connections flooding on a
/// 2-core CI machine, with the rest of the suite beside them, can delay one trip by more than
/// 100 ms (seen twice as upstream 429s), so these tests allow 300.
const QUOTA: &str =
    "[quota]\nmax_wait = \"30s\"\nper_api_per_minute = 50\nper_api_window = \"1s\"\n\
    all_env_per_second = 100000\nsafety_margin = \"300ms\"\n";

struct Flood {
    admitted: AtomicU64,
    refused: AtomicU64,
    stop: AtomicBool,
}

/// `conns` connections of `key` sending start_meeting back to back (after a 429, they wait its
/// Retry-After, as a client would), until stopped.
fn flood(
    gw: &Arc<TestGateway>,
    key: &'static str,
    tag: &'static str,
    conns: usize,
) -> (Arc<Flood>, Vec<tokio::task::JoinHandle<()>>) {
    let state = Arc::new(Flood {
        admitted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let tasks = (0..conns)
        .map(|_| {
            let gw = gw.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let auth = format!("Bearer {key}");
                while !state.stop.load(Ordering::Relaxed) {
                    let id = format!("{tag}-{}", uuid::Uuid::new_v4().simple());
                    let r = gw
                        .start_meeting_with(&[("authorization", &auth), ("x-request-id", &id)])
                        .await;
                    match r.status {
                        StatusCode::OK => {
                            state.admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            state.refused.fetch_add(1, Ordering::Relaxed);
                            assert_eq!(r.error_code(), "MEETGATE.QUOTA_EXCEEDED");
                            let secs = r
                                .headers
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<u64>().ok())
                                .expect("Retry-After");
                            tokio::time::sleep(Duration::from_secs(secs)).await;
                        }
                        other => panic!("{other}: {:?}", r.body),
                    }
                }
            })
        })
        .collect();
    (state, tasks)
}

async fn gateway(fair: bool) -> (meetgate::simulator::SimHandle, Arc<TestGateway>) {
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: SimLimits {
            per_api: Some(SimLimit::new(N, Duration::from_secs(1))),
            all_env: None,
            window: WindowKind::Sliding,
        },
        ..SimConfig::default()
    })
    .await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            quota: QUOTA.into(),
            extra: clients(fair),
            ..Default::default()
        },
    )
    .await;
    (sim, Arc::new(gw))
}

/// Admissions upstream within `[from, from + span)`.
fn admitted_between(sim: &meetgate::simulator::SimHandle, from: Instant, span: Duration) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.status == 200 && r.path() == START && r.at >= from && r.at < from + span)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_two_clients_shares_by_weight_and_a_third_never_waits_behind_it() {
    let (sim, gw) = gateway(true).await;
    assert_eq!(
        gw.start_meeting_with(&[("authorization", "Bearer key-b")])
            .await
            .status,
        StatusCode::OK
    );
    // More connections than each one's share of a window, so both stay backlogged.
    let (a, a_tasks) = flood(&gw, "key-a", "a", 60);
    let (c, c_tasks) = flood(&gw, "key-c", "c", 120);
    // Until both floods are queued deep: A at its max_queued, C behind its own.
    eventually(Duration::from_secs(20), "both floods queued", || {
        let (a, c) = (a.clone(), c.clone());
        async move { a.refused.load(Ordering::Relaxed) > 0 && c.admitted.load(Ordering::Relaxed) > 10 }
    })
    .await;
    let measured_from = Instant::now();
    // B: one request at a time, several times, each while both floods wait.
    let mut b_ahead = Vec::new();
    for _ in 0..4 {
        let sent = Instant::now();
        let r = gw
            .start_meeting_with(&[("authorization", "Bearer key-b")])
            .await;
        assert_eq!(r.status, StatusCode::OK, "B never gets a 429: {:?}", r.body);
        // What reached the upstream between B's send and B's own arrival: at most the slots
        // of one freeing (those admitted before B and still on their way, and the turn
        // holder's), never the floods' queues (60 and more requests).
        let b_id = r
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("id")
            .to_owned();
        let reqs = sim.requests();
        let b_at = reqs
            .iter()
            .find(|q| q.header("x-request-id") == Some(b_id.as_str()))
            .map(|q| q.at)
            .expect("B reached the upstream");
        let ahead = reqs
            .iter()
            .filter(|q| q.path() == START && q.at >= sent && q.at < b_at)
            .count();
        b_ahead.push(ahead);
        // Let the floods go on a little between B's calls: a few of their admissions.
        let seen = a.admitted.load(Ordering::Relaxed) + c.admitted.load(Ordering::Relaxed);
        eventually(Duration::from_secs(20), "the floods go on", || {
            let (a, c) = (a.clone(), c.clone());
            async move {
                a.admitted.load(Ordering::Relaxed) + c.admitted.load(Ordering::Relaxed) >= seen + 5
            }
        })
        .await;
    }
    // Enough admissions for the ratio to be measured, not guessed (SFQ's bound is one slot).
    eventually(Duration::from_secs(30), "400 admissions measured", || {
        let sim = &sim;
        async move { admitted_between(sim, measured_from, measured_from.elapsed()) >= 400 }
    })
    .await;
    let measured = measured_from.elapsed();
    let whose = |tag: &str| {
        sim.requests()
            .iter()
            .filter(|r| {
                r.status == 200
                    && r.at >= measured_from
                    && r.at < measured_from + measured
                    && r.header("x-request-id")
                        .is_some_and(|id| id.starts_with(tag))
            })
            .count()
    };
    let (da, dc) = (whose("a-") as f64, whose("c-") as f64);
    for f in [&a, &c] {
        f.stop.store(true, Ordering::Relaxed);
    }
    for t in a_tasks.into_iter().chain(c_tasks) {
        let _ = t.await;
    }
    assert!(
        b_ahead.iter().all(|n| *n <= N as usize + 1),
        "B waited behind at most one freeing of slots: {b_ahead:?}"
    );
    assert!(da > 0.0 && dc > 0.0);
    let ratio = dc / da;
    assert!(
        (2.7..=3.3).contains(&ratio),
        "C:A = {dc}:{da} = {ratio:.2}, want 3 within 10%"
    );
    assert_eq!(sim.rejected_429(), 0, "no upstream 429");
    // A's overflow was refused at once with 429, counted per client.
    let metrics = String::from_utf8_lossy(&gw.admin("/metrics").await.body).into_owned();
    assert!(
        metrics.contains("meetgate_client_refused_total{client=\"a\",reason=\"max_queued\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("meetgate_client_admitted_total{client=\"c\"}"));
    assert!(metrics.contains("meetgate_client_queue_wait_seconds_count{client=\"b\"}"));

    // Work conservation: the same flood from one client admits the same total over the
    // same span (within 2%).
    let fair_total = admitted_between(&sim, measured_from, measured);
    let (sim2, gw2) = gateway(false).await;
    let (all, all_tasks) = flood(&gw2, "key-all", "all", 180);
    eventually(Duration::from_secs(20), "the flood queued", || {
        let all = all.clone();
        async move { all.admitted.load(Ordering::Relaxed) > 10 }
    })
    .await;
    let from = Instant::now();
    eventually(
        measured + Duration::from_secs(20),
        "the span passed",
        || async move { from.elapsed() >= measured },
    )
    .await;
    all.stop.store(true, Ordering::Relaxed);
    for t in all_tasks {
        let _ = t.await;
    }
    let single_total = admitted_between(&sim2, from, measured);
    let diff = (fair_total as f64 - single_total as f64).abs() / single_total as f64;
    assert!(
        diff <= 0.02 + 1.0 / single_total as f64 * f64::from(N),
        "fair {fair_total} vs one client {single_total} over {measured:?}"
    );
}

#[tokio::test]
async fn a_client_over_its_rate_is_refused_before_it_queues() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            extra: format!(
                "[[clients]]\nname = \"r\"\nkey_sha256 = \"{}\"\nrate = \"3/m\"\n",
                sha("key-r")
            ),
            ..Default::default()
        },
    )
    .await;
    let auth = [("authorization", "Bearer key-r")];
    for _ in 0..3 {
        assert_eq!(gw.start_meeting_with(&auth).await.status, StatusCode::OK);
    }
    let before = received(&sim, START).len();
    let r = gw.start_meeting_with(&auth).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "MEETGATE.CLIENT_RATE_LIMITED");
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(
        received(&sim, START).len(),
        before,
        "the upstream saw nothing of it"
    );
}
