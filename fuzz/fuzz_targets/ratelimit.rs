//! The upstream's `X-APIG-Ratelimit-*` header values. Invariants: never a panic; what parses
//! has a remain or a limit; and a parsed report written back in the upstream's own form parses
//! to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meetgate::quota::parse_ratelimit;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Some(r) = parse_ratelimit(&text) else {
        return;
    };
    assert!(r.remain.is_some() || r.limit.is_some());
    let mut again = Vec::new();
    if let Some(remain) = r.remain {
        again.push(format!("remain:{remain}"));
    }
    if let Some(limit) = r.limit {
        again.push(format!("limit:{limit}"));
    }
    if let Some(w) = r.window {
        again.push(format!("time:{} ms", w.as_millis()));
    }
    let back = parse_ratelimit(&again.join(",")).expect("its own form parses");
    assert_eq!((back.remain, back.limit), (r.remain, r.limit));
    if let Some(w) = r.window {
        // Written in milliseconds: the same window to the millisecond.
        assert_eq!(back.window.map(|b| b.as_millis()), Some(w.as_millis()));
    }
});
