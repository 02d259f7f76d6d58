//! The embedded Meeting API simulator: an HTTPS stand-in for the upstream (meeting-api.md §8).
//!
//! It signs users in with App ID authentication, issues and checks tokens, answers every
//! operation of the operation table, throttles like APIG, and records what it received, so that
//! the gateway can be demonstrated and tested without the real service. Faults can be queued at
//! runtime (errors, throttling, slow answers, dropped connections).
//!
//! Choices where the upstream is undocumented (SIM-CHOICE in meeting-api.md):
//! - appauth failures use fake codes: `SIM.BAD_SIGNATURE`, `SIM.BAD_ACCESS`,
//!   `SIM.SIGNATURE_EXPIRED`, `SIM.BAD_NONCE`, `SIM.NONCE_REPLAYED`, `SIM.UNKNOWN_APP`,
//!   `SIM.CORP_ID_NOT_ALLOWED` (401) and `SIM.BAD_REQUEST` (400).
//! - `validPeriod` is the token lifetime rounded up to whole seconds (at least 1); the token
//!   itself expires after the exact lifetime. A lifetime change applies to tokens issued later.
//! - The response `X-Request-Id` echoes the client's `X-Request-ID`, else 32 lowercase hex.
//! - `X-APIG-Ratelimit-*` write the window as `N day|hour|minute|second` when whole, else `N ms`.
//! - Control APIs whose operation-table row lists `X-Conference-Authorization` need a control
//!   token (raw or `Basic base64(token)`), and accept but ignore `X-Access-Token`;
//!   `conferences/token` takes the host password and an optional `X-Access-Token`. Every other
//!   business API needs a live `X-Access-Token`.
//! - Faults: `Throttle` is taken after token auth and before the limits (it uses no slot);
//!   `BusinessStatus`, `Delay` and `ResetBeforeResponse` are taken after admission (they use a
//!   slot, as a failing backend behind APIG would). Requests answered by a fault are never
//!   counted as processed. Token-management APIs (`/v1/usg/acs/token*`) are not throttled and
//!   see no business faults.

mod cli;
mod config;
mod handlers;
mod limits;
mod meetings;
mod routes;
mod server;
mod state;
pub mod tls;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use cli::{run_cli, SimulateArgs};
pub use config::{
    DebugHeaders, SimApp, SimConfig, SimLimit, SimLimits, SimMeeting, SimTls, WindowKind,
};
pub use meetings::{ControlStats, MeetingState};

use handlers::Sim;

/// How many request ids [`SimHandle::counts_by_request_id`] remembers: the most recent ones.
pub const REQUEST_IDS_KEPT: usize = state::CAP;

/// A misbehaviour to apply to the next `count` matching requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Business APIs answer this status with `{"error_code":"SIM.FAULT","error_msg":...}`.
    BusinessStatus { status: u16, count: usize },
    /// Business APIs answer 429 `APIG.0308`, with `Retry-After` when `Some`.
    Throttle {
        count: usize,
        retry_after: Option<u32>,
    },
    /// appauth answers this status.
    SignInStatus { status: u16, count: usize },
    /// appauth answers 200 with exactly this raw body.
    SignInBody { body: String, count: usize },
    /// Business response headers are delayed by this much.
    Delay { delay: Duration, count: usize },
    /// A business request is read completely, then the connection (HTTP/1.1) or stream (h2) is
    /// dropped without an answer.
    ResetBeforeResponse { count: usize },
    /// Business response headers go out at once, then half the body, then the rest after
    /// `delay` (a slow upstream body).
    SlowBody { delay: Duration, count: usize },
    /// Business response headers and half the body go out, then the connection (HTTP/1.1) or
    /// stream (h2) is reset: the request was processed, the answer never fully arrives.
    ResetMidBody { count: usize },
    /// A business request is refused unprocessed, after authentication and before the limits: h2
    /// resets the stream with `REFUSED_STREAM` (safe to send again, RFC 9113 §8.7); HTTP/1.1,
    /// which has no such signal, drops the connection.
    RefuseStream { count: usize },
}

/// One request as the simulator received it. `Debug` redacts credential headers.
#[derive(Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path_and_query: String,
    /// In arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Empty when `record_bodies` is off.
    pub body: bytes::Bytes,
    /// 0 when the simulator did not answer (a reset fault).
    pub status: u16,
    pub at: Instant,
    /// The client's address: requests with the same one came over the same connection.
    pub peer: std::net::SocketAddr,
    pub version: http::Version,
}

impl RecordedRequest {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }
}

const SENSITIVE_HEADERS: &[&str] = &[
    "authorization",
    "x-access-token",
    "x-conference-authorization",
    "x-password",
    "proxy-authorization",
    "cookie",
];

impl std::fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| {
                if SENSITIVE_HEADERS.contains(&n.as_str()) {
                    (n.as_str(), "[redacted]")
                } else {
                    (n.as_str(), v.as_str())
                }
            })
            .collect();
        f.debug_struct("RecordedRequest")
            .field("method", &self.method)
            .field("path", &self.path())
            .field("headers", &headers)
            .field("body_len", &self.body.len())
            .field("status", &self.status)
            .finish()
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind the simulator to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("simulator TLS setup failed: {0}")]
    Tls(String),
    #[error("invalid simulator configuration: {0}")]
    Config(String),
    #[error("simulator file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds, starts serving in a spawned task, and returns once the socket is listening.
pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
    handlers::validate(&config)?;
    let (mut tls_config, ca_pem) = tls::server_config(&config.tls)?;
    if !config.http2 {
        let mut http1_only = (*tls_config).clone();
        http1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
        tls_config = Arc::new(http1_only);
    }
    let listen = config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| SimError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| SimError::Bind {
        addr: listen,
        source,
    })?;
    let sim = Arc::new(Sim::new(config, addr)?);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(server::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(tls_config),
        Arc::clone(&sim),
        shutdown_rx,
    ));
    tracing::info!(%addr, "Simulator listening");
    Ok(SimHandle {
        sim,
        addr,
        ca_pem,
        shutdown_tx,
        task: Some(task),
    })
}

/// A running simulator. Dropping it (or [`SimHandle::shutdown`]) stops the server.
pub struct SimHandle {
    sim: Arc<Sim>,
    addr: SocketAddr,
    ca_pem: String,
    shutdown_tx: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://IP:PORT`; an unspecified listen address is reported as loopback.
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("https://{addr}")
    }

    /// PEM a client must trust: the generated CA, or the served chain for [`SimTls::Files`].
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Everything received, in arrival order (the last 100 000).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.sim.lock().requests.snapshot()
    }

    pub fn clear_requests(&self) {
        self.sim.lock().requests.clear();
    }

    /// Server-side revocation: later use of the token gets 401 `USG.000000004`.
    pub fn revoke_token(&self, access_token: &str) -> bool {
        self.sim.lock().tokens.revoke(access_token)
    }

    /// Revokes every access and refresh token.
    pub fn revoke_all_tokens(&self) {
        self.sim.lock().tokens.revoke_all();
    }

    /// Successful appauth calls.
    pub fn sign_in_count(&self) -> usize {
        self.sim.lock().sign_ins
    }

    /// Access tokens issued so far (the last 100 000), oldest first. For tests.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.sim.lock().tokens.issued()
    }

    /// Queues a fault behind those already queued.
    pub fn inject(&self, fault: Fault) {
        self.sim.lock().push_fault(fault);
    }

    pub fn clear_faults(&self) {
        self.sim.lock().clear_faults();
    }

    /// Replaces the throttling policies. Counts carry over for policies whose window kind and
    /// length are unchanged.
    pub fn set_limits(&self, limits: SimLimits) {
        self.sim.lock().limits = limits;
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.sim.lock().token_lifetime = d;
    }

    /// Lifetime of control tokens issued or kept alive from now on.
    pub fn set_conf_token_lifetime(&self, d: Duration) {
        self.sim.lock().conf_token_lifetime = d;
    }

    /// Server-side revocation of every meeting-control token: later control calls with them
    /// get 401 `SIM.CONF_TOKEN_INVALID`.
    pub fn revoke_conf_tokens(&self) {
        self.sim.lock().meetings.revoke_tokens();
    }

    /// Calls to `conferences/token`, new tokens issued and keep-alives.
    pub fn control_stats(&self) -> ControlStats {
        self.sim.lock().meetings.stats
    }

    /// Ends a meeting as its host would from their own client: its control tokens end too.
    pub fn stop_meeting(&self, conference_id: &str) {
        self.sim.lock().meetings.stop(conference_id);
    }

    /// Where a meeting is in its life; `None` when it never existed.
    pub fn meeting_state(&self, conference_id: &str) -> Option<MeetingState> {
        self.sim.lock().meetings.state(conference_id)
    }

    /// A meeting's (host, guest) passwords, as its creator got them.
    pub fn meeting_passwords(&self, conference_id: &str) -> Option<(String, String)> {
        self.sim.lock().meetings.passwords(conference_id)
    }

    /// How many times each `X-Request-ID` was processed by a business handler (it passed auth
    /// and limits and the handler answered 2xx or 4xx), for the last [`REQUEST_IDS_KEPT`] ids.
    pub fn counts_by_request_id(&self) -> HashMap<String, usize> {
        self.sim.lock().processed()
    }

    /// The most business requests to `route` (operation name, or `"METHOD /path"` with a
    /// template or a concrete path) admitted within any window of length `window`.
    pub fn max_in_any_window(&self, route: &str, window: Duration) -> usize {
        let Some(name) = self.sim.routes.resolve_name(route) else {
            return 0;
        };
        let st = self.sim.lock();
        st.admissions
            .get(&name)
            .map_or(0, |log| limits::max_in_window(log, window))
    }

    /// Client connections open now (TLS established, not yet closed).
    pub fn open_connections(&self) -> usize {
        self.sim
            .open_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many 429 `APIG.0308` answers were sent (limits and `Throttle` faults).
    pub fn rejected_429(&self) -> usize {
        self.sim.lock().rejected_429
    }

    /// Stops accepting, lets in-flight exchanges finish for a short grace period, then returns.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::debug!(error = %e, "Simulator task ended abnormally");
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
    }
}
