//! The Redis replies shared mode parses: the quota scripts' replies (as the redis crate decodes
//! RESP) and the shared token records. Invariants: never a panic; a refusal always waits at
//! least a microsecond (a zero wait would spin); an admission never leases more than it asked
//! for; a token record that parses keeps its fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meetgate::cluster::{gcra_verdict, ExactVerdict, SharedToken};
use redis::FromRedisValue;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = redis::parse_redis_value(data) {
        if let Ok((ok, wait, now, granted)) =
            <(i64, i64, i64, i64)>::from_redis_value(value.clone())
        {
            // The slots asked for: derived from the reply, so every value is reached.
            let want = (now as u32) % 66;
            match ExactVerdict::from_reply(ok, wait, now, granted, want) {
                ExactVerdict::Admitted { leased, .. } => {
                    assert_eq!(ok, 1);
                    assert!(leased < want.max(1), "never more than asked for");
                }
                ExactVerdict::Wait(w) => {
                    assert_ne!(ok, 1);
                    assert!(w.as_micros() >= 1);
                }
            }
        }
        if let Ok((ok, wait)) = <(i64, i64)>::from_redis_value(value.clone()) {
            if let Some(w) = gcra_verdict(ok, wait) {
                assert!(w.as_micros() >= 1);
            }
        }
        if let Ok(Some(text)) = <Option<String>>::from_redis_value(value) {
            if let Ok(t) = serde_json::from_str::<SharedToken>(&text) {
                let again = serde_json::to_string(&t).expect("serialises");
                let back: SharedToken = serde_json::from_str(&again).expect("round trip");
                assert_eq!(back.expires_at_ms, t.expires_at_ms);
                assert_eq!(back.refresh_at_ms, t.refresh_at_ms);
                assert_eq!(back.token, t.token);
            }
        }
    }
});
