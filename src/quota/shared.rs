//! The shared-mode bridge: a bucket's decisions made by the Redis script (the exact limiter's
//! sorted sets, or GCRA), and the local fallback share while Redis is unreachable.

use std::time::{Duration, Instant};

use governor::clock::DefaultClock;

use super::bucket::Bucket;
use super::limit::{fallback_share, LimitParams};
use super::limiter::Limit;
use super::{QuotaConfig, QuotaManager};
use crate::cluster::{Cluster, ExactVerdict};

/// A bucket's limits as the shared store decides them.
pub(super) enum SharedLimits {
    /// (key, N, span) per limit.
    Exact(Vec<(String, u32, Duration)>),
    /// (key, emission interval, tolerance) per limit.
    Gcra(Vec<(String, Duration, Duration)>),
}

impl Bucket {
    /// Local fallback while the shared store is unreachable: this replica's share
    /// (1/`max_replicas`) of every limit.
    pub(super) fn try_admit_fallback(
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
                    Limit::fallback(spec, params, clock, self.born, now)
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

impl QuotaManager {
    /// One decision through the shared store, or the local fallback when it is unreachable.
    pub(super) async fn admit_shared(
        &self,
        bucket: &Bucket,
        cluster: &Cluster,
        now: Instant,
        cfg: &QuotaConfig,
    ) -> Result<(), Duration> {
        let longest = cfg.longest_window() + cfg.safety_margin;
        // For a window after Redis came back, this replica also keeps to its fallback share,
        // counting what it admitted while falling back: the other replicas' fallback
        // admissions are not in Redis, and together the shares stay within the limit.
        let resuming = cluster.recently_resumed(longest);
        // A configured burst paces each replica's own admissions: its slot is taken here and
        // given back if the shared store refuses.
        let paces = {
            let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
            Bucket::precheck(&mut state, now)?;
            if resuming {
                let wait = Bucket::exact_wait(&state.fallback, bucket.born, now);
                if !wait.is_zero() {
                    return Err(wait);
                }
            }
            Bucket::take_paces(&state.limits)?
        };
        let verdict = match bucket.shared_limits(cluster) {
            SharedLimits::Exact(limits) => cluster.exact(&limits, longest).await.map(|v| match v {
                ExactVerdict::Admitted { .. } => None,
                ExactVerdict::Wait(wait) => Some(wait),
            }),
            SharedLimits::Gcra(limits) => cluster.gcra(&limits, longest).await,
        };
        // The decision took a Redis round trip, or a timeout, or a wait for the connection
        // another request is making: what is booked locally from here happens now, not when
        // this call began. (Booked at the earlier time, a fallback window would end early by
        // that wait, and the next share go while the upstream still counts this one.)
        let now = Instant::now().max(now);
        match verdict {
            Ok(None) => {
                let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
                if resuming {
                    Bucket::book_exact(&mut state.fallback, bucket.born, now);
                } else {
                    state.fallback.clear();
                }
                bucket.record(&mut state, now);
                Ok(())
            }
            Ok(Some(wait)) => {
                let state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
                Bucket::return_paces(&state.limits, paces);
                Err(wait)
            }
            Err(_) => {
                {
                    let state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
                    Bucket::return_paces(&state.limits, paces);
                }
                bucket.try_admit_fallback(
                    now,
                    &self.clock,
                    cfg.safety_margin,
                    cluster.config().max_replicas.get(),
                )
            }
        }
    }
}
