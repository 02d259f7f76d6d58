//! The upstream's operation table (compiled in from `src/data/meeting-operations.tsv`) and the
//! classifier that maps a method and path to an operation, literal segments before `{params}`.

use std::collections::HashMap;
use std::sync::LazyLock;

use http::Method;

static TABLE_TSV: &str = include_str!("data/meeting-operations.tsv");

/// Index of an operation in the table: cheap to copy, to compare and to use as a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperationId(u16);

impl OperationId {
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    #[cfg(test)]
    pub(crate) fn from_index(i: usize) -> OperationId {
        OperationId(i as u16)
    }
}

/// How the gateway treats an operation beyond forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationKind {
    /// An ordinary API call: token injected, forwarded.
    Business,
    /// A sign-in endpoint: the gateway signs in itself, clients never reach the upstream's.
    SignIn,
    /// Acts on the caller's own token (refresh, validate, log out): forwarding it would act on the
    /// gateway's shared token, so it is never forwarded.
    TokenManagement,
    /// A path inside the upstream's API families that the table does not list.
    Unlisted,
}

/// What an operation does in a meeting's control flow (design §3b).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRole {
    /// Not part of it.
    None,
    /// `conferences/start`: activates a meeting with its host password.
    Start,
    /// A meeting-control call: its table row lists `X-Conference-Authorization`.
    Call,
    /// `conferences/stop`: a control call that ends the meeting.
    Stop,
    /// `conferences/token`: obtains or keeps alive a control token.
    TokenEndpoint,
}

#[derive(Debug)]
pub struct Operation {
    pub name: &'static str,
    pub method: Method,
    pub path_template: &'static str,
    pub kind: OperationKind,
    pub control: ControlRole,
}

/// Name of the catch-all operation for unlisted paths inside the API families.
pub const UNLISTED: &str = "unlisted";

/// Operations the SDK calls from its credentials object; they are not in the SDK's table.
const SIGN_IN_ROWS: [(&str, &str, &str); 3] = [
    ("create_app_id_token", "POST", "/v2/usg/acs/auth/appauth"),
    ("create_token", "POST", "/v1/usg/acs/auth/account"),
    ("create_proxy_token", "POST", "/v1/usg/acs/auth/proxy"),
];
const TOKEN_MANAGEMENT: [&str; 3] = ["update_token", "check_token", "delete_token"];

#[derive(Default)]
struct Node {
    /// Sorted by segment: a binary search of a few short strings is cheaper per request than
    /// hashing each segment.
    literal: Vec<(&'static str, Node)>,
    param: Option<Box<Node>>,
    op: Option<OperationId>,
}

impl Node {
    fn insert(&mut self, segments: &[&'static str], id: OperationId) {
        match segments.split_first() {
            None => self.op = Some(id),
            Some((seg, rest)) if seg.starts_with('{') && seg.ends_with('}') => self
                .param
                .get_or_insert_with(Default::default)
                .insert(rest, id),
            Some((seg, rest)) => {
                let i = match self.literal.binary_search_by(|(k, _)| k.cmp(seg)) {
                    Ok(i) => i,
                    Err(i) => {
                        self.literal.insert(i, (seg, Node::default()));
                        i
                    }
                };
                self.literal[i].1.insert(rest, id);
            }
        }
    }

    // Depth-first with the literal child tried first, so a literal segment beats a template
    // anywhere in the path, and a template is still found when the literal branch dead-ends.
    // The segments come split once, as a slice: backtracking then copies two words, not a
    // string searcher's state.
    fn find(&self, segments: &[&str]) -> Option<OperationId> {
        let Some((seg, rest)) = segments.split_first() else {
            return self.op;
        };
        let literal = self
            .literal
            .binary_search_by(|(k, _)| (*k).cmp(seg))
            .ok()
            .and_then(|i| self.literal.get(i));
        if let Some(found) = literal.and_then(|(_, n)| n.find(rest)) {
            return Some(found);
        }
        self.param.as_ref().and_then(|n| n.find(rest))
    }
}

/// The compiled-in operation table with one routing tree per method.
pub struct OperationTable {
    ops: Vec<Operation>,
    by_method: Vec<(Method, Node)>,
    families: Vec<String>,
    unlisted: OperationId,
    by_name: HashMap<&'static str, OperationId>,
}

/// Why a request could not be classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifyError {
    /// The path is not inside any of the upstream's API families.
    Unknown,
    /// The path has a form the upstream might route differently from us (`//`, dot segments,
    /// encoded separators, a trailing slash, a query-less `?`...): refused rather than guessed.
    Ambiguous,
}

static TABLE: LazyLock<OperationTable> = LazyLock::new(|| OperationTable::parse(TABLE_TSV));

impl OperationTable {
    /// The table compiled into the binary.
    pub fn global() -> &'static OperationTable {
        &TABLE
    }

