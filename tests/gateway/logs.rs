//! The access log: exactly one line per request, with the upstream's correlation headers.

use std::io::Write;
use std::sync::{Arc, Mutex};

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

impl Capture {
    fn access_lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "meetgate::access")
            .collect()
    }
}

// One thread, so the thread-local subscriber sees the gateway's and the simulator's tasks.
#[tokio::test(flavor = "current_thread")]
async fn one_json_line_per_request_with_upstream_ids() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    let ok = gw
        .request(
            Method::POST,
            START,
            &[("x-request-id", "rid-log-1")],
            br#"{"conferenceID":"1","password":"p"}"#,
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let missing = gw.request(Method::GET, "/nowhere", &[], b"").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    gw.stop().await;

    let lines = capture.access_lines();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let first = &lines[0];
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["operation"], "start_meeting");
    assert_eq!(first["status"], 200);
    assert_eq!(first["app"], "default");
    assert_eq!(first["request_id"], "rid-log-1");
    let upstream_id = ok.headers["x-request-id"].to_str().expect("ascii");
    assert_eq!(first["upstream_request_id"], upstream_id);
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
    let all = String::from_utf8(capture.0.lock().expect("lock").clone()).expect("utf-8");
    assert!(!all.contains(APP_KEY));
    for token in sim.issued_tokens() {
        assert!(!all.contains(&token), "a token reached the log");
    }
}
