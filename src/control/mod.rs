//! Meeting-control sessions: one per (app, conference), holding the meeting's control token
//! (`X-Conference-Authorization`), obtained once with the host password however many calls
//! want it, kept alive while used, dropped and obtained again once when the upstream refuses
//! it, and ended by a stop; the host password of a start made through meetgate; and which
//! clients may use the session.
//!
//! - `exchange`: the `conferences/token` call (acquisition and keep-alive) upstream.
//!
//! Host passwords and control tokens are secrets: kept in memory only, never in a log, an
//! error, a metric or a `Debug` print.

mod exchange;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use subtle::ConstantTimeEq;

pub use exchange::{parse as token_answer, Exchange, Failure, Granted};

use crate::clock::{Clock, LastUse};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::secret::print;

/// `[control]`: meeting-control sessions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlConfig {
    /// Inject and keep control tokens for control calls that bring none.
    pub enabled: bool,
    /// Keep the host password of a successful `conferences/start` made through meetgate, so
    /// control calls need no password at all.
    pub remember_start_password: bool,
    /// Most sessions held; the least recently used goes first.
    pub max_conferences: usize,
    /// A session unused this long is dropped, its password with it.
    #[serde(serialize_with = "print::duration")]
    pub idle_timeout: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            enabled: true,
            remember_start_password: true,
            max_conferences: 10_000,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Who a session belongs to: a configured client's name, or `None` for the one caller of an
/// open sidecar.
pub type Owner = Option<Arc<str>>;

/// Longest conference id meetgate keeps a session for (the upstream's are 9 digits).
const MAX_CONFERENCE_ID: usize = 64;

/// The `conferenceID` of a control call's query, when it is one meetgate can key a session on.
pub fn conference_id(query: Option<&str>) -> Option<String> {
    let query = query?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "conferenceID")
        .map(|(_, v)| v.into_owned())
        .filter(|id| keyable(id))
}

/// Whether meetgate keeps a session for conference id `id` (short, visible ASCII); others go
/// as they are.
pub fn keyable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CONFERENCE_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A control token as the upstream issued it.
pub struct ControlToken {
    header: HeaderValue,
    /// Epoch ms from which it is no longer injected.
    expires_at_ms: u64,
    /// Epoch ms from which a use triggers a keep-alive.
    keepalive_at_ms: u64,
    generation: u64,
}

impl ControlToken {
    fn new(token: &str, now_ms: u64, lifetime: Duration, generation: u64) -> Option<ControlToken> {
        let mut header = HeaderValue::from_str(token).ok()?;
        header.set_sensitive(true);
        let (keepalive_at_ms, expires_at_ms) = schedule(now_ms, lifetime, rand::random::<f64>());
        Some(ControlToken {
            header,
            expires_at_ms,
            keepalive_at_ms,
            generation,
        })
    }
}

/// When a token obtained at `now_ms` for `lifetime` is kept alive (at 80% of its lifetime less
/// up to 5%, by `jitter` in 0..1) and when it stops being injected (a twentieth of its
/// lifetime, at most 30 s, before the server's expiry, so it never arrives expired).
pub fn schedule(now_ms: u64, lifetime: Duration, jitter: f64) -> (u64, u64) {
    let life = lifetime.as_millis() as u64;
    let keepalive = (life as f64 * (0.8 - 0.05 * jitter.clamp(0.0, 1.0))) as u64;
    let margin = (life / 20).min(30_000);
    (now_ms + keepalive, now_ms + life - margin)
}

/// One meeting's control session.
pub struct Session {
    app: Arc<str>,
    conference: Box<str>,
    owners: Mutex<Vec<Owner>>,
    password: Mutex<Option<SecretString>>,
    token: ArcSwapOption<ControlToken>,
    /// Held while a token is obtained or kept alive: one call upstream at a time.
    flight: tokio::sync::Mutex<()>,
    /// A keep-alive is on its way (started by a use, run in the background).
    keepalive: AtomicBool,
    generation: AtomicU64,
    last_used: LastUse,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("app", &self.app)
            .field("conference", &self.conference)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn conference(&self) -> &str {
        &self.conference
    }

