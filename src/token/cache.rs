//! The token cache: one slot per token key (app, corp, user), refreshed in the background before
//! expiry, one sign-in per key at a time, failures backed off with jitter.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;

use super::{AppConfig, TokenConfig};
use crate::clock::{Clock, LastUse};
use crate::error::GatewayError;
use crate::metrics::Metrics;

/// What one sign-in produced.
pub struct Grant {
    pub access_token: SecretString,
    /// Lifetime the server granted (`validPeriod`).
    pub lifetime: Duration,
}

/// Why a sign-in failed. Never holds a key, a signature or a token.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("sign-in refused with HTTP {status} {code}")]
    Rejected { status: u16, code: String },
    #[error("sign-in answer unusable: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Upstream(GatewayError),
    #[error("sign-in timed out after {0:?}")]
    Timeout(Duration),
}

pub type SignInFuture<'a> = Pin<Box<dyn Future<Output = Result<Grant, SignInError>> + Send + 'a>>;

/// Obtains a token for an identity: App ID sign-in upstream in production, a fake in tests.
pub trait Authenticator: Send + Sync + 'static {
    fn sign_in<'a>(&'a self, app: &'a AppConfig, user: &'a str) -> SignInFuture<'a>;

    /// The upstream refused `token`: it must never be handed out again.
    fn invalidated(&self, _token: &HeaderValue) {}
}

/// Which upstream identity a token belongs to. The corp comes with the app.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub app: Arc<str>,
    pub user: Arc<str>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.user)
    }
}

/// A current access token. Its header value is marked sensitive and `Debug` is redacted.
pub struct Token {
    header: HeaderValue,
    pub refresh_at_ms: u64,
    pub expires_at_ms: u64,
    /// Increases with every sign-in for the key: an invalidation names the token it saw.
    pub generation: u64,
}

