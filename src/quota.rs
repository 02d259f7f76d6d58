//! Upstream quotas: window-safe governor limits per bucket, FIFO pacing bounded by `max_wait`,
//! synchronisation with the upstream's `X-APIG-Ratelimit-*` counters, and holds after a 429.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::clock::{Clock as GovernorClock, DefaultClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::HeaderMap;

use crate::clock::LastUse;
use crate::cluster::Cluster;
use crate::config::{QuotaConfig, QuotaMode, QuotaScope};
use crate::headers::{X_APIG_RATELIMIT_ALLENV, X_APIG_RATELIMIT_API};
use crate::operations::OperationId;

/// Which of an operation's upstream limits a limiter mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Per API per minute (`X-APIG-Ratelimit-Api`).
    PerApi,
    /// Per API across all environments per second (`X-APIG-Ratelimit-Api-Allenv`).
    AllEnv,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::PerApi => "per_api",
            LimitKind::AllEnv => "all_env",
        }
    }
}

/// One limit: at most `limit` requests in any window of `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSpec {
    pub kind: LimitKind,
    pub limit: NonZeroU32,
    pub window: Duration,
}

/// This replica's share of a limit when replicas cannot coordinate: N / replicas (at least 1)
/// in the same window, with the burst cut to fit.
pub fn fallback_share(
    spec: LimitSpec,
    params: GcraParams,
    margin: Duration,
    replicas: u32,
) -> (LimitSpec, GcraParams) {
    let n = (spec.limit.get() / replicas.max(1)).max(1);
    let limit = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    let share = LimitSpec { limit, ..spec };
    if n == 1 {
        // One per window (plus margin): burst 1, interval longer than the window.
        let interval = spec.window + margin + Duration::from_nanos(1);
        return (
            share,
            GcraParams {
                burst: NonZeroU32::MIN,
                interval,
            },
        );
    }
    let burst = params
        .burst
        .min(NonZeroU32::new(n - 1).unwrap_or(NonZeroU32::MIN));
    let derived = derive(limit, spec.window, margin, burst).unwrap_or(GcraParams {
        burst: NonZeroU32::MIN,
        interval: spec.window + margin + Duration::from_nanos(1),
    });
    (share, derived)
}

/// GCRA parameters: `burst` at once, then one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraParams {
    pub burst: NonZeroU32,
    pub interval: Duration,
}

/// Derives GCRA parameters so that no window of length `window + margin`, at any alignment,
/// admits more than `limit`. Governor admits at most `b + ceil(W/T) - 1` in a half-open window
/// of length W (`b + floor(W/T)` in a closed one); choosing `T` a nanosecond above
/// `(W + d) / (N - b + 1)` keeps `(W + d) / T` strictly below `N - b + 1`, which bounds both.
pub fn derive(
    limit: NonZeroU32,
    window: Duration,
    margin: Duration,
    burst: NonZeroU32,
) -> Result<GcraParams, String> {
    let (n, b) = (limit.get(), burst.get());
    if b >= n {
        return Err(format!(
            "burst {b} must be below the limit {n}: with a burst as large as the limit no steady rate is left"
        ));
    }
    let span = (window + margin).as_nanos();
    let slots = u128::from(n - b + 1);
    let interval_ns = span / slots + 1;
    let interval =
        Duration::from_nanos(u64::try_from(interval_ns).map_err(|_| "window too long".to_owned())?);
    Ok(GcraParams { burst, interval })
}

/// Governor state that can be rolled back: a request refused by a later limiter must not keep
/// the slot an earlier one gave it. Only touched under the bucket's gate.
#[derive(Clone, Default)]
struct RollbackCell(Arc<AtomicU64>);

impl StateStore for RollbackCell {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let prev = self.0.load(Ordering::Acquire);
        let (result, next) = f((prev != 0).then(|| Nanos::from(prev)))?;
        self.0.store(next.as_u64(), Ordering::Release);
        Ok(result)
    }
}

type Limiter = RateLimiter<NotKeyed, RollbackCell, DefaultClock, StateInformationMiddleware>;

/// Counters the upstream reported: at most `remain` more until `until`.
#[derive(Debug, Clone, Copy)]
struct Budget {
    remain: u64,
    until: Instant,
}

struct Limit {
    spec: LimitSpec,
    params: GcraParams,
    limiter: Limiter,
    cell: RollbackCell,
    /// Our own admissions inside the last window: what we expect the upstream to have counted.
    recent: Recent,
    budget: Option<Budget>,
    /// Burst capacity left after the last admission, and when: to estimate a queue's wait.
    spare: u32,
    spare_at: Instant,
    /// What the upstream's counter said last, for metrics.
    last_upstream_remain: Option<u64>,
}

