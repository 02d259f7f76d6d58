//! The simulator's request handling: appauth, token management, business APIs, response headers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, SERVER,
};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use secrecy::ExposeSecret as _;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::limits::{Remain, Verdict};
use super::meetings::MeetingError;
use super::routes::{Kind, Route, Routes};
use super::state::{
    ceil_secs, epoch_ms, random_token, FaultStage, IssueRequest, State, TokenKey, TokenRecord,
};
use super::{DebugHeaders, Fault, RecordedRequest, SimApp, SimConfig, SimError};
use crate::token::sign::{access_value, parse_authorization, verify, SignInput};

const MAX_BODY: usize = 10 * 1024 * 1024;
const JSON_UTF8: &str = "application/json;charset=UTF-8";

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ACCESS_TOKEN: HeaderName = HeaderName::from_static("x-access-token");
const X_CONF_AUTH: HeaderName = HeaderName::from_static("x-conference-authorization");
const X_PASSWORD: HeaderName = HeaderName::from_static("x-password");
const X_LOGIN_TYPE: HeaderName = HeaderName::from_static("x-login-type");
const X_APIG_MODE: HeaderName = HeaderName::from_static("x-apig-mode");
const X_APIG_LATENCY: HeaderName = HeaderName::from_static("x-apig-latency");
const X_APIG_UPSTREAM_LATENCY: HeaderName = HeaderName::from_static("x-apig-upstream-latency");
const X_ENVOY_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
const X_RATELIMIT_API: HeaderName = HeaderName::from_static("x-apig-ratelimit-api");
const X_RATELIMIT_ALLENV: HeaderName = HeaderName::from_static("x-apig-ratelimit-api-allenv");

const TOKEN_INVALID: (&str, &str) = (
    "USG.000000004",
    "Authenticate failed, token invalid or expired",
);
const CONF_NOT_FOUND: (&str, &str) = ("MMC.111072065", "CONF_NOT_FOUND_OR_AUTH_FAILED");

/// The service answers with this error to make hyper drop the connection (h2: reset the stream)
/// without a response.
/// With an h2 error inside, hyper resets an h2 stream with that error's reason.
#[derive(Debug)]
pub(crate) struct ResetConnection(Option<h2::Error>);

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulator fault: connection reset before response")
    }
}

impl std::error::Error for ResetConnection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.as_ref().map(|e| e as _)
    }
}

/// Checks what `start` cannot repair.
pub(crate) fn validate(config: &SimConfig) -> Result<(), SimError> {
    let mut seen = std::collections::HashSet::new();
    for app in &config.apps {
        if app.app_id.is_empty() {
            return Err(SimError::Config(
                "apps: app_id must not be empty".to_owned(),
            ));
        }
        if !seen.insert(app.app_id.as_str()) {
            return Err(SimError::Config(format!(
                "apps: app_id {:?} appears twice",
                app.app_id
            )));
        }
    }
    if config.max_tokens_per_user == 0 {
        return Err(SimError::Config(
            "max_tokens_per_user must be at least 1".to_owned(),
        ));
    }
    if config.token_lifetime.is_zero() {
        return Err(SimError::Config(
            "token_lifetime must not be zero".to_owned(),
        ));
    }
    if config.conf_token_lifetime.is_zero() {
        return Err(SimError::Config(
            "conf_token_lifetime must not be zero".to_owned(),
        ));
    }
    let mut ids = std::collections::HashSet::new();
    for m in &config.meetings {
        if m.conference_id.is_empty() || m.chair_password.is_empty() {
            return Err(SimError::Config(
                "meetings: conference_id and chair_password must not be empty".to_owned(),
            ));
        }
        if !ids.insert(m.conference_id.as_str()) {
            return Err(SimError::Config(format!(
                "meetings: conference_id {:?} appears twice",
                m.conference_id
            )));
        }
    }
    for (name, limit) in [
        ("limits.per_api", config.limits.per_api),
        ("limits.all_env", config.limits.all_env),
    ] {
        if limit.is_some_and(|l| l.window.is_zero()) {
            return Err(SimError::Config(format!("{name}.window must not be zero")));
        }
    }
    Ok(())
}

