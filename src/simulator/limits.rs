//! The simulator's APIG throttling: per-API and all-env counters over fixed or sliding windows.
//!
//! Time is a parameter (`now`), so the window arithmetic is tested without sleeping.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{SimLimit, SimLimits, WindowKind};

/// Which policy refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    Api,
    AllEnv,
}

/// What is left of one policy after this request, for the `X-APIG-Ratelimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Remain {
    pub(crate) remain: u32,
    pub(crate) limit: u32,
    pub(crate) window: Duration,
}

impl Remain {
    /// `remain:R,limit:L,time:1 minute`.
    pub(crate) fn header_value(&self) -> String {
        format!(
            "remain:{},limit:{},time:{}",
            self.remain,
            self.limit,
            format_window(self.window)
        )
    }
}

#[derive(Debug)]
pub(crate) struct Verdict {
    pub(crate) refused: Option<Policy>,
    pub(crate) api: Option<Remain>,
    pub(crate) all_env: Option<Remain>,
}

impl Verdict {
    /// The `error_msg` APIG uses for `APIG.0308`, naming the policy's limit and window.
    pub(crate) fn message(&self) -> Option<String> {
        let r = match self.refused? {
            Policy::Api => self.api?,
            Policy::AllEnv => self.all_env?,
        };
        Some(format!(
            "The throttling threshold has been reached: policy api over ratelimit,limit:{},time:{}",
            r.limit,
            format_window(r.window)
        ))
    }
}

/// APIG writes windows as `1 minute` / `1 second`; the simulator also writes `N hour`, `N day`,
/// and `N ms` for windows that are not whole seconds.
pub(crate) fn format_window(d: Duration) -> String {
    let nanos = d.as_nanos();
    const S: u128 = 1_000_000_000;
    for (unit, name) in [
        (86_400 * S, "day"),
        (3600 * S, "hour"),
        (60 * S, "minute"),
        (S, "second"),
    ] {
        if nanos > 0 && nanos % unit == 0 {
            return format!("{} {name}", nanos / unit);
        }
    }
    if nanos % 1_000_000 == 0 {
        format!("{} ms", nanos / 1_000_000)
    } else {
        format!("{} ms", d.as_secs_f64() * 1000.0)
    }
}

#[derive(Debug)]
pub(crate) struct Limiter {
    start: Instant,
    per_api: HashMap<(String, String), Counter>,
    all_env: HashMap<String, Counter>,
}

impl Limiter {
    pub(crate) fn new(start: Instant) -> Self {
        Self {
            start,
            per_api: HashMap::new(),
            all_env: HashMap::new(),
        }
    }

    /// Checks both policies and, only when both have room, counts the request in both: a
    /// request refused by one consumes no slot in the other.
    pub(crate) fn check(
        &mut self,
        limits: &SimLimits,
        op: &str,
        app: &str,
        now: Instant,
    ) -> Verdict {
        let start = self.start;
        let kind = limits.window;
        let mut api = limits.per_api.map(|l| {
            let c = self
                .per_api
                .entry((op.to_owned(), app.to_owned()))
                .or_default();
            (c.used(start, now, l, kind), l)
        });
        let mut env = limits.all_env.map(|l| {
            let c = self.all_env.entry(op.to_owned()).or_default();
            (c.used(start, now, l, kind), l)
        });
        let refused = if api.is_some_and(|(used, l)| used >= l.limit) {
            Some(Policy::Api)
        } else if env.is_some_and(|(used, l)| used >= l.limit) {
            Some(Policy::AllEnv)
        } else {
            None
        };
        if refused.is_none() {
            if let (Some((used, _)), Some(c)) = (
                api.as_mut(),
                self.per_api.get_mut(&(op.to_owned(), app.to_owned())),
            ) {
                c.admit(now);
                *used += 1;
            }
            if let (Some((used, _)), Some(c)) = (env.as_mut(), self.all_env.get_mut(op)) {
                c.admit(now);
                *used += 1;
            }
        }
        let remain = |(used, l): (u32, SimLimit)| Remain {
            remain: l.limit.saturating_sub(used),
            limit: l.limit,
            window: l.window,
        };
        Verdict {
            refused,
            api: api.map(remain),
            all_env: env.map(remain),
        }
    }
}

/// One key's count. Its shape (window kind and length) is remembered so that a runtime change
/// of the limits starts a fresh count instead of misreading the old one.
#[derive(Debug, Default)]
struct Counter {
    shape: Option<(WindowKind, Duration)>,
    fixed_window: i128,
    fixed_count: u32,
    log: VecDeque<Instant>,
}

impl Counter {
    /// Admitted requests in the window that contains `now`.
    fn used(&mut self, start: Instant, now: Instant, limit: SimLimit, kind: WindowKind) -> u32 {
        // A zero window would divide by zero; the shortest representable one behaves the same.
        let window = limit.window.max(Duration::from_nanos(1));
        if self.shape != Some((kind, window)) {
            *self = Counter {
                shape: Some((kind, window)),
                ..Counter::default()
            };
        }
        match kind {
            WindowKind::Fixed { phase } => {
                let elapsed = now.saturating_duration_since(start).as_nanos() as i128;
                let id = (elapsed - phase.as_nanos() as i128).div_euclid(window.as_nanos() as i128);
                if id != self.fixed_window {
                    self.fixed_window = id;
                    self.fixed_count = 0;
                }
                self.fixed_count
            }
            WindowKind::Sliding => {
                if let Some(edge) = now.checked_sub(window) {
                    while self.log.front().is_some_and(|t| *t <= edge) {
                        self.log.pop_front();
                    }
                }
                u32::try_from(self.log.len()).unwrap_or(u32::MAX)
            }
        }
    }

