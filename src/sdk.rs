//! SDK-compatible sign-in, answered locally for clients with SDK-style credentials: App ID
//! (`POST /v2/usg/acs/auth/appauth`, HMAC verified with the client's own gateway key) and
//! account (`POST /v1/usg/acs/auth/account`) sign-in, token refresh, validation and logout,
//! all in the upstream's response shapes, on meetgate's own session tokens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::body::ClientBody;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::access::AccessRules;
use crate::access::ClientConfig;
use crate::error::GatewayError;
use crate::headers::X_ACCESS_TOKEN;
use crate::session::{Issued, Session, SessionStore};
use crate::token::sign::{access_value, parse_authorization, verify, SignInput};

/// Largest sign-in body accepted; the real ones are a few hundred bytes.
const BODY_LIMIT: usize = 64 * 1024;
/// Most remembered nonces; older ones are dropped once their signature expired.
const MAX_NONCES: usize = 100_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppAuthBody {
    app_id: Option<String>,
    user_id: Option<String>,
    corp_id: Option<String>,
    expire_time: Option<u64>,
    nonce: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ValidateBody {
    token: Option<String>,
    #[serde(default)]
    need_gen_new_token: bool,
}

/// `[sdk]`: the sessions meetgate issues to SDK clients that sign in to it.
#[derive(Debug, Clone, Serialize)]
pub struct SdkConfig {
    /// Lifetime of the session tokens meetgate issues to SDK clients.
    #[serde(serialize_with = "crate::secret::print::duration")]
    pub session_lifetime: std::time::Duration,
    pub max_sessions: usize,
}

/// Local sign-in state: sessions and the nonces already used.
pub struct SdkAuth {
    pub sessions: SessionStore,
    nonces: Mutex<HashMap<(Arc<str>, String), u64>>,
}

/// What the SDK handlers need from the request.
pub struct SdkRequest<'a> {
    pub operation: &'static str,
    pub headers: &'a HeaderMap,
    pub peer: SocketAddr,
    pub now_ms: u64,
}

impl SdkAuth {
    pub fn new(cfg: &SdkConfig) -> SdkAuth {
        SdkAuth {
            sessions: SessionStore::new(cfg.max_sessions),
            nonces: Mutex::new(HashMap::new()),
        }
    }

    /// Answers a sign-in or token-management call locally.
    pub async fn handle(
        &self,
        req: SdkRequest<'_>,
        body: ClientBody,
        rules: &AccessRules,
        cfg: &SdkConfig,
        default_user: impl Fn(&str) -> Option<String>,
    ) -> Result<Response<Full<Bytes>>, GatewayError> {
        if !rules.has_sdk_clients() {
            return Err(GatewayError::Forbidden(
                "sign-in is done by the gateway: send requests without credentials (no SDK clients are configured)",
            ));
        }
        let body = read(body).await?;
        self.answer(req, &body, rules, cfg, default_user)
    }

