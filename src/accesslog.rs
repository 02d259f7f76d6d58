//! The access-log line: one per request, target `meetgate::access`, formatted here (text as
//! tracing's formatter writes it, or flat JSON) straight into the log sink.
//!
//! A request is the hot path and tracing's formatter visits every field through `fmt`; this
//! writes the same line with plain byte pushes into a reused buffer. Level filtering is still
//! tracing's (`log.level`). Without an installed sink (tests with their own subscriber) the
//! same fields go out as an ordinary tracing event.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::telemetry::{self, Sink};

/// The target of access-log lines, as filters and readers know it.
pub const TARGET: &str = "meetgate::access";

/// One finished request. Field names and order are stable (README, "Access log").
pub struct Entry<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub operation: &'a str,
    pub status: u16,
    pub client: SocketAddr,
    pub app: &'a str,
    pub user: &'a str,
    /// The meeting a control call or a start names.
    pub conference: &'a str,
    /// Whose control token a control call carried: `meetgate`, `client`, or `-`.
    pub control_token: &'a str,
    pub total: Duration,
    pub queue_wait: Duration,
    pub token_wait: Duration,
    pub upstream: Duration,
    pub request_id: &'a str,
    /// The W3C trace id (32 hex digits): the request span's, or the client's `traceparent`.
    pub trace_id: &'a str,
    /// The upstream's `X-Request-Id`, latency and rate-limit headers, as in [`UPSTREAM_FIELDS`].
    pub upstream_headers: [&'a str; 6],
    pub replayed: bool,
    pub upstream_429s: u32,
    pub error_code: &'a str,
    pub error: &'a str,
}

/// Field names of [`Entry::upstream_headers`].
pub const UPSTREAM_FIELDS: [&str; 6] = [
    "upstream_request_id",
    "apig_latency",
    "apig_upstream_latency",
    "envoy_upstream_service_time",
    "ratelimit_api",
    "ratelimit_allenv",
];

thread_local! {
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The formatted date and time of the last second seen, reused within that second.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// Writes the line, unless `log.level` leaves out INFO for the access target.
pub fn write(entry: &Entry<'_>) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    match telemetry::sink() {
        Some(sink) => LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => write_to(sink, entry, &mut line),
            // Only reachable if a logger re-entered this function; still log.
            Err(_) => write_to(sink, entry, &mut Vec::new()),
        }),
        None => {
            let mut fields = Vec::with_capacity(512);
            text_fields(entry, &mut fields);
            tracing::info!(target: TARGET, "{}", String::from_utf8_lossy(&fields));
        }
    }
}

fn write_to(sink: &Sink, entry: &Entry<'_>, line: &mut Vec<u8>) {
    line.clear();
    if sink.json() {
        json_line(entry, SystemTime::now(), line);
    } else {
        text_line(entry, SystemTime::now(), line);
    }
    sink.append(line);
    if line.capacity() > 64 * 1024 {
        *line = Vec::new();
    }
}

/// `2026-11-26T01:40:29.870253Z  INFO meetgate::access: request method=POST path="/v1/..." ...`
pub fn text_line(entry: &Entry<'_>, now: SystemTime, out: &mut Vec<u8>) {
    push_timestamp(out, now);
    out.extend_from_slice(b"  INFO ");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b": ");
    text_fields(entry, out);
    out.push(b'\n');
}

/// The part after the target, as tracing's text formatter writes these fields.
fn text_fields(e: &Entry<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"request");
    fields(e, Style::Text, out);
}

