//! Unit tests of the quota layer: the window bound, rollback, upstream counters, budgets.

use super::bucket::*;
use super::report::*;
use super::*;
use crate::headers::X_APIG_RATELIMIT_API;
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use proptest::prelude::*;
use std::num::NonZeroU32;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// A manager whose limits are N per W (per API) and N per W (all environments), burst b,
/// and its bucket for the first operation.
pub(super) fn one_bucket(
    algorithm: QuotaAlgorithm,
    per_api: u32,
    per_api_s: u64,
    all_env: u32,
    all_env_s: u64,
    burst: Option<u32>,
) -> (Arc<QuotaManager>, Arc<Bucket>) {
    let cfg = QuotaConfig::uniform(
        algorithm,
        per_api,
        Duration::from_secs(per_api_s),
        all_env,
        Duration::from_secs(all_env_s),
        burst,
    );
    let mgr = QuotaManager::new(cfg);
    let bucket = mgr.bucket(&BucketKey {
        op: OperationId::from_index(0),
        app: None,
        user: None,
    });
    (mgr, bucket)
}

#[test]
fn derive_refuses_burst_at_or_above_the_limit() {
    assert!(derive(nz(10), Duration::from_secs(1), Duration::ZERO, nz(10)).is_err());
    assert!(derive(nz(10), Duration::from_secs(1), Duration::ZERO, nz(9)).is_ok());
}

#[test]
fn default_limits_admit_at_most_n_per_window() {
    let p = derive(
        nz(100),
        Duration::from_secs(60),
        Duration::from_millis(100),
        nz(10),
    )
    .expect("ok");
    // 91 intervals must not fit into 60.1 s.
    assert!(p.interval * 91 > Duration::from_millis(60_100));
    assert_eq!(p.burst.get(), 10);
}

/// Feeds arrival offsets (ns) through a governor limiter with the derived parameters on a
/// fake clock; returns the admitted instants.
fn admitted(params: GcraParams, arrivals: &[u64]) -> Vec<u64> {
    let clock = FakeRelativeClock::default();
    let quota = Quota::with_period(params.interval)
        .expect("period")
        .allow_burst(params.burst);
    let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
    let mut now = 0;
    let mut out = Vec::new();
    for &t in arrivals {
        clock.advance(Duration::from_nanos(t - now));
        now = t;
        if limiter.check().is_ok() {
            out.push(t);
        }
    }
    out
}

fn max_in_window(times: &[u64], window: u64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        // Closed window [t, t + window]: the strictest reading.
        while times[hi] - times[lo] > window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn no_window_exceeds_the_limit(
        n in 2u32..300,
        window_ms in 10u64..120_000,
        margin_ms in 0u64..500,
        burst_frac in 0.0f64..1.0,
        gaps in proptest::collection::vec(0u64..2_000_000_000, 1..600),
        dense in proptest::bool::ANY,
    ) {
        let burst = 1 + ((n - 1) as f64 * burst_frac) as u32;
        prop_assume!(burst < n);
        let window = Duration::from_millis(window_ms);
        let margin = Duration::from_millis(margin_ms);
        let params = derive(nz(n), window, margin, nz(burst)).expect("derivable");
        // Dense arrivals hammer the limiter; sparse ones let the burst refill.
        let scale = if dense { window_ms.max(1) * 1_000 / 50 } else { window_ms * 1_000_000 / 20 };
        let mut t = 0u64;
        let arrivals: Vec<u64> = gaps.iter().map(|g| { t += g % scale.max(1); t }).collect();
        let got = admitted(params, &arrivals);
        let span = (window + margin).as_nanos() as u64;
        prop_assert!(max_in_window(&got, span) <= n as usize,
            "n={n} w={window_ms}ms d={margin_ms}ms b={burst}: {} in a window", max_in_window(&got, span));
    }

    #[test]
    fn ratelimit_parser_never_panics(s in ".{0,80}") {
        let _ = parse_ratelimit(&s);
    }
}

