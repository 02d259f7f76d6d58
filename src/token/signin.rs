//! App ID sign-in against the upstream (`POST /v2/usg/acs/auth/appauth`, meeting-api.md §2.1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::cache::{Authenticator, Grant, SignInError, SignInFuture};
use super::sign::{authorization_header, SignInput};
use super::AppConfig;
use crate::body::ProxyBody;
use crate::clock::Clock;
use crate::error::retry_after_secs;
use crate::operations::{OperationId, OperationTable};
use crate::quota::{BucketKey, QuotaManager, Refused};
use crate::upstream::{read_body, Upstream};

pub const APPAUTH_PATH: &str = "/v2/usg/acs/auth/appauth";

/// `clientType` 72: an API caller, which may hold up to 64 tokens per user.
const CLIENT_TYPE_API: u32 = 72;

/// The request body, fields in the order the official SDK sends them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AppAuthBody<'a> {
    app_id: &'a str,
    user_id: &'a str,
    corp_id: Option<&'a str>,
    expire_time: u64,
    nonce: &'a str,
    client_type: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppAuthAnswer {
    access_token: Option<SecretString>,
    valid_period: Option<i64>,
    expire_time: Option<i64>,
    create_time: Option<i64>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error_code: Option<String>,
}

/// A fresh nonce: 64 hex characters from 32 random bytes (the upstream wants 32 to 64).
pub fn nonce() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Signs in through the gateway's own upstream client.
pub struct UpstreamAuthenticator {
    upstream: Upstream,
    clock: Arc<dyn Clock>,
    signature_lifetime: Duration,
    quota: Arc<QuotaManager>,
    op: Option<OperationId>,
}

impl UpstreamAuthenticator {
    pub fn new(
        upstream: Upstream,
        clock: Arc<dyn Clock>,
        signature_lifetime: Duration,
        quota: Arc<QuotaManager>,
    ) -> Self {
        UpstreamAuthenticator {
            upstream,
            clock,
            signature_lifetime,
            quota,
            op: OperationTable::global().by_name("create_app_id_token"),
        }
    }

    async fn appauth(&self, app: &AppConfig, user: &str) -> Result<Grant, SignInError> {
        // Sign-in has its own bucket per app, so a refresh storm spends only sign-in quota.
        let _admission = match (self.quota.enabled(), self.op) {
            (true, Some(op)) => {
                let key = BucketKey {
                    op,
                    app: Some(Arc::from(app.name.as_str())),
                    user: None,
                };
                let deadline = Instant::now() + self.quota.config().max_wait;
                Some(
                    self.quota
                        .acquire(&key, deadline, &crate::quota::Class::anonymous())
                        .await
                        .map_err(|r| match r {
                            Refused::Exhausted { retry_after }
                            | Refused::ClientQueueFull { retry_after } => {
                                SignInError::BadResponse(format!(
                                    "sign-in quota spent, next slot in {}s",
                                    retry_after_secs(retry_after)
                                ))
                            }
                            Refused::ShuttingDown => {
                                SignInError::BadResponse("the gateway is shutting down".into())
                            }
                        })?,
                )
            }
            _ => None,
        };
        let now_s = self.clock.now_secs();
        let expire_time = now_s + self.signature_lifetime.as_secs();
        let nonce = nonce();
        let input = SignInput {
            app_id: &app.app_id,
            corp_id: app.corp_id.as_deref(),
            user_id: user,
            expire_time,
            nonce: &nonce,
        };
        let mut authorization = HeaderValue::try_from(authorization_header(
            &input,
            app.app_key.expose_secret().as_bytes(),
        ))
        .map_err(|_| SignInError::BadResponse("app id is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        let body = serde_json::to_vec(&AppAuthBody {
            app_id: &app.app_id,
            user_id: user,
            corp_id: app.corp_id.as_deref(),
            expire_time,
            nonce: &nonce,
            client_type: CLIENT_TYPE_API,
        })
        .map_err(|e| SignInError::BadResponse(e.to_string()))?;
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let req = Request::builder()
            .method(Method::POST)
            .uri(
                self.upstream
                    .uri(http::uri::PathAndQuery::from_static(APPAUTH_PATH))
                    .map_err(SignInError::Upstream)?,
            )
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, authorization)
            .header(crate::headers::X_REQUEST_ID, request_id.as_str())
            .body(ProxyBody::Full(Some(body.into())))
            .map_err(|e| SignInError::BadResponse(e.to_string()))?;
        let resp = self
            .upstream
            .send(req)
            .await
            .map_err(SignInError::Upstream)?;
        let status = resp.status();
        let upstream_id = resp
            .headers()
            .get(crate::headers::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = read_body(
            resp.into_body(),
            256 * 1024,
            self.upstream.request_timeout(),
        )
        .await
        .map_err(SignInError::Upstream)?;
        answer(status, &bytes, now_s).inspect_err(|e| {
            tracing::debug!(error = %e, upstream_request_id = %upstream_id, "Sign-in refused");
        })
    }
}

