//! The access log: exactly one line per request, with the upstream's correlation headers.

use std::io::Write;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use http::StatusCode;

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
    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = binary_config(&sim, dir.path(), "", "level = \"trace\"");
    let mut gateway = RunningBinary::run(&cfg, &[(KEY_ENV, APP_KEY)]);
    let addr = gateway.listening();
    let client = http_client();
    let ok = post_start(&client, &addr, Some("rid-log-1")).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let upstream_id = ok.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let req = http::Request::get(format!("http://{addr}/nowhere"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let missing = client.request(req).await.expect("answer");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    // An HTTP/2 client's request (a stream, served as a task of its own) gets its line too.
    let h2c = h2c_client();
    let over_h2 = post_start(&h2c, &addr, Some("rid-log-h2")).await;
    assert_eq!(over_h2.version(), http::Version::HTTP_2);
    assert_eq!(over_h2.status(), StatusCode::OK);
    // SIGTERM: the gateway drains and exits, flushing its log.
    gateway.signal("TERM");
    assert_eq!(
        gateway.exited(Duration::from_secs(15)).await.code(),
        Some(0)
    );
    let all = gateway.rest(Duration::from_millis(500)).to_vec();
    let lines: Vec<serde_json::Value> = all
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "meetgate::access")
        .collect();
    assert_eq!(lines.len(), 3, "{all:#?}");
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
    assert_eq!(lines[2]["request_id"], "rid-log-h2");
    assert_eq!(lines[2]["status"], 200);
    assert_eq!(
        lines[2]["upstream_request_id"],
        over_h2.headers()["x-request-id"].to_str().expect("ascii")
    );

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