#[test]
fn ratelimit_headers_parse_tolerantly() {
    let r = parse_ratelimit("remain:99,limit:100,time:1 minute").expect("parses");
    assert_eq!(r.remain, Some(99));
    assert_eq!(r.limit, Some(100));
    assert_eq!(r.window, Some(Duration::from_secs(60)));
    let r = parse_ratelimit(" Remain : 5 , LIMIT:200 , Time: 1 Second ").expect("parses");
    assert_eq!(
        (r.remain, r.limit, r.window),
        (Some(5), Some(200), Some(Duration::from_secs(1)))
    );
    let r = parse_ratelimit("remain:abc,limit:20,time:2 seconds").expect("parses");
    assert_eq!(
        (r.remain, r.limit, r.window),
        (None, Some(20), Some(Duration::from_secs(2)))
    );
    assert_eq!(
        parse_ratelimit("remain:3,time:500 ms").and_then(|r| r.window),
        Some(Duration::from_millis(500))
    );
    assert!(parse_ratelimit("garbage").is_none());
    assert!(parse_ratelimit("").is_none());
}

#[test]
fn rollback_keeps_the_earlier_limiters_slot() {
    // Per minute: 3 with burst 2 (then one per ~30 s); per second: 100 with burst 2.
    let (_mgr, bucket) = one_bucket(QuotaAlgorithm::Gcra, 3, 60, 100, 1, Some(2));
    assert!(bucket.try_admit(Instant::now()).is_ok());
    assert!(bucket.try_admit(Instant::now()).is_ok());
    let cells = || -> Vec<u64> {
        let s = bucket.state.lock().expect("lock");
        s.limits
            .iter()
            .map(|l| match &l.engine {
                super::limiter::Engine::Gcra(g) => g.state(),
                super::limiter::Engine::Exact { .. } => 0,
            })
            .collect()
    };
    // Poll until the per-second limiter has refilled and admits, so that the refusal comes
    // from the per-minute one, which is checked second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = cells();
        match bucket.try_admit(Instant::now()) {
            Ok(()) => panic!("the per-minute limit admitted a third request"),
            Err(wait) if wait > Duration::from_secs(20) => {
                assert_eq!(before, cells(), "the per-second slot was given back");
                break;
            }
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "per-second limiter never refilled"
                );
                std::thread::yield_now();
            }
        }
    }
}

/// A per-API report on `bucket`, as a response's headers bring it.
fn apply_per_api(mgr: &QuotaManager, bucket: &Bucket, report: RateLimitReport) {
    let mut state = bucket.state.lock().expect("lock");
    mgr.apply_report(
        bucket,
        &mut state,
        LimitKind::PerApi,
        report,
        Instant::now(),
    );
}

