//! Upstream quotas: window-safe limits per bucket, pacing bounded by `max_wait` and fair across
//! clients,
//! synchronisation with the upstream's `X-APIG-Ratelimit-*` counters, holds after a 429, and
//! the shared mode's bridge to Redis.
//!
//! - `settings`: `[quota]` and each operation's resolved limits;
//! - `limit`: what a limit is and how it is enforced (exact, or GCRA's window-safe arithmetic);
//! - `exact`: the exact limiter, a ring of the last N admission times;
//! - `gcra`: a governor limiter, alone or pacing the exact one;
//! - `limiter`: one limit's state in a bucket (its engine, our own count, the upstream's budget);
//! - `bucket`: an operation's limits for one scope key, admitted together;
//! - `fair`: weighted fair queueing of waiting requests across clients;
//! - `pacing`: waiting for a slot in turn;
//! - `report`: the upstream's counters;
//! - `shared`: decisions on Redis, and the fallback share.

mod bucket;
mod exact;
mod fair;
mod gcra;
mod limit;
mod limiter;
mod pacing;
mod report;
mod settings;
mod shared;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::clock::DefaultClock;

pub use bucket::{Admission, Bucket, BucketKey, Refused};
pub use fair::Class;
pub use limit::{derive, exact, fallback_share, GcraParams, LimitKind, LimitParams, LimitSpec};
pub use report::{parse_ratelimit, RateLimitReport};
pub use settings::{
    OpQuota, QuotaAlgorithm, QuotaConfig, QuotaMode, QuotaScope, GCRA_DEFAULT_BURST,
};

use crate::clock::LastUse;
use crate::cluster::Cluster;
use crate::operations::OperationId;
use bucket::BucketState;
use fair::FairQueue;
use limiter::Limit;

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
    /// changed is rebuilt keeping the admissions of its window (a lowered N keeps the newest),
    /// so a reload never grants a fresh burst.
    pub fn reconfigure(&self, cfg: QuotaConfig) {
        let buckets = self.buckets();
        let now = Instant::now();
        for (_, bucket) in buckets {
            let wanted = cfg.limits_for(bucket.op);
            let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut limits = Vec::with_capacity(wanted.len());
            let mut changed = false;
            for (spec, params) in wanted {
                let old = state.limits.iter().position(|l| l.spec.kind == spec.kind);
                let old = old.map(|i| state.limits.swap_remove(i));
                changed |= !old
                    .as_ref()
                    .is_some_and(|l| l.spec == spec && l.params == params);
                match old {
                    Some(l) if l.spec == spec && l.params == params => limits.push(l),
                    Some(l) => limits.push(Limit::rebuilt(
                        l,
                        spec,
                        params,
                        &self.clock,
                        bucket.born,
                        now,
                    )),
                    None => limits.push(Limit::new(
                        spec,
                        params,
                        &self.clock,
                        bucket.born,
                        now,
                        false,
                    )),
                }
            }
            // A kind no longer configured is left over.
            changed |= !state.limits.is_empty();
            limits.sort_by_key(|l| l.spec.window);
            state.limits = limits;
            state.fallback.clear();
            if changed {
                // Leased under the old limits: the new ones decide from the next request on.
                state.lease.end();
            }
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
        let born = Instant::now();
        let limits = cfg
            .limits_for(op)
            .into_iter()
            .map(|(spec, params)| Limit::new(spec, params, &self.clock, born, born, true))
            .collect::<Vec<_>>();
        let slowest = limits
            .iter()
            .map(|l| l.params.interval(l.spec.limit))
            .max()
            .unwrap_or_default();
        let bucket = Arc::new(Bucket {
            op,
            queue: FairQueue::default(),
            state: Mutex::new(BucketState {
                limits,
                fallback: Vec::new(),
                fallback_outage: 0,
                lease: Default::default(),
                hold_until: None,
                in_flight: 0,
            }),
            waiting: AtomicUsize::new(0),
            born,
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

    /// The upstream refused a request for quota (429): nothing more goes out of this bucket
    /// for `hold` (the upstream's `Retry-After`, else one emission interval).
    pub fn hold(&self, bucket: &Bucket, retry_after: Option<Duration>) -> Duration {
        self.upstream_429s.fetch_add(1, Ordering::Relaxed);
        let hold = retry_after
            .unwrap_or(bucket.slowest)
            .clamp(Duration::from_millis(10), crate::headers::MAX_RETRY_AFTER);
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
