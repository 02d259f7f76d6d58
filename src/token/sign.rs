//! App ID authentication signature (meeting-api.md §2.1): string to sign, HMAC-SHA256, header.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The fields that go into an appauth signature. `corp_id: Some(_)` selects the 5-field
/// (SP / multi-tenant) form, even when the corp id is empty (the SP admin).
#[derive(Clone, Copy)]
pub struct SignInput<'a> {
    pub app_id: &'a str,
    pub corp_id: Option<&'a str>,
    pub user_id: &'a str,
    pub expire_time: u64,
    pub nonce: &'a str,
}

/// The `:`-joined string to sign; empty fields keep their colon.
pub fn string_to_sign(input: &SignInput<'_>) -> String {
    match input.corp_id {
        Some(corp) => format!(
            "{}:{}:{}:{}:{}",
            input.app_id, corp, input.user_id, input.expire_time, input.nonce
        ),
        None => format!(
            "{}:{}:{}:{}",
            input.app_id, input.user_id, input.expire_time, input.nonce
        ),
    }
}

/// HMAC-SHA256 of the string to sign, keyed with the UTF-8 app key: 32 raw bytes.
pub fn signature_bytes(input: &SignInput<'_>, app_key: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(app_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(string_to_sign(input).as_bytes());
    mac.finalize().into_bytes().into()
}

/// Lowercase hex signature, as in the documentation's example.
pub fn signature_hex(input: &SignInput<'_>, app_key: &[u8]) -> String {
    hex::encode(signature_bytes(input, app_key))
}

/// `base64(appId)`, standard alphabet with padding.
pub fn access_value(app_id: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(app_id.as_bytes())
}

/// The full `Authorization` header value. Hex is uppercase, as the official SDK sends it.
pub fn authorization_header(input: &SignInput<'_>, app_key: &[u8]) -> String {
    format!(
        "HMAC-SHA256 signature={},access={}",
        hex::encode_upper(signature_bytes(input, app_key)),
        access_value(input.app_id)
    )
}

/// A parsed `Authorization: HMAC-SHA256 signature=<hex>,access=<b64>` header.
#[derive(PartialEq, Eq)]
pub struct ParsedAuthorization {
    pub signature: [u8; 32],
    pub access: Option<String>,
}

impl std::fmt::Debug for ParsedAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedAuthorization")
            .field("signature", &"[redacted]")
            .field("access", &self.access)
            .finish()
    }
}

/// Parses an appauth `Authorization` header: either hex case, optional space after the comma,
/// `access=` optional (terraform omits it). Returns `None` when it is not of that form.
pub fn parse_authorization(value: &str) -> Option<ParsedAuthorization> {
    let rest = value.trim().strip_prefix("HMAC-SHA256")?.trim_start();
    let mut signature = None;
    let mut access = None;
    for part in rest.split(',') {
        let (name, val) = part.trim().split_once('=')?;
        match name.trim() {
            "signature" => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(val.trim(), &mut out).ok()?;
                signature = Some(out);
            }
            // base64 ends in '=', so split_once keeps the padding in `val`.
            "access" => access = Some(val.trim().to_owned()),
            _ => return None,
        }
    }
    Some(ParsedAuthorization {
        signature: signature?,
        access,
    })
}

