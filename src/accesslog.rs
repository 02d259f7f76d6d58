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

/// How a field's value is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A string: quoted and escaped in both styles.
    Str,
    /// A field tracing records with Display: bare in text, a string in JSON; its writer must
    /// produce nothing that needs escaping (methods are tokens, peers addresses).
    Display,
    /// A number or boolean, bare in both.
    Bare,
}

/// The fields after the level, in line order (README, "Access log").
const FIELDS: [(&str, Kind); 25] = [
    ("method", Kind::Display),
    ("path", Kind::Str),
    ("operation", Kind::Str),
    ("status", Kind::Bare),
    ("client", Kind::Display),
    ("app", Kind::Str),
    ("user", Kind::Str),
    ("conference", Kind::Str),
    ("control_token", Kind::Str),
    ("total_ms", Kind::Bare),
    ("queue_wait_ms", Kind::Bare),
    ("token_wait_ms", Kind::Bare),
    ("upstream_ms", Kind::Bare),
    ("request_id", Kind::Str),
    ("trace_id", Kind::Str),
    (UPSTREAM_FIELDS[0], Kind::Str),
    (UPSTREAM_FIELDS[1], Kind::Str),
    (UPSTREAM_FIELDS[2], Kind::Str),
    (UPSTREAM_FIELDS[3], Kind::Str),
    (UPSTREAM_FIELDS[4], Kind::Str),
    (UPSTREAM_FIELDS[5], Kind::Str),
    ("replayed", Kind::Bare),
    ("upstream_429s", Kind::Bare),
    ("error_code", Kind::Str),
    ("error", Kind::Str),
];

/// What goes before a field's value, its opening quote included when the value has one:
/// ` path="` or `,"path":"`. Padded to a fixed size so that it is copied with one constant-size
/// move instead of a call per piece, and all of a style's keys sit together in one table of
/// about 850 bytes, not one literal per key wherever the compiler placed it.
#[derive(Clone, Copy)]
struct Key {
    bytes: [u8; KEY_BYTES],
    len: u8,
    kind: Kind,
}

const KEY_BYTES: usize = 32;

impl Key {
    const EMPTY: Key = Key {
        bytes: [0; KEY_BYTES],
        len: 0,
        kind: Kind::Bare,
    };

    const fn new(style: Style, name: &str, kind: Kind) -> Key {
        let quoted = match (style, kind) {
            (_, Kind::Str) | (Style::Json, Kind::Display) => true,
            (Style::Text, Kind::Display) | (_, Kind::Bare) => false,
        };
        let (open, close): (&[u8], &[u8]) = match style {
            Style::Text => (b" ", b"="),
            Style::Json => (b",\"", b"\":"),
        };
        let mut key = Key { kind, ..Key::EMPTY };
        key = key.append(open);
        key = key.append(name.as_bytes());
        key = key.append(close);
        if quoted {
            key = key.append(b"\"");
        }
        key
    }

    /// Evaluated at compile time: a name too long for [`KEY_BYTES`] fails the build.
    const fn append(mut self, text: &[u8]) -> Key {
        let mut i = 0;
        while i < text.len() {
            self.bytes[self.len as usize] = text[i];
            self.len += 1;
            i += 1;
        }
        self
    }
}

const fn keys(style: Style) -> [Key; FIELDS.len()] {
    let mut keys = [Key::EMPTY; FIELDS.len()];
    let mut i = 0;
    while i < FIELDS.len() {
        keys[i] = Key::new(style, FIELDS[i].0, FIELDS[i].1);
        i += 1;
    }
    keys
}

static TEXT_KEYS: [Key; FIELDS.len()] = keys(Style::Text);
static JSON_KEYS: [Key; FIELDS.len()] = keys(Style::Json);

impl Style {
    /// This style's keys, in [`FIELDS`] order.
    fn keys(self) -> &'static [Key; FIELDS.len()] {
        match self {
            Style::Text => &TEXT_KEYS,
            Style::Json => &JSON_KEYS,
        }
    }
}

/// Writes the fields in [`FIELDS`] order, each after its key.
struct Fields<'o> {
    out: &'o mut Vec<u8>,
    style: Style,
    keys: std::slice::Iter<'static, Key>,
}

