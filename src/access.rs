//! Who is calling and what they may do: bearer keys (kept only as SHA-256, compared in constant
//! time) and SDK session tokens, checked against each client's apps, users and operations.

use std::sync::Arc;

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use serde::Serialize;

use crate::error::GatewayError;
use crate::headers::{X_ACCESS_TOKEN, X_MEETGATE_APP, X_MEETGATE_USER};
use crate::secret::{print, KeySource};
use crate::session::{Session, SessionStore};

/// `[[clients]]`: a client of the gateway and what it may do.
#[derive(Debug, Clone, Serialize)]
pub struct ClientConfig {
    pub name: Arc<str>,
    /// SHA-256 of its bearer key. A key's digest still identifies it: not printed either.
    #[serde(
        serialize_with = "print::redacted_some",
        skip_serializing_if = "Option::is_none"
    )]
    pub key_sha256: Option<[u8; 32]>,
    /// SDK-style credentials: the App ID and key the client signs in to meetgate with.
    #[serde(flatten)]
    pub sdk: Option<SdkCredential>,
    /// Apps it may act through, by name; the first is its default.
    pub apps: Vec<String>,
    /// Users it may act as; `None`: only each app's default user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<Patterns>,
    /// Operations it may call; `None`: all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operations: Option<Patterns>,
    /// Its share of a bucket's slots against other waiting clients.
    pub weight: std::num::NonZeroU32,
    /// Most of its requests waiting in one bucket; beyond, 429 at once.
    pub max_queued: usize,
    /// Most requests it may make per period, whatever the quota (429 beyond, before queueing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<ClientRate>,
}

/// Requests a client may wait with in one bucket by default: enough for a batch job, few
/// enough that it cannot fill a gateway's `max_concurrent_requests` (1 024) alone.
pub const DEFAULT_MAX_QUEUED: usize = 256;

/// A client's inbound rate: `count` requests per `period` (`"10/s"`, `"600/m"`, `"5/2s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRate {
    pub count: std::num::NonZeroU32,
    pub period: std::time::Duration,
}

impl ClientRate {
    pub fn parse(text: &str) -> Result<ClientRate, String> {
        let bad = || "not a rate; e.g. \"10/s\", \"600/m\" or \"5/2s\"".to_owned();
        let (count, per) = text.split_once('/').ok_or_else(bad)?;
        let count = count
            .trim()
            .parse::<u32>()
            .ok()
            .and_then(std::num::NonZeroU32::new)
            .ok_or_else(|| "the count must be a whole number of at least 1".to_owned())?;
        let per = per.trim();
        let period = match per {
            "s" => std::time::Duration::from_secs(1),
            "m" => std::time::Duration::from_secs(60),
            "h" => std::time::Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if period.is_zero() {
            return Err("the period must be longer than zero".to_owned());
        }
        Ok(ClientRate { count, period })
    }
}

/// Printed as it is written: `count/period`.
impl Serialize for ClientRate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!(
            "{}/{}",
            self.count,
            humantime::format_duration(self.period)
        ))
    }
}

/// An SDK client's gateway credentials (never the upstream's).
#[derive(Debug, Clone, Serialize)]
pub struct SdkCredential {
    pub app_id: String,
    #[serde(flatten)]
    pub key_source: KeySource,
    #[serde(serialize_with = "print::redacted")]
    pub app_key: secrecy::SecretString,
}

/// Exact names or glob patterns (`*`, `?`, `[...]`); prints as the list it was given.
#[derive(Clone)]
pub struct Patterns {
    pub patterns: Vec<String>,
    set: globset::GlobSet,
}

impl Patterns {
    pub fn new(patterns: Vec<String>, set: globset::GlobSet) -> Patterns {
        Patterns { patterns, set }
    }

    pub fn matches(&self, candidate: &str) -> bool {
        self.set.is_match(candidate)
    }
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.patterns).finish()
    }
}

impl PartialEq for Patterns {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl Serialize for Patterns {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.patterns.serialize(serializer)
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No clients are configured: whoever reaches the (loopback) listener.
    Anonymous,
    /// A configured client, by bearer key or by a session it signed in for.
    Client {
        client: Arc<ClientConfig>,
        session: Option<Arc<Session>>,
    },
}

impl Caller {
    /// The configured client, unless anonymous.
    pub fn client(&self) -> Option<&Arc<ClientConfig>> {
        match self {
            Caller::Anonymous => None,
            Caller::Client { client, .. } => Some(client),
        }
    }
}

/// Which upstream identity a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub app: String,
    /// `None`: the app's default user.
    pub user: Option<String>,
}

/// The clients of the configuration in force.
pub struct AccessRules {
    clients: Vec<Arc<ClientConfig>>,
}

const UNAUTHENTICATED: &str = "a client key (Authorization: Bearer) or a session token is required";

