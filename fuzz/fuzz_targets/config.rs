//! The config loader: TOML text and environment overrides. Invariants: any input gives a
//! `Config` or a `ConfigError`, never a panic; a loaded config prints (`check-config`) as TOML
//! that parses, and never prints a secret (the values of the key variables it reads).
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

/// Secret values the key variables hold: they must never be printed.
const SECRETS: [(&str, &str); 2] = [
    ("KEY1", "SECRET-app-key-5f0c1e9a"),
    ("KEY2", "SECRET-client-key-77d2b0"),
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Lines of the form `MEETGATE__...=value` after a `#ENV` line are environment overrides;
    // the rest is the file.
    let (file, env_part) = text.split_once("\n#ENV\n").unwrap_or((&text, ""));
    let mut env: HashMap<String, String> = SECRETS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for line in env_part.lines() {
        if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("MEETGATE__") && !v.contains("SECRET-") {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    let Ok(config) = meetgate::config::load_str(file, &env) else {
        return;
    };
    let printed = config.to_redacted_toml();
    assert!(
        printed.parse::<toml::Table>().is_ok(),
        "check-config printed what TOML cannot parse:\n{printed}"
    );
    let debug = format!("{config:?}");
    for (_, secret) in SECRETS {
        assert!(!printed.contains(secret), "a key was printed:\n{printed}");
        assert!(!debug.contains(secret), "a key reached Debug");
    }
});
