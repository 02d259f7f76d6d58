//! The request path: classify, pick the identity, get its token, rewrite headers, forward,
//! replay once on a refused token, stream the answer back, and write one access-log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::body::{self, ProxyBody};
use crate::clock::Clock;
use crate::config::{AppConfig, Config};
use crate::error::{retry_after_secs, GatewayError};
use crate::headers::{self, X_ACCESS_TOKEN, X_MEETGATE_APP, X_REQUEST_ID};
use crate::operations::{ClassifyError, OperationKind, OperationTable};
use crate::quota::{Admission, BucketKey, QuotaManager};
use crate::token::{Slot, TokenCache, UpstreamAuthenticator};
use crate::upstream::{read_body, Upstream, UpstreamBuildError};

/// What the gateway answers with: the upstream's streamed body, or one it built itself.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// The upstream's code for an invalid or expired access token.
const TOKEN_INVALID_CODE: &str = "USG.000000004";
/// An upstream 401 body larger than this is not an error body worth parsing.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Replays after upstream 429s, within the request's `max_wait`.
const MAX_QUOTA_REPLAYS: u32 = 3;
/// Longest client `X-Request-ID` kept as is; longer ones are replaced by a generated id.
const MAX_REQUEST_ID_LEN: usize = 128;

struct AppEntry {
    app: Arc<AppConfig>,
    default_slot: Arc<Slot>,
}

/// The gateway's shared state, built once from the validated config.
pub struct Gateway {
    config: Arc<Config>,
    ops: &'static OperationTable,
    upstream: Upstream,
    tokens: TokenCache,
    quota: Arc<QuotaManager>,
    apps: Vec<AppEntry>,
}

/// Per-request facts gathered on the way, for the one access-log line.
struct RequestCtx {
    start: Instant,
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    request_id: HeaderValue,
    operation: &'static str,
    app: Option<Arc<AppConfig>>,
    user: Option<Arc<str>>,
    token_wait: Duration,
    queue_wait: Duration,
    upstream_time: Duration,
    replayed_401: bool,
    upstream_429s: u32,
    /// The upstream's correlation and quota headers, in [`LOGGED_UPSTREAM_HEADERS`] order.
    upstream_headers: [Option<HeaderValue>; LOGGED_COUNT],
}

/// Upstream response headers copied into the access log.
const LOGGED_COUNT: usize = 6;
const LOGGED_UPSTREAM_HEADERS: [http::HeaderName; LOGGED_COUNT] = [
    X_REQUEST_ID,
    headers::X_APIG_LATENCY,
    headers::X_APIG_UPSTREAM_LATENCY,
    headers::X_ENVOY_UPSTREAM_SERVICE_TIME,
    headers::X_APIG_RATELIMIT_API,
    headers::X_APIG_RATELIMIT_ALLENV,
];

