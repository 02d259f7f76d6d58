//! The shared-mode bridge: a bucket's decisions made by the Redis script (the exact limiter's
//! sorted sets, or GCRA), the slots it leases ahead, and the local fallback share while Redis
//! is unreachable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;

use super::bucket::{Bucket, BucketState};
use super::limit::{fallback_share, LimitParams};
use super::limiter::Limit;
use super::{QuotaConfig, QuotaManager};
use crate::cluster::{Cluster, ExactVerdict, MAX_LEASE_SLOTS};

/// Slots an exact decision reserved ahead for this replica (`[cluster] lease`): used by the
/// next requests without a Redis round trip until `until`. Its size follows demand: doubled
/// when a lease runs out before it ends, else what the last one served. At a rate below one
/// request per lease it stays at one slot, a decision per request.
#[derive(Default)]
pub(super) struct Lease {
    /// The decision's member; its leased slots are `<member>:<j>`.
    member: String,
    /// The next leased slot to use, and the last one granted (`next > last`: none left).
    next: u32,
    last: u32,
    /// Measured from before the call that granted it: no later than Redis booked its slots.
    until: Option<Instant>,
    /// Slots to ask for next, at least 1.
    size: u32,
    /// Moved on whenever the limits change (a reload, a lower limit the upstream reported): a
    /// decision on Redis that was on its way then leases nothing from its answer.
    epoch: u64,
}

impl Lease {
    /// Whether a leased slot is left and the lease has not ended.
    fn available(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u) && self.next <= self.last
    }

    /// One leased slot, if one is left and the lease has not ended.
    fn take(&mut self, now: Instant) -> bool {
        let available = self.available(now);
        self.next += u32::from(available);
        available
    }

    /// Ends this lease before a new decision at `now`: how many slots to ask for, and the
    /// unused slots to give back (`<member>:<from>`..=`<to>`) if it ended with some.
    fn renew(&mut self, now: Instant, enabled: bool) -> (u32, Option<(String, u32, u32)>) {
        let live = self.until.is_some_and(|u| now < u);
        let unused = self.until.is_some() && self.next <= self.last;
        let size = self.size.max(1);
        self.size = if !enabled {
            1
        } else if live {
            // Asked again before it ended: demand is above what it held.
            (size * 2).min(MAX_LEASE_SLOTS)
        } else if self.until.is_some() {
            // What it served: the request that took it and its used slots.
            (self.next.saturating_sub(1)).clamp(1, MAX_LEASE_SLOTS)
        } else {
            size
        };
        let give_back = unused.then(|| (std::mem::take(&mut self.member), self.next, self.last));
        self.clear();
        (self.size, give_back)
    }

    /// Holds `leased` slots of the decision booked as `member`, usable until `until`.
    fn grant(&mut self, member: String, leased: u32, until: Instant) {
        self.member = member;
        self.next = 2;
        self.last = 1 + leased;
        self.until = Some(until);
    }

    /// Drops the lease without using it: Redis failed (its slots cannot be given back then), or
    /// the limits changed (they age out with their window).
    pub(super) fn clear(&mut self) {
        self.until = None;
        self.next = 0;
        self.last = 0;
    }

    /// The limits changed: the lease held is dropped and one on its way will not be granted.
    pub(super) fn end(&mut self) {
        self.clear();
        self.epoch += 1;
    }
}

/// A bucket's limits as the shared store decides them.
pub(super) enum SharedLimits {
    /// (key, N, span) per limit.
    Exact(Vec<(String, u32, Duration)>),
    /// (key, emission interval, tolerance) per limit.
    Gcra(Vec<(String, Duration, Duration)>),
}

