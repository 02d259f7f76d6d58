//! Meeting control with no meeting credentials in the clients: control tokens obtained, kept
//! alive, replaced and ended by meetgate, and who may use them (design §3b).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use meetgate::simulator::{MeetingState, SimConfig, SimHandle, SimLimits};
use sha2::{Digest, Sha256};

use crate::support::*;

const CREATE: &str = "/v1/mmc/management/conferences";
const TOKEN: &str = "/v1/mmc/control/conferences/token";

fn control(path: &str, conference: &str) -> String {
    format!("/v1/mmc/control/conferences/{path}?conferenceID={conference}")
}

async fn sim_with_conf_lifetime(lifetime: Duration) -> SimHandle {
    start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: SimLimits::unlimited(),
        conf_token_lifetime: lifetime,
        ..SimConfig::default()
    })
    .await
}

/// Creates a meeting through the gateway; returns its id and host password.
async fn create(gw: &TestGateway, headers: &[(&str, &str)]) -> (String, String) {
    let r = gw
        .request(
            Method::POST,
            CREATE,
            headers,
            br#"{"subject":"control test"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let info = &r.json()[0];
    let id = info["conferenceID"].as_str().expect("id").to_owned();
    let host = info["passwordEntry"]
        .as_array()
        .and_then(|e| e.iter().find(|p| p["conferenceRole"] == "chair"))
        .and_then(|p| p["password"].as_str())
        .expect("host password")
        .to_owned();
    (id, host)
}

async fn start(gw: &TestGateway, id: &str, password: &str, headers: &[(&str, &str)]) -> Reply {
    let body = serde_json::json!({"conferenceID": id, "password": password}).to_string();
    gw.request(Method::POST, START, headers, body.as_bytes())
        .await
}

/// The three control calls the tests make: lock, mute all, and a read of the live state.
async fn three_control_calls(gw: &TestGateway, id: &str, headers: &[(&str, &str)]) -> Vec<Reply> {
    vec![
        gw.request(
            Method::PUT,
            &control("lock", id),
            headers,
            br#"{"isLock":1}"#,
        )
        .await,
        gw.request(
            Method::PUT,
            &control("mute", id),
            headers,
            br#"{"isMute":1}"#,
        )
        .await,
        gw.request(Method::GET, &control("realTimeInfo", id), headers, b"")
            .await,
    ]
}

#[tokio::test]
async fn create_start_then_control_calls_with_no_credential_take_one_token_request() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let (id, host) = create(&gw, &[]).await;
    let r = start(&gw, &id, &host, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for r in three_control_calls(&gw, &id, &[]).await {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(sim.control_stats().token_requests, 1);
    assert_eq!(sim.control_stats().issued, 1);
    // The control calls carried meetgate's token, and no password.
    let locks = received(&sim, "/v1/mmc/control/conferences/lock");
    assert_eq!(locks.len(), 1);
    assert!(locks[0].header("x-conference-authorization").is_some());
    assert!(locks[0].header("x-password").is_none());
    // The token request carried the password meetgate remembered, and the app's token.
    let token_req = &received(&sim, TOKEN)[0];
    assert_eq!(token_req.header("x-password"), Some(host.as_str()));
    assert_eq!(token_req.header("x-login-type"), Some("1"));
    assert!(token_req.header("x-access-token").is_some());
    assert_eq!(gw.gateway.controls().len(), 1);
    let metrics = gw.admin("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("meetgate_control_sessions 1"), "{text}");
    assert!(
        text.contains("meetgate_control_token_requests_total{kind=\"acquire\",result=\"ok\"} 1"),
        "{text}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_start_whose_password_has_escapes_is_remembered_as_the_upstream_reads_it() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let (id, host) = create(&gw, &[]).await;
    // Every character a JSON escape: meetgate's parser must copy the password, not borrow it.
    let escaped: String = host
        .chars()
        .map(|c| format!("\\u{:04x}", u32::from(c)))
        .collect();
    let body = format!(r#"{{"conferenceID":"{id}","password":"{escaped}"}}"#);
    let r = gw.request(Method::POST, START, &[], body.as_bytes()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let lock = gw
        .request(Method::PUT, &control("lock", &id), &[], br#"{"isLock":1}"#)
        .await;
    assert_eq!(lock.status, StatusCode::OK, "{:?}", lock.body);
    assert_eq!(
        received(&sim, TOKEN)[0].header("x-password"),
        Some(host.as_str())
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_hundred_concurrent_first_control_calls_share_one_token_request() {
    let sim = default_sim().await;
    let gw = Arc::new(spawn_gateway(&sim, GatewayOptions::default()).await);
    let r = gw.start_meeting().await;
    assert_eq!(r.status, StatusCode::OK);
    let mut calls = Vec::new();
    for _ in 0..100 {
        let gw = gw.clone();
        calls.push(tokio::spawn(async move {
            gw.request(
                Method::PUT,
                &control("lock", "914087436"),
                &[],
                br#"{"isLock":1}"#,
            )
            .await
            .status
        }));
    }
    for call in calls {
        assert_eq!(call.await.expect("joins"), StatusCode::OK);
    }
    assert_eq!(sim.control_stats().token_requests, 1);
}

#[tokio::test]
async fn control_traffic_across_several_token_lifetimes_is_kept_alive_without_errors() {
    let sim = sim_with_conf_lifetime(Duration::from_secs(2)).await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    let mut calls = 0;
    // Until the upstream has seen three keep-alives: over three lifetimes of traffic.
    while sim.control_stats().keepalives < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no keep-alives");
        pace.tick().await;
        let r = gw
            .request(Method::GET, &control("realTimeInfo", "914087436"), &[], b"")
            .await;
        assert_eq!(r.status, StatusCode::OK, "call {calls}: {:?}", r.body);
        calls += 1;
    }
    // One token, kept alive: never a second acquisition.
    assert_eq!(sim.control_stats().issued, 1);
    assert!(calls > 40, "{calls} calls");
}

#[tokio::test]
async fn a_stopped_meeting_gets_the_upstreams_error_and_no_token_request() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let r = gw
        .request(Method::PUT, &control("stop", "914087436"), &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(sim.meeting_state("914087436"), Some(MeetingState::Ended));
    assert_eq!(gw.gateway.controls().len(), 0, "the stop ended the session");
    let before = sim.control_stats().token_requests;
    for _ in 0..3 {
        let r = gw
            .request(Method::PUT, &control("lock", "914087436"), &[], b"{}")
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.error_code(), "SIM.CONF_TOKEN_INVALID");
    }
    assert_eq!(sim.control_stats().token_requests, before);
}

#[tokio::test]
async fn a_meeting_stopped_elsewhere_costs_one_token_request_then_none() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let lock = control("lock", "914087436");
    assert_eq!(
        gw.request(Method::PUT, &lock, &[], b"{}").await.status,
        StatusCode::OK
    );
    // The host ends it from their own client, not through meetgate.
    sim.stop_meeting("914087436");
    let before = sim.control_stats().token_requests;
    // meetgate's token is refused; its one re-acquisition says the meeting is gone, and that
    // is the answer. The session is over: later calls ask nothing more.
    let r = gw.request(Method::PUT, &lock, &[], b"{}").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.error_code(), "MMC.111072065");
    assert_eq!(sim.control_stats().token_requests, before + 1);
    for _ in 0..3 {
        let r = gw.request(Method::PUT, &lock, &[], b"{}").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(sim.control_stats().token_requests, before + 1);
}

#[tokio::test]
async fn a_wrong_password_gets_the_upstreams_error_and_nothing_is_kept() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            // Sessions come only from passwords on control calls here.
            extra: "[control]\nremember_start_password = false\n".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    assert_eq!(gw.gateway.controls().len(), 0);
    let lock = control("lock", "914087436");
    let r = gw
        .request(Method::PUT, &lock, &[("x-password", "000000")], b"{}")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "MMC.111072065");
    assert_eq!(gw.gateway.controls().len(), 0);
    assert!(received(&sim, "/v1/mmc/control/conferences/lock").is_empty());
    // Without a password nothing is injected: the upstream's refusal passes.
    let r = gw.request(Method::PUT, &lock, &[], b"{}").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // With the right one the call works, and the password is not forwarded.
    let r = gw
        .request(Method::PUT, &lock, &[("x-password", "123456")], b"{}")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let locks = received(&sim, "/v1/mmc/control/conferences/lock");
    assert!(locks.iter().all(|l| l.header("x-password").is_none()));
}

#[tokio::test]
async fn another_client_without_the_password_is_refused_before_the_upstream() {
    let sim = default_sim().await;
    let key = |k: &str| hex::encode(Sha256::digest(k.as_bytes()));
    let clients = format!(
        "[[clients]]\nname = \"host-service\"\nkey_sha256 = \"{}\"\n\n[[clients]]\nname = \"other\"\nkey_sha256 = \"{}\"\n",
        key("host-key"),
        key("other-key")
    );
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            extra: clients,
            ..Default::default()
        },
    )
    .await;
    let host = [("authorization", "Bearer host-key")];
    let other = [("authorization", "Bearer other-key")];
    assert_eq!(gw.start_meeting_with(&host).await.status, StatusCode::OK);
    let lock = control("lock", "914087436");
    assert_eq!(
        gw.request(Method::PUT, &lock, &host, b"{}").await.status,
        StatusCode::OK
    );
    let seen = received(&sim, "/v1/mmc/control/conferences/lock").len();
    let r = gw.request(Method::PUT, &lock, &other, b"{}").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "MEETGATE.FORBIDDEN");
    let with_wrong = [
        ("authorization", "Bearer other-key"),
        ("x-password", "999999"),
    ];
    let r = gw.request(Method::PUT, &lock, &with_wrong, b"{}").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        received(&sim, "/v1/mmc/control/conferences/lock").len(),
        seen,
        "the upstream saw none of the refused calls"
    );
    // With the host password the other client may control the meeting too.
    let with_password = [
        ("authorization", "Bearer other-key"),
        ("x-password", "123456"),
    ];
    let r = gw.request(Method::PUT, &lock, &with_password, b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(sim.control_stats().token_requests, 1, "on the same session");
}

#[tokio::test]
async fn revoked_control_tokens_cost_one_reacquisition_and_one_replay() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let lock = control("lock", "914087436");
    assert_eq!(
        gw.request(Method::PUT, &lock, &[], b"{}").await.status,
        StatusCode::OK
    );
    sim.clear_requests();
    sim.revoke_conf_tokens();
    let r = gw.request(Method::PUT, &lock, &[], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(sim.control_stats().token_requests, 2);
    assert_eq!(received(&sim, "/v1/mmc/control/conferences/lock").len(), 2);
    assert_eq!(received(&sim, TOKEN).len(), 1);
    let metrics = gw.admin("/metrics").await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("meetgate_control_replays_total 1"));
}

