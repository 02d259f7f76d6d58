//! Forwarding: classification, header rewriting, token injection, error shapes, timeouts.

use std::time::Duration;

use http::{Method, StatusCode};
use meetgate::simulator::{Fault, SimApp, SimConfig, SimLimits};

use crate::support::*;

#[tokio::test]
async fn start_meeting_injects_our_token_and_never_the_clients() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let r = gw
        .request(
            Method::POST,
            START,
            &[
                ("content-type", "application/json"),
                ("x-access-token", "client-token-must-not-pass"),
                ("authorization", "Bearer client-secret"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("x-conference-authorization", "conf-token"),
                ("x-password", "host-pw"),
            ],
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert!(v["uuid"].is_string() && v["regionIP"].is_string(), "{v}");

    let seen = received(&sim, START);
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    let token = header(req, "x-access-token").expect("token injected");
    assert!(sim.issued_tokens().iter().any(|t| t == token));
    assert_ne!(token, "client-token-must-not-pass");
    assert_eq!(header(req, "authorization"), None);
    assert_eq!(header(req, "x-hop"), None);
    assert_eq!(
        header(req, "x-conference-authorization"),
        Some("conf-token")
    );
    assert_eq!(header(req, "x-password"), Some("host-pw"));
    // A request id was generated and sent upstream, and the client got the upstream's back.
    let rid = header(req, "x-request-id").expect("request id sent");
    assert_eq!(rid.len(), 32);
    assert!(r.headers.contains_key("x-request-id"));
    assert_eq!(
        &req.body[..],
        br#"{"conferenceID":"914087436","password":"123456"}"#
    );
    gw.stop().await;
}

#[tokio::test]
async fn client_request_id_is_kept_and_upstream_errors_pass_through() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let r = gw
        .request(
            Method::POST,
            START,
            &[("x-request-id", "client-rid-42")],
            br#"{"conferenceID":"1","password":"bad"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "MMC.111072065");
    let seen = received(&sim, START);
    assert_eq!(header(&seen[0], "x-request-id"), Some("client-rid-42"));
    gw.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_refused_locally_and_unlisted_ones_forwarded() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    // Wait for the background sign-in so the request count below is only business traffic.
    eventually(Duration::from_secs(10), "first sign-in", || async {
        sim.sign_in_count() == 1
    })
    .await;
    sim.clear_requests();

    let r = gw.request(Method::GET, "/admin/secrets", &[], b"").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "MEETGATE.UNKNOWN_OPERATION");
    assert!(r.json()["request_id"].is_string());

    let r = gw
        .request(
            Method::POST,
            "/v1/mmc//management/conferences/start",
            &[],
            b"{}",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "MEETGATE.BAD_PATH");

    // Sign-in and token management belong to the gateway.
    let r = gw
        .request(Method::DELETE, "/v1/usg/acs/token", &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = gw
        .request(Method::POST, "/v2/usg/acs/auth/appauth", &[], b"{}")
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        sim.requests().is_empty(),
        "nothing above reached the upstream"
    );

    // Inside the API families but not in the table: forwarded, the upstream's 404 comes back.
    let r = gw
        .request(Method::GET, "/v1/mmc/management/not-a-real-api", &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "APIG.0101");
    assert_eq!(sim.requests().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn host_and_absolute_uri_cannot_redirect_the_gateway() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let r = gw
        .request(
            Method::POST,
            START,
            &[("host", "evil.example:443")],
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = received(&sim, START);
    assert_eq!(
        header(&seen[0], "host"),
        Some(sim.addr().to_string().as_str())
    );
    gw.stop().await;
}

#[tokio::test]
async fn get_with_query_and_control_token_headers() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    // Control tokens are issued for a meeting in progress only.
    let r = gw
        .request(
            Method::POST,
            START,
            &[],
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let path = "/v1/mmc/control/conferences/token?conferenceID=914087436";
    let r = gw
        .request(
            Method::GET,
            path,
            &[("x-password", "123456"), ("x-login-type", "1")],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.json()["data"]["token"].is_string());
    let seen = received(&sim, "/v1/mmc/control/conferences/token");
    assert_eq!(seen[0].path_and_query, path);
    gw.stop().await;
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let client = h2c_client();
    let req = http::Request::post(gw.url(START))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )))
        .expect("request");
    let resp = client.request(req).await.expect("h2c answer");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    // Alone on its worker, but it can multiplex: it keeps the upstream's HTTP/2.
    let seen = received(&sim, START);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    gw.stop().await;
}

#[tokio::test]
async fn slow_upstream_gives_504_naming_the_phase_and_its_connection_is_left() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            top: "workers = 1".into(),
            // The lane's handling of a stream left unanswered.
            upstream: "tls_timeout = \"2s\"\nhttp1_for_single_client = false".into(),
            ..Default::default()
        },
    )
    .await;
    // request_timeout is 5 s in the harness; the simulator holds its answer for longer.
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.inject(Fault::Delay {
        delay: Duration::from_secs(8),
        count: 1,
    });
    let r = gw.start_meeting().await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "MEETGATE.UPSTREAM_TIMEOUT");
    assert!(r.json()["error_msg"]
        .as_str()
        .unwrap_or("")
        .contains("response headers"));
    // The connection that left a request unanswered may be dead without TCP knowing yet: new
    // requests go over a new one.
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let peers: Vec<_> = received(&sim, START).iter().map(|r| r.peer).collect();
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert_eq!(peers[0], peers[1], "the slow one went where the first did");
    assert_ne!(peers[1], peers[2], "the next one on a new connection");
    gw.stop().await;
}

#[tokio::test]
async fn dead_upstream_gives_502_naming_connect() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.shutdown().await;
    let r = gw.start_meeting().await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    assert_eq!(r.error_code(), "MEETGATE.UPSTREAM_UNREACHABLE");
    assert!(r.json()["error_msg"]
        .as_str()
        .unwrap_or("")
        .contains("connect"));
    gw.stop().await;
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_refused() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            trust_sim: false,
            ..Default::default()
        },
    )
    .await;
    let r = gw.start_meeting().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "MEETGATE.TOKEN_UNAVAILABLE");
    let msg = r.json()["error_msg"].as_str().unwrap_or("").to_owned();
    assert!(msg.contains("TLS handshake"), "{msg}");
    assert!(
        sim.requests().is_empty(),
        "no HTTP request crossed an untrusted TLS session"
    );
    gw.stop().await;
}

#[tokio::test]
async fn sp_apps_sign_in_with_the_five_field_signature() {
    let sim = start_sim(SimConfig {
        apps: vec![SimApp::sp(APP_ID, APP_KEY, "sp-1")],
        limits: SimLimits::unlimited(),
        ..SimConfig::default()
    })
    .await;
    let apps = format!(
        "[[apps]]\nname = \"sp\"\napp_id = \"{APP_ID}\"\napp_key_env = \"{KEY_ENV}\"\ncorp_id = \"807074304\"\nuser_id = \"alice@ent01\"\n"
    );
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            apps: Some(apps),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let signin = received(&sim, "/v2/usg/acs/auth/appauth");
    let body: serde_json::Value = serde_json::from_slice(&signin[0].body).expect("json");
    assert_eq!(body["corpId"], "807074304");
    assert_eq!(body["userId"], "alice@ent01");
    assert_eq!(body["clientType"], 72);
    gw.stop().await;
}