impl Token {
    /// The `X-Access-Token` value to inject.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("header", &"[redacted]")
            .field("refresh_at_ms", &self.refresh_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("generation", &self.generation)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Still valid, but a background refresh should run.
    RefreshDue,
    Expired,
}

/// Pure: how usable `token` is at `now_ms`.
pub fn freshness(token: &Token, now_ms: u64) -> Freshness {
    if now_ms >= token.expires_at_ms {
        Freshness::Expired
    } else if now_ms >= token.refresh_at_ms {
        Freshness::RefreshDue
    } else {
        Freshness::Fresh
    }
}

/// Pure: when a token granted for `lifetime` at `now_ms` is refreshed and when it counts as
/// expired. `jitter` is in `[0, 1)`. Expiry is brought forward by a twentieth of the lifetime
/// (at most 30 s) so that a request in flight does not arrive with a token that just died.
pub fn schedule(now_ms: u64, lifetime: Duration, cfg: &TokenConfig, jitter: f64) -> (u64, u64) {
    let life = lifetime.as_millis() as u64;
    let margin = (life / 20).min(30_000);
    let expires = now_ms + life - margin;
    let fraction = (cfg.refresh_at - cfg.refresh_jitter * jitter).max(0.05);
    let refresh = (now_ms + (life as f64 * fraction) as u64).min(expires);
    (refresh, expires)
}

/// Pure: the wait before attempt `failures + 1` after `failures` failures in a row:
/// exponential from `retry_initial`, capped at `retry_max`, with jitter into its upper half.
pub fn backoff(failures: u32, cfg: &TokenConfig, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = cfg
        .retry_initial
        .saturating_mul(1 << exp)
        .min(cfg.retry_max);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[derive(Default)]
struct Flight {
    failures: u32,
    next_attempt_ms: u64,
    last_error: Option<String>,
}

/// One token key's state.
pub struct Slot {
    pub key: TokenKey,
    // Swapped on reload when the app's credentials change.
    app: ArcSwap<AppConfig>,
    // Read by every request on every worker: lock-free, and `TokenCache::header` reads it
    // without taking a reference to the token.
    current: ArcSwapOption<Token>,
    // Held for the duration of a sign-in: this is what makes it one at a time per key.
    flight: tokio::sync::Mutex<Flight>,
    wake: Arc<Notify>,
    generation: AtomicU64,
    last_used: LastUse,
}

impl Slot {
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    pub fn app(&self) -> Arc<AppConfig> {
        self.app.load_full()
    }

    /// Why this slot holds no valid token, for readiness: the last sign-in error if known.
    pub fn problem(&self) -> String {
        match self.flight.try_lock() {
            Ok(f) => f
                .last_error
                .clone()
                .unwrap_or_else(|| "no token yet".to_owned()),
            Err(_) => "sign-in in progress".to_owned(),
        }
    }
}

/// Counters the cache keeps for tests, readiness and metrics.
#[derive(Debug, Default)]
pub struct TokenStats {
    pub sign_ins_ok: AtomicU64,
    pub sign_ins_failed: AtomicU64,
}

struct Inner {
    auth: Arc<dyn Authenticator>,
    clock: Arc<dyn Clock>,
    cfg: TokenConfig,
    background: bool,
    slots: Mutex<HashMap<TokenKey, Arc<Slot>>>,
    stats: TokenStats,
    metrics: Arc<Metrics>,
}

/// Tokens for every identity the gateway acts as.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl TokenCache {
    /// `background`: run a refresher task per key (production); off in unit tests, which drive
    /// the cache with a fake clock.
    pub fn new(
        auth: Arc<dyn Authenticator>,
        clock: Arc<dyn Clock>,
        cfg: TokenConfig,
        background: bool,
        metrics: Arc<Metrics>,
    ) -> TokenCache {
        let cache = TokenCache {
            inner: Arc::new(Inner {
                auth,
                clock,
                cfg,
                background,
                slots: Mutex::new(HashMap::new()),
                stats: TokenStats::default(),
                metrics,
            }),
        };
        if background {
            let weak = Arc::downgrade(&cache.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let gone = TokenCache { inner }.evict_idle();
                    if gone > 0 {
                        tracing::debug!(gone, "Dropped idle identities' tokens");
                    }
                }
            });
        }
        cache
    }

    /// Applies a reloaded app: every slot of that app uses the new credentials, and when they
    /// changed, its token is dropped so the next use (or the refresher, at once) signs in anew.
    pub fn update_app(&self, app: &Arc<AppConfig>) {
        let slots: Vec<Arc<Slot>> = {
            let slots = self.slots();
            slots
                .values()
                .filter(|s| *s.key.app == *app.name)
                .cloned()
                .collect()
        };
        for slot in slots {
            let changed = !slot.app.load().same_credentials(app);
            slot.app.store(app.clone());
            if changed {
                slot.current.store(None);
                tracing::info!(app = %slot.key.app, user = %slot.key.user, "App credentials changed; signing in again");
                slot.wake.notify_one();
            }
        }
    }

    pub fn stats(&self) -> &TokenStats {
        &self.inner.stats
    }

    /// The slot map; nothing panics while holding it, so a poisoned lock is still consistent.
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<TokenKey, Arc<Slot>>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The slot for (app, user), created (and its refresher started) on first use.
    pub fn slot(&self, app: &Arc<AppConfig>, user: &str) -> Arc<Slot> {
        let mut slots = self.slots();
        let probe = TokenKey {
            app: Arc::from(app.name.as_str()),
            user: Arc::from(user),
        };
        if let Some(slot) = slots.get(&probe) {
            return slot.clone();
        }
        let slot = Arc::new(Slot {
            key: probe.clone(),
            app: ArcSwap::new(app.clone()),
            current: ArcSwapOption::empty(),
            flight: tokio::sync::Mutex::new(Flight::default()),
            wake: Arc::new(Notify::new()),
            generation: AtomicU64::new(0),
            last_used: LastUse::new(self.inner.clock.now_ms()),
        });
        if slots.len() >= self.inner.cfg.max_identities {
            evict(&mut slots, self.inner.clock.now_ms(), &self.inner.cfg, true);
        }
        slots.insert(probe, slot.clone());
        if self.inner.background {
            tokio::spawn(refresher(
                Arc::downgrade(&slot),
                slot.wake.clone(),
                self.inner.clone(),
            ));
        }
        slot
    }

    /// Drops identities idle for longer than `token.identity_idle` (their refreshers end with
    /// them). Slots in use elsewhere, such as the apps' default identities, are kept.
    pub fn evict_idle(&self) -> usize {
        let mut slots = self.slots();
        evict(
            &mut slots,
            self.inner.clock.now_ms(),
            &self.inner.cfg,
            false,
        )
    }

    pub fn len(&self) -> usize {
        self.inner.slots.lock().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every slot's key and current token, for readiness and metrics.
    pub fn snapshot(&self) -> Vec<(TokenKey, Option<Arc<Token>>)> {
        self.slots()
            .values()
            .map(|s| (s.key.clone(), s.current()))
            .collect()
    }

    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// A valid token for the slot. Returns at once while the current token is valid (a due
    /// refresh runs in the background); otherwise waits for the one sign-in in flight.
    pub async fn get(&self, slot: &Slot) -> Result<Arc<Token>, GatewayError> {
        match self.valid(slot, Arc::clone) {
            Some(token) => Ok(token),
            None => self.sign_in(slot).await,
        }
    }

    /// What a request injects: a valid token's header value, and its generation for
    /// [`TokenCache::invalidate`]. As [`TokenCache::get`], but a valid token is read without
    /// taking a reference to it: that count is shared by every worker, and each write moves its
    /// cache line between their cores. (The header value's own count, shared too, is still
    /// written once per request: the request's headers need a value of their own.)
    pub async fn header(&self, slot: &Slot) -> Result<(HeaderValue, u64), GatewayError> {
        let take = |t: &Arc<Token>| (t.header.clone(), t.generation);
        match self.valid(slot, take) {
            Some(found) => Ok(found),
            None => self.sign_in(slot).await.map(|t| take(&t)),
        }
    }

    /// Returns once the slot holds a valid token (at once while it does), without taking it:
    /// a request waits for its token before its quota slot, so that nothing lies between the
    /// slot and the send but the send itself (the upstream counts a request when it arrives).
    pub async fn ready(&self, slot: &Slot) -> Result<(), GatewayError> {
        match self.valid(slot, |_| ()) {
            Some(()) => Ok(()),
            None => self.sign_in(slot).await.map(drop),
        }
    }

    /// `take` of the slot's token while it is valid (waking the refresher when one is due).
    fn valid<R>(&self, slot: &Slot, take: impl FnOnce(&Arc<Token>) -> R) -> Option<R> {
        let now = self.inner.clock.now_ms();
        slot.last_used.touch(now);
        let current = slot.current.load();
        let token = current.as_ref()?;
        match freshness(token, now) {
            Freshness::Fresh => Some(take(token)),
            Freshness::RefreshDue => {
                slot.wake.notify_one();
                Some(take(token))
            }
            Freshness::Expired => None,
        }
    }

    /// Waits for the one sign-in in flight for the slot, starting it if none is.
    async fn sign_in(&self, slot: &Slot) -> Result<Arc<Token>, GatewayError> {
        let mut flight = slot.flight.lock().await;
        self.inner.sign_in_locked(slot, &mut flight, false).await
    }

    /// Drops the token with `generation` after the upstream refused it, unless a newer one
    /// already replaced it; the next `get` signs in (once, however many callers).
    pub fn invalidate(&self, slot: &Slot, generation: u64) {
        let current = slot.current.load();
        let Some(token) = current.as_ref().filter(|t| t.generation == generation) else {
            return;
        };
        // Dead first, then dropped: a sign-in that starts the moment the slot is empty (on
        // another worker) must already know not to adopt this token again from a shared store.
        self.inner.auth.invalidated(token.header());
        // Only if it is still that token: a sign-in may have replaced it meanwhile.
        let previous = slot.current.compare_and_swap(&*current, None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
            tracing::info!(app = %slot.key.app, user = %slot.key.user, generation, "Token refused upstream; signing in again");
        }
    }
}