/// The simulator shared by every connection.
pub(crate) struct Sim {
    pub(crate) routes: Routes,
    apps: HashMap<String, SimApp>,
    config: SimConfig,
    addr: SocketAddr,
    state: Mutex<State>,
    pub(crate) open_connections: std::sync::atomic::AtomicUsize,
}

/// An answer before the common headers are added.
struct Reply {
    status: StatusCode,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    fn json(status: StatusCode, body: &Value) -> Self {
        Self {
            status,
            body: Bytes::from(body.to_string()),
            headers: Vec::new(),
        }
    }

    fn error(status: StatusCode, code: &str, msg: &str) -> Self {
        Self::json(status, &json!({ "error_code": code, "error_msg": msg }))
    }

    fn token_invalid() -> Self {
        Self::error(StatusCode::UNAUTHORIZED, TOKEN_INVALID.0, TOKEN_INVALID.1)
    }

    fn header(mut self, name: HeaderName, value: impl ToString) -> Self {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((name, v));
        }
        self
    }
}

/// What a business request learned on its way, for the APIG debug headers.
#[derive(Default)]
struct Trace {
    verdict: Option<Verdict>,
    admitted_at: Option<Instant>,
    /// A fault that applies to the response body once the headers are out.
    body_fault: Option<Fault>,
}

/// A response body: whole, or cut in two by a body fault.
pub(crate) enum SimBody {
    Whole(Full<Bytes>),
    Faulty {
        first: Option<Bytes>,
        rest: Option<Bytes>,
        /// Before the rest: a slow body waits; a reset body fails instead of sending it.
        delay: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        reset: bool,
        len: u64,
    },
}

impl http_body::Body for SimBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        match self.get_mut() {
            SimBody::Whole(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            SimBody::Faulty {
                first,
                rest,
                delay,
                reset,
                ..
            } => {
                if let Some(f) = first.take() {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(f))));
                }
                if *reset {
                    if rest.take().is_some() {
                        return Poll::Ready(Some(Err(Box::new(ResetConnection(None)))));
                    }
                    return Poll::Ready(None);
                }
                if let Some(d) = delay.as_mut() {
                    if std::future::Future::poll(d.as_mut(), cx).is_pending() {
                        return Poll::Pending;
                    }
                    *delay = None;
                }
                Poll::Ready(rest.take().map(|r| Ok(http_body::Frame::data(r))))
            }
        }
    }

    // Telling the end here lets HTTP/2 set END_STREAM on the last DATA frame, as servers do,
    // instead of sending an empty DATA frame after it.
    fn is_end_stream(&self) -> bool {
        match self {
            SimBody::Whole(b) => b.is_end_stream(),
            SimBody::Faulty { first, rest, .. } => first.is_none() && rest.is_none(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            SimBody::Whole(b) => b.size_hint(),
            SimBody::Faulty { len, .. } => http_body::SizeHint::with_exact(*len),
        }
    }
}

