//! The `conferences/token` call upstream, for acquisition (host password) and keep-alive
//! (current token): through the quota of `create_conf_token`, with the identity's access
//! token, and its answer read for the token and its lifetime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::clock::Clock;
use crate::error::GatewayError;
use crate::headers::{X_ACCESS_TOKEN, X_CONFERENCE_AUTHORIZATION, X_PASSWORD, X_REQUEST_ID};
use crate::quota::{BucketKey, Class, QuotaManager, Refused};
use crate::token::{Slot, TokenCache};
use crate::upstream::{read_body, Upstream};

const X_LOGIN_TYPE: HeaderName = HeaderName::from_static("x-login-type");
const TOKEN_PATH: &str = "/v1/mmc/control/conferences/token";
/// A token answer larger than this is not one.
const ANSWER_LIMIT: usize = 64 * 1024;

/// What a `conferences/token` call needs: the worker's upstream client, the quota of the
/// operation, and the identity whose access token goes with it. Owned, so a keep-alive can run
/// in the background.
#[derive(Clone)]
pub struct Exchange {
    pub upstream: Upstream,
    pub quota: Arc<QuotaManager>,
    pub tokens: TokenCache,
    pub slot: Arc<Slot>,
    /// The `create_conf_token` bucket of the identity's scope.
    pub bucket: BucketKey,
    /// The call waits for its quota slot until here (the client's own deadline when a call
    /// waits for it; `max_wait` from now for a keep-alive).
    pub deadline: Instant,
    /// The class of the call it is made for, in the quota's fair queue.
    pub class: Class,
}

/// A token the upstream granted.
pub struct Granted {
    pub token: SecretString,
    pub lifetime: Duration,
}