    fn parse(tsv: &'static str) -> OperationTable {
        type Row = (
            &'static str,
            &'static str,
            &'static str,
            OperationKind,
            ControlRole,
        );
        let mut rows: Vec<Row> = tsv
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut cols = line.split('\t');
                let (name, method, path) = (cols.next()?, cols.next()?, cols.next()?);
                let headers = cols.nth(2).unwrap_or("");
                let kind = if TOKEN_MANAGEMENT.contains(&name) {
                    OperationKind::TokenManagement
                } else {
                    OperationKind::Business
                };
                let takes_control_token = headers
                    .split(',')
                    .any(|h| h.trim().eq_ignore_ascii_case("X-Conference-Authorization"));
                let control = match name {
                    "start_meeting" => ControlRole::Start,
                    "stop_meeting" => ControlRole::Stop,
                    "create_conf_token" => ControlRole::TokenEndpoint,
                    _ if takes_control_token => ControlRole::Call,
                    _ => ControlRole::None,
                };
                Some((name, method, path, kind, control))
            })
            .collect();
        rows.extend(
            SIGN_IN_ROWS
                .iter()
                .map(|&(n, m, p)| (n, m, p, OperationKind::SignIn, ControlRole::None)),
        );

        let mut table = OperationTable {
            ops: Vec::with_capacity(rows.len() + 1),
            by_method: Vec::new(),
            families: Vec::new(),
            unlisted: OperationId(0),
            by_name: HashMap::new(),
        };
        for (name, method, path, kind, control) in rows {
            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                continue;
            };
            let id = OperationId(table.ops.len() as u16);
            let segments: Vec<&'static str> = path.split('/').skip(1).collect();
            if let [version, family, ..] = segments.as_slice() {
                let prefix = format!("/{version}/{family}/");
                if !table.families.contains(&prefix) {
                    table.families.push(prefix);
                }
            }
            let tree = match table.by_method.iter_mut().find(|(m, _)| *m == method) {
                Some((_, tree)) => tree,
                None => {
                    table.by_method.push((method.clone(), Node::default()));
                    let last = table.by_method.len() - 1;
                    &mut table.by_method[last].1
                }
            };
            tree.insert(&segments, id);
            table.by_name.insert(name, id);
            table.ops.push(Operation {
                name,
                method,
                path_template: path,
                kind,
                control,
            });
        }
        table.unlisted = OperationId(table.ops.len() as u16);
        table.by_name.insert(UNLISTED, table.unlisted);
        table.ops.push(Operation {
            name: UNLISTED,
            method: Method::GET,
            path_template: "/*",
            kind: OperationKind::Unlisted,
            control: ControlRole::None,
        });
        table
    }

    /// Classifies a request by method and path (without the query).
    pub fn classify(&self, method: &Method, path: &str) -> Result<OperationId, ClassifyError> {
        let mut split = [""; MAX_DEPTH];
        let Some(depth) = canonical_segments(path, &mut split) else {
            return Err(ClassifyError::Ambiguous);
        };
        if !self.families.iter().any(|f| path.starts_with(f.as_str())) {
            return Err(ClassifyError::Unknown);
        }
        // Deeper than every template: no listed operation has this path.
        let Some(segments) = split.get(..depth) else {
            return Ok(self.unlisted);
        };
        let found = self
            .by_method
            .iter()
            .find(|(m, _)| m == method)
            .and_then(|(_, tree)| tree.find(segments));
        Ok(found.unwrap_or(self.unlisted))
    }

    pub fn get(&self, id: OperationId) -> &Operation {
        &self.ops[id.index()]
    }

    pub fn by_name(&self, name: &str) -> Option<OperationId> {
        self.by_name.get(name).copied()
    }

    /// Every operation, the catch-all last.
    pub fn all(&self) -> impl Iterator<Item = (OperationId, &Operation)> {
        self.ops
            .iter()
            .enumerate()
            .map(|(i, op)| (OperationId(i as u16), op))
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The path prefixes (`/v1/mmc/`, ...) of the upstream's API families.
    pub fn families(&self) -> &[String] {
        &self.families
    }
}

/// Most segments in a template (the table's deepest has 8); a test holds the table to it.
const MAX_DEPTH: usize = 16;

/// Longest path the gateway accepts; the upstream's longest template is far shorter.
pub const MAX_PATH_LEN: usize = 2048;

