//! Raw values to typed settings: every key checked once, every problem named with its key and
//! value, each section built into the settings type of the module that uses it.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};

use super::check::{quoted, valid_name, Checker, ConfigError};
use super::raw::*;
use super::Config;
use crate::access::{ClientConfig, ClientRate, Patterns, SdkCredential, DEFAULT_MAX_QUEUED};
use crate::cluster::{ClusterConfig, MAX_LEASE};
use crate::control::ControlConfig;
use crate::limits::LimitsConfig;
use crate::operations::OperationTable;
use crate::quota::{
    LimitKind, OpQuota, QuotaAlgorithm, QuotaConfig, QuotaMode, QuotaScope, GCRA_DEFAULT_BURST,
};
use crate::sdk::SdkConfig;
use crate::secret::{redact_url, KeySource};
use crate::telemetry::{LogConfig, LogFormat};
use crate::tls::{Tls, TlsConfig};
use crate::token::{AppConfig, TokenConfig};
use crate::trace::TracingConfig;
use crate::upstream::UpstreamConfig;

pub(super) fn validate(
    raw: RawConfig,
    env: &HashMap<String, String>,
) -> Result<Config, ConfigError> {
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
    let tracing = validate_tracing(&mut c, raw.tracing);
    let defaults = ControlConfig::default();
    let rc = raw.control;
    let max_conferences = rc.max_conferences.unwrap_or(defaults.max_conferences);
    if max_conferences == 0 {
        c.problem("control.max_conferences", 0, "must be at least 1");
    }
    let control = ControlConfig {
        enabled: rc.enabled.unwrap_or(defaults.enabled),
        remember_start_password: rc
            .remember_start_password
            .unwrap_or(defaults.remember_start_password),
        max_conferences: max_conferences.max(1),
        idle_timeout: c.duration("control.idle_timeout", rc.idle_timeout.as_deref(), "1h"),
    };
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
        control,
        cluster,
        log: LogConfig { format, level },
        tracing,
        warnings,
    })
}

