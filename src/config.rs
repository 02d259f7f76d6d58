//! Configuration: file and `MEETGATE__` environment layers (the `config` crate) deserialized into
//! a raw form, then validated once into the typed [`Config`]; every problem names its key.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::num::NonZeroU32;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::operations::{OperationId, OperationTable};
use crate::quota::{derive, GcraParams, LimitKind, LimitSpec};

/// Prefix of environment overrides: `MEETGATE__UPSTREAM__URL` sets `upstream.url`.
pub const ENV_PREFIX: &str = "MEETGATE";

// === raw layer: what the file says ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    shutdown_grace: Option<String>,
    reload_interval: Option<String>,
    workers: Option<usize>,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    token: RawToken,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    quota: RawQuota,
    #[serde(default)]
    apps: Vec<RawApp>,
    #[serde(default)]
    clients: Vec<RawClient>,
    allow_unauthenticated: Option<bool>,
    tls: Option<RawTls>,
    #[serde(default)]
    sdk: RawSdk,
    cluster: Option<RawCluster>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis_url: Option<SecretString>,
    key_prefix: Option<String>,
    max_replicas: Option<u32>,
    timeout: Option<String>,
}

impl fmt::Debug for RawCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawCluster").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: Option<String>,
    key_sha256: Option<String>,
    app_id: Option<String>,
    app_key_env: Option<String>,
    app_key_file: Option<PathBuf>,
    app_key: Option<SecretString>,
    apps: Option<Vec<String>>,
    users: Option<Vec<String>>,
    operations: Option<Vec<String>>,
}

impl fmt::Debug for RawClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSdk {
    session_lifetime: Option<String>,
    max_sessions: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    connect_timeout: Option<String>,
    tls_timeout: Option<String>,
    request_timeout: Option<String>,
    body_timeout: Option<String>,
    http2: Option<bool>,
    http1_for_single_client: Option<bool>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_host: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    max_identities: Option<usize>,
    identity_idle: Option<String>,
    refresh_at: Option<f64>,
    refresh_jitter: Option<f64>,
    signature_lifetime: Option<String>,
    sign_in_timeout: Option<String>,
    retry_initial: Option<String>,
    retry_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    replay_body_bytes: Option<usize>,
    max_body_bytes: Option<usize>,
    header_read_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_connections: Option<usize>,
    max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    enabled: Option<bool>,
    mode: Option<String>,
    max_wait: Option<String>,
    scope: Option<String>,
    per_api_per_minute: Option<u32>,
    all_env_per_second: Option<u32>,
    per_api_window: Option<String>,
    all_env_window: Option<String>,
    burst: Option<u32>,
    safety_margin: Option<String>,
    #[serde(default)]
    operations: HashMap<String, RawOpQuota>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpQuota {
    per_api_per_minute: Option<u32>,
    all_env_per_second: Option<u32>,
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Option<String>,
    app_id: Option<String>,
    app_key_env: Option<String>,
    app_key_file: Option<PathBuf>,
    app_key: Option<SecretString>,
    corp_id: Option<String>,
    user_id: Option<String>,
}

impl fmt::Debug for RawApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawApp")
            .field("name", &self.name)
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

// === typed layer: what the gateway runs with ===

/// The validated configuration. `Debug` never shows a key.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// How often the config file and the files it names are checked for changes.
    pub reload_interval: Duration,
    /// Request worker threads, each running its connections start to finish.
    pub workers: usize,
    pub upstream: UpstreamConfig,
    pub token: TokenConfig,
    pub limits: LimitsConfig,
    pub quota: QuotaConfig,
    pub apps: Vec<AppConfig>,
    /// Who may use the gateway. Empty: anyone who can reach the (loopback) listener.
    pub clients: Vec<ClientConfig>,
    pub allow_unauthenticated: bool,
    /// TLS on the proxy listener (the SDKs sign in only over HTTPS).
    pub tls: Option<TlsConfig>,
    pub sdk: SdkConfig,
    /// Shared limits and tokens on Redis; `None`: single-instance mode.
    pub cluster: Option<ClusterConfig>,
    pub log: LogConfig,
    /// Things worth a warning at start (an inline key, ...), logged once telemetry is up.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// `https://host[:port]`, no path.
    pub url: http::Uri,
    pub ca_file: Option<PathBuf>,
    /// Extra trusted roots: `ca_file`'s certificates (tests and the demo add their own).
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub connect_timeout: Duration,
    pub tls_timeout: Duration,
    pub request_timeout: Duration,
    /// Longest silence while the upstream streams a response body.
    pub body_timeout: Duration,
    /// Offer HTTP/2 in ALPN (used when the upstream accepts it); HTTP/1.1 keep-alive otherwise.
    pub http2: bool,
    /// With `http2`: while a worker serves a single HTTP/1.x client connection, which sends one
    /// request at a time, its requests go over HTTP/1.1 keep-alive, which costs both ends less
    /// per request than an HTTP/2 stream when there is nothing to multiplex.
    pub http1_for_single_client: bool,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Most token keys (app, user) held at once; idle ones beyond the default identities are
    /// dropped first.
    pub max_identities: usize,
    /// A non-default identity unused this long loses its token.
    pub identity_idle: Duration,
    /// Fraction of a token's lifetime after which it is refreshed in the background.
    pub refresh_at: f64,
    /// Random share of the lifetime subtracted from `refresh_at`, so keys do not refresh in step.
    pub refresh_jitter: f64,
    /// How long an appauth signature stays valid (`expireTime` = now + this).
    pub signature_lifetime: Duration,
    pub sign_in_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Request bodies up to this size are buffered so a request can be replayed.
    pub replay_body_bytes: usize,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Longest wait for a request's headers, and so for an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Most bytes of request headers (431 beyond).
    pub max_header_bytes: usize,
    /// Most request header fields (431 beyond).
    pub max_headers: usize,
    /// Most open client connections; more get 503 and are closed.
    pub max_connections: usize,
    /// Most requests handled at once; more get 503 at once.
    pub max_concurrent_requests: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Wait (up to `max_wait`) for a slot.
    Pace,
    /// Refuse at once when the limiter says no.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
    /// One bucket per operation and app.
    App,
    /// One bucket per operation, app and user.
    User,
    /// One bucket per operation for the whole gateway.
    Gateway,
}

/// Quota settings with every operation's limits resolved and their GCRA parameters derived.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaConfig {
    pub enabled: bool,
    pub mode: QuotaMode,
    pub max_wait: Duration,
    pub scope: QuotaScope,
    pub safety_margin: Duration,
    pub burst: NonZeroU32,
    pub per_api_per_minute: NonZeroU32,
    pub all_env_per_second: NonZeroU32,
    pub per_api_window: Duration,
    pub all_env_window: Duration,
    /// Indexed by operation: its limits, shortest window first.
    resolved: Vec<Vec<(LimitSpec, GcraParams)>>,
    overrides: Vec<(String, [Option<u32>; 3])>,
}

