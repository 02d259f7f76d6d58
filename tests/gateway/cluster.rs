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

fn small_limits() -> SimLimits {
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