/// `[tracing]`: off (`None`) unless `otlp_endpoint` is set.
fn validate_tracing(c: &mut Checker, t: RawTracing) -> Option<TracingConfig> {
    let sample_ratio = c.fraction("tracing.sample_ratio", t.sample_ratio, 1.0, 0.0, 1.0);
    let export_interval = c.duration(
        "tracing.export_interval",
        t.export_interval.as_deref(),
        "5s",
    );
    let export_timeout = c.duration("tracing.export_timeout", t.export_timeout.as_deref(), "10s");
    let max_queued_spans = t.max_queued_spans.unwrap_or(2048);
    if max_queued_spans == 0 {
        c.problem("tracing.max_queued_spans", 0, "must be at least 1");
    }
    let service_name = t.service_name.unwrap_or_else(|| "meetgate".to_owned());
    if service_name.trim().is_empty() {
        c.problem(
            "tracing.service_name",
            quoted(&service_name),
            "must not be empty",
        );
    }
    for key in t.resource_attributes.keys() {
        if key.trim().is_empty() {
            c.problem(
                "tracing.resource_attributes",
                quoted(key),
                "an attribute needs a name",
            );
        }
    }
    let endpoint = t.otlp_endpoint?;
    let text = endpoint.expose_secret();
    if text.is_empty() {
        return None;
    }
    match text.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
        Ok(uri) if uri.scheme_str() == Some("https") => {
            c.problem(
                "tracing.otlp_endpoint",
                quoted(&redact_url(text)),
                "https is not supported: export to a collector agent over http (on loopback or in the pod), e.g. \"http://127.0.0.1:4318\"",
            );
            return None;
        }
        _ => {
            c.problem(
                "tracing.otlp_endpoint",
                quoted(&redact_url(text)),
                "not an http:// URL of an OTLP/HTTP collector, e.g. \"http://127.0.0.1:4318\"",
            );
            return None;
        }
    }
    Some(TracingConfig {
        otlp_endpoint: endpoint,
        sample_ratio,
        service_name,
        resource_attributes: t.resource_attributes,
        export_interval,
        export_timeout,
        max_queued_spans: max_queued_spans.max(1),
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
    let burst = q.burst.map(|b| non_zero(c, "quota.burst", Some(b), 1));
    let algorithm = match q.algorithm.as_deref().unwrap_or("exact") {
        "exact" => QuotaAlgorithm::Exact,
        "gcra" => QuotaAlgorithm::Gcra,
        other => {
            c.problem(
                "quota.algorithm",
                quoted(other),
                "must be \"exact\" or \"gcra\"",
            );
            QuotaAlgorithm::Exact
        }
    };

    let table = OperationTable::global();
    let mut operations = BTreeMap::new();
    for (name, o) in q.operations {
        if table.by_name(&name).is_none() {
            c.problem(
                format!("quota.operations.{name}"),
                "",
                "no such operation (see src/data/meeting-operations.tsv)",
            );
            continue;
        }
        let prefix = format!("quota.operations.{name}.");
        let mut value = |key: &str, v: Option<u32>| {
            v.map(|v| non_zero(c, &format!("{prefix}{key}"), Some(v), 1))
        };
        let op = OpQuota {
            per_api_per_minute: value("per_api_per_minute", o.per_api_per_minute),
            all_env_per_second: value("all_env_per_second", o.all_env_per_second),
            burst: value("burst", o.burst),
        };
        operations.insert(name, op);
    }
    let quota = QuotaConfig {
        enabled: q.enabled.unwrap_or(true),
        algorithm,
        mode,
        max_wait,
        scope,
        per_api_per_minute: per_api,
        all_env_per_second: all_env,
        per_api_window,
        all_env_window,
        burst,
        safety_margin,
        operations,
    };
    // The limits must hold for the defaults and for every override; each problem is reported
    // under the key that set the burst, once (not for each of the 200 operations).
    let defaults = (per_api, all_env, burst);
    let mut checks = vec![("quota.".to_owned(), defaults)];
    for name in quota.operations.keys() {
        checks.push((format!("quota.operations.{name}."), quota.values_for(name)));
    }
    for (prefix, values) in checks {
        for failed in quota.resolve(values).into_iter().filter_map(Result::err) {
            let (kind, msg) = failed;
            let (key, n) = match kind {
                LimitKind::PerApi => ("per_api_per_minute", values.0),
                LimitKind::AllEnv => ("all_env_per_second", values.1),
            };
            let burst = values.2.map_or(GCRA_DEFAULT_BURST, NonZeroU32::get);
            c.problem(
                format!("{prefix}burst"),
                burst,
                format!("with {prefix}{key} = {n} and algorithm = \"gcra\": {msg}"),
            );
        }
    }
    quota
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
        Ok(set) => Some(Patterns::new(list, set)),
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
        let weight = non_zero(c, &key("weight"), rc.weight, 1);
        let max_queued = rc.max_queued.unwrap_or(DEFAULT_MAX_QUEUED);
        if max_queued == 0 {
            c.problem(key("max_queued"), 0, "must be at least 1");
        }
        let rate = rc
            .rate
            .as_deref()
            .and_then(|text| match ClientRate::parse(text) {
                Ok(r) => Some(r),
                Err(msg) => {
                    c.problem(key("rate"), quoted(text), msg);
                    None
                }
            });
        out.push(ClientConfig {
            name: Arc::from(name),
            key_sha256,
            sdk,
            apps: client_apps,
            users,
            operations,
            weight,
            max_queued: max_queued.max(1),
            rate,
        });
    }
    out
}

fn validate_cluster(c: &mut Checker, cl: RawCluster) -> Option<ClusterConfig> {
    let timeout = c.duration("cluster.timeout", cl.timeout.as_deref(), "250ms");
    let max_replicas = non_zero(c, "cluster.max_replicas", cl.max_replicas, 10);
    // Zero is a setting here ("0s": no leases, one Redis decision per request), which the
    // general duration check refuses. One problem per bad value.
    let lease_text = cl.lease.as_deref();
    let lease = match lease_text.map(humantime::parse_duration) {
        Some(Ok(d)) if d.is_zero() => Duration::ZERO,
        Some(Ok(d)) if d > MAX_LEASE => {
            c.problem(
                "cluster.lease",
                quoted(lease_text.unwrap_or_default()),
                "must be at most 500ms (or \"0s\" for no leases)",
            );
            MAX_LEASE
        }
        _ => c.duration("cluster.lease", lease_text, "50ms"),
    };
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
        lease,
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
    let tls = TlsConfig {
        cert_file,
        key_file,
        certs,
        key: Arc::new(key),
        handshake_timeout,
    };
    // Build the acceptor once here, so a key that does not match its certificate is a
    // configuration error, not a listener that fails every handshake.
    if let Err(e) = Tls::new(&tls) {
        c.problem(
            "tls.key_file",
            quoted(&tls.key_file.display().to_string()),
            format!("unusable with tls.cert_file ({e})"),
        );
        return None;
    }
    Some(tls)
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