impl QuotaConfig {
    /// The limits covering `op`, shortest window first.
    pub fn limits_for(&self, op: OperationId) -> Vec<(LimitSpec, GcraParams)> {
        self.resolved.get(op.index()).cloned().unwrap_or_default()
    }

    /// The longest window of any limit: buckets idle this long hold no state worth keeping.
    pub fn longest_window(&self) -> Duration {
        self.per_api_window.max(self.all_env_window)
    }

    /// A configuration for unit tests: every operation gets these two limits.
    #[cfg(test)]
    pub(crate) fn for_tests(
        per_api: u32,
        per_api_window: Duration,
        all_env: u32,
        all_env_window: Duration,
        burst: u32,
    ) -> QuotaConfig {
        let mut c = Checker::default();
        let raw = RawQuota {
            per_api_per_minute: Some(per_api),
            all_env_per_second: Some(all_env),
            burst: Some(burst),
            per_api_window: Some(humantime::format_duration(per_api_window).to_string()),
            all_env_window: Some(humantime::format_duration(all_env_window).to_string()),
            ..RawQuota::default()
        };
        let q = validate_quota(&mut c, raw);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        q
    }
}

/// A client of the gateway and what it may do.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: Arc<str>,
    /// SHA-256 of its bearer key.
    pub key_sha256: Option<[u8; 32]>,
    /// SDK-style credentials: the App ID and key the client signs in to meetgate with.
    pub sdk: Option<SdkCredential>,
    /// Apps it may act through, by name; the first is its default.
    pub apps: Vec<String>,
    /// Users it may act as; `None`: only each app's default user.
    pub users: Option<Patterns>,
    /// Operations it may call; `None`: all.
    pub operations: Option<Patterns>,
}

/// An SDK client's gateway credentials (never the upstream's).
#[derive(Debug, Clone)]
pub struct SdkCredential {
    pub app_id: String,
    pub app_key: SecretString,
    pub key_source: KeySource,
}

/// Exact names or glob patterns (`*`, `?`, `[...]`).
#[derive(Clone)]
pub struct Patterns {
    pub patterns: Vec<String>,
    set: globset::GlobSet,
}

impl Patterns {
    pub fn matches(&self, candidate: &str) -> bool {
        self.set.is_match(candidate)
    }
}

impl fmt::Debug for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.patterns).finish()
    }
}

impl PartialEq for Patterns {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

#[derive(Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
    pub key: Arc<rustls_pki_types::PrivateKeyDer<'static>>,
    pub handshake_timeout: Duration,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("key", &REDACTED)
            .finish()
    }
}

/// Several replicas sharing one quota and one token per identity through Redis.
#[derive(Clone)]
pub struct ClusterConfig {
    /// May hold a password: never printed.
    pub redis_url: SecretString,
    pub key_prefix: String,
    /// When Redis is unreachable each replica falls back to 1/max_replicas of every limit.
    pub max_replicas: NonZeroU32,
    /// Longest wait for one Redis command before falling back.
    pub timeout: Duration,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis_url", &redact_url(self.redis_url.expose_secret()))
            .field("key_prefix", &self.key_prefix)
            .field("max_replicas", &self.max_replicas)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `redis://user:password@host/0` -> `redis://[redacted]@host/0`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://{REDACTED}{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl PartialEq for ClusterConfig {
    fn eq(&self, other: &Self) -> bool {
        self.redis_url.expose_secret() == other.redis_url.expose_secret()
            && self.key_prefix == other.key_prefix
            && self.max_replicas == other.max_replicas
            && self.timeout == other.timeout
    }
}

#[derive(Debug, Clone)]
pub struct SdkConfig {
    /// Lifetime of the session tokens meetgate issues to SDK clients.
    pub session_lifetime: Duration,
    pub max_sessions: usize,
}

impl AppConfig {
    /// Whether `other` signs in exactly as this app does (same id, corp and key).
    pub fn same_credentials(&self, other: &AppConfig) -> bool {
        self.app_id == other.app_id
            && self.corp_id == other.corp_id
            && self.app_key.expose_secret() == other.app_key.expose_secret()
    }
}

/// One App ID credential.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    pub app_id: String,
    pub app_key: SecretString,
    pub key_source: KeySource,
    /// `Some` for SP (multi-tenant) apps: the 5-field signature.
    pub corp_id: Option<String>,
    /// Default upstream user; empty is the corp admin.
    pub user_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(PathBuf),
    Inline,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

// === errors ===

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub value: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.key, self.message)
        } else {
            write!(f, "{} = {}: {}", self.key, self.value, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value had the wrong type.
    #[error("{0}")]
    Load(String),
    /// Every problem validation found, in file order.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Load(msg) => vec![msg.clone()],
            ConfigError::Invalid(p) => p.iter().map(ToString::to_string).collect(),
        }
    }
}

// === loading ===

/// Loads `path` with environment overrides taken from `env` (the process environment in
/// production, a map in tests), and validates it.
pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let file = config::File::from(path).format(config::FileFormat::Toml);
    build(file, env)
}

/// Same as [`load`] for a configuration held in a string.
pub fn load_str(toml: &str, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    build(config::File::from_str(toml, config::FileFormat::Toml), env)
}

fn build<S>(file: S, env: &HashMap<String, String>) -> Result<Config, ConfigError>
where
    S: config::Source + Send + Sync + 'static,
{
    let overrides: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let raw: RawConfig = config::Config::builder()
        .add_source(file)
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    validate(raw, env)
}

