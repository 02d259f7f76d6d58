//! Unit and property tests of loading and validation.

use super::*;
use crate::operations::OperationTable;
use crate::quota::LimitKind;
use crate::secret::REDACTED;
use crate::telemetry::LogFormat;
use secrecy::ExposeSecret;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const MINIMAL: &str = r#"
    [[apps]]
    app_id = "app-1"
    app_key_env = "KEY1"
"#;

#[test]
fn defaults_and_env_key() {
    let c = load_str(MINIMAL, &env(&[("KEY1", "s3cret-key")])).expect("valid");
    assert_eq!(c.listen, "127.0.0.1:8080".parse().expect("addr"));
    assert_eq!(c.upstream.url.host(), Some("api.meeting.huaweicloud.com"));
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(3));
    assert_eq!(c.apps[0].name, "default");
    assert_eq!(c.apps[0].app_key.expose_secret(), "s3cret-key");
    assert_eq!(c.limits.replay_body_bytes, 1 << 20);
}

#[test]
fn env_overrides_file_values() {
    let c = load_str(
        MINIMAL,
        &env(&[
            ("KEY1", "k"),
            ("MEETGATE__UPSTREAM__URL", "https://127.0.0.1:8443"),
            ("MEETGATE__UPSTREAM__CONNECT_TIMEOUT", "250ms"),
            ("MEETGATE__LOG__FORMAT", "json"),
            ("MEETGATE__LIMITS__REPLAY_BODY_BYTES", "4096"),
        ]),
    )
    .expect("valid");
    assert_eq!(c.upstream.url.port_u16(), Some(8443));
    assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.limits.replay_body_bytes, 4096);
}

#[test]
fn unknown_keys_are_errors() {
    let e = load_str(
        &format!("{MINIMAL}\n[upstream]\nurll = \"x\"\n"),
        &env(&[("KEY1", "k")]),
    )
    .expect_err("unknown key");
    assert!(e.to_string().contains("urll"), "{e}");
    let e = load_str(&format!("lisen = \"x\"\n{MINIMAL}"), &env(&[("KEY1", "k")]))
        .expect_err("unknown key");
    assert!(e.to_string().contains("lisen"), "{e}");
}

#[test]
fn every_problem_names_its_key_and_value() {
    let text = r#"
        listen = "localhost"
        [upstream]
        url = "http://plain.example"
        connect_timeout = "soon"
        [log]
        format = "xml"
        [[apps]]
        app_id = "a"
        app_key_env = "MISSING"
    "#;
    let e = load_str(text, &env(&[])).expect_err("invalid");
    let problems = e.problems();
    let has = |k: &str, v: &str| {
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{k} = {v}")))
    };
    assert!(has("listen", "\"localhost\""), "{problems:?}");
    assert!(
        has("upstream.url", "\"http://plain.example\""),
        "{problems:?}"
    );
    assert!(has("upstream.connect_timeout", "\"soon\""), "{problems:?}");
    assert!(has("log.format", "\"xml\""), "{problems:?}");
    assert!(has("apps[0].app_key_env", "\"MISSING\""), "{problems:?}");
    assert_eq!(problems.len(), 5, "{problems:?}");
}

#[test]
fn key_file_trailing_newline_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key");
    std::fs::write(&path, "file-key\n").expect("write");
    let text = format!(
        "[[apps]]\napp_id = \"a\"\napp_key_file = \"{}\"\n",
        path.display()
    );
    let c = load_str(&text, &env(&[])).expect("valid");
    assert_eq!(c.apps[0].app_key.expose_secret(), "file-key");
}

#[test]
fn secrets_are_redacted_in_debug_and_print() {
    let text = "[[apps]]\napp_id = \"a\"\napp_key = \"inline-secret-123\"\n";
    let c = load_str(text, &env(&[])).expect("valid");
    assert_eq!(c.warnings.len(), 1);
    assert!(!format!("{c:?}").contains("inline-secret-123"));
    let printed = c.to_redacted_toml();
    assert!(!printed.contains("inline-secret-123"));
    assert!(printed.contains(REDACTED), "{printed}");
    // What is printed loads again (the key then comes from elsewhere).
    assert!(printed.contains("app_id = \"a\""));
}

