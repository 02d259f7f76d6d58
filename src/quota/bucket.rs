//! One bucket (an operation's limits for one scope key): admission against every limit at once,
//! holds, budgets, the in-flight count, and the admission a request carries upstream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::fair::FairQueue;
use super::gcra::{Gcra, Taken};
use super::limit::{LimitKind, LimitParams};
use super::limiter::{nanos, Engine, Limit};
use super::shared::Lease;
use crate::clock::LastUse;
use crate::operations::OperationId;

/// Most limits one bucket has (an operation has two).
pub(super) const MAX_LIMITS: usize = 4;

impl Engine {
    /// The GCRA limiter that decides or paces, if any.
    fn gcra(&self) -> Option<&Gcra> {
        match self {
            Engine::Gcra(g) => Some(g),
            Engine::Exact { pace, .. } => pace.as_ref(),
        }
    }
}

/// The mutable part of a bucket, touched only by the request at the head of its queue.
pub(super) struct BucketState {
    pub(super) limits: Vec<Limit>,
    /// This replica's share of each limit while the shared store is unreachable.
    pub(super) fallback: Vec<Limit>,
    /// The outage `fallback` was built in (`Cluster::outage`).
    pub(super) fallback_outage: u64,
    /// Slots the shared store reserved ahead for this replica (shared mode, exact limiter).
    pub(super) lease: Lease,
    pub(super) hold_until: Option<Instant>,
    /// Admitted requests not finished yet. Kept under the lock the admission and the
    /// response's report take anyway: as an atomic of its own it was two more writes per
    /// request to memory every worker shares.
    pub(super) in_flight: usize,
}

/// One bucket: the limits of one operation for one scope key (app, user or the gateway).
pub struct Bucket {
    pub(super) op: OperationId,
    /// Waiting requests, weighted fair across clients.
    pub(super) queue: FairQueue,
    pub(super) state: Mutex<BucketState>,
    pub(super) waiting: AtomicUsize,
    pub(super) born: Instant,
    /// Milliseconds after `born` of the last request.
    pub(super) last_used: LastUse,
    /// Largest spacing of paced requests at the steady rate: a hold's length by default.
    pub(super) slowest: Duration,
    pub(super) margin: Duration,
    /// `q:<operation>:<app>:<user>` for the shared store's keys.
    pub(super) shared_base: String,
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

    /// Tries every limit at once; a slot is taken in each only if every one admits. Returns
    /// how long until a slot could be free otherwise.
    pub(super) fn try_admit(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::precheck(&mut state, now)?;
        Self::check_limits(&mut state.limits, self.born, now)?;
        self.record(&mut state, now);
        Ok(())
    }

