//! The request path: classify, pick the identity, get its token, rewrite headers, forward,
//! replay once on a refused token, stream the answer back, and write one access-log line.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::body::ClientBody;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::access::{AccessRules, Caller};
use crate::accesslog;
use crate::body::{self, IdleTimeout, ProxyBody};
use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::cold::out_of_line;
use crate::config::Config;
use crate::control::{self, Controls, Exchange, Failure, Owner, Session};
use crate::error::{retry_after_secs, upstream_error_code, GatewayError};
use crate::headers::{self, X_ACCESS_TOKEN, X_CONFERENCE_AUTHORIZATION, X_PASSWORD, X_REQUEST_ID};
use crate::inbound::Inbound;
use crate::metrics::{
    AppLabels, ClientLabels, ClientRefusalLabels, Metrics, OpHistogram, OperationLabels,
    QuotaLabels,
};
use crate::operations::{
    ClassifyError, ControlRole, Operation, OperationId, OperationKind, OperationTable,
};
use crate::quota::{Admission, BucketKey, Class, QuotaManager, Refused};
use crate::sdk::{SdkAuth, SdkRequest};
use crate::token::AppConfig;
use crate::token::{Authenticator, SharedAuthenticator, Slot, TokenCache, UpstreamAuthenticator};
use crate::trace;
use crate::upstream::{read_body, Upstream, UpstreamBody, UpstreamBuildError};
use tracing::Instrument;

/// What the gateway answers with: the upstream's streamed body, or one it built itself.
/// The upstream's body is watched for silence longer than `upstream.body_timeout`.
pub type ResponseBody = Either<IdleTimeout<UpstreamBody>, Full<Bytes>>;

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

/// One entry per configured app, each with its default identity's token slot (created, and
/// so signed in, if new).
fn build_apps(tokens: &TokenCache, config: &Config) -> Vec<AppEntry> {
    config
        .apps
        .iter()
        .map(|a| {
            let app = Arc::new(a.clone());
            let default_slot = tokens.slot(&app, &app.user_id);
            AppEntry { app, default_slot }
        })
        .collect()
}

/// The gateway's shared state. Configuration and apps are swapped whole on reload; a request
/// works with the snapshot it started with.
pub struct Gateway {
    config: ArcSwap<Config>,
    ops: &'static OperationTable,
    /// For sign-ins; requests go through their worker's own pool ([`Upstream::fresh_pool`]).
    upstream: Upstream,
    tokens: TokenCache,
    quota: Arc<QuotaManager>,
    apps: ArcSwap<Vec<AppEntry>>,
    access: ArcSwap<AccessRules>,
    sdk: SdkAuth,
    metrics: Arc<Metrics>,
    /// Requests handled at once; beyond `limits.max_concurrent_requests`, 503 at once.
    requests: Arc<Semaphore>,
    cluster: Option<Arc<Cluster>>,
    controls: Arc<Controls>,
    /// Per-client inbound rate limits.
    inbound: ArcSwap<Inbound>,
    /// `create_conf_token`, whose quota control-token requests spend.
    conf_token_op: Option<OperationId>,
}

/// Per-request facts gathered on the way, for the one access-log line.
struct RequestCtx {
    start: Instant,
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    request_id: HeaderValue,
    /// The request's span (disabled unless `[tracing]` is on) and the trace id it carries.
    span: tracing::Span,
    trace_id: Option<opentelemetry::trace::TraceId>,
    operation: &'static str,
    /// Set once the request is classified: indexes per-operation metric handles.
    op_id: Option<OperationId>,
    app: Option<Arc<AppConfig>>,
    user: Option<Arc<str>>,
    token_wait: Duration,
    queue_wait: Duration,
    upstream_time: Duration,
    replayed_401: bool,
    upstream_429s: u32,
    quota_checked: bool,
    /// Who called: a configured client's name; none without client authentication.
    client: Option<Arc<str>>,
    /// The meeting a control call or a start names.
    conference: Option<String>,
    /// Whose control token a control call carried: `meetgate`, `client`, or `-`.
    control_token: &'static str,
    replayed_control: bool,
    /// The upstream's correlation and quota headers, in [`LOGGED_UPSTREAM_HEADERS`] order.
    upstream_headers: [Option<HeaderValue>; LOGGED_COUNT],
}

/// What one request works with from start to end: a reload swaps these whole for later
/// requests, never under a request in flight.
struct View {
    config: Arc<Config>,
    access: Arc<AccessRules>,
    apps: Arc<Vec<AppEntry>>,
}

impl View {
    fn default_user(&self, app: &str) -> Option<String> {
        self.apps
            .iter()
            .find(|e| e.app.name == app)
            .map(|e| e.app.user_id.clone())
    }
}

/// A classified, authorised request on its way upstream, across its attempts.
struct Plan<'v> {
    /// The identity's token slot (the app's default one borrowed from the view).
    slot: Cow<'v, Arc<Slot>>,
    bucket: BucketKey,
    /// The request's quota wait and its replays after an upstream 429 end here.
    deadline: Instant,
    out: Outbound,
    attempts: u32,
    /// Who the caller is, for the meeting-control sessions it may use.
    owner: Owner,
    /// Its class for fair queueing: the client, its weight and its `max_queued`.
    class: Class,
    /// The meeting's control token meetgate injects into a control call.
    control: Option<Injected>,
}

/// A control token meetgate put into a control call, to drop exactly it if refused.
struct Injected {
    session: Arc<Session>,
    header: HeaderValue,
    generation: u64,
}