    /// [`SdkAuth::handle`] once the body is read: every check, no I/O.
    pub fn answer(
        &self,
        req: SdkRequest<'_>,
        body: &[u8],
        rules: &AccessRules,
        cfg: &SdkConfig,
        default_user: impl Fn(&str) -> Option<String>,
    ) -> Result<Response<Full<Bytes>>, GatewayError> {
        if !rules.has_sdk_clients() {
            return Err(GatewayError::Forbidden(
                "sign-in is done by the gateway: send requests without credentials (no SDK clients are configured)",
            ));
        }
        let lifetime_ms = cfg.session_lifetime.as_millis() as u64;
        match req.operation {
            "create_app_id_token" => {
                let (client, user) = self.verify_appauth(&req, body, rules, &default_user)?;
                let app = client.apps.first().cloned().unwrap_or_default();
                let user = user.or_else(|| default_user(&app)).unwrap_or_default();
                let issued =
                    self.sessions
                        .issue(&client.name, &app, &user, req.now_ms, lifetime_ms);
                Ok(token_response(&issued, &client, req.peer, lifetime_ms))
            }
            "create_token" => {
                let client = verify_account(req.headers, rules)?;
                let app = client.apps.first().cloned().unwrap_or_default();
                let user = default_user(&app).unwrap_or_default();
                let issued =
                    self.sessions
                        .issue(&client.name, &app, &user, req.now_ms, lifetime_ms);
                Ok(token_response(&issued, &client, req.peer, lifetime_ms))
            }
            "update_token" => {
                let token = header_token(req.headers)?;
                let old = self
                    .sessions
                    .find_any(token, req.now_ms)
                    .ok_or(GatewayError::SessionInvalid)?;
                let client = rules
                    .client(&old.client)
                    .cloned()
                    .ok_or(GatewayError::SessionInvalid)?;
                self.sessions.revoke(token);
                let issued = self.reissue(&old, req.now_ms, lifetime_ms);
                Ok(token_response(&issued, &client, req.peer, lifetime_ms))
            }
            "check_token" => {
                let v: ValidateBody = serde_json::from_slice(body)
                    .map_err(|_| GatewayError::BadRequest("the body must be {\"token\": ...}"))?;
                let token = v.token.unwrap_or_default();
                let session = self
                    .sessions
                    .find(&token, req.now_ms)
                    .ok_or(GatewayError::SessionInvalid)?;
                let client = rules
                    .client(&session.client)
                    .cloned()
                    .ok_or(GatewayError::SessionInvalid)?;
                if v.need_gen_new_token {
                    let issued = self.reissue(&session, req.now_ms, lifetime_ms);
                    return Ok(token_response(&issued, &client, req.peer, lifetime_ms));
                }
                Ok(json(
                    StatusCode::OK,
                    token_json(
                        &token,
                        None,
                        &session,
                        &client,
                        req.peer,
                        session.expires_at_ms.saturating_sub(req.now_ms),
                    ),
                ))
            }
            "delete_token" => {
                let token = header_token(req.headers)?;
                if !self.sessions.revoke(token) {
                    return Err(GatewayError::SessionInvalid);
                }
                let mut resp = Response::new(Full::new(Bytes::new()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json;charset=UTF-8"),
                );
                Ok(resp)
            }
            _ => Err(GatewayError::Forbidden(
                "this sign-in method is not supported by the gateway",
            )),
        }
    }

    fn reissue(&self, old: &Session, now_ms: u64, lifetime_ms: u64) -> Issued {
        self.sessions
            .issue(&old.client, &old.app, &old.user, now_ms, lifetime_ms)
    }

    /// Verifies an appauth request signed with a client's gateway key, as the upstream would:
    /// either hex case, 4- or 5-field form, `expireTime`, nonce length and replay.
    fn verify_appauth(
        &self,
        req: &SdkRequest<'_>,
        body: &[u8],
        rules: &AccessRules,
        default_user: &impl Fn(&str) -> Option<String>,
    ) -> Result<(Arc<ClientConfig>, Option<String>), GatewayError> {
        let auth = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_authorization)
            .ok_or(GatewayError::Unauthenticated(
                "Authorization must be HMAC-SHA256 signature=...,access=...",
            ))?;
        let b: AppAuthBody = serde_json::from_slice(body)
            .map_err(|_| GatewayError::BadRequest("the appauth body is not the expected JSON"))?;
        let (Some(app_id), Some(expire_time), Some(nonce)) = (b.app_id, b.expire_time, b.nonce)
        else {
            return Err(GatewayError::BadRequest(
                "appId, expireTime and nonce are required",
            ));
        };
        let client = rules
            .sdk_client(&app_id)
            .cloned()
            .ok_or(GatewayError::Unauthenticated("unknown app id"))?;
        let Some(sdk) = &client.sdk else {
            return Err(GatewayError::Unauthenticated("unknown app id"));
        };
        if auth
            .access
            .as_deref()
            .is_some_and(|a| a != access_value(&app_id))
        {
            return Err(GatewayError::Unauthenticated("access does not match appId"));
        }
        let now_s = req.now_ms / 1000;
        if expire_time != 0 && expire_time < now_s {
            return Err(GatewayError::Unauthenticated("the signature has expired"));
        }
        if !(32..=64).contains(&nonce.chars().count()) {
            return Err(GatewayError::BadRequest(
                "nonce must be 32 to 64 characters",
            ));
        }
        let user_id = b.user_id.unwrap_or_default();
        let input = SignInput {
            app_id: &app_id,
            corp_id: b.corp_id.as_deref(),
            user_id: &user_id,
            expire_time,
            nonce: &nonce,
        };
        if !verify(
            &input,
            sdk.app_key.expose_secret().as_bytes(),
            &auth.signature,
        ) {
            return Err(GatewayError::Unauthenticated("signature does not verify"));
        }
        self.remember_nonce(&client, nonce, expire_time, now_s)?;
        let app = client.apps.first().cloned().unwrap_or_default();
        let user = (!user_id.is_empty()).then_some(user_id.as_str());
        let user = rules.check_user(&client, &app, user, default_user)?;
        Ok((client, user))
    }

