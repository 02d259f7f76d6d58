//! Token life cycle end to end: background refresh, one sign-in per key, 401 replay.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode, Version};
use meetgate::simulator::{SimConfig, SimLimits};

use crate::support::*;

#[tokio::test]
async fn refresh_before_expiry_under_continuous_traffic() {
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        token_lifetime: Duration::from_secs(2),
        limits: SimLimits::unlimited(),
        ..SimConfig::default()
    })
    .await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    // Traffic until the token has been replaced three times.
    while sim.sign_in_count() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh happened"
        );
        let r = gw.start_meeting().await;
        assert_eq!(r.status, StatusCode::OK, "request {sent}: {:?}", r.body);
        sent += 1;
    }
    // Every refresh happened before expiry: the upstream never had to refuse a token.
    let refused = sim.requests().iter().filter(|r| r.status == 401).count();
    assert_eq!(refused, 0);
    assert!(sent > 0);
    gw.stop().await;
}

#[tokio::test]
async fn two_hundred_concurrent_requests_at_cold_start_sign_in_once() {
    let sim = default_sim().await;
    let gw = Arc::new(spawn_gateway(&sim, GatewayOptions::default()).await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move { gw.start_meeting().await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), StatusCode::OK);
    }
    assert_eq!(sim.sign_in_count(), 1);
}

#[tokio::test]
async fn two_hundred_concurrent_requests_after_revocation_sign_in_once() {
    let sim = default_sim().await;
    let gw = Arc::new(spawn_gateway(&sim, GatewayOptions::default()).await);
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    assert_eq!(sim.sign_in_count(), 1);
    sim.revoke_all_tokens();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move { gw.start_meeting().await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), StatusCode::OK);
    }
    assert_eq!(
        sim.sign_in_count(),
        2,
        "one sign-in for all 200 refused requests"
    );
}

#[tokio::test]
async fn revoked_token_is_replaced_and_the_post_replayed_byte_identical() {
    // The replay path keeps the request's head itself; over HTTP/1.1 it swaps in a copy. Each
    // way to HTTP/1.1: configured, or chosen for a single client connection.
    for (upstream, version) in [
        ("http1_for_single_client = false", Version::HTTP_2),
        ("http2 = false", Version::HTTP_11),
        ("", Version::HTTP_11),
    ] {
        revoked_token_replay(upstream, version).await;
    }
}

async fn revoked_token_replay(upstream: &str, version: Version) {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            upstream: upstream.into(),
            ..GatewayOptions::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let old = sim.issued_tokens();
    assert_eq!(old.len(), 1);
    assert!(sim.revoke_token(&old[0]));
    sim.clear_requests();

    // Bytes that a re-encoding would change: odd spacing, unicode, key order.
    let body = "{ \"password\":\"123456\",  \"conferenceID\" : \"914087436\", \"note\":\"caf\u{e9} \u{1F600}\"}";
    let r = gw
        .request(
            Method::POST,
            START,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(sim.sign_in_count(), 2);
    let seen = received(&sim, START);
    assert_eq!(seen.len(), 2, "the refused attempt and the replay");
    assert_eq!(seen[0].status, 401);
    assert_eq!(seen[1].status, 200);
    for s in &seen {
        assert_eq!(&s.body[..], body.as_bytes());
        assert_eq!(s.version, version, "{upstream:?}");
    }
    assert_eq!(
        header(&seen[0], "x-request-id"),
        header(&seen[1], "x-request-id")
    );
    assert_ne!(
        header(&seen[0], "x-access-token"),
        header(&seen[1], "x-access-token")
    );
    gw.stop().await;
}

#[tokio::test]
async fn bodies_over_the_replay_limit_stream_and_are_not_replayed() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            extra: "[limits]\nreplay_body_bytes = 1024\n".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let big = format!(
        "{{\"conferenceID\":\"914087436\",\"password\":\"123456\",\"pad\":\"{}\"}}",
        "x".repeat(4096)
    );
    let r = gw.request(Method::POST, START, &[], big.as_bytes()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&received(&sim, START)[1].body[..], big.as_bytes());

    let old = sim.issued_tokens();
    sim.revoke_token(&old[0]);
    let r = gw.request(Method::POST, START, &[], big.as_bytes()).await;
    // Not replayable: the upstream's 401 reaches the client, and the token is replaced anyway.
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), "USG.000000004");
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    assert_eq!(sim.sign_in_count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn failing_sign_in_gives_503_and_recovers() {
    let sim = default_sim().await;
    sim.inject(meetgate::simulator::Fault::SignInStatus {
        status: 500,
        count: 2,
    });
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let r = gw.start_meeting().await;
    // Whether the first request meets a failure or the recovered token depends on timing;
    // both are allowed, but a failure must be the documented one.
    if r.status != StatusCode::OK {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "MEETGATE.TOKEN_UNAVAILABLE");
    }
    eventually(
        Duration::from_secs(10),
        "recovery after the sign-in fault",
        || async { gw.start_meeting().await.status == StatusCode::OK },
    )
    .await;
    // Two failures then a success, with back-off between them: never a hot loop.
    assert_eq!(sim.sign_in_count(), 1);
    let attempts = received(&sim, "/v2/usg/acs/auth/appauth").len();
    assert_eq!(
        attempts, 3,
        "two refused sign-ins and one accepted, nothing more"
    );
    gw.stop().await;
}