/// The request as it goes upstream.
struct Outbound {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// Sent by a client connection that sends one request at a time (HTTP/1.x).
    one_at_a_time: bool,
    body: OutBody,
    /// Set when a streamed body crossed `limits.max_body_bytes`.
    too_large: Option<Arc<std::sync::atomic::AtomicBool>>,
}

enum OutBody {
    /// Buffered: sent as often as a replay needs.
    Buffered(Option<Bytes>),
    /// Streamed: sent once, then gone.
    Streamed(Option<ProxyBody>),
}

impl Outbound {
    fn replayable(&self) -> bool {
        matches!(self.body, OutBody::Buffered(_))
    }
}

/// After an attempt: the answer for the client, or one more attempt.
enum Next {
    Answer(Response<ResponseBody>),
    Replay,
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

/// What a reload changed, for the log line that reports it.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub apps_changed: Vec<String>,
    pub clients_changed: bool,
    pub quota_changed: bool,
    /// Settings that only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Gateway {
    /// Builds the gateway and starts signing in every app's default identity in the background.
    /// Must run inside a Tokio runtime.
    pub fn new(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Gateway>, UpstreamBuildError> {
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(&config.upstream)?;
        let cluster = config.cluster.clone().map(Cluster::new);
        let quota = QuotaManager::with_cluster(config.quota.clone(), cluster.clone());
        let upstream_auth: Arc<dyn Authenticator> = Arc::new(UpstreamAuthenticator::new(
            upstream.clone(),
            clock.clone(),
            config.token.signature_lifetime,
            quota.clone(),
        ));
        let auth: Arc<dyn Authenticator> = match &cluster {
            Some(c) => Arc::new(SharedAuthenticator::new(
                upstream_auth,
                c.clone(),
                clock.clone(),
                config.token.clone(),
            )),
            None => upstream_auth,
        };
        let controls = Controls::new(config.control.clone(), clock.clone(), metrics.clone());
        let tokens = TokenCache::new(auth, clock, config.token.clone(), true, metrics.clone());
        let apps = build_apps(&tokens, &config);
        let config_for_access = config.clone();
        Ok(Arc::new(Gateway {
            config: ArcSwap::new(config),
            ops: OperationTable::global(),
            upstream,
            tokens,
            quota,
            apps: ArcSwap::from_pointee(apps),
            access: ArcSwap::from_pointee(AccessRules::new(&config_for_access.clients)),
            sdk: SdkAuth::new(&config_for_access.sdk),
            metrics,
            requests: Arc::new(Semaphore::new(
                config_for_access.limits.max_concurrent_requests,
            )),
            cluster,
            controls,
            inbound: ArcSwap::from_pointee(Inbound::new(&config_for_access.clients, None)),
            conf_token_op: OperationTable::global().by_name("create_conf_token"),
        }))
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    pub fn quota(&self) -> &Arc<QuotaManager> {
        &self.quota
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn controls(&self) -> &Arc<Controls> {
        &self.controls
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Why the replica runs on local fallbacks, when it does (Redis unreachable).
    pub fn degraded(&self) -> Option<String> {
        self.cluster.as_ref().and_then(|c| c.degraded())
    }

    /// Ready when every app's default identity holds a valid token; otherwise the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let now = self.tokens.now_ms();
        let reasons: Vec<String> = self
            .apps
            .load()
            .iter()
            .filter(|e| {
                e.default_slot
                    .current()
                    .is_none_or(|t| t.expires_at_ms <= now)
            })
            .map(|e| {
                format!(
                    "app {}: no valid token ({})",
                    e.app.name,
                    e.default_slot.problem()
                )
            })
            .collect();
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    /// Fills the scrape-time gauges: token expiry per app, quota per bucket, waiting requests.
    pub fn update_gauges(&self) {
        let now = self.tokens.now_ms();
        let m = &self.metrics;
        // The exporter counts on its own thread; the counters catch up at each scrape.
        for (result, total) in [
            (
                "ok",
                trace::EXPORTED_BATCHES.load(std::sync::atomic::Ordering::Relaxed),
            ),
            (
                "error",
                trace::FAILED_BATCHES.load(std::sync::atomic::Ordering::Relaxed),
            ),
        ] {
            if total > 0 {
                let c = m
                    .trace_export_batches
                    .get_or_create(&crate::metrics::ResultLabels { result });
                c.inc_by(total.saturating_sub(c.get()));
            }
        }
        m.token_expiry_seconds.clear();
        for e in self.apps.load().iter() {
            let left = e
                .default_slot
                .current()
                .map_or(-1.0, |t| (t.expires_at_ms as f64 - now as f64) / 1000.0);
            m.token_expiry_seconds
                .get_or_create(&AppLabels {
                    app: e.default_slot.key.app.clone(),
                })
                .set(left);
        }
        m.quota_remaining.clear();
        for (key, bucket) in self.quota.buckets() {
            let operation = self.ops.get(key.op).name;
            let app = key.app.clone().unwrap_or_else(|| Arc::from("*"));
            for (kind, local, upstream) in bucket.remaining() {
                let mut labels = QuotaLabels {
                    operation,
                    app: app.clone(),
                    limit: kind.as_str(),
                    source: "local",
                };
                // Several user buckets share labels: report the tightest.
                let g = m.quota_remaining.get_or_create(&labels);
                if g.get() == 0 || i64::from(local) < g.get() {
                    g.set(i64::from(local));
                }
                drop(g);
                if let Some(up) = upstream {
                    labels.source = "upstream";
                    m.quota_remaining
                        .get_or_create(&labels)
                        .set(i64::try_from(up).unwrap_or(i64::MAX));
                }
            }
        }
        m.waiting.set(self.quota.waiting() as i64);
        m.control_sessions.set(self.controls.len() as i64);
        m.ready.set(i64::from(self.readiness().is_ok()));
        if let Some(c) = &self.cluster {
            m.cluster_degraded.set(i64::from(c.degraded().is_some()));
            let count = |n: &std::sync::atomic::AtomicU64| {
                i64::try_from(n.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX)
            };
            m.cluster_fallbacks.set(count(&c.fallbacks));
            m.cluster_leased.set(count(&c.leased));
        }
    }

    /// Refuses requests still waiting for quota (503 `MEETGATE.SHUTTING_DOWN`) and all later
    /// ones that would wait; requests already upstream finish normally.
    pub fn begin_shutdown(&self) {
        self.quota.begin_shutdown();
    }

    /// Applies a new, already validated configuration: app keys, quota settings and token
    /// settings take effect for new requests; requests in flight keep what they started with.
    pub fn reload(&self, new: Config) -> ReloadSummary {
        let old = self.config.load_full();
        let mut summary = ReloadSummary::default();
        if new.listen != old.listen {
            summary.needs_restart.push("listen");
        }
        if new.admin_listen != old.admin_listen {
            summary.needs_restart.push("admin_listen");
        }
        // The upstream clients (pools, TLS, protocols, timeouts) are built once, at start.
        if new.upstream != old.upstream {
            summary.needs_restart.push("upstream");
        }
        if new.log.format != old.log.format || new.log.level != old.log.level {
            summary.needs_restart.push("log");
        }
        if new.workers != old.workers {
            summary.needs_restart.push("workers");
        }
        if new.cluster != old.cluster {
            summary.needs_restart.push("cluster");
        }
        if new.tracing != old.tracing {
            summary.needs_restart.push("tracing");
        }
        if new.tls.as_ref().map(|t| &t.certs) != old.tls.as_ref().map(|t| &t.certs) {
            summary.needs_restart.push("tls");
        }
        for app in &new.apps {
            let changed = old
                .apps
                .iter()
                .find(|a| a.name == app.name)
                .is_none_or(|a| !a.same_credentials(app) || a.user_id != app.user_id);
            if changed {
                summary.apps_changed.push(app.name.clone());
                self.tokens.update_app(&Arc::new(app.clone()));
                // A session's password was given for the old credentials' meetings.
                self.controls.end_app(&app.name);
            }
        }
        for app in &old.apps {
            if !new.apps.iter().any(|a| a.name == app.name) {
                self.controls.end_app(&app.name);
            }
        }
        if new.control != old.control {
            self.controls.reconfigure(new.control.clone());
        }
        if new.quota != old.quota {
            summary.quota_changed = true;
            self.quota.reconfigure(new.quota.clone());
        }
        // Sessions of clients that were removed or whose credentials changed end now.
        self.sdk.sessions.retain_clients(|name| {
            let before = old.clients.iter().find(|c| &*c.name == name);
            let after = new.clients.iter().find(|c| &*c.name == name);
            match (before, after) {
                (Some(b), Some(a)) => {
                    b.sdk
                        .as_ref()
                        .map(|s| (s.app_id.as_str(), s.app_key.expose_secret()))
                        == a.sdk
                            .as_ref()
                            .map(|s| (s.app_id.as_str(), s.app_key.expose_secret()))
                }
                _ => false,
            }
        });
        summary.clients_changed = new.clients.len() != old.clients.len()
            || new.clients.iter().zip(&old.clients).any(|(a, b)| {
                a.name != b.name
                    || a.key_sha256 != b.key_sha256
                    || a.apps != b.apps
                    || a.users != b.users
                    || a.operations != b.operations
                    || a.sdk.as_ref().map(|s| s.app_key.expose_secret())
                        != b.sdk.as_ref().map(|s| s.app_key.expose_secret())
            });
        self.access.store(Arc::new(AccessRules::new(&new.clients)));
        let inbound = Inbound::new(&new.clients, Some(&self.inbound.load()));
        self.inbound.store(Arc::new(inbound));
        let new = Arc::new(new);
        self.apps.store(Arc::new(build_apps(&self.tokens, &new)));
        self.config.store(new);
        summary
    }

    /// The outer handler: never fails, logs exactly once.
    /// `conflicting_framing`: the connection sent Content-Length with Transfer-Encoding (see
    /// [`crate::framing`]); the request is refused.
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        peer: SocketAddr,
        conflicting_framing: bool,
        upstream: &Upstream,
    ) -> Response<ResponseBody> {
        let span = trace::request_span(req.headers(), req.method());
        let trace_id = trace::trace_id(&span, req.headers());
        let mut ctx = RequestCtx {
            start: Instant::now(),
            peer,
            method: req.method().clone(),
            uri: req.uri().clone(),
            request_id: request_id(req.headers()),
            span,
            trace_id,
            operation: "-",
            op_id: None,
            app: None,
            user: None,
            token_wait: Duration::ZERO,
            queue_wait: Duration::ZERO,
            upstream_time: Duration::ZERO,
            replayed_401: false,
            upstream_429s: 0,
            conference: None,
            control_token: "-",
            replayed_control: false,
            quota_checked: false,
            client: None,
            upstream_headers: Default::default(),
        };
        // Borrowed, not cloned: every worker shares these, and a clone is a write to the
        // shared reference count (its cache line moves between cores on every request).
        let metrics = &self.metrics;
        metrics.in_flight.inc();
        let permit = self.requests.try_acquire();
        let result = match permit {
            Ok(_) if conflicting_framing => Err(GatewayError::BadRequest(
                "Content-Length and Transfer-Encoding together are not accepted",
            )),
            Ok(_permit) => {
                let span = ctx.span.clone();
                self.handle_inner(req, &mut ctx, upstream)
                    .instrument(span)
                    .await
            }
            Err(_) => Err(GatewayError::Overloaded),
        };
        let (resp, error) = match result {
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
        metrics.in_flight.dec();
        if !ctx.span.is_disabled() {
            record_outcome(&ctx, resp.status(), error.as_ref().map(|(code, _)| *code));
        }
        let total = ctx.start.elapsed();
        access_log(&ctx, total, resp.status(), error.as_ref());
        record(metrics, &ctx, total, resp.status());
        resp
    }

    /// The request path, one named step per stage (design §1): classify, access, identity,
    /// rewrite; then, per attempt, quota, token and forward, until the replay step hands the
    /// upstream's answer to the client.
    async fn handle_inner(
        &self,
        req: Request<ClientBody>,
        ctx: &mut RequestCtx,
        upstream: &Upstream,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let (parts, body) = req.into_parts();
        let op_id = self.classify(&parts, ctx)?;
        let view = self.view();
        let op = self.ops.get(op_id);
        match op.kind {
            // Sign-in and the caller's own token are meetgate's business: answered locally
            // for SDK clients, never forwarded (a forwarded logout would end the shared token).
            OperationKind::SignIn | OperationKind::TokenManagement => {
                // Out of line, as every rare wait (see `cold`).
                return out_of_line(self.answer_sdk(&view, op.name, &parts.headers, body, ctx))
                    .await;
            }
            OperationKind::Business | OperationKind::Unlisted => {}
        }
        let caller = self.access(&view, &parts.headers, ctx)?;
        let slot = self.identity(&view, &caller, op.name, &parts.headers, ctx)?;
        let limits = &view.config.limits;
        let body = body::prepare(body, limits.replay_body_bytes, limits.max_body_bytes).await?;
        let mut plan = Plan {
            bucket: self.quota.key(op_id, &slot.key.app, &slot.key.user),
            deadline: ctx.start + view.config.quota.max_wait,
            slot,
            out: self.rewrite(parts, body, ctx, upstream)?,
            attempts: 0,
            owner: caller.client().map(|c| c.name.clone()),
            class: caller.client().map_or_else(Class::anonymous, |c| Class {
                name: Some(c.name.clone()),
                weight: c.weight,
                max_queued: c.max_queued,
            }),
            control: None,
        };
        if let Some(refused) = self.control(op, &mut plan, ctx, upstream).await? {
            return Ok(self.finish(refused, ctx));
        }
        loop {
            plan.attempts += 1;
            // The token first: a slot must be spent on a request that goes at once.
            let phase = trace::phase(
                &ctx.span,
                || tracing::info_span!(target: trace::TARGET, "token wait"),
            );
            self.await_token(&plan, ctx).instrument(phase).await?;
            // And the connection: the upstream counts the request when it arrives.
            upstream.ready().await?;
            let phase = trace::phase(
                &ctx.span,
                || tracing::info_span!(target: trace::TARGET, "quota wait"),
            );
            let admission = self.admit(&plan, ctx).instrument(phase).await?;
            let generation = self.inject_token(&mut plan, ctx).await?;
            let span = trace::phase(&ctx.span, || {
                tracing::info_span!(
                    target: trace::TARGET,
                    "upstream",
                    otel.kind = "client",
                    meetgate.attempt = plan.attempts,
                    http.response.status_code = tracing::field::Empty,
                    upstream.request_id = tracing::field::Empty,
                )
            });
            trace::inject(&span, &mut plan.out.headers);
            let resp = self
                .forward(&mut plan.out, upstream, ctx, limits)
                .instrument(span.clone())
                .await?;
            if !span.is_disabled() {
                record_upstream(&span, &resp);
            }
            drop(span);
            if let Some(a) = admission {
                self.quota.observe(a, resp.headers());
            }
            let status = resp.status();
            let next =
                if status != StatusCode::UNAUTHORIZED && status != StatusCode::TOO_MANY_REQUESTS {
                    // Any other answer streams back as it is.
                    let body_timeout = view.config.upstream.body_timeout;
                    Next::Answer(resp.map(|b| Either::Left(IdleTimeout::new(b, body_timeout))))
                } else {
                    out_of_line(self.replay(resp, &mut plan, generation, ctx, upstream)).await?
                };
            match next {
                Next::Answer(resp) => {
                    self.after_answer(op, &plan, resp.status(), ctx);
                    return Ok(self.finish(resp, ctx));
                }
                Next::Replay => {}
            }
        }
    }

    /// Control: a meeting-control call that brings no control token gets its meeting's, from
    /// the session meetgate keeps (obtained now if it has none). A host password it brings is
    /// used for that and never forwarded. A call with its own `X-Conference-Authorization` is
    /// the client's business and goes as it is. `Some`: the upstream refused to issue a token,
    /// and its answer is the client's.
    async fn control(
        &self,
        op: &Operation,
        plan: &mut Plan<'_>,
        ctx: &mut RequestCtx,
        upstream: &Upstream,
    ) -> Result<Option<Response<ResponseBody>>, GatewayError> {
        if !matches!(op.control, ControlRole::Call | ControlRole::Stop) || !self.controls.enabled()
        {
            return Ok(None);
        }
        ctx.conference = control::conference_id(plan.out.uri.query());
        if plan.out.headers.contains_key(X_CONFERENCE_AUTHORIZATION) {
            ctx.control_token = "client";
            return Ok(None);
        }
        let Some(conference) = ctx.conference.as_deref() else {
            return Ok(None);
        };
        let password = match plan.out.headers.remove(X_PASSWORD) {
            Some(v) => Some(SecretString::from(
                v.to_str()
                    .map_err(|_| GatewayError::BadRequest("X-Password must be visible ASCII"))?
                    .trim()
                    .to_owned(),
            )),
            None => None,
        };
        let Some(session) =
            self.controls
                .session_for(&plan.slot.key.app, conference, &plan.owner, password)?
        else {
            return Ok(None);
        };
        let token = match self
            .controls
            .cached(&session, || self.exchange(plan, upstream))
        {
            Some(current) => Ok(current),
            None => {
                let exchange = self.exchange(plan, upstream);
                out_of_line(self.controls.token(&session, &exchange)).await
            }
        };
        match token {
            Ok((header, generation)) => {
                ctx.control_token = "meetgate";
                plan.control = Some(Injected {
                    session,
                    header,
                    generation,
                });
                Ok(None)
            }
            Err(Failure::Refused(resp)) => Ok(Some((*resp).map(|b| Either::Right(Full::new(b))))),
            Err(Failure::Gateway(e)) => Err(e),
        }
    }

    /// What a control-token request of this plan's identity needs.
    fn exchange(&self, plan: &Plan<'_>, upstream: &Upstream) -> Exchange {
        let op = self.conf_token_op.unwrap_or(plan.bucket.op);
        Exchange {
            upstream: upstream.clone(),
            quota: self.quota.clone(),
            tokens: self.tokens.clone(),
            slot: Arc::clone(&plan.slot),
            bucket: self.quota.key(op, &plan.slot.key.app, &plan.slot.key.user),
            deadline: plan.deadline,
            class: plan.class.clone(),
        }
    }

    /// After the upstream's answer: a successful start leaves its host password with the
    /// meeting's session; a successful stop ends the session.
    fn after_answer(
        &self,
        op: &Operation,
        plan: &Plan<'_>,
        status: StatusCode,
        ctx: &mut RequestCtx,
    ) {
        if !status.is_success() {
            return;
        }
        match op.control {
            ControlRole::Start => {
                // Borrowed from the body unless a value has escapes: no copy of the password
                // unless the session needs a new one. No `Debug`: it holds the password.
                #[derive(serde::Deserialize)]
                struct Start<'a> {
                    #[serde(rename = "conferenceID", borrow)]
                    conference_id: Cow<'a, str>,
                    #[serde(borrow)]
                    password: Password<'a>,
                }
                /// The parser's copy of a password (it had escapes) is wiped when dropped, on
                /// every path (a later field failing, a repeated field), as a `SecretString`.
                #[derive(serde::Deserialize)]
                struct Password<'a>(#[serde(borrow)] Cow<'a, str>);
                impl Drop for Password<'_> {
                    fn drop(&mut self) {
                        if let Cow::Owned(copy) = &mut self.0 {
                            secrecy::zeroize::Zeroize::zeroize(copy);
                        }
                    }
                }
                let OutBody::Buffered(Some(body)) = &plan.out.body else {
                    return;
                };
                let Ok(start) = serde_json::from_slice::<Start<'_>>(body) else {
                    return;
                };
                if control::keyable(&start.conference_id) {
                    self.controls.remember_start(
                        &plan.slot.key.app,
                        &start.conference_id,
                        &plan.owner,
                        &start.password.0,
                    );
                    ctx.conference = Some(start.conference_id.into_owned());
                }
            }
            ControlRole::Stop => {
                if let Some(conference) = ctx.conference.as_deref() {
                    self.controls.end(&plan.slot.key.app, conference);
                }
            }
            ControlRole::Call | ControlRole::TokenEndpoint | ControlRole::None => {}
        }
    }