/// Collects problems instead of stopping at the first.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(
        &mut self,
        key: impl Into<String>,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            value: value.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, raw: Option<&str>, default: &str) -> Duration {
        let text = raw.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.problem(key, quoted(text), "must be longer than zero");
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    key,
                    quoted(text),
                    format!("not a duration ({e}); e.g. \"3s\", \"500ms\""),
                );
                Duration::from_secs(1)
            }
        }
    }

    fn addr(&mut self, key: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let text = raw.unwrap_or(default);
        text.parse().unwrap_or_else(|_| {
            self.problem(
                key,
                quoted(text),
                "not an IP address and port, e.g. \"127.0.0.1:8080\"",
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn fraction(&mut self, key: &str, raw: Option<f64>, default: f64, lo: f64, hi: f64) -> f64 {
        let v = raw.unwrap_or(default);
        if !(lo..=hi).contains(&v) || v.is_nan() {
            self.problem(key, v, format!("must be between {lo} and {hi}"));
            return default;
        }
        v
    }
}

/// App and client names appear in logs, metrics labels and Redis keys: keep them plain.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn validate(raw: RawConfig, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let mut c = Checker::default();
    let mut warnings = Vec::new();

    let listen = c.addr("listen", raw.listen.as_deref(), "127.0.0.1:8080");
    let admin_listen = c.addr(
        "admin_listen",
        raw.admin_listen.as_deref(),
        "127.0.0.1:9090",
    );
    if listen == admin_listen && listen.port() != 0 {
        c.problem(
            "admin_listen",
            quoted(&admin_listen.to_string()),
            "must differ from `listen`",
        );
    }
    let shutdown_grace = c.duration("shutdown_grace", raw.shutdown_grace.as_deref(), "10s");
    let reload_interval = c.duration("reload_interval", raw.reload_interval.as_deref(), "5s");
    let workers = match raw.workers {
        Some(0) => {
            c.problem(
                "workers",
                0,
                "must be at least 1 (leave it out for one per CPU)",
            );
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    };

    let upstream = validate_upstream(&mut c, raw.upstream);

    let t = raw.token;
    let token = TokenConfig {
        max_identities: t.max_identities.unwrap_or(10_000).max(1),
        identity_idle: c.duration("token.identity_idle", t.identity_idle.as_deref(), "30m"),
        refresh_at: c.fraction("token.refresh_at", t.refresh_at, 0.8, 0.1, 0.95),
        refresh_jitter: c.fraction("token.refresh_jitter", t.refresh_jitter, 0.05, 0.0, 0.2),
        signature_lifetime: c.duration(
            "token.signature_lifetime",
            t.signature_lifetime.as_deref(),
            "10m",
        ),
        sign_in_timeout: c.duration("token.sign_in_timeout", t.sign_in_timeout.as_deref(), "10s"),
        retry_initial: c.duration("token.retry_initial", t.retry_initial.as_deref(), "500ms"),
        retry_max: c.duration("token.retry_max", t.retry_max.as_deref(), "60s"),
    };
    if token.retry_initial > token.retry_max {
        c.problem(
            "token.retry_initial",
            humantime::format_duration(token.retry_initial),
            "must not exceed token.retry_max",
        );
    }

    let replay_body_bytes = raw.limits.replay_body_bytes.unwrap_or(1 << 20);
    if replay_body_bytes > 64 << 20 {
        c.problem(
            "limits.replay_body_bytes",
            replay_body_bytes,
            "must be at most 67108864 (64 MiB): each buffered request holds this much memory",
        );
    }
    let l = raw.limits;
    let max_body_bytes = l.max_body_bytes.unwrap_or(16 << 20);
    if max_body_bytes == 0 {
        c.problem("limits.max_body_bytes", 0, "must be at least 1");
    }
    let max_header_bytes = l.max_header_bytes.unwrap_or(16 * 1024);
    if !(8192..=1 << 20).contains(&max_header_bytes) {
        c.problem(
            "limits.max_header_bytes",
            max_header_bytes,
            "must be between 8192 and 1048576",
        );
    }
    let max_headers = l.max_headers.unwrap_or(100);
    if !(8..=1000).contains(&max_headers) {
        c.problem(
            "limits.max_headers",
            max_headers,
            "must be between 8 and 1000",
        );
    }
    let positive = |c: &mut Checker, key: &str, v: Option<usize>, default: usize| {
        let v = v.unwrap_or(default);
        if v == 0 {
            c.problem(key, 0, "must be at least 1");
        }
        v.max(1)
    };
    let limits = LimitsConfig {
        replay_body_bytes,
        max_body_bytes,
        header_read_timeout: c.duration(
            "limits.header_read_timeout",
            l.header_read_timeout.as_deref(),
            "10s",
        ),
        max_header_bytes,
        max_headers,
        max_connections: positive(&mut c, "limits.max_connections", l.max_connections, 4096),
        max_concurrent_requests: positive(
            &mut c,
            "limits.max_concurrent_requests",
            l.max_concurrent_requests,
            1024,
        ),
    };
    let quota = validate_quota(&mut c, raw.quota);

    if raw.apps.is_empty() {
        c.problem("apps", "", "at least one [[apps]] entry is required");
    }
    let mut apps: Vec<AppConfig> = Vec::with_capacity(raw.apps.len());
    for (i, app) in raw.apps.into_iter().enumerate() {
        if let Some(a) = validate_app(&mut c, &mut warnings, i, app, env) {
            if apps.iter().any(|x| x.name == a.name) {
                c.problem(
                    format!("apps[{i}].name"),
                    quoted(&a.name),
                    "duplicate app name",
                );
            }
            apps.push(a);
        }
    }

    let clients = validate_clients(&mut c, &mut warnings, raw.clients, &apps, env);
    let allow_unauthenticated = raw.allow_unauthenticated.unwrap_or(false);
    if clients.is_empty() && !listen.ip().is_loopback() {
        if allow_unauthenticated {
            warnings.push(format!(
                "listen = {listen} is not loopback and no [[clients]] are configured: anyone who reaches it acts with the gateway's credentials (allow_unauthenticated = true)"
            ));
        } else {
            c.problem(
                "listen",
                quoted(&listen.to_string()),
                "not a loopback address and no [[clients]] configured: add clients, listen on 127.0.0.1, or set allow_unauthenticated = true",
            );
        }
    }
    let tls = raw.tls.map(|t| validate_tls(&mut c, t));
    let cluster = raw.cluster.and_then(|cl| validate_cluster(&mut c, cl));
    let sdk = SdkConfig {
        session_lifetime: c.duration(
            "sdk.session_lifetime",
            raw.sdk.session_lifetime.as_deref(),
            "12h",
        ),
        max_sessions: raw.sdk.max_sessions.unwrap_or(100_000).max(1),
    };

    let format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            c.problem("log.format", quoted(other), "must be \"text\" or \"json\"");
            LogFormat::Text
        }
    };
    let level = raw.log.level.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
        c.problem(
            "log.level",
            quoted(&level),
            format!("not a log filter ({e}); e.g. \"info\""),
        );
    }

    if !c.problems.is_empty() {
        return Err(ConfigError::Invalid(c.problems));
    }
    Ok(Config {
        listen,
        admin_listen,
        shutdown_grace,
        reload_interval,
        workers,
        upstream,
        token,
        limits,
        quota,
        apps,
        clients,
        allow_unauthenticated,
        tls: tls.flatten(),
        sdk,
        cluster,
        log: LogConfig { format, level },
        warnings,
    })
}

fn non_zero(c: &mut Checker, key: &str, raw: Option<u32>, default: u32) -> NonZeroU32 {
    let v = raw.unwrap_or(default);
    NonZeroU32::new(v).unwrap_or_else(|| {
        c.problem(key, v, "must be at least 1");
        NonZeroU32::MIN
    })
}

