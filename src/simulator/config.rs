//! The simulator's configuration types, their serde form (TOML via the `config` crate) and defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

/// Everything the simulator can be told at start-up. `Debug` never shows app keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Which certificate to serve.
    pub tls: SimTls,
    /// Apps whose appauth succeeds.
    pub apps: Vec<SimApp>,
    /// Lifetime (and `validPeriod`) of issued access tokens, measured on the server's clock.
    #[serde(with = "humantime_serde")]
    pub token_lifetime: Duration,
    /// Lifetime of issued refresh tokens.
    #[serde(with = "humantime_serde")]
    pub refresh_lifetime: Duration,
    /// With clientType 72, how many live tokens one (app, corp, user) keeps; the next evicts the
    /// oldest. Any other clientType keeps one.
    pub max_tokens_per_user: usize,
    /// Upstream throttling policies.
    pub limits: SimLimits,
    /// When the `X-APIG-*` latency and rate-limit headers are sent on business responses.
    pub debug_headers: DebugHeaders,
    /// Added before every response to a business route.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Keep request bodies in the request log.
    pub record_bodies: bool,
    /// Offer HTTP/2 in ALPN; `false` serves HTTP/1.1 only, like an upstream behind an
    /// HTTP/1.1-only load balancer.
    pub http2: bool,
    /// Meetings that exist from the start (`[[meetings]]`); by default the demo meeting.
    pub meetings: Vec<SimMeeting>,
    /// Lifetime of meeting-control tokens (`confTokenExpireTime`; 30 min upstream).
    #[serde(with = "humantime_serde")]
    pub conf_token_lifetime: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls: SimTls::default(),
            apps: Vec::new(),
            token_lifetime: Duration::from_secs(12 * 3600),
            refresh_lifetime: Duration::from_secs(30 * 86400),
            max_tokens_per_user: 64,
            limits: SimLimits::default(),
            debug_headers: DebugHeaders::default(),
            latency: Duration::ZERO,
            record_bodies: true,
            http2: true,
            meetings: vec![SimMeeting::demo()],
            conf_token_lifetime: Duration::from_secs(1800),
        }
    }
}

/// A meeting that exists when the simulator starts, scheduled (not started) and usable by
/// every app. `Debug` redacts the passwords.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimMeeting {
    pub conference_id: String,
    /// The host password (`chair` in `passwordEntry`).
    pub chair_password: String,
    /// The guest password (`general`).
    #[serde(default)]
    pub guest_password: String,
    /// Whether the guest password may start the meeting (`allowGuestStartConf`).
    #[serde(default)]
    pub allow_guest_start: bool,
    #[serde(default)]
    pub subject: String,
}

impl SimMeeting {
    /// The meeting the demo and the examples use: 914087436, host password 123456, guest
    /// password 654321.
    pub fn demo() -> SimMeeting {
        SimMeeting {
            conference_id: "914087436".to_owned(),
            chair_password: "123456".to_owned(),
            guest_password: "654321".to_owned(),
            allow_guest_start: false,
            subject: "meetgate demo".to_owned(),
        }
    }
}

impl std::fmt::Debug for SimMeeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimMeeting")
            .field("conference_id", &self.conference_id)
            .field("allow_guest_start", &self.allow_guest_start)
            .finish_non_exhaustive()
    }
}

/// One App ID credential the simulator accepts. `Debug` redacts the key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimApp {
    pub app_id: String,
    #[serde(deserialize_with = "deserialize_secret")]
    pub app_key: SecretString,
    /// `Some` marks an SP (multi-tenant) app: its signatures use the 5-field form with the
    /// body's `corpId`. The value itself is reported as the token's `spId`.
    #[serde(default)]
    pub corp_id: Option<String>,
}

impl SimApp {
    /// A single-enterprise app (4-field signature).
    pub fn new(app_id: impl Into<String>, app_key: impl Into<String>) -> Self {
        Self {
            app_id: app_id.into(),
            app_key: SecretString::from(app_key.into()),
            corp_id: None,
        }
    }

    /// An SP (multi-tenant) app (5-field signature).
    pub fn sp(
        app_id: impl Into<String>,
        app_key: impl Into<String>,
        sp_id: impl Into<String>,
    ) -> Self {
        Self {
            corp_id: Some(sp_id.into()),
            ..Self::new(app_id, app_key)
        }
    }
}

// secrecy is built without its serde feature, so the key goes through a plain String.
fn deserialize_secret<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    String::deserialize(d).map(SecretString::from)
}

/// The server certificate. TOML: `tls = { kind = "generated", names = [...] }` or
/// `tls = { kind = "files", cert_file = "...", key_file = "..." }`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SimTls {
    /// A fresh CA and a leaf signed by it for these DNS names / IP addresses.
    Generated { names: Vec<String> },
    /// PEM files: the certificate chain (leaf first) and its private key.
    Files {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

impl Default for SimTls {
    fn default() -> Self {
        Self::Generated {
            names: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        }
    }
}

/// Whether business responses carry the APIG debug headers (`X-APIG-Latency`,
/// `X-APIG-Upstream-Latency`, `X-Envoy-Upstream-Service-Time`, `X-APIG-Ratelimit-*`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DebugHeaders {
    #[default]
    Always,
    /// Only when the request carries `X-Apig-Mode: debug`, as the APIG docs describe.
    OnDebugMode,
    Never,
}