    /// Classify: the method and path name an operation of the table, or the request is
    /// refused (CONNECT, absolute-form targets, unknown or non-canonical paths).
    fn classify(
        &self,
        parts: &http::request::Parts,
        ctx: &mut RequestCtx,
    ) -> Result<OperationId, GatewayError> {
        if parts.method == Method::CONNECT {
            return Err(GatewayError::BadRequest("CONNECT is not supported"));
        }
        // HTTP/1 absolute-form targets are for forward proxies; meetgate is not one. (In h2
        // every request carries an authority, and it plays no part in routing.)
        if parts.version < Version::HTTP_2 && parts.uri.authority().is_some() {
            return Err(GatewayError::BadRequest(
                "absolute-form request targets are not accepted: send the path only",
            ));
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
        ctx.operation = self.ops.get(op_id).name;
        ctx.op_id = Some(op_id);
        if !ctx.span.is_disabled() {
            ctx.span.record("meetgate.operation", ctx.operation);
            tracing::info!(target: trace::TARGET, operation = ctx.operation, "classified");
        }
        Ok(op_id)
    }

    /// The configuration, clients and apps this request works with from start to end.
    fn view(&self) -> View {
        View {
            config: self.config.load_full(),
            access: self.access.load_full(),
            apps: self.apps.load_full(),
        }
    }

    /// Sign-in and token management for SDK clients, answered by meetgate itself.
    async fn answer_sdk(
        &self,
        view: &View,
        operation: &'static str,
        headers: &HeaderMap,
        body: ClientBody,
        ctx: &RequestCtx,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let req = SdkRequest {
            operation,
            headers,
            peer: ctx.peer,
            now_ms: self.tokens.now_ms(),
        };
        let resp = self
            .sdk
            .handle(req, body, &view.access, &view.config.sdk, |app| {
                view.default_user(app)
            })
            .await?;
        Ok(resp.map(Either::Right))
    }

    /// Access: who is calling (nobody in particular on an open sidecar).
    fn access(
        &self,
        view: &View,
        headers: &HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Caller, GatewayError> {
        let caller = view
            .access
            .authenticate(headers, &self.sdk.sessions, self.tokens.now_ms())?;
        if !ctx.span.is_disabled() {
            let who = caller.client().map_or("-", |c| &*c.name);
            ctx.span.record("meetgate.client", who);
            tracing::info!(target: trace::TARGET, client = who, "access granted");
        }
        if let Some(client) = caller.client() {
            ctx.client = Some(client.name.clone());
            // Over its own rate: refused before it takes a place in any queue.
            if let Err(retry_after) = self.inbound.load().check(&client.name) {
                self.metrics
                    .client_refused
                    .get_or_create(&ClientRefusalLabels {
                        client: client.name.clone(),
                        reason: "rate",
                    })
                    .inc();
                return Err(GatewayError::ClientRateLimited { retry_after });
            }
        }
        Ok(caller)
    }

    /// Identity: which app and user the request acts as, if the caller may; its token slot.
    fn identity<'v>(
        &self,
        view: &'v View,
        caller: &Caller,
        operation: &'static str,
        headers: &HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Cow<'v, Arc<Slot>>, GatewayError> {
        let identity = view
            .access
            .authorize(caller, operation, headers, |app| view.default_user(app))?;
        let entry = if identity.app.is_empty() {
            view.apps.first()
        } else {
            view.apps.iter().find(|e| e.app.name == identity.app)
        }
        .ok_or(GatewayError::Forbidden(
            "X-Meetgate-App names no configured app",
        ))?;
        ctx.app = Some(entry.app.clone());
        // The app's default identity is borrowed: its slot's count is shared by every worker.
        let slot = match identity.user {
            Some(user) if user != entry.app.user_id => {
                Cow::Owned(self.tokens.slot(&entry.app, &user))
            }
            _ => Cow::Borrowed(&entry.default_slot),
        };
        ctx.user = Some(slot.key.user.clone());
        Ok(slot)
    }

    /// Rewrite: the upstream's URI, the client's credentials and hop-by-hop headers gone, the
    /// request id set.
    fn rewrite(
        &self,
        parts: http::request::Parts,
        body: ProxyBody,
        ctx: &RequestCtx,
        upstream: &Upstream,
    ) -> Result<Outbound, GatewayError> {
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = upstream.uri(path_and_query)?;
        let mut headers = parts.headers;
        headers::sanitize_request(&mut headers);
        headers.insert(X_REQUEST_ID, headers::forwarded_request_id(&ctx.request_id));
        let too_large = body.exceeded();
        // A buffered body is sent from here as often as a replay needs, its head lent to each
        // send; a streamed one goes once, head and all.
        let body = match body {
            ProxyBody::Full(b) => OutBody::Buffered(b),
            stream @ ProxyBody::Stream { .. } => OutBody::Streamed(Some(stream)),
        };
        Ok(Outbound {
            method: parts.method,
            uri,
            headers,
            one_at_a_time: parts.version < Version::HTTP_2,
            body,
            too_large,
        })
    }

    /// Token, before the quota: waits while the identity has no valid token (a sign-in in
    /// flight), so the time between a quota slot and the send is not spent waiting for one.
    async fn await_token(&self, plan: &Plan<'_>, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        let waited = Instant::now();
        self.tokens.ready(&plan.slot).await?;
        ctx.token_wait += waited.elapsed();
        Ok(())
    }

    /// Token: the identity's current access token (waiting only when it has none that is
    /// valid). Returns the token's generation, to invalidate exactly it if refused.
    async fn inject_token(
        &self,
        plan: &mut Plan<'_>,
        ctx: &mut RequestCtx,
    ) -> Result<u64, GatewayError> {
        let waited = Instant::now();
        let (token, generation) = self.tokens.header(&plan.slot).await?;
        ctx.token_wait += waited.elapsed();
        plan.out.headers.insert(X_ACCESS_TOKEN, token);
        if let Some(c) = &plan.control {
            plan.out
                .headers
                .insert(X_CONFERENCE_AUTHORIZATION, c.header.clone());
        }
        Ok(generation)
    }

    /// Forward: one send upstream, waiting for the response headers.
    async fn forward(
        &self,
        out: &mut Outbound,
        upstream: &Upstream,
        ctx: &mut RequestCtx,
        limits: &crate::limits::LimitsConfig,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let sent = Instant::now();
        let result = match &mut out.body {
            OutBody::Buffered(body) => {
                upstream
                    .send_buffered(
                        &out.method,
                        &out.uri,
                        &mut out.headers,
                        body.clone(),
                        out.one_at_a_time,
                    )
                    .await
            }
            OutBody::Streamed(stream) => {
                let body = stream.take().ok_or_else(unreachable_replay)?;
                let mut req = Request::new(body);
                *req.method_mut() = out.method.clone();
                *req.uri_mut() = out.uri.clone();
                // The upstream connection decides the protocol; HTTP/1.1 semantics.
                *req.version_mut() = Version::HTTP_11;
                *req.headers_mut() = std::mem::take(&mut out.headers);
                // A large body is the rare case, and its send the larger future.
                out_of_line(upstream.send(req)).await
            }
        };
        ctx.upstream_time += sent.elapsed();
        match result {
            // However the protocol reported the aborted stream, the cause was the body cap.
            Err(_)
                if out
                    .too_large
                    .as_ref()
                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed)) =>
            {
                Err(GatewayError::BodyTooLarge {
                    limit: limits.max_body_bytes,
                })
            }
            other => other,
        }
    }

    /// Replay, for an answer 401 or 429 (out of line, see `cold`): a refused token (401
    /// `USG.000000004`) or an upstream 429 means the upstream did not process the request; it
    /// goes again when its body allows, else the answer is the client's.
    async fn replay(
        &self,
        resp: Response<UpstreamBody>,
        plan: &mut Plan<'_>,
        generation: u64,
        ctx: &mut RequestCtx,
        upstream: &Upstream,
    ) -> Result<Next, GatewayError> {
        let status = resp.status();
        // Read the small error body to be sure of the cause.
        let (mut rparts, rbody) = resp.into_parts();
        let bytes = read_body(rbody, ERROR_BODY_LIMIT, upstream.request_timeout()).await?;
        let replayable = plan.out.replayable();
        if status == StatusCode::UNAUTHORIZED {
            if upstream_error_code(&bytes) == Some(TOKEN_INVALID_CODE) {
                self.tokens.invalidate(&plan.slot, generation);
                if replayable && !ctx.replayed_401 {
                    ctx.replayed_401 = true;
                    tracing::info!(target: trace::TARGET, reason = "token refused", "replay");
                    return Ok(Next::Replay);
                }
            } else if let Some(c) = &plan.control {
                // Any other 401 to a call that carried meetgate's control token: the token was
                // refused (revoked, lapsed on the server). Obtain a new one once, replay once.
                self.controls.invalidate(&c.session, c.generation);
                if replayable && !ctx.replayed_control {
                    ctx.replayed_control = true;
                    let session = c.session.clone();
                    let exchange = self.exchange(plan, upstream);
                    match out_of_line(self.controls.token(&session, &exchange)).await {
                        Ok((header, generation)) => {
                            self.metrics.control_replays.inc();
                            tracing::info!(
                                target: trace::TARGET,
                                reason = "control token refused",
                                "replay"
                            );
                            plan.control = Some(Injected {
                                session,
                                header,
                                generation,
                            });
                            return Ok(Next::Replay);
                        }
                        Err(Failure::Refused(resp)) => {
                            return Ok(Next::Answer((*resp).map(|b| Either::Right(Full::new(b)))));
                        }
                        Err(Failure::Gateway(e)) => return Err(e),
                    }
                }
            }
        } else {
            ctx.upstream_429s += 1;
            let retry_after = headers::retry_after(&rparts.headers);
            let hold = match self.quota.find(&plan.bucket) {
                Some(bucket) => self.quota.hold(&bucket, retry_after),
                None => retry_after.unwrap_or(Duration::from_secs(1)),
            };
            tracing::warn!(
                operation = ctx.operation,
                error_code = upstream_error_code(&bytes).unwrap_or("-"),
                hold_ms = hold.as_millis() as u64,
                "Upstream refused a request for quota"
            );
            if replayable
                && plan.attempts <= MAX_QUOTA_REPLAYS
                && Instant::now() + hold < plan.deadline
            {
                tracing::info!(target: trace::TARGET, reason = "upstream 429", "replay");
                return Ok(Next::Replay);
            }
            rparts
                .headers
                .entry(header::RETRY_AFTER)
                .or_insert_with(|| HeaderValue::from(retry_after_secs(hold)));
        }
        Ok(Next::Answer(Response::from_parts(
            rparts,
            Either::Right(Full::new(bytes)),
        )))
    }

    /// Waits for a quota slot for the bucket, unless quotas are off.
    async fn admit(
        &self,
        plan: &Plan<'_>,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Admission>, GatewayError> {
        if !self.quota.enabled() {
            self.quota.note_disabled();
            return Ok(None);
        }
        let result = self
            .quota
            .acquire(&plan.bucket, plan.deadline, &plan.class)
            .await;
        let m = &self.metrics;
        let client = plan.class.name.as_ref();
        let refused = |reason| {
            if let Some(client) = client {
                m.client_refused
                    .get_or_create(&ClientRefusalLabels {
                        client: client.clone(),
                        reason,
                    })
                    .inc();
            }
        };
        match result {
            Ok(a) => {
                ctx.queue_wait += a.waited;
                ctx.quota_checked = true;
                if let Some(client) = client {
                    let labels = ClientLabels {
                        client: client.clone(),
                    };
                    m.client_admitted.get_or_create(&labels).inc();
                    m.client_queue_wait_seconds
                        .get_or_create(&labels)
                        .observe(a.waited.as_secs_f64());
                }
                Ok(Some(a))
            }
            Err(Refused::Exhausted { retry_after }) => {
                refused("queue_wait");
                Err(GatewayError::QuotaExceeded { retry_after })
            }
            Err(Refused::ClientQueueFull { retry_after }) => {
                refused("max_queued");
                Err(GatewayError::QuotaExceeded { retry_after })
            }
            Err(Refused::ShuttingDown) => Err(GatewayError::ShuttingDown),
        }
    }

    fn finish(
        &self,
        mut resp: Response<ResponseBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ResponseBody> {
        headers::strip_hop_by_hop(resp.headers_mut());
        // One pass over the response's headers is cheaper than a hashed look-up of each
        // logged name. The first value of a name is logged, as `get` would give.
        ctx.upstream_headers = Default::default();
        for (name, value) in resp.headers() {
            let logged = LOGGED_UPSTREAM_HEADERS.iter().position(|n| n == name);
            if let Some(slot) = logged.and_then(|i| ctx.upstream_headers.get_mut(i)) {
                slot.get_or_insert_with(|| value.clone());
            }
        }
        resp
    }
}

