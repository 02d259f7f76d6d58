//! The binary as a user runs it: `check-config`, `run --config`, `demo`, and the shipped configs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use http::StatusCode;

use crate::support::*;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_meetgate");

/// Kills the child process when dropped, so a failing test leaves nothing behind.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's stdout on a thread until a line contains `marker`; returns lines so far.
pub(crate) fn wait_for_line(child: &mut Child, marker: &'static str) -> Vec<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.contains(marker);
            lines.push(line);
            if done {
                let _ = tx.send(lines.clone());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no line with {marker:?} within the deadline"))
}

#[test]
fn check_config_prints_redacted_config_or_names_the_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[apps]]\napp_id = \"a\"\napp_key_env = \"CHECK_KEY\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .env("CHECK_KEY", "super-secret-app-key")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("app_key = \"[redacted]\""), "{stdout}");
    assert!(stdout.contains("app_key_env = \"CHECK_KEY\""));
    assert!(!stdout.contains("super-secret-app-key"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[upstream]\nrequest_timeout = \"forever\"\n[[apps]]\napp_id = \"a\"\napp_key_env = \"CHECK_KEY\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .env("CHECK_KEY", "k")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upstream.request_timeout = \"forever\""),
        "{stderr}"
    );

    // Environment overrides go through the same validation.
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .env("CHECK_KEY", "k")
        .env("MEETGATE__UPSTREAM__URL", "ftp://nope")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.url = \"ftp://nope\""));
}

/// The files the shipped configs in `config/` name (key files, `ca_file`, the `[tls]`
/// certificate and key), written to temporary files: `substitute` points a config at them,
/// `placeholders` prints their paths as `<KEY_FILE>`, `<TLS_CERT>`, ... again.
pub(crate) struct ShippedFiles {
    _dir: tempfile::TempDir,
    /// (path in the shipped config, temporary file, placeholder)
    files: Vec<(&'static str, std::path::PathBuf, &'static str)>,
}

impl ShippedFiles {
    pub(crate) fn new() -> ShippedFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = time::OffsetDateTime::now_utc();
        let cert = meetgate::simulator::tls::generate_cert(
            &["meetgate".to_owned()],
            now - time::Duration::days(1),
            now + time::Duration::days(30),
        )
        .expect("cert");
        let contents: [(&'static str, &str, String, &'static str); 5] = [
            (
                "/run/secrets/meetgate/app_key",
                "app_key",
                "file-key\n".to_owned(),
                "<KEY_FILE>",
            ),
            (
                "/run/secrets/meetgate-clients/sdk-batch",
                "client_key",
                "file-client-key\n".to_owned(),
                "<CLIENT_KEY_FILE>",
            ),
            (
                "/etc/meetgate/extra-roots.pem",
                "ca.pem",
                cert.ca_pem.clone(),
                "<CA_FILE>",
            ),
            (
                "/etc/meetgate/tls.pem",
                "tls.pem",
                cert.cert_pem.clone(),
                "<TLS_CERT>",
            ),
            (
                "/etc/meetgate/tls.key",
                "tls.key",
                cert.key_pem.clone(),
                "<TLS_KEY>",
            ),
        ];
        let files = contents
            .into_iter()
            .map(|(shipped, name, content, placeholder)| {
                let file = dir.path().join(name);
                std::fs::write(&file, content).expect("write");
                (shipped, file, placeholder)
            })
            .collect();
        ShippedFiles { _dir: dir, files }
    }

    /// `text` with every file path of the shipped configs replaced by its temporary file.
    pub(crate) fn substitute(&self, text: &str) -> String {
        self.files
            .iter()
            .fold(text.to_owned(), |text, (shipped, file, _)| {
                text.replace(shipped, &file.display().to_string())
            })
    }

    /// `text` with every temporary file's path replaced by its placeholder.
    pub(crate) fn placeholders(&self, text: &str) -> String {
        self.files
            .iter()
            .fold(text.to_owned(), |text, (_, file, placeholder)| {
                text.replace(&file.display().to_string(), placeholder)
            })
    }

    /// The environment variables the shipped configs read keys from.
    pub(crate) const ENV: [(&'static str, &'static str); 2] = [
        ("MEETGATE_APP_KEY", "example-key"),
        ("MEETGATE_CLIENT_SDK_TEAM_KEY", "example-client-key"),
    ];
}