    /// Holds (after an upstream 429) and upstream-reported budgets.
    pub(super) fn precheck(state: &mut BucketState, now: Instant) -> Result<(), Duration> {
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

    /// How long until every exact ring of `limits` has a free slot (zero: now).
    pub(super) fn exact_wait(limits: &[Limit], origin: Instant, now: Instant) -> Duration {
        let t = nanos(origin, now);
        limits
            .iter()
            .filter_map(|l| match (&l.engine, &l.params) {
                (Engine::Exact { ring, .. }, LimitParams::Exact { span, .. }) => {
                    Some(ring.wait(t, *span))
                }
                _ => None,
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Takes a slot of every exact limit's pace (a configured `burst`), all or none: what a
    /// shared decision needs locally first. Give them back with [`Bucket::return_paces`] when
    /// the shared store refuses.
    pub(super) fn take_paces(limits: &[Limit]) -> Result<[Option<Taken>; MAX_LIMITS], Duration> {
        let mut taken: [Option<Taken>; MAX_LIMITS] = [None; MAX_LIMITS];
        for (i, limit) in limits.iter().enumerate().take(MAX_LIMITS) {
            let Engine::Exact { pace: Some(g), .. } = &limit.engine else {
                continue;
            };
            match g.check() {
                Ok(t) => taken[i] = Some(t),
                Err(wait) => {
                    Self::return_paces(limits, taken);
                    return Err(wait);
                }
            }
        }
        Ok(taken)
    }

    /// Gives back what [`Bucket::take_paces`] took.
    pub(super) fn return_paces(limits: &[Limit], taken: [Option<Taken>; MAX_LIMITS]) {
        for (limit, taken) in limits.iter().zip(taken) {
            if let (Engine::Exact { pace: Some(g), .. }, Some(t)) = (&limit.engine, taken) {
                g.roll_back(t);
            }
        }
    }

    /// Books an admission at `now` into every exact ring of `limits`.
    pub(super) fn book_exact(limits: &mut [Limit], origin: Instant, now: Instant) {
        let t = nanos(origin, now);
        for l in limits {
            if let Engine::Exact { ring, .. } = &mut l.engine {
                ring.push(t);
            }
        }
    }

    /// Every limit's engine, exact rings first (they only read), then the GCRA limiters in
    /// order; a refusal gives the earlier GCRA limiters their slot back. Only when all admit is
    /// the admission booked in each.
    pub(super) fn check_limits(
        limits: &mut [Limit],
        origin: Instant,
        now: Instant,
    ) -> Result<(), Duration> {
        let t = nanos(origin, now);
        let wait = Self::exact_wait(limits, origin, now);
        if !wait.is_zero() {
            return Err(wait);
        }
        let mut taken: [Option<Taken>; MAX_LIMITS] = [None; MAX_LIMITS];
        for (i, limit) in limits.iter().enumerate().take(MAX_LIMITS) {
            let Some(gcra) = limit.engine.gcra() else {
                continue;
            };
            match gcra.check() {
                Ok(t) => taken[i] = Some(t),
                Err(wait) => {
                    for (j, t) in taken.iter().enumerate().take(i) {
                        if let (Some(t), Some(g)) = (t, limits[j].engine.gcra()) {
                            g.roll_back(*t);
                        }
                    }
                    return Err(wait);
                }
            }
        }
        for (limit, taken) in limits.iter_mut().zip(taken) {
            match &mut limit.engine {
                Engine::Exact { ring, pace } => {
                    ring.push(t);
                    if let (Some(g), Some(taken)) = (pace, taken) {
                        g.commit(taken, now);
                    }
                }
                Engine::Gcra(g) => {
                    if let Some(taken) = taken {
                        g.commit(taken, now);
                    }
                }
            }
        }
        Ok(())
    }

    /// Books an admission into our own accounting (for the upstream counters and estimates).
    pub(super) fn record(&self, state: &mut BucketState, now: Instant) {
        state.in_flight += 1;
        for limit in state.limits.iter_mut() {
            limit.prune(now, self.margin);
            limit.recent.push(now);
            if let Some(b) = &mut limit.budget {
                b.remain = b.remain.saturating_sub(1);
            }
        }
    }

    pub(super) fn touch(&self, now: Instant) {
        self.last_used
            .touch(now.duration_since(self.born).as_millis() as u64);
    }

    pub(super) fn last_used(&self) -> Instant {
        self.born + Duration::from_millis(self.last_used.get())
    }

    /// How long a request with `ahead` requests queued before it will likely wait.
    pub(super) fn estimate_wait(&self, ahead: u64, now: Instant) -> Duration {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = state
            .hold_until
            .map_or(Duration::ZERO, |h| h.saturating_duration_since(now));
        for limit in &state.limits {
            wait = wait.max(limit.estimate(ahead, self.born, now));
        }
        wait
    }
}

/// A slot was granted: the request may go upstream. [`QuotaManager::observe`] or dropping it
/// marks the request finished.
pub struct Admission {
    pub(super) bucket: Arc<Bucket>,
    /// Time spent waiting for the slot.
    pub waited: Duration,
    /// Counted out of `in_flight` already (by `observe`).
    pub(super) finished: bool,
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
    /// The client has `max_queued` requests waiting in this bucket already.
    ClientQueueFull { retry_after: Duration },
    /// The gateway is shutting down: nobody waits any more.
    ShuttingDown,
}

/// Counts a waiter for as long as it waits, including when its future is dropped.
pub(super) struct WaitGuard<'a>(pub(super) &'a AtomicUsize);

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
