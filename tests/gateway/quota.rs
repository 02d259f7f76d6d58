//! Quotas end to end: no upstream 429 under floods, pacing, shared quotas, 429 replay.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use meetgate::simulator::{Fault, SimConfig, SimHandle, SimLimit, SimLimits, WindowKind};

use crate::support::*;

/// The upstream allows 20 per 2 s per API and 50 per second overall.
fn small_limits(window: WindowKind) -> SimLimits {
    SimLimits {
        per_api: Some(SimLimit::new(20, Duration::from_secs(2))),
        all_env: Some(SimLimit::new(50, Duration::from_secs(1))),
        window,
    }
}

/// The same limits on the gateway's side.
fn gateway_quota(mode: &str, max_wait: &str) -> String {
    format!(
        "[quota]\nmode = \"{mode}\"\nmax_wait = \"{max_wait}\"\nper_api_per_minute = 20\nper_api_window = \"2s\"\n\
         all_env_per_second = 50\nall_env_window = \"1s\"\nburst = 5\nsafety_margin = \"50ms\"\n"
    )
}

fn random_phase() -> WindowKind {
    WindowKind::Fixed {
        phase: Duration::from_millis(rand::random::<u64>() % 2000),
    }
}

async fn limited_sim(window: WindowKind) -> SimHandle {
    start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: small_limits(window),
        ..SimConfig::default()
    })
    .await
}

/// 60 requests (3x the limit) from 50 concurrent clients; returns each status and whether a
/// 429 carried `Retry-After` and meetgate's code.
async fn flood(gw: &Arc<TestGateway>, n: usize) -> Vec<(StatusCode, bool, String)> {
    let clients = 50;
    let per_client = n.div_ceil(clients);
    let results = concurrently(clients, |c| {
        let gw = gw.clone();
        async move {
            let mut out = Vec::new();
            for i in 0..per_client {
                if c * per_client + i >= n {
                    break;
                }
                let r = gw.start_meeting().await;
                let code = if r.status == StatusCode::TOO_MANY_REQUESTS {
                    r.error_code()
                } else {
                    String::new()
                };
                out.push((r.status, r.headers.contains_key("retry-after"), code));
            }
            out
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

async fn flood_without_upstream_429(window: WindowKind) {
    let sim = limited_sim(window).await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                quota: gateway_quota("pace", "1s"),
                ..Default::default()
            },
        )
        .await,
    );
    let results = flood(&gw, 60).await;
    assert_eq!(results.len(), 60);
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    for (status, retry_after, code) in &results {
        if *status != StatusCode::OK {
            assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS);
            assert!(retry_after, "429 without Retry-After");
            assert_eq!(code, "MEETGATE.QUOTA_EXCEEDED");
        }
    }
    assert!(ok >= 5, "at least the burst got through ({ok})");
    assert_eq!(
        sim.rejected_429(),
        0,
        "the upstream never refused a request for quota"
    );
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
}

#[tokio::test]
async fn flood_gets_no_upstream_429_with_fixed_windows() {
    flood_without_upstream_429(random_phase()).await;
}

#[tokio::test]
async fn flood_gets_no_upstream_429_with_sliding_windows() {
    flood_without_upstream_429(WindowKind::Sliding).await;
}

#[tokio::test]
async fn pacing_that_covers_the_flood_serves_every_request() {
    let sim = limited_sim(WindowKind::Sliding).await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                quota: gateway_quota("pace", "20s"),
                ..Default::default()
            },
        )
        .await,
    );
    let results = flood(&gw, 60).await;
    assert!(results.iter().all(|r| r.0 == StatusCode::OK), "{results:?}");
    assert_eq!(sim.rejected_429(), 0);
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
    // Every waiter left the queue.
    let waiting: usize = gw
        .gateway
        .quota()
        .buckets()
        .iter()
        .map(|(_, b)| b.waiting())
        .sum();
    assert_eq!(waiting, 0);
}