impl Sim {
    pub(crate) fn new(config: SimConfig, addr: SocketAddr) -> Result<Self, SimError> {
        validate(&config)?;
        let apps = config
            .apps
            .iter()
            .map(|a| (a.app_id.clone(), a.clone()))
            .collect();
        let state = State::new(&config, Instant::now());
        Ok(Self {
            routes: Routes::load(),
            apps,
            config,
            addr,
            open_connections: std::sync::atomic::AtomicUsize::new(0),
            state: Mutex::new(state),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock on purpose; if a test thread did, the state is
        // still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) async fn handle(
        self: std::sync::Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<SimBody>, ResetConnection> {
        let arrived = Instant::now();
        let (parts, body) = req.into_parts();
        let request_id = header_str(&parts.headers, &X_REQUEST_ID)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let body = Limited::new(body, MAX_BODY).collect().await;
        // A body that cannot be read is answered, never processed.
        let (body, body_error) = match body {
            Ok(b) => (b.to_bytes(), None),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                (
                    Bytes::new(),
                    Some(Reply::error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "SIM.BODY_TOO_LARGE",
                        "request body too large",
                    )),
                )
            }
            Err(_) => (
                Bytes::new(),
                Some(Reply::error(
                    StatusCode::BAD_REQUEST,
                    "SIM.BAD_BODY",
                    "request body could not be read",
                )),
            ),
        };
        let seq = self.lock().requests.push(RecordedRequest {
            method: parts.method.to_string(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
            headers: recorded_headers(&parts),
            body: if self.config.record_bodies {
                body.clone()
            } else {
                Bytes::new()
            },
            status: 0,
            at: arrived,
            peer,
            version: parts.version,
        });

        let route = self.routes.find(&parts.method, parts.uri.path());
        let is_business = route.is_some_and(|r| r.kind.is_business());
        let mut trace = Trace::default();
        let reply = if let Some(reply) = body_error {
            Ok(reply)
        } else {
            match route {
                None => Ok(Reply::error(
                    StatusCode::NOT_FOUND,
                    "APIG.0101",
                    "The API does not exist or has not been published in the environment",
                )),
                Some(route) => match route.kind {
                    Kind::AppAuth => Ok(self.app_auth(&parts, &body, peer)),
                    Kind::Unsupported => Ok(Reply::error(
                        StatusCode::UNAUTHORIZED,
                        "SIM.UNSUPPORTED",
                        "the simulator supports App ID authentication only",
                    )),
                    Kind::RefreshToken => Ok(self.refresh_token(&parts)),
                    Kind::ValidateToken => Ok(self.validate_token(&body)),
                    Kind::DeleteToken => Ok(self.delete_token(&parts)),
                    Kind::ConfToken
                    | Kind::StartMeeting
                    | Kind::CreateMeeting
                    | Kind::StopMeeting
                    | Kind::WsToken
                    | Kind::Control
                    | Kind::Business => {
                        self.business(route, &parts, &body, request_id.as_deref(), &mut trace)
                            .await
                    }
                },
            }
        };
        if is_business && !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }

        let reply = match reply {
            Ok(reply) => reply,
            Err(reset) => {
                tracing::debug!(
                    method = %parts.method,
                    path = parts.uri.path(),
                    "Simulator dropped the connection (fault)"
                );
                return Err(reset);
            }
        };
        self.lock().requests.set_status(seq, reply.status.as_u16());
        tracing::debug!(
            method = %parts.method,
            path = parts.uri.path(),
            status = reply.status.as_u16(),
            "Simulator answered"
        );

        let body = match trace.body_fault.take() {
            Some(fault) => {
                let mut whole = reply.body;
                let len = whole.len() as u64;
                let rest = whole.split_off(whole.len() / 2);
                let (delay, reset) = match fault {
                    Fault::SlowBody { delay, .. } => {
                        (Some(Box::pin(tokio::time::sleep(delay))), false)
                    }
                    _ => (None, true),
                };
                SimBody::Faulty {
                    first: Some(whole),
                    rest: Some(rest),
                    delay,
                    reset,
                    len,
                }
            }
            None => SimBody::Whole(Full::new(reply.body)),
        };
        let mut response = Response::new(body);
        *response.status_mut() = reply.status;
        let h = response.headers_mut();
        h.insert(SERVER, HeaderValue::from_static("api-gateway"));
        h.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_UTF8));
        let rid = request_id
            .and_then(|r| HeaderValue::from_str(&r).ok())
            .unwrap_or_else(|| {
                HeaderValue::from_str(&hex::encode(rand::random::<[u8; 16]>()))
                    .unwrap_or_else(|_| HeaderValue::from_static("0"))
            });
        h.insert(X_REQUEST_ID, rid);
        for (name, value) in reply.headers {
            h.append(name, value);
        }
        if is_business && self.debug_headers_wanted(&parts.headers) {
            let total = ms(arrived.elapsed());
            let upstream = trace.admitted_at.map_or(0, |t| ms(t.elapsed()));
            for (name, value) in [
                (X_APIG_LATENCY, total),
                (X_APIG_UPSTREAM_LATENCY, upstream),
                (X_ENVOY_TIME, upstream),
            ] {
                h.insert(name, HeaderValue::from(value));
            }
            if let Some(v) = &trace.verdict {
                for (name, remain) in [(X_RATELIMIT_API, v.api), (X_RATELIMIT_ALLENV, v.all_env)] {
                    if let Some(r) =
                        remain.and_then(|r| HeaderValue::from_str(&r.header_value()).ok())
                    {
                        h.insert(name, r);
                    }
                }
            }
        }
        Ok(response)
    }

    fn debug_headers_wanted(&self, headers: &HeaderMap) -> bool {
        match self.config.debug_headers {
            DebugHeaders::Always => true,
            DebugHeaders::Never => false,
            DebugHeaders::OnDebugMode => {
                header_str(headers, &X_APIG_MODE).is_some_and(|m| m.eq_ignore_ascii_case("debug"))
            }
        }
    }

    // === appauth ===

    fn app_auth(&self, parts: &Parts, body: &Bytes, peer: SocketAddr) -> Reply {
        match self.lock().take_fault(FaultStage::SignIn) {
            Some(Fault::SignInStatus { status, .. }) => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Reply::error(status, "SIM.FAULT", "injected sign-in failure");
            }
            Some(Fault::SignInBody { body, .. }) => {
                return Reply {
                    status: StatusCode::OK,
                    body: Bytes::from(body),
                    headers: Vec::new(),
                };
            }
            _ => {}
        }
        let req = match AppAuthBody::parse(body) {
            Ok(r) => r,
            Err(msg) => return Reply::error(StatusCode::BAD_REQUEST, "SIM.BAD_REQUEST", &msg),
        };
        let unauthorized =
            |code: &str, msg: &str| Reply::error(StatusCode::UNAUTHORIZED, code, msg);
        let Some(app) = self.apps.get(&req.app_id) else {
            return unauthorized("SIM.UNKNOWN_APP", "unknown appId");
        };
        let Some(auth) = header_str(&parts.headers, &AUTHORIZATION).and_then(parse_authorization)
        else {
            return unauthorized(
                "SIM.BAD_SIGNATURE",
                "Authorization is not 'HMAC-SHA256 signature=<hex>,access=<base64>'",
            );
        };
        if auth
            .access
            .as_deref()
            .is_some_and(|a| a != access_value(&req.app_id))
        {
            return unauthorized("SIM.BAD_ACCESS", "access is not base64(appId)");
        }
        let nonce_len = req.nonce.chars().count();
        if !(32..=64).contains(&nonce_len) {
            return unauthorized("SIM.BAD_NONCE", "nonce must be 32 to 64 characters");
        }
        let now_epoch = epoch_ms() / 1000;
        if req.expire_time != 0 && req.expire_time < now_epoch {
            return unauthorized("SIM.SIGNATURE_EXPIRED", "expireTime has passed");
        }
        let corp = match (&app.corp_id, &req.corp_id) {
            (Some(_), corp) => Some(corp.clone().unwrap_or_default()),
            (None, Some(c)) if !c.is_empty() => {
                return unauthorized("SIM.CORP_ID_NOT_ALLOWED", "corpId is for SP apps only");
            }
            (None, _) => None,
        };
        let input = SignInput {
            app_id: &req.app_id,
            corp_id: corp.as_deref(),
            user_id: &req.user_id,
            expire_time: req.expire_time,
            nonce: &req.nonce,
        };
        if !verify(
            &input,
            app.app_key.expose_secret().as_bytes(),
            &auth.signature,
        ) {
            return unauthorized("SIM.BAD_SIGNATURE", "signature mismatch");
        }

        let now = Instant::now();
        let mut st = self.lock();
        // Only nonces of correctly signed requests are remembered, so garbage cannot fill the memory.
        if !st.nonces.entry(req.app_id.clone()).or_default().insert(
            &req.nonce,
            req.expire_time,
            now_epoch,
        ) {
            return unauthorized("SIM.NONCE_REPLAYED", "nonce already used");
        }
        let record = self.issue(
            &mut st,
            TokenKey {
                app: req.app_id,
                corp: corp.unwrap_or_default(),
                user: req.user_id,
            },
            req.client_type,
            peer.ip().to_string(),
            now,
        );
        st.sign_ins += 1;
        drop(st);
        Reply::json(StatusCode::OK, &self.token_json(&record, now, true))
    }

    fn issue(
        &self,
        st: &mut State,
        key: TokenKey,
        client_type: i64,
        token_ip: String,
        now: Instant,
    ) -> TokenRecord {
        let lifetime = st.token_lifetime;
        st.tokens.issue(
            IssueRequest {
                key,
                client_type,
                token_ip,
                lifetime,
                refresh_lifetime: self.config.refresh_lifetime,
                max_per_user: self.config.max_tokens_per_user,
            },
            now,
        )
    }

    fn token_json(&self, r: &TokenRecord, now: Instant, with_user: bool) -> Value {
        let created_s = r.created_ms / 1000;
        let remaining = r.expires_at.saturating_duration_since(now);
        let mut v = json!({
            "accessToken": r.access,
            "validPeriod": ceil_secs(remaining),
            "expireTime": created_s + r.valid_secs,
            "createTime": r.created_ms,
            "refreshToken": r.refresh,
            "refreshValidPeriod": r.refresh_secs,
            "refreshExpireTime": created_s + r.refresh_secs,
            "refreshCreateTime": r.created_ms,
            "tokenIp": r.token_ip,
            "tokenType": 0,
            "clientType": r.client_type,
            "forceLoginInd": Value::Null,
            "firstLogin": false,
            "pwdExpired": false,
            "daysPwdAvailable": -1,
            "delayDelete": false,
            "proxyToken": Value::Null,
        });
        if with_user {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("user".to_owned(), self.user_json(&r.key));
            }
        }
        v
    }

    fn user_json(&self, key: &TokenKey) -> Value {
        let sp_id = self
            .apps
            .get(&key.app)
            .and_then(|a| a.corp_id.clone())
            .unwrap_or_default();
        let is_sp = self.apps.get(&key.app).is_some_and(|a| a.corp_id.is_some());
        // 0 SP admin, 1 corp admin, 2 ordinary user.
        let admin_type = match (is_sp, key.corp.is_empty(), key.user.is_empty()) {
            (true, true, true) => 0,
            (_, _, true) => 1,
            _ => 2,
        };
        let company = if is_sp {
            key.corp.clone()
        } else {
            "sim-corp".to_owned()
        };
        let mut digest = Sha256::new();
        for part in [&key.app, &key.corp, &key.user] {
            digest.update(part.as_bytes());
            digest.update([0u8]);
        }
        let hash = digest.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash[..16]);
        json!({
            "realm": "huaweicloud.com",
            "userId": uuid::Builder::from_random_bytes(id).into_uuid().to_string(),
            "ucloginAccount": if key.user.is_empty() { "admin" } else { key.user.as_str() },
            "thirdAccount": key.user,
            "userType": 2,
            "adminType": admin_type,
            "name": if key.user.is_empty() { "admin" } else { key.user.as_str() },
            "companyId": company,
            "spId": sp_id,
            "appId": key.app,
            "isBindPhone": Value::Null,
            "freeUser": false,
            "paidAccount": Value::Null,
            "paidPassword": Value::Null,
        })
    }

    // === token management ===

    fn refresh_token(&self, parts: &Parts) -> Reply {
        let Some(presented) = header_str(&parts.headers, &X_ACCESS_TOKEN) else {
            return Reply::token_invalid();
        };
        let now = Instant::now();
        let mut st = self.lock();
        // The docs disagree on whether the refresh or the access token goes here: take either.
        let identity = st.tokens.refresh_identity(presented, now).or_else(|| {
            st.tokens
                .get(presented, now)
                .map(|r| (r.key.clone(), r.client_type, r.token_ip.clone()))
        });
        let Some((key, client_type, ip)) = identity else {
            return Reply::token_invalid();
        };
        let record = self.issue(&mut st, key, client_type, ip, now);
        drop(st);
        Reply::json(StatusCode::OK, &self.token_json(&record, now, true))
    }

    fn validate_token(&self, body: &Bytes) -> Reply {
        let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "SIM.BAD_REQUEST",
                "body must be a JSON object",
            );
        };
        let Some(token) = req.get("token").and_then(Value::as_str) else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "SIM.BAD_REQUEST",
                "token is required",
            );
        };
        let gen_new = req
            .get("needGenNewToken")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let account = req
            .get("needAccountInfo")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let now = Instant::now();
        let mut st = self.lock();
        let Some(current) = st.tokens.get(token, now).cloned() else {
            return Reply::token_invalid();
        };
        let record = if gen_new {
            self.issue(
                &mut st,
                current.key.clone(),
                current.client_type,
                current.token_ip.clone(),
                now,
            )
        } else {
            current
        };
        drop(st);
        Reply::json(StatusCode::OK, &self.token_json(&record, now, account))
    }

    fn delete_token(&self, parts: &Parts) -> Reply {
        let now = Instant::now();
        let mut st = self.lock();
        let live = header_str(&parts.headers, &X_ACCESS_TOKEN)
            .filter(|t| st.tokens.get(t, now).is_some())
            .map(str::to_owned);
        match live {
            Some(t) => {
                st.tokens.revoke(&t);
                Reply {
                    status: StatusCode::OK,
                    body: Bytes::new(),
                    headers: Vec::new(),
                }
            }
            None => Reply::token_invalid(),
        }
    }

    // === business APIs ===

    async fn business(
        &self,
        route: &Route,
        parts: &Parts,
        body: &Bytes,
        request_id: Option<&str>,
        trace: &mut Trace,
    ) -> Result<Reply, ResetConnection> {
        let now = Instant::now();
        let after_admission = {
            let mut st = self.lock();
            let app = match self.authenticate(&mut st, route.kind, parts, now) {
                Ok(app) => app,
                Err(reply) => return Ok(reply),
            };
            let before_limits = st.take_fault(FaultStage::BeforeLimits);
            if let Some(Fault::RefuseStream { .. }) = before_limits {
                return Err(ResetConnection(Some(h2::Error::from(
                    h2::Reason::REFUSED_STREAM,
                ))));
            }
            if let Some(Fault::Throttle { retry_after, .. }) = before_limits {
                st.rejected_429 += 1;
                let limits = st.limits.clone();
                let full = |l: Option<super::SimLimit>| {
                    l.map(|l| Remain {
                        remain: 0,
                        limit: l.limit,
                        window: l.window,
                    })
                };
                let verdict = Verdict {
                    refused: Some(super::limits::Policy::Api),
                    api: full(limits.per_api),
                    all_env: full(limits.all_env),
                };
                let msg = verdict.message().unwrap_or_else(|| {
                    "The throttling threshold has been reached: policy api over ratelimit"
                        .to_owned()
                });
                trace.verdict = Some(verdict);
                let mut reply = Reply::error(StatusCode::TOO_MANY_REQUESTS, "APIG.0308", &msg);
                if let Some(secs) = retry_after {
                    reply = reply.header(RETRY_AFTER, secs);
                }
                return Ok(reply);
            }
            let limits = st.limits.clone();
            let verdict = st.limiter.check(&limits, &route.name, &app, now);
            if let Some(msg) = verdict.message() {
                st.rejected_429 += 1;
                trace.verdict = Some(verdict);
                return Ok(Reply::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "APIG.0308",
                    &msg,
                ));
            }
            trace.verdict = Some(verdict);
            st.admit(&route.name, now);
            trace.admitted_at = Some(now);
            (st.take_fault(FaultStage::AfterAdmission), app)
        };
        let (fault, app) = after_admission;
        match fault {
            Some(Fault::ResetBeforeResponse { .. }) => return Err(ResetConnection(None)),
            Some(Fault::BusinessStatus { status, .. }) => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Ok(Reply::error(
                    status,
                    "SIM.FAULT",
                    "injected business failure",
                ));
            }
            Some(Fault::Delay { delay, .. }) => tokio::time::sleep(delay).await,
            Some(f @ (Fault::SlowBody { .. } | Fault::ResetMidBody { .. })) => {
                trace.body_fault = Some(f);
            }
            _ => {}
        }

        let reply = match route.kind {
            Kind::StartMeeting => self.start_meeting(body, &app),
            Kind::CreateMeeting => self.create_meeting(body, &app),
            Kind::ConfToken => self.conf_token(parts, &app),
            Kind::StopMeeting => {
                self.lock().meetings.stop(&conference_id(parts));
                Reply::json(StatusCode::OK, &json!({}))
            }
            // One-time, valid for a minute; nothing in the simulator consumes it.
            Kind::WsToken => Reply::json(
                StatusCode::OK,
                &json!({ "webSocketToken": random_token(48) }),
            ),
            _ => Reply::json(
                StatusCode::OK,
                &json!({
                    "operation": route.name,
                    "echo": serde_json::from_slice::<Value>(body).unwrap_or(Value::Null),
                }),
            ),
        };
        if reply.status.is_success() || reply.status.is_client_error() {
            if let Some(id) = request_id {
                self.lock().count_processed(id);
            }
        }
        Ok(reply)
    }

    /// The app a business request acts for, or the answer that refuses it.
    fn authenticate(
        &self,
        st: &mut State,
        kind: Kind,
        parts: &Parts,
        now: Instant,
    ) -> Result<String, Reply> {
        let headers = &parts.headers;
        let access_app = |st: &mut State| {
            header_str(headers, &X_ACCESS_TOKEN)
                .and_then(|t| st.tokens.get(t, now))
                .map(|r| r.key.app.clone())
        };
        if kind.is_control() {
            let presented = header_str(headers, &X_CONF_AUTH).map(conf_token_value);
            return st
                .meetings
                .check(
                    presented.as_deref().unwrap_or(""),
                    &conference_id(parts),
                    now,
                )
                .map(str::to_owned)
                .map_err(meeting_error);
        }
        match kind {
            // Authenticated by the host password; the Java SDK sends no access token here.
            Kind::ConfToken => Ok(access_app(st).unwrap_or_default()),
            _ => access_app(st).ok_or_else(Reply::token_invalid),
        }
    }

    fn conf_token(&self, parts: &Parts, app: &str) -> Reply {
        let conference_id = conference_id(parts);
        let password = header_str(&parts.headers, &X_PASSWORD).unwrap_or("");
        if header_str(&parts.headers, &X_LOGIN_TYPE) != Some("1") {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "SIM.BAD_LOGIN_TYPE",
                "X-Login-Type must be 1",
            );
        }
        let presented = header_str(&parts.headers, &X_CONF_AUTH).map(conf_token_value);
        let now = Instant::now();
        let issued = {
            let mut st = self.lock();
            let lifetime = st.conf_token_lifetime;
            st.meetings.control_token(
                app,
                &conference_id,
                presented.as_deref(),
                password,
                lifetime,
                now,
            )
        };
        let issued = match issued {
            Ok(i) => i,
            Err(e) => return meeting_error(e),
        };
        let ip = self.addr.ip();
        Reply::json(
            StatusCode::OK,
            &json!({
                "data": {
                    "token": issued.token,
                    "expireTime": epoch_ms() + issued.remaining.as_millis() as u64,
                    "confTokenExpireTime": ceil_secs(issued.remaining),
                    "tmpWsToken": random_token(32),
                    "wsURL": format!("wss://{}/cms/open/websocket/confctl/increment/conn?confID={conference_id}", self.addr),
                    "role": 1,
                    "userID": "sim-user",
                    "orgID": "sim-corp",
                    "vmrCurrentConfID": conference_id,
                    "supportNotifyType": ["ConfBasicInfo", "ConfRealTimeInfo", "ParticipantInfo"],
                },
                "addressToken": random_token(32),
                "gloablPublicIP": ip.to_string(),
            }),
        )
    }

    fn start_meeting(&self, body: &Bytes, app: &str) -> Reply {
        let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "SIM.BAD_REQUEST",
                "body must be a JSON object",
            );
        };
        let field = |name: &str| req.get(name).and_then(Value::as_str).unwrap_or("");
        match self
            .lock()
            .meetings
            .start(app, field("conferenceID"), field("password"))
        {
            Ok(()) => Reply::json(
                StatusCode::OK,
                &json!({ "uuid": uuid::Uuid::new_v4().to_string(), "regionIP": "127.0.0.1" }),
            ),
            Err(e) => meeting_error(e),
        }
    }

    fn create_meeting(&self, body: &Bytes, app: &str) -> Reply {
        let req = match serde_json::from_slice::<Value>(body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) | Err(_) if body.is_empty() => json!({}),
            _ => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    "SIM.BAD_REQUEST",
                    "body must be a JSON object",
                )
            }
        };
        let created = self.lock().meetings.create(app, &req);
        Reply::json(StatusCode::OK, &created)
    }
}

