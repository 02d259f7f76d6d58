//! One limit's governor (GCRA) limiter: a state cell that can be rolled back when a later limit
//! refuses, the burst capacity left, and rebuilding with new parameters without a fresh burst.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use super::limit::{GcraParams, LimitSpec};
use super::report::{Budget, Recent};

/// Governor state that can be rolled back: a request refused by a later limiter must not keep
/// the slot an earlier one gave it. Only touched under the bucket's gate.
#[derive(Clone, Default)]
pub(super) struct RollbackCell(pub(super) Arc<AtomicU64>);

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

pub(super) type Limiter =
    RateLimiter<NotKeyed, RollbackCell, DefaultClock, StateInformationMiddleware>;

pub(super) struct Limit {
    pub(super) spec: LimitSpec,
    pub(super) params: GcraParams,
    pub(super) limiter: Limiter,
    pub(super) cell: RollbackCell,
    /// Our own admissions inside the last window: what we expect the upstream to have counted.
    pub(super) recent: Recent,
    pub(super) budget: Option<Budget>,
    /// Burst capacity left after the last admission, and when: to estimate a queue's wait.
    pub(super) spare: u32,
    pub(super) spare_at: Instant,
    /// What the upstream's counter said last, for metrics.
    pub(super) last_upstream_remain: Option<u64>,
}

impl Limit {
    /// A limiter with `available` of its burst usable at once (the rest counts as just spent).
    pub(super) fn new(
        spec: LimitSpec,
        params: GcraParams,
        clock: &DefaultClock,
        available: u32,
    ) -> Limit {
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
    pub(super) fn rebuilt(
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
    pub(super) fn available(&self, now: Instant) -> u64 {
        let refilled =
            now.duration_since(self.spare_at).as_nanos() / self.params.interval.as_nanos().max(1);
        (u64::from(self.spare) + refilled as u64).min(u64::from(self.params.burst.get()))
    }

    /// Keeps our admissions of the last `window + margin`: a request we admitted just over a
    /// window ago may have reached the upstream just under one, and must still count as ours
    /// or the upstream's counters would look like someone else's traffic.
    pub(super) fn prune(&mut self, now: Instant, margin: Duration) {
        self.recent.prune(now, self.spec.window + margin);
    }
}