#[tokio::test]
async fn a_clients_own_control_token_passes_untouched_and_is_not_kept() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let r = gw
        .request(
            Method::POST,
            START,
            &[],
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    gw.gateway.controls().end("default", "914087436");
    let own = gw
        .request(
            Method::GET,
            &format!("{TOKEN}?conferenceID=914087436"),
            &[("x-password", "123456"), ("x-login-type", "1")],
            b"",
        )
        .await;
    let own = own.json()["data"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let r = gw
        .request(
            Method::PUT,
            &control("lock", "914087436"),
            &[
                ("x-conference-authorization", &own),
                ("x-password", "123456"),
            ],
            b"{}",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let lock = &received(&sim, "/v1/mmc/control/conferences/lock")[0];
    assert_eq!(
        lock.header("x-conference-authorization"),
        Some(own.as_str())
    );
    assert_eq!(
        lock.header("x-password"),
        Some("123456"),
        "the client's own call, as it sent it"
    );
    assert_eq!(gw.gateway.controls().len(), 0);
    assert_eq!(
        sim.control_stats().token_requests,
        1,
        "only the client's own"
    );
}

#[tokio::test]
async fn a_throttled_token_request_keeps_the_session() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    // The next business request upstream (the token request) is throttled by the upstream.
    sim.inject(meetgate::simulator::Fault::Throttle {
        count: 1,
        retry_after: None,
    });
    let lock = control("lock", "914087436");
    let r = gw.request(Method::PUT, &lock, &[], b"{}").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(r.error_code(), "APIG.0308");
    assert_eq!(gw.gateway.controls().len(), 1, "the password is still good");
    let r = gw.request(Method::PUT, &lock, &[], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(sim.control_stats().issued, 1);
}
