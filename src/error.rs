//! `GatewayError`: every way the request path can fail, mapped to a status, a stable
//! `MEETGATE.<CODE>` and the upstream's error body shape in one exhaustive match.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The phase of an upstream exchange, named in timeouts and failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    TlsHandshake,
    ResponseHeaders,
    ResponseBody,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::TlsHandshake => "TLS handshake",
            Phase::ResponseHeaders => "response headers",
            Phase::ResponseBody => "response body",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no upstream operation matches {method} {path}")]
    UnknownOperation { method: String, path: String },
    #[error("the request path is not in canonical form (empty, '.' or '..' segment, encoded separator, trailing slash)")]
    AmbiguousPath,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("no valid access token for app {app}: {reason}")]
    TokenUnavailable { app: String, reason: String },
    #[error("upstream {phase} failed: {detail}", phase = .phase.as_str())]
    UpstreamUnreachable { phase: Phase, detail: String },
    #[error("upstream {phase} timed out after {after:?}", phase = .phase.as_str())]
    UpstreamTimeout { phase: Phase, after: Duration },
    #[error("the client request body could not be read")]
    ClientBody,
    #[error("upstream quota for this operation is spent; retry after {}s", retry_after_secs(*.retry_after))]
    QuotaExceeded { retry_after: Duration },
    #[error("the gateway is shutting down; retry on another instance")]
    ShuttingDown,
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A gateway session token that is unknown, expired or revoked: answered like the
    /// upstream's invalid token, so SDKs that re-authenticate on it do so.
    #[error("session token invalid or expired; sign in again")]
    SessionInvalid,
    #[error("the gateway is at its limit of concurrent requests; retry shortly")]
    Overloaded,
    #[error("this client is over its rate; retry after {}s", retry_after_secs(*.retry_after))]
    ClientRateLimited { retry_after: Duration },
    /// The upstream answered a control-token request with something meetgate cannot use.
    #[error("no meeting-control token: {0}")]
    ControlTokenUnusable(&'static str),
}

/// The `error_code` of an upstream error body, when it has one.
pub fn upstream_error_code(body: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct ErrorBody<'a> {
        #[serde(borrow)]
        error_code: Option<&'a str>,
    }
    // serde's derived structs also accept a JSON array (fields by position), so `["USG..."]`
    // would read as an error code; the upstream's error body is always an object (found by
    // fuzzing: fuzz/corpus/upstream_answers/seed-found-array).
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice::<ErrorBody<'_>>(body)
        .ok()
        .and_then(|b| b.error_code)
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_millis().div_ceil(1000) as u64).max(1)
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::UnknownOperation { .. } => StatusCode::NOT_FOUND,
            GatewayError::AmbiguousPath
            | GatewayError::BadRequest(_)
            | GatewayError::ClientBody => StatusCode::BAD_REQUEST,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnreachable { .. } | GatewayError::ControlTokenUnusable(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::QuotaExceeded { .. } | GatewayError::ClientRateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::ShuttingDown | GatewayError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Unauthenticated(_) | GatewayError::SessionInvalid => {
                StatusCode::UNAUTHORIZED
            }
        }
    }

    /// The stable machine-readable code clients and SDKs match on.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::UnknownOperation { .. } => "MEETGATE.UNKNOWN_OPERATION",
            GatewayError::AmbiguousPath => "MEETGATE.BAD_PATH",
            GatewayError::BadRequest(_) => "MEETGATE.BAD_REQUEST",
            GatewayError::ClientBody => "MEETGATE.BAD_REQUEST",
            GatewayError::Forbidden(_) => "MEETGATE.FORBIDDEN",
            GatewayError::BodyTooLarge { .. } => "MEETGATE.BODY_TOO_LARGE",
            GatewayError::TokenUnavailable { .. } => "MEETGATE.TOKEN_UNAVAILABLE",
            GatewayError::UpstreamUnreachable { .. } => "MEETGATE.UPSTREAM_UNREACHABLE",
            GatewayError::UpstreamTimeout { .. } => "MEETGATE.UPSTREAM_TIMEOUT",
            GatewayError::QuotaExceeded { .. } => "MEETGATE.QUOTA_EXCEEDED",
            GatewayError::ClientRateLimited { .. } => "MEETGATE.CLIENT_RATE_LIMITED",
            GatewayError::ShuttingDown => "MEETGATE.SHUTTING_DOWN",
            GatewayError::Unauthenticated(_) => "MEETGATE.UNAUTHENTICATED",
            GatewayError::SessionInvalid => "USG.000000004",
            GatewayError::Overloaded => "MEETGATE.OVERLOADED",
            GatewayError::ControlTokenUnusable(_) => "MEETGATE.CONTROL_TOKEN_UNAVAILABLE",
        }
    }

    /// `{"error_code", "error_msg", "request_id"}`: the upstream's shape, so the vendor's SDKs
    /// parse it. The message is this error's Display, which never holds a secret.
    pub fn to_response(&self, request_id: &str) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error_code": self.code(),
            "error_msg": self.to_string(),
            "request_id": request_id,
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert(crate::headers::X_REQUEST_ID, v);
        }
        if let GatewayError::QuotaExceeded { retry_after }
        | GatewayError::ClientRateLimited { retry_after } = &self
        {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(*retry_after)),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn body_has_the_upstream_shape() {
        let e = GatewayError::UpstreamTimeout {
            phase: Phase::ResponseHeaders,
            after: Duration::from_secs(30),
        };
        let resp = e.to_response("rid-1");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error_code"], "MEETGATE.UPSTREAM_TIMEOUT");
        assert_eq!(v["request_id"], "rid-1");
        assert!(v["error_msg"]
            .as_str()
            .is_some_and(|m| m.contains("response headers")));
    }
}
