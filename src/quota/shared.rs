//! The shared-mode bridge: a bucket's decisions made by the Redis script, and the local
//! fallback share while Redis is unreachable.

use std::time::{Duration, Instant};

use governor::clock::DefaultClock;

use super::bucket::Bucket;
use super::gcra::Limit;
use super::limit::fallback_share;
use super::{QuotaConfig, QuotaManager};
use crate::cluster::Cluster;

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

    /// The shared keys and GCRA parameters (interval, tolerance) of this bucket's limits.
    pub(super) fn shared_limits(&self, cluster: &Cluster) -> Vec<(String, Duration, Duration)> {
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
}