/// Constant-time check of a presented signature against the expected one.
pub fn verify(input: &SignInput<'_>, app_key: &[u8], presented: &[u8; 32]) -> bool {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(app_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(string_to_sign(input).as_bytes());
    mac.verify_slice(presented).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "fdb8e4699586458bbd10c834872dcc62";
    const KEY: &[u8] = b"example-app-key-0123456789";
    const NONCE: &str = "EycLQsHwxhzK9OW8UEKWNfH2I3CGR2nINuU1EBpv162d42d92s";
    const EXP: u64 = 1627722929;

    fn input<'a>(corp: Option<&'a str>, user: &'a str) -> SignInput<'a> {
        SignInput {
            app_id: APP,
            corp_id: corp,
            user_id: user,
            expire_time: EXP,
            nonce: NONCE,
        }
    }

    #[test]
    fn worked_examples_from_the_docs() {
        let cases = [
            (
                None,
                "testuser@mycorp.com",
                "fdb8e4699586458bbd10c834872dcc62:testuser@mycorp.com:1627722929:EycLQsHwxhzK9OW8UEKWNfH2I3CGR2nINuU1EBpv162d42d92s",
                "c73be1e9b997e6f70e4d62abdfaf83e4ae6086d6ec9a0bc73128db6d56735735",
            ),
            (
                None,
                "",
                "fdb8e4699586458bbd10c834872dcc62::1627722929:EycLQsHwxhzK9OW8UEKWNfH2I3CGR2nINuU1EBpv162d42d92s",
                "78c80e3a5cac6b8dcb9c4341fb89b0aa92bf52a7550167afdec846315c9aeb1a",
            ),
            (
                Some("807074304"),
                "alice@ent01",
                "fdb8e4699586458bbd10c834872dcc62:807074304:alice@ent01:1627722929:EycLQsHwxhzK9OW8UEKWNfH2I3CGR2nINuU1EBpv162d42d92s",
                "2814a05bb424b32d669e9d50c7d9b3cfb9a0e30d83e6ecb3e3a5afc6f8381797",
            ),
            (
                Some(""),
                "",
                "fdb8e4699586458bbd10c834872dcc62:::1627722929:EycLQsHwxhzK9OW8UEKWNfH2I3CGR2nINuU1EBpv162d42d92s",
                "69122e70720ecb118709eec1ac68d3e68bc559c28a13740a71830e8e4c4d3ad7",
            ),
        ];
        for (corp, user, sts, sig) in cases {
            let i = input(corp, user);
            assert_eq!(string_to_sign(&i), sts);
            assert_eq!(signature_hex(&i, KEY), sig);
        }
    }

    #[test]
    fn header_matches_the_docs() {
        let i = input(None, "testuser@mycorp.com");
        assert_eq!(
            access_value(APP),
            "ZmRiOGU0Njk5NTg2NDU4YmJkMTBjODM0ODcyZGNjNjI="
        );
        assert_eq!(
            authorization_header(&i, KEY),
            "HMAC-SHA256 signature=C73BE1E9B997E6F70E4D62ABDFAF83E4AE6086D6EC9A0BC73128DB6D56735735,access=ZmRiOGU0Njk5NTg2NDU4YmJkMTBjODM0ODcyZGNjNjI="
        );
    }

    #[test]
    fn parse_accepts_both_cases_and_verifies() {
        let i = input(None, "testuser@mycorp.com");
        let upper = authorization_header(&i, KEY);
        let lower = format!(
            "HMAC-SHA256 signature={}, access={}",
            signature_hex(&i, KEY),
            access_value(APP)
        );
        for h in [upper, lower] {
            let p = parse_authorization(&h).expect("parses");
            assert_eq!(p.access.as_deref(), Some(access_value(APP).as_str()));
            assert!(verify(&i, KEY, &p.signature));
            assert!(!verify(&i, b"wrong-key", &p.signature));
        }
        let no_access = format!("HMAC-SHA256 signature={}", signature_hex(&i, KEY));
        assert_eq!(
            parse_authorization(&no_access).map(|p| p.access),
            Some(None)
        );
        assert!(parse_authorization("Basic abc").is_none());
        assert!(parse_authorization("HMAC-SHA256 signature=zz").is_none());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn signatures_verify_and_any_change_breaks_them(
            app in "[a-f0-9]{32}",
            corp in proptest::option::of("[0-9]{0,12}"),
            user in "[a-zA-Z0-9@._-]{0,30}",
            expire in 0u64..5_000_000_000,
            nonce in "[A-Za-z0-9-]{32,64}",
            key in "[ -~]{1,64}",
            flip in 0usize..32,
            upper in proptest::bool::ANY,
        ) {
            let input = SignInput { app_id: &app, corp_id: corp.as_deref(), user_id: &user, expire_time: expire, nonce: &nonce };
            let header = if upper {
                authorization_header(&input, key.as_bytes())
            } else {
                format!("HMAC-SHA256 signature={},access={}", signature_hex(&input, key.as_bytes()), access_value(&app))
            };
            let parsed = parse_authorization(&header).expect("parses");
            prop_assert!(verify(&input, key.as_bytes(), &parsed.signature));
            let mut bad = parsed.signature;
            bad[flip] ^= 1;
            prop_assert!(!verify(&input, key.as_bytes(), &bad));
            let other = SignInput { expire_time: expire + 1, ..input };
            prop_assert!(!verify(&other, key.as_bytes(), &parsed.signature));
        }

        #[test]
        fn authorization_parser_never_panics(s in ".{0,200}") {
            let _ = parse_authorization(&s);
        }
    }
}