#[test]
fn quota_settings_are_validated_with_their_keys() {
    let text = format!(
        "{MINIMAL}\n[quota]\nalgorithm = \"gcra\"\nburst = 150\nmode = \"sometimes\"\n[quota.operations.start_meeting]\nper_api_per_minute = 0\n[quota.operations.no_such_op]\nburst = 1\n"
    );
    let problems = load_str(&text, &env(&[("KEY1", "k")]))
        .expect_err("invalid")
        .problems();
    let has = |prefix: &str| problems.iter().any(|p| p.starts_with(prefix));
    assert!(has("quota.burst = 150"), "{problems:?}");
    assert!(has("quota.mode = \"sometimes\""), "{problems:?}");
    assert!(
        has("quota.operations.start_meeting.per_api_per_minute = 0"),
        "{problems:?}"
    );
    assert!(has("quota.operations.no_such_op"), "{problems:?}");
    // The default burst problem is reported once, not for every operation.
    assert_eq!(
        problems
            .iter()
            .filter(|p| p.starts_with("quota.burst"))
            .count(),
        1
    );
}

#[test]
fn the_exact_limiter_is_the_default_and_takes_any_burst() {
    let c = load_str(MINIMAL, &env(&[("KEY1", "k")])).expect("valid");
    assert_eq!(c.quota.algorithm, crate::quota::QuotaAlgorithm::Exact);
    assert_eq!(c.quota.burst, None);
    assert!(c.to_redacted_toml().contains("algorithm = \"exact\""));
    // A burst at or above N is no cap under the exact limiter, not an error.
    let text = format!("{MINIMAL}\n[quota]\nburst = 150\n");
    let c = load_str(&text, &env(&[("KEY1", "k")])).expect("valid");
    assert_eq!(c.quota.burst.map(|b| b.get()), Some(150));
    let text = format!("{MINIMAL}\n[quota]\nalgorithm = \"fast\"\n");
    let problems = load_str(&text, &env(&[("KEY1", "k")]))
        .expect_err("invalid")
        .problems();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("quota.algorithm = \"fast\"")),
        "{problems:?}"
    );
}

#[test]
fn quota_overrides_apply_to_their_operation_only() {
    let text = format!("{MINIMAL}\n[quota.operations.start_meeting]\nper_api_per_minute = 50\n");
    let c = load_str(&text, &env(&[("KEY1", "k")])).expect("valid");
    let table = OperationTable::global();
    let start = table.by_name("start_meeting").expect("op");
    let other = table.by_name("stop_meeting").expect("op");
    let limit = |op| {
        c.quota
            .limits_for(op)
            .iter()
            .find(|(s, _)| s.kind == LimitKind::PerApi)
            .map(|(s, _)| s.limit.get())
    };
    assert_eq!(limit(start), Some(50));
    assert_eq!(limit(other), Some(100));
    // Short window first.
    assert_eq!(c.quota.limits_for(start)[0].0.kind, LimitKind::AllEnv);
    assert!(c
        .to_redacted_toml()
        .contains("[quota.operations.start_meeting]"));
}

#[test]
fn the_printed_config_loads_again_and_shows_every_section_without_secrets() {
    let text = r#"
        [[apps]]
        app_id = "a"
        app_key_env = "K"
        [[clients]]
        name = "c1"
        key_sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
        users = ["alice*"]
        [[clients]]
        name = "c2"
        app_id = "sdk-app"
        app_key_env = "CK"
        [cluster]
        redis_url = "redis://user:hunter2@127.0.0.1:6379/0"
    "#;
    let env = env(&[("K", "app-secret"), ("CK", "client-secret")]);
    let c = load_str(text, &env).expect("valid");
    let printed = c.to_redacted_toml();
    for secret in [
        "app-secret",
        "client-secret",
        "hunter2",
        "0000000000000000000000000000000000000000000000000000000000000001",
    ] {
        assert!(!printed.contains(secret), "{printed}");
    }
    for section in [
        "[[clients]]",
        "[cluster]",
        "[sdk]",
        "[quota]",
        "[limits]",
        "[token]",
    ] {
        assert!(printed.contains(section), "{section} in {printed}");
    }
    assert!(printed.contains("redis://[redacted]@127.0.0.1:6379/0"));
}

#[test]
fn zero_durations_and_duplicate_names_are_refused() {
    let text = r#"
        [upstream]
        request_timeout = "0s"
        [[apps]]
        name = "x"
        app_id = "a"
        app_key = "k"
        [[apps]]
        name = "x"
        app_id = "b"
        app_key = "k"
    "#;
    let problems = load_str(text, &env(&[])).expect_err("invalid").problems();
    assert!(problems
        .iter()
        .any(|p| p.starts_with("upstream.request_timeout")));
    assert!(problems
        .iter()
        .any(|p| p.starts_with("apps[1].name = \"x\": duplicate")));
}

