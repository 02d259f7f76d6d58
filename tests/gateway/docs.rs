//! The docs in step with the code: `docs/configuration.md` documents exactly the keys of
//! `config/full.toml`, which are exactly the keys of the typed config `check-config` prints.

use std::collections::BTreeSet;
use std::path::Path;

use crate::cli::ShippedFiles;
use crate::support::*;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The dotted key a `## ` heading of `docs/configuration.md` prefixes its keys with:
/// `Top level` -> "", `` `[upstream]` `` -> "upstream", `` `[[apps]]` `` -> "apps".
fn section_prefix(heading: &str) -> Option<String> {
    if heading == "Top level" {
        return Some(String::new());
    }
    let table = heading.strip_prefix('`')?.strip_suffix('`')?;
    let name = table
        .strip_prefix("[[")
        .and_then(|t| t.strip_suffix("]]"))
        .or_else(|| table.strip_prefix('[').and_then(|t| t.strip_suffix(']')))?;
    Some(name.to_owned())
}

/// Every key documented in `docs/configuration.md`, dotted; panics on a key documented twice.
fn documented_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut prefix: Option<String> = None;
    for line in read("docs/configuration.md").lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            prefix = section_prefix(heading.trim());
            continue;
        }
        let Some(prefix) = &prefix else { continue };
        let Some(first) = line
            .strip_prefix('|')
            .and_then(|rest| rest.split('|').next())
        else {
            continue;
        };
        let Some(key) = first
            .trim()
            .strip_prefix('`')
            .and_then(|k| k.strip_suffix('`'))
        else {
            continue;
        };
        let dotted = if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        };
        assert!(
            keys.insert(dotted.clone()),
            "docs/configuration.md documents `{dotted}` twice"
        );
    }
    keys
}

/// The dotted keys of a TOML document: the entries of an array of tables under the array's
/// name, every table under `quota.operations` as `quota.operations.<name>`, the free-form
/// `tracing.resource_attributes` map as one key.
fn toml_keys(text: &str, what: &str) -> BTreeSet<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (key, value) in table {
            let dotted = if prefix.is_empty() {
                key.clone()
            } else if prefix == "quota.operations" {
                "quota.operations.<name>".to_owned()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                // A free-form map: its entries are values, not keys of ours.
                toml::Value::Table(_) if dotted == "tracing.resource_attributes" => {
                    out.insert(dotted);
                }
                toml::Value::Table(t) => walk(&dotted, t, out),
                toml::Value::Array(items)
                    if !items.is_empty() && items.iter().all(toml::Value::is_table) =>
                {
                    for item in items {
                        if let toml::Value::Table(t) = item {
                            walk(&dotted, t, out);
                        }
                    }
                }
                _ => {
                    out.insert(dotted);
                }
            }
        }
    }
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{what} is not TOML: {e}"));
    let mut keys = BTreeSet::new();
    walk("", &table, &mut keys);
    keys
}

fn differences(
    a_name: &str,
    a: &BTreeSet<String>,
    b_name: &str,
    b: &BTreeSet<String>,
) -> Vec<String> {
    let list = |only: Vec<&String>| {
        only.iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    let a_only: Vec<&String> = a.difference(b).collect();
    if !a_only.is_empty() {
        out.push(format!("{a_name} but not {b_name}: {}", list(a_only)));
    }
    let b_only: Vec<&String> = b.difference(a).collect();
    if !b_only.is_empty() {
        out.push(format!("{b_name} but not {a_name}: {}", list(b_only)));
    }
    out
}

#[test]
fn configuration_md_documents_every_key_of_full_toml_and_the_typed_config() {
    let documented = documented_keys();
    let full_text = read("config/full.toml");
    let full = toml_keys(&full_text, "config/full.toml");

    // Loading refuses unknown keys, so every key of full.toml is one meetgate knows; what the
    // loaded config prints is the typed config's own keys.
    let files = ShippedFiles::new();
    let mut env = env();
    for (var, value) in ShippedFiles::ENV {
        env.insert(var.into(), value.into());
    }
    let config = meetgate::config::load_str(&files.substitute(&full_text), &env)
        .unwrap_or_else(|e| panic!("config/full.toml does not load: {e}"));
    let printed = toml_keys(&config.to_redacted_toml(), "check-config's output");

    let mut problems = differences(
        "documented in docs/configuration.md",
        &documented,
        "in config/full.toml",
        &full,
    );
    problems.extend(differences(
        "in the typed config",
        &printed,
        "documented",
        &documented,
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(documented.contains("listen") && documented.contains("upstream.connect_timeout"));
}