#[tokio::test]
async fn a_request_is_in_flight_until_its_report_is_read_or_it_is_dropped() {
    let (mgr, bucket) = one_bucket(QuotaAlgorithm::Gcra, 50, 60, 100, 1, Some(10));
    let key = BucketKey {
        op: OperationId::from_index(0),
        app: None,
        user: None,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut admitted = Vec::new();
    for _ in 0..3 {
        admitted.push(
            mgr.acquire(&key, deadline, &Class::anonymous())
                .await
                .expect("admitted"),
        );
    }
    let in_flight = || bucket.state.lock().expect("lock").in_flight;
    assert_eq!(in_flight(), 3);
    // 3 of 50 sent, the upstream says 40 left: someone else used 7. Of ours, the two
    // still in flight may not be in its count yet, so the budget leaves room for them.
    let mut headers = HeaderMap::new();
    headers.insert(
        X_APIG_RATELIMIT_API,
        http::HeaderValue::from_static("remain:40,limit:50,time:1 minute"),
    );
    mgr.observe(admitted.remove(0), &headers);
    assert_eq!(in_flight(), 2);
    let state = bucket.state.lock().expect("lock");
    let per_api = state
        .limits
        .iter()
        .find(|l| l.spec.kind == LimitKind::PerApi);
    assert_eq!(per_api.and_then(|l| l.budget).map(|b| b.remain), Some(38));
    drop(state);
    drop(admitted.remove(0));
    assert_eq!(in_flight(), 1);
    mgr.observe(admitted.remove(0), &HeaderMap::new());
    assert_eq!(in_flight(), 0);
}

#[test]
fn a_shared_quota_limits_the_bucket_to_what_is_left() {
    let (mgr, bucket) = one_bucket(QuotaAlgorithm::Gcra, 50, 60, 100, 1, Some(10));
    let now = Instant::now();
    assert!(bucket.try_admit(now).is_ok());
    // We sent 1 of 50; the upstream says only 2 are left: someone else used 47.
    apply_per_api(
        &mgr,
        &bucket,
        RateLimitReport {
            remain: Some(2),
            limit: Some(50),
            window: Some(Duration::from_secs(60)),
        },
    );
    assert!(bucket.try_admit(now).is_ok());
    assert!(bucket.try_admit(now).is_ok());
    let wait = bucket.try_admit(now).expect_err("budget spent");
    assert!(wait > Duration::from_secs(59));
}

#[test]
fn recent_admissions_are_counted_per_slot_in_bounded_memory() {
    let window = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut recent = Recent::new(window, t0);
    // 200 000 admissions spread over one window: a few dozen entries, every one counted.
    for i in 0..200_000u64 {
        recent.push(t0 + window * u32::try_from(i).unwrap() / 200_000);
    }
    assert!(recent.slots.len() <= RECENT_SLOTS as usize + 1);
    let end = t0 + window;
    assert_eq!(recent.total(), 200_000);
    assert_eq!(recent.count_within(end, window), 200_000);
    // The last half window: half of them, give or take the one straddling slot.
    let half = recent.count_within(end, window / 2);
    let slot = 200_000 / u64::from(RECENT_SLOTS);
    assert!((100_000..=100_000 + slot + 1).contains(&half), "{half}");
    // Pruned only once wholly older than the horizon.
    recent.prune(
        end + Duration::from_secs(1),
        window + Duration::from_secs(1),
    );
    assert_eq!(recent.total(), 200_000);
    recent.prune(end + window + window / 2, window);
    assert_eq!(recent.total(), 0);
    assert!(recent.slots.is_empty());
}

#[test]
fn our_own_requests_at_the_window_edge_do_not_look_like_a_shared_quota() {
    let (mgr, bucket) = one_bucket(QuotaAlgorithm::Gcra, 50, 60, 100, 1, Some(10));
    assert!(bucket.try_admit(Instant::now()).is_ok());
    // Admitted just over a window ago here, but the upstream counted it just under one.
    {
        let mut s = bucket.state.lock().expect("lock");
        for l in &mut s.limits {
            let at = Instant::now() - l.spec.window - Duration::from_millis(50);
            l.recent = Recent::new(l.spec.window, at);
            l.recent.push(at);
        }
    }
    apply_per_api(
        &mgr,
        &bucket,
        RateLimitReport {
            remain: Some(49),
            limit: Some(50),
            window: Some(Duration::from_secs(60)),
        },
    );
    let s = bucket.state.lock().expect("lock");
    assert!(
        s.limits.iter().all(|l| l.budget.is_none()),
        "no budget imposed"
    );
}

#[test]
fn a_lower_reported_limit_replaces_ours_without_a_fresh_burst() {
    let cfg = QuotaConfig::uniform(
        QuotaAlgorithm::Gcra,
        100,
        Duration::from_secs(60),
        200,
        Duration::from_secs(1),
        Some(10),
    );
    let mgr = QuotaManager::new(cfg);
    let bucket = mgr.bucket(&BucketKey {
        op: OperationId::from_index(0),
        app: None,
        user: None,
    });
    for _ in 0..4 {
        assert!(bucket.try_admit(Instant::now()).is_ok());
    }
    // We used 4 of a burst of 10; the upstream says its limit is 5.
    apply_per_api(
        &mgr,
        &bucket,
        RateLimitReport {
            remain: Some(1),
            limit: Some(5),
            window: Some(Duration::from_secs(60)),
        },
    );
    let s = bucket.state.lock().expect("lock");
    let per_api = s
        .limits
        .iter()
        .find(|l| l.spec.kind == LimitKind::PerApi)
        .expect("limit");
    assert_eq!(per_api.spec.limit.get(), 5);
    assert!(matches!(per_api.params, LimitParams::Gcra(p) if p.burst.get() == 4));
    drop(s);
    // Our 4 already fill the new burst of 4: nothing more at once.
    assert!(bucket.try_admit(Instant::now()).is_err());
}

// === the exact limiter ===

fn exact_bucket(
    per_api: u32,
    per_api_s: u64,
    all_env: u32,
    burst: Option<u32>,
) -> (Arc<QuotaManager>, Arc<Bucket>) {
    one_bucket(QuotaAlgorithm::Exact, per_api, per_api_s, all_env, 1, burst)
}

#[test]
fn exact_admits_a_full_window_at_once_then_waits_for_the_oldest() {
    let (_mgr, bucket) = exact_bucket(5, 60, 100, None);
    let t0 = bucket.born + Duration::from_secs(1);
    for i in 0..5 {
        assert!(
            bucket.try_admit(t0 + Duration::from_millis(i)).is_ok(),
            "{i}"
        );
    }
    let wait = bucket
        .try_admit(t0 + Duration::from_secs(10))
        .expect_err("window full");
    // The first admission leaves the window (60 s + 100 ms margin) 50.1 s from then.
    assert!(
        (Duration::from_millis(50_100)..Duration::from_millis(50_101)).contains(&wait),
        "{wait:?}"
    );
    assert!(bucket.try_admit(t0 + Duration::from_millis(60_101)).is_ok());
}

#[test]
fn exact_consumes_a_slot_only_when_every_limit_admits() {
    // 2 per minute, 3 per second: the third request is refused by the per-minute limit and
    // must not have used a per-second slot.
    let (_mgr, bucket) = exact_bucket(2, 60, 3, None);
    let t0 = bucket.born + Duration::from_secs(1);
    assert!(bucket.try_admit(t0).is_ok());
    assert!(bucket.try_admit(t0).is_ok());
    for _ in 0..3 {
        assert!(bucket.try_admit(t0).is_err());
    }
    let rings: Vec<usize> = {
        let s = bucket.state.lock().expect("lock");
        s.limits
            .iter()
            .map(|l| match &l.engine {
                super::limiter::Engine::Exact { ring, .. } => ring.len(),
                super::limiter::Engine::Gcra(_) => usize::MAX,
            })
            .collect()
    };
    assert_eq!(rings, [2, 2]);
}

#[test]
fn a_burst_cap_lets_that_many_go_back_to_back_then_spreads_the_rest() {
    // 10 per second with burst 3: three at once, then one per ~110 ms.
    let (_mgr, bucket) = exact_bucket(1000, 60, 10, Some(3));
    let now = Instant::now();
    for _ in 0..3 {
        assert!(bucket.try_admit(now).is_ok());
    }
    let wait = bucket.try_admit(now).expect_err("capped");
    assert!(
        wait <= Duration::from_millis(111) && wait >= Duration::from_millis(50),
        "{wait:?}"
    );
}

#[test]
fn a_reload_that_lowers_n_keeps_the_admissions_of_the_window() {
    let (mgr, bucket) = exact_bucket(10, 60, 100, None);
    let now = Instant::now();
    for _ in 0..4 {
        assert!(bucket.try_admit(now).is_ok());
    }
    let mut lower = mgr.config().as_ref().clone();
    lower.per_api_per_minute = nz(3);
    mgr.reconfigure(lower);
    assert!(
        bucket.try_admit(Instant::now()).is_err(),
        "4 in the window already"
    );
    // Raising it again grants only what the window leaves: 10 - 4.
    let mut higher = mgr.config().as_ref().clone();
    higher.per_api_per_minute = nz(10);
    mgr.reconfigure(higher);
    let now = Instant::now();
    let admitted = (0..10).filter(|_| bucket.try_admit(now).is_ok()).count();
    assert_eq!(admitted, 7, "3 newest kept, then room for 7");
}

#[test]
fn switching_from_gcra_to_exact_keeps_the_windows_admissions() {
    let (mgr, bucket) = one_bucket(QuotaAlgorithm::Gcra, 10, 60, 100, 1, Some(5));
    let now = Instant::now();
    for _ in 0..5 {
        assert!(bucket.try_admit(now).is_ok());
    }
    let mut exact = mgr.config().as_ref().clone();
    exact.algorithm = QuotaAlgorithm::Exact;
    exact.burst = None;
    mgr.reconfigure(exact);
    let now = Instant::now();
    let admitted = (0..10).filter(|_| bucket.try_admit(now).is_ok()).count();
    assert_eq!(admitted, 5, "the 5 GCRA admitted still count");
}

#[test]
fn exact_estimates_a_queue_from_the_admission_times() {
    let (_mgr, bucket) = exact_bucket(3, 60, 100, None);
    let t0 = bucket.born + Duration::from_secs(1);
    assert_eq!(
        bucket.estimate_wait(2, t0),
        Duration::ZERO,
        "three free slots"
    );
    for i in 0..3 {
        assert!(bucket.try_admit(t0 + Duration::from_secs(i)).is_ok());
    }
    let at = t0 + Duration::from_secs(10);
    // The next goes when the first leaves (60.1 s after it), the third-next when the third does.
    let first = bucket.estimate_wait(0, at);
    let third = bucket.estimate_wait(2, at);
    assert!(first > Duration::from_millis(50_000) && first < Duration::from_millis(50_200));
    assert!(third > Duration::from_millis(52_000) && third < Duration::from_millis(52_200));
}

/// Closed windows `[t, t + span]`: the most admissions any one holds.
fn max_in_closed_window(times: &[Duration], span: Duration) -> usize {
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
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Two exact limits of one bucket, random arrivals, each request admitted as soon as the
    /// bucket says: neither limit ever has more than its N in a window plus margin, and no
    /// request waited while both had a slot.
    #[test]
    fn exact_buckets_never_exceed_either_limit_nor_wait_needlessly(
        per_api in 1u32..60,
        all_env in 1u32..30,
        gaps_ms in proptest::collection::vec(0u64..400, 1..300),
    ) {
        let (_mgr, bucket) = exact_bucket(per_api, 6, all_env, None);
        let margin = Duration::from_millis(100);
        let mut at = Duration::from_secs(1);
        let mut last = at;
        let mut admitted = Vec::new();
        for g in gaps_ms {
            at += Duration::from_millis(g);
            let mut now = at.max(last);
            let mut tries = 0;
            loop {
                match bucket.try_admit(bucket.born + now) {
                    Ok(()) => break,
                    Err(wait) => {
                        if tries == 0 && now > at.max(last) {
                            prop_assert!(false, "refused at its own slot time");
                        }
                        // A nanosecond before its slot it must still be refused.
                        let before = now + wait - Duration::from_nanos(1);
                        prop_assert!(bucket.estimate_wait(0, bucket.born + before) > Duration::ZERO);
                        now += wait;
                        tries += 1;
                        prop_assert!(tries < 3, "admitted when the wait said");
                    }
                }
            }
            admitted.push(now);
            last = now;
        }
        prop_assert!(max_in_closed_window(&admitted, Duration::from_secs(6) + margin) <= per_api as usize);
        prop_assert!(max_in_closed_window(&admitted, Duration::from_secs(1) + margin) <= all_env as usize);
    }
}

/// Found by the `ratelimit` and `upstream_headers` fuzz targets: absurd windows, limits and
/// waits from the upstream are ignored or capped, never an overflow.
#[tokio::test]
async fn absurd_upstream_reports_and_waits_are_survived() {
    assert_eq!(
        parse_ratelimit("remain:1,limit:5,time:90000000000 second").and_then(|r| r.window),
        None
    );
    assert_eq!(
        parse_ratelimit("limit:5,time:2 day").and_then(|r| r.window),
        None,
        "longer than a day"
    );
    for algorithm in [QuotaAlgorithm::Exact, QuotaAlgorithm::Gcra] {
        let (mgr, bucket) = one_bucket(algorithm, 100, 60, 200, 1, Some(10));
        let key = BucketKey {
            op: OperationId::from_index(0),
            app: None,
            user: None,
        };
        let a = mgr
            .acquire(
                &key,
                Instant::now() + Duration::from_secs(1),
                &Class::anonymous(),
            )
            .await
            .expect("admitted");
        let mut headers = HeaderMap::new();
        headers.insert(
            X_APIG_RATELIMIT_API,
            http::HeaderValue::from_static("remain:0,limit:1,time:1 day"),
        );
        mgr.observe(a, &headers);
        assert!(
            mgr.hold(&bucket, Some(Duration::from_secs(u64::MAX))) <= Duration::from_secs(3600)
        );
        assert!(
            bucket.try_admit(Instant::now()).is_err(),
            "held, not crashed"
        );
    }
}