#[test]
fn workers_default_to_the_cpus_and_zero_is_refused() {
    let c = load_str(MINIMAL, &env(&[("KEY1", "k")])).expect("valid");
    assert_eq!(
        c.workers,
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    );
    let c = load_str(&format!("workers = 3\n{MINIMAL}"), &env(&[("KEY1", "k")])).expect("valid");
    assert_eq!(c.workers, 3);
    assert!(c.to_redacted_toml().contains("workers = 3"));
    let problems = load_str(&format!("workers = 0\n{MINIMAL}"), &env(&[("KEY1", "k")]))
        .expect_err("invalid")
        .problems();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("workers = 0: must be at least 1")),
        "{problems:?}"
    );
}

#[test]
fn http1_for_a_single_client_is_on_by_default_and_can_be_turned_off() {
    let c = load_str(MINIMAL, &env(&[("KEY1", "k")])).expect("valid");
    assert!(c.upstream.http2 && c.upstream.http1_for_single_client);
    let text = format!("[upstream]\nhttp1_for_single_client = false\n{MINIMAL}");
    let c = load_str(&text, &env(&[("KEY1", "k")])).expect("valid");
    assert!(!c.upstream.http1_for_single_client);
    assert!(c
        .to_redacted_toml()
        .contains("http1_for_single_client = false"));
    let text = format!("[upstream]\nhttp1_for_single_client = \"sometimes\"\n{MINIMAL}");
    let problems = load_str(&text, &env(&[("KEY1", "k")]))
        .expect_err("invalid")
        .problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("http1_for_single_client")),
        "{problems:?}"
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_text_loads_or_errors_without_panicking(text in ".{0,400}") {
            let _ = load_str(&text, &HashMap::new());
        }

        #[test]
        fn bad_values_are_reported_with_their_key(
            key in prop::sample::select(vec![
                "connect_timeout", "tls_timeout", "request_timeout", "body_timeout", "pool_idle_timeout",
            ]),
            value in "[a-z]{1,8}",
        ) {
            let text = format!("[upstream]\n{key} = \"{value}\"\n[[apps]]\napp_id = \"a\"\napp_key = \"k\"\n");
            let problems = load_str(&text, &HashMap::new()).expect_err("invalid").problems();
            let expected = format!("upstream.{key} = \"{value}\"");
            prop_assert!(problems.iter().any(|p| p.starts_with(&expected)), "{:?}", problems);
        }

        #[test]
        fn unknown_keys_are_named(name in "[a-z]{3,12}_x") {
            let text = format!("{name} = 1\n[[apps]]\napp_id = \"a\"\napp_key = \"k\"\n");
            let err = load_str(&text, &HashMap::new()).expect_err("unknown key");
            prop_assert!(err.to_string().contains(&name), "{}", err);
        }
    }
}

#[test]
fn durations_over_a_year_are_refused_with_their_key() {
    let text = format!("{MINIMAL}\n[quota]\nmax_wait = \"500years\"\n");
    let problems = load_str(&text, &env(&[("KEY1", "k")]))
        .expect_err("invalid")
        .problems();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("quota.max_wait") && p.contains("at most a year")),
        "{problems:?}"
    );
}

#[test]
fn a_cluster_lease_is_50ms_by_default_may_be_off_and_is_refused_above_500ms() {
    let lease = |line: &str| {
        let text =
            format!("{MINIMAL}\n[cluster]\nredis_url = \"redis://127.0.0.1:6379/0\"\n{line}\n");
        load_str(&text, &env(&[("KEY1", "k")]))
    };
    let of = |c: Config| c.cluster.expect("cluster").lease;
    assert_eq!(of(lease("").expect("valid")), Duration::from_millis(50));
    assert_eq!(of(lease("lease = \"0s\"").expect("valid")), Duration::ZERO);
    assert_eq!(
        of(lease("lease = \"500ms\"").expect("valid")),
        Duration::from_millis(500)
    );
    for (bad, why) in [
        ("\"501ms\"", "at most 500ms"),
        ("\"2years\"", "at most 500ms"),
        ("\"soon\"", "not a duration"),
    ] {
        let problems = lease(&format!("lease = {bad}"))
            .expect_err("invalid")
            .problems();
        assert_eq!(problems.len(), 1, "one problem for {bad}: {problems:?}");
        assert!(
            problems[0].starts_with("cluster.lease")
                && problems[0].contains(bad)
                && problems[0].contains(why),
            "{bad}: {problems:?}"
        );
    }
}