impl Limit {
    /// A limiter with `available` of its burst usable at once (the rest counts as just spent).
    fn new(spec: LimitSpec, params: GcraParams, clock: &DefaultClock, available: u32) -> Limit {
        let cell = RollbackCell::default();
        let quota = Quota::with_period(params.interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(params.burst);
        let limiter: Limiter =
            RateLimiter::<NotKeyed, RollbackCell, DefaultClock, NoOpMiddleware<_>>::new(
                quota,
                cell.clone(),
                clock.clone(),
            )
            .with_middleware::<StateInformationMiddleware>();
        let spare = available.min(params.burst.get());
        for _ in spare..params.burst.get() {
            if limiter.check().is_err() {
                break;
            }
        }
        Limit {
            spec,
            params,
            limiter,
            cell,
            recent: Recent::new(spec.window, Instant::now()),
            budget: None,
            spare,
            spare_at: Instant::now(),
            last_upstream_remain: None,
        }
    }

    /// Replaces `old` with new parameters without granting a fresh burst: what can go at once
    /// is no more than before, and no more than the new burst less our own requests of the
    /// last window (which the new limiter never saw).
    fn rebuilt(
        old: Limit,
        spec: LimitSpec,
        params: GcraParams,
        clock: &DefaultClock,
        now: Instant,
    ) -> Limit {
        let used = old
            .recent
            .count_within(now, old.spec.window.max(spec.window));
        let available = old
            .available(now)
            .min(u64::from(params.burst.get()).saturating_sub(used));
        let mut fresh = Limit::new(spec, params, clock, available as u32);
        fresh.recent = old.recent;
        fresh.budget = old.budget;
        fresh.last_upstream_remain = old.last_upstream_remain;
        fresh
    }

    /// Slots available at `now`, from the capacity left at the last admission plus what has
    /// been replenished since.
    fn available(&self, now: Instant) -> u64 {
        let refilled =
            now.duration_since(self.spare_at).as_nanos() / self.params.interval.as_nanos().max(1);
        (u64::from(self.spare) + refilled as u64).min(u64::from(self.params.burst.get()))
    }

    /// Keeps our admissions of the last `window + margin`: a request we admitted just over a
    /// window ago may have reached the upstream just under one, and must still count as ours
    /// or the upstream's counters would look like someone else's traffic.
    fn prune(&mut self, now: Instant, margin: Duration) {
        self.recent.prune(now, self.spec.window + margin);
    }
}

/// Slots per window in [`Recent`].
const RECENT_SLOTS: u32 = 64;

/// Admissions over a trailing span, counted per slot of `window / RECENT_SLOTS`: memory stays
/// a few dozen entries whatever the limit (a log of instants grows with the limit, megabytes
/// for large ones). A slot counts until all of it has aged out, so counts err towards "ours"
/// by at most one slot.
struct Recent {
    slot: Duration,
    origin: Instant,
    /// (slot index since `origin`, admissions in it), oldest first.
    slots: VecDeque<(u64, u32)>,
}

impl Recent {
    fn new(window: Duration, origin: Instant) -> Recent {
        Recent {
            slot: (window / RECENT_SLOTS).max(Duration::from_millis(1)),
            origin,
            slots: VecDeque::new(),
        }
    }

    fn index(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    /// Index of the oldest slot that still overlaps `span` before `now`.
    fn oldest_within(&self, now: Instant, span: Duration) -> u64 {
        now.checked_sub(span).map_or(0, |start| self.index(start))
    }

    fn push(&mut self, at: Instant) {
        let i = self.index(at);
        match self.slots.back_mut() {
            Some((last, n)) if *last == i => *n = n.saturating_add(1),
            _ => self.slots.push_back((i, 1)),
        }
    }

    /// Drops slots that lie wholly before `now - horizon`.
    fn prune(&mut self, now: Instant, horizon: Duration) {
        let oldest = self.oldest_within(now, horizon);
        while self.slots.front().is_some_and(|(i, _)| *i < oldest) {
            self.slots.pop_front();
        }
    }

    /// Admissions in slots overlapping the `span` before `now`.
    fn count_within(&self, now: Instant, span: Duration) -> u64 {
        let oldest = self.oldest_within(now, span);
        self.slots
            .iter()
            .filter(|(i, _)| *i >= oldest)
            .map(|(_, n)| u64::from(*n))
            .sum()
    }

    fn total(&self) -> u64 {
        self.slots.iter().map(|(_, n)| u64::from(*n)).sum()
    }
}

/// The mutable part of a bucket, touched only by the request at the head of its queue.
struct BucketState {
    limits: Vec<Limit>,
    /// This replica's share of each limit while the shared store is unreachable.
    fallback: Vec<Limit>,
    hold_until: Option<Instant>,
    /// Admitted requests not finished yet. Kept under the lock the admission and the
    /// response's report take anyway: as an atomic of its own it was two more writes per
    /// request to memory every worker shares.
    in_flight: usize,
}

/// One bucket: the limits of one operation for one scope key (app, user or the gateway).
pub struct Bucket {
    op: OperationId,
    // FIFO: tokio's mutex queues waiters in arrival order, which is the pacing order.
    gate: tokio::sync::Mutex<()>,
    state: Mutex<BucketState>,
    waiting: AtomicUsize,
    born: Instant,
    /// Milliseconds after `born` of the last request.
    last_used: LastUse,
    /// Largest emission interval: the spacing between two paced requests at worst.
    slowest: Duration,
    margin: Duration,
    /// `q:<operation>:<app>:<user>` for the shared store's keys.
    shared_base: String,
}

impl Bucket {
    pub fn operation(&self) -> OperationId {
        self.op
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// What is left per limit: (kind, left in the last window by our own count, what the
    /// upstream last reported).
    pub fn remaining(&self) -> Vec<(LimitKind, u32, Option<u64>)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        state
            .limits
            .iter()
            .map(|l| {
                let used = l.recent.count_within(now, l.spec.window);
                (
                    l.spec.kind,
                    l.spec
                        .limit
                        .get()
                        .saturating_sub(u32::try_from(used).unwrap_or(u32::MAX)),
                    l.last_upstream_remain,
                )
            })
            .collect()
    }

