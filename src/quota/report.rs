//! The upstream's `X-APIG-Ratelimit-*` counters: parsing them, counting our own admissions of
//! the last window to compare, and the budget a bucket keeps when someone else shares the quota.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use http::HeaderMap;

use super::bucket::{Admission, Bucket, BucketState};
use super::limit::{derive, exact, LimitKind, LimitParams, LimitSpec};
use super::limiter::Limit;
use super::QuotaManager;
use crate::headers::{X_APIG_RATELIMIT_ALLENV, X_APIG_RATELIMIT_API};
use crate::operations::OperationId;

/// Counters the upstream reported: at most `remain` more until `until`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    pub(super) remain: u64,
    pub(super) until: Instant,
}

/// Slots per window in [`Recent`].
pub(super) const RECENT_SLOTS: u32 = 64;

/// Admissions over a trailing span, counted per slot of `window / RECENT_SLOTS`: memory stays
/// a few dozen entries whatever the limit (a log of instants grows with the limit, megabytes
/// for large ones). A slot counts until all of it has aged out, so counts err towards "ours"
/// by at most one slot.
pub(super) struct Recent {
    pub(super) slot: Duration,
    pub(super) origin: Instant,
    /// (slot index since `origin`, admissions in it), oldest first.
    pub(super) slots: VecDeque<(u64, u32)>,
}

impl Recent {
    pub(super) fn new(window: Duration, origin: Instant) -> Recent {
        Recent {
            slot: (window / RECENT_SLOTS).max(Duration::from_millis(1)),
            origin,
            slots: VecDeque::new(),
        }
    }

    pub(super) fn index(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    /// Index of the oldest slot that still overlaps `span` before `now`.
    pub(super) fn oldest_within(&self, now: Instant, span: Duration) -> u64 {
        now.checked_sub(span).map_or(0, |start| self.index(start))
    }

    pub(super) fn push(&mut self, at: Instant) {
        let i = self.index(at);
        match self.slots.back_mut() {
            Some((last, n)) if *last == i => *n = n.saturating_add(1),
            _ => self.slots.push_back((i, 1)),
        }
    }

    /// Drops slots that lie wholly before `now - horizon`.
    pub(super) fn prune(&mut self, now: Instant, horizon: Duration) {
        let oldest = self.oldest_within(now, horizon);
        while self.slots.front().is_some_and(|(i, _)| *i < oldest) {
            self.slots.pop_front();
        }
    }

    /// Admissions in slots overlapping the `span` before `now`.
    pub(super) fn count_within(&self, now: Instant, span: Duration) -> u64 {
        let oldest = self.oldest_within(now, span);
        self.slots
            .iter()
            .filter(|(i, _)| *i >= oldest)
            .map(|(_, n)| u64::from(*n))
            .sum()
    }

    /// Every admission counted, as the end of its slot (when it surely happened by), oldest
    /// first.
    pub(super) fn admissions(&self) -> impl Iterator<Item = Instant> + '_ {
        self.slots.iter().flat_map(move |&(i, n)| {
            let end = self.origin
                + self
                    .slot
                    .saturating_mul(u32::try_from(i + 1).unwrap_or(u32::MAX));
            std::iter::repeat_n(end, n as usize)
        })
    }

    pub(super) fn total(&self) -> u64 {
        self.slots.iter().map(|(_, n)| u64::from(*n)).sum()
    }
}

/// A parsed `X-APIG-Ratelimit-*` value: `remain:R,limit:L,time:1 minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitReport {
    pub remain: Option<u64>,
    pub limit: Option<u64>,
    pub window: Option<Duration>,
}

/// Parses a rate-limit header, tolerating case, spaces, order and missing or garbage fields.
/// Returns `None` when nothing usable is in it.
pub fn parse_ratelimit(value: &str) -> Option<RateLimitReport> {
    let mut report = RateLimitReport {
        remain: None,
        limit: None,
        window: None,
    };
    for part in value.split([',', ';']) {
        let Some((name, val)) = part.split_once([':', '=']) else {
            continue;
        };
        let val = val.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "remain" => report.remain = val.parse().ok(),
            "limit" => report.limit = val.parse().ok(),
            "time" => report.window = parse_window(val),
            _ => {}
        }
    }
    (report.remain.is_some() || report.limit.is_some()).then_some(report)
}

fn parse_window(text: &str) -> Option<Duration> {
    let text = text.trim().to_ascii_lowercase();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = if num.is_empty() { 1 } else { num.parse().ok()? };
    let unit = unit.trim().trim_end_matches('s');
    let secs = match unit {
        "m" => return Some(Duration::from_millis(n)),
        "second" | "sec" | "" => 1,
        "minute" | "min" => 60,
        "hour" | "h" => 3600,
        "day" | "d" => 86_400,
        _ => return None,
    };
    // A window longer than a day is no APIG policy: ignored (a huge one would overflow the
    // instants a budget or a rebuilt limit ends at).
    Some(Duration::from_secs(n.checked_mul(secs)?)).filter(|w| *w <= MAX_WINDOW)
}

