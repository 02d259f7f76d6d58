//! Who may use the gateway: bearer clients, SDK sign-in and sessions, per-client rules, the
//! start-up refusal, and the official Python SDK driven unmodified over TLS.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use http::{Method, StatusCode};
use meetgate::simulator::{Fault, SimHandle};
use meetgate::token::sign::{access_value, authorization_header, signature_hex, SignInput};
use sha2::{Digest, Sha256};

use crate::support::*;

pub(crate) const BILLING_KEY: &str = "billing-client-key-5f1c";
const SDK_APP_ID: &str = "gw-client-app-000000000000000001";
pub(crate) const SDK_KEY: &str = "gateway-issued-sdk-key-9a8b7c";
const SDK_KEY_ENV: &str = "TEST_SDK_CLIENT_KEY";

fn sha_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub(crate) fn clients() -> String {
    format!(
        "[[clients]]\nname = \"billing\"\nkey_sha256 = \"{}\"\nusers = [\"alice@*\"]\noperations = [\"start_meeting\", \"show_*\"]\n\n\
         [[clients]]\nname = \"sdk-team\"\napp_id = \"{SDK_APP_ID}\"\napp_key_env = \"{SDK_KEY_ENV}\"\nusers = [\"alice\"]\n",
        sha_hex(BILLING_KEY)
    )
}

async fn gateway_with_clients(sim: &SimHandle) -> TestGateway {
    spawn_gateway(
        sim,
        GatewayOptions {
            extra: clients(),
            ..Default::default()
        },
    )
    .await
}

fn business(sim: &SimHandle) -> usize {
    sim.requests()
        .iter()
        .filter(|r| !r.path_and_query.contains("/acs/"))
        .count()
}

const START_BODY: &[u8] = br#"{"conferenceID":"914087436","password":"123456"}"#;

#[test]
fn without_clients_a_public_listener_is_refused_unless_explicitly_allowed() {
    let env = HashMap::from([("K".to_owned(), "k".to_owned())]);
    let apps = "[[apps]]\napp_id = \"a\"\napp_key_env = \"K\"\n";
    let e = meetgate::config::load_str(&format!("listen = \"0.0.0.0:8080\"\n{apps}"), &env)
        .expect_err("refused");
    let problems = e.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("listen = \"0.0.0.0:8080\"")
                && p.contains("allow_unauthenticated")),
        "{problems:?}"
    );
    let ok = meetgate::config::load_str(
        &format!("listen = \"0.0.0.0:8080\"\nallow_unauthenticated = true\n{apps}"),
        &env,
    )
    .expect("explicitly allowed");
    assert!(ok
        .warnings
        .iter()
        .any(|w| w.contains("allow_unauthenticated")));
    // With clients, a public listener is fine.
    let with_clients = format!(
        "listen = \"0.0.0.0:8080\"\n{apps}[[clients]]\nname = \"c\"\nkey_sha256 = \"{}\"\n",
        sha_hex("x")
    );
    assert!(meetgate::config::load_str(&with_clients, &env).is_ok());
}