    /// Tries every limit, short window first; on refusal rolls back what earlier limits gave
    /// and returns how long until a slot could be free.
    fn try_admit(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::precheck(&mut state, now)?;
        let spares = Self::check_limiters(&state.limits)?;
        self.record(&mut state, now, Some(spares));
        Ok(())
    }

    /// Local fallback while the shared store is unreachable: this replica's share
    /// (1/`max_replicas`) of every limit.
    fn try_admit_fallback(
        &self,
        now: Instant,
        clock: &DefaultClock,
        margin: Duration,
        replicas: u32,
    ) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::precheck(&mut state, now)?;
        if state.fallback.is_empty() {
            state.fallback = state
                .limits
                .iter()
                .map(|l| {
                    let (spec, params) = fallback_share(l.spec, l.params, margin, replicas);
                    // Starts spent: falling back never grants a fresh burst on top of the
                    // shared one just used.
                    Limit::new(spec, params, clock, 0)
                })
                .collect();
        }
        Self::check_limiters(&state.fallback)?;
        self.record(&mut state, now, None);
        Ok(())
    }

    /// Holds (after an upstream 429) and upstream-reported budgets.
    fn precheck(state: &mut BucketState, now: Instant) -> Result<(), Duration> {
        if let Some(hold) = state.hold_until {
            if now < hold {
                return Err(hold - now);
            }
            state.hold_until = None;
        }
        for limit in &mut state.limits {
            if let Some(b) = limit.budget {
                if now >= b.until {
                    limit.budget = None;
                } else if b.remain == 0 {
                    return Err(b.until - now);
                }
            }
        }
        Ok(())
    }

    /// Every limiter, short window first; on a refusal the earlier ones get their slot back.
    /// Returns each limiter's burst capacity left.
    fn check_limiters(limits: &[Limit]) -> Result<[u32; 2], Duration> {
        let mut taken: [(u64, u32); 2] = [(0, 0); 2];
        for (i, limit) in limits.iter().enumerate() {
            let prev = limit.cell.0.load(Ordering::Acquire);
            match limit.limiter.check() {
                Ok(snapshot) => {
                    if let Some(slot) = taken.get_mut(i) {
                        *slot = (prev, snapshot.remaining_burst_capacity());
                    }
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    for (j, (prev, _)) in taken.iter().enumerate().take(i) {
                        limits[j].cell.0.store(*prev, Ordering::Release);
                    }
                    return Err(wait.max(Duration::from_millis(1)));
                }
            }
        }
        Ok([taken[0].1, taken[1].1])
    }

    /// Books an admission into our own accounting (for the upstream counters and estimates).
    fn record(&self, state: &mut BucketState, now: Instant, spares: Option<[u32; 2]>) {
        state.in_flight += 1;
        for (i, limit) in state.limits.iter_mut().enumerate() {
            limit.prune(now, self.margin);
            limit.recent.push(now);
            if let Some(spares) = spares {
                limit.spare = spares.get(i).copied().unwrap_or(0);
                limit.spare_at = now;
            }
            if let Some(b) = &mut limit.budget {
                b.remain = b.remain.saturating_sub(1);
            }
        }
    }

    /// The shared keys and GCRA parameters (interval, tolerance) of this bucket's limits.
    fn shared_limits(&self, cluster: &Cluster) -> Vec<(String, Duration, Duration)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .limits
            .iter()
            .map(|l| {
                let tau = l.params.interval.saturating_mul(l.params.burst.get() - 1);
                (
                    cluster.key(&[&self.shared_base, l.spec.kind.as_str()]),
                    l.params.interval,
                    tau,
                )
            })
            .collect()
    }

    fn touch(&self, now: Instant) {
        self.last_used
            .touch(now.duration_since(self.born).as_millis() as u64);
    }

    fn last_used(&self) -> Instant {
        self.born + Duration::from_millis(self.last_used.get())
    }

    /// How long a request with `ahead` requests queued before it will likely wait.
    fn estimate_wait(&self, ahead: u64, now: Instant) -> Duration {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = state
            .hold_until
            .map_or(Duration::ZERO, |h| h.saturating_duration_since(now));
        for limit in &state.limits {
            let short = (ahead + 1).saturating_sub(limit.available(now));
            wait = wait.max(
                limit
                    .params
                    .interval
                    .saturating_mul(short.min(u64::from(u32::MAX)) as u32),
            );
        }
        wait
    }
}

/// A slot was granted: the request may go upstream. [`QuotaManager::observe`] or dropping it
/// marks the request finished.
pub struct Admission {
    bucket: Arc<Bucket>,
    /// Time spent waiting for the slot.
    pub waited: Duration,
    /// Counted out of `in_flight` already (by `observe`).
    finished: bool,
}

impl Admission {
    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.finished {
            let mut state = self.bucket.state.lock().unwrap_or_else(|p| p.into_inner());
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No slot within the deadline; one could be free after `retry_after`.
    Exhausted { retry_after: Duration },
    /// The gateway is shutting down: nobody waits any more.
    ShuttingDown,
}

/// Counts a waiter for as long as it waits, including when its future is dropped.
struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which bucket a request falls into.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub op: OperationId,
    pub app: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
}

/// A parsed `X-APIG-Ratelimit-*` value: `remain:R,limit:L,time:1 minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitReport {
    pub remain: Option<u64>,
    pub limit: Option<u64>,
    pub window: Option<Duration>,
}