fn validate_quota(c: &mut Checker, q: RawQuota) -> QuotaConfig {
    let mode = match q.mode.as_deref().unwrap_or("pace") {
        "pace" => QuotaMode::Pace,
        "reject" => QuotaMode::Reject,
        other => {
            c.problem(
                "quota.mode",
                quoted(other),
                "must be \"pace\" or \"reject\"",
            );
            QuotaMode::Pace
        }
    };
    let scope = match q.scope.as_deref().unwrap_or("app") {
        "app" => QuotaScope::App,
        "user" => QuotaScope::User,
        "gateway" => QuotaScope::Gateway,
        other => {
            c.problem(
                "quota.scope",
                quoted(other),
                "must be \"app\", \"user\" or \"gateway\"",
            );
            QuotaScope::App
        }
    };
    let max_wait = c.duration("quota.max_wait", q.max_wait.as_deref(), "5s");
    let safety_margin = match q.safety_margin.as_deref() {
        // Zero is a legitimate margin, unlike a zero timeout.
        Some("0") | Some("0s") | Some("0ms") => Duration::ZERO,
        other => c.duration("quota.safety_margin", other, "100ms"),
    };
    let per_api_window = c.duration("quota.per_api_window", q.per_api_window.as_deref(), "1m");
    let all_env_window = c.duration("quota.all_env_window", q.all_env_window.as_deref(), "1s");
    let per_api = non_zero(c, "quota.per_api_per_minute", q.per_api_per_minute, 100);
    let all_env = non_zero(c, "quota.all_env_per_second", q.all_env_per_second, 200);
    let burst = non_zero(c, "quota.burst", q.burst, 10);

    let table = OperationTable::global();
    let mut overrides: Vec<(String, [Option<u32>; 3])> = Vec::new();
    let mut per_op: HashMap<OperationId, &RawOpQuota> = HashMap::new();
    let mut names: Vec<&String> = q.operations.keys().collect();
    names.sort();
    for name in names {
        let o = &q.operations[name];
        match table.by_name(name) {
            Some(id) => {
                per_op.insert(id, o);
                overrides.push((
                    name.clone(),
                    [o.per_api_per_minute, o.all_env_per_second, o.burst],
                ));
            }
            None => c.problem(
                format!("quota.operations.{name}"),
                "",
                "no such operation (see src/data/meeting-operations.tsv)",
            ),
        }
    }

    let mut default_ok = true;
    let mut resolved = Vec::with_capacity(table.len());
    for (id, op) in table.all() {
        let o = per_op.get(&id);
        let prefix = if o.is_some() {
            format!("quota.operations.{}.", op.name)
        } else {
            "quota.".to_owned()
        };
        let n_api = match o.and_then(|o| o.per_api_per_minute) {
            Some(v) => non_zero(c, &format!("{prefix}per_api_per_minute"), Some(v), 1),
            None => per_api,
        };
        let n_env = match o.and_then(|o| o.all_env_per_second) {
            Some(v) => non_zero(c, &format!("{prefix}all_env_per_second"), Some(v), 1),
            None => all_env,
        };
        let b = match o.and_then(|o| o.burst) {
            Some(v) => non_zero(c, &format!("{prefix}burst"), Some(v), 1),
            None => burst,
        };
        // Report a problem with the defaults once, not for each of the 200 operations.
        let report = o.is_some() || default_ok;
        let mut limits = Vec::with_capacity(2);
        for (kind, n, window, key) in [
            (
                LimitKind::AllEnv,
                n_env,
                all_env_window,
                "all_env_per_second",
            ),
            (
                LimitKind::PerApi,
                n_api,
                per_api_window,
                "per_api_per_minute",
            ),
        ] {
            match derive(n, window, safety_margin, b) {
                Ok(params) => limits.push((
                    LimitSpec {
                        kind,
                        limit: n,
                        window,
                    },
                    params,
                )),
                Err(msg) => {
                    if report {
                        c.problem(
                            format!("{prefix}burst"),
                            b,
                            format!("with {prefix}{key} = {n}: {msg}"),
                        );
                    }
                    if o.is_none() {
                        default_ok = false;
                    }
                }
            }
        }
        limits.sort_by_key(|(spec, _)| spec.window);
        resolved.push(limits);
    }
    QuotaConfig {
        enabled: q.enabled.unwrap_or(true),
        mode,
        max_wait,
        scope,
        safety_margin,
        burst,
        per_api_per_minute: per_api,
        all_env_per_second: all_env,
        per_api_window,
        all_env_window,
        resolved,
        overrides,
    }
}

fn patterns(c: &mut Checker, key: &str, list: Vec<String>) -> Option<Patterns> {
    let mut builder = globset::GlobSetBuilder::new();
    for (i, p) in list.iter().enumerate() {
        match globset::GlobBuilder::new(p)
            .literal_separator(false)
            .build()
        {
            Ok(g) => {
                builder.add(g);
            }
            Err(e) => c.problem(
                format!("{key}[{i}]"),
                quoted(p),
                format!("not a glob pattern ({e})"),
            ),
        }
    }
    match builder.build() {
        Ok(set) => Some(Patterns {
            patterns: list,
            set,
        }),
        Err(e) => {
            c.problem(key, "", format!("patterns do not compile ({e})"));
            None
        }
    }
}

/// Reads a secret from exactly one of an environment variable, a file or an inline value.
fn secret(
    c: &mut Checker,
    warnings: &mut Vec<String>,
    prefix: &str,
    env_var: Option<String>,
    file: Option<PathBuf>,
    inline: Option<SecretString>,
    env: &HashMap<String, String>,
) -> Option<(SecretString, KeySource)> {
    let key = |field: &str| format!("{prefix}.{field}");
    let count = [env_var.is_some(), file.is_some(), inline.is_some()]
        .iter()
        .filter(|s| **s)
        .count();
    if count != 1 {
        c.problem(
            key("app_key_env"),
            "",
            "set exactly one of app_key_env, app_key_file or app_key",
        );
        return None;
    }
    if let Some(var) = env_var {
        return match env.get(&var) {
            Some(v) if !v.is_empty() => Some((SecretString::from(v.clone()), KeySource::Env(var))),
            _ => {
                c.problem(
                    key("app_key_env"),
                    quoted(&var),
                    "environment variable is unset or empty",
                );
                None
            }
        };
    }
    if let Some(path) = file {
        return match std::fs::read_to_string(&path) {
            Ok(text) => {
                // Secrets mounted from files usually end with a newline that is not part of the key.
                let trimmed = text.strip_suffix('\n').unwrap_or(&text);
                let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
                if trimmed.is_empty() {
                    c.problem(
                        key("app_key_file"),
                        quoted(&path.display().to_string()),
                        "file is empty",
                    );
                    return None;
                }
                Some((
                    SecretString::from(trimmed.to_owned()),
                    KeySource::File(path),
                ))
            }
            Err(e) => {
                c.problem(
                    key("app_key_file"),
                    quoted(&path.display().to_string()),
                    format!("cannot be read ({})", e.kind()),
                );
                None
            }
        };
    }
    let inline = inline.unwrap_or_else(|| SecretString::from(String::new()));
    if inline.expose_secret().is_empty() {
        c.problem(key("app_key"), "", "is empty");
        return None;
    }
    warnings.push(format!(
        "{} holds the key inline; use app_key_env or app_key_file outside demos",
        key("app_key")
    ));
    Some((inline, KeySource::Inline))
}