/// The segments after the first `/`, as `path.split('/').skip(1)` yields them, found by a plain
/// byte scan: `str::split` with a char runs a general searcher per segment, which cost more
/// per request than the whole tree look-up.
fn segments(path: &str) -> Segments<'_> {
    Segments {
        path,
        next: path.bytes().position(|b| b == b'/').map(|i| i + 1),
    }
}

#[derive(Clone)]
struct Segments<'a> {
    path: &'a str,
    /// Where the next segment starts; none after the last.
    next: Option<usize>,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let start = self.next?;
        let rest = self.path.as_bytes().get(start..)?;
        match rest.iter().position(|&b| b == b'/') {
            Some(len) => {
                self.next = Some(start + len + 1);
                self.path.get(start..start + len)
            }
            None => {
                self.next = None;
                self.path.get(start..)
            }
        }
    }
}

/// A path is canonical when every reasonable server would route it the same way: no empty,
/// `.` or `..` segment, no percent-encoded byte that decodes to a separator, a dot or a
/// control character, no backslash, and no trailing slash. Returns how many segments a
/// canonical path has, the first of them written to `out` (one pass serves both).
fn canonical_segments<'p>(path: &'p str, out: &mut [&'p str]) -> Option<usize> {
    if path.len() > MAX_PATH_LEN || !path.starts_with('/') || path.len() < 2 || path.ends_with('/')
    {
        return None;
    }
    if path.as_bytes().contains(&b'\\') {
        return None;
    }
    let mut depth = 0;
    for seg in segments(path) {
        if seg.is_empty() || seg == "." || seg == ".." {
            return None;
        }
        if let Some(slot) = out.get_mut(depth) {
            *slot = seg;
        }
        depth += 1;
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while let Some(pos) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + pos;
        let hex = bytes.get(at + 1..at + 3)?;
        let decoded = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16).ok()?;
        if matches!(decoded, b'/' | b'\\' | b'.' | b'%') || decoded < 0x20 || decoded == 0x7f {
            return None;
        }
        i = at + 3;
    }
    Some(depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(method: Method, path: &str) -> Result<&'static str, ClassifyError> {
        let t = OperationTable::global();
        t.classify(&method, path).map(|id| t.get(id).name)
    }

    #[test]
    fn control_roles_follow_the_tables_header_column() {
        let t = OperationTable::global();
        let count = |role| (0..t.len()).filter(|&i| t.ops[i].control == role).count();
        // 45 rows list X-Conference-Authorization: the token endpoint, stop, and 43 others.
        assert_eq!(count(ControlRole::Call), 43);
        assert_eq!(count(ControlRole::Stop), 1);
        assert_eq!(count(ControlRole::TokenEndpoint), 1);
        assert_eq!(count(ControlRole::Start), 1);
        let role = |name| t.by_name(name).map(|id| t.get(id).control);
        assert_eq!(role("lock_meeting"), Some(ControlRole::Call));
        assert_eq!(role("create_web_socket_token"), Some(ControlRole::Call));
        // inviteWithPwd is under /control/ but authenticates with the access token.
        assert_eq!(role("invite_with_pwd"), Some(ControlRole::None));
    }

    #[test]
    fn every_row_of_the_table_classifies_to_itself() {
        let t = OperationTable::global();
        assert_eq!(t.len(), 199 + 3 + 1);
        for (id, op) in t.all() {
            if op.kind == OperationKind::Unlisted {
                continue;
            }
            let concrete = op
                .path_template
                .split('/')
                .map(|s| if s.starts_with('{') { "x123" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let got = t.classify(&op.method, &concrete).expect("classifies");
            // The one documented collision: a concrete id that happens to equal a literal.
            assert_eq!(t.get(got).path_template, op.path_template, "{}", op.name);
            assert_eq!(got, id, "{}", op.name);
        }
    }

    /// Deeper than the segment buffer: still inside a family, so unlisted, not an error.
    #[test]
    fn paths_deeper_than_any_template_are_unlisted() {
        let deep = format!("/v1/mmc/management{}", "/x".repeat(MAX_DEPTH));
        assert_eq!(name(Method::GET, &deep), Ok(UNLISTED));
        let at_limit = format!("/v1/mmc{}", "/x".repeat(MAX_DEPTH - 2));
        assert_eq!(name(Method::GET, &at_limit), Ok(UNLISTED));
    }

    #[test]
    fn literal_segments_win_over_templates() {
        let base = "/v1/wss/webinar/open/conferences";
        assert_eq!(
            name(Method::GET, &format!("{base}/history")),
            Ok("list_history_webinars")
        );
        assert_eq!(
            name(Method::GET, &format!("{base}/upcoming")),
            Ok("list_up_coming_webinars")
        );
        assert_eq!(
            name(Method::GET, &format!("{base}/c-42")),
            Ok("show_webinar")
        );
        assert_eq!(
            name(Method::DELETE, &format!("{base}/history")),
            Ok("delete_webinar")
        );
    }

    #[test]
    fn known_rows() {
        assert_eq!(
            name(Method::POST, "/v1/mmc/management/conferences/start"),
            Ok("start_meeting")
        );
        assert_eq!(
            name(Method::POST, "/v2/usg/acs/auth/appauth"),
            Ok("create_app_id_token")
        );
        assert_eq!(
            name(Method::DELETE, "/v1/usg/acs/token"),
            Ok("delete_token")
        );
        assert_eq!(
            name(Method::GET, "/v1/usg/dcs/corp/member/alice"),
            Ok("show_user_detail")
        );
    }

    #[test]
    fn unknown_and_unlisted() {
        assert_eq!(name(Method::GET, "/"), Err(ClassifyError::Ambiguous));
        assert_eq!(name(Method::GET, "/admin"), Err(ClassifyError::Unknown));
        assert_eq!(name(Method::GET, "/v3/usg/x"), Err(ClassifyError::Unknown));
        assert_eq!(name(Method::GET, "/v1/mmc/nothing/here"), Ok(UNLISTED));
        // Wrong method for a known path is still inside the family: forwarded as unlisted.
        assert_eq!(
            name(Method::PATCH, "/v1/mmc/management/conferences/start"),
            Ok(UNLISTED)
        );
    }

    #[test]
    fn path_tricks_are_refused() {
        for p in [
            "/v1/mmc//management/conferences/start",
            "/v1/mmc/./management/conferences/start",
            "/v1/mmc/x/../management/conferences/start",
            "/v1/mmc/management/conferences/start/",
            "/v1/mmc/management%2Fconferences/start",
            "/v1/mmc/management/conferences/%2e%2e/start",
            "/v1/mmc/management/conferences/start%00",
            "/v1/mmc/management/conferences/st%zzart",
            "/v1\\mmc/management/conferences/start",
        ] {
            assert_eq!(name(Method::POST, p), Err(ClassifyError::Ambiguous), "{p}");
        }
        // Case is significant upstream: a different case is a different (unlisted) path.
        assert_eq!(
            name(Method::POST, "/v1/mmc/management/conferences/START"),
            Ok(UNLISTED)
        );
        // Ordinary percent-encoding in a parameter is fine.
        assert_eq!(
            name(Method::GET, "/v1/usg/dcs/corp/member/alice%40corp"),
            Ok("show_user_detail")
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn rows() -> Vec<(Method, &'static str)> {
        OperationTable::global()
            .all()
            .filter(|(_, op)| op.kind != OperationKind::Unlisted)
            .map(|(_, op)| (op.method.clone(), op.path_template))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn segments_are_what_split_yields(path in "[/a-zé{}.%]{0,40}") {
            let ours: Vec<&str> = segments(&path).collect();
            let split: Vec<&str> = path.split('/').skip(1).collect();
            prop_assert_eq!(ours, split);
        }

        #[test]
        fn any_input_classifies_without_panicking(path in ".{0,300}", m in 0usize..5) {
            let method = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH][m].clone();
            let _ = OperationTable::global().classify(&method, &path);
        }

        #[test]
        fn concrete_paths_classify_to_their_row(i in 0usize..202, param in "p[A-Za-z0-9_@.-]{0,20}") {
            let rows = rows();
            let (method, template) = &rows[i % rows.len()];
            let path = template
                .split('/')
                .map(|s| if s.starts_with('{') { param.as_str() } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let t = OperationTable::global();
            let got = t.classify(method, &path).expect("classifies");
            prop_assert_eq!(t.get(got).path_template, *template);
        }

        #[test]
        fn path_tricks_never_classify(i in 0usize..202, trick in 0usize..7, at in 1usize..6) {
            let rows = rows();
            let (method, template) = &rows[i % rows.len()];
            let path = template.replace('{', "x").replace('}', "");
            let segs: Vec<&str> = path.split('/').collect();
            let at = at.min(segs.len() - 1);
            let insert = ["", ".", "..", "%2F", "%2e", "%2E%2E", "a\\b"][trick];
            let mut out: Vec<&str> = segs[..at].to_vec();
            out.push(insert);
            out.extend_from_slice(&segs[at..]);
            let tricked = out.join("/");
            prop_assert_eq!(
                OperationTable::global().classify(method, &tricked),
                Err(ClassifyError::Ambiguous),
                "{}", tricked
            );
        }
    }
}
