//! One bucket (an operation's limits for one scope key): admission against every limit at once,
//! holds, budgets, the in-flight count, and the admission a request carries upstream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock as GovernorClock, DefaultClock};

use super::gcra::Limit;
use super::limit::LimitKind;
use crate::clock::LastUse;
use crate::operations::OperationId;

/// The mutable part of a bucket, touched only by the request at the head of its queue.
pub(super) struct BucketState {
    pub(super) limits: Vec<Limit>,
    /// This replica's share of each limit while the shared store is unreachable.
    pub(super) fallback: Vec<Limit>,
    pub(super) hold_until: Option<Instant>,
    /// Admitted requests not finished yet. Kept under the lock the admission and the
    /// response's report take anyway: as an atomic of its own it was two more writes per
    /// request to memory every worker shares.
    pub(super) in_flight: usize,
}

/// One bucket: the limits of one operation for one scope key (app, user or the gateway).
pub struct Bucket {
    pub(super) op: OperationId,
    // FIFO: tokio's mutex queues waiters in arrival order, which is the pacing order.
    pub(super) gate: tokio::sync::Mutex<()>,
    pub(super) state: Mutex<BucketState>,
    pub(super) waiting: AtomicUsize,
    pub(super) born: Instant,
    /// Milliseconds after `born` of the last request.
    pub(super) last_used: LastUse,
    /// Largest emission interval: the spacing between two paced requests at worst.
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

    /// Tries every limit, short window first; on refusal rolls back what earlier limits gave
    /// and returns how long until a slot could be free.
    pub(super) fn try_admit(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::precheck(&mut state, now)?;
        let spares = Self::check_limiters(&state.limits)?;
        self.record(&mut state, now, Some(spares));
        Ok(())
    }

    /// Local fallback while the shared store is unreachable: this replica's share
    /// (1/`max_replicas`) of every limit.
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

    /// Every limiter, short window first; on a refusal the earlier ones get their slot back.
    /// Returns each limiter's burst capacity left.
    pub(super) fn check_limiters(limits: &[Limit]) -> Result<[u32; 2], Duration> {
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
    pub(super) fn record(&self, state: &mut BucketState, now: Instant, spares: Option<[u32; 2]>) {
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