/// The longest window an upstream report may set: APIG's policies count per second, minute,
/// hour or day.
pub(super) const MAX_WINDOW: Duration = Duration::from_secs(86_400);

impl QuotaManager {
    /// Reads the upstream's counters on a response and adjusts the bucket: a lower reported
    /// limit replaces ours (warned once); less left than our own traffic explains means someone
    /// else shares the quota, so the bucket may send at most what is left until the window ends.
    /// The request is finished then (the bucket's lock is taken once for all of it).
    pub fn observe(&self, mut admission: Admission, headers: &HeaderMap) {
        let report = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_ratelimit)
        };
        let reports = [
            (LimitKind::PerApi, report(&X_APIG_RATELIMIT_API)),
            (LimitKind::AllEnv, report(&X_APIG_RATELIMIT_ALLENV)),
        ];
        let bucket = &admission.bucket;
        let mut state = bucket.state.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, report) in reports {
            if let Some(report) = report {
                self.apply_report(bucket, &mut state, kind, report, Instant::now());
            }
        }
        state.in_flight = state.in_flight.saturating_sub(1);
        drop(state);
        admission.finished = true;
    }

    pub(super) fn apply_report(
        &self,
        bucket: &Bucket,
        state: &mut BucketState,
        kind: LimitKind,
        report: RateLimitReport,
        now: Instant,
    ) {
        let in_flight = state.in_flight as u64;
        let Some(limit) = state.limits.iter_mut().find(|l| l.spec.kind == kind) else {
            return;
        };
        if let Some(reported) = report
            .limit
            .and_then(|l| u32::try_from(l).ok())
            .and_then(NonZeroU32::new)
        {
            let window = report.window.unwrap_or(limit.spec.window);
            if reported < limit.spec.limit || window > limit.spec.window {
                let spec = LimitSpec {
                    kind,
                    limit: reported.min(limit.spec.limit),
                    window: window.max(limit.spec.window),
                };
                let margin = self.cfg.load().safety_margin;
                let params = match limit.params {
                    LimitParams::Exact { pace, .. } => Some(exact(
                        spec.limit,
                        spec.window,
                        margin,
                        pace.map(|p| p.burst),
                    )),
                    LimitParams::Gcra(p) => {
                        let burst = p.burst.min(
                            NonZeroU32::new(spec.limit.get().saturating_sub(1))
                                .unwrap_or(NonZeroU32::MIN),
                        );
                        derive(spec.limit, spec.window, margin, burst)
                            .ok()
                            .map(LimitParams::Gcra)
                    }
                };
                if let Some(params) = params {
                    self.warn_once(bucket.op, kind, limit.spec, spec);
                    // Swap in a placeholder, then rebuild from the old limit.
                    let placeholder =
                        Limit::new(spec, params, &self.clock, bucket.born, now, false);
                    let old = std::mem::replace(limit, placeholder);
                    *limit = Limit::rebuilt(old, spec, params, &self.clock, bucket.born, now);
                    // Slots leased under the higher limit are not used under the lower one.
                    state.lease.end();
                }
            }
        }
        let Some(remain) = report.remain else { return };
        let margin = self.cfg.load().safety_margin;
        limit.last_upstream_remain = Some(remain);
        limit.prune(now, margin);
        let ours = limit.recent.total();
        let expected = u64::from(limit.spec.limit.get()).saturating_sub(ours);
        if remain < expected {
            let budget = Budget {
                remain: remain.saturating_sub(in_flight.saturating_sub(1)),
                until: now + limit.spec.window + margin,
            };
            tracing::debug!(
                kind = kind.as_str(),
                remain,
                expected,
                "Upstream quota shared; limiting to what is left"
            );
            limit.budget = Some(match limit.budget {
                Some(old) if old.remain < budget.remain => old,
                _ => budget,
            });
        }
    }

    pub(super) fn warn_once(
        &self,
        op: OperationId,
        kind: LimitKind,
        ours: LimitSpec,
        reported: LimitSpec,
    ) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.insert((op, kind.as_str()), ()).is_none() {
            tracing::warn!(
                operation = crate::operations::OperationTable::global().get(op).name,
                limit = kind.as_str(),
                configured = ours.limit.get(),
                configured_window_ms = ours.window.as_millis() as u64,
                reported = reported.limit.get(),
                reported_window_ms = reported.window.as_millis() as u64,
                "Upstream reports a lower limit than configured; using it"
            );
        }
    }
}