fn validate_clients(
    c: &mut Checker,
    warnings: &mut Vec<String>,
    raw: Vec<RawClient>,
    apps: &[AppConfig],
    env: &HashMap<String, String>,
) -> Vec<ClientConfig> {
    let mut out: Vec<ClientConfig> = Vec::with_capacity(raw.len());
    for (i, rc) in raw.into_iter().enumerate() {
        let prefix = format!("clients[{i}]");
        let key = |field: &str| format!("{prefix}.{field}");
        let name = rc.name.unwrap_or_default();
        if !valid_name(&name) {
            c.problem(
                key("name"),
                quoted(&name),
                "required; use letters, digits, '-', '_' or '.'",
            );
        } else if out.iter().any(|o| *o.name == *name) {
            c.problem(key("name"), quoted(&name), "duplicate client name");
        }
        let key_sha256 = rc.key_sha256.as_deref().and_then(|h| {
            let mut out = [0u8; 32];
            match hex::decode_to_slice(h.trim(), &mut out) {
                Ok(()) => Some(out),
                Err(_) => {
                    c.problem(
                        key("key_sha256"),
                        "[not shown]",
                        "must be 64 hex characters (the SHA-256 of the key)",
                    );
                    None
                }
            }
        });
        let wants_sdk = rc.app_id.is_some()
            || rc.app_key_env.is_some()
            || rc.app_key_file.is_some()
            || rc.app_key.is_some();
        let sdk = if wants_sdk {
            let app_id = rc.app_id.clone().unwrap_or_default();
            if app_id.is_empty() {
                c.problem(
                    key("app_id"),
                    "",
                    "required with app_key_env, app_key_file or app_key",
                );
            }
            secret(
                c,
                warnings,
                &prefix,
                rc.app_key_env,
                rc.app_key_file,
                rc.app_key,
                env,
            )
            .map(|(app_key, key_source)| SdkCredential {
                app_id,
                app_key,
                key_source,
            })
        } else {
            None
        };
        if key_sha256.is_none() && !wants_sdk {
            c.problem(key("key_sha256"), "", "a client needs key_sha256, SDK credentials (app_id + app_key_env/app_key_file), or both");
        }
        if let Some(s) = &sdk {
            if out
                .iter()
                .any(|o| o.sdk.as_ref().is_some_and(|x| x.app_id == s.app_id))
            {
                c.problem(
                    key("app_id"),
                    quoted(&s.app_id),
                    "another client signs in with this app_id",
                );
            }
        }
        let client_apps = rc.apps.unwrap_or_else(|| {
            apps.first()
                .map(|a| vec![a.name.clone()])
                .unwrap_or_default()
        });
        if client_apps.is_empty() {
            c.problem(
                key("apps"),
                "[]",
                "a client must be allowed at least one app",
            );
        }
        for (j, a) in client_apps.iter().enumerate() {
            if !apps.iter().any(|x| &x.name == a) {
                c.problem(
                    format!("{prefix}.apps[{j}]"),
                    quoted(a),
                    "no [[apps]] entry has this name",
                );
            }
        }
        let users = rc.users.and_then(|u| patterns(c, &key("users"), u));
        let operations = rc
            .operations
            .and_then(|o| patterns(c, &key("operations"), o));
        out.push(ClientConfig {
            name: Arc::from(name),
            key_sha256,
            sdk,
            apps: client_apps,
            users,
            operations,
        });
    }
    out
}

fn validate_cluster(c: &mut Checker, cl: RawCluster) -> Option<ClusterConfig> {
    let timeout = c.duration("cluster.timeout", cl.timeout.as_deref(), "250ms");
    let max_replicas = non_zero(c, "cluster.max_replicas", cl.max_replicas, 10);
    let key_prefix = cl.key_prefix.unwrap_or_else(|| "meetgate:".to_owned());
    // Absent means single-instance mode.
    let url = cl.redis_url?;
    let text = url.expose_secret();
    if text.is_empty() {
        return None;
    }
    if let Err(e) = redis::Client::open(text) {
        c.problem(
            "cluster.redis_url",
            quoted(&redact_url(text)),
            format!("not a Redis URL ({e}); e.g. \"redis://127.0.0.1:6379/0\" or \"rediss://...\""),
        );
        return None;
    }
    Some(ClusterConfig {
        redis_url: url,
        key_prefix,
        max_replicas,
        timeout,
    })
}

fn validate_tls(c: &mut Checker, t: RawTls) -> Option<TlsConfig> {
    let handshake_timeout = c.duration(
        "tls.handshake_timeout",
        t.handshake_timeout.as_deref(),
        "10s",
    );
    let (Some(cert_file), Some(key_file)) = (t.cert_file, t.key_file) else {
        c.problem("tls", "", "needs both cert_file and key_file");
        return None;
    };
    let certs =
        match CertificateDer::pem_file_iter(&cert_file).map(|i| i.collect::<Result<Vec<_>, _>>()) {
            Ok(Ok(certs)) if !certs.is_empty() => certs,
            Ok(Ok(_)) => {
                c.problem(
                    "tls.cert_file",
                    quoted(&cert_file.display().to_string()),
                    "holds no PEM certificate",
                );
                return None;
            }
            Ok(Err(e)) | Err(e) => {
                c.problem(
                    "tls.cert_file",
                    quoted(&cert_file.display().to_string()),
                    format!("not a readable PEM certificate file ({e})"),
                );
                return None;
            }
        };
    let key = match rustls_pki_types::PrivateKeyDer::from_pem_file(&key_file) {
        Ok(k) => k,
        Err(e) => {
            c.problem(
                "tls.key_file",
                quoted(&key_file.display().to_string()),
                format!("not a readable PEM private key ({e})"),
            );
            return None;
        }
    };
    // Build the server configuration once here, so a key that does not match its certificate
    // is a configuration error, not a listener that fails every handshake.
    let check = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())
    });
    if let Err(e) = check {
        c.problem(
            "tls.key_file",
            quoted(&key_file.display().to_string()),
            format!("unusable with tls.cert_file ({e})"),
        );
        return None;
    }
    Some(TlsConfig {
        cert_file,
        key_file,
        certs,
        key: Arc::new(key),
        handshake_timeout,
    })
}