    fn owned_by(&self, owner: &Owner) -> bool {
        self.owners
            .lock()
            .map(|o| o.contains(owner))
            .unwrap_or(false)
    }

    fn add_owner(&self, owner: &Owner) {
        if let Ok(mut o) = self.owners.lock() {
            if !o.contains(owner) {
                o.push(owner.clone());
            }
        }
    }

    /// Whether `presented` is this session's host password (compared in constant time).
    fn password_is(&self, presented: &str) -> bool {
        self.password.lock().is_ok_and(|p| {
            p.as_ref().is_some_and(|p| {
                bool::from(p.expose_secret().as_bytes().ct_eq(presented.as_bytes()))
            })
        })
    }

    fn set_password(&self, password: SecretString) {
        if let Ok(mut p) = self.password.lock() {
            *p = Some(password);
        }
    }

    fn password(&self) -> Option<SecretString> {
        self.password.lock().ok().and_then(|p| p.clone())
    }

    /// The token to inject while it is valid at `now_ms`, with its generation, and whether a
    /// keep-alive is due.
    fn current(&self, now_ms: u64) -> Option<(HeaderValue, u64, bool)> {
        let guard = self.token.load();
        let t = guard.as_ref()?;
        (now_ms < t.expires_at_ms)
            .then(|| (t.header.clone(), t.generation, now_ms >= t.keepalive_at_ms))
    }

    /// Stores a token from the upstream. A keep-alive that returns the same token keeps its
    /// generation, so a refusal of it still matches.
    fn store(&self, token: &str, now_ms: u64, lifetime: Duration) -> bool {
        let same = self
            .token
            .load()
            .as_ref()
            .is_some_and(|t| t.header.as_bytes() == token.as_bytes());
        let generation = if same {
            self.generation.load(Ordering::Relaxed)
        } else {
            self.generation.fetch_add(1, Ordering::Relaxed) + 1
        };
        match ControlToken::new(token, now_ms, lifetime, generation) {
            Some(t) => {
                self.token.store(Some(Arc::new(t)));
                true
            }
            None => false,
        }
    }
}

type Key = (Arc<str>, Box<str>);

/// Every control session of the gateway.
pub struct Controls {
    cfg: ArcSwap<ControlConfig>,
    clock: Arc<dyn Clock>,
    sessions: Mutex<HashMap<Key, Arc<Session>>>,
    metrics: Arc<Metrics>,
}

