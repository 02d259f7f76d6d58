//! Soak: hundreds of concurrent clients while the upstream expires tokens every few seconds and
//! injects 5xx, resets and 429s. Every request ends with exactly one outcome, every success was
//! processed upstream exactly once, nothing hangs, and the gateway's state drains back.
//! `SOAK_SECONDS` (default 6) makes it longer when run by hand, up to `MAX_PER_CLIENT` requests
//! per client (an optimised build reaches that in a few seconds).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use meetgate::simulator::{Fault, SimConfig, SimLimits, REQUEST_IDS_KEPT};

use crate::support::*;

const CLIENTS: usize = 200;
/// Requests per client at most: the simulator counts processing for its last
/// `REQUEST_IDS_KEPT` request ids, and every id of the run must still be there when checked
/// (an optimised build reaches that many within the default six seconds).
const MAX_PER_CLIENT: usize = REQUEST_IDS_KEPT / CLIENTS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_faults_loses_nothing() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let sim = Arc::new(
        start_sim(SimConfig {
            apps: vec![sim_app()],
            limits: SimLimits::unlimited(),
            token_lifetime: Duration::from_secs(3),
            ..SimConfig::default()
        })
        .await,
    );
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                quota: format!("{NO_BINDING_QUOTA}max_wait = \"10s\"\n"),
                ..Default::default()
            },
        )
        .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (sim, stop) = (sim.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                match round % 4 {
                    0 => sim.inject(Fault::BusinessStatus {
                        status: 500,
                        count: 3,
                    }),
                    1 => sim.inject(Fault::ResetBeforeResponse { count: 2 }),
                    2 => sim.inject(Fault::Throttle {
                        count: 3,
                        retry_after: None,
                    }),
                    _ => sim.revoke_all_tokens(),
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let outcomes = concurrently(CLIENTS, |c| {
        let gw = gw.clone();
        async move {
            let mut out = Vec::new();
            let mut i = 0;
            while tokio::time::Instant::now() < deadline && i < MAX_PER_CLIENT {
                let rid = format!("soak-{c}-{i}");
                i += 1;
                let headers = [("x-request-id", rid.as_str())];
                let req = gw.request(
                    http::Method::POST,
                    START,
                    &headers,
                    br#"{"conferenceID":"914087436","password":"123456"}"#,
                );
                // No request may hang: each gets a generous per-request deadline.
                match tokio::time::timeout(Duration::from_secs(30), req).await {
                    Ok(r) => {
                        let code = if r.status == StatusCode::OK {
                            String::new()
                        } else {
                            r.error_code()
                        };
                        out.push((rid, Some(r.status), code));
                    }
                    Err(_) => out.push((rid, None, String::new())),
                }
            }
            out
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = chaos.await;

    let outcomes: Vec<_> = outcomes.into_iter().flatten().collect();
    assert!(outcomes.len() >= CLIENTS, "every client made requests");
    let hung: Vec<_> = outcomes.iter().filter(|o| o.1.is_none()).collect();
    assert!(hung.is_empty(), "{} requests hung", hung.len());
    let counts = sim.counts_by_request_id();
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for (rid, status, code) in &outcomes {
        let status = status.unwrap_or(StatusCode::REQUEST_TIMEOUT);
        *by_status.entry(status.as_u16()).or_default() += 1;
        let processed = counts.get(rid).copied().unwrap_or(0);
        match status {
            StatusCode::OK => {
                assert_eq!(processed, 1, "{rid}: a success is processed exactly once")
            }
            // The injected upstream 5xx passes through; a reset after sending is a 502; an
            // upstream 429 still there after three replays reaches the client.
            StatusCode::INTERNAL_SERVER_ERROR => assert_eq!(code, "SIM.FAULT"),
            StatusCode::BAD_GATEWAY => assert_eq!(code, "MEETGATE.UPSTREAM_UNREACHABLE"),
            StatusCode::TOO_MANY_REQUESTS => assert_eq!(code, "APIG.0308"),
            other => panic!("{rid}: unexpected {other} {code}"),
        }
        assert!(processed <= 1, "{rid} processed {processed} times");
    }
    let ok = by_status.get(&200).copied().unwrap_or(0);
    assert!(
        ok * 2 > outcomes.len(),
        "most requests succeed: {by_status:?}"
    );

    // Drained: nothing in flight, nobody waiting, only the default identity's token held.
    let gateway = gw.gateway.clone();
    eventually(Duration::from_secs(10), "state drained", || {
        let gateway = gateway.clone();
        async move {
            gateway.update_gauges();
            gateway.metrics().in_flight.get() == 0 && gateway.quota().waiting() == 0
        }
    })
    .await;
    assert_eq!(gw.gateway.tokens().len(), 1);
    eprintln!(
        "soak: {} requests over {seconds}s: {by_status:?}",
        outcomes.len()
    );
}