/// `{"timestamp":"...","level":"INFO","method":"POST",...,"message":"request","target":"meetgate::access"}`,
/// the shape of tracing's flattened JSON events.
pub fn json_line(e: &Entry<'_>, now: SystemTime, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    push_timestamp(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\"");
    fields(e, Style::Json, out);
    out.extend_from_slice(b",\"message\":\"request\",\"target\":\"");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

/// How a field is written: tracing's text (` key=value`, `&str` fields quoted as Debug does,
/// Display fields bare) or JSON (`,"key":value`).
#[derive(Clone, Copy)]
enum Style {
    Text,
    Json,
}

impl Style {
    fn key(self, out: &mut Vec<u8>, key: &str) {
        match self {
            Style::Text => {
                out.push(b' ');
                out.extend_from_slice(key.as_bytes());
                out.push(b'=');
            }
            Style::Json => {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
            }
        }
    }

    /// A string field.
    fn string(self, out: &mut Vec<u8>, key: &str, value: &str) {
        self.key(out, key);
        match self {
            Style::Text => debug_str(out, value),
            Style::Json => json_str(out, value),
        }
    }

    /// A field tracing records with Display: bare in text, a string in JSON. `write` must
    /// produce nothing that needs escaping (methods are tokens, peers addresses).
    fn display(self, out: &mut Vec<u8>, key: &str, write: impl FnOnce(&mut Vec<u8>)) {
        self.key(out, key);
        match self {
            Style::Text => write(out),
            Style::Json => {
                out.push(b'"');
                write(out);
                out.push(b'"');
            }
        }
    }

    /// A number or boolean, bare in both.
    fn bare(self, out: &mut Vec<u8>, key: &str, value: &[u8]) {
        self.key(out, key);
        out.extend_from_slice(value);
    }
}

fn fields(e: &Entry<'_>, style: Style, out: &mut Vec<u8>) {
    let mut int = itoa::Buffer::new();
    style.display(out, "method", |o| o.extend_from_slice(e.method.as_bytes()));
    style.string(out, "path", e.path);
    style.string(out, "operation", e.operation);
    style.bare(out, "status", int.format(e.status).as_bytes());
    style.display(out, "client", |o| push_addr(o, e.client));
    style.string(out, "app", e.app);
    style.string(out, "user", e.user);
    style.string(out, "conference", e.conference);
    style.string(out, "control_token", e.control_token);
    for (key, d) in [
        ("total_ms", e.total),
        ("queue_wait_ms", e.queue_wait),
        ("token_wait_ms", e.token_wait),
        ("upstream_ms", e.upstream),
    ] {
        style.key(out, key);
        push_ms(out, d);
    }
    style.string(out, "request_id", e.request_id);
    style.string(out, "trace_id", e.trace_id);
    for (name, value) in UPSTREAM_FIELDS.iter().zip(e.upstream_headers) {
        style.string(out, name, value);
    }
    style.bare(out, "replayed", if e.replayed { b"true" } else { b"false" });
    style.bare(out, "upstream_429s", int.format(e.upstream_429s).as_bytes());
    style.string(out, "error_code", e.error_code);
    style.string(out, "error", e.error);
}

/// RFC 3339 UTC with microseconds, as tracing writes it: `2026-11-26T01:40:29.870253Z`.
fn push_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let whole = humantime::format_rfc3339_seconds(now).to_string();
        if let Some(prefix) = whole.as_bytes().get(..19) {
            text.copy_from_slice(prefix);
            SECOND.set((secs, text));
        }
    }
    out.extend_from_slice(&text);
    let mut micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out.push(b'.');
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// As `SocketAddr`'s Display, without the formatting machinery for the common IPv4 case.
fn push_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let mut int = itoa::Buffer::new();
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(int.format(octet).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(int.format(v4.port()).as_bytes());
        }
        SocketAddr::V6(_) => push_fmt(out, format_args!("{addr}")),
    }
}

fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = out.write_fmt(args);
}

