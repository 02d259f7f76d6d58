//! The codebase's shape, checked: every source file opens with a `//!` line saying what it owns,
//! no two `src/` modules import each other in a circle (read from the `crate::` paths of the
//! code, comments and test modules left out), and the fuzz workspace locks the versions
//! meetgate ships.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/quota/bucket.rs` -> `quota`.
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).expect("under src");
    let first = rel.components().next().expect("component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

/// The code without comments, string literals and `#[cfg(test)]` items.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if let Some(raw) = rest.strip_prefix("r#\"") {
            i += 3 + raw.find("\"#").map_or(raw.len(), |e| e + 2);
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() && rest.as_bytes()[j] != b'"' {
                j += if rest.as_bytes()[j] == b'\\' { 2 } else { 1 };
            }
            i += (j + 1).min(rest.len());
        } else if rest.starts_with("#[cfg(test)]") {
            // Skip the item: up to its `;` or its balanced `{ ... }`.
            let mut j = "#[cfg(test)]".len();
            let mut depth = 0usize;
            while j < rest.len() {
                match rest.as_bytes()[j] {
                    b';' if depth == 0 => break,
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            i += j + 1;
        } else {
            let ch = rest.chars().next().expect("char");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Module -> the other top-level modules its code names through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&file);
        if matches!(module.as_str(), "lib" | "main") || file.ends_with("tests.rs") {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(&file).expect("read"));
        let deps = graph.entry(module.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
        // `use crate::{a, b}` names several at once.
        for (at, _) in code.match_indices("crate::{") {
            let list = &code[at + 8..at + 8 + code[at + 8..].find('}').unwrap_or(0)];
            for part in list.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle in the graph, as the modules on it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_imports_another_in_a_circle() {
    let graph = imports();
    assert!(graph.len() > 20, "read the modules: {graph:?}");
    assert!(
        graph["proxy"].contains("quota"),
        "the reader sees imports: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&graph).map(|c| c.join(" -> ")),
        Some("a -> b -> c -> a".to_owned())
    );
    graph.insert("c".to_owned(), BTreeSet::new());
    assert_eq!(find_cycle(&graph), None);
    // Comments, strings and test modules do not count as imports.
    let code = code_only(
        "use crate::a; // crate::b\n/// see [`crate::c`]\nlet s = \"crate::d\";\n#[cfg(test)]\nmod tests { use crate::e; }\n",
    );
    assert!(code.contains("crate::a") && !code.contains("crate::b"));
    assert!(!code.contains("crate::c") && !code.contains("crate::d") && !code.contains("crate::e"));
}

#[test]
fn every_source_file_says_what_it_owns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        rust_files(&root.join(dir), &mut files);
    }
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("read");
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(missing.is_empty(), "no `//!` opening line: {missing:?}");
}

/// (name, version) of every package a `Cargo.lock` holds.
fn locked(path: &Path) -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(path).expect("read a Cargo.lock");
    let lock: toml::Table = toml::from_str(&text).expect("a Cargo.lock is TOML");
    let packages = lock["package"].as_array().expect("[[package]]");
    packages
        .iter()
        .filter_map(|p| {
            let field = |key: &str| p.get(key)?.as_str().map(str::to_owned);
            Some((field("name")?, field("version")?))
        })
        .collect()
}

#[test]
fn the_fuzz_targets_build_the_dependency_versions_meetgate_ships() {
    // `fuzz/` is a workspace of its own with its own lock file: left alone, it resolves newer
    // versions than `Cargo.lock` (it did: hyper, h2, redis and rustls), and the fuzzers would
    // exercise parsers meetgate does not ship.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = locked(&root.join("Cargo.lock"));
    let fuzzed = locked(&root.join("fuzz/Cargo.lock"));
    let names: BTreeSet<&String> = shipped.iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"hyper".to_owned()), "Cargo.lock parsed");
    let differing: Vec<&(String, String)> = fuzzed
        .iter()
        .filter(|(name, _)| names.contains(name))
        .filter(|p| !shipped.contains(*p))
        .collect();
    assert!(
        differing.is_empty(),
        "fuzz/Cargo.lock has versions Cargo.lock does not: {differing:?}; align them with \
         `cd fuzz && cargo update -p NAME --precise VERSION`"
    );
}
