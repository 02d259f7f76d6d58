//! One GCRA limiter (governor): a state cell that can be rolled back when a later limit
//! refuses, and the burst capacity left, to estimate a queue's wait. It enforces a limit on
//! its own (`algorithm = "gcra"`) or paces the exact limiter (a configured `burst`).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock as GovernorClock, DefaultClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use super::limit::GcraParams;

/// Governor state that can be rolled back: a request refused by a later limiter must not keep
/// the slot an earlier one gave it. Only touched under the bucket's lock.
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

/// What a check took, to give it back ([`Gcra::roll_back`]) or book it ([`Gcra::commit`]).
#[derive(Clone, Copy)]
pub(super) struct Taken {
    prev: u64,
    spare: u32,
}

pub(super) struct Gcra {
    pub(super) params: GcraParams,
    limiter: Limiter,
    cell: RollbackCell,
    /// Burst capacity left after the last admission, and when: to estimate a queue's wait.
    spare: u32,
    spare_at: Instant,
}

impl Gcra {
    /// A limiter with `available` of its burst usable at once (the rest counts as just spent).
    pub(super) fn new(params: GcraParams, clock: &DefaultClock, available: u32) -> Gcra {
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
        Gcra {
            params,
            limiter,
            cell,
            spare,
            spare_at: Instant::now(),
        }
    }

    /// Takes a slot if one is free now; else how long until one is.
    pub(super) fn check(&self) -> Result<Taken, Duration> {
        let prev = self.cell.0.load(Ordering::Acquire);
        match self.limiter.check() {
            Ok(snapshot) => Ok(Taken {
                prev,
                spare: snapshot.remaining_burst_capacity(),
            }),
            Err(not_until) => Err(not_until
                .wait_time_from(DefaultClock::default().now())
                .max(Duration::from_millis(1))),
        }
    }

    /// Gives back what `check` took.
    pub(super) fn roll_back(&self, taken: Taken) {
        self.cell.0.store(taken.prev, Ordering::Release);
    }

    /// Books what `check` took, for the estimates.
    pub(super) fn commit(&mut self, taken: Taken, now: Instant) {
        self.spare = taken.spare;
        self.spare_at = now;
    }

    /// Slots available at `now`, from the capacity left at the last admission plus what has
    /// been replenished since.
    pub(super) fn available(&self, now: Instant) -> u64 {
        let refilled = now.saturating_duration_since(self.spare_at).as_nanos()
            / self.params.interval.as_nanos().max(1);
        (u64::from(self.spare) + refilled as u64).min(u64::from(self.params.burst.get()))
    }

    /// How long the request with `ahead` requests before it will likely wait here.
    pub(super) fn estimate(&self, ahead: u64, now: Instant) -> Duration {
        let short = (ahead + 1).saturating_sub(self.available(now));
        self.params
            .interval
            .saturating_mul(short.min(u64::from(u32::MAX)) as u32)
    }

    /// The cell's raw state, for tests of the rollback.
    #[cfg(test)]
    pub(super) fn state(&self) -> u64 {
        self.cell.0.load(Ordering::Acquire)
    }
}
