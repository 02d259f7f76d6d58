//! End-to-end tests of the simulator: real sockets on 127.0.0.1, real TLS trusting `ca_pem`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};

use super::*;
use crate::token::sign::{access_value, authorization_header, signature_hex, SignInput};

const APP: &str = "fdb8e4699586458bbd10c834872dcc62";
const KEY: &str = "example-app-key-0123456789";
const SP_APP: &str = "5e0c2a9d71b84f36a1d0e9c8b7a65f43";
const SP_KEY: &str = "sp-app-key-9876543210";
const CREATE: &str = "/v1/mmc/management/conferences";
const START: &str = "/v1/mmc/management/conferences/start";
const APPAUTH: &str = "/v2/usg/acs/auth/appauth";

fn apps() -> Vec<SimApp> {
    vec![SimApp::new(APP, KEY), SimApp::sp(SP_APP, SP_KEY, "sp-1")]
}

async fn sim_with(config: SimConfig) -> SimHandle {
    start(SimConfig {
        apps: apps(),
        ..config
    })
    .await
    .unwrap()
}

async fn sim() -> SimHandle {
    sim_with(SimConfig::default()).await
}

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    version: hyper::Version,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn code(&self) -> String {
        self.json()["error_code"].as_str().unwrap_or("").to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Tc {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
}

fn client(sim: &SimHandle, h2: bool) -> Tc {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        builder.enable_all_versions().build()
    } else {
        builder.enable_http1().build()
    };
    Tc {
        client: Client::builder(TokioExecutor::new()).build(connector),
        base: sim.url(),
    }
}

fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn nonce() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// An appauth request: (Authorization header, body).
struct SignIn<'a> {
    app: &'a str,
    key: &'a str,
    sp: bool,
    corp: Option<&'a str>,
    user: Option<&'a str>,
    nonce: String,
    expire: u64,
    lower: bool,
    access: bool,
}

impl<'a> SignIn<'a> {
    fn new(app: &'a str, key: &'a str) -> Self {
        Self {
            app,
            key,
            sp: false,
            corp: None,
            user: None,
            nonce: nonce(),
            expire: now_epoch() + 600,
            lower: false,
            access: true,
        }
    }

    fn build(&self) -> (String, String) {
        let input = SignInput {
            app_id: self.app,
            corp_id: self.sp.then(|| self.corp.unwrap_or("")),
            user_id: self.user.unwrap_or(""),
            expire_time: self.expire,
            nonce: &self.nonce,
        };
        let header = match (self.lower, self.access) {
            (false, true) => authorization_header(&input, self.key.as_bytes()),
            (true, true) => format!(
                "HMAC-SHA256 signature={}, access={}",
                signature_hex(&input, self.key.as_bytes()),
                access_value(self.app)
            ),
            (_, false) => format!(
                "HMAC-SHA256 signature={}",
                signature_hex(&input, self.key.as_bytes())
            ),
        };
        let body = json!({
            "appId": self.app,
            "userId": self.user,
            "corpId": self.corp,
            "expireTime": self.expire,
            "nonce": self.nonce,
            "clientType": 72,
            "deptCode": null,
        });
        (header, body.to_string())
    }
}

impl Tc {
    async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Resp, hyper_util::client::legacy::Error> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .client
            .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await?;
        let (parts, body) = resp.into_parts();
        Ok(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
            version: parts.version,
        })
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        self.try_send(method, path, headers, body).await.unwrap()
    }

    async fn sign_in_with(&self, s: &SignIn<'_>) -> Resp {
        let (auth, body) = s.build();
        self.send(
            Method::POST,
            APPAUTH,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &body,
        )
        .await
    }

    /// Signs in as the default app's corp admin; returns the access token.
    async fn token(&self) -> String {
        let r = self.sign_in_with(&SignIn::new(APP, KEY)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()["accessToken"].as_str().unwrap().to_owned()
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: &str) -> Resp {
        self.send(method, path, &[("x-access-token", token)], body)
            .await
    }
}

