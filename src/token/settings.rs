//! The settings of upstream identities: each App ID credential (`[[apps]]`) and how its tokens
//! are obtained and refreshed (`[token]`).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::secret::{print, KeySource};

/// `[[apps]]`: one App ID credential.
#[derive(Debug, Clone, Serialize)]
pub struct AppConfig {
    pub name: String,
    pub app_id: String,
    #[serde(flatten)]
    pub key_source: KeySource,
    #[serde(serialize_with = "print::redacted")]
    pub app_key: SecretString,
    /// `Some` for SP (multi-tenant) apps: the 5-field signature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corp_id: Option<String>,
    /// Default upstream user; empty is the corp admin.
    pub user_id: String,
}

impl AppConfig {
    /// Whether `other` signs in exactly as this app does (same id, corp and key).
    pub fn same_credentials(&self, other: &AppConfig) -> bool {
        self.app_id == other.app_id
            && self.corp_id == other.corp_id
            && self.app_key.expose_secret() == other.app_key.expose_secret()
    }
}

/// `[token]`: how tokens are obtained, refreshed and bounded.
#[derive(Debug, Clone, Serialize)]
pub struct TokenConfig {
    /// Most token keys (app, user) held at once; idle ones beyond the default identities are
    /// dropped first.
    pub max_identities: usize,
    /// A non-default identity unused this long loses its token.
    #[serde(serialize_with = "print::duration")]
    pub identity_idle: Duration,
    /// Fraction of a token's lifetime after which it is refreshed in the background.
    pub refresh_at: f64,
    /// Random share of the lifetime subtracted from `refresh_at`, so keys do not refresh in step.
    pub refresh_jitter: f64,
    /// How long an appauth signature stays valid (`expireTime` = now + this).
    #[serde(serialize_with = "print::duration")]
    pub signature_lifetime: Duration,
    #[serde(serialize_with = "print::duration")]
    pub sign_in_timeout: Duration,
    #[serde(serialize_with = "print::duration")]
    pub retry_initial: Duration,
    #[serde(serialize_with = "print::duration")]
    pub retry_max: Duration,
}
