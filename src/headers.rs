//! Header names the gateway reads or writes, the hop-by-hop list, and request/response rewriting.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_ACCESS_TOKEN: HeaderName = HeaderName::from_static("x-access-token");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_APIG_LATENCY: HeaderName = HeaderName::from_static("x-apig-latency");
pub const X_APIG_UPSTREAM_LATENCY: HeaderName = HeaderName::from_static("x-apig-upstream-latency");
pub const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
pub const X_APIG_RATELIMIT_API: HeaderName = HeaderName::from_static("x-apig-ratelimit-api");
pub const X_APIG_RATELIMIT_ALLENV: HeaderName =
    HeaderName::from_static("x-apig-ratelimit-api-allenv");
pub const X_MEETGATE_APP: HeaderName = HeaderName::from_static("x-meetgate-app");
pub const X_MEETGATE_USER: HeaderName = HeaderName::from_static("x-meetgate-user");
/// A meeting's control token (design §3b).
pub const X_CONFERENCE_AUTHORIZATION: HeaderName =
    HeaderName::from_static("x-conference-authorization");
/// A meeting's host password, sent to obtain its control token.
pub const X_PASSWORD: HeaderName = HeaderName::from_static("x-password");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// How many [`CLIENT_CREDENTIALS`] there are.
const CREDENTIALS: usize = 5;
/// Credentials a client may send that must never reach the upstream: the gateway's token
/// replaces them, and the meetgate selection headers are for the gateway alone.
const CLIENT_CREDENTIALS: [HeaderName; CREDENTIALS] = [
    X_ACCESS_TOKEN,
    header::AUTHORIZATION,
    header::COOKIE,
    X_MEETGATE_APP,
    X_MEETGATE_USER,
];

/// Removes hop-by-hop headers, including any named by `Connection` (RFC 9110 §7.6.1).
/// `Transfer-Encoding` is removed too: the body is re-framed by our own client or server.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the few names present finds that out
    // more cheaply than a hashed removal per listed name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Only allocate when a Connection header names extra headers, which is rare.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name)
}

/// Prepares a client's headers for the upstream: hop-by-hop and client credentials removed,
/// `Host` dropped (the client sets it from the upstream URL).
pub fn sanitize_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    // One pass finds which are present, and only those are removed: removing an absent name
    // still hashes it, and every HTTP/1.1 request carries `Host`, so checking "any present"
    // first saved nothing.
    let mut present = [false; CREDENTIALS];
    let mut host = false;
    for name in headers.keys() {
        if let Some(i) = CLIENT_CREDENTIALS.iter().position(|c| c == name) {
            present[i] = true;
        } else if *name == header::HOST {
            host = true;
        }
    }
    for (name, _) in CLIENT_CREDENTIALS.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if host {
        headers.remove(header::HOST);
    }
}

/// The longest `Retry-After` believed: an hour. A larger one (or one near `u64::MAX`, which
/// the fuzzer sent and which overflowed the hold's instant) is taken as an hour.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// The upstream's `Retry-After` in whole seconds, when it gives one, at most an hour.
pub fn retry_after(headers: &HeaderMap) -> Option<std::time::Duration> {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| std::time::Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// The request id as sent upstream: the same value, never HPACK-indexed. An id is unique per
/// request, so indexing it would only evict useful entries from both sides' tables, and the
/// h2 encoder would compare it with every earlier id still in its table (3,300 instructions
/// per request, callgrind). The sensitive flag is how the h2 crate is told not to index.
pub fn forwarded_request_id(id: &HeaderValue) -> HeaderValue {
    let mut value = id.clone();
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `upstream_headers` fuzz target: a Retry-After of 13106511852580896813 s
    /// overflowed the instant a hold ends at.
    #[test]
    fn retry_after_is_capped_at_an_hour() {
        let mut h = HeaderMap::new();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("013106511852580896813"),
        );
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static(" 3 "));
        assert_eq!(retry_after(&h), Some(std::time::Duration::from_secs(3)));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn forwarded_request_id_is_the_same_value_never_indexed() {
        let id = HeaderValue::from_static("6d5ccc484cf44d2182e6dce080a1cb56");
        let forwarded = forwarded_request_id(&id);
        assert_eq!(forwarded, id);
        assert!(forwarded.is_sensitive());
        assert!(!id.is_sensitive(), "the access log's copy is unchanged");
    }

    #[test]
    fn request_sanitising() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-custom-hop"),
        );
        h.insert("x-custom-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(X_ACCESS_TOKEN, HeaderValue::from_static("client-token"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        h.insert(X_MEETGATE_USER, HeaderValue::from_static("alice"));
        h.insert("x-conference-authorization", HeaderValue::from_static("ct"));
        h.insert("x-password", HeaderValue::from_static("pw"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("rid"));
        sanitize_request(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["x-conference-authorization", "x-password", "x-request-id"]
        );

        // No Host (an HTTP/2 request), a credential sent twice: every value goes.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        sanitize_request(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
        assert_eq!(h.len(), 1);
    }
}