    fn remember_nonce(
        &self,
        client: &Arc<ClientConfig>,
        nonce: String,
        expire_time: u64,
        now_s: u64,
    ) -> Result<(), GatewayError> {
        let mut nonces = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        if nonces.len() >= MAX_NONCES {
            nonces.retain(|_, exp| *exp >= now_s);
        }
        // A signature that never expires keeps its nonce for a day; beyond the cap, the oldest go.
        let keep_until = if expire_time == 0 {
            now_s + 86_400
        } else {
            expire_time
        };
        if nonces.len() >= MAX_NONCES {
            if let Some(oldest) = nonces
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(k, _)| k.clone())
            {
                nonces.remove(&oldest);
            }
        }
        let key = (client.name.clone(), nonce);
        if nonces.contains_key(&key) {
            return Err(GatewayError::Unauthenticated("nonce already used"));
        }
        nonces.insert(key, keep_until);
        Ok(())
    }
}

async fn read(body: ClientBody) -> Result<Bytes, GatewayError> {
    http_body_util::Limited::new(body, BODY_LIMIT)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| GatewayError::BodyTooLarge { limit: BODY_LIMIT })
}

fn header_token(headers: &HeaderMap) -> Result<&str, GatewayError> {
    headers
        .get(X_ACCESS_TOKEN)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or(GatewayError::SessionInvalid)
}

/// `Authorization: Basic base64(account:password)`: the account is the client's SDK app id (or
/// its name), the password its gateway key.
fn verify_account(
    headers: &HeaderMap,
    rules: &AccessRules,
) -> Result<Arc<ClientConfig>, GatewayError> {
    let decoded = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(GatewayError::Unauthenticated(
            "Authorization must be Basic base64(account:password)",
        ))?;
    let (account, password) = decoded
        .split_once(':')
        .ok_or(GatewayError::Unauthenticated(
            "Authorization must be Basic base64(account:password)",
        ))?;
    let client = rules
        .sdk_client(account)
        .or_else(|| rules.client(account))
        .cloned()
        .ok_or(GatewayError::Unauthenticated("unknown account"))?;
    let ok = client.sdk.as_ref().is_some_and(|s| {
        bool::from(
            s.app_key
                .expose_secret()
                .as_bytes()
                .ct_eq(password.as_bytes()),
        )
    });
    if !ok {
        return Err(GatewayError::Unauthenticated("wrong account password"));
    }
    Ok(client)
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(v.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}

fn token_response(
    issued: &Issued,
    client: &ClientConfig,
    peer: SocketAddr,
    lifetime_ms: u64,
) -> Response<Full<Bytes>> {
    json(
        StatusCode::OK,
        token_json(
            &issued.access_token,
            Some(&issued.refresh_token),
            &issued.session,
            client,
            peer,
            lifetime_ms,
        ),
    )
}

/// The upstream's token object (meeting-api.md §2.1), for a meetgate session.
fn token_json(
    access: &str,
    refresh: Option<&str>,
    s: &Session,
    client: &ClientConfig,
    peer: SocketAddr,
    valid_ms: u64,
) -> serde_json::Value {
    let created_ms = s.created_ms;
    let refresh_secs = 30 * 86_400u64;
    serde_json::json!({
        "accessToken": access,
        "validPeriod": valid_ms / 1000,
        "expireTime": s.expires_at_ms / 1000,
        "createTime": created_ms,
        "refreshToken": refresh.unwrap_or(""),
        "refreshValidPeriod": refresh_secs,
        "refreshExpireTime": created_ms / 1000 + refresh_secs,
        "refreshCreateTime": created_ms,
        "tokenIp": peer.ip().to_string(),
        "tokenType": 0,
        "clientType": 72,
        "user": {
            "realm": "meetgate",
            "userId": s.user.to_string(),
            "thirdAccount": s.user.to_string(),
            "appId": client.sdk.as_ref().map_or("", |x| x.app_id.as_str()),
            "companyId": s.app.to_string(),
            "spId": "",
            "adminType": if s.user.is_empty() { 0 } else { 2 },
            "userName": s.user.to_string(),
        },
        "forceLoginInd": null,
        "firstLogin": false,
        "pwdExpired": false,
        "daysPwdAvailable": 0,
        "delayDelete": false,
        "proxyToken": null,
    })
}