#[tokio::test]
async fn sign_in_accepts_both_hex_cases_and_both_signature_forms() {
    let sim = sim().await;
    let c = client(&sim, true);

    let r = c
        .sign_in_with(&SignIn {
            user: Some("testuser@mycorp.com"),
            ..SignIn::new(APP, KEY)
        })
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.version, hyper::Version::HTTP_2);
    assert_eq!(r.header("server"), Some("api-gateway"));
    assert_eq!(
        r.header("content-type"),
        Some("application/json;charset=UTF-8")
    );
    let rid = r.header("x-request-id").unwrap();
    assert!(
        rid.len() == 32
            && rid
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    let t = r.json();
    assert!(t["accessToken"].as_str().unwrap().len() >= 48);
    assert_eq!(t["validPeriod"], 43200);
    assert_eq!(t["tokenType"], 0);
    assert_eq!(t["clientType"], 72);
    assert_eq!(t["refreshValidPeriod"], 2_592_000);
    let create_ms = t["createTime"].as_u64().unwrap();
    assert_eq!(t["expireTime"].as_u64().unwrap(), create_ms / 1000 + 43200);
    assert!(t["refreshToken"].is_string());
    assert_eq!(t["tokenIp"], "127.0.0.1");
    assert_eq!(t["user"]["thirdAccount"], "testuser@mycorp.com");
    assert_eq!(t["user"]["appId"], APP);
    assert!(uuid::Uuid::parse_str(t["user"]["userId"].as_str().unwrap()).is_ok());

    let r = c
        .sign_in_with(&SignIn {
            lower: true,
            ..SignIn::new(APP, KEY)
        })
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .sign_in_with(&SignIn {
            lower: true,
            access: false,
            expire: 0,
            ..SignIn::new(APP, KEY)
        })
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let r = c
        .sign_in_with(&SignIn {
            sp: true,
            corp: Some("807074304"),
            user: Some("alice@ent01"),
            ..SignIn::new(SP_APP, SP_KEY)
        })
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let user = &r.json()["user"];
    assert_eq!(user["companyId"], "807074304");
    assert_eq!(user["spId"], "sp-1");
    assert_eq!(user["adminType"], 2);

    let r = c
        .sign_in_with(&SignIn {
            sp: true,
            lower: true,
            ..SignIn::new(SP_APP, SP_KEY)
        })
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["user"]["adminType"], 0);

    assert_eq!(sim.sign_in_count(), 5);
    assert_eq!(sim.issued_tokens().len(), 5);
}

#[tokio::test]
async fn sign_in_rejections_have_distinct_codes() {
    let sim = sim().await;
    let c = client(&sim, false);
    let cases: Vec<(SignIn<'_>, u16, &str)> = vec![
        (SignIn::new(APP, "wrong-key"), 401, "SIM.BAD_SIGNATURE"),
        (
            SignIn {
                expire: now_epoch() - 10,
                ..SignIn::new(APP, KEY)
            },
            401,
            "SIM.SIGNATURE_EXPIRED",
        ),
        (
            SignIn {
                nonce: "n".repeat(31),
                ..SignIn::new(APP, KEY)
            },
            401,
            "SIM.BAD_NONCE",
        ),
        (
            SignIn {
                nonce: "n".repeat(65),
                ..SignIn::new(APP, KEY)
            },
            401,
            "SIM.BAD_NONCE",
        ),
        (SignIn::new("no-such-app", KEY), 401, "SIM.UNKNOWN_APP"),
        // The signature form follows the app type: an SP app signing 4 fields fails.
        (SignIn::new(SP_APP, SP_KEY), 401, "SIM.BAD_SIGNATURE"),
        (
            SignIn {
                corp: Some("807074304"),
                ..SignIn::new(APP, KEY)
            },
            401,
            "SIM.CORP_ID_NOT_ALLOWED",
        ),
    ];
    for (s, status, code) in &cases {
        let r = c.sign_in_with(s).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (*status, *code),
            "{:?}",
            r.body
        );
    }

    let (auth, _) = SignIn::new(APP, KEY).build();
    let r = c
        .send(
            Method::POST,
            APPAUTH,
            &[("authorization", &auth)],
            "{\"appId\":",
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "SIM.BAD_REQUEST"));
    let bad_access = auth.replace(&access_value(APP), &access_value("other"));
    let (_, body) = SignIn::new(APP, KEY).build();
    let r = c
        .send(
            Method::POST,
            APPAUTH,
            &[("authorization", &bad_access)],
            &body,
        )
        .await;
    assert_eq!(r.code(), "SIM.BAD_ACCESS");
    let r = c.send(Method::POST, APPAUTH, &[], &body).await;
    assert_eq!(r.code(), "SIM.BAD_SIGNATURE");

    let once = SignIn::new(APP, KEY);
    assert_eq!(c.sign_in_with(&once).await.status, 200);
    let r = c.sign_in_with(&once).await;
    assert_eq!((r.status, r.code().as_str()), (401, "SIM.NONCE_REPLAYED"));
    assert_eq!(sim.sign_in_count(), 1);
}

