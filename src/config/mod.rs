//! Configuration: the file and `MEETGATE__` environment layers (the `config` crate), read into
//! the serde layer (`raw`), validated once (`validate`, with the `check` vocabulary that names
//! every bad key and value) into the typed [`Config`].
//!
//! Each section's typed settings belong to the module that uses them (`upstream`, `token`,
//! `quota`, `access`, ...) and print themselves (`Serialize`, secrets redacted): `check-config`
//! shows the typed config itself, so a key cannot be shown wrong or left out. This module
//! imports those types; they never import it.

mod check;
mod raw;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

pub use check::{ConfigError, Problem};

use crate::access::ClientConfig;
use crate::cluster::ClusterConfig;
use crate::control::ControlConfig;
use crate::limits::LimitsConfig;
use crate::quota::QuotaConfig;
use crate::sdk::SdkConfig;
use crate::secret::print;
use crate::telemetry::LogConfig;
use crate::tls::TlsConfig;
use crate::token::{AppConfig, TokenConfig};
use crate::trace::TracingConfig;
use crate::upstream::UpstreamConfig;
use raw::RawConfig;
use validate::validate;

/// Prefix of environment overrides: `MEETGATE__UPSTREAM__URL` sets `upstream.url`.
pub const ENV_PREFIX: &str = "MEETGATE";

/// The validated configuration. `Debug` never shows a key, and neither does its printed form.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(serialize_with = "print::duration")]
    pub shutdown_grace: Duration,
    /// How often the config file and the files it names are checked for changes.
    #[serde(serialize_with = "print::duration")]
    pub reload_interval: Duration,
    /// Request worker threads, each running its connections start to finish.
    pub workers: usize,
    pub allow_unauthenticated: bool,
    pub upstream: UpstreamConfig,
    pub token: TokenConfig,
    pub limits: LimitsConfig,
    pub quota: QuotaConfig,
    pub apps: Vec<AppConfig>,
    /// Who may use the gateway. Empty: anyone who can reach the (loopback) listener.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientConfig>,
    /// TLS on the proxy listener (the SDKs sign in only over HTTPS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    pub sdk: SdkConfig,
    pub control: ControlConfig,
    /// Shared limits and tokens on Redis; `None`: single-instance mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    pub log: LogConfig,
    /// Spans exported over OTLP; `None`: tracing off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingConfig>,
    /// Things worth a warning at start (an inline key, ...), logged once telemetry is up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl Config {
    /// The effective configuration as TOML, every secret replaced by `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// Loads `path` with environment overrides taken from `env` (the process environment in
/// production, a map in tests), and validates it.
pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let file = ::config::File::from(path).format(::config::FileFormat::Toml);
    build(file, env)
}

/// Same as [`load`] for a configuration held in a string.
pub fn load_str(toml: &str, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    build(
        ::config::File::from_str(toml, ::config::FileFormat::Toml),
        env,
    )
}

fn build<S>(file: S, env: &HashMap<String, String>) -> Result<Config, ConfigError>
where
    S: ::config::Source + Send + Sync + 'static,
{
    let overrides: ::config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let raw: RawConfig = ::config::Config::builder()
        .add_source(file)
        .add_source(
            ::config::Environment::with_prefix(ENV_PREFIX)
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .and_then(::config::Config::try_deserialize)
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    validate(raw, env)
}

#[cfg(test)]
mod tests;