/// A traced request's outcome on its span. Cold, as every span's work: most requests are not
/// traced, and the code stays out of the request path's (see `cold`).
#[cold]
#[inline(never)]
fn record_outcome(ctx: &RequestCtx, status: StatusCode, error: Option<&'static str>) {
    ctx.span
        .record("http.response.status_code", i64::from(status.as_u16()));
    ctx.span.record(
        "meetgate.request_id",
        ctx.request_id.to_str().unwrap_or("-"),
    );
    if let Some(code) = error {
        ctx.span.record("error.type", code);
    }
}

/// The upstream's answer on a traced attempt's span (see [`record_outcome`]).
#[cold]
#[inline(never)]
fn record_upstream(span: &tracing::Span, resp: &Response<UpstreamBody>) {
    span.record(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    if let Some(id) = resp
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        span.record("upstream.request_id", id);
    }
}

/// Counters and histograms for one finished request.
fn record(metrics: &Metrics, ctx: &RequestCtx, total: Duration, status: StatusCode) {
    let op = OperationLabels {
        operation: ctx.operation,
    };
    metrics.count_request(
        ctx.op_id,
        ctx.operation,
        status.as_u16(),
        ctx.client.as_ref(),
    );
    let observe = |which, seconds| metrics.observe_op(ctx.op_id, ctx.operation, which, seconds);
    observe(OpHistogram::Request, total.as_secs_f64());
    if !ctx.upstream_time.is_zero() {
        observe(OpHistogram::Upstream, ctx.upstream_time.as_secs_f64());
    }
    if ctx.quota_checked {
        observe(OpHistogram::QueueWait, ctx.queue_wait.as_secs_f64());
    }
    if ctx.upstream_429s > 0 {
        metrics
            .upstream_429
            .get_or_create(&op)
            .inc_by(u64::from(ctx.upstream_429s));
    }
}