/// The two APIG throttling policies the Meeting docs show. TOML: a table, or `false` to turn
/// a policy off.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SimLimits {
    /// Counted per (operation, app). Default 100 per minute.
    #[serde(deserialize_with = "deserialize_limit")]
    pub per_api: Option<SimLimit>,
    /// Counted per operation across all apps. Default 200 per second.
    #[serde(deserialize_with = "deserialize_limit")]
    pub all_env: Option<SimLimit>,
    pub window: WindowKind,
}

impl Default for SimLimits {
    fn default() -> Self {
        Self {
            per_api: Some(SimLimit::new(100, Duration::from_secs(60))),
            all_env: Some(SimLimit::new(200, Duration::from_secs(1))),
            window: WindowKind::default(),
        }
    }
}

impl SimLimits {
    /// No throttling at all.
    pub fn unlimited() -> Self {
        Self {
            per_api: None,
            all_env: None,
            window: WindowKind::default(),
        }
    }
}

/// At most `limit` admitted requests per `window`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SimLimit {
    pub limit: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl SimLimit {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self { limit, window }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LimitSetting {
    Enabled(bool),
    Limit(SimLimit),
}

fn deserialize_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SimLimit>, D::Error> {
    match LimitSetting::deserialize(d)? {
        LimitSetting::Limit(l) => Ok(Some(l)),
        LimitSetting::Enabled(false) => Ok(None),
        LimitSetting::Enabled(true) => Err(serde::de::Error::custom(
            "a limit is a table { limit, window } or false",
        )),
    }
}

/// How a throttling window is counted.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowKind {
    /// Windows `[phase + k*W, phase + (k+1)*W)` measured from the simulator's start.
    Fixed {
        #[serde(default, with = "humantime_serde")]
        phase: Duration,
    },
    /// An exact sliding log: the admitted requests in `(now - W, now]`.
    Sliding,
}

impl Default for WindowKind {
    fn default() -> Self {
        Self::Fixed {
            phase: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn parse(toml: &str) -> Result<SimConfig, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()?
            .try_deserialize()
    }

    #[test]
    fn defaults_match_the_docs() {
        let c = parse("").unwrap();
        assert_eq!(c.token_lifetime, Duration::from_secs(43200));
        assert_eq!(c.refresh_lifetime, Duration::from_secs(2_592_000));
        assert_eq!(c.max_tokens_per_user, 64);
        assert_eq!(c.limits, SimLimits::default());
        assert_eq!(c.tls, SimTls::default());
        assert_eq!(c.listen.port(), 0);
        assert!(c.record_bodies);
        assert_eq!(c.conf_token_lifetime, Duration::from_secs(1800));
        assert_eq!(c.meetings.len(), 1);
        assert_eq!(c.meetings[0].conference_id, "914087436");
    }

    #[test]
    fn meetings_are_configured_and_their_passwords_never_printed() {
        let c = parse(
            r#"
            conf_token_lifetime = "10s"
            [[meetings]]
            conference_id = "900000001"
            chair_password = "host-pw-1"
            guest_password = "guest-pw-1"
            allow_guest_start = true
            "#,
        )
        .unwrap();
        assert_eq!(c.conf_token_lifetime, Duration::from_secs(10));
        assert_eq!(
            c.meetings.len(),
            1,
            "a configured list replaces the demo meeting"
        );
        assert!(c.meetings[0].allow_guest_start);
        let debug = format!("{c:?}");
        assert!(!debug.contains("host-pw-1") && !debug.contains("guest-pw-1"));
        assert!(
            parse("[[meetings]]\nconference_id = \"1\"").is_err(),
            "a host password is required"
        );
    }

    #[test]
    fn toml_round_trip_and_redaction() {
        let c = parse(
            r#"
            listen = "127.0.0.1:8443"
            token_lifetime = "2s"
            debug_headers = "on_debug_mode"
            tls = { kind = "files", cert_file = "c.pem", key_file = "k.pem" }
            [[apps]]
            app_id = "a1"
            app_key = "very-secret-key"
            corp_id = "sp1"
            [limits]
            all_env = false
            per_api = { limit = 5, window = "10s" }
            window = { kind = "sliding" }
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.token_lifetime, Duration::from_secs(2));
        assert_eq!(c.debug_headers, DebugHeaders::OnDebugMode);
        assert_eq!(c.apps[0].app_key.expose_secret(), "very-secret-key");
        assert_eq!(c.apps[0].corp_id.as_deref(), Some("sp1"));
        assert_eq!(c.limits.all_env, None);
        assert_eq!(
            c.limits.per_api,
            Some(SimLimit::new(5, Duration::from_secs(10)))
        );
        assert_eq!(c.limits.window, WindowKind::Sliding);
        assert!(matches!(c.tls, SimTls::Files { .. }));
        assert!(!format!("{c:?}").contains("very-secret-key"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(parse("listen_addr = \"127.0.0.1:1\"").is_err());
        assert!(parse("[limits]\nper_api = true").is_err());
    }
}
