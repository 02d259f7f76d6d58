//! The exact limiter of one limit: the admission times of the last `N` requests, a ring of `N`
//! instants. A request is admitted exactly when fewer than `N` were admitted in the last
//! `W + margin`, so a full window can go at once after idle, every slot of the allowance is
//! used, and the wait of a refused request is known to the nanosecond (when enough of the
//! admissions in the window have left it). Memory: 8 bytes per admission of the last window,
//! at most `N` (800 bytes for 100 per minute).
//!
//! A limiter that cannot know its recent past (a fallback share, a limit added on reload)
//! starts *spent*: as if its whole window had been used evenly up to then. Those `N` admissions
//! are virtual (a start time, not `N` entries), so the steady rate goes on at once, no burst
//! does, and a huge `N` costs nothing.

use std::cell::Cell;
use std::time::Duration;

/// The last `capacity` admission times, in nanoseconds on the owner's clock, oldest first.
#[derive(Debug, Clone)]
pub(super) struct Ring {
    times: Vec<u64>,
    /// Index of the oldest entry once the ring is full.
    head: usize,
    capacity: usize,
    /// Nothing is admitted before this (a fallback share's first window).
    blocked_until: Option<u64>,
    /// Spent from here: `capacity` virtual admissions at `from - span + span * k / capacity`
    /// (k = 1..=capacity), leaving the window one by one at the steady rate.
    spent_from: Option<u64>,
    /// Admissions recorded since the ring began: the oldest entry is number `pushed - len`.
    pushed: u64,
    /// Where the last look-up found the window's first entry, by that numbering (so it
    /// survives the oldest entries being overwritten); the next look-up starts there.
    hint: Cell<u64>,
}

/// Entries the ring allocates up front; it grows to its capacity only as admissions come.
const INITIAL: usize = 64;

impl Ring {
    pub(super) fn new(capacity: u32) -> Ring {
        let capacity = capacity.max(1) as usize;
        Ring {
            times: Vec::with_capacity(capacity.min(INITIAL)),
            head: 0,
            capacity,
            blocked_until: None,
            spent_from: None,
            pushed: 0,
            hint: Cell::new(0),
        }
    }

    /// A ring that admits nothing before `until`, then a full window.
    pub(super) fn blocked(capacity: u32, until: u64) -> Ring {
        Ring {
            blocked_until: Some(until),
            ..Ring::new(capacity)
        }
    }

    /// A ring that looks as if its whole window had been used, evenly, up to `now`.
    pub(super) fn spent(capacity: u32, now: u64) -> Ring {
        Ring {
            spent_from: Some(now),
            ..Ring::new(capacity)
        }
    }

    pub(super) fn capacity(&self) -> u32 {
        u32::try_from(self.capacity).unwrap_or(u32::MAX)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.times.len()
    }

    /// The `i`-th oldest entry (0 is the oldest).
    fn nth(&self, i: usize) -> Option<u64> {
        let len = self.times.len();
        if i >= len {
            return None;
        }
        // `head < len`: a subtraction instead of a division.
        let at = self.head + i;
        self.times
            .get(if at >= len { at - len } else { at })
            .copied()
    }

