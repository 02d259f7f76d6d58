//! What a limit is and its arithmetic: N per window, the GCRA parameters that keep every window
//! at or under N, and a replica's share of a limit when replicas cannot coordinate.

use std::num::NonZeroU32;
use std::time::Duration;

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

/// How one limit is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitParams {
    /// The exact limiter: at most `limit` admissions in any `span` (the window plus the safety
    /// margin), with an optional GCRA `pace` that lets at most its burst go back to back and
    /// spreads the rest at `span / limit` (from a configured `burst`).
    Exact {
        span: Duration,
        pace: Option<GcraParams>,
    },
    /// GCRA alone (governor), with window-safe parameters ([`derive`]).
    Gcra(GcraParams),
}

impl LimitParams {
    /// The spacing of paced requests at the steady rate: what a hold lasts when the upstream's
    /// 429 names no `Retry-After`.
    pub fn interval(&self, limit: NonZeroU32) -> Duration {
        match self {
            LimitParams::Exact { span, .. } => *span / limit.get(),
            LimitParams::Gcra(p) => p.interval,
        }
    }
}

/// The exact limiter's parameters for `limit` per `window`: the span `window + margin`, and a
/// pace when `burst` caps back-to-back admissions below the limit.
pub fn exact(
    limit: NonZeroU32,
    window: Duration,
    margin: Duration,
    burst: Option<NonZeroU32>,
) -> LimitParams {
    let span = window + margin;
    let pace = burst.filter(|b| *b < limit).map(|burst| GcraParams {
        burst,
        interval: span / limit.get() + Duration::from_nanos(1),
    });
    LimitParams::Exact { span, pace }
}

/// This replica's share of a limit when replicas cannot coordinate: N / replicas (at least 1)
/// in the same window, with a burst or pace cut to fit.
pub fn fallback_share(
    spec: LimitSpec,
    params: LimitParams,
    margin: Duration,
    replicas: u32,
) -> (LimitSpec, LimitParams) {
    let n = (spec.limit.get() / replicas.max(1)).max(1);
    let limit = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    let share = LimitSpec { limit, ..spec };
    match params {
        LimitParams::Exact { pace, .. } => (
            share,
            exact(limit, spec.window, margin, pace.map(|p| p.burst)),
        ),
        LimitParams::Gcra(params) => {
            // One per window (plus margin): burst 1, interval longer than the window.
            let one = GcraParams {
                burst: NonZeroU32::MIN,
                interval: spec.window + margin + Duration::from_nanos(1),
            };
            if n == 1 {
                return (share, LimitParams::Gcra(one));
            }
            let burst = params
                .burst
                .min(NonZeroU32::new(n - 1).unwrap_or(NonZeroU32::MIN));
            let derived = derive(limit, spec.window, margin, burst).unwrap_or(one);
            (share, LimitParams::Gcra(derived))
        }
    }
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