impl Gateway {
    /// Builds the gateway and starts signing in every app's default identity in the background.
    /// Must run inside a Tokio runtime.
    pub fn new(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Gateway>, UpstreamBuildError> {
        let upstream = Upstream::new(&config.upstream)?;
        let quota = QuotaManager::new(config.quota.clone());
        let auth = Arc::new(UpstreamAuthenticator::new(
            upstream.clone(),
            clock.clone(),
            config.token.signature_lifetime,
            quota.clone(),
        ));
        let tokens = TokenCache::new(auth, clock, config.token.clone(), true);
        let apps = config
            .apps
            .iter()
            .map(|a| {
                let app = Arc::new(a.clone());
                let default_slot = tokens.slot(&app, &app.user_id);
                AppEntry { app, default_slot }
            })
            .collect();
        Ok(Arc::new(Gateway {
            config,
            ops: OperationTable::global(),
            upstream,
            tokens,
            quota,
            apps,
        }))
    }

    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    pub fn quota(&self) -> &Arc<QuotaManager> {
        &self.quota
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Whether every app's default identity holds a valid token.
    pub fn tokens_ready(&self) -> bool {
        let now = self.tokens.now_ms();
        self.apps.iter().all(|e| {
            e.default_slot
                .current()
                .is_some_and(|t| t.expires_at_ms > now)
        })
    }

    /// The outer handler: never fails, logs exactly once.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ResponseBody> {
        let mut ctx = RequestCtx {
            start: Instant::now(),
            peer,
            method: req.method().clone(),
            uri: req.uri().clone(),
            request_id: request_id(req.headers()),
            operation: "-",
            app: None,
            user: None,
            token_wait: Duration::ZERO,
            queue_wait: Duration::ZERO,
            upstream_time: Duration::ZERO,
            replayed_401: false,
            upstream_429s: 0,
            upstream_headers: Default::default(),
        };
        let (resp, error) = match self.handle_inner(req, &mut ctx).await {
            Ok(resp) => (resp, None),
            Err(e) => {
                let code = e.code();
                let msg = e.to_string();
                let resp = e
                    .to_response(ctx.request_id.to_str().unwrap_or("-"))
                    .map(Either::Right);
                (resp, Some((code, msg)))
            }
        };
        access_log(&ctx, resp.status(), error.as_ref());
        resp
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let (mut parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            return Err(GatewayError::BadRequest("CONNECT is not supported"));
        }
        let op_id = self
            .ops
            .classify(&parts.method, parts.uri.path())
            .map_err(|e| match e {
                ClassifyError::Unknown => GatewayError::UnknownOperation {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                },
                ClassifyError::Ambiguous => GatewayError::AmbiguousPath,
            })?;
        let op = self.ops.get(op_id);
        ctx.operation = op.name;
        match op.kind {
            OperationKind::SignIn => {
                return Err(GatewayError::Forbidden(
                    "sign-in is done by the gateway: send requests without credentials",
                ))
            }
            OperationKind::TokenManagement => {
                return Err(GatewayError::Forbidden(
                    "the gateway manages upstream tokens: refresh, validation and logout are not forwarded",
                ))
            }
            OperationKind::Business | OperationKind::Unlisted => {}
        }

        let entry = self.select_app(&parts.headers)?;
        let slot = entry.default_slot.clone();
        ctx.app = Some(entry.app.clone());
        ctx.user = Some(slot.key.user.clone());
        let bucket_key = self.quota.key(op_id, &slot.key.app, &slot.key.user);
        let deadline = ctx.start + self.config.quota.max_wait;

        let body = body::prepare(body, self.config.limits.replay_body_bytes).await?;
        let replay_body = body.replayable();

        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = self.upstream.uri(path_and_query)?;
        headers::sanitize_request(&mut parts.headers);
        parts.headers.insert(X_REQUEST_ID, ctx.request_id.clone());
        // A replay needs the headers again; keep a copy only when a replay is possible.
        let replay_headers = replay_body.as_ref().map(|_| parts.headers.clone());

        let mut next = Some((parts.headers, body));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let admission = self.admit(&bucket_key, deadline, ctx).await?;

            let waited = Instant::now();
            let token = self.tokens.get(&slot).await?;
            ctx.token_wait += waited.elapsed();

            let (mut headers, body) = match next.take() {
                Some(first) => first,
                None => match (&replay_headers, &replay_body) {
                    (Some(h), Some(b)) => (
                        h.clone(),
                        ProxyBody::Full((!b.is_empty()).then(|| b.clone())),
                    ),
                    _ => unreachable_replay()?,
                },
            };
            headers.insert(X_ACCESS_TOKEN, token.header().clone());
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri.clone();
            // The upstream connection decides the protocol; HTTP/1.1 semantics either way.
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = headers;

            let sent = Instant::now();
            let result = self.upstream.send(req).await;
            ctx.upstream_time += sent.elapsed();
            let resp = result?;
            if let Some(a) = &admission {
                self.quota.observe(a, resp.headers());
            }
            drop(admission);

            let status = resp.status();
            if status != StatusCode::UNAUTHORIZED && status != StatusCode::TOO_MANY_REQUESTS {
                return Ok(self.finish(resp.map(Either::Left), ctx));
            }
            // Both mean the upstream did not process the request: read the small error body
            // to be sure, then replay when the body allows it.
            let (mut rparts, rbody) = resp.into_parts();
            let bytes = read_body(rbody, ERROR_BODY_LIMIT, self.upstream.request_timeout()).await?;
            let replayable = replay_body.is_some();
            if status == StatusCode::UNAUTHORIZED {
                if error_code(&bytes) == Some(TOKEN_INVALID_CODE) {
                    self.tokens.invalidate(&slot, token.generation);
                    if replayable && !ctx.replayed_401 {
                        ctx.replayed_401 = true;
                        continue;
                    }
                }
            } else {
                ctx.upstream_429s += 1;
                let retry_after = rparts
                    .headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let hold = match self.quota.find(&bucket_key) {
                    Some(bucket) => self.quota.hold(&bucket, retry_after),
                    None => retry_after.unwrap_or(Duration::from_secs(1)),
                };
                tracing::warn!(
                    operation = ctx.operation,
                    error_code = error_code(&bytes).unwrap_or("-"),
                    hold_ms = hold.as_millis() as u64,
                    "Upstream refused a request for quota"
                );
                if replayable && attempts <= MAX_QUOTA_REPLAYS && Instant::now() + hold < deadline {
                    continue;
                }
                rparts
                    .headers
                    .entry(header::RETRY_AFTER)
                    .or_insert_with(|| HeaderValue::from(retry_after_secs(hold)));
            }
            let resp = Response::from_parts(rparts, Either::Right(Full::new(bytes)));
            return Ok(self.finish(resp, ctx));
        }
    }