#[tokio::test]
async fn business_calls_need_a_live_token_and_are_recorded() {
    let sim = sim().await;
    let c = client(&sim, true);
    let token = c.token().await;
    sim.clear_requests();

    let r = c
        .send(Method::GET, CREATE, &[("x-request-id", "rid-1")], "")
        .await;
    assert_eq!((r.status, r.code().as_str()), (401, "USG.000000004"));
    assert_eq!(
        r.json()["error_msg"],
        "Authenticate failed, token invalid or expired"
    );
    let r = c.call(Method::GET, CREATE, "not-a-token", "").await;
    assert_eq!(r.code(), "USG.000000004");

    let body = "{ \"subject\" : \"caf\u{e9}\",\"length\":60 }";
    let r = c
        .send(
            Method::POST,
            CREATE,
            &[("x-access-token", &token), ("X-Request-ID", "rid-1")],
            body,
        )
        .await;
    assert_eq!(r.status, 200);
    // The upstream's shape: an array of one ConferenceInfo, with the subject sent.
    let created = &r.json()[0];
    assert_eq!(created["subject"], "caf\u{e9}");
    assert_eq!(created["length"], 60);
    assert_eq!(created["conferenceState"], "Schedule");
    assert_eq!(created["passwordEntry"][0]["conferenceRole"], "chair");
    assert_eq!(r.header("x-request-id"), Some("rid-1"));
    assert_eq!(
        r.header("x-apig-ratelimit-api"),
        Some("remain:99,limit:100,time:1 minute")
    );
    assert_eq!(
        r.header("x-apig-ratelimit-api-allenv"),
        Some("remain:199,limit:200,time:1 second")
    );
    for h in [
        "x-apig-latency",
        "x-apig-upstream-latency",
        "x-envoy-upstream-service-time",
    ] {
        assert!(r.header(h).unwrap().parse::<u64>().is_ok(), "{h}");
    }

    let r = c
        .call(Method::GET, "/v1/usg/dcs/corp/member/alice?x=1", &token, "")
        .await;
    assert_eq!(r.json()["operation"], "show_user_detail");

    let seen = sim.requests();
    assert_eq!(seen.len(), 4);
    let post = &seen[2];
    assert_eq!(post.method, "POST");
    assert_eq!(post.path_and_query, CREATE);
    assert_eq!(&post.body[..], body.as_bytes());
    assert_eq!(post.status, 200);
    assert_eq!(post.header("x-access-token"), Some(token.as_str()));
    assert!(post.headers.iter().any(|(n, _)| n == "x-request-id"));
    assert!(!format!("{post:?}").contains(&token));
    assert_eq!(seen[0].status, 401);
    assert_eq!(seen[3].path(), "/v1/usg/dcs/corp/member/alice");

    // The 401 with the same id was not processed.
    assert_eq!(sim.counts_by_request_id().get("rid-1"), Some(&1));
    assert_eq!(
        sim.max_in_any_window("create_meeting", Duration::from_secs(60)),
        1
    );
    assert_eq!(
        sim.max_in_any_window(
            "POST /v1/mmc/management/conferences",
            Duration::from_secs(60)
        ),
        1
    );
    assert_eq!(
        sim.max_in_any_window("search_meetings", Duration::from_secs(60)),
        0
    );
}