impl Inner {
    /// Signs in for `slot` while holding its flight lock, unless a usable token appeared
    /// meanwhile (`refresh`: only a fresh one will do) or the back-off says not yet.
    async fn sign_in_locked(
        &self,
        slot: &Slot,
        flight: &mut Flight,
        refresh: bool,
    ) -> Result<Arc<Token>, GatewayError> {
        let now = self.clock.now_ms();
        let mut had_valid = false;
        if let Some(token) = slot.current() {
            match freshness(&token, now) {
                Freshness::Fresh => return Ok(token),
                Freshness::RefreshDue if !refresh => return Ok(token),
                Freshness::RefreshDue => had_valid = true,
                Freshness::Expired => {}
            }
        }
        if now < flight.next_attempt_ms {
            return Err(self.unavailable(slot, flight));
        }
        let app = slot.app.load_full();
        let result = tokio::time::timeout(
            self.cfg.sign_in_timeout,
            self.auth.sign_in(&app, &slot.key.user),
        )
        .await
        .unwrap_or(Err(SignInError::Timeout(self.cfg.sign_in_timeout)));
        let now = self.clock.now_ms();
        let outcome = result.and_then(|grant| {
            if grant.lifetime.is_zero() {
                return Err(SignInError::BadResponse("token lifetime is 0".into()));
            }
            let mut header =
                HeaderValue::from_str(grant.access_token.expose_secret()).map_err(|_| {
                    SignInError::BadResponse("accessToken is not a valid header value".into())
                })?;
            header.set_sensitive(true);
            Ok((header, grant.lifetime))
        });
        match outcome {
            Ok((header, lifetime)) => {
                let (refresh_at_ms, expires_at_ms) =
                    schedule(now, lifetime, &self.cfg, rand::random::<f64>());
                let generation = slot.generation.fetch_add(1, Ordering::Relaxed) + 1;
                let token = Arc::new(Token {
                    header,
                    refresh_at_ms,
                    expires_at_ms,
                    generation,
                });
                slot.current.store(Some(token.clone()));
                *flight = Flight::default();
                self.stats.sign_ins_ok.fetch_add(1, Ordering::Relaxed);
                self.metrics.sign_in(&slot.key.app, had_valid, true);
                tracing::info!(
                    app = %slot.key.app,
                    user = %slot.key.user,
                    lifetime_s = lifetime.as_secs(),
                    generation,
                    "Signed in"
                );
                slot.wake.notify_one();
                Ok(token)
            }
            Err(e) => {
                flight.failures += 1;
                let wait = backoff(flight.failures, &self.cfg, rand::random::<f64>());
                flight.next_attempt_ms = now + wait.as_millis() as u64;
                flight.last_error = Some(e.to_string());
                self.stats.sign_ins_failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.sign_in(&slot.key.app, had_valid, false);
                tracing::warn!(
                    app = %slot.key.app,
                    user = %slot.key.user,
                    error = %e,
                    failures = flight.failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "Sign-in failed"
                );
                // A failed refresh leaves a still-valid token usable.
                match slot.current() {
                    Some(t) if freshness(&t, now) != Freshness::Expired => Ok(t),
                    _ => Err(self.unavailable(slot, flight)),
                }
            }
        }
    }

