//! The upstream's quota headers as they reach a bucket: `X-APIG-Ratelimit-Api` /
//! `-Allenv` applied to an admitted request's bucket, and `Retry-After` holding it after a
//! 429. Invariants: never a panic (whatever windows, limits or waits the upstream claims), and
//! the bucket still answers afterwards.
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use meetgate::operations::OperationTable;
use meetgate::quota::{BucketKey, Class, QuotaAlgorithm, QuotaConfig, QuotaManager};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    let [alg, rest @ ..] = data else { return };
    let mut parts = rest.split(|b| *b == b'\n');
    let mut headers = HeaderMap::new();
    for name in [
        "x-apig-ratelimit-api",
        "x-apig-ratelimit-api-allenv",
        "retry-after",
    ] {
        if let Some(v) = parts.next().and_then(|p| HeaderValue::from_bytes(p).ok()) {
            headers.insert(name, v);
        }
    }
    let algorithm = if alg % 2 == 0 {
        QuotaAlgorithm::Exact
    } else {
        QuotaAlgorithm::Gcra
    };
    RUNTIME.block_on(async {
        let mgr = QuotaManager::new(QuotaConfig::uniform(
            algorithm,
            100,
            Duration::from_secs(60),
            200,
            Duration::from_secs(1),
            Some(10),
        ));
        let key = BucketKey {
            op: OperationTable::global()
                .by_name("start_meeting")
                .expect("op"),
            app: None,
            user: None,
        };
        let deadline = Instant::now() + Duration::from_millis(50);
        let Ok(admission) = mgr.acquire(&key, deadline, &Class::anonymous()).await else {
            return;
        };
        let bucket = admission.bucket().clone();
        mgr.observe(admission, &headers);
        let _ = mgr.hold(&bucket, meetgate::headers::retry_after(&headers));
        // Still answers, at once: admitted or refused with a wait, never stuck.
        let _ = mgr.acquire(&key, Instant::now(), &Class::anonymous()).await;
        let _ = bucket.remaining();
    });
});