#[tokio::test]
async fn revoked_expired_and_evicted_tokens_get_401() {
    let sim = sim_with(SimConfig {
        max_tokens_per_user: 2,
        ..SimConfig::default()
    })
    .await;
    let c = client(&sim, true);
    let a = c.token().await;
    let b = c.token().await;
    assert_eq!(c.call(Method::GET, CREATE, &a, "").await.status, 200);
    let _third = c.token().await;
    let r = c.call(Method::GET, CREATE, &a, "").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "USG.000000004"),
        "evicted"
    );

    assert!(sim.revoke_token(&b));
    assert!(!sim.revoke_token(&b));
    let r = c.call(Method::GET, CREATE, &b, "").await;
    assert_eq!((r.status, r.code().as_str()), (401, "USG.000000004"));

    sim.set_token_lifetime(Duration::from_millis(100));
    let r = c.sign_in_with(&SignIn::new(APP, KEY)).await;
    assert_eq!(r.json()["validPeriod"], 1);
    let short = r.json()["accessToken"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.call(Method::GET, CREATE, &short, "").await;
        if r.status == 401 {
            assert_eq!(r.code(), "USG.000000004");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "token never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let d = c.token().await;
    sim.revoke_all_tokens();
    assert_eq!(c.call(Method::GET, CREATE, &d, "").await.status, 401);
}

#[tokio::test]
async fn token_management_apis() {
    let sim = sim().await;
    let c = client(&sim, false);
    let r = c.sign_in_with(&SignIn::new(APP, KEY)).await;
    let access = r.json()["accessToken"].as_str().unwrap().to_owned();
    let refresh = r.json()["refreshToken"].as_str().unwrap().to_owned();

    for presented in [&refresh, &access] {
        let r = c
            .send(
                Method::PUT,
                "/v1/usg/acs/token",
                &[("x-access-token", presented)],
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let fresh = r.json()["accessToken"].as_str().unwrap().to_owned();
        assert_ne!(&fresh, &access);
        assert_eq!(c.call(Method::GET, CREATE, &fresh, "").await.status, 200);
    }
    let r = c
        .send(
            Method::PUT,
            "/v1/usg/acs/token",
            &[("x-access-token", "junk")],
            "",
        )
        .await;
    assert_eq!(r.code(), "USG.000000004");

    let validate = |token: &str, gen: bool| {
        json!({"token": token, "needGenNewToken": gen, "needAccountInfo": true}).to_string()
    };
    let r = c
        .send(
            Method::POST,
            "/v1/usg/acs/token/validate",
            &[],
            &validate(&access, false),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["accessToken"], access.as_str());
    assert_eq!(r.json()["user"]["appId"], APP);
    let r = c
        .send(
            Method::POST,
            "/v1/usg/acs/token/validate",
            &[],
            &validate(&access, true),
        )
        .await;
    assert_ne!(r.json()["accessToken"], access.as_str());
    let r = c
        .send(
            Method::POST,
            "/v1/usg/acs/token/validate",
            &[],
            &validate("junk", false),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (401, "USG.000000004"));

    let r = c
        .send(
            Method::DELETE,
            "/v1/usg/acs/token",
            &[("x-access-token", &access)],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(c.call(Method::GET, CREATE, &access, "").await.status, 401);

    let r = c
        .send(
            Method::POST,
            "/v1/usg/acs/auth/account",
            &[("authorization", "Basic dTpw")],
            "{}",
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (401, "SIM.UNSUPPORTED"));
    assert_eq!(sim.sign_in_count(), 1);
}

#[tokio::test]
async fn meetings_start_and_control_tokens() {
    let sim = sim().await;
    let c = client(&sim, true);
    let token = c.token().await;

    let r = c
        .call(
            Method::POST,
            START,
            &token,
            r#"{"conferenceID":"914087436","password":"123456"}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(uuid::Uuid::parse_str(r.json()["uuid"].as_str().unwrap()).is_ok());
    assert_eq!(r.json()["regionIP"], "127.0.0.1");
    for body in [
        r#"{"conferenceID":"914087436","password":"bad"}"#,
        r#"{"conferenceID":"","password":"123456"}"#,
    ] {
        let r = c.call(Method::POST, START, &token, body).await;
        assert_eq!((r.status, r.code().as_str()), (400, "MMC.111072065"));
        assert_eq!(r.json()["error_msg"], "CONF_NOT_FOUND_OR_AUTH_FAILED");
    }

    let conf = "/v1/mmc/control/conferences/token?conferenceID=914087436";
    let r = c
        .send(
            Method::GET,
            conf,
            &[("x-password", "123456"), ("x-login-type", "1")],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let data = &r.json()["data"];
    assert_eq!(data["confTokenExpireTime"], 1800);
    assert_eq!(data["vmrCurrentConfID"], "914087436");
    assert!(data["expireTime"].as_u64().unwrap() > now_epoch() * 1000);
    let ctl = data["token"].as_str().unwrap().to_owned();
    let r = c
        .send(
            Method::GET,
            conf,
            &[("x-password", "bad"), ("x-login-type", "1")],
            "",
        )
        .await;
    assert_eq!(r.code(), "MMC.111072065");

    let lock = "/v1/mmc/control/conferences/lock?conferenceID=914087436";
    let r = c.call(Method::PUT, lock, &token, r#"{"isLock":1}"#).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "SIM.CONF_TOKEN_INVALID")
    );
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ctl)
    );
    for auth in [ctl.as_str(), basic.as_str()] {
        let r = c
            .send(
                Method::PUT,
                lock,
                &[
                    ("x-conference-authorization", auth),
                    ("x-access-token", "stale"),
                ],
                r#"{"isLock":1}"#,
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["operation"], "lock_meeting");
    }
}

#[tokio::test]
async fn a_created_meeting_lives_through_start_control_and_stop() {
    let sim = sim_with(SimConfig {
        conf_token_lifetime: Duration::from_secs(5),
        ..SimConfig::default()
    })
    .await;
    let c = client(&sim, false);
    let token = c.token().await;
    let r = c
        .call(Method::POST, CREATE, &token, r#"{"subject":"weekly"}"#)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = r.json()[0]["conferenceID"].as_str().unwrap().to_owned();
    let host = r.json()[0]["passwordEntry"][0]["password"]
        .as_str()
        .unwrap()
        .to_owned();
    let guest = r.json()[0]["passwordEntry"][1]["password"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(sim.meeting_state(&id), Some(MeetingState::Scheduled));
    let token_path = format!("/v1/mmc/control/conferences/token?conferenceID={id}");
    let get_token = |password: &str| {
        let password = password.to_owned();
        let path = token_path.clone();
        let c = &c;
        async move {
            let headers = [("x-password", password.as_str()), ("x-login-type", "1")];
            c.send(Method::GET, &path, &headers, "").await
        }
    };
    // Not started yet: no control token.
    let r = get_token(&host).await;
    assert_eq!((r.status, r.code().as_str()), (400, "SIM.CONF_NOT_STARTED"));
    // The guest password starts only a meeting that allows it.
    let start = |pw: &str| json!({"conferenceID": id, "password": pw}).to_string();
    let r = c.call(Method::POST, START, &token, &start(&guest)).await;
    assert_eq!(r.code(), "MMC.111072065");
    let r = c.call(Method::POST, START, &token, &start(&host)).await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.meeting_state(&id), Some(MeetingState::Started));
    // The guest password gets no control token; the host password does.
    assert_eq!(get_token(&guest).await.code(), "MMC.111072065");
    let r = get_token(&host).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["data"]["confTokenExpireTime"], 5);
    let ctl = r.json()["data"]["token"].as_str().unwrap().to_owned();

    // Bound to its meeting.
    let lock = |conf: &str| format!("/v1/mmc/control/conferences/lock?conferenceID={conf}");
    let auth = [("x-conference-authorization", ctl.as_str())];
    let r = c
        .send(Method::PUT, &lock(&id), &auth, r#"{"isLock":1}"#)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .send(Method::PUT, &lock("914087436"), &auth, r#"{"isLock":1}"#)
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "SIM.CONF_TOKEN_MISMATCH")
    );
    let ws = format!("/v1/mmc/control/conferences/wsToken?conferenceID={id}");
    let r = c.send(Method::GET, &ws, &auth, "").await;
    assert_eq!(r.status, 200);
    assert!(r.json()["webSocketToken"].is_string());

    // A keep-alive returns the same token, without checking the password.
    let r = c
        .send(
            Method::GET,
            &token_path,
            &[
                ("x-conference-authorization", ctl.as_str()),
                ("x-password", "anything"),
                ("x-login-type", "1"),
            ],
            "",
        )
        .await;
    assert_eq!(r.json()["data"]["token"], ctl.as_str());
    assert_eq!(
        sim.control_stats(),
        ControlStats {
            token_requests: 4,
            issued: 1,
            keepalives: 1
        }
    );

    // Stop ends the meeting and its token.
    let stop = format!("/v1/mmc/control/conferences/stop?conferenceID={id}");
    let r = c.send(Method::PUT, &stop, &auth, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.meeting_state(&id), Some(MeetingState::Ended));
    let r = c
        .send(Method::PUT, &lock(&id), &auth, r#"{"isLock":1}"#)
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "SIM.CONF_TOKEN_INVALID")
    );
    assert_eq!(get_token(&host).await.code(), "MMC.111072065");
}

#[tokio::test]
async fn unknown_routes_get_apig_0101() {
    let sim = sim().await;
    let c = client(&sim, false);
    let token = c.token().await;
    for (m, p) in [
        (Method::GET, "/nope"),
        (Method::PATCH, START),
        (Method::GET, "/v1/mmc/management/not-a-real-api"),
    ] {
        let r = c.call(m, p, &token, "").await;
        assert_eq!((r.status, r.code().as_str()), (404, "APIG.0101"));
        assert_eq!(r.header("server"), Some("api-gateway"));
        assert!(r.header("x-apig-ratelimit-api").is_none());
    }
}

#[tokio::test]
async fn fixed_window_refuses_the_next_request_and_policies_do_not_share_slots() {
    let sim = sim_with(SimConfig {
        limits: SimLimits {
            per_api: Some(SimLimit::new(3, Duration::from_secs(60))),
            all_env: Some(SimLimit::new(5, Duration::from_secs(60))),
            window: WindowKind::Fixed {
                phase: Duration::ZERO,
            },
        },
        ..SimConfig::default()
    })
    .await;
    let c = client(&sim, true);
    let a = c.token().await;
    let r = c
        .sign_in_with(&SignIn {
            sp: true,
            ..SignIn::new(SP_APP, SP_KEY)
        })
        .await;
    let b = r.json()["accessToken"].as_str().unwrap().to_owned();

    for remain in [2, 1, 0] {
        let r = c.call(Method::GET, CREATE, &a, "").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-apig-ratelimit-api"),
            Some(format!("remain:{remain},limit:3,time:1 minute").as_str())
        );
    }
    let r = c.call(Method::GET, CREATE, &a, "").await;
    assert_eq!((r.status, r.code().as_str()), (429, "APIG.0308"));
    assert_eq!(
        r.json()["error_msg"],
        "The throttling threshold has been reached: policy api over ratelimit,limit:3,time:1 minute"
    );
    assert_eq!(
        r.header("x-apig-ratelimit-api"),
        Some("remain:0,limit:3,time:1 minute")
    );
    // The refused request took no all-env slot.
    assert_eq!(
        r.header("x-apig-ratelimit-api-allenv"),
        Some("remain:2,limit:5,time:1 minute")
    );

    // Another app has its own per-API budget but shares the all-env one.
    for _ in 0..2 {
        assert_eq!(c.call(Method::GET, CREATE, &b, "").await.status, 200);
    }
    let r = c.call(Method::GET, CREATE, &b, "").await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json()["error_msg"],
        "The throttling threshold has been reached: policy api over ratelimit,limit:5,time:1 minute"
    );
    assert_eq!(
        r.header("x-apig-ratelimit-api"),
        Some("remain:1,limit:3,time:1 minute")
    );
    // Other operations are counted separately.
    assert_eq!(c.call(Method::POST, CREATE, &a, "{}").await.status, 200);

    assert_eq!(sim.rejected_429(), 2);
    assert_eq!(
        sim.max_in_any_window("search_meetings", Duration::from_secs(60)),
        5
    );
    assert_eq!(
        sim.max_in_any_window(
            "GET /v1/mmc/management/conferences",
            Duration::from_secs(60)
        ),
        5
    );
}