// A streamed body goes once and is never replayed; this keeps the loop total without panics.
fn unreachable_replay() -> GatewayError {
    GatewayError::BadRequest("request cannot be replayed")
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

/// An upstream header's value as the access line shows it: `-` when absent or not UTF-8. UTF-8
/// is all the line needs (it escapes the rest), and std checks long ASCII runs a word at a
/// time; so a non-ASCII value is logged escaped, not as `-`.
fn logged_header(value: Option<&HeaderValue>) -> &str {
    value
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .unwrap_or("-")
}

/// The one access-log line of a request.
fn access_log(
    ctx: &RequestCtx,
    total: Duration,
    status: StatusCode,
    error: Option<&(&'static str, String)>,
) {
    let up = |i: usize| logged_header(ctx.upstream_headers[i].as_ref());
    let trace_hex = ctx.trace_id.map(|t| t.to_string());
    accesslog::write(&accesslog::Entry {
        method: ctx.method.as_str(),
        path: ctx.uri.path(),
        operation: ctx.operation,
        status: status.as_u16(),
        client: ctx.peer,
        app: ctx.app.as_ref().map_or("-", |a| a.name.as_str()),
        user: ctx.user.as_deref().unwrap_or("-"),
        conference: ctx.conference.as_deref().unwrap_or("-"),
        control_token: ctx.control_token,
        total,
        queue_wait: ctx.queue_wait,
        token_wait: ctx.token_wait,
        upstream: ctx.upstream_time,
        request_id: ctx.request_id.to_str().unwrap_or("-"),
        trace_id: trace_hex.as_deref().unwrap_or("-"),
        upstream_headers: [up(0), up(1), up(2), up(3), up(4), up(5)],
        replayed: ctx.replayed_401 || ctx.replayed_control || ctx.upstream_429s > 0,
        upstream_429s: ctx.upstream_429s,
        error_code: error.map_or("-", |e| e.0),
        error: error.map_or("-", |e| e.1.as_str()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_headers_are_logged_when_utf8() {
        let value = |b: &[u8]| HeaderValue::from_bytes(b).unwrap();
        assert_eq!(logged_header(None), "-");
        assert_eq!(
            logged_header(Some(&value(b"remain:99,limit:100"))),
            "remain:99,limit:100"
        );
        assert_eq!(
            logged_header(Some(&value("caf\u{e9}".as_bytes()))),
            "caf\u{e9}"
        );
        assert_eq!(logged_header(Some(&value(b"caf\xe9"))), "-");
    }

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

    #[tokio::test]
    async fn any_upstream_change_is_reported_as_needing_a_restart() {
        let text = "[upstream]\nurl = \"https://127.0.0.1:9\"\n[[apps]]\napp_id = \"a\"\napp_key = \"k\"\n";
        let load = |extra: &str| {
            crate::config::load_str(
                &text.replace("[[apps]]", &format!("{extra}\n[[apps]]")),
                &std::collections::HashMap::new(),
            )
            .expect("valid")
        };
        let gw =
            Gateway::new(Arc::new(load("")), Arc::new(crate::clock::SystemClock)).expect("gateway");
        assert!(gw.reload(load("")).needs_restart.is_empty());
        for changed in [
            "http2 = false",
            "http1_for_single_client = false",
            "request_timeout = \"7s\"",
            "pool_idle_timeout = \"5s\"",
        ] {
            let summary = gw.reload(load(changed));
            assert_eq!(summary.needs_restart, ["upstream"], "{changed}");
        }
    }

    #[test]
    fn token_code_detection() {
        assert_eq!(
            upstream_error_code(br#"{"error_code":"USG.000000004","error_msg":"x"}"#),
            Some(TOKEN_INVALID_CODE)
        );
        assert_eq!(
            upstream_error_code(br#"{"error_code":"USG.000000005"}"#),
            Some("USG.000000005")
        );
        assert_eq!(upstream_error_code(b"not json USG.000000004"), None);
        // An array is not an error body, though serde would read it by position.
        assert_eq!(upstream_error_code(br#"["USG.000000004"]"#), None);
        assert_eq!(upstream_error_code(br#" [""]"#), None);
        assert_eq!(
            upstream_error_code(b" \n{\"error_code\":\"USG.000000004\"}"),
            Some("USG.000000004")
        );
    }
}
