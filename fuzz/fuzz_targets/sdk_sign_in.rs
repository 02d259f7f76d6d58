//! SDK sign-in answered by meetgate (`/v2/usg/acs/auth/appauth`, `/v1/usg/acs/auth/account`,
//! token refresh, validation, logout): headers, body and signature checks. Half the inputs are
//! raw bytes; half are requests signed with the client's real key from fuzzed fields, so the
//! success path is explored too. Invariants: never a panic; an appauth is answered 200 only
//! when its signature is the HMAC of its own fields under the client's key, its nonce 32 to 64
//! characters and its signature not expired; an answer never holds the client's key.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::LazyLock;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use meetgate::access::AccessRules;
use meetgate::sdk::{SdkAuth, SdkRequest};
use meetgate::token::sign::{
    authorization_header, parse_authorization, signature_bytes, SignInput,
};

const APP_ID: &str = "gw-fuzz-client-app-000000000001";
const KEY: &str = "fuzz-client-key-0f9e8d7c6b";
const NOW_MS: u64 = 1_800_000_000_000;
const OPERATIONS: [&str; 5] = [
    "create_app_id_token",
    "create_token",
    "update_token",
    "check_token",
    "delete_token",
];

struct World {
    config: meetgate::Config,
    rules: AccessRules,
    sdk: SdkAuth,
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let text = format!(
        "[[apps]]\napp_id = \"upstream\"\napp_key = \"upstream-key\"\n\
         [[clients]]\nname = \"sdk\"\napp_id = \"{APP_ID}\"\napp_key = \"{KEY}\"\nusers = [\"alice*\"]\n"
    );
    let config = meetgate::config::load_str(&text, &HashMap::new()).expect("config");
    World {
        rules: AccessRules::new(&config.clients),
        sdk: SdkAuth::new(&config.sdk),
        config,
    }
});

fn field(parts: &mut std::slice::Split<'_, u8, impl FnMut(&u8) -> bool>) -> String {
    parts
        .next()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let [op, mode, rest @ ..] = data else {
        return;
    };
    let world = &*WORLD;
    let operation = OPERATIONS[usize::from(*op) % OPERATIONS.len()];
    let mut headers = HeaderMap::new();
    let body: Vec<u8>;
    let mut parts = rest.split(|b| *b == 0);
    if mode % 2 == 0 {
        // Raw: Authorization, X-Access-Token, then the body.
        for name in ["authorization", "x-access-token"] {
            if let Ok(v) = HeaderValue::from_str(&field(&mut parts)) {
                headers.insert(name, v);
            }
        }
        body = parts.next().unwrap_or_default().to_vec();
    } else {
        // Signed with the real key from fuzzed fields.
        let user = field(&mut parts);
        let nonce = field(&mut parts);
        let expire = field(&mut parts)
            .parse::<u64>()
            .unwrap_or(NOW_MS / 1000 + 600);
        let input = SignInput {
            app_id: APP_ID,
            corp_id: None,
            user_id: &user,
            expire_time: expire,
            nonce: &nonce,
        };
        if let Ok(v) = HeaderValue::from_str(&authorization_header(&input, KEY.as_bytes())) {
            headers.insert("authorization", v);
        }
        body = serde_json::to_vec(&serde_json::json!({
            "appId": APP_ID, "userId": user, "expireTime": expire, "nonce": nonce, "clientType": 72,
        }))
        .expect("json");
    }
    let req = SdkRequest {
        operation,
        headers: &headers,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        now_ms: NOW_MS,
    };
    let result = world
        .sdk
        .answer(req, &body, &world.rules, &world.config.sdk, |_| {
            Some(String::new())
        });
    let Ok(resp) = result else {
        return;
    };
    let status = resp.status();
    let bytes = RUNTIME
        .block_on(http_body_util::BodyExt::collect(resp.into_body()))
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&bytes).contains(KEY),
        "an answer holds the client's key"
    );
    if operation == "create_app_id_token" && status == 200 {
        let b: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
        let nonce = b["nonce"].as_str().expect("nonce");
        let expire = b["expireTime"].as_u64().expect("expireTime");
        assert!((32..=64).contains(&nonce.chars().count()), "nonce length");
        assert!(
            expire == 0 || expire >= NOW_MS / 1000,
            "expired signature accepted"
        );
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_authorization)
            .expect("a parsed Authorization");
        let input = SignInput {
            app_id: b["appId"].as_str().expect("appId"),
            corp_id: b["corpId"].as_str(),
            user_id: b["userId"].as_str().unwrap_or(""),
            expire_time: expire,
            nonce,
        };
        assert_eq!(
            auth.signature,
            signature_bytes(&input, KEY.as_bytes()),
            "a signature that is not the HMAC of its fields was accepted"
        );
    }
});