/// Parses a rate-limit header, tolerating case, spaces, order and missing or garbage fields.
/// Returns `None` when nothing usable is in it.
pub fn parse_ratelimit(value: &str) -> Option<RateLimitReport> {
    let mut report = RateLimitReport {
        remain: None,
        limit: None,
        window: None,
    };
    for part in value.split([',', ';']) {
        let Some((name, val)) = part.split_once([':', '=']) else {
            continue;
        };
        let val = val.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "remain" => report.remain = val.parse().ok(),
            "limit" => report.limit = val.parse().ok(),
            "time" => report.window = parse_window(val),
            _ => {}
        }
    }
    (report.remain.is_some() || report.limit.is_some()).then_some(report)
}

fn parse_window(text: &str) -> Option<Duration> {
    let text = text.trim().to_ascii_lowercase();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = if num.is_empty() { 1 } else { num.parse().ok()? };
    let unit = unit.trim().trim_end_matches('s');
    let secs = match unit {
        "m" => return Some(Duration::from_millis(n)),
        "second" | "sec" | "" => 1,
        "minute" | "min" => 60,
        "hour" | "h" => 3600,
        "day" | "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(secs)?))
}

/// All buckets and the settings they are built from.
pub struct QuotaManager {
    cfg: ArcSwap<QuotaConfig>,
    cluster: Option<Arc<Cluster>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Mirrors `shutdown` for the admission fast path, which has no receiver to subscribe.
    shutting_down: AtomicBool,
    clock: DefaultClock,
    buckets: Mutex<HashMap<BucketKey, Arc<Bucket>>>,
    /// One warning per operation when the upstream reports a lower limit than configured.
    warned: Mutex<HashMap<(OperationId, &'static str), ()>>,
    pub upstream_429s: AtomicU64,
    disabled_warned: AtomicBool,
}

impl QuotaManager {
    pub fn new(cfg: QuotaConfig) -> Arc<QuotaManager> {
        QuotaManager::with_cluster(cfg, None)
    }

    /// With `cluster`, every decision is made by the shared store (one atomic script), with a
    /// local fallback at 1/`max_replicas` while it is unreachable.
    pub fn with_cluster(cfg: QuotaConfig, cluster: Option<Arc<Cluster>>) -> Arc<QuotaManager> {
        let mgr = Arc::new(QuotaManager {
            cfg: ArcSwap::from_pointee(cfg),
            cluster,
            shutdown: tokio::sync::watch::Sender::new(false),
            shutting_down: AtomicBool::new(false),
            clock: DefaultClock::default(),
            buckets: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashMap::new()),
            upstream_429s: AtomicU64::new(0),
            disabled_warned: AtomicBool::new(false),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(evict_idle(Arc::downgrade(&mgr)));
        }
        mgr
    }

    pub fn config(&self) -> Arc<QuotaConfig> {
        self.cfg.load_full()
    }

    pub fn enabled(&self) -> bool {
        self.cfg.load().enabled
    }

    /// Every request waiting for a slot, and every later one, is refused from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.shutdown.send_replace(true);
    }

    /// Requests waiting for a slot, across all buckets.
    pub fn waiting(&self) -> usize {
        self.buckets
            .lock()
            .map(|b| b.values().map(|b| b.waiting()).sum())
            .unwrap_or(0)
    }

    /// Applies reloaded quota settings. Buckets keep their history; a limit whose parameters
    /// changed gets a new limiter that starts with its burst spent, so a reload never grants a
    /// fresh burst.
    pub fn reconfigure(&self, cfg: QuotaConfig) {
        let buckets = self.buckets();
        let now = Instant::now();
        for (_, bucket) in buckets {
            let wanted = cfg.limits_for(bucket.op);
            let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut limits = Vec::with_capacity(wanted.len());
            for (spec, params) in wanted {
                let old = state.limits.iter().position(|l| l.spec.kind == spec.kind);
                match old.map(|i| state.limits.swap_remove(i)) {
                    Some(l) if l.spec == spec && l.params == params => limits.push(l),
                    Some(l) => limits.push(Limit::rebuilt(l, spec, params, &self.clock, now)),
                    None => limits.push(Limit::new(spec, params, &self.clock, 0)),
                }
            }
            limits.sort_by_key(|l| l.spec.window);
            state.limits = limits;
            state.fallback.clear();
        }
        self.cfg.store(Arc::new(cfg));
    }

    /// The bucket key for a request acting as (app, user) on `op`, per the configured scope.
    pub fn key(&self, op: OperationId, app: &Arc<str>, user: &Arc<str>) -> BucketKey {
        match self.cfg.load().scope {
            QuotaScope::Gateway => BucketKey {
                op,
                app: None,
                user: None,
            },
            QuotaScope::App => BucketKey {
                op,
                app: Some(app.clone()),
                user: None,
            },
            QuotaScope::User => BucketKey {
                op,
                app: Some(app.clone()),
                user: Some(user.clone()),
            },
        }
    }

    fn bucket(&self, key: &BucketKey) -> Arc<Bucket> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = buckets.get(key) {
            return b.clone();
        }
        let op = key.op;
        let cfg = self.cfg.load();
        let limits = cfg
            .limits_for(op)
            .into_iter()
            .map(|(spec, params)| Limit::new(spec, params, &self.clock, params.burst.get()))
            .collect::<Vec<_>>();
        let slowest = limits
            .iter()
            .map(|l| l.params.interval)
            .max()
            .unwrap_or_default();
        let bucket = Arc::new(Bucket {
            op,
            gate: tokio::sync::Mutex::new(()),
            state: Mutex::new(BucketState {
                limits,
                fallback: Vec::new(),
                hold_until: None,
                in_flight: 0,
            }),
            waiting: AtomicUsize::new(0),
            born: Instant::now(),
            last_used: LastUse::new(0),
            slowest,
            margin: cfg.safety_margin,
            shared_base: format!(
                "q:{}:{}:{}",
                crate::operations::OperationTable::global().get(op).name,
                key.app.as_deref().unwrap_or("*"),
                key.user.as_deref().unwrap_or("*"),
            ),
        });
        buckets.insert(key.clone(), bucket.clone());
        bucket
    }

    /// The bucket for `key`, if it exists.
    pub fn find(&self, key: &BucketKey) -> Option<Arc<Bucket>> {
        self.buckets.lock().ok().and_then(|b| b.get(key).cloned())
    }

    /// Number of live buckets (bounded by idle eviction).
    pub fn bucket_count(&self) -> usize {
        self.buckets.lock().map_or(0, |b| b.len())
    }

    /// Every bucket with its operation, for metrics.
    pub fn buckets(&self) -> Vec<(BucketKey, Arc<Bucket>)> {
        self.buckets
            .lock()
            .map(|b| b.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Waits for a slot in every limit of `key`'s bucket, in arrival order, until `deadline`.
    /// In `reject` mode, or when the slot is further away than the deadline, refuses at once.
    pub async fn acquire(&self, key: &BucketKey, deadline: Instant) -> Result<Admission, Refused> {
        let bucket = self.bucket(key);
        let start = Instant::now();
        bucket.touch(start);
        // Nobody queued and a slot free now: admitted without the gate. The limiter's own
        // lock keeps the count exact; skipping the async gate means requests on different
        // workers never wake each other through it (a cross-thread wake-up per contended
        // request otherwise). Shared mode decides on Redis, asynchronously, so it queues.
        // (A free slot means no wait to estimate: with nobody ahead the estimate is zero.)
        // Only reads of the shared counters here: every write to a line that all workers
        // touch moves it between cores.
        if bucket.waiting.load(Ordering::Relaxed) == 0
            && self.cluster.is_none()
            && !self.shutting_down.load(Ordering::Relaxed)
            && bucket.try_admit(start).is_ok()
        {
            return Ok(Admission {
                bucket,
                waited: Duration::ZERO,
                finished: false,
            });
        }
        bucket.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = WaitGuard(&bucket.waiting);
        let ahead = bucket.waiting.load(Ordering::Relaxed).saturating_sub(1) as u64;
        // Estimate where this request stands: everyone ahead needs a slot first. A slot that is
        // surely further away than the deadline is refused now rather than after the wait.
        let estimate = bucket.estimate_wait(ahead, start);
        let cfg = self.cfg.load_full();
        if !estimate.is_zero() && (cfg.mode == QuotaMode::Reject || start + estimate > deadline) {
            return Err(Refused::Exhausted {
                retry_after: estimate,
            });
        }
        let mut shutdown = self.shutdown.subscribe();
        if *shutdown.borrow() {
            return Err(Refused::ShuttingDown);
        }
        let _turn = tokio::select! {
            turn = tokio::time::timeout_at(deadline.into(), bucket.gate.lock()) => match turn {
                Ok(guard) => guard,
                Err(_) => {
                    return Err(Refused::Exhausted {
                        retry_after: bucket.estimate_wait(ahead, Instant::now()),
                    })
                }
            },
            _ = shutdown.wait_for(|down| *down) => return Err(Refused::ShuttingDown),
        };
        loop {
            let now = Instant::now();
            let verdict = match &self.cluster {
                None => bucket.try_admit(now),
                Some(cluster) => self.admit_shared(&bucket, cluster, now, &cfg).await,
            };
            match verdict {
                Ok(()) => {
                    return Ok(Admission {
                        bucket: bucket.clone(),
                        waited: now.duration_since(start),
                        finished: false,
                    });
                }
                Err(wait) => {
                    if cfg.mode == QuotaMode::Reject || now + wait > deadline {
                        return Err(Refused::Exhausted { retry_after: wait });
                    }
                    // Sleeping with the gate held keeps the queue in arrival order.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|down| *down) => return Err(Refused::ShuttingDown),
                    }
                }
            }
        }
    }

    /// One decision through the shared store, or the local fallback when it is unreachable.
    async fn admit_shared(
        &self,
        bucket: &Bucket,
        cluster: &Cluster,
        now: Instant,
        cfg: &QuotaConfig,
    ) -> Result<(), Duration> {
        {
            let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
            Bucket::precheck(&mut state, now)?;
        }
        let limits = bucket.shared_limits(cluster);
        match cluster
            .gcra(&limits, cfg.longest_window() + cfg.safety_margin)
            .await
        {
            Ok(None) => {
                let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
                state.fallback.clear();
                bucket.record(&mut state, now, None);
                Ok(())
            }
            Ok(Some(wait)) => Err(wait),
            Err(_) => bucket.try_admit_fallback(
                now,
                &self.clock,
                cfg.safety_margin,
                cluster.config().max_replicas.get(),
            ),
        }
    }

    /// Reads the upstream's counters on a response and adjusts the bucket: a lower reported
    /// limit replaces ours (warned once); less left than our own traffic explains means someone
    /// else shares the quota, so the bucket may send at most what is left until the window ends.
    /// The request is finished then (the bucket's lock is taken once for all of it).
    pub fn observe(&self, mut admission: Admission, headers: &HeaderMap) {
        let report = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_ratelimit)
        };
        let reports = [
            (LimitKind::PerApi, report(&X_APIG_RATELIMIT_API)),
            (LimitKind::AllEnv, report(&X_APIG_RATELIMIT_ALLENV)),
        ];
        let bucket = &admission.bucket;
        let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, report) in reports {
            if let Some(report) = report {
                self.apply_report(bucket, &mut state, kind, report, Instant::now());
            }
        }
        state.in_flight = state.in_flight.saturating_sub(1);
        drop(state);
        admission.finished = true;
    }

    fn apply_report(
        &self,
        bucket: &Bucket,
        state: &mut BucketState,
        kind: LimitKind,
        report: RateLimitReport,
        now: Instant,
    ) {
        let in_flight = state.in_flight as u64;
        let Some(limit) = state.limits.iter_mut().find(|l| l.spec.kind == kind) else {
            return;
        };
        if let Some(reported) = report
            .limit
            .and_then(|l| u32::try_from(l).ok())
            .and_then(NonZeroU32::new)
        {
            let window = report.window.unwrap_or(limit.spec.window);
            if reported < limit.spec.limit || window > limit.spec.window {
                let spec = LimitSpec {
                    kind,
                    limit: reported.min(limit.spec.limit),
                    window: window.max(limit.spec.window),
                };
                let burst = limit.params.burst.min(
                    NonZeroU32::new(spec.limit.get().saturating_sub(1)).unwrap_or(NonZeroU32::MIN),
                );
                if let Ok(params) = derive(
                    spec.limit,
                    spec.window,
                    self.cfg.load().safety_margin,
                    burst,
                ) {
                    self.warn_once(bucket.op, kind, limit.spec, spec);
                    // Swap in a placeholder, then rebuild from the old limiter.
                    let old = std::mem::replace(limit, Limit::new(spec, params, &self.clock, 0));
                    *limit = Limit::rebuilt(old, spec, params, &self.clock, now);
                }
            }
        }
        let Some(remain) = report.remain else { return };
        let margin = self.cfg.load().safety_margin;
        limit.last_upstream_remain = Some(remain);
        limit.prune(now, margin);
        let ours = limit.recent.total();
        let expected = u64::from(limit.spec.limit.get()).saturating_sub(ours);
        if remain < expected {
            let budget = Budget {
                remain: remain.saturating_sub(in_flight.saturating_sub(1)),
                until: now + limit.spec.window + margin,
            };
            tracing::debug!(
                kind = kind.as_str(),
                remain,
                expected,
                "Upstream quota shared; limiting to what is left"
            );
            limit.budget = Some(match limit.budget {
                Some(old) if old.remain < budget.remain => old,
                _ => budget,
            });
        }
    }

    fn warn_once(&self, op: OperationId, kind: LimitKind, ours: LimitSpec, reported: LimitSpec) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.insert((op, kind.as_str()), ()).is_none() {
            tracing::warn!(
                operation = crate::operations::OperationTable::global().get(op).name,
                limit = kind.as_str(),
                configured = ours.limit.get(),
                configured_window_ms = ours.window.as_millis() as u64,
                reported = reported.limit.get(),
                reported_window_ms = reported.window.as_millis() as u64,
                "Upstream reports a lower limit than configured; using it"
            );
        }
    }

    /// The upstream refused a request for quota (429): nothing more goes out of this bucket
    /// for `hold` (the upstream's `Retry-After`, else one emission interval).
    pub fn hold(&self, bucket: &Bucket, retry_after: Option<Duration>) -> Duration {
        self.upstream_429s.fetch_add(1, Ordering::Relaxed);
        let hold = retry_after
            .unwrap_or(bucket.slowest)
            .max(Duration::from_millis(10));
        let until = Instant::now() + hold;
        let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
        state.hold_until = Some(state.hold_until.map_or(until, |h| h.max(until)));
        hold
    }

    /// Logs once that quotas are off (bench or explicit config).
    pub fn note_disabled(&self) {
        if !self.disabled_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "Quota enforcement is disabled: the upstream's limits are not protected"
            );
        }
    }
}