/// Milliseconds with microsecond resolution, shortest form: `0.42`, `12`, `0.002`.
fn push_ms(out: &mut Vec<u8>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    out.extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
    let mut frac = us % 1000;
    if frac != 0 {
        let mut digits = 3;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        let mut text = [b'0'; 3];
        for slot in text[..digits].iter_mut().rev() {
            *slot = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        out.push(b'.');
        out.extend_from_slice(&text[..digits]);
    }
}

/// `"value"`, escaped as Rust's Debug for strings (what tracing writes for `&str` fields).
/// Printable ASCII without `"` or `\\`: written between quotes as it is, both by Debug and in
/// JSON (the common case: paths, ids, names).
fn plain(value: &str) -> bool {
    // A fold, not `all`: without the early exit the compiler vectorises the check.
    value.bytes().fold(true, |plain, b| {
        plain & (b' '..=b'~').contains(&b) & (b != b'"') & (b != b'\\')
    })
}

fn quoted(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

fn debug_str(out: &mut Vec<u8>, value: &str) {
    if plain(value) {
        quoted(out, value);
    } else {
        push_fmt(out, format_args!("{value:?}"));
    }
}

fn json_str(out: &mut Vec<u8>, value: &str) {
    if plain(value) {
        quoted(out, value);
    } else {
        // Serializing a str into a Vec cannot fail.
        drop(serde_json::to_writer(&mut *out, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            method: "POST",
            path: "/v1/mmc/management/conferences/start",
            operation: "start_meeting",
            status: 200,
            client: "127.0.0.1:58186".parse().unwrap(),
            app: "demo",
            user: "",
            conference: "914087436",
            control_token: "-",
            total: Duration::from_micros(487),
            queue_wait: Duration::from_micros(2),
            token_wait: Duration::from_micros(1),
            upstream: Duration::from_micros(420),
            request_id: "6d5ccc484cf44d2182e6dce080a1cb56",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            upstream_headers: [
                "6d5ccc484cf44d2182e6dce080a1cb56",
                "0",
                "0",
                "0",
                "remain:99,limit:100,time:1 minute",
                "remain:199,limit:200,time:1 second",
            ],
            replayed: false,
            upstream_429s: 0,
            error_code: "-",
            error: "-",
        }
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_660_829_870_253)
    }

    /// Byte for byte what tracing-subscriber's text formatter wrote for these fields.
    #[test]
    fn text_line_matches_the_tracing_format() {
        let mut out = Vec::new();
        text_line(&entry(), at(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-26T02:40:29.870253Z  INFO meetgate::access: request method=POST \
             path=\"/v1/mmc/management/conferences/start\" operation=\"start_meeting\" status=200 \
             client=127.0.0.1:58186 app=\"demo\" user=\"\" conference=\"914087436\" \
             control_token=\"-\" total_ms=0.487 queue_wait_ms=0.002 \
             token_wait_ms=0.001 upstream_ms=0.42 request_id=\"6d5ccc484cf44d2182e6dce080a1cb56\" \
             trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\" \
             upstream_request_id=\"6d5ccc484cf44d2182e6dce080a1cb56\" apig_latency=\"0\" \
             apig_upstream_latency=\"0\" envoy_upstream_service_time=\"0\" \
             ratelimit_api=\"remain:99,limit:100,time:1 minute\" \
             ratelimit_allenv=\"remain:199,limit:200,time:1 second\" replayed=false \
             upstream_429s=0 error_code=\"-\" error=\"-\"\n"
        );
    }

    #[test]
    fn json_line_is_one_flat_object() {
        let mut e = entry();
        e.error = "say \"hi\"\n\u{1}";
        e.path = "/caf\u{e9}";
        e.total = Duration::from_millis(12);
        let mut out = Vec::new();
        json_line(&e, at(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2026-11-26T02:40:29.870253Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], TARGET);
        assert_eq!(v["message"], "request");
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "127.0.0.1:58186");
        assert_eq!(v["path"], "/caf\u{e9}");
        assert_eq!(v["error"], "say \"hi\"\n\u{1}");
        assert_eq!(v["total_ms"], 12);
        assert_eq!(v["upstream_ms"], 0.42);
        assert_eq!(v["replayed"], false);
        assert_eq!(v["ratelimit_api"], "remain:99,limit:100,time:1 minute");
        assert_eq!(v["conference"], "914087436");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v.as_object().unwrap().len(), 29);
    }

    proptest::proptest! {
        /// The fast path for plain strings writes what serde_json writes, for any string and
        /// for printable ASCII (where it is taken unless `"` or `\\` occur).
        #[test]
        fn json_strings_are_written_as_serde_json_writes_them(
            any in ".{0,40}",
            ascii in "[ -~]{0,40}",
        ) {
            for value in [any, ascii] {
                let mut out = Vec::new();
                json_str(&mut out, &value);
                proptest::prop_assert_eq!(out, serde_json::to_vec(&value).unwrap());
            }
        }
    }

    #[test]
    fn text_strings_with_quotes_or_control_bytes_are_escaped() {
        let mut e = entry();
        e.error = "bad \"x\"\nnext";
        let mut out = Vec::new();
        text_line(&e, at(), &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.ends_with(" error=\"bad \\\"x\\\"\\nnext\"\n"),
            "{line}"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn timestamps_match_rfc3339_micros_across_seconds() {
        let base = at();
        for offset_us in [0_u64, 1, 129_746, 999_999, 1_000_000, 86_400_000_007, 5] {
            let t = base + Duration::from_micros(offset_us);
            let mut out = Vec::new();
            push_timestamp(&mut out, t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_micros(t).to_string()
            );
        }
    }

    #[test]
    fn peer_addresses_as_display_writes_them() {
        for addr in [
            "127.0.0.1:58186",
            "10.0.255.9:1",
            "[::1]:8080",
            "[fe80::1%2]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            push_addr(&mut out, addr);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn milliseconds_in_shortest_form() {
        for (us, text) in [
            (0, "0"),
            (2, "0.002"),
            (420, "0.42"),
            (487, "0.487"),
            (1_000, "1"),
            (12_050, "12.05"),
            (3_600_000_001, "3600000.001"),
        ] {
            let mut out = Vec::new();
            push_ms(&mut out, Duration::from_micros(us));
            assert_eq!(String::from_utf8(out).unwrap(), text, "{us} µs");
        }
    }
}