#[tokio::test]
async fn reject_mode_refuses_at_once_with_retry_after() {
    let sim = limited_sim(WindowKind::Sliding).await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            quota: gateway_quota("reject", "20s"),
            ..Default::default()
        },
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = gw.start_meeting().await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.error_code(), "MEETGATE.QUOTA_EXCEEDED");
            let secs: u64 = r.headers["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!(secs >= 1);
        }
        statuses.push(r.status);
    }
    // Burst 5, then refused without waiting (the next slot is ~128 ms away).
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(sim.rejected_429(), 0);
}

#[tokio::test]
async fn another_consumer_sharing_the_quota_is_absorbed() {
    let sim = limited_sim(WindowKind::Sliding).await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                quota: gateway_quota("pace", "20s"),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    // Someone else, with the same app's token, spends 12 of the 20 directly.
    let token = sim.issued_tokens()[0].clone();
    let direct = sim_client(&sim);
    for _ in 0..12 {
        let req = http::Request::post(format!("{}{START}", sim.url()))
            .header("x-access-token", token.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"conferenceID":"914087436","password":"123456"}"#,
            )))
            .expect("request");
        let resp = direct.request(req).await.expect("direct answer");
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let results = flood(&gw, 30).await;
    // The gateway slows down on the counters it reads (and would replay a 429 it still met),
    // so clients see only successes.
    assert!(results.iter().all(|r| r.0 == StatusCode::OK), "{results:?}");
    assert_eq!(
        sim.rejected_429(),
        0,
        "the counters alone kept it under the limit"
    );
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
}

#[tokio::test]
async fn upstream_429_is_held_and_replayed_once_byte_identical() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.clear_requests();
    sim.inject(Fault::Throttle {
        count: 1,
        retry_after: Some(1),
    });
    let body = "{\"conferenceID\" :\"914087436\",  \"password\":\"123456\"}";
    let r = gw
        .request(
            Method::POST,
            START,
            &[("x-request-id", "rid-429")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let seen = received(&sim, START);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].status, 429);
    assert_eq!(seen[1].status, 200);
    assert!(seen.iter().all(|s| &s.body[..] == body.as_bytes()));
    // Held for the Retry-After second before the replay.
    assert!(seen[1].at.duration_since(seen[0].at) >= Duration::from_millis(900));
    assert_eq!(
        sim.counts_by_request_id().get("rid-429"),
        Some(&1),
        "processed exactly once"
    );
    gw.stop().await;
}

#[tokio::test]
async fn upstream_429_past_the_deadline_reaches_the_client_with_retry_after() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            quota: format!("{NO_BINDING_QUOTA}max_wait = \"500ms\"\n"),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.inject(Fault::Throttle {
        count: 1,
        retry_after: Some(30),
    });
    let r = gw.start_meeting().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "APIG.0308");
    assert_eq!(r.headers["retry-after"], "30");
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_gives_up_while_waiting_leaves_no_waiter() {
    let sim = limited_sim(WindowKind::Sliding).await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                quota: gateway_quota("pace", "20s"),
                ..Default::default()
            },
        )
        .await,
    );
    for _ in 0..5 {
        assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    }
    // These wait for slots; their clients give up before getting one.
    let waiters = concurrently(10, |_| {
        let gw = gw.clone();
        async move {
            tokio::time::timeout(Duration::from_millis(50), gw.start_meeting())
                .await
                .is_err()
        }
    })
    .await;
    assert!(waiters.iter().any(|gave_up| *gave_up));
    let quota = gw.gateway.quota().clone();
    eventually(Duration::from_secs(5), "waiters gone", || {
        let quota = quota.clone();
        async move {
            quota
                .buckets()
                .iter()
                .map(|(_, b)| b.waiting())
                .sum::<usize>()
                == 0
        }
    })
    .await;
    // And the gateway still serves.
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
}