/// Drops buckets idle for longer than their longest window: their limiters have fully
/// replenished, so a fresh bucket grants nothing the old one would not have.
async fn evict_idle(mgr: Weak<QuotaManager>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let Some(mgr) = mgr.upgrade() else { return };
        let cfg = mgr.cfg.load_full();
        let idle_after = cfg.longest_window() + cfg.safety_margin;
        let now = Instant::now();
        let mut buckets = mgr.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|_, b| {
            Arc::strong_count(b) > 1 || now.duration_since(b.last_used()) < idle_after
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    /// A manager whose limits are N per W (per API) and N per W (all environments), burst b,
    /// and its bucket for the first operation.
    fn one_bucket(
        per_api: u32,
        per_api_s: u64,
        all_env: u32,
        all_env_s: u64,
        burst: u32,
    ) -> (Arc<QuotaManager>, Arc<Bucket>) {
        let cfg = QuotaConfig::for_tests(
            per_api,
            Duration::from_secs(per_api_s),
            all_env,
            Duration::from_secs(all_env_s),
            burst,
        );
        let mgr = QuotaManager::new(cfg);
        let bucket = mgr.bucket(&BucketKey {
            op: OperationId::from_index(0),
            app: None,
            user: None,
        });
        (mgr, bucket)
    }

    #[test]
    fn derive_refuses_burst_at_or_above_the_limit() {
        assert!(derive(nz(10), Duration::from_secs(1), Duration::ZERO, nz(10)).is_err());
        assert!(derive(nz(10), Duration::from_secs(1), Duration::ZERO, nz(9)).is_ok());
    }

    #[test]
    fn default_limits_admit_at_most_n_per_window() {
        let p = derive(
            nz(100),
            Duration::from_secs(60),
            Duration::from_millis(100),
            nz(10),
        )
        .expect("ok");
        // 91 intervals must not fit into 60.1 s.
        assert!(p.interval * 91 > Duration::from_millis(60_100));
        assert_eq!(p.burst.get(), 10);
    }

    /// Feeds arrival offsets (ns) through a governor limiter with the derived parameters on a
    /// fake clock; returns the admitted instants.
    fn admitted(params: GcraParams, arrivals: &[u64]) -> Vec<u64> {
        let clock = FakeRelativeClock::default();
        let quota = Quota::with_period(params.interval)
            .expect("period")
            .allow_burst(params.burst);
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
        let mut now = 0;
        let mut out = Vec::new();
        for &t in arrivals {
            clock.advance(Duration::from_nanos(t - now));
            now = t;
            if limiter.check().is_ok() {
                out.push(t);
            }
        }
        out
    }

    fn max_in_window(times: &[u64], window: u64) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            // Closed window [t, t + window]: the strictest reading.
            while times[hi] - times[lo] > window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn no_window_exceeds_the_limit(
            n in 2u32..300,
            window_ms in 10u64..120_000,
            margin_ms in 0u64..500,
            burst_frac in 0.0f64..1.0,
            gaps in proptest::collection::vec(0u64..2_000_000_000, 1..600),
            dense in proptest::bool::ANY,
        ) {
            let burst = 1 + ((n - 1) as f64 * burst_frac) as u32;
            prop_assume!(burst < n);
            let window = Duration::from_millis(window_ms);
            let margin = Duration::from_millis(margin_ms);
            let params = derive(nz(n), window, margin, nz(burst)).expect("derivable");
            // Dense arrivals hammer the limiter; sparse ones let the burst refill.
            let scale = if dense { window_ms.max(1) * 1_000 / 50 } else { window_ms * 1_000_000 / 20 };
            let mut t = 0u64;
            let arrivals: Vec<u64> = gaps.iter().map(|g| { t += g % scale.max(1); t }).collect();
            let got = admitted(params, &arrivals);
            let span = (window + margin).as_nanos() as u64;
            prop_assert!(max_in_window(&got, span) <= n as usize,
                "n={n} w={window_ms}ms d={margin_ms}ms b={burst}: {} in a window", max_in_window(&got, span));
        }

        #[test]
        fn ratelimit_parser_never_panics(s in ".{0,80}") {
            let _ = parse_ratelimit(&s);
        }
    }

    #[test]
    fn ratelimit_headers_parse_tolerantly() {
        let r = parse_ratelimit("remain:99,limit:100,time:1 minute").expect("parses");
        assert_eq!(r.remain, Some(99));
        assert_eq!(r.limit, Some(100));
        assert_eq!(r.window, Some(Duration::from_secs(60)));
        let r = parse_ratelimit(" Remain : 5 , LIMIT:200 , Time: 1 Second ").expect("parses");
        assert_eq!(
            (r.remain, r.limit, r.window),
            (Some(5), Some(200), Some(Duration::from_secs(1)))
        );
        let r = parse_ratelimit("remain:abc,limit:20,time:2 seconds").expect("parses");
        assert_eq!(
            (r.remain, r.limit, r.window),
            (None, Some(20), Some(Duration::from_secs(2)))
        );
        assert_eq!(
            parse_ratelimit("remain:3,time:500 ms").and_then(|r| r.window),
            Some(Duration::from_millis(500))
        );
        assert!(parse_ratelimit("garbage").is_none());
        assert!(parse_ratelimit("").is_none());
    }

    #[test]
    fn rollback_keeps_the_earlier_limiters_slot() {
        // Per minute: 3 with burst 2 (then one per ~30 s); per second: 100 with burst 2.
        let (_mgr, bucket) = one_bucket(3, 60, 100, 1, 2);
        assert!(bucket.try_admit(Instant::now()).is_ok());
        assert!(bucket.try_admit(Instant::now()).is_ok());
        let cells = || -> Vec<u64> {
            let s = bucket.state.lock().expect("lock");
            s.limits
                .iter()
                .map(|l| l.cell.0.load(Ordering::Acquire))
                .collect()
        };
        // Poll until the per-second limiter has refilled and admits, so that the refusal comes
        // from the per-minute one, which is checked second.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before = cells();
            match bucket.try_admit(Instant::now()) {
                Ok(()) => panic!("the per-minute limit admitted a third request"),
                Err(wait) if wait > Duration::from_secs(20) => {
                    assert_eq!(before, cells(), "the per-second slot was given back");
                    break;
                }
                Err(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "per-second limiter never refilled"
                    );
                    std::thread::yield_now();
                }
            }
        }
    }

    /// A per-API report on `bucket`, as a response's headers bring it.
    fn apply_per_api(mgr: &QuotaManager, bucket: &Bucket, report: RateLimitReport) {
        let mut state = bucket.state.lock().expect("lock");
        mgr.apply_report(
            bucket,
            &mut state,
            LimitKind::PerApi,
            report,
            Instant::now(),
        );
    }

    #[tokio::test]
    async fn a_request_is_in_flight_until_its_report_is_read_or_it_is_dropped() {
        let (mgr, bucket) = one_bucket(50, 60, 100, 1, 10);
        let key = BucketKey {
            op: OperationId::from_index(0),
            app: None,
            user: None,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut admitted = Vec::new();
        for _ in 0..3 {
            admitted.push(mgr.acquire(&key, deadline).await.expect("admitted"));
        }
        let in_flight = || bucket.state.lock().expect("lock").in_flight;
        assert_eq!(in_flight(), 3);
        // 3 of 50 sent, the upstream says 40 left: someone else used 7. Of ours, the two
        // still in flight may not be in its count yet, so the budget leaves room for them.
        let mut headers = HeaderMap::new();
        headers.insert(
            X_APIG_RATELIMIT_API,
            http::HeaderValue::from_static("remain:40,limit:50,time:1 minute"),
        );
        mgr.observe(admitted.remove(0), &headers);
        assert_eq!(in_flight(), 2);
        let state = bucket.state.lock().expect("lock");
        let per_api = state
            .limits
            .iter()
            .find(|l| l.spec.kind == LimitKind::PerApi);
        assert_eq!(per_api.and_then(|l| l.budget).map(|b| b.remain), Some(38));
        drop(state);
        drop(admitted.remove(0));
        assert_eq!(in_flight(), 1);
        mgr.observe(admitted.remove(0), &HeaderMap::new());
        assert_eq!(in_flight(), 0);
    }

    #[test]
    fn a_shared_quota_limits_the_bucket_to_what_is_left() {
        let (mgr, bucket) = one_bucket(50, 60, 100, 1, 10);
        let now = Instant::now();
        assert!(bucket.try_admit(now).is_ok());
        // We sent 1 of 50; the upstream says only 2 are left: someone else used 47.
        apply_per_api(
            &mgr,
            &bucket,
            RateLimitReport {
                remain: Some(2),
                limit: Some(50),
                window: Some(Duration::from_secs(60)),
            },
        );
        assert!(bucket.try_admit(now).is_ok());
        assert!(bucket.try_admit(now).is_ok());
        let wait = bucket.try_admit(now).expect_err("budget spent");
        assert!(wait > Duration::from_secs(59));
    }

    #[test]
    fn recent_admissions_are_counted_per_slot_in_bounded_memory() {
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut recent = Recent::new(window, t0);
        // 200 000 admissions spread over one window: a few dozen entries, every one counted.
        for i in 0..200_000u64 {
            recent.push(t0 + window * u32::try_from(i).unwrap() / 200_000);
        }
        assert!(recent.slots.len() <= RECENT_SLOTS as usize + 1);
        let end = t0 + window;
        assert_eq!(recent.total(), 200_000);
        assert_eq!(recent.count_within(end, window), 200_000);
        // The last half window: half of them, give or take the one straddling slot.
        let half = recent.count_within(end, window / 2);
        let slot = 200_000 / u64::from(RECENT_SLOTS);
        assert!((100_000..=100_000 + slot + 1).contains(&half), "{half}");
        // Pruned only once wholly older than the horizon.
        recent.prune(
            end + Duration::from_secs(1),
            window + Duration::from_secs(1),
        );
        assert_eq!(recent.total(), 200_000);
        recent.prune(end + window + window / 2, window);
        assert_eq!(recent.total(), 0);
        assert!(recent.slots.is_empty());
    }

    #[test]
    fn our_own_requests_at_the_window_edge_do_not_look_like_a_shared_quota() {
        let (mgr, bucket) = one_bucket(50, 60, 100, 1, 10);
        assert!(bucket.try_admit(Instant::now()).is_ok());
        // Admitted just over a window ago here, but the upstream counted it just under one.
        {
            let mut s = bucket.state.lock().expect("lock");
            for l in &mut s.limits {
                let at = Instant::now() - l.spec.window - Duration::from_millis(50);
                l.recent = Recent::new(l.spec.window, at);
                l.recent.push(at);
            }
        }
        apply_per_api(
            &mgr,
            &bucket,
            RateLimitReport {
                remain: Some(49),
                limit: Some(50),
                window: Some(Duration::from_secs(60)),
            },
        );
        let s = bucket.state.lock().expect("lock");
        assert!(
            s.limits.iter().all(|l| l.budget.is_none()),
            "no budget imposed"
        );
    }

    #[test]
    fn a_lower_reported_limit_replaces_ours_without_a_fresh_burst() {
        let cfg = QuotaConfig::for_tests(
            100,
            Duration::from_secs(60),
            200,
            Duration::from_secs(1),
            10,
        );
        let mgr = QuotaManager::new(cfg);
        let bucket = mgr.bucket(&BucketKey {
            op: OperationId::from_index(0),
            app: None,
            user: None,
        });
        for _ in 0..4 {
            assert!(bucket.try_admit(Instant::now()).is_ok());
        }
        // We used 4 of a burst of 10; the upstream says its limit is 5.
        apply_per_api(
            &mgr,
            &bucket,
            RateLimitReport {
                remain: Some(1),
                limit: Some(5),
                window: Some(Duration::from_secs(60)),
            },
        );
        let s = bucket.state.lock().expect("lock");
        let per_api = s
            .limits
            .iter()
            .find(|l| l.spec.kind == LimitKind::PerApi)
            .expect("limit");
        assert_eq!(per_api.spec.limit.get(), 5);
        assert_eq!(per_api.params.burst.get(), 4);
        drop(s);
        // Our 4 already fill the new burst of 4: nothing more at once.
        assert!(bucket.try_admit(Instant::now()).is_err());
    }
}
