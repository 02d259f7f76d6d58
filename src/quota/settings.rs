//! `[quota]`: the upstream's limits as configured (plain, validated values) and each
//! operation's limits resolved from them.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Serialize;

use super::limit::{derive, exact, LimitKind, LimitParams, LimitSpec};
use crate::operations::{OperationId, OperationTable};
use crate::secret::print;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaMode {
    /// Wait (up to `max_wait`) for a slot.
    Pace,
    /// Refuse at once when the limiter says no.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaScope {
    /// One bucket per operation and app.
    App,
    /// One bucket per operation, app and user.
    User,
    /// One bucket per operation for the whole gateway.
    Gateway,
}

/// Which limiter enforces the upstream's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaAlgorithm {
    /// Exact: the admission times of the last N per limit; a request goes exactly when fewer
    /// than N went in the last window plus margin. A full window goes at once after idle.
    Exact,
    /// GCRA (governor): requests spread evenly; at most `b + ceil(W/T) - 1` in any window.
    Gcra,
}

/// The burst GCRA uses where none is configured.
pub const GCRA_DEFAULT_BURST: u32 = 10;

/// One operation's overrides of the defaults (`[quota.operations.<name>]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpQuota {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_api_per_minute: Option<NonZeroU32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_env_per_second: Option<NonZeroU32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<NonZeroU32>,
}

/// The quota settings. Built by the config layer; what each operation's limits are follows
/// from them here ([`QuotaConfig::limits_for`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuotaConfig {
    pub enabled: bool,
    pub algorithm: QuotaAlgorithm,
    pub mode: QuotaMode,
    #[serde(serialize_with = "print::duration")]
    pub max_wait: Duration,
    pub scope: QuotaScope,
    pub per_api_per_minute: NonZeroU32,
    pub all_env_per_second: NonZeroU32,
    #[serde(serialize_with = "print::duration")]
    pub per_api_window: Duration,
    #[serde(serialize_with = "print::duration")]
    pub all_env_window: Duration,
    /// Exact: the most admitted back to back before the rest are spread at `W/N` (none: a
    /// full window may go at once). GCRA: its burst (10 when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<NonZeroU32>,
    #[serde(serialize_with = "print::duration")]
    pub safety_margin: Duration,
    /// Overrides by operation name (names the operation table knows).
    pub operations: BTreeMap<String, OpQuota>,
}

impl QuotaConfig {
    /// Defaults everywhere: the exact limiter, 100 per minute per API, 200 per second across
    /// environments, no burst cap, margin 100 ms, pacing up to 5 s, one bucket per operation
    /// and app.
    pub fn default_limits() -> QuotaConfig {
        let nz = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        QuotaConfig {
            enabled: true,
            algorithm: QuotaAlgorithm::Exact,
            mode: QuotaMode::Pace,
            max_wait: Duration::from_secs(5),
            scope: QuotaScope::App,
            per_api_per_minute: nz(100),
            all_env_per_second: nz(200),
            per_api_window: Duration::from_secs(60),
            all_env_window: Duration::from_secs(1),
            burst: None,
            safety_margin: Duration::from_millis(100),
            operations: BTreeMap::new(),
        }
    }

    /// The limits one operation gets: its overrides, else the defaults, as
    /// (per_api_per_minute, all_env_per_second, burst).
    pub fn values_for(&self, name: &str) -> (NonZeroU32, NonZeroU32, Option<NonZeroU32>) {
        let o = self.operations.get(name).copied().unwrap_or_default();
        (
            o.per_api_per_minute.unwrap_or(self.per_api_per_minute),
            o.all_env_per_second.unwrap_or(self.all_env_per_second),
            o.burst.or(self.burst),
        )
    }

    /// Each limit of `values` with how it is enforced, shortest window first; the limits
    /// that cannot hold with that burst (GCRA) come back as errors (kind, message).
    pub fn resolve(
        &self,
        (per_api, all_env, burst): (NonZeroU32, NonZeroU32, Option<NonZeroU32>),
    ) -> Vec<Result<(LimitSpec, LimitParams), (LimitKind, String)>> {
        let mut limits = [
            (LimitKind::AllEnv, all_env, self.all_env_window),
            (LimitKind::PerApi, per_api, self.per_api_window),
        ];
        limits.sort_by_key(|(_, _, window)| *window);
        limits
            .into_iter()
            .map(|(kind, limit, window)| {
                let params = match self.algorithm {
                    QuotaAlgorithm::Exact => Ok(exact(limit, window, self.safety_margin, burst)),
                    QuotaAlgorithm::Gcra => {
                        let burst = burst.unwrap_or(
                            NonZeroU32::new(GCRA_DEFAULT_BURST).unwrap_or(NonZeroU32::MIN),
                        );
                        derive(limit, window, self.safety_margin, burst).map(LimitParams::Gcra)
                    }
                };
                params
                    .map(|params| {
                        (
                            LimitSpec {
                                kind,
                                limit,
                                window,
                            },
                            params,
                        )
                    })
                    .map_err(|msg| (kind, msg))
            })
            .collect()
    }

    /// The limits covering `op`, shortest window first. Validation refused every setting whose
    /// limits cannot hold, so none is left out here.
    pub fn limits_for(&self, op: OperationId) -> Vec<(LimitSpec, LimitParams)> {
        let name = OperationTable::global().get(op).name;
        self.resolve(self.values_for(name))
            .into_iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// The longest window of any limit: buckets idle this long hold no state worth keeping.
    pub fn longest_window(&self) -> Duration {
        self.per_api_window.max(self.all_env_window)
    }

    /// Every operation gets these two limits under `algorithm` (unit tests and benches).
    pub fn uniform(
        algorithm: QuotaAlgorithm,
        per_api: u32,
        per_api_window: Duration,
        all_env: u32,
        all_env_window: Duration,
        burst: Option<u32>,
    ) -> QuotaConfig {
        let nz = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        QuotaConfig {
            algorithm,
            per_api_per_minute: nz(per_api),
            all_env_per_second: nz(all_env),
            per_api_window,
            all_env_window,
            burst: burst.map(nz),
            ..QuotaConfig::default_limits()
        }
    }
}