impl Controls {
    pub fn new(cfg: ControlConfig, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Arc<Controls> {
        let controls = Arc::new(Controls {
            cfg: ArcSwap::from_pointee(cfg),
            clock,
            sessions: Mutex::new(HashMap::new()),
            metrics,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(evict_idle(Arc::downgrade(&controls)));
        }
        controls
    }

    pub fn config(&self) -> Arc<ControlConfig> {
        self.cfg.load_full()
    }

    pub fn enabled(&self) -> bool {
        self.cfg.load().enabled
    }

    pub fn reconfigure(&self, cfg: ControlConfig) {
        let off = !cfg.enabled;
        self.cfg.store(Arc::new(cfg));
        if off {
            self.lock().clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The session a control call by `owner` uses: the meeting's existing one if `owner` may
    /// use it (or proves it may, with the host password), else a new one from the call's
    /// password. `None`: there is nothing to obtain a token with, so the call goes as it is.
    /// Another client's session without its password is refused before the upstream sees the
    /// call.
    pub fn session_for(
        &self,
        app: &Arc<str>,
        conference: &str,
        owner: &Owner,
        password: Option<SecretString>,
    ) -> Result<Option<Arc<Session>>, GatewayError> {
        let now = self.clock.now_ms();
        let mut sessions = self.lock();
        if let Some(s) = sessions.get(&(app.clone(), Box::from(conference))) {
            s.last_used.touch(now);
            if s.owned_by(owner) {
                // The owner's latest password is the one to obtain tokens with.
                if let Some(p) = password {
                    if !s.password_is(p.expose_secret()) {
                        s.set_password(p);
                    }
                }
                return Ok(Some(s.clone()));
            }
            return match password {
                Some(p) if s.password_is(p.expose_secret()) => {
                    s.add_owner(owner);
                    Ok(Some(s.clone()))
                }
                Some(_) => Err(GatewayError::Forbidden(
                    "another client controls this meeting, and this host password is not its",
                )),
                None => Err(GatewayError::Forbidden(
                    "another client controls this meeting: present its host password (X-Password)",
                )),
            };
        }
        let Some(password) = password else {
            return Ok(None);
        };
        Ok(Some(self.insert(
            &mut sessions,
            app,
            conference,
            owner,
            password,
            now,
        )))
    }

    fn insert(
        &self,
        sessions: &mut HashMap<Key, Arc<Session>>,
        app: &Arc<str>,
        conference: &str,
        owner: &Owner,
        password: SecretString,
        now: u64,
    ) -> Arc<Session> {
        let max = self.cfg.load().max_conferences.max(1);
        while sessions.len() >= max {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used.get())
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => sessions.remove(&k),
                None => break,
            };
        }
        let session = Arc::new(Session {
            app: app.clone(),
            conference: Box::from(conference),
            owners: Mutex::new(vec![owner.clone()]),
            password: Mutex::new(Some(password)),
            token: ArcSwapOption::empty(),
            flight: tokio::sync::Mutex::new(()),
            keepalive: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            last_used: LastUse::new(now),
        });
        sessions.insert((app.clone(), Box::from(conference)), session.clone());
        session
    }

    /// A start made through meetgate succeeded: with `remember_start_password`, its host
    /// password becomes the meeting's session's, and `owner` may control the meeting.
    pub fn remember_start(&self, app: &Arc<str>, conference: &str, owner: &Owner, password: &str) {
        let cfg = self.cfg.load();
        if !cfg.enabled || !cfg.remember_start_password {
            return;
        }
        let now = self.clock.now_ms();
        let mut sessions = self.lock();
        match sessions.get(&(app.clone(), Box::from(conference))) {
            Some(s) => {
                // The upstream accepted this password: whoever brought it may control. The
                // same meeting is started again with the same password, mostly: kept as it is.
                s.add_owner(owner);
                if !s.password_is(password) {
                    s.set_password(SecretString::from(password));
                }
                s.last_used.touch(now);
            }
            None => {
                let password = SecretString::from(password);
                self.insert(&mut sessions, app, conference, owner, password, now);
            }
        }
    }

    /// The meeting stopped (or the session proved useless): its session, token and password go.
    pub fn end(&self, app: &str, conference: &str) {
        self.lock()
            .retain(|(a, c), _| !(**a == *app && **c == *conference));
    }

    /// Every session of `app` ends (its credentials changed, or it is gone).
    pub fn end_app(&self, app: &str) {
        self.lock().retain(|(a, _), _| **a != *app);
    }

    /// The upstream refused the token of `generation`: unless a newer one replaced it, it is
    /// dropped, and the next use obtains a new one with the password.
    pub fn invalidate(&self, session: &Session, generation: u64) {
        let current = session.token.load();
        if current.as_ref().is_some_and(|t| t.generation == generation) {
            session.token.compare_and_swap(&*current, None);
        }
    }

    /// The session's current token while valid, without waiting (a due keep-alive starts in
    /// the background, over the exchange `exchange` makes then); `None` when one must be
    /// obtained ([`Controls::token`]). The common case, so a call makes no exchange, and
    /// waits in no future, when the token is there.
    pub fn cached(
        self: &Arc<Self>,
        session: &Arc<Session>,
        exchange: impl FnOnce() -> Exchange,
    ) -> Option<(HeaderValue, u64)> {
        let now = self.clock.now_ms();
        session.last_used.touch(now);
        let (header, generation, due) = session.current(now)?;
        if due && !session.keepalive.swap(true, Ordering::AcqRel) {
            let controls = self.clone();
            let session = session.clone();
            let exchange = exchange();
            tokio::spawn(async move {
                controls.keep_alive(&session, &exchange).await;
                session.keepalive.store(false, Ordering::Release);
            });
        }
        Some((header, generation))
    }

    /// The session's token for a call: the current one while valid (a due keep-alive starts
    /// in the background), else one obtained now with the password, once however many calls
    /// wait for it. A refusal of that acquisition (a 4xx other than 429) ends the session:
    /// nothing is kept of a password the upstream did not accept, and a meeting that is over
    /// has no session.
    pub async fn token(
        self: &Arc<Self>,
        session: &Arc<Session>,
        exchange: &Exchange,
    ) -> Result<(HeaderValue, u64), Failure> {
        if let Some(current) = self.cached(session, || exchange.clone()) {
            return Ok(current);
        }
        let _flight = session.flight.lock().await;
        let now = self.clock.now_ms();
        if let Some((header, generation, _)) = session.current(now) {
            return Ok((header, generation));
        }
        let Some(password) = session.password() else {
            self.end(&session.app, &session.conference);
            return Err(Failure::Gateway(GatewayError::Forbidden(
                "no host password is known for this meeting: send X-Password",
            )));
        };
        match exchange
            .request(&session.conference, Some(&password), None)
            .await
        {
            Ok(granted) => {
                let stored = session.store(
                    granted.token.expose_secret(),
                    self.clock.now_ms(),
                    granted.lifetime,
                );
                match stored
                    .then(|| session.current(self.clock.now_ms()))
                    .flatten()
                {
                    Some((header, generation, _)) => {
                        self.metrics.control_token(false, "ok");
                        tracing::debug!(app = %session.app, conference = %session.conference, "Obtained a meeting-control token");
                        Ok((header, generation))
                    }
                    None => {
                        self.metrics.control_token(false, "failed");
                        Err(Failure::Gateway(GatewayError::ControlTokenUnusable(
                            "the control token answer holds no usable token",
                        )))
                    }
                }
            }
            Err(failure) => {
                let refused = matches!(failure, Failure::Refused(_));
                self.metrics
                    .control_token(false, if refused { "refused" } else { "failed" });
                // The upstream said no to this meeting and password (400, 401, 403, 404...);
                // a 429 or a server error says nothing about them.
                if let Failure::Refused(r) = &failure {
                    let status = r.status();
                    if status.is_client_error() && status != http::StatusCode::TOO_MANY_REQUESTS {
                        self.end(&session.app, &session.conference);
                    }
                }
                Err(failure)
            }
        }
    }

    /// Sends the current token back to `conferences/token` to keep it alive (the password
    /// goes with it, so a session the server let lapse is re-authenticated). A failure leaves
    /// the token to lapse; the next call then obtains a new one.
    async fn keep_alive(&self, session: &Session, exchange: &Exchange) {
        let _flight = session.flight.lock().await;
        let now = self.clock.now_ms();
        let Some((header, generation, true)) = session.current(now) else {
            return;
        };
        let password = session.password();
        match exchange
            .request(&session.conference, password.as_ref(), Some(&header))
            .await
        {
            Ok(granted) if session.generation.load(Ordering::Relaxed) == generation => {
                if session.store(
                    granted.token.expose_secret(),
                    self.clock.now_ms(),
                    granted.lifetime,
                ) {
                    self.metrics.control_token(true, "ok");
                    tracing::debug!(app = %session.app, conference = %session.conference, "Kept a meeting-control token alive");
                }
            }
            Ok(_) => {}
            Err(failure) => {
                let refused = matches!(failure, Failure::Refused(_));
                self.metrics
                    .control_token(true, if refused { "refused" } else { "failed" });
                tracing::info!(app = %session.app, conference = %session.conference, error = %failure, "Keeping a meeting-control token alive failed; it will lapse");
            }
        }
    }

    /// Drops sessions unused for `idle_timeout`.
    pub fn evict_idle(&self) -> usize {
        let idle = self.cfg.load().idle_timeout.as_millis() as u64;
        let now = self.clock.now_ms();
        let mut sessions = self.lock();
        let before = sessions.len();
        sessions.retain(|_, s| now.saturating_sub(s.last_used.get()) < idle);
        before - sessions.len()
    }
}

async fn evict_idle(controls: Weak<Controls>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let Some(c) = controls.upgrade() else { return };
        let gone = c.evict_idle();
        if gone > 0 {
            tracing::debug!(gone, "Dropped idle meeting-control sessions");
        }
    }
}

#[cfg(test)]
mod tests;
