//! The access log: exactly one line per request, with the upstream's correlation headers.

use std::io::Write;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use http::{Method, StatusCode};

use crate::support::*;

/// A `MakeWriter` that appends everything to a shared buffer.
#[derive(Clone, Default)]
pub(crate) struct Capture(pub(crate) Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// The real binary, JSON logs on stdout: every line it wrote until it exited.
#[tokio::test]
async fn one_json_line_per_request_with_upstream_ids() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, sim.ca_pem()).expect("ca");
    let cfg = dir.path().join("meetgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\nca_file = {:?}\n\
             [[apps]]\napp_id = \"{APP_ID}\"\napp_key_env = \"{KEY_ENV}\"\n[log]\nformat = \"json\"\nlevel = \"trace\"\n",
            sim.url(),
            ca.display().to_string()
        ),
    )
    .expect("config");
    let mut child = Command::new(crate::cli::BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env(KEY_ENV, APP_KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut all = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("log lines");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        all.push(line);
        if v["fields"]["message"] == "Listening" || v["message"] == "Listening" {
            break v["fields"]["addr"]
                .as_str()
                .or(v["addr"].as_str())
                .expect("addr")
                .to_owned();
        }
    };
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let send = |method: Method, path: &str, rid: Option<&str>| {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        if let Some(r) = rid {
            b = b.header("x-request-id", r);
        }
        let req = b
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"conferenceID":"1","password":"p"}"#,
            )))
            .expect("request");
        client.request(req)
    };
    let ok = send(Method::POST, START, Some("rid-log-1"))
        .await
        .expect("answer");
    assert_eq!(ok.status(), StatusCode::OK);
    let upstream_id = ok.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let missing = send(Method::GET, "/nowhere", None).await.expect("answer");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    // SIGTERM: the gateway drains and exits, flushing its log.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        all.push(line);
    }
    let lines: Vec<serde_json::Value> = all
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "meetgate::access")
        .collect();
    assert_eq!(lines.len(), 2, "{all:#?}");
    let first = &lines[0];
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["operation"], "start_meeting");
    assert_eq!(first["status"], 200);
    assert_eq!(first["app"], "default");
    assert_eq!(first["request_id"], "rid-log-1");
    assert_eq!(first["upstream_request_id"], upstream_id.as_str());
    for field in [
        "apig_latency",
        "apig_upstream_latency",
        "envoy_upstream_service_time",
    ] {
        assert!(
            first[field].as_str().is_some_and(|v| v != "-"),
            "{field}: {first}"
        );
    }
    assert!(first["total_ms"].as_f64().is_some());
    assert!(first["upstream_ms"].as_f64().is_some());
    assert_eq!(lines[1]["error_code"], "MEETGATE.UNKNOWN_OPERATION");

    // Nothing secret anywhere in the log, even at TRACE.
    let text = all.join("\n");
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "the run logged at TRACE"
    );
    assert!(!text.contains(APP_KEY));
    for token in sim.issued_tokens() {
        assert!(!text.contains(&token), "a token reached the log");
    }
}