    fn admit(&mut self, now: Instant) {
        match self.shape {
            Some((WindowKind::Sliding, _)) => self.log.push_back(now),
            _ => self.fixed_count = self.fixed_count.saturating_add(1),
        }
    }
}

/// The most timestamps (sorted) that fit in one half-open window of length `window`,
/// i.e. `max over j of #{i : t_j - t_i < window}`.
pub(crate) fn max_in_window(times: &VecDeque<Instant>, window: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for (hi, t) in times.iter().enumerate() {
        while lo < hi && t.saturating_duration_since(times[lo]) >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(n: u32, w: Duration, kind: WindowKind) -> SimLimits {
        SimLimits {
            per_api: Some(SimLimit::new(n, w)),
            all_env: None,
            window: kind,
        }
    }

    const FIXED0: WindowKind = WindowKind::Fixed {
        phase: Duration::ZERO,
    };

    #[test]
    fn fixed_window_resets_on_the_boundary() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let lim = limits(3, Duration::from_secs(10), FIXED0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let r: Vec<_> = (0..4)
            .map(|_| l.check(&lim, "op", "a", at(9)).refused)
            .collect();
        assert_eq!(r, [None, None, None, Some(Policy::Api)]);
        // A fixed window lets a burst straddle the boundary: 3 at t=9 and 3 at t=10.
        let v = l.check(&lim, "op", "a", at(10));
        assert_eq!(v.refused, None);
        assert_eq!(v.api.map(|r| r.remain), Some(2));
        // Keys are per (operation, app).
        assert_eq!(l.check(&lim, "op", "b", at(9)).refused, None);
        assert_eq!(l.check(&lim, "op2", "a", at(9)).refused, None);
    }

    #[test]
    fn fixed_window_phase_moves_the_boundary() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let lim = limits(
            1,
            Duration::from_secs(10),
            WindowKind::Fixed {
                phase: Duration::from_secs(3),
            },
        );
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(l.check(&lim, "op", "a", at(1)).refused, None);
        assert_eq!(l.check(&lim, "op", "a", at(2)).refused, Some(Policy::Api));
        assert_eq!(l.check(&lim, "op", "a", at(3)).refused, None);
        assert_eq!(l.check(&lim, "op", "a", at(12)).refused, Some(Policy::Api));
        assert_eq!(l.check(&lim, "op", "a", at(13)).refused, None);
    }

    #[test]
    fn sliding_window_counts_the_last_w() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let lim = limits(2, Duration::from_secs(10), WindowKind::Sliding);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(l.check(&lim, "op", "a", at(1)).refused, None);
        assert_eq!(l.check(&lim, "op", "a", at(9)).refused, None);
        assert_eq!(l.check(&lim, "op", "a", at(10)).refused, Some(Policy::Api));
        // (1, 11]: the request at 1 has left the window.
        let v = l.check(&lim, "op", "a", at(11));
        assert_eq!(v.refused, None);
        assert_eq!(v.api.map(|r| r.remain), Some(0));
        assert_eq!(l.check(&lim, "op", "a", at(18)).refused, Some(Policy::Api));
    }

    #[test]
    fn refusal_by_one_policy_consumes_nothing_in_the_other() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let lim = SimLimits {
            per_api: Some(SimLimit::new(1, Duration::from_secs(60))),
            all_env: Some(SimLimit::new(2, Duration::from_secs(60))),
            window: FIXED0,
        };
        assert_eq!(l.check(&lim, "op", "a", t0).refused, None);
        let v = l.check(&lim, "op", "a", t0);
        assert_eq!(v.refused, Some(Policy::Api));
        assert_eq!(v.all_env.map(|r| r.remain), Some(1));
        assert_eq!(
            v.message().as_deref(),
            Some("The throttling threshold has been reached: policy api over ratelimit,limit:1,time:1 minute")
        );
        assert_eq!(l.check(&lim, "op", "b", t0).refused, None);
        let v = l.check(&lim, "op", "c", t0);
        assert_eq!(v.refused, Some(Policy::AllEnv));
        // c's per-API slot was not used.
        assert_eq!(v.api.map(|r| r.remain), Some(1));
    }

    #[test]
    fn windows_format_like_apig() {
        assert_eq!(format_window(Duration::from_secs(60)), "1 minute");
        assert_eq!(format_window(Duration::from_secs(1)), "1 second");
        assert_eq!(format_window(Duration::from_secs(90)), "90 second");
        assert_eq!(format_window(Duration::from_secs(7200)), "2 hour");
        assert_eq!(format_window(Duration::from_millis(250)), "250 ms");
        assert_eq!(
            Remain {
                remain: 99,
                limit: 100,
                window: Duration::from_secs(60)
            }
            .header_value(),
            "remain:99,limit:100,time:1 minute"
        );
    }

    #[test]
    fn max_in_window_is_half_open() {
        let t0 = Instant::now();
        let times: VecDeque<_> = [0u64, 5, 10, 11, 12]
            .iter()
            .map(|s| t0 + Duration::from_secs(*s))
            .collect();
        assert_eq!(max_in_window(&times, Duration::from_secs(10)), 4);
        assert_eq!(max_in_window(&times, Duration::from_secs(11)), 4);
        assert_eq!(max_in_window(&times, Duration::from_secs(12)), 4);
        assert_eq!(max_in_window(&times, Duration::from_secs(13)), 5);
        assert_eq!(max_in_window(&VecDeque::new(), Duration::from_secs(1)), 0);
    }
}
