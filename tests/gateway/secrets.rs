//! No secret in any log line (at TRACE), error body, metric or Debug print, across a run that
//! exercises every credential: app keys, client keys, SDK keys, sessions, upstream tokens and
//! signatures.

use http::{Method, StatusCode};

use meetgate::simulator::{SimConfig, SimLimits, SimMeeting};

use crate::access::{appauth, clients, nonce, BILLING_KEY, SDK_KEY};
use crate::logs::Capture;
use crate::support::*;

const HOST_PASSWORD: &str = "host-password-7f3a9c2e";

#[tokio::test(flavor = "current_thread")]
async fn no_secret_reaches_logs_errors_metrics_or_debug() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Other tests in this binary run without a subscriber; a callsite first hit there may have
    // cached "never interested". Recompute with this one in place.
    tracing::callsite::rebuild_interest_cache();

    // A meeting whose host password is long enough to be searched for (the demo's six digits
    // could match a timestamp by chance).
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: SimLimits::unlimited(),
        meetings: vec![
            SimMeeting::demo(),
            SimMeeting {
                conference_id: "900000777".into(),
                chair_password: HOST_PASSWORD.into(),
                guest_password: "guest-password-51c0d2".into(),
                allow_guest_start: false,
                subject: String::new(),
            },
        ],
        ..SimConfig::default()
    })
    .await;
    let gw = gateway_with(&sim).await;
    let mut bodies: Vec<String> = Vec::new();
    let mut secrets: Vec<String> = vec![
        APP_KEY.into(),
        BILLING_KEY.into(),
        SDK_KEY.into(),
        HOST_PASSWORD.into(),
        "guest-password-51c0d2".into(),
    ];

    // Bearer traffic, good and bad.
    let bearer = format!("Bearer {BILLING_KEY}");
    for auth in [bearer.as_str(), "Bearer wrong-key-material"] {
        let r = gw.start_meeting_with(&[("authorization", auth)]).await;
        bodies.push(String::from_utf8_lossy(&r.body).into_owned());
    }
    // SDK sign-in, use, refresh, a bad session, logout.
    let (auth, body) = appauth("", &nonce(), SDK_KEY, true);
    secrets.push(
        auth.split("signature=")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("")
            .to_owned(),
    );
    let r = gw
        .request(
            Method::POST,
            "/v2/usg/acs/auth/appauth",
            &[("authorization", &auth)],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let session = r.json()["accessToken"].as_str().unwrap_or("").to_owned();
    let refresh = r.json()["refreshToken"].as_str().unwrap_or("").to_owned();
    secrets.push(session.clone());
    secrets.push(refresh.clone());
    let r = gw.start_meeting_with(&[("x-access-token", &session)]).await;
    bodies.push(String::from_utf8_lossy(&r.body).into_owned());
    // Meeting control: a start with the host password, control calls on the remembered one, a
    // refused control token replaced, a wrong password, another meeting's guest password.
    let as_session = [("x-access-token", session.as_str())];
    let start = format!(r#"{{"conferenceID":"900000777","password":"{HOST_PASSWORD}"}}"#);
    let r = gw
        .request(Method::POST, START, &as_session, start.as_bytes())
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let lock = "/v1/mmc/control/conferences/lock?conferenceID=900000777";
    for revoke in [false, true] {
        if revoke {
            sim.revoke_conf_tokens();
        }
        let r = gw.request(Method::PUT, lock, &as_session, b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        bodies.push(String::from_utf8_lossy(&r.body).into_owned());
    }
    let other = "/v1/mmc/control/conferences/lock?conferenceID=914087436";
    for password in ["guest-password-51c0d2", "wrong-password-0a9b8c"] {
        let headers = [
            ("x-access-token", session.as_str()),
            ("x-password", password),
        ];
        let r = gw.request(Method::PUT, other, &headers, b"{}").await;
        assert_ne!(r.status, StatusCode::OK);
        bodies.push(String::from_utf8_lossy(&r.body).into_owned());
    }
    let r = gw
        .request(
            Method::PUT,
            "/v1/usg/acs/token",
            &[("x-access-token", &refresh)],
            b"",
        )
        .await;
    let fresh = r.json()["accessToken"].as_str().unwrap_or("").to_owned();
    secrets.push(fresh.clone());
    for token in [session.as_str(), "a-made-up-session-token-value-123456"] {
        let r = gw.start_meeting_with(&[("x-access-token", token)]).await;
        bodies.push(String::from_utf8_lossy(&r.body).into_owned());
    }
    // A revoked upstream token: 401, sign-in again, replay.
    for t in sim.issued_tokens() {
        sim.revoke_token(&t);
    }
    let r = gw.start_meeting_with(&[("authorization", &bearer)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let _ = gw
        .request(
            Method::DELETE,
            "/v1/usg/acs/token",
            &[("x-access-token", &fresh)],
            b"",
        )
        .await;
    for path in ["/metrics", "/readyz", "/healthz"] {
        bodies.push(String::from_utf8_lossy(&gw.admin(path).await.body).into_owned());
    }
    let debug = format!("{:?}", gw.gateway.config());
    gw.stop().await;

    // Everything the upstream issued or was signed with, control tokens included.
    secrets.extend(sim.issued_tokens());
    let control_tokens: Vec<String> = sim
        .requests()
        .iter()
        .filter_map(|r| header(r, "x-conference-authorization").map(str::to_owned))
        .collect();
    assert!(control_tokens.len() >= 2, "control tokens were used");
    secrets.extend(control_tokens);
    for r in sim.requests() {
        if let Some(a) = header(&r, "authorization") {
            if let Some(sig) = a
                .split("signature=")
                .nth(1)
                .and_then(|s| s.split(',').next())
            {
                secrets.push(sig.to_owned());
                secrets.push(sig.to_ascii_lowercase());
            }
        }
    }
    let logs = String::from_utf8(capture.0.lock().expect("lock").clone()).expect("utf-8");
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "the capture ran at TRACE"
    );
    secrets.retain(|s| s.len() >= 8);
    assert!(secrets.len() >= 8, "{} secrets collected", secrets.len());
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret reached the log");
        assert!(
            !debug.contains(secret.as_str()),
            "a secret reached a Debug print"
        );
        for b in &bodies {
            assert!(
                !b.contains(secret.as_str()),
                "a secret reached a response body: {b}"
            );
        }
    }
}

async fn gateway_with(sim: &meetgate::simulator::SimHandle) -> TestGateway {
    spawn_gateway(
        sim,
        GatewayOptions {
            extra: clients(),
            ..Default::default()
        },
    )
    .await
}