    fn unavailable(&self, slot: &Slot, flight: &Flight) -> GatewayError {
        GatewayError::TokenUnavailable {
            app: slot.key.app.to_string(),
            reason: flight
                .last_error
                .clone()
                .unwrap_or_else(|| "sign-in pending".into()),
        }
    }
}

/// Removes idle slots nobody else holds; with `make_room`, also the least recently used ones
/// until the map is below `max_identities`. Returns how many went.
fn evict(
    slots: &mut HashMap<TokenKey, Arc<Slot>>,
    now_ms: u64,
    cfg: &TokenConfig,
    make_room: bool,
) -> usize {
    let before = slots.len();
    // Last use is recorded to the second; never evict within that resolution.
    let idle_ms = cfg.identity_idle.as_millis() as u64 + LastUse::RESOLUTION_MS;
    slots.retain(|_, s| {
        Arc::strong_count(s) > 1 || now_ms.saturating_sub(s.last_used.get()) < idle_ms
    });
    if make_room && slots.len() >= cfg.max_identities {
        let mut unused: Vec<(u64, TokenKey)> = slots
            .iter()
            .filter(|(_, s)| Arc::strong_count(s) == 1)
            .map(|(k, s)| (s.last_used.get(), k.clone()))
            .collect();
        unused.sort_by_key(|(t, _)| *t);
        let excess = slots.len() + 1 - cfg.max_identities;
        for (_, k) in unused.into_iter().take(excess) {
            slots.remove(&k);
        }
    }
    before - slots.len()
}