#[tokio::test]
async fn bearer_clients_get_401_403_or_their_identity_and_the_upstream_never_sees_refusals() {
    let sim = default_sim().await;
    let gw = gateway_with_clients(&sim).await;
    eventually(Duration::from_secs(10), "first sign-in", || async {
        sim.sign_in_count() == 1
    })
    .await;
    let bearer = format!("Bearer {BILLING_KEY}");
    let before = business(&sim);

    let r = gw.start_meeting_with(&[]).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, "MEETGATE.UNAUTHENTICATED")
    );
    let r = gw
        .start_meeting_with(&[("authorization", "Bearer wrong")])
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, "MEETGATE.UNAUTHENTICATED")
    );
    // An operation outside the client's globs.
    let r = gw
        .request(
            Method::GET,
            "/v1/mmc/management/conferences?offset=0",
            &[("authorization", &bearer)],
            b"",
        )
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::FORBIDDEN, "MEETGATE.FORBIDDEN")
    );
    // A user outside its patterns, and an app it may not use.
    let r = gw
        .start_meeting_with(&[("authorization", &bearer), ("x-meetgate-user", "bob@corp")])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = gw
        .start_meeting_with(&[("authorization", &bearer), ("x-meetgate-app", "other")])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        business(&sim),
        before,
        "the upstream was never contacted for a refusal"
    );

    // Allowed: the default user, then a user matching alice@*.
    let r = gw.start_meeting_with(&[("authorization", &bearer)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = gw
        .start_meeting_with(&[
            ("authorization", &bearer),
            ("x-meetgate-user", "alice@corp"),
        ])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let signins = received(&sim, "/v2/usg/acs/auth/appauth");
    let last: serde_json::Value =
        serde_json::from_slice(&signins.last().expect("sign-in").body).expect("json");
    assert_eq!(
        last["userId"], "alice@corp",
        "a token was obtained for the chosen user"
    );
    let seen = received(&sim, START);
    let req = seen.last().expect("forwarded");
    assert_eq!(
        header(req, "x-meetgate-user"),
        None,
        "selection headers are never forwarded"
    );
    assert_eq!(header(req, "authorization"), None);
    gw.stop().await;
}

/// An appauth request as the official SDK builds it, signed with `key`.
pub(crate) fn appauth(user: &str, nonce: &str, key: &str, upper: bool) -> (String, Vec<u8>) {
    let expire = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let input = SignInput {
        app_id: SDK_APP_ID,
        corp_id: None,
        user_id: user,
        expire_time: expire,
        nonce,
    };
    let auth = if upper {
        authorization_header(&input, key.as_bytes())
    } else {
        format!(
            "HMAC-SHA256 signature={},access={}",
            signature_hex(&input, key.as_bytes()),
            access_value(SDK_APP_ID)
        )
    };
    let body = serde_json::json!({
        "appId": SDK_APP_ID, "userId": user, "corpId": null, "expireTime": expire,
        "nonce": nonce, "clientType": 72, "deptCode": null,
    });
    (auth, body.to_string().into_bytes())
}

pub(crate) fn nonce() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn sdk_sign_in_issues_sessions_bound_to_client_and_user() {
    let sim = default_sim().await;
    let gw = gateway_with_clients(&sim).await;
    const APPAUTH: &str = "/v2/usg/acs/auth/appauth";

    // Wrong key, then a good signature (lowercase hex), then the same nonce again.
    let n = nonce();
    let (auth, body) = appauth("", &n, "not-the-key", true);
    let r = gw
        .request(Method::POST, APPAUTH, &[("authorization", &auth)], &body)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let (auth, body) = appauth("", &n, SDK_KEY, false);
    let r = gw
        .request(Method::POST, APPAUTH, &[("authorization", &auth)], &body)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let t = r.json();
    for field in [
        "accessToken",
        "validPeriod",
        "expireTime",
        "createTime",
        "refreshToken",
        "user",
    ] {
        assert!(!t[field].is_null(), "{field} in {t}");
    }
    let session = t["accessToken"].as_str().expect("token").to_owned();
    let refresh = t["refreshToken"].as_str().expect("refresh").to_owned();
    let r = gw
        .request(Method::POST, APPAUTH, &[("authorization", &auth)], &body)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "replayed nonce");
    // A short nonce.
    let (auth, body) = appauth("", "short", SDK_KEY, true);
    assert_eq!(
        gw.request(Method::POST, APPAUTH, &[("authorization", &auth)], &body)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    // The session works for business calls; the upstream sees our token, not the session.
    let r = gw.start_meeting_with(&[("x-access-token", &session)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let fwd = received(&sim, START);
    let injected = header(fwd.last().expect("forwarded"), "x-access-token")
        .expect("token")
        .to_owned();
    assert_ne!(injected, session);
    assert!(sim.issued_tokens().contains(&injected));

    // Validate, refresh (the old token dies), log out.
    let v = serde_json::json!({"token": session, "needGenNewToken": false}).to_string();
    let r = gw
        .request(
            Method::POST,
            "/v1/usg/acs/token/validate",
            &[],
            v.as_bytes(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = gw
        .request(
            Method::PUT,
            "/v1/usg/acs/token",
            &[("x-access-token", &refresh)],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let fresh = r.json()["accessToken"].as_str().expect("token").to_owned();
    let r = gw.start_meeting_with(&[("x-access-token", &session)]).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, "USG.000000004")
    );
    assert_eq!(
        gw.start_meeting_with(&[("x-access-token", &fresh)])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        gw.request(
            Method::DELETE,
            "/v1/usg/acs/token",
            &[("x-access-token", &fresh)],
            b""
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        gw.start_meeting_with(&[("x-access-token", &fresh)])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // None of this reached the upstream's sign-in or token endpoints.
    assert!(received(&sim, "/v1/usg/acs/token").is_empty());
    assert_eq!(received(&sim, APPAUTH).len(), sim.sign_in_count());
    gw.stop().await;
}

#[tokio::test]
async fn a_session_cannot_act_as_a_user_its_client_may_not_use() {
    let sim = default_sim().await;
    let gw = gateway_with_clients(&sim).await;
    let (auth, body) = appauth("mallory", &nonce(), SDK_KEY, true);
    let r = gw
        .request(
            Method::POST,
            "/v2/usg/acs/auth/appauth",
            &[("authorization", &auth)],
            &body,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "signing in as a user outside the client's rules"
    );

    let (auth, body) = appauth("alice", &nonce(), SDK_KEY, true);
    let r = gw
        .request(
            Method::POST,
            "/v2/usg/acs/auth/appauth",
            &[("authorization", &auth)],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let session = r.json()["accessToken"].as_str().expect("token").to_owned();
    let r = gw
        .start_meeting_with(&[("x-access-token", &session), ("x-meetgate-user", "bob")])
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "a session acts only as its own user"
    );
    let r = gw.start_meeting_with(&[("x-access-token", &session)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let signins = received(&sim, "/v2/usg/acs/auth/appauth");
    let last: serde_json::Value =
        serde_json::from_slice(&signins.last().expect("sign-in").body).expect("json");
    assert_eq!(last["userId"], "alice", "the upstream token is alice's");
    gw.stop().await;
}

#[tokio::test]
async fn reload_swaps_a_client_key_with_requests_in_flight() {
    let sim = default_sim().await;
    let gw = spawn_reloading_gateway(
        &sim,
        GatewayOptions {
            extra: clients(),
            ..Default::default()
        },
    )
    .await;
    let old = format!("Bearer {BILLING_KEY}");
    assert_eq!(
        gw.start_meeting_with(&[("authorization", &old)])
            .await
            .status,
        StatusCode::OK
    );
    sim.inject(Fault::Delay {
        delay: Duration::from_secs(1),
        count: 1,
    });
    let in_flight = {
        let url = gw.url(START);
        let client = gw.client.clone();
        let old = old.clone();
        tokio::spawn(async move {
            let req = http::Request::post(url)
                .header("authorization", old)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    START_BODY,
                )))
                .expect("request");
            client.request(req).await.expect("answer").status()
        })
    };
    eventually(
        Duration::from_secs(5),
        "the slow request is upstream",
        || async { received(&sim, START).len() == 2 },
    )
    .await;
    let new_key = "billing-client-key-rotated";
    let text = std::fs::read_to_string(gw.config_path()).expect("read");
    std::fs::write(
        gw.config_path(),
        text.replace(&sha_hex(BILLING_KEY), &sha_hex(new_key)),
    )
    .expect("write");
    let new = format!("Bearer {new_key}");
    eventually(
        Duration::from_secs(10),
        "the new key is accepted",
        || async {
            gw.start_meeting_with(&[("authorization", &new)])
                .await
                .status
                == StatusCode::OK
        },
    )
    .await;
    let r = gw.start_meeting_with(&[("authorization", &old)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the old key is refused");
    assert_eq!(
        in_flight.await.expect("task"),
        StatusCode::OK,
        "the request in flight completed"
    );
    gw.stop().await;
}

/// A Python with the official SDK: `MEETGATE_SDK_PYTHON`, or a virtualenv made (once) under
/// the target directory from `tests/sdk/requirements.txt`.
fn sdk_python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("MEETGATE_SDK_PYTHON") {
        return p.into();
    }
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(ok.success(), "python3 -m venv failed");
        let req =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/requirements.txt");
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(req)
            .status()
            .expect("pip runs");
        assert!(ok.success(), "installing the official SDK failed");
    }
    python
}

#[tokio::test]
async fn the_official_python_sdk_works_unmodified_through_the_tls_listener() {
    let python = tokio::task::spawn_blocking(sdk_python).await.expect("venv");
    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = meetgate::simulator::tls::generate_default_cert(&[
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ])
    .expect("cert");
    let (cert_file, key_file, ca_file) = (
        dir.path().join("gw.pem"),
        dir.path().join("gw.key"),
        dir.path().join("gw-ca.pem"),
    );
    std::fs::write(&cert_file, &cert.cert_pem).expect("write");
    std::fs::write(&key_file, &cert.key_pem).expect("write");
    std::fs::write(&ca_file, &cert.ca_pem).expect("write");
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            extra: format!(
                "{}\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                clients(),
                cert_file.display().to_string(),
                key_file.display().to_string()
            ),
            ..Default::default()
        },
    )
    .await;
    let endpoint = format!("https://127.0.0.1:{}", gw.addr.port());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/drive_sdk.py"))
            .args(["--endpoint", &endpoint])
            .args([
                "--app-id",
                SDK_APP_ID,
                "--app-key-env",
                SDK_KEY_ENV,
                "--ca-file",
            ])
            .arg(&ca_file)
            .env(SDK_KEY_ENV, SDK_KEY)
            .output()
            .expect("driver runs")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "driver output is not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["ok"], true, "{report:#}");
    let calls = report["calls"].as_array().expect("calls");
    let methods: Vec<&str> = calls.iter().filter_map(|c| c["method"].as_str()).collect();
    for m in ["POST", "GET", "PUT", "DELETE"] {
        assert!(methods.contains(&m), "{methods:?}");
    }
    assert!(!stdout.contains(SDK_KEY));
    // Its control calls after start_meeting carried no control token of its own: meetgate
    // obtained one (once) with the password of the start and injected it.
    for op in ["lock_meeting", "mute_meeting"] {
        assert!(
            calls
                .iter()
                .any(|c| c["operation"] == op && c["status"] == 200),
            "{op}: {report:#}"
        );
    }
    assert_eq!(sim.control_stats().token_requests, 1);
    for path in [
        "/v1/mmc/control/conferences/lock",
        "/v1/mmc/control/conferences/mute",
    ] {
        let seen = received(&sim, path);
        assert_eq!(seen.len(), 1, "{path}");
        assert!(header(&seen[0], "x-conference-authorization").is_some());
    }

    // The upstream saw only the gateway's app signing in and only tokens it issued.
    for s in received(&sim, "/v2/usg/acs/auth/appauth") {
        let auth = header(&s, "authorization").expect("signed");
        assert!(auth.ends_with(&access_value(APP_ID)), "{auth}");
    }
    let issued = sim.issued_tokens();
    let business: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| !r.path_and_query.contains("/acs/"))
        .collect();
    assert!(business.len() >= 5);
    for r in &business {
        let t = header(r, "x-access-token").expect("token");
        assert!(
            issued.iter().any(|i| i == t),
            "a token the upstream issued, never the SDK's session"
        );
    }
    gw.stop().await;
}

/// One TLS connection to the gateway's listener with `config` and one request on it (which
/// also reads the session tickets the server sends after the handshake); whether the handshake
/// resumed a session.
async fn tls_exchange(
    addr: std::net::SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> bool {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/no/such/operation")
        .header("host", addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = send.send_request(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body");
    resumed
}

/// A gateway with a `[tls]` listener (a generated certificate for 127.0.0.1), and the roots
/// a client trusts it by.
async fn tls_gateway(
    sim: &meetgate::simulator::SimHandle,
) -> (
    TestGateway,
    Vec<rustls_pki_types::CertificateDer<'static>>,
    tempfile::TempDir,
) {
    use rustls_pki_types::pem::PemObject;
    let dir = tempfile::tempdir().expect("tempdir");
    let cert =
        meetgate::simulator::tls::generate_default_cert(&["127.0.0.1".to_owned()]).expect("cert");
    let (cert_file, key_file) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));
    std::fs::write(&cert_file, &cert.cert_pem).expect("write");
    std::fs::write(&key_file, &cert.key_pem).expect("write");
    let gw = spawn_gateway(
        sim,
        GatewayOptions {
            extra: format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                cert_file.display().to_string(),
                key_file.display().to_string()
            ),
            ..Default::default()
        },
    )
    .await;
    let roots = rustls_pki_types::CertificateDer::pem_slice_iter(cert.ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("CA PEM");
    (gw, roots, dir)
}

#[tokio::test]
async fn a_parked_tls_connection_serves_its_next_request() {
    let sim = default_sim().await;
    let (gw, roots, _dir) = tls_gateway(&sim).await;
    let mut config = meetgate::upstream::tls_config(&roots).expect("tls config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::IpAddress(gw.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    for round in 0..3 {
        let req = http::Request::get("/no/such/operation")
            .header("host", gw.addr.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let resp = send.send_request(req).await.expect("answer");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "round {round}");
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body");
        // Idle: parked, rustls' state kept with the socket and hyper's buffers freed; the
        // next request on the same TLS session wakes it.
        eventually(Duration::from_secs(10), "the TLS connection parked", || {
            let gw = &gw;
            async move { gw.metric("meetgate_client_connections_parked").await == 1.0 }
        })
        .await;
    }
}

#[tokio::test]
async fn the_tls_listener_resumes_the_sessions_of_many_clients() {
    let sim = default_sim().await;
    let (gw, roots, _dir) = tls_gateway(&sim).await;
    // More clients than a server-side session cache of rustls' default size (256 sessions,
    // two per TLS 1.3 client) remembers: each client, with a session store of its own,
    // connects once in turn, then each comes back. Every one resumes: the session travels in
    // its ticket, not in the gateway's memory.
    const CLIENTS: usize = 300;
    let configs: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut c = meetgate::upstream::tls_config(&roots).expect("tls config");
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            c.resumption = rustls::client::Resumption::in_memory_sessions(4);
            std::sync::Arc::new(c)
        })
        .collect();
    for c in &configs {
        assert!(
            !tls_exchange(gw.addr, c).await,
            "a first connection is a full handshake"
        );
    }
    let mut resumed = 0;
    for c in &configs {
        resumed += usize::from(tls_exchange(gw.addr, c).await);
    }
    assert_eq!(resumed, CLIENTS, "clients whose second connection resumed");
}