#[tokio::test]
async fn sliding_window_and_runtime_limit_changes() {
    let sim = sim().await;
    let c = client(&sim, true);
    let a = c.token().await;
    sim.set_limits(SimLimits {
        per_api: Some(SimLimit::new(2, Duration::from_secs(60))),
        all_env: None,
        window: WindowKind::Sliding,
    });
    for remain in [1, 0] {
        let r = c.call(Method::GET, CREATE, &a, "").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-apig-ratelimit-api"),
            Some(format!("remain:{remain},limit:2,time:1 minute").as_str())
        );
        assert!(r.header("x-apig-ratelimit-api-allenv").is_none());
    }
    let r = c.call(Method::GET, CREATE, &a, "").await;
    assert_eq!((r.status, r.code().as_str()), (429, "APIG.0308"));
    sim.set_limits(SimLimits::unlimited());
    assert_eq!(c.call(Method::GET, CREATE, &a, "").await.status, 200);
    assert_eq!(sim.rejected_429(), 1);
}

#[tokio::test]
async fn faults_apply_to_the_next_matching_requests() {
    let sim = sim().await;
    let c = client(&sim, false);

    sim.inject(Fault::SignInStatus {
        status: 503,
        count: 1,
    });
    sim.inject(Fault::SignInBody {
        body: "{\"accessToken\":".to_owned(),
        count: 1,
    });
    let r = c.sign_in_with(&SignIn::new(APP, KEY)).await;
    assert_eq!((r.status, r.code().as_str()), (503, "SIM.FAULT"));
    let r = c.sign_in_with(&SignIn::new(APP, KEY)).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"{\"accessToken\":"[..]));
    let token = c.token().await;
    assert_eq!(sim.sign_in_count(), 1);

    let rid = [("x-access-token", token.as_str()), ("x-request-id", "f-1")];
    sim.inject(Fault::BusinessStatus {
        status: 503,
        count: 2,
    });
    for _ in 0..2 {
        let r = c.send(Method::GET, CREATE, &rid, "").await;
        assert_eq!((r.status, r.code().as_str()), (503, "SIM.FAULT"));
    }
    assert_eq!(c.send(Method::GET, CREATE, &rid, "").await.status, 200);
    assert_eq!(sim.counts_by_request_id().get("f-1"), Some(&1));

    sim.inject(Fault::Throttle {
        count: 1,
        retry_after: Some(7),
    });
    sim.inject(Fault::Throttle {
        count: 1,
        retry_after: None,
    });
    let r = c.call(Method::GET, CREATE, &token, "").await;
    assert_eq!((r.status, r.code().as_str()), (429, "APIG.0308"));
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(
        r.header("x-apig-ratelimit-api"),
        Some("remain:0,limit:100,time:1 minute")
    );
    let r = c.call(Method::GET, CREATE, &token, "").await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_none());
    assert_eq!(sim.rejected_429(), 2);

    sim.inject(Fault::Delay {
        delay: Duration::from_millis(10),
        count: 1,
    });
    assert_eq!(c.call(Method::GET, CREATE, &token, "").await.status, 200);

    sim.clear_requests();
    sim.inject(Fault::ResetBeforeResponse { count: 1 });
    let r = c
        .try_send(
            Method::POST,
            CREATE,
            &[("x-access-token", &token)],
            "{\"a\":1}",
        )
        .await;
    assert!(r.is_err(), "the connection was dropped");
    assert_eq!(c.call(Method::GET, CREATE, &token, "").await.status, 200);
    let seen = sim.requests();
    assert_eq!(seen[0].status, 0);
    assert_eq!(&seen[0].body[..], b"{\"a\":1}");

    sim.inject(Fault::BusinessStatus {
        status: 500,
        count: 5,
    });
    sim.clear_faults();
    assert_eq!(c.call(Method::GET, CREATE, &token, "").await.status, 200);
}