impl AccessRules {
    pub fn new(clients: &[ClientConfig]) -> AccessRules {
        AccessRules {
            clients: clients.iter().cloned().map(Arc::new).collect(),
        }
    }

    pub fn open(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn has_sdk_clients(&self) -> bool {
        self.clients.iter().any(|c| c.sdk.is_some())
    }

    pub fn client(&self, name: &str) -> Option<&Arc<ClientConfig>> {
        self.clients.iter().find(|c| &*c.name == name)
    }

    /// The client whose SDK credentials carry `app_id`.
    pub fn sdk_client(&self, app_id: &str) -> Option<&Arc<ClientConfig>> {
        self.clients
            .iter()
            .find(|c| c.sdk.as_ref().is_some_and(|s| s.app_id == app_id))
    }

    /// Authenticates a request from its headers; the upstream is never contacted for a refusal.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        sessions: &SessionStore,
        now_ms: u64,
    ) -> Result<Caller, GatewayError> {
        if self.open() {
            return Ok(Caller::Anonymous);
        }
        if let Some(key) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            let presented: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
            // Compare against every client so the time taken does not say which one matched.
            let mut found = None;
            for c in &self.clients {
                if let Some(expected) = &c.key_sha256 {
                    if bool::from(expected.ct_eq(&presented)) {
                        found = Some(c.clone());
                    }
                }
            }
            return found
                .map(|client| Caller::Client {
                    client,
                    session: None,
                })
                .ok_or(GatewayError::Unauthenticated("unknown client key"));
        }
        if let Some(token) = headers.get(X_ACCESS_TOKEN).and_then(|v| v.to_str().ok()) {
            let session = sessions
                .find(token.trim(), now_ms)
                .ok_or(GatewayError::SessionInvalid)?;
            let client = self
                .client(&session.client)
                .cloned()
                .ok_or(GatewayError::SessionInvalid)?;
            return Ok(Caller::Client {
                client,
                session: Some(session),
            });
        }
        Err(GatewayError::Unauthenticated(UNAUTHENTICATED))
    }

    /// Decides the identity a request acts as and whether the caller may call `operation`.
    /// `default_user` gives each app's default user.
    pub fn authorize(
        &self,
        caller: &Caller,
        operation: &str,
        headers: &HeaderMap,
        default_user: impl Fn(&str) -> Option<String>,
    ) -> Result<Identity, GatewayError> {
        let asked_app = header_str(headers, &X_MEETGATE_APP)?;
        let asked_user = header_str(headers, &X_MEETGATE_USER)?;
        match caller {
            Caller::Anonymous => Ok(Identity {
                app: match asked_app {
                    Some(a) => a.to_owned(),
                    None => String::new(),
                },
                user: asked_user.map(str::to_owned),
            }),
            Caller::Client { client, session } => {
                if let Some(ops) = &client.operations {
                    if !ops.matches(operation) {
                        return Err(GatewayError::Forbidden(
                            "this client may not call this operation",
                        ));
                    }
                }
                if let Some(s) = session {
                    // A session fixes its identity; the headers may only repeat it.
                    if asked_app.is_some_and(|a| a != &*s.app)
                        || asked_user.is_some_and(|u| u != &*s.user)
                    {
                        return Err(GatewayError::Forbidden(
                            "a session acts only as the identity it signed in as",
                        ));
                    }
                    return Ok(Identity {
                        app: s.app.to_string(),
                        user: Some(s.user.to_string()),
                    });
                }
                let app = match asked_app {
                    Some(a) if client.apps.iter().any(|x| x == a) => a.to_owned(),
                    Some(_) => {
                        return Err(GatewayError::Forbidden("this client may not use that app"))
                    }
                    None => client
                        .apps
                        .first()
                        .cloned()
                        .ok_or(GatewayError::Forbidden("this client may use no app"))?,
                };
                let user = self.check_user(client, &app, asked_user, &default_user)?;
                Ok(Identity { app, user })
            }
        }
    }

    /// Whether `client` may act as `user` (None: the app's default) through `app`.
    pub fn check_user(
        &self,
        client: &ClientConfig,
        app: &str,
        user: Option<&str>,
        default_user: &impl Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, GatewayError> {
        let Some(user) = user else { return Ok(None) };
        let default = default_user(app);
        if default.as_deref() == Some(user) {
            return Ok(None);
        }
        match &client.users {
            Some(p) if p.matches(user) => Ok(Some(user.to_owned())),
            _ => Err(GatewayError::Forbidden(
                "this client may not act as that user",
            )),
        }
    }
}

fn header_str<'a>(
    headers: &'a HeaderMap,
    name: &http::HeaderName,
) -> Result<Option<&'a str>, GatewayError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
            GatewayError::BadRequest("X-Meetgate-App and X-Meetgate-User must be visible ASCII")
        }),
    }
}
