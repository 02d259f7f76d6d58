//! Operation classification and path canonicalisation. Oracle: a path is refused as
//! non-canonical (400), refused as outside the upstream's API families (404), or classified as
//! an operation whose template matches it (literal segments before parameters), or as
//! `unlisted` when no template of its method matches; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meetgate::operations::{ClassifyError, OperationKind, OperationTable};

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// Whether `template` matches `path` segment by segment: literals equal, `{params}` non-empty.
/// `Some(mask)`: which segments matched literally.
fn matches(template: &str, path: &str) -> Option<Vec<bool>> {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    if t.len() != p.len() {
        return None;
    }
    t.iter()
        .zip(&p)
        .map(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                (!p.is_empty()).then_some(false)
            } else {
                (t == p).then_some(true)
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = http::Method::from_bytes(METHODS[usize::from(m) % METHODS.len()].as_bytes())
        .expect("method");
    let path = String::from_utf8_lossy(rest);
    let table = OperationTable::global();
    let families: Vec<String> = table
        .all()
        .filter(|(_, op)| op.kind != OperationKind::Unlisted)
        .filter_map(|(_, op)| {
            let mut s = op.path_template.split('/').skip(1);
            Some(format!("/{}/{}/", s.next()?, s.next()?))
        })
        .collect();
    let candidates: Vec<_> = table
        .all()
        .filter(|(_, op)| op.kind != OperationKind::Unlisted && op.method == method)
        .filter_map(|(id, op)| matches(op.path_template, &path).map(|m| (id, m)))
        .collect();
    match table.classify(&method, &path) {
        Err(ClassifyError::Ambiguous) => {
            // Refused as non-canonical: only paths with something to refuse.
            let plain = path.starts_with('/')
                && !path.ends_with('/')
                && !path.contains("//")
                && !path.split('/').any(|s| s == "." || s == "..")
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'));
            assert!(!plain, "a plain path {path:?} was refused as ambiguous");
        }
        Err(ClassifyError::Unknown) => {
            assert!(
                !families.iter().any(|f| path.starts_with(f.as_str())),
                "{path:?} is inside an API family but was called unknown"
            );
            assert!(candidates.is_empty());
        }
        Ok(id) => {
            let op = table.get(id);
            assert!(families.iter().any(|f| path.starts_with(f.as_str())));
            if op.kind == OperationKind::Unlisted {
                assert!(
                    candidates.is_empty(),
                    "{method} {path:?} matches {:?} but was unlisted",
                    candidates
                        .iter()
                        .map(|(i, _)| table.get(*i).name)
                        .collect::<Vec<_>>()
                );
            } else {
                assert_eq!(op.method, method);
                let mine = matches(op.path_template, &path)
                    .unwrap_or_else(|| panic!("{} does not match {path:?}", op.path_template));
                // No other candidate is more literal at the first segment where they differ.
                for (other, mask) in &candidates {
                    assert!(
                        mask <= &mine,
                        "{path:?}: {} is more literal than {}",
                        table.get(*other).path_template,
                        op.path_template
                    );
                }
            }
        }
    }
});