    /// Index of the oldest entry still in the closed window `[now - span, now]` (the length
    /// if none is).
    ///
    /// Entries are oldest first, so "left the window" holds for a prefix of them. Look-ups
    /// come with a `now` a little after the last one's, so the search starts where the last
    /// one ended and steps outwards, doubling (galloping), then bisects what it bracketed. A
    /// request then reads a few neighbouring entries instead of bisecting the whole ring: at
    /// a large N (a quota that never binds) the ring is megabytes, and each step of a
    /// bisection of it was a cache miss. Any `now` still gets the exact answer.
    fn first_in_window(&self, now: u64, span: u64) -> usize {
        let len = self.times.len();
        let gone = |i: usize| self.nth(i).is_some_and(|t| now.saturating_sub(t) > span);
        let base = self.pushed - len as u64;
        let start = usize::try_from(self.hint.get().saturating_sub(base))
            .unwrap_or(len)
            .min(len);
        // Everything before `lo` has left the window; nothing from `hi` on has.
        let (mut lo, mut hi);
        if start < len && gone(start) {
            lo = start + 1;
            hi = len;
            let mut step = 1;
            while let Some(probe) = start.checked_add(step).filter(|p| *p < len) {
                if !gone(probe) {
                    hi = probe;
                    break;
                }
                lo = probe + 1;
                step *= 2;
            }
        } else {
            lo = 0;
            hi = start;
            let mut step = 1;
            while let Some(probe) = start.checked_sub(step) {
                if gone(probe) {
                    lo = probe + 1;
                    break;
                }
                hi = probe;
                step *= 2;
            }
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if gone(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        self.hint.set(base + lo as u64);
        lo
    }

    /// Virtual admissions of a spent start that already left the window at `now`.
    fn virtual_left(&self, now: u64, span: u64) -> u64 {
        let n = self.capacity as u64;
        match self.spent_from {
            None => n,
            Some(from) if now <= from => 0,
            // The k-th leaves at `from + floor(span * k / n) + 1`: those with
            // floor(span * k / n) <= now - from - 1, i.e. k < (now - from) * n / span.
            Some(from) => {
                let d = u128::from(now - from);
                let left = (d * u128::from(n)).div_ceil(u128::from(span.max(1))) - 1;
                u64::try_from(left).map_or(n, |l| l.min(n))
            }
        }
    }

    /// When the `k`-th virtual admission (1-based) leaves the window.
    fn virtual_exit(&self, k: u64, span: u64) -> Option<u64> {
        let from = self.spent_from?;
        let n = self.capacity as u64;
        let at = u128::from(span) * u128::from(k) / u128::from(n);
        Some(from + u64::try_from(at).ok()? + 1)
    }

    /// How long until a request at `now` may be admitted: zero when fewer than `capacity`
    /// admissions lie within the closed window `[now - span, now]`.
    pub(super) fn wait(&self, now: u64, span: Duration) -> Duration {
        self.free_at(0, now, span).map_or(Duration::ZERO, |at| {
            Duration::from_nanos(at.saturating_sub(now))
        })
    }

    /// When the `k`-th request from now (0 is the next) could be admitted if every earlier one
    /// is admitted as soon as it may: `None` if at once. Within the window this is exact;
    /// requests beyond it are estimated whole spans later (the ring decides each one exactly
    /// when it comes).
    pub(super) fn free_at(&self, k: u64, now: u64, span: Duration) -> Option<u64> {
        if let Some(until) = self.blocked_until.filter(|u| *u > now) {
            let after = self.free_at_unblocked(k, until, span).unwrap_or(until);
            return Some(after);
        }
        self.free_at_unblocked(k, now, span)
    }

    fn free_at_unblocked(&self, k: u64, now: u64, span: Duration) -> Option<u64> {
        let span = span.as_nanos() as u64;
        let cap = self.capacity as u64;
        let first = self.first_in_window(now, span);
        let real = (self.times.len() - first) as u64;
        let left = self.virtual_left(now, span);
        let virt = cap - left;
        // This many admissions must leave the window first.
        let excess = (real + virt + k + 1).checked_sub(cap).filter(|e| *e > 0)?;
        // Merge the exits of the real and the virtual admissions, oldest first.
        let (mut r, mut v) = (first, left + 1);
        let mut last = now;
        for _ in 0..excess.min(real + virt) {
            let real_exit = self.nth(r).map(|t| t + span + 1);
            let virt_exit = (v <= cap).then(|| self.virtual_exit(v, span)).flatten();
            last = match (real_exit, virt_exit) {
                (Some(a), Some(b)) if a <= b => {
                    r += 1;
                    a
                }
                (Some(a), None) => {
                    r += 1;
                    a
                }
                (_, Some(b)) => {
                    v += 1;
                    b
                }
                (None, None) => break,
            };
        }
        if excess > real + virt {
            // Beyond what is in the window: admissions of later spans.
            let rounds = (excess - real - virt).div_ceil(cap);
            last = last.max(now) + rounds * (span + 1);
        }
        (last > now).then_some(last)
    }

    /// Records an admission at `now` (never earlier than the newest entry).
    pub(super) fn push(&mut self, now: u64) {
        if self.times.len() < self.capacity {
            self.times.push(now);
        } else if let Some(slot) = self.times.get_mut(self.head) {
            *slot = now;
            self.head = (self.head + 1) % self.capacity;
        }
        self.pushed += 1;
    }

    /// The same admissions under a new capacity: the newest `capacity` are kept (a lowered
    /// limit keeps what was admitted in the window; the older ones left before these), and a
    /// spent start stays spent.
    pub(super) fn resized(&self, capacity: u32) -> Ring {
        let mut ring = Ring::new(capacity);
        ring.spent_from = self.spent_from;
        ring.blocked_until = self.blocked_until;
        let skip = self.times.len().saturating_sub(ring.capacity);
        for i in skip..self.times.len() {
            if let Some(t) = self.nth(i) {
                ring.push(t);
            }
        }
        ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_full_window_goes_at_once_then_the_next_waits_for_the_oldest() {
        let span = Duration::from_millis(1000);
        let mut r = Ring::new(3);
        for t in [0, 10 * MS, 20 * MS] {
            assert_eq!(r.wait(t, span), Duration::ZERO);
            r.push(t);
        }
        // The fourth waits until the first is more than a span old.
        assert_eq!(r.wait(500 * MS, span), Duration::from_nanos(500 * MS + 1));
        assert_eq!(r.wait(1000 * MS + 1, span), Duration::ZERO);
        // The queue's estimate: the next three at each entry's exit, then a span later.
        assert_eq!(r.free_at(0, 500 * MS, span), Some(1000 * MS + 1));
        assert_eq!(r.free_at(2, 500 * MS, span), Some(1020 * MS + 1));
        assert_eq!(r.free_at(3, 500 * MS, span), Some(2020 * MS + 2));
    }

    #[test]
    fn resizing_keeps_the_newest_and_spent_rings_pace_without_a_burst() {
        let mut r = Ring::new(4);
        for t in 1..=4 {
            r.push(t * MS);
        }
        let small = r.resized(2);
        assert_eq!(
            (small.len(), small.nth(0), small.nth(1)),
            (2, Some(3 * MS), Some(4 * MS))
        );
        let big = r.resized(8);
        assert_eq!(big.len(), 4);
        assert_eq!(big.wait(4 * MS, Duration::from_secs(1)), Duration::ZERO);

        let span = Duration::from_millis(1000);
        let spent = Ring::spent(10, 5000 * MS);
        // One slot frees per span/N: the steady rate, no burst.
        assert!(spent.wait(5000 * MS, span) > Duration::ZERO);
        assert!(spent.wait(5000 * MS + 100 * MS + 1, span).is_zero());
        assert!(spent.free_at(1, 5000 * MS + 100 * MS + 1, span).is_some());
        // A spent ring of a million costs nothing up front.
        let huge = Ring::spent(1_000_000, 0);
        assert!(huge.times.capacity() <= INITIAL);
        assert!(huge.wait(0, Duration::from_secs(60)) > Duration::ZERO);
        // A blocked ring: nothing before its end, then the whole window.
        let blocked = Ring::blocked(3, 2000 * MS);
        assert_eq!(blocked.wait(1500 * MS, span), Duration::from_millis(500));
        assert_eq!(blocked.free_at(2, 1500 * MS, span), Some(2000 * MS));
        assert!(blocked.wait(2000 * MS, span).is_zero());
    }

    /// Closed windows `[t, t + span]`: the most admissions any one holds.
    fn max_in_window(times: &[u64], span: u64) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] > span {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The search that starts from the last answer finds what a scan of the whole ring
        /// finds, for look-ups at any time (later, earlier, far ahead) between admissions,
        /// while the ring fills and then overwrites its oldest entries.
        #[test]
        fn the_window_is_found_from_the_last_answer_as_a_full_scan_finds_it(
            n in 1u32..64,
            span in 1u64..1_000,
            steps in proptest::collection::vec((0u64..300, -2_000i64..2_000, 0u8..4), 1..300),
        ) {
            let mut ring = Ring::new(n);
            let mut at = 0u64;
            for (gap, offset, looks) in steps {
                at += gap;
                ring.push(at);
                for k in 0..looks {
                    let now = at.saturating_add_signed(offset * i64::from(k));
                    let scan = (0..ring.len())
                        .take_while(|i| ring.nth(*i).is_some_and(|t| now.saturating_sub(t) > span))
                        .count();
                    prop_assert_eq!(ring.first_in_window(now, span), scan);
                }
            }
        }

        /// Requests queue in arrival order and each goes at the moment the ring says; no window
        /// holds more than N (counting a spent start's virtual admissions), and none waited
        /// while a slot was free (a nanosecond earlier its slot was not free).
        #[test]
        fn never_more_than_n_in_any_window_and_never_a_needless_wait(
            n in 1u32..200,
            span_ms in 1u64..60_000,
            gaps in proptest::collection::vec(0u64..3_000_000_000, 1..600),
            dense in proptest::bool::ANY,
            spent in proptest::bool::ANY,
        ) {
            let span = Duration::from_millis(span_ms);
            let span_ns = span.as_nanos() as u64;
            let scale = if dense { span_ms * MS / 200 + 1 } else { span_ms * MS / 5 + 1 };
            let start = span_ns + 1;
            let mut ring = if spent { Ring::spent(n, start) } else { Ring::new(n) };
            // A spent start stands for N admissions spread over the span before it.
            let mut admitted: Vec<u64> = if spent {
                (1..=u64::from(n)).map(|k| start - span_ns + span_ns * k / u64::from(n)).collect()
            } else {
                Vec::new()
            };
            let mut at = start;
            let mut last = start;
            for g in gaps {
                at += g % scale;
                // FIFO: never before the previous admission.
                let now = at.max(last);
                let wait = ring.wait(now, span);
                let go = now + wait.as_nanos() as u64;
                prop_assert!(ring.wait(go, span).is_zero());
                if go > now {
                    prop_assert!(!ring.wait(go - 1, span).is_zero(), "waited while a slot was free");
                }
                ring.push(go);
                admitted.push(go);
                last = go;
            }
            prop_assert!(max_in_window(&admitted, span_ns) <= n as usize);
        }
    }
}
