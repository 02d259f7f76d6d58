//! The serde layer: what the file and the environment say, before validation. Every table
//! refuses unknown keys; values stay as text where validation must name them when they are bad.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) reload_interval: Option<String>,
    pub(super) workers: Option<usize>,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) token: RawToken,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) quota: RawQuota,
    #[serde(default)]
    pub(super) apps: Vec<RawApp>,
    #[serde(default)]
    pub(super) clients: Vec<RawClient>,
    pub(super) allow_unauthenticated: Option<bool>,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) sdk: RawSdk,
    #[serde(default)]
    pub(super) control: RawControl,
    pub(super) cluster: Option<RawCluster>,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) tracing: RawTracing,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis_url: Option<SecretString>,
    pub(super) key_prefix: Option<String>,
    pub(super) max_replicas: Option<u32>,
    pub(super) timeout: Option<String>,
    pub(super) lease: Option<String>,
}

impl fmt::Debug for RawCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawCluster").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: Option<String>,
    pub(super) weight: Option<u32>,
    pub(super) max_queued: Option<usize>,
    pub(super) rate: Option<String>,
    pub(super) key_sha256: Option<String>,
    pub(super) app_id: Option<String>,
    pub(super) app_key_env: Option<String>,
    pub(super) app_key_file: Option<PathBuf>,
    pub(super) app_key: Option<SecretString>,
    pub(super) apps: Option<Vec<String>>,
    pub(super) users: Option<Vec<String>>,
    pub(super) operations: Option<Vec<String>>,
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
pub(super) struct RawTls {
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSdk {
    pub(super) session_lifetime: Option<String>,
    pub(super) max_sessions: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) connect_timeout: Option<String>,
    pub(super) tls_timeout: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) body_timeout: Option<String>,
    pub(super) http2: Option<bool>,
    pub(super) http1_for_single_client: Option<bool>,
    pub(super) pool_idle_timeout: Option<String>,
    pub(super) pool_max_idle_per_host: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub(super) max_identities: Option<usize>,
    pub(super) identity_idle: Option<String>,
    pub(super) refresh_at: Option<f64>,
    pub(super) refresh_jitter: Option<f64>,
    pub(super) signature_lifetime: Option<String>,
    pub(super) sign_in_timeout: Option<String>,
    pub(super) retry_initial: Option<String>,
    pub(super) retry_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) replay_body_bytes: Option<usize>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_headers: Option<usize>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    pub(super) enabled: Option<bool>,
    pub(super) algorithm: Option<String>,
    pub(super) mode: Option<String>,
    pub(super) max_wait: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) per_api_per_minute: Option<u32>,
    pub(super) all_env_per_second: Option<u32>,
    pub(super) per_api_window: Option<String>,
    pub(super) all_env_window: Option<String>,
    pub(super) burst: Option<u32>,
    pub(super) safety_margin: Option<String>,
    #[serde(default)]
    pub(super) operations: BTreeMap<String, RawOpQuota>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOpQuota {
    pub(super) per_api_per_minute: Option<u32>,
    pub(super) all_env_per_second: Option<u32>,
    pub(super) burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    pub(super) name: Option<String>,
    pub(super) app_id: Option<String>,
    pub(super) app_key_env: Option<String>,
    pub(super) app_key_file: Option<PathBuf>,
    pub(super) app_key: Option<SecretString>,
    pub(super) corp_id: Option<String>,
    pub(super) user_id: Option<String>,
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
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    /// May hold credentials in its user part: never printed.
    pub(super) otlp_endpoint: Option<SecretString>,
    pub(super) sample_ratio: Option<f64>,
    pub(super) service_name: Option<String>,
    #[serde(default)]
    pub(super) resource_attributes: BTreeMap<String, String>,
    pub(super) export_interval: Option<String>,
    pub(super) export_timeout: Option<String>,
    pub(super) max_queued_spans: Option<usize>,
}

impl fmt::Debug for RawTracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawTracing").finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    pub(super) enabled: Option<bool>,
    pub(super) remember_start_password: Option<bool>,
    pub(super) max_conferences: Option<usize>,
    pub(super) idle_timeout: Option<String>,
}