fn validate_upstream(c: &mut Checker, u: RawUpstream) -> UpstreamConfig {
    let text = u
        .url
        .unwrap_or_else(|| "https://api.meeting.huaweicloud.com".to_owned());
    let url = match text.parse::<http::Uri>() {
        Ok(uri)
            if uri.scheme_str() == Some("https")
                && uri.host().is_some_and(|h| !h.is_empty())
                && matches!(uri.path(), "" | "/")
                && uri.query().is_none() =>
        {
            // Normalise to scheme and authority only.
            http::Uri::builder()
                .scheme("https")
                .authority(uri.authority().map_or("", |a| a.as_str()))
                .path_and_query("/")
                .build()
                .unwrap_or(uri)
        }
        _ => {
            c.problem(
                "upstream.url",
                quoted(&text),
                "must be an https URL with a host and no path, e.g. \"https://api.meeting.huaweicloud.com\"",
            );
            http::Uri::from_static("https://invalid.invalid/")
        }
    };
    let mut extra_roots = Vec::new();
    if let Some(path) = &u.ca_file {
        match CertificateDer::pem_file_iter(path) {
            Ok(iter) => match iter.collect::<Result<Vec<_>, _>>() {
                Ok(certs) if !certs.is_empty() => extra_roots = certs,
                Ok(_) => c.problem(
                    "upstream.ca_file",
                    quoted(&path.display().to_string()),
                    "holds no PEM certificate",
                ),
                Err(e) => c.problem(
                    "upstream.ca_file",
                    quoted(&path.display().to_string()),
                    format!("not a PEM certificate file ({e})"),
                ),
            },
            Err(e) => c.problem(
                "upstream.ca_file",
                quoted(&path.display().to_string()),
                format!("cannot be read ({e})"),
            ),
        }
    }
    UpstreamConfig {
        url,
        ca_file: u.ca_file,
        extra_roots,
        connect_timeout: c.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            "3s",
        ),
        tls_timeout: c.duration("upstream.tls_timeout", u.tls_timeout.as_deref(), "5s"),
        request_timeout: c.duration(
            "upstream.request_timeout",
            u.request_timeout.as_deref(),
            "30s",
        ),
        body_timeout: c.duration("upstream.body_timeout", u.body_timeout.as_deref(), "30s"),
        http2: u.http2.unwrap_or(true),
        http1_for_single_client: u.http1_for_single_client.unwrap_or(true),
        pool_idle_timeout: c.duration(
            "upstream.pool_idle_timeout",
            u.pool_idle_timeout.as_deref(),
            "90s",
        ),
        pool_max_idle_per_host: u.pool_max_idle_per_host.unwrap_or(64),
    }
}

fn validate_app(
    c: &mut Checker,
    warnings: &mut Vec<String>,
    i: usize,
    app: RawApp,
    env: &HashMap<String, String>,
) -> Option<AppConfig> {
    let key = |field: &str| format!("apps[{i}].{field}");
    let name = app.name.unwrap_or_else(|| {
        if i == 0 {
            "default".to_owned()
        } else {
            format!("app{i}")
        }
    });
    if !valid_name(&name) {
        c.problem(
            key("name"),
            quoted(&name),
            "use letters, digits, '-', '_' or '.'",
        );
    }
    let app_id = match app.app_id {
        Some(id) if !id.trim().is_empty() => id,
        other => {
            c.problem(
                key("app_id"),
                quoted(other.as_deref().unwrap_or("")),
                "is required",
            );
            String::new()
        }
    };
    let (app_key, key_source) = secret(
        c,
        warnings,
        &format!("apps[{i}]"),
        app.app_key_env,
        app.app_key_file,
        app.app_key,
        env,
    )?;
    Some(AppConfig {
        name,
        app_id,
        app_key,
        key_source,
        corp_id: app.corp_id,
        user_id: app.user_id.unwrap_or_default(),
    })
}

// === printing ===

#[derive(Serialize)]
struct Printed<'a> {
    listen: String,
    admin_listen: String,
    shutdown_grace: String,
    reload_interval: String,
    workers: usize,
    allow_unauthenticated: bool,
    upstream: PrintedUpstream,
    token: PrintedToken,
    limits: PrintedLimits,
    quota: PrintedQuota,
    apps: Vec<PrintedApp<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clients: Vec<PrintedClient<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<PrintedTls>,
    sdk: PrintedSdk,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<PrintedCluster>,
    log: PrintedLog<'a>,
}

#[derive(Serialize)]
struct PrintedClient<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_sha256: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_key_env: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_key: Option<&'static str>,
    apps: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    users: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    operations: Option<&'a [String]>,
}

#[derive(Serialize)]
struct PrintedTls {
    cert_file: String,
    key_file: String,
    handshake_timeout: String,
}

#[derive(Serialize)]
struct PrintedSdk {
    session_lifetime: String,
    max_sessions: usize,
}

#[derive(Serialize)]
struct PrintedCluster {
    redis_url: String,
    key_prefix: String,
    max_replicas: u32,
    timeout: String,
}

#[derive(Serialize)]
struct PrintedUpstream {
    url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    connect_timeout: String,
    tls_timeout: String,
    request_timeout: String,
    body_timeout: String,
    http2: bool,
    http1_for_single_client: bool,
    pool_idle_timeout: String,
    pool_max_idle_per_host: usize,
}

#[derive(Serialize)]
struct PrintedToken {
    max_identities: usize,
    identity_idle: String,
    refresh_at: f64,
    refresh_jitter: f64,
    signature_lifetime: String,
    sign_in_timeout: String,
    retry_initial: String,
    retry_max: String,
}

#[derive(Serialize)]
struct PrintedLimits {
    replay_body_bytes: usize,
    max_body_bytes: usize,
    header_read_timeout: String,
    max_header_bytes: usize,
    max_headers: usize,
    max_connections: usize,
    max_concurrent_requests: usize,
}

#[derive(Serialize)]
struct PrintedQuota {
    enabled: bool,
    mode: &'static str,
    max_wait: String,
    scope: &'static str,
    per_api_per_minute: u32,
    all_env_per_second: u32,
    per_api_window: String,
    all_env_window: String,
    burst: u32,
    safety_margin: String,
    operations: std::collections::BTreeMap<String, PrintedOpQuota>,
}

#[derive(Serialize)]
struct PrintedOpQuota {
    #[serde(skip_serializing_if = "Option::is_none")]
    per_api_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    all_env_per_second: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    burst: Option<u32>,
}

#[derive(Serialize)]
struct PrintedApp<'a> {
    name: &'a str,
    app_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_key_env: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_key_file: Option<String>,
    app_key: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    corp_id: Option<&'a str>,
    user_id: &'a str,
}

#[derive(Serialize)]
struct PrintedLog<'a> {
    format: LogFormat,
    level: &'a str,
}