#[test]
fn every_shipped_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let files = ShippedFiles::new();
    let mut env = env();
    for (var, value) in ShippedFiles::ENV {
        env.insert(var.into(), value.into());
    }
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // Files named in the examples are replaced by temporary ones.
        let text = files.substitute(&std::fs::read_to_string(&path).expect("read"));
        meetgate::config::load_str(&text, &env)
            .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
        loaded += 1;
    }
    assert!(loaded >= 3, "config/ holds the example configs");
}

#[tokio::test]
async fn run_subcommand_serves_with_a_config_file() {
    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = binary_config(&sim, dir.path(), "workers = 3", "");
    let mut gateway = RunningBinary::run(&cfg, &[(KEY_ENV, APP_KEY)]);
    let addr = gateway.listening();
    // Connections are dealt to the workers in turn: each of these lands on a worker, and
    // every worker serves (and opens its own upstream connections).
    let mut clients = Vec::new();
    for _ in 0..5 {
        let client = http_client();
        let resp = post_start(&client, &addr, None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        clients.push(client);
    }
    for client in &clients {
        assert_eq!(
            post_start(client, &addr, None).await.status(),
            StatusCode::OK
        );
    }
    let pid = gateway.child.id();
    let workers = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("mg-worker-"))
        .count();
    assert_eq!(workers, 3, "`workers = 3` runs three worker threads");
}

#[tokio::test]
async fn demo_prints_curl_lines_that_work_with_no_credential() {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let lines = wait_for_line(&mut child, "isLock");
    let _guard = Running(child);
    // Each printed command: its method, its URL (quoted or not) and its -d body.
    let mut commands = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim().strip_prefix("curl -s -X ") else {
            continue;
        };
        let method = rest.split_whitespace().next().expect("method").to_owned();
        let url = rest
            .split_whitespace()
            .nth(1)
            .expect("url")
            .trim_matches('\'')
            .to_owned();
        let body = lines[i..]
            .iter()
            .find_map(|l| l.trim().strip_prefix("-d '"))
            .and_then(|b| b.strip_suffix('\''))
            .expect("the -d body")
            .to_owned();
        assert!(
            !lines[i..]
                .iter()
                .take(3)
                .any(|l| l.contains("Authorization")
                    || l.contains("X-Access-Token")
                    || l.contains("X-Conference-Authorization")
                    || l.contains("X-Password")),
            "no credential in the demo's commands"
        );
        commands.push((method, url, body));
    }
    assert_eq!(commands.len(), 2, "{lines:?}");
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut answers = Vec::new();
    for (method, url, body) in commands {
        let req = http::Request::builder()
            .method(method.as_str())
            .uri(url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request");
        let resp = client.request(req).await.expect("answer");
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        answers.push(serde_json::from_slice::<serde_json::Value>(&body).expect("json"));
    }
    assert!(
        answers[0]["uuid"].is_string() && answers[0]["regionIP"].is_string(),
        "{}",
        answers[0]
    );
    assert_eq!(answers[1]["operation"], "lock_meeting", "{}", answers[1]);
}

/// `check-config` prints exactly what `tests/gateway/golden/<name>.out` holds for every file in
/// `config/` (the files it names replaced by temporary ones, printed as `<KEY_FILE>`,
/// `<TLS_CERT>`, ...; `workers` set so the output does not depend on the machine).
/// `MEETGATE_BLESS=1` rewrites the expectations.
#[test]
fn check_config_output_for_every_shipped_config_is_unchanged() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gateway/golden");
    let files = ShippedFiles::new();
    let copies = tempfile::tempdir().expect("tempdir");
    let bless = std::env::var_os("MEETGATE_BLESS").is_some();
    let mut compared = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = files.substitute(&std::fs::read_to_string(&path).expect("read"));
        let copy = copies.path().join(path.file_name().expect("name"));
        std::fs::write(&copy, text).expect("write");
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&copy)
            .envs(ShippedFiles::ENV)
            .env("MEETGATE__WORKERS", "2")
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = files.placeholders(&String::from_utf8_lossy(&out.stdout));
        let expected_path = golden.join(format!(
            "{}.out",
            path.file_stem().and_then(|s| s.to_str()).expect("stem")
        ));
        if bless {
            std::fs::create_dir_all(&golden).expect("mkdir");
            std::fs::write(&expected_path, &printed).expect("bless");
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        assert_eq!(printed, expected, "check-config of {}", path.display());
        compared += 1;
    }
    assert!(compared >= 3);
}