impl Bucket {
    /// Admits on a leased slot, if this bucket holds one: no Redis round trip. Not while the
    /// replica is degraded (its fallback share counts admissions then), and only with this
    /// bucket's local paces free. Not while resuming either, by time: no lease is granted
    /// then, and one granted before the failure ended (`MAX_LEASE`, 500 ms) before shared mode
    /// could resume (a second without failures).
    pub(super) fn try_admit_leased(&self, now: Instant, cluster: &Cluster) -> bool {
        if cluster.config().lease.is_zero() || cluster.is_degraded() {
            return false;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.lease.available(now)
            && Self::precheck(&mut state, now).is_ok()
            && Self::take_paces(&state.limits).is_ok()
            && self.take_leased(&mut state, now, cluster)
    }

    /// Admits on a leased slot if one is left, counting it.
    fn take_leased(&self, state: &mut BucketState, now: Instant, cluster: &Cluster) -> bool {
        let took = state.lease.take(now);
        if took {
            self.record(state, now);
            cluster.leased.fetch_add(1, Ordering::Relaxed);
        }
        took
    }

    /// Local fallback while the shared store is unreachable: this replica's share
    /// (1/`max_replicas`) of every limit.
    /// Its exact limits start blocked for a span and `hold` more: other replicas may still use
    /// slots leased before the failure for up to their lease. Built anew in each `outage`: a
    /// share kept from the last one (as it is for a window after shared mode resumes) knows
    /// nothing of what the other replicas admitted through the shared store since.
    pub(super) fn try_admit_fallback(
        &self,
        now: Instant,
        clock: &DefaultClock,
        margin: Duration,
        replicas: u32,
        hold: Duration,
        outage: u64,
    ) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::precheck(&mut state, now)?;
        // A later outage's (a call that read the number before another began builds nothing).
        if state.fallback.is_empty() || outage > state.fallback_outage {
            state.fallback_outage = outage;
            state.fallback = state
                .limits
                .iter()
                .map(|l| {
                    let (spec, params) = fallback_share(l.spec, l.params, margin, replicas);
                    Limit::fallback(spec, params, clock, self.born, now, hold)
                })
                .collect();
        }
        Self::check_limits(&mut state.fallback, self.born, now)?;
        self.record(&mut state, now);
        Ok(())
    }

    /// The shared keys and parameters of this bucket's limits.
    pub(super) fn shared_limits(&self, cluster: &Cluster) -> SharedLimits {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let key = |l: &Limit| cluster.key(&[&self.shared_base, l.spec.kind.as_str()]);
        let exact = state
            .limits
            .iter()
            .all(|l| matches!(l.params, LimitParams::Exact { .. }));
        if exact {
            SharedLimits::Exact(
                state
                    .limits
                    .iter()
                    .filter_map(|l| match l.params {
                        LimitParams::Exact { span, .. } => Some((key(l), l.spec.limit.get(), span)),
                        LimitParams::Gcra(_) => None,
                    })
                    .collect(),
            )
        } else {
            SharedLimits::Gcra(
                state
                    .limits
                    .iter()
                    .filter_map(|l| match l.params {
                        LimitParams::Gcra(p) => {
                            let tau = p.interval.saturating_mul(p.burst.get() - 1);
                            Some((key(l), p.interval, tau))
                        }
                        LimitParams::Exact { .. } => None,
                    })
                    .collect(),
            )
        }
    }
}

/// Gives leased slots `<member>:<from>..=<to>` back to Redis, off the request's path. If Redis
/// does not answer, they age out with their window.
fn release(
    cluster: &Arc<Cluster>,
    limits: &[(String, u32, Duration)],
    member: String,
    from: u32,
    to: u32,
) {
    let keys: Vec<String> = limits.iter().map(|(k, _, _)| k.clone()).collect();
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let _ = cluster.release(&keys, &member, from, to).await;
    });
}