impl Fields<'_> {
    /// The next field's key; its kind is checked against the writer used in debug builds.
    fn key(&mut self, kind: Kind) {
        let Some(key) = self.keys.next() else {
            debug_assert!(false, "more fields written than FIELDS lists");
            return;
        };
        debug_assert_eq!(key.kind, kind);
        let at = self.out.len();
        self.out.extend_from_slice(&key.bytes);
        self.out.truncate(at + usize::from(key.len));
    }

    /// A string field (its opening quote is the key's).
    fn string(&mut self, value: &str) {
        self.key(Kind::Str);
        if plain(value) {
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            // The escaping writers quote the value themselves.
            self.out.pop();
            match self.style {
                Style::Text => push_fmt(self.out, format_args!("{value:?}")),
                // Serializing a str into a Vec cannot fail.
                Style::Json => drop(serde_json::to_writer(&mut *self.out, value)),
            }
        }
    }

    /// A Display field: bare in text, between quotes (the key's opening one) in JSON.
    fn display(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        self.key(Kind::Display);
        write(self.out);
        if let Style::Json = self.style {
            self.out.push(b'"');
        }
    }

    /// A number or boolean, bare in both.
    fn bare(&mut self, value: &[u8]) {
        self.key(Kind::Bare);
        self.out.extend_from_slice(value);
    }

    fn ms(&mut self, d: Duration) {
        self.key(Kind::Bare);
        push_ms(self.out, d);
    }
}

fn fields(e: &Entry<'_>, style: Style, out: &mut Vec<u8>) {
    let mut f = Fields {
        out,
        style,
        keys: style.keys().iter(),
    };
    let mut int = itoa::Buffer::new();
    f.display(|o| o.extend_from_slice(e.method.as_bytes()));
    f.string(e.path);
    f.string(e.operation);
    f.bare(int.format(e.status).as_bytes());
    f.display(|o| push_addr(o, e.client));
    f.string(e.app);
    f.string(e.user);
    f.string(e.conference);
    f.string(e.control_token);
    f.ms(e.total);
    f.ms(e.queue_wait);
    f.ms(e.token_wait);
    f.ms(e.upstream);
    f.string(e.request_id);
    f.string(e.trace_id);
    for value in e.upstream_headers {
        f.string(value);
    }
    f.bare(if e.replayed { b"true" } else { b"false" });
    f.bare(int.format(e.upstream_429s).as_bytes());
    f.string(e.error_code);
    f.string(e.error);
    debug_assert!(
        f.keys.next().is_none(),
        "fewer fields written than FIELDS lists"
    );
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

/// Printable ASCII without `"` or `\\`: written between quotes as it is, both by Debug (what
/// tracing writes for `&str` fields) and in JSON (the common case: paths, ids, names).
fn plain(value: &str) -> bool {
    // A fold, not `all`: without the early exit the compiler vectorises the check.
    value.bytes().fold(true, |plain, b| {
        plain & (b' '..=b'~').contains(&b) & (b != b'"') & (b != b'\\')
    })
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

    /// `path`'s key and a string value, as the line writer writes them in `style`.
    fn string_field(style: Style, value: &str) -> String {
        let mut out = Vec::new();
        let mut f = Fields {
            out: &mut out,
            style,
            keys: style.keys()[1..].iter(),
        };
        f.string(value);
        String::from_utf8(out).unwrap()
    }

    proptest::proptest! {
        /// The fast path for plain strings writes what serde_json and Debug write, for any
        /// string and for printable ASCII (where it is taken unless `"` or `\\` occur).
        #[test]
        fn strings_are_written_as_serde_json_and_debug_write_them(
            any in ".{0,40}",
            ascii in "[ -~]{0,40}",
        ) {
            for value in [any, ascii] {
                proptest::prop_assert_eq!(
                    string_field(Style::Json, &value),
                    format!(",\"path\":{}", serde_json::to_string(&value).unwrap())
                );
                proptest::prop_assert_eq!(
                    string_field(Style::Text, &value),
                    format!(" path={value:?}")
                );
            }
        }
    }

    /// Every key fits its fixed size and ends where the value starts.
    #[test]
    fn keys_are_the_field_names_in_both_styles() {
        for (i, (name, kind)) in FIELDS.iter().enumerate() {
            let text = &TEXT_KEYS[i];
            let json = &JSON_KEYS[i];
            let quote = if *kind == Kind::Str { "\"" } else { "" };
            assert_eq!(
                &text.bytes[..usize::from(text.len)],
                format!(" {name}={quote}").as_bytes()
            );
            let quote = if *kind == Kind::Bare { "" } else { "\"" };
            assert_eq!(
                &json.bytes[..usize::from(json.len)],
                format!(",\"{name}\":{quote}").as_bytes()
            );
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