    /// Waits for a quota slot for the bucket, unless quotas are off.
    async fn admit(
        &self,
        key: &BucketKey,
        deadline: Instant,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Admission>, GatewayError> {
        if !self.quota.enabled() {
            self.quota.note_disabled();
            return Ok(None);
        }
        match self.quota.acquire(key.clone(), deadline).await {
            Ok(a) => {
                ctx.queue_wait += a.waited;
                Ok(Some(a))
            }
            Err(refused) => Err(GatewayError::QuotaExceeded {
                retry_after: refused.retry_after,
            }),
        }
    }

    /// The app a request acts through: `X-Meetgate-App` when given, else the first configured.
    fn select_app(&self, headers: &HeaderMap) -> Result<&AppEntry, GatewayError> {
        match headers.get(X_MEETGATE_APP) {
            None => self
                .apps
                .first()
                .ok_or(GatewayError::Forbidden("no app is configured")),
            Some(v) => self
                .apps
                .iter()
                .find(|e| e.app.name.as_bytes() == v.as_bytes())
                .ok_or(GatewayError::Forbidden(
                    "X-Meetgate-App names no configured app",
                )),
        }
    }

    fn finish(
        &self,
        mut resp: Response<ResponseBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ResponseBody> {
        headers::strip_hop_by_hop(resp.headers_mut());
        for (slot, name) in ctx
            .upstream_headers
            .iter_mut()
            .zip(&LOGGED_UPSTREAM_HEADERS)
        {
            *slot = resp.headers().get(name).cloned();
        }
        resp
    }
}

// A replay is only attempted when both copies exist; this keeps the loop total without panics.
fn unreachable_replay() -> Result<(HeaderMap, ProxyBody), GatewayError> {
    Err(GatewayError::BadRequest("request cannot be replayed"))
}

/// The `error_code` of an upstream error body, when it has one.
fn error_code(body: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct ErrorBody<'a> {
        #[serde(borrow)]
        error_code: Option<&'a str>,
    }
    serde_json::from_slice::<ErrorBody<'_>>(body)
        .ok()
        .and_then(|b| b.error_code)
}

/// The client's `X-Request-ID` when it is a sane token, else a fresh UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
            let id = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
            HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
        })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// The one access-log line of a request. Field names are stable (README, "Access log").
fn access_log(ctx: &RequestCtx, status: StatusCode, error: Option<&(&'static str, String)>) {
    let up = |i: usize| -> &str {
        ctx.upstream_headers[i]
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    };
    tracing::info!(
        target: "meetgate::access",
        method = %ctx.method,
        path = ctx.uri.path(),
        operation = ctx.operation,
        status = status.as_u16(),
        client = %ctx.peer,
        app = ctx.app.as_ref().map_or("-", |a| a.name.as_str()),
        user = ctx.user.as_deref().unwrap_or("-"),
        total_ms = ms(ctx.start.elapsed()),
        queue_wait_ms = ms(ctx.queue_wait),
        token_wait_ms = ms(ctx.token_wait),
        upstream_ms = ms(ctx.upstream_time),
        request_id = ctx.request_id.to_str().unwrap_or("-"),
        upstream_request_id = up(0),
        apig_latency = up(1),
        apig_upstream_latency = up(2),
        envoy_upstream_service_time = up(3),
        ratelimit_api = up(4),
        ratelimit_allenv = up(5),
        replayed = ctx.replayed_401 || ctx.upstream_429s > 0,
        upstream_429s = ctx.upstream_429s,
        error_code = error.map_or("-", |e| e.0),
        error = error.map_or("-", |e| e.1.as_str()),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_or_generated() {
        let mut h = HeaderMap::new();
        let generated = request_id(&h);
        assert_eq!(generated.len(), 32);
        h.insert(X_REQUEST_ID, HeaderValue::from_static("client-id-1"));
        assert_eq!(request_id(&h), "client-id-1");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h).len(), 32);
    }

    #[test]
    fn token_code_detection() {
        assert_eq!(
            error_code(br#"{"error_code":"USG.000000004","error_msg":"x"}"#),
            Some(TOKEN_INVALID_CODE)
        );
        assert_eq!(
            error_code(br#"{"error_code":"USG.000000005"}"#),
            Some("USG.000000005")
        );
        assert_eq!(error_code(b"not json USG.000000004"), None);
    }
}