impl QuotaManager {
    /// One decision through the shared store, or the local fallback when it is unreachable.
    pub(super) async fn admit_shared(
        &self,
        bucket: &Bucket,
        cluster: &Arc<Cluster>,
        now: Instant,
        cfg: &QuotaConfig,
    ) -> Result<(), Duration> {
        let start = now;
        let longest = cfg.longest_window() + cfg.safety_margin;
        // For a window after Redis came back, this replica also keeps to its fallback share,
        // counting what it admitted while falling back: the other replicas' fallback
        // admissions are not in Redis, and together the shares stay within the limit.
        let resuming = cluster.recently_resumed(longest);
        let lease_on = !cluster.config().lease.is_zero();
        // A configured burst paces each replica's own admissions: its slot is taken here and
        // given back if the shared store refuses.
        let (paces, want, give_back, epoch) = {
            let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
            Bucket::precheck(&mut state, now)?;
            if resuming {
                let wait = Bucket::exact_wait(&state.fallback, bucket.born, now);
                if !wait.is_zero() {
                    return Err(wait);
                }
            }
            let paces = Bucket::take_paces(&state.limits)?;
            if !resuming && bucket.take_leased(&mut state, now, cluster) {
                return Ok(());
            }
            let (want, give_back) = state.lease.renew(now, lease_on && !resuming);
            (paces, want, give_back, state.lease.epoch)
        };
        let limits = bucket.shared_limits(cluster);
        if let (Some((member, from, to)), SharedLimits::Exact(l)) = (give_back, &limits) {
            release(cluster, l, member, from, to);
        }
        let (verdict, member) = match &limits {
            SharedLimits::Exact(limits) => {
                let member = cluster.member();
                let verdict =
                    cluster
                        .exact(limits, longest, &member, want)
                        .await
                        .map(|v| match v {
                            ExactVerdict::Admitted { leased, .. } => Ok(leased),
                            ExactVerdict::Wait(wait) => Err(wait),
                        });
                (verdict, member)
            }
            // GCRA leases nothing.
            SharedLimits::Gcra(limits) => (
                cluster
                    .gcra(limits, longest)
                    .await
                    .map(|v| v.map_or(Ok(0), Err)),
                String::new(),
            ),
        };
        // The decision took a Redis round trip, or a timeout, or a wait for the connection
        // another request is making: what is booked locally from here happens now, not when
        // this call began. (Booked at the earlier time, a fallback window would end early by
        // that wait, and the next share go while the upstream still counts this one.)
        let now = Instant::now().max(now);
        match verdict {
            Ok(Ok(leased)) => {
                let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
                if resuming {
                    Bucket::book_exact(&mut state.fallback, bucket.born, now);
                } else {
                    state.fallback.clear();
                }
                if state.lease.epoch != epoch {
                    // Sized under limits changed since: given back, not used.
                    match &limits {
                        SharedLimits::Exact(l) if leased > 0 => {
                            release(cluster, l, member, 2, 1 + leased)
                        }
                        _ => {}
                    }
                } else if lease_on && !resuming && matches!(limits, SharedLimits::Exact(_)) {
                    // Timed from before the call: Redis booked the slots at its now + life,
                    // later. Held even with no slot leased, to see how soon the next comes.
                    state
                        .lease
                        .grant(member, leased, start + cluster.config().lease);
                }
                bucket.record(&mut state, now);
                Ok(())
            }
            Ok(Err(wait)) => {
                let state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
                Bucket::return_paces(&state.limits, paces);
                Err(wait)
            }
            Err(_) => {
                {
                    let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.lease.clear();
                    Bucket::return_paces(&state.limits, paces);
                }
                bucket.try_admit_fallback(
                    now,
                    &self.clock,
                    cfg.safety_margin,
                    cluster.config().max_replicas.get(),
                    cluster.config().lease,
                    cluster.outage(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operations::OperationId;
    use crate::quota::tests::one_bucket;
    use crate::quota::{BucketKey, LimitKind, QuotaAlgorithm, RateLimitReport};

    const LIFE: Duration = Duration::from_millis(50);

    #[test]
    fn a_lease_is_used_slot_by_slot_until_it_ends() {
        let t0 = Instant::now();
        let mut lease = Lease::default();
        assert!(!lease.take(t0), "nothing leased yet");
        lease.grant("m".to_owned(), 2, t0 + LIFE);
        assert!(lease.take(t0));
        assert!(lease.take(t0 + LIFE / 2));
        assert!(!lease.take(t0 + LIFE / 2), "both slots used");
        lease.grant("m".to_owned(), 2, t0 + LIFE);
        assert!(!lease.take(t0 + LIFE), "ended");
    }

    #[test]
    fn a_lease_grows_while_it_runs_out_early_and_shrinks_to_what_it_served() {
        let t0 = Instant::now();
        let mut lease = Lease::default();
        assert_eq!(lease.renew(t0, true).0, 1, "one slot at first");
        // Each lease runs out before it ends: the next asks for twice as many, up to the cap.
        let mut want = 1;
        for _ in 0..10 {
            lease.grant("m".to_owned(), want - 1, t0 + LIFE);
            while lease.take(t0) {}
            let (next, give_back) = lease.renew(t0, true);
            assert!(give_back.is_none(), "all used");
            assert_eq!(next, (want * 2).min(MAX_LEASE_SLOTS));
            want = next;
        }
        // One that ends with 3 of its 63 leased slots used served 4 requests: the next asks
        // for 4, and the 60 unused slots are given back.
        lease.grant("m7".to_owned(), want - 1, t0 + LIFE);
        for _ in 0..3 {
            assert!(lease.take(t0));
        }
        let (next, give_back) = lease.renew(t0 + LIFE, true);
        assert_eq!(next, 4);
        assert_eq!(give_back, Some(("m7".to_owned(), 5, MAX_LEASE_SLOTS)));
        // Off: one slot, whatever came before.
        lease.grant("m".to_owned(), 3, t0 + LIFE);
        assert_eq!(lease.renew(t0, false).0, 1);
    }

    #[test]
    fn a_new_or_cleared_lease_gives_nothing_back() {
        let t0 = Instant::now();
        let mut lease = Lease::default();
        assert_eq!(lease.renew(t0, true), (1, None));
        assert_eq!(lease.renew(t0, false), (1, None));
        lease.grant("m".to_owned(), 5, t0 + LIFE);
        lease.clear();
        assert_eq!(lease.renew(t0, true).1, None);
        // Renewed once, a lease that ended is gone: nothing to give back twice.
        lease.grant("m".to_owned(), 5, t0 + LIFE);
        assert!(lease.renew(t0 + LIFE, true).1.is_some());
        assert_eq!(lease.renew(t0 + LIFE, true).1, None);
    }

    /// Slots leased under the old limits are not used after a reload.
    #[test]
    fn a_reload_ends_the_lease() {
        let cfg = |n| {
            QuotaConfig::uniform(
                QuotaAlgorithm::Exact,
                n,
                Duration::from_secs(60),
                n,
                Duration::from_secs(1),
                None,
            )
        };
        let (mgr, bucket) = one_bucket(QuotaAlgorithm::Exact, 100, 60, 100, 1, None);
        let t0 = Instant::now();
        // Leases, reloads with the limits changed then the same: a slot left after each?
        for (n, kept) in [(10, false), (10, true)] {
            let mut state = bucket.state.lock().expect("lock");
            state.lease.grant("m".to_owned(), 5, t0 + LIFE);
            drop(state);
            mgr.reconfigure(cfg(n));
            let left = bucket.state.lock().expect("lock").lease.take(t0);
            assert_eq!(left, kept, "reloaded to {n}");
        }
    }

    /// Falling back, the exact share starts blocked for a span and the lease other replicas
    /// may still be using.
    #[test]
    fn the_fallback_share_waits_a_span_and_a_lease() {
        for hold in [Duration::ZERO, LIFE] {
            let (mgr, bucket) = one_bucket(QuotaAlgorithm::Exact, 100, 60, 200, 1, None);
            let margin = mgr.config().safety_margin;
            let span = Duration::from_secs(60) + margin;
            let now = Instant::now();
            let wait = bucket
                .try_admit_fallback(now, &DefaultClock::default(), margin, 3, hold, 1)
                .expect_err("blocked at first");
            assert!(wait >= span + hold, "{wait:?} for a hold of {hold:?}");
            assert!(wait <= span + hold + Duration::from_millis(1), "{wait:?}");
        }
    }

    /// A second outage within the window after shared mode resumed (when the share from the
    /// first is still kept) blocks the share again: in between, the other replicas admitted
    /// through the shared store what this one's old share does not count.
    #[test]
    fn each_outage_starts_its_share_blocked() {
        let (mgr, bucket) = one_bucket(QuotaAlgorithm::Exact, 100, 60, 200, 1, None);
        let margin = mgr.config().safety_margin;
        let clock = DefaultClock::default();
        let span = Duration::from_secs(60) + margin;
        let t0 = Instant::now();
        let admit = |at, outage| bucket.try_admit_fallback(at, &clock, margin, 3, LIFE, outage);
        admit(t0, 1).expect_err("blocked at first");
        // Once the block has passed, the share of the first outage admits.
        let t1 = t0 + span + LIFE + Duration::from_millis(1);
        admit(t1, 1).expect("the first outage's share, unblocked");
        // Shared mode resumed (its window keeps the share), then Redis failed again.
        let wait = admit(t1, 2).expect_err("a new outage starts blocked");
        assert!(wait >= span + LIFE, "{wait:?}");
        // And that second share, once its own block has passed, admits.
        admit(t1 + wait + Duration::from_millis(1), 2).expect("the second outage's share");
    }

    /// A replica whose Redis does not answer falls back with its exact share blocked for a
    /// span and its configured lease.
    #[tokio::test]
    async fn a_decision_redis_cannot_make_falls_back_blocked_for_a_span_and_a_lease() {
        let lease = Duration::from_millis(300);
        let cluster = Cluster::unreachable(lease);
        let cfg = QuotaConfig::uniform(
            QuotaAlgorithm::Exact,
            100,
            Duration::from_secs(60),
            200,
            Duration::from_secs(1),
            None,
        );
        let span = Duration::from_secs(60) + cfg.safety_margin;
        let mgr = QuotaManager::with_cluster(cfg.clone(), Some(cluster.clone()));
        let bucket = mgr.bucket(&BucketKey {
            op: OperationId::from_index(0),
            app: None,
            user: None,
        });
        let wait = mgr
            .admit_shared(&bucket, &cluster, Instant::now(), &cfg)
            .await
            .expect_err("blocked at first");
        assert!(wait >= span + lease - Duration::from_millis(5), "{wait:?}");
    }

    /// A lower limit the upstream reports ends the lease held under the higher one.
    #[test]
    fn a_lower_reported_limit_ends_the_lease() {
        let (mgr, bucket) = one_bucket(QuotaAlgorithm::Exact, 100, 60, 200, 1, None);
        let t0 = Instant::now();
        let mut state = bucket.state.lock().expect("lock");
        state.lease.grant("m".to_owned(), 5, t0 + LIFE);
        let epoch = state.lease.epoch;
        let report = RateLimitReport {
            remain: None,
            limit: Some(10),
            window: None,
        };
        mgr.apply_report(&bucket, &mut state, LimitKind::PerApi, report, t0);
        assert!(!state.lease.take(t0));
        assert_ne!(
            state.lease.epoch, epoch,
            "a decision on its way leases nothing"
        );
    }

    #[test]
    fn a_cleared_lease_has_no_slot_left() {
        let t0 = Instant::now();
        let mut lease = Lease::default();
        lease.grant("m".to_owned(), 5, t0 + LIFE);
        lease.clear();
        assert!(!lease.take(t0));
    }
}
