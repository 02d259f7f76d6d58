//! One limit's state in a bucket: the engine that decides (the exact ring, or GCRA alone),
//! our own admissions of the last window (to compare with the upstream's counters), and the
//! budget the upstream's counters imposed; built fresh, spent, or rebuilt from an older state
//! without granting a fresh burst.

use std::time::{Duration, Instant};

use governor::clock::DefaultClock;

use super::exact::Ring;
use super::gcra::Gcra;
use super::limit::{LimitParams, LimitSpec};
use super::report::{Budget, Recent};

/// What decides a limit's admissions.
pub(super) enum Engine {
    Exact { ring: Ring, pace: Option<Gcra> },
    Gcra(Gcra),
}

pub(super) struct Limit {
    pub(super) spec: LimitSpec,
    pub(super) params: LimitParams,
    pub(super) engine: Engine,
    /// Our own admissions inside the last window: what we expect the upstream to have counted.
    pub(super) recent: Recent,
    pub(super) budget: Option<Budget>,
    /// What the upstream's counter said last, for metrics.
    pub(super) last_upstream_remain: Option<u64>,
}

/// Nanoseconds of `at` since `origin` (the bucket's birth): the exact rings' clock.
pub(super) fn nanos(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

impl Limit {
    /// A limit as if idle for a window (`fresh`: a bucket seen for the first time), or as if
    /// its window had just been used up at the steady rate (a limit that cannot know its
    /// recent past: a fallback share, a limit added on reload).
    pub(super) fn new(
        spec: LimitSpec,
        params: LimitParams,
        clock: &DefaultClock,
        origin: Instant,
        now: Instant,
        fresh: bool,
    ) -> Limit {
        let engine = match params {
            LimitParams::Exact { pace, .. } => Engine::Exact {
                ring: if fresh {
                    Ring::new(spec.limit.get())
                } else {
                    Ring::spent(spec.limit.get(), nanos(origin, now))
                },
                pace: pace.map(|p| Gcra::new(p, clock, if fresh { p.burst.get() } else { 0 })),
            },
            LimitParams::Gcra(p) => {
                Engine::Gcra(Gcra::new(p, clock, if fresh { p.burst.get() } else { 0 }))
            }
        };
        Limit {
            spec,
            params,
            engine,
            recent: Recent::new(spec.window, now),
            budget: None,
            last_upstream_remain: None,
        }
    }

    /// A replica's fallback share of a limit, entered when the shared store stops answering.
    /// The exact limiter's share starts blocked for a window: what the other replicas
    /// admitted in the window is not known here, and may have been all of it, so only once a
    /// window has passed can the shares (which together make N) be used safely; `hold` more
    /// for slots other replicas leased before the failure and may still use. GCRA starts
    /// spent, as always.
    pub(super) fn fallback(
        spec: LimitSpec,
        params: LimitParams,
        clock: &DefaultClock,
        origin: Instant,
        now: Instant,
        hold: Duration,
    ) -> Limit {
        let mut limit = Limit::new(spec, params, clock, origin, now, false);
        if let (Engine::Exact { ring, .. }, LimitParams::Exact { span, .. }) =
            (&mut limit.engine, params)
        {
            *ring = Ring::blocked(spec.limit.get(), nanos(origin, now + span + hold));
        }
        limit
    }

    /// The same limit under new parameters (a reload, a lower limit the upstream reported, a
    /// switch of algorithm), keeping what was admitted in the window: no fresh burst, and never
    /// more at once than the old state allowed.
    pub(super) fn rebuilt(
        old: Limit,
        spec: LimitSpec,
        params: LimitParams,
        clock: &DefaultClock,
        origin: Instant,
        now: Instant,
    ) -> Limit {
        let span = old.spec.window.max(spec.window);
        let used = old.recent.count_within(now, span);
        let available = old.available(origin, now);
        let engine = match (params, old.engine) {
            (
                LimitParams::Exact { pace, .. },
                Engine::Exact {
                    ring,
                    pace: old_pace,
                },
            ) => Engine::Exact {
                ring: ring.resized(spec.limit.get()),
                pace: pace.map(|p| {
                    let left = old_pace.as_ref().map_or(available, |g| g.available(now));
                    Gcra::new(p, clock, left.min(u64::from(p.burst.get())) as u32)
                }),
            },
            (LimitParams::Exact { pace, .. }, Engine::Gcra(_)) => {
                // GCRA kept no admission times: our own count of the window stands in, each
                // admission at the end of its slot (so it stays in the window no shorter).
                let mut ring = Ring::new(spec.limit.get());
                for at in old.recent.admissions() {
                    ring.push(nanos(origin, at.min(now)));
                }
                Engine::Exact {
                    ring,
                    pace: pace.map(|p| Gcra::new(p, clock, 0)),
                }
            }
            (LimitParams::Gcra(p), _) => {
                let left = available.min(u64::from(p.burst.get()).saturating_sub(used));
                Engine::Gcra(Gcra::new(p, clock, left as u32))
            }
        };
        Limit {
            spec,
            params,
            engine,
            recent: old.recent,
            budget: old.budget,
            last_upstream_remain: old.last_upstream_remain,
        }
    }

    /// Admissions possible at once at `now`.
    pub(super) fn available(&self, origin: Instant, now: Instant) -> u64 {
        match &self.engine {
            Engine::Gcra(g) => g.available(now),
            Engine::Exact { ring, pace } => {
                let LimitParams::Exact { span, .. } = self.params else {
                    return 0;
                };
                // The first k that cannot go at once, by bisection (free_at is monotone in k).
                let t = nanos(origin, now);
                let (mut lo, mut hi) = (0u64, u64::from(ring.capacity()));
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if ring.free_at(mid, t, span).is_none() {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                pace.as_ref().map_or(lo, |g| lo.min(g.available(now)))
            }
        }
    }

    /// How long the request with `ahead` requests before it will likely wait for this limit.
    pub(super) fn estimate(&self, ahead: u64, origin: Instant, now: Instant) -> Duration {
        match &self.engine {
            Engine::Gcra(g) => g.estimate(ahead, now),
            Engine::Exact { ring, pace } => {
                let LimitParams::Exact { span, .. } = self.params else {
                    return Duration::ZERO;
                };
                let t = nanos(origin, now);
                let exact = ring
                    .free_at(ahead, t, span)
                    .map_or(Duration::ZERO, |at| Duration::from_nanos(at - t));
                pace.as_ref()
                    .map_or(exact, |g| exact.max(g.estimate(ahead, now)))
            }
        }
    }

    /// Keeps our admissions of the last `window + margin`: a request we admitted just over a
    /// window ago may have reached the upstream just under one, and must still count as ours
    /// or the upstream's counters would look like someone else's traffic.
    pub(super) fn prune(&mut self, now: Instant, margin: Duration) {
        self.recent.prune(now, self.spec.window + margin);
    }
}