/// What an appauth answer grants: its token and the lifetime the server gave, or why not.
pub fn answer(status: http::StatusCode, bytes: &[u8], now_s: u64) -> Result<Grant, SignInError> {
    if !status.is_success() {
        let code = serde_json::from_slice::<ErrorAnswer>(bytes)
            .ok()
            .and_then(|e| e.error_code)
            .unwrap_or_else(|| "(no error_code)".into());
        return Err(SignInError::Rejected {
            status: status.as_u16(),
            code,
        });
    }
    let answer: AppAuthAnswer = serde_json::from_slice(bytes)
        .map_err(|e| SignInError::BadResponse(format!("not the appauth JSON ({e})")))?;
    let lifetime = lifetime(&answer, now_s)
        .ok_or_else(|| SignInError::BadResponse("no usable validPeriod or expireTime".into()))?;
    let access_token = answer
        .access_token
        .filter(|t| !t.expose_secret().is_empty())
        .ok_or_else(|| SignInError::BadResponse("accessToken missing".into()))?;
    Ok(Grant {
        access_token,
        lifetime,
    })
}

/// The server's lifetime: `validPeriod`, else `expireTime` against `createTime` or our clock.
fn lifetime(answer: &AppAuthAnswer, now_s: u64) -> Option<Duration> {
    let secs = match (answer.valid_period, answer.expire_time, answer.create_time) {
        (Some(v), _, _) => v,
        (None, Some(exp), Some(created_ms)) => exp - created_ms / 1000,
        (None, Some(exp), None) => exp - now_s as i64,
        (None, None, _) => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs as u64))
}

impl Authenticator for UpstreamAuthenticator {
    fn sign_in<'a>(&'a self, app: &'a AppConfig, user: &'a str) -> SignInFuture<'a> {
        use tracing::Instrument;
        // A child of the request's token wait when a request is waiting for it; a trace of
        // its own for a refresh in the background.
        let span = tracing::info_span!(
            target: crate::trace::TARGET,
            "sign-in",
            otel.kind = "client",
            meetgate.app = app.name.as_str(),
        );
        Box::pin(self.appauth(app, user).instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_field_order_matches_the_sdk() {
        let body = serde_json::to_string(&AppAuthBody {
            app_id: "a",
            user_id: "",
            corp_id: None,
            expire_time: 5,
            nonce: "n",
            client_type: 72,
        })
        .expect("json");
        assert_eq!(
            body,
            r#"{"appId":"a","userId":"","corpId":null,"expireTime":5,"nonce":"n","clientType":72}"#
        );
        let n = nonce();
        assert!((32..=64).contains(&n.len()));
    }

    #[test]
    fn lifetime_sources() {
        let a = |v, e, c| AppAuthAnswer {
            access_token: None,
            valid_period: v,
            expire_time: e,
            create_time: c,
        };
        assert_eq!(
            lifetime(&a(Some(60), None, None), 0),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            lifetime(&a(None, Some(1_100), Some(1_000_000)), 0),
            Some(Duration::from_secs(100))
        );
        assert_eq!(lifetime(&a(Some(0), None, None), 0), None);
        assert_eq!(lifetime(&a(None, None, None), 0), None);
    }
}