/// The redaction marker used wherever a secret would be shown.
pub const REDACTED: &str = "[redacted]";

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Config {
    /// The effective configuration as TOML, with every secret replaced by `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        let u = &self.upstream;
        let t = &self.token;
        let printed = Printed {
            listen: self.listen.to_string(),
            admin_listen: self.admin_listen.to_string(),
            shutdown_grace: dur(self.shutdown_grace),
            reload_interval: dur(self.reload_interval),
            workers: self.workers,
            allow_unauthenticated: self.allow_unauthenticated,
            upstream: PrintedUpstream {
                url: u.url.to_string().trim_end_matches('/').to_owned(),
                ca_file: u.ca_file.as_ref().map(|p| p.display().to_string()),
                connect_timeout: dur(u.connect_timeout),
                tls_timeout: dur(u.tls_timeout),
                request_timeout: dur(u.request_timeout),
                body_timeout: dur(u.body_timeout),
                http2: u.http2,
                http1_for_single_client: u.http1_for_single_client,
                pool_idle_timeout: dur(u.pool_idle_timeout),
                pool_max_idle_per_host: u.pool_max_idle_per_host,
            },
            token: PrintedToken {
                max_identities: t.max_identities,
                identity_idle: dur(t.identity_idle),
                refresh_at: t.refresh_at,
                refresh_jitter: t.refresh_jitter,
                signature_lifetime: dur(t.signature_lifetime),
                sign_in_timeout: dur(t.sign_in_timeout),
                retry_initial: dur(t.retry_initial),
                retry_max: dur(t.retry_max),
            },
            limits: PrintedLimits {
                replay_body_bytes: self.limits.replay_body_bytes,
                max_body_bytes: self.limits.max_body_bytes,
                header_read_timeout: dur(self.limits.header_read_timeout),
                max_header_bytes: self.limits.max_header_bytes,
                max_headers: self.limits.max_headers,
                max_connections: self.limits.max_connections,
                max_concurrent_requests: self.limits.max_concurrent_requests,
            },
            quota: PrintedQuota {
                enabled: self.quota.enabled,
                mode: match self.quota.mode {
                    QuotaMode::Pace => "pace",
                    QuotaMode::Reject => "reject",
                },
                max_wait: dur(self.quota.max_wait),
                scope: match self.quota.scope {
                    QuotaScope::App => "app",
                    QuotaScope::User => "user",
                    QuotaScope::Gateway => "gateway",
                },
                per_api_per_minute: self.quota.per_api_per_minute.get(),
                all_env_per_second: self.quota.all_env_per_second.get(),
                per_api_window: dur(self.quota.per_api_window),
                all_env_window: dur(self.quota.all_env_window),
                burst: self.quota.burst.get(),
                safety_margin: dur(self.quota.safety_margin),
                operations: self
                    .quota
                    .overrides
                    .iter()
                    .map(|(name, [a, e, b])| {
                        (
                            name.clone(),
                            PrintedOpQuota {
                                per_api_per_minute: *a,
                                all_env_per_second: *e,
                                burst: *b,
                            },
                        )
                    })
                    .collect(),
            },
            apps: self
                .apps
                .iter()
                .map(|a| PrintedApp {
                    name: &a.name,
                    app_id: &a.app_id,
                    app_key_env: match &a.key_source {
                        KeySource::Env(v) => Some(v),
                        _ => None,
                    },
                    app_key_file: match &a.key_source {
                        KeySource::File(p) => Some(p.display().to_string()),
                        _ => None,
                    },
                    app_key: REDACTED,
                    corp_id: a.corp_id.as_deref(),
                    user_id: &a.user_id,
                })
                .collect(),
            clients: self
                .clients
                .iter()
                .map(|c| {
                    let source = c.sdk.as_ref().map(|s| &s.key_source);
                    PrintedClient {
                        name: &c.name,
                        // A key's digest still identifies it: not printed either.
                        key_sha256: c.key_sha256.map(|_| REDACTED),
                        app_id: c.sdk.as_ref().map(|s| s.app_id.as_str()),
                        app_key_env: match source {
                            Some(KeySource::Env(v)) => Some(v.as_str()),
                            _ => None,
                        },
                        app_key_file: match source {
                            Some(KeySource::File(p)) => Some(p.display().to_string()),
                            _ => None,
                        },
                        app_key: c.sdk.as_ref().map(|_| REDACTED),
                        apps: &c.apps,
                        users: c.users.as_ref().map(|p| p.patterns.as_slice()),
                        operations: c.operations.as_ref().map(|p| p.patterns.as_slice()),
                    }
                })
                .collect(),
            tls: self.tls.as_ref().map(|t| PrintedTls {
                cert_file: t.cert_file.display().to_string(),
                key_file: t.key_file.display().to_string(),
                handshake_timeout: dur(t.handshake_timeout),
            }),
            sdk: PrintedSdk {
                session_lifetime: dur(self.sdk.session_lifetime),
                max_sessions: self.sdk.max_sessions,
            },
            cluster: self.cluster.as_ref().map(|cl| PrintedCluster {
                redis_url: redact_url(cl.redis_url.expose_secret()),
                key_prefix: cl.key_prefix.clone(),
                max_replicas: cl.max_replicas.get(),
                timeout: dur(cl.timeout),
            }),
            log: PrintedLog {
                format: self.log.format,
                level: &self.log.level,
            },
        };
        toml::to_string(&printed).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MINIMAL: &str = r#"
        [[apps]]
        app_id = "app-1"
        app_key_env = "KEY1"
    "#;

    #[test]
    fn defaults_and_env_key() {
        let c = load_str(MINIMAL, &env(&[("KEY1", "s3cret-key")])).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(c.upstream.url.host(), Some("api.meeting.huaweicloud.com"));
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.apps[0].name, "default");
        assert_eq!(c.apps[0].app_key.expose_secret(), "s3cret-key");
        assert_eq!(c.limits.replay_body_bytes, 1 << 20);
    }

    #[test]
    fn env_overrides_file_values() {
        let c = load_str(
            MINIMAL,
            &env(&[
                ("KEY1", "k"),
                ("MEETGATE__UPSTREAM__URL", "https://127.0.0.1:8443"),
                ("MEETGATE__UPSTREAM__CONNECT_TIMEOUT", "250ms"),
                ("MEETGATE__LOG__FORMAT", "json"),
                ("MEETGATE__LIMITS__REPLAY_BODY_BYTES", "4096"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.upstream.url.port_u16(), Some(8443));
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.limits.replay_body_bytes, 4096);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = load_str(
            &format!("{MINIMAL}\n[upstream]\nurll = \"x\"\n"),
            &env(&[("KEY1", "k")]),
        )
        .expect_err("unknown key");
        assert!(e.to_string().contains("urll"), "{e}");
        let e = load_str(&format!("lisen = \"x\"\n{MINIMAL}"), &env(&[("KEY1", "k")]))
            .expect_err("unknown key");
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn every_problem_names_its_key_and_value() {
        let text = r#"
            listen = "localhost"
            [upstream]
            url = "http://plain.example"
            connect_timeout = "soon"
            [log]
            format = "xml"
            [[apps]]
            app_id = "a"
            app_key_env = "MISSING"
        "#;
        let e = load_str(text, &env(&[])).expect_err("invalid");
        let problems = e.problems();
        let has = |k: &str, v: &str| {
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{k} = {v}")))
        };
        assert!(has("listen", "\"localhost\""), "{problems:?}");
        assert!(
            has("upstream.url", "\"http://plain.example\""),
            "{problems:?}"
        );
        assert!(has("upstream.connect_timeout", "\"soon\""), "{problems:?}");
        assert!(has("log.format", "\"xml\""), "{problems:?}");
        assert!(has("apps[0].app_key_env", "\"MISSING\""), "{problems:?}");
        assert_eq!(problems.len(), 5, "{problems:?}");
    }

    #[test]
    fn key_file_trailing_newline_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "file-key\n").expect("write");
        let text = format!(
            "[[apps]]\napp_id = \"a\"\napp_key_file = \"{}\"\n",
            path.display()
        );
        let c = load_str(&text, &env(&[])).expect("valid");
        assert_eq!(c.apps[0].app_key.expose_secret(), "file-key");
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_print() {
        let text = "[[apps]]\napp_id = \"a\"\napp_key = \"inline-secret-123\"\n";
        let c = load_str(text, &env(&[])).expect("valid");
        assert_eq!(c.warnings.len(), 1);
        assert!(!format!("{c:?}").contains("inline-secret-123"));
        let printed = c.to_redacted_toml();
        assert!(!printed.contains("inline-secret-123"));
        assert!(printed.contains(REDACTED), "{printed}");
        // What is printed loads again (the key then comes from elsewhere).
        assert!(printed.contains("app_id = \"a\""));
    }

    #[test]
    fn quota_settings_are_validated_with_their_keys() {
        let text = format!(
            "{MINIMAL}\n[quota]\nburst = 150\nmode = \"sometimes\"\n[quota.operations.start_meeting]\nper_api_per_minute = 0\n[quota.operations.no_such_op]\nburst = 1\n"
        );
        let problems = load_str(&text, &env(&[("KEY1", "k")]))
            .expect_err("invalid")
            .problems();
        let has = |prefix: &str| problems.iter().any(|p| p.starts_with(prefix));
        assert!(has("quota.burst = 150"), "{problems:?}");
        assert!(has("quota.mode = \"sometimes\""), "{problems:?}");
        assert!(
            has("quota.operations.start_meeting.per_api_per_minute = 0"),
            "{problems:?}"
        );
        assert!(has("quota.operations.no_such_op"), "{problems:?}");
        // The default burst problem is reported once, not for every operation.
        assert_eq!(
            problems
                .iter()
                .filter(|p| p.starts_with("quota.burst"))
                .count(),
            1
        );
    }

    #[test]
    fn quota_overrides_apply_to_their_operation_only() {
        let text =
            format!("{MINIMAL}\n[quota.operations.start_meeting]\nper_api_per_minute = 50\n");
        let c = load_str(&text, &env(&[("KEY1", "k")])).expect("valid");
        let table = OperationTable::global();
        let start = table.by_name("start_meeting").expect("op");
        let other = table.by_name("stop_meeting").expect("op");
        let limit = |op| {
            c.quota
                .limits_for(op)
                .iter()
                .find(|(s, _)| s.kind == LimitKind::PerApi)
                .map(|(s, _)| s.limit.get())
        };
        assert_eq!(limit(start), Some(50));
        assert_eq!(limit(other), Some(100));
        // Short window first.
        assert_eq!(c.quota.limits_for(start)[0].0.kind, LimitKind::AllEnv);
        assert!(c
            .to_redacted_toml()
            .contains("[quota.operations.start_meeting]"));
    }

    #[test]
    fn the_printed_config_loads_again_and_shows_every_section_without_secrets() {
        let text = r#"
            [[apps]]
            app_id = "a"
            app_key_env = "K"
            [[clients]]
            name = "c1"
            key_sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
            users = ["alice*"]
            [[clients]]
            name = "c2"
            app_id = "sdk-app"
            app_key_env = "CK"
            [cluster]
            redis_url = "redis://user:hunter2@127.0.0.1:6379/0"
        "#;
        let env = env(&[("K", "app-secret"), ("CK", "client-secret")]);
        let c = load_str(text, &env).expect("valid");
        let printed = c.to_redacted_toml();
        for secret in [
            "app-secret",
            "client-secret",
            "hunter2",
            "0000000000000000000000000000000000000000000000000000000000000001",
        ] {
            assert!(!printed.contains(secret), "{printed}");
        }
        for section in [
            "[[clients]]",
            "[cluster]",
            "[sdk]",
            "[quota]",
            "[limits]",
            "[token]",
        ] {
            assert!(printed.contains(section), "{section} in {printed}");
        }
        assert!(printed.contains("redis://[redacted]@127.0.0.1:6379/0"));
    }

    #[test]
    fn zero_durations_and_duplicate_names_are_refused() {
        let text = r#"
            [upstream]
            request_timeout = "0s"
            [[apps]]
            name = "x"
            app_id = "a"
            app_key = "k"
            [[apps]]
            name = "x"
            app_id = "b"
            app_key = "k"
        "#;
        let problems = load_str(text, &env(&[])).expect_err("invalid").problems();
        assert!(problems
            .iter()
            .any(|p| p.starts_with("upstream.request_timeout")));
        assert!(problems
            .iter()
            .any(|p| p.starts_with("apps[1].name = \"x\": duplicate")));
    }

    #[test]
    fn workers_default_to_the_cpus_and_zero_is_refused() {
        let c = load_str(MINIMAL, &env(&[("KEY1", "k")])).expect("valid");
        assert_eq!(
            c.workers,
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        );
        let c =
            load_str(&format!("workers = 3\n{MINIMAL}"), &env(&[("KEY1", "k")])).expect("valid");
        assert_eq!(c.workers, 3);
        assert!(c.to_redacted_toml().contains("workers = 3"));
        let problems = load_str(&format!("workers = 0\n{MINIMAL}"), &env(&[("KEY1", "k")]))
            .expect_err("invalid")
            .problems();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("workers = 0: must be at least 1")),
            "{problems:?}"
        );
    }

    #[test]
    fn http1_for_a_single_client_is_on_by_default_and_can_be_turned_off() {
        let c = load_str(MINIMAL, &env(&[("KEY1", "k")])).expect("valid");
        assert!(c.upstream.http2 && c.upstream.http1_for_single_client);
        let text = format!("[upstream]\nhttp1_for_single_client = false\n{MINIMAL}");
        let c = load_str(&text, &env(&[("KEY1", "k")])).expect("valid");
        assert!(!c.upstream.http1_for_single_client);
        assert!(c
            .to_redacted_toml()
            .contains("http1_for_single_client = false"));
        let text = format!("[upstream]\nhttp1_for_single_client = \"sometimes\"\n{MINIMAL}");
        let problems = load_str(&text, &env(&[("KEY1", "k")]))
            .expect_err("invalid")
            .problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("http1_for_single_client")),
            "{problems:?}"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_text_loads_or_errors_without_panicking(text in ".{0,400}") {
            let _ = load_str(&text, &HashMap::new());
        }

        #[test]
        fn bad_values_are_reported_with_their_key(
            key in prop::sample::select(vec![
                "connect_timeout", "tls_timeout", "request_timeout", "body_timeout", "pool_idle_timeout",
            ]),
            value in "[a-z]{1,8}",
        ) {
            let text = format!("[upstream]\n{key} = \"{value}\"\n[[apps]]\napp_id = \"a\"\napp_key = \"k\"\n");
            let problems = load_str(&text, &HashMap::new()).expect_err("invalid").problems();
            let expected = format!("upstream.{key} = \"{value}\"");
            prop_assert!(problems.iter().any(|p| p.starts_with(&expected)), "{:?}", problems);
        }

        #[test]
        fn unknown_keys_are_named(name in "[a-z]{3,12}_x") {
            let text = format!("{name} = 1\n[[apps]]\napp_id = \"a\"\napp_key = \"k\"\n");
            let err = load_str(&text, &HashMap::new()).expect_err("unknown key");
            prop_assert!(err.to_string().contains(&name), "{}", err);
        }
    }
}