/// Keeps one slot's token fresh without traffic: signs in at start, refreshes at `refresh_at`,
/// retries after failures on the back-off schedule. Ends when the slot is dropped.
async fn refresher(slot: Weak<Slot>, wake: Arc<Notify>, inner: Arc<Inner>) {
    loop {
        let wait = {
            let Some(slot) = slot.upgrade() else { return };
            let now = inner.clock.now_ms();
            let due = slot.current().map_or(now, |t| t.refresh_at_ms);
            let next_attempt = slot.flight.try_lock().map_or(now, |f| f.next_attempt_ms);
            due.max(next_attempt).saturating_sub(now)
        };
        if wait > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                () = wake.notified() => {}
            }
        }
        let Some(slot) = slot.upgrade() else { return };
        let now = inner.clock.now_ms();
        let due = slot
            .current()
            .is_none_or(|t| freshness(&t, now) != Freshness::Fresh);
        if due {
            let mut flight = slot.flight.lock().await;
            if now >= flight.next_attempt_ms {
                // Errors are logged and counted inside; the loop just carries on.
                let _ = inner.sign_in_locked(&slot, &mut flight, true).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;
    use std::sync::atomic::AtomicUsize;

    fn cfg() -> TokenConfig {
        TokenConfig {
            max_identities: 3,
            identity_idle: Duration::from_secs(60),
            refresh_at: 0.8,
            refresh_jitter: 0.05,
            signature_lifetime: Duration::from_secs(600),
            sign_in_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
        }
    }

    fn app() -> Arc<AppConfig> {
        Arc::new(AppConfig {
            name: "default".into(),
            app_id: "app".into(),
            app_key: SecretString::from("key".to_owned()),
            key_source: crate::secret::KeySource::Inline,
            corp_id: None,
            user_id: String::new(),
        })
    }

    struct Fake {
        calls: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
        lifetime: Duration,
    }

    impl Authenticator for Fake {
        fn sign_in<'a>(&'a self, _app: &'a AppConfig, _user: &'a str) -> SignInFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                // Let concurrent callers pile up behind the flight lock.
                tokio::task::yield_now().await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(SignInError::Rejected {
                        status: 500,
                        code: "X".into(),
                    });
                }
                Ok(Grant {
                    access_token: SecretString::from(format!("tok-{n}")),
                    lifetime: self.lifetime,
                })
            })
        }
    }

    fn setup(lifetime_s: u64) -> (TokenCache, Arc<Fake>, Arc<FakeClock>) {
        let fake = Arc::new(Fake {
            calls: AtomicUsize::new(0),
            fail: Default::default(),
            lifetime: Duration::from_secs(lifetime_s),
        });
        let clock = Arc::new(FakeClock::new(1_700_000_000_000));
        let cache = TokenCache::new(fake.clone(), clock.clone(), cfg(), false, Arc::default());
        (cache, fake, clock)
    }

    #[test]
    fn schedule_refreshes_at_80_percent_minus_jitter() {
        let c = cfg();
        let (r, e) = schedule(0, Duration::from_secs(100), &c, 0.0);
        assert_eq!(r, 80_000);
        assert_eq!(e, 95_000);
        let (r, _) = schedule(0, Duration::from_secs(100), &c, 0.999);
        assert!((75_000..80_000).contains(&r), "{r}");
        // Long lifetimes: the expiry margin is capped at 30 s.
        let (_, e) = schedule(0, Duration::from_secs(43_200), &c, 0.0);
        assert_eq!(e, 43_200_000 - 30_000);
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        let c = cfg();
        assert_eq!(backoff(1, &c, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(1, &c, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(3, &c, 1.0), Duration::from_millis(2000));
        assert_eq!(backoff(30, &c, 1.0), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn concurrent_cold_start_signs_in_once() {
        let (cache, fake, _clock) = setup(100);
        let slot = cache.slot(&app(), "");
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let cache = cache.clone();
            let slot = slot.clone();
            tasks.push(tokio::spawn(async move {
                cache.get(&slot).await.map(|t| t.generation)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("join").expect("token"), 1);
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn valid_token_never_waits_and_expired_is_never_returned() {
        let (cache, fake, clock) = setup(100);
        let slot = cache.slot(&app(), "");
        let t1 = cache.get(&slot).await.expect("token");
        clock.advance_ms(85_000); // past refresh_at, before expiry: served at once
        let t2 = cache.get(&slot).await.expect("token");
        assert_eq!(t1.generation, t2.generation);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        clock.advance_ms(10_000); // past expiry (95 s): a new sign-in
        let t3 = cache.get(&slot).await.expect("token");
        assert_eq!(t3.generation, 2);
        assert!(t3.expires_at_ms > clock.now_ms());
    }

    #[tokio::test]
    async fn failures_back_off_and_keep_a_valid_token() {
        let (cache, fake, clock) = setup(100);
        let slot = cache.slot(&app(), "");
        fake.fail.store(true, Ordering::SeqCst);
        let err = cache.get(&slot).await.expect_err("no token");
        assert_eq!(err.code(), "MEETGATE.TOKEN_UNAVAILABLE");
        // Inside the back-off window nobody reaches the upstream, however many ask.
        for _ in 0..50 {
            assert!(cache.get(&slot).await.is_err());
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        clock.advance_ms(600);
        fake.fail.store(false, Ordering::SeqCst);
        let t = cache.get(&slot).await.expect("token after back-off");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        // A failed refresh while the token is valid keeps serving it.
        fake.fail.store(true, Ordering::SeqCst);
        clock.advance_ms(85_000);
        {
            let mut flight = slot.flight.lock().await;
            let kept = cache
                .inner
                .sign_in_locked(&slot, &mut flight, true)
                .await
                .expect("still valid");
            assert_eq!(kept.generation, t.generation);
        }
        clock.advance_ms(20_000);
        assert!(
            cache.get(&slot).await.is_err(),
            "expired token is never returned"
        );
    }

    #[tokio::test]
    async fn invalidate_only_drops_the_named_generation() {
        let (cache, fake, _clock) = setup(100);
        let slot = cache.slot(&app(), "");
        let t1 = cache.get(&slot).await.expect("token");
        cache.invalidate(&slot, t1.generation);
        let t2 = cache.get(&slot).await.expect("token");
        assert_eq!(t2.generation, 2);
        // A late invalidation of the old token leaves the new one alone.
        cache.invalidate(&slot, t1.generation);
        assert_eq!(cache.get(&slot).await.expect("token").generation, 2);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn header_is_the_current_tokens_value_and_generation_signing_in_when_none_is_valid() {
        let (cache, fake, clock) = setup(100);
        let slot = cache.slot(&app(), "");
        let (h1, g1) = cache.header(&slot).await.expect("signed in");
        assert_eq!((h1.to_str().expect("ascii"), g1), ("tok-0", 1));
        assert!(h1.is_sensitive());
        let (h2, g2) = cache.header(&slot).await.expect("cached");
        assert_eq!((h2, g2), (h1.clone(), 1));
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);

        cache.invalidate(&slot, g1);
        let (h3, g3) = cache.header(&slot).await.expect("signed in again");
        assert_eq!((h3.to_str().expect("ascii"), g3), ("tok-1", 2));

        // Past its expiry margin the token is not handed out: the caller waits for a sign-in.
        clock.advance_ms(96_000);
        let (h4, g4) = cache.header(&slot).await.expect("signed in after expiry");
        assert_eq!((h4.to_str().expect("ascii"), g4), ("tok-2", 3));
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn identities_are_bounded_and_idle_ones_dropped() {
        let (cache, _fake, clock) = setup(100);
        let app = app();
        let pinned = cache.slot(&app, "");
        for user in ["u1", "u2", "u3", "u4"] {
            let s = cache.slot(&app, user);
            cache.get(&s).await.expect("token");
            clock.advance_ms(10);
        }
        // max_identities is 3: the least recently used unpinned ones made room.
        assert_eq!(cache.len(), 3);
        let keys: Vec<String> = cache
            .snapshot()
            .iter()
            .map(|(k, _)| format!("{k:?}"))
            .collect();
        assert!(keys.contains(&"default/".to_owned()), "{keys:?}");
        assert!(keys.contains(&"default/u4".to_owned()), "{keys:?}");
        clock.advance_ms(61_000);
        assert_eq!(cache.evict_idle(), 2);
        assert_eq!(cache.len(), 1, "only the pinned default identity is left");
        drop(pinned);
    }

    #[test]
    fn token_debug_is_redacted() {
        let mut header = HeaderValue::from_static("very-secret-token");
        header.set_sensitive(true);
        let t = Token {
            header,
            refresh_at_ms: 1,
            expires_at_ms: 2,
            generation: 1,
        };
        assert!(!format!("{t:?}").contains("very-secret-token"));
    }
}