/// The `conferenceID` query parameter every meeting-control API takes.
fn conference_id(parts: &Parts) -> String {
    query_param(parts.uri.query().unwrap_or(""), "conferenceID").unwrap_or_default()
}

/// The upstream's answer to a refused meeting call (codes that are ours are marked in
/// [`MeetingError`]).
fn meeting_error(e: MeetingError) -> Reply {
    match e {
        MeetingError::NotFoundOrAuthFailed => {
            Reply::error(StatusCode::BAD_REQUEST, CONF_NOT_FOUND.0, CONF_NOT_FOUND.1)
        }
        MeetingError::NotStarted => Reply::error(
            StatusCode::BAD_REQUEST,
            "SIM.CONF_NOT_STARTED",
            "the meeting has not been started",
        ),
        MeetingError::TokenInvalid => Reply::error(
            StatusCode::UNAUTHORIZED,
            "SIM.CONF_TOKEN_INVALID",
            "X-Conference-Authorization missing, unknown or expired",
        ),
        MeetingError::TokenMismatch => Reply::error(
            StatusCode::FORBIDDEN,
            "SIM.CONF_TOKEN_MISMATCH",
            "X-Conference-Authorization belongs to another meeting",
        ),
    }
}

/// `X-Conference-Authorization` is the raw token or `Basic base64(token)`.
fn conf_token_value(header: &str) -> String {
    let header = header.trim();
    if let Some(b64) = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))
    {
        if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            if let Ok(s) = String::from_utf8(raw) {
                return s;
            }
        }
    }
    header.to_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hi = bytes.get(i + 1).and_then(hex_digit);
        let lo = bytes.get(i + 2).and_then(hex_digit);
        let decoded = match (b, hi, lo) {
            (b'%', Some(hi), Some(lo)) => {
                i += 3;
                (hi << 4) | lo
            }
            (b'+', _, _) => {
                i += 1;
                b' '
            }
            _ => {
                i += 1;
                b
            }
        };
        out.push(decoded);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(b: &u8) -> Option<u8> {
    char::from(*b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Headers as received. h2 carries the host in `:authority`, which hyper keeps in the URI; it is
/// listed first as `host` so HTTP/1.1 and h2 requests record the same way.
fn recorded_headers(parts: &Parts) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(parts.headers.len() + 1);
    if !parts.headers.contains_key(hyper::header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            out.push(("host".to_owned(), authority.as_str().to_owned()));
        }
    }
    out.extend(parts.headers.iter().map(|(n, v)| {
        (
            n.as_str().to_owned(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        )
    }));
    out
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The appauth body (meeting-api.md §2.1).
struct AppAuthBody {
    app_id: String,
    client_type: i64,
    expire_time: u64,
    nonce: String,
    user_id: String,
    corp_id: Option<String>,
}

impl AppAuthBody {
    fn parse(body: &[u8]) -> Result<Self, String> {
        let Ok(Value::Object(v)) = serde_json::from_slice::<Value>(body) else {
            return Err("body must be a JSON object".to_owned());
        };
        let string = |name: &str| match v.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(format!("{name} must be a string")),
        };
        let optional = |name: &str| match v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(format!("{name} must be a string or null")),
        };
        Ok(Self {
            app_id: string("appId")?,
            client_type: v
                .get("clientType")
                .and_then(Value::as_i64)
                .ok_or("clientType must be an integer")?,
            expire_time: v
                .get("expireTime")
                .and_then(Value::as_u64)
                .ok_or("expireTime must be a non-negative integer")?,
            nonce: string("nonce")?,
            user_id: optional("userId")?.unwrap_or_default(),
            corp_id: optional("corpId")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_token_header_forms() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("tok123");
        assert_eq!(conf_token_value(&format!("Basic {b64}")), "tok123");
        assert_eq!(conf_token_value("tok123"), "tok123");
    }

    #[test]
    fn query_and_percent_decoding() {
        assert_eq!(
            query_param("a=1&conferenceID=98%2076", "conferenceID").as_deref(),
            Some("98 76")
        );
        assert_eq!(
            query_param("conferenceID", "conferenceID").as_deref(),
            Some("")
        );
        assert_eq!(query_param("x=%zz%", "x").as_deref(), Some("%zz%"));
        assert_eq!(query_param("x=1", "y"), None);
    }

    #[test]
    fn appauth_body_parsing() {
        let ok = br#"{"appId":"a","clientType":72,"expireTime":0,"nonce":"n","userId":null,"corpId":"c"}"#;
        let b = AppAuthBody::parse(ok).unwrap();
        assert_eq!((b.user_id.as_str(), b.corp_id.as_deref()), ("", Some("c")));
        assert!(AppAuthBody::parse(
            br#"{"appId":"a","clientType":"72","expireTime":0,"nonce":"n"}"#
        )
        .is_err());
        assert!(AppAuthBody::parse(
            br#"{"appId":"a","clientType":72,"expireTime":-1,"nonce":"n"}"#
        )
        .is_err());
        assert!(AppAuthBody::parse(b"[]").is_err());
    }
}