/// Why no token came back.
#[derive(Debug)]
pub enum Failure {
    /// The upstream refused (a wrong password, a meeting not in progress, a 429): its answer
    /// goes to the client as it came.
    Refused(Box<Response<Bytes>>),
    /// meetgate could not ask (quota, connection, timeouts, an unusable answer).
    Gateway(GatewayError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(r) => write!(f, "refused with HTTP {}", r.status().as_u16()),
            Failure::Gateway(e) => e.fmt(f),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    data: Option<AnswerData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerData {
    token: Option<SecretString>,
    /// Seconds.
    conf_token_expire_time: Option<u64>,
    /// Epoch milliseconds.
    expire_time: Option<u64>,
}

impl Exchange {
    /// `GET /v1/mmc/control/conferences/token?conferenceID=..` with the host password (to
    /// obtain) and/or the current token (to keep alive).
    pub async fn request(
        &self,
        conference: &str,
        password: Option<&SecretString>,
        current: Option<&HeaderValue>,
    ) -> Result<Granted, Failure> {
        let _admission = self.admit().await.map_err(Failure::Gateway)?;
        let path: String = form_urlencoded::Serializer::new(format!("{TOKEN_PATH}?"))
            .append_pair("conferenceID", conference)
            .finish();
        let uri = PathAndQuery::try_from(path)
            .map_err(|_| {
                Failure::Gateway(GatewayError::BadRequest(
                    "conferenceID cannot be sent upstream",
                ))
            })
            .and_then(|pq| self.upstream.uri(pq).map_err(Failure::Gateway))?;
        let mut headers = HeaderMap::with_capacity(6);
        headers.insert(X_LOGIN_TYPE, HeaderValue::from_static("1"));
        if let Some(p) = password {
            let mut v = HeaderValue::from_str(p.expose_secret()).map_err(|_| {
                Failure::Gateway(GatewayError::BadRequest(
                    "X-Password is not a valid header value",
                ))
            })?;
            v.set_sensitive(true);
            headers.insert(X_PASSWORD, v);
        }
        if let Some(current) = current {
            headers.insert(X_CONFERENCE_AUTHORIZATION, current.clone());
        }
        // The SDKs send the access token on control paths too; the upstream tolerates it.
        let (token, _) = self
            .tokens
            .header(&self.slot)
            .await
            .map_err(Failure::Gateway)?;
        headers.insert(X_ACCESS_TOKEN, token);
        let mut id = [0u8; uuid::fmt::Simple::LENGTH];
        let id = uuid::Uuid::new_v4().simple().encode_lower(&mut id);
        if let Ok(v) = HeaderValue::from_str(id) {
            headers.insert(X_REQUEST_ID, v);
        }
        let resp = self
            .upstream
            .send_buffered(&Method::GET, &uri, &mut headers, None, false)
            .await
            .map_err(Failure::Gateway)?;
        let (parts, body) = resp.into_parts();
        let bytes = read_body(body, ANSWER_LIMIT, self.upstream.request_timeout())
            .await
            .map_err(Failure::Gateway)?;
        if parts.status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = crate::headers::retry_after(&parts.headers);
            if let Some(bucket) = self.quota.find(&self.bucket) {
                self.quota.hold(&bucket, retry_after);
            }
        }
        if !parts.status.is_success() {
            return Err(Failure::Refused(Box::new(Response::from_parts(
                parts, bytes,
            ))));
        }
        parse(&bytes, crate::clock::SystemClock.now_ms()).ok_or(Failure::Gateway(
            GatewayError::ControlTokenUnusable(
                "the control token answer holds no token or lifetime",
            ),
        ))
    }

    /// A slot of the `create_conf_token` quota, unless quotas are off.
    async fn admit(&self) -> Result<Option<crate::quota::Admission>, GatewayError> {
        if !self.quota.enabled() {
            return Ok(None);
        }
        match self
            .quota
            .acquire(&self.bucket, self.deadline, &self.class)
            .await
        {
            Ok(a) => Ok(Some(a)),
            Err(Refused::Exhausted { retry_after } | Refused::ClientQueueFull { retry_after }) => {
                Err(GatewayError::QuotaExceeded { retry_after })
            }
            Err(Refused::ShuttingDown) => Err(GatewayError::ShuttingDown),
        }
    }
}

/// The token and its lifetime from a `conferences/token` answer: `confTokenExpireTime` (a
/// lifetime, immune to clock skew), else `expireTime` (epoch ms) against our clock.
pub fn parse(bytes: &[u8], now_ms: u64) -> Option<Granted> {
    let data = serde_json::from_slice::<Answer>(bytes).ok()?.data?;
    let token = data.token.filter(|t| !t.expose_secret().is_empty())?;
    let lifetime = match (data.conf_token_expire_time, data.expire_time) {
        (Some(secs), _) if secs > 0 => Duration::from_secs(secs),
        (_, Some(at)) if at > now_ms => Duration::from_millis(at - now_ms),
        _ => return None,
    };
    Some(Granted { token, lifetime })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_for_token_and_lifetime_only_when_both_are_there() {
        let now = 1_000_000;
        let g = parse(
            br#"{"data":{"token":"t1","expireTime":1,"confTokenExpireTime":1800}}"#,
            now,
        )
        .expect("parses");
        assert_eq!(g.token.expose_secret(), "t1");
        assert_eq!(g.lifetime, Duration::from_secs(1800));
        let g = parse(br#"{"data":{"token":"t1","expireTime":1060000}}"#, now).expect("parses");
        assert_eq!(g.lifetime, Duration::from_secs(60));
        for bad in [
            &br#"{"data":{"token":"","confTokenExpireTime":1800}}"#[..],
            br#"{"data":{"token":"t1"}}"#,
            br#"{"data":{"token":"t1","confTokenExpireTime":0}}"#,
            br#"{"data":{"token":"t1","expireTime":999999}}"#,
            br#"{"token":"t1"}"#,
            b"not json",
        ] {
            assert!(parse(bad, now).is_none());
        }
    }
}