#[tokio::test]
async fn debug_headers_follow_the_mode() {
    let sim = sim_with(SimConfig {
        debug_headers: DebugHeaders::OnDebugMode,
        record_bodies: false,
        ..SimConfig::default()
    })
    .await;
    let c = client(&sim, false);
    let token = c.token().await;
    let r = c.call(Method::POST, CREATE, &token, "{}").await;
    assert_eq!(r.version, hyper::Version::HTTP_11);
    assert!(r.header("x-apig-ratelimit-api").is_none());
    assert!(r.header("x-apig-latency").is_none());
    let r = c
        .send(
            Method::GET,
            CREATE,
            &[("x-access-token", &token), ("x-apig-mode", "debug")],
            "",
        )
        .await;
    assert!(r.header("x-apig-ratelimit-api").is_some());
    assert!(r.header("x-envoy-upstream-service-time").is_some());
    assert!(sim.requests().iter().all(|r| r.body.is_empty()));

    let quiet = sim_with(SimConfig {
        debug_headers: DebugHeaders::Never,
        ..SimConfig::default()
    })
    .await;
    let c = client(&quiet, true);
    let token = c.token().await;
    let r = c
        .send(
            Method::GET,
            CREATE,
            &[("x-access-token", &token), ("x-apig-mode", "debug")],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-apig-ratelimit-api").is_none());
}

#[tokio::test]
async fn shutdown_and_drop_stop_listening() {
    let sim = sim().await;
    let addr = sim.addr();
    assert!(sim.url().starts_with("https://127.0.0.1:"));
    sim.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let sim = sim_with(SimConfig::default()).await;
    let addr = sim.addr();
    drop(sim);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still listening after drop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn invalid_configs_are_refused() {
    let dup = start(SimConfig {
        apps: vec![SimApp::new(APP, KEY), SimApp::new(APP, "other")],
        ..SimConfig::default()
    })
    .await;
    assert!(matches!(dup, Err(SimError::Config(_))));
    let zero = start(SimConfig {
        limits: SimLimits {
            per_api: Some(SimLimit::new(1, Duration::ZERO)),
            ..SimLimits::default()
        },
        ..SimConfig::default()
    })
    .await;
    assert!(matches!(zero, Err(SimError::Config(_))));
    let taken = start(SimConfig::default()).await.unwrap();
    let again = start(SimConfig {
        listen: taken.addr(),
        ..SimConfig::default()
    })
    .await;
    assert!(matches!(again, Err(SimError::Bind { .. })));
}
