//! What the upstream answers: sign-in responses, error bodies, control-token responses.
//! Invariants: never a panic; a sign-in answer grants only a non-empty token with a positive
//! lifetime and only on a 2xx; an error code is read only from an `error_code` string in the
//! body; a
//! control-token answer grants only a non-empty token with a positive lifetime.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meetgate::control::token_answer;
use meetgate::error::upstream_error_code;
use meetgate::token::sign_in_answer;
use secrecy::ExposeSecret;

fuzz_target!(|data: &[u8]| {
    let Some((&s, body)) = data.split_first() else {
        return;
    };
    let status = http::StatusCode::from_u16(200 + u16::from(s) % 400).expect("status");
    let now_s = 1_800_000_000;
    match sign_in_answer(status, body, now_s) {
        Ok(grant) => {
            assert!(status.is_success());
            assert!(!grant.access_token.expose_secret().is_empty());
            assert!(!grant.lifetime.is_zero());
        }
        Err(_) => {}
    }
    // Read leniently (other fields may be anything), but only from an `error_code` string
    // the body holds as it is.
    if let Some(code) = upstream_error_code(body) {
        let quoted = format!("\"{code}\"");
        assert!(
            body.windows(quoted.len()).any(|w| w == quoted.as_bytes()),
            "{code:?} is not in the body"
        );
        assert!(body.windows(12).any(|w| w == b"\"error_code\""));
    }
    if let Some(granted) = token_answer(body, now_s * 1000) {
        assert!(!granted.token.expose_secret().is_empty());
        assert!(!granted.lifetime.is_zero());
    }
});
