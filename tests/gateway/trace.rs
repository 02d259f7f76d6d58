//! OpenTelemetry traces from the real binary to a real OTLP/HTTP receiver of the test's own,
//! decoded with the OpenTelemetry protobuf definitions: the tree of each request, the client's
//! trace context kept and sent upstream, no secret in any span, and a dead collector that costs
//! the requests nothing and is logged once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::support::*;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const HOST_PASSWORD: &str = "hostpw-Qx7v2Zr";

/// What an OTLP/HTTP collector received: every export request, decoded.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

impl Receiver {
    async fn start() -> (Receiver, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let receiver = Receiver::default();
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let r = r.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await?.to_bytes();
                            let decoded = ExportTraceServiceRequest::decode(body)
                                .expect("an OTLP protobuf export request");
                            r.got.lock().expect("lock").push(decoded);
                            Ok::<_, hyper::Error>(
                                Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::new()))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (receiver, addr)
    }

    /// Every span received, with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let mut out = Vec::new();
        for req in self.got.lock().expect("lock").iter() {
            for rs in &req.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((resource.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }

    fn debug_dump(&self) -> String {
        format!("{:?}", self.got.lock().expect("lock"))
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        }
    })
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::IntValue(i)) => Some(*i),
            _ => None,
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A config for the binary with `[tracing]` pointing at `endpoint`; its admin address.
fn traced_config(
    sim: &meetgate::simulator::SimHandle,
    dir: &std::path::Path,
    endpoint: &str,
) -> (std::path::PathBuf, String) {
    std::fs::write(dir.join("ca.pem"), sim.ca_pem()).expect("ca");
    let admin = format!("127.0.0.1:{}", free_port());
    let cfg = dir.join("meetgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"{admin}\"\n[upstream]\nurl = \"{}\"\nca_file = {:?}\n\
             [quota]\nper_api_per_minute = 1000000\nall_env_per_second = 1000000\n\
             [[apps]]\napp_id = \"{APP_ID}\"\napp_key_env = \"{KEY_ENV}\"\n[log]\nformat = \"json\"\n\
             [tracing]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"meetgate-test\"\n\
             export_interval = \"100ms\"\nexport_timeout = \"500ms\"\n\
             resource_attributes = {{ \"deployment.environment\" = \"test\" }}\n",
            sim.url(),
            dir.join("ca.pem").display().to_string()
        ),
    )
    .expect("config");
    (cfg, admin)
}

async fn start_with(
    client: &HttpClient,
    addr: &str,
    headers: &[(&str, &str)],
) -> http::Response<Incoming> {
    let mut b = Request::post(format!("http://{addr}{START}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from_static(
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )))
        .expect("request");
    client.request(req).await.expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_as_one_tree_per_request() {
    // A meeting whose host password and control tokens must not reach the collector.
    let mut meetings = meetgate::simulator::SimConfig::default().meetings;
    meetings.push(meetgate::simulator::SimMeeting {
        conference_id: "517300042".to_owned(),
        chair_password: HOST_PASSWORD.to_owned(),
        guest_password: "guest-Lm4".to_owned(),
        allow_guest_start: false,
        subject: "traced".to_owned(),
    });
    let sim = start_sim(meetgate::simulator::SimConfig {
        apps: vec![sim_app()],
        limits: meetgate::simulator::SimLimits::unlimited(),
        meetings,
        ..Default::default()
    })
    .await;
    let (receiver, raddr) = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, _) = traced_config(&sim, dir.path(), &format!("http://{raddr}"));
    let mut gateway = RunningBinary::run(&cfg, &[(KEY_ENV, APP_KEY)]);
    let addr = gateway.listening();
    let client = http_client();

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let r = start_with(
        &client,
        &addr,
        &[
            ("traceparent", &traceparent),
            ("tracestate", "vendor=1"),
            ("x-request-id", "traced-1"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = start_with(&client, &addr, &[("x-request-id", "traced-2")]).await;
    assert_eq!(r.status(), StatusCode::OK);

    // A meeting started through meetgate, then controlled with no credential: meetgate
    // obtains the control token with the host password it kept.
    let body = format!(r#"{{"conferenceID":"517300042","password":"{HOST_PASSWORD}"}}"#);
    let req = Request::post(format!("http://{addr}{START}"))
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    assert_eq!(
        client.request(req).await.expect("answer").status(),
        StatusCode::OK
    );
    let req = Request::put(format!(
        "http://{addr}/v1/mmc/control/conferences/lock?conferenceID=517300042"
    ))
    .body(Full::new(Bytes::from_static(br#"{"isLock":1}"#)))
    .expect("request");
    assert_eq!(
        client.request(req).await.expect("answer").status(),
        StatusCode::OK
    );
    let control_tokens: Vec<String> = received(&sim, "/v1/mmc/control/conferences/lock")
        .iter()
        .filter_map(|r| r.header("x-conference-authorization").map(str::to_owned))
        .collect();
    assert_eq!(control_tokens.len(), 1, "meetgate injected a control token");

    // The access lines carry the trace ids.
    let first = gateway.next("\"traced-1\"");
    assert_eq!(first["trace_id"], CLIENT_TRACE);
    let second = gateway.next("\"traced-2\"");
    let new_trace = second["trace_id"].as_str().expect("trace_id").to_owned();
    assert_eq!(new_trace.len(), 32, "{second}");
    assert_ne!(new_trace, CLIENT_TRACE);

    // The upstream got our upstream span as the parent, in the client's trace.
    let upstream = received(&sim, START);
    let sent = upstream
        .iter()
        .find(|r| r.header("x-request-id") == Some("traced-1"))
        .expect("traced-1 upstream");
    let sent_parent = sent
        .header("traceparent")
        .expect("traceparent sent upstream");
    assert!(
        sent_parent.starts_with(&format!("00-{CLIENT_TRACE}-")) && sent_parent.ends_with("-01"),
        "{sent_parent}"
    );
    assert!(
        !sent_parent.contains(CLIENT_SPAN),
        "a span of ours is the parent"
    );
    assert_eq!(sent.header("tracestate"), Some("vendor=1"));

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut spans = Vec::new();
    eventually(Duration::from_secs(20), "both traces exported", || {
        spans = receiver.spans();
        let traces: Vec<String> = spans.iter().map(|(_, s)| hex(&s.trace_id)).collect();
        let both = [CLIENT_TRACE, new_trace.as_str()].iter().all(|t| {
            ["request", "upstream", "quota wait", "token wait"]
                .iter()
                .all(|name| {
                    spans
                        .iter()
                        .zip(&traces)
                        .any(|((_, s), tr)| tr == t && s.name == *name)
                })
        });
        std::future::ready(both)
    })
    .await;

    for trace in [CLIENT_TRACE, new_trace.as_str()] {
        let in_trace: Vec<&Span> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| hex(&s.trace_id) == trace)
            .collect();
        let roots: Vec<&&Span> = in_trace.iter().filter(|s| s.name == "request").collect();
        assert_eq!(roots.len(), 1, "one request span per request");
        let root = roots[0];
        if trace == CLIENT_TRACE {
            assert_eq!(
                hex(&root.parent_span_id),
                CLIENT_SPAN,
                "the client's span is the parent"
            );
        } else {
            assert!(
                root.parent_span_id.is_empty(),
                "a new trace starts at meetgate"
            );
        }
        assert_eq!(
            int_attr(&root.attributes, "http.response.status_code"),
            Some(200)
        );
        assert_eq!(
            attr(&root.attributes, "meetgate.operation"),
            Some("start_meeting")
        );
        let events: Vec<&str> = root.events.iter().map(|e| e.name.as_str()).collect();
        assert!(
            events.contains(&"classified") && events.contains(&"access granted"),
            "{events:?}"
        );
        for phase in ["token wait", "quota wait", "upstream"] {
            let child = in_trace
                .iter()
                .find(|s| s.name == phase)
                .unwrap_or_else(|| panic!("{phase} in {trace}"));
            assert_eq!(
                child.parent_span_id, root.span_id,
                "{phase} is the request's child"
            );
        }
        let up = in_trace
            .iter()
            .find(|s| s.name == "upstream")
            .expect("upstream");
        assert_eq!(
            int_attr(&up.attributes, "http.response.status_code"),
            Some(200)
        );
        let line = if trace == CLIENT_TRACE {
            &first
        } else {
            &second
        };
        assert_eq!(
            attr(&up.attributes, "upstream.request_id"),
            line["upstream_request_id"].as_str(),
            "the upstream's X-Request-Id on the upstream span"
        );
        if trace == CLIENT_TRACE {
            assert!(
                sent_parent.contains(&hex(&up.span_id)),
                "upstream saw our upstream span"
            );
        }
    }
    assert!(
        spans.iter().any(|(_, s)| s.name == "sign-in"),
        "the sign-in is a span too"
    );
    let (resource, _) = &spans[0];
    assert_eq!(attr(resource, "service.name"), Some("meetgate-test"));
    assert_eq!(attr(resource, "deployment.environment"), Some("test"));

    // No secret anywhere in what was exported.
    // Wait for the control calls' spans too, then look at everything.
    eventually(Duration::from_secs(20), "the lock's span exported", || {
        std::future::ready(receiver.spans().iter().any(|(_, s)| {
            attr(&s.attributes, "meetgate.operation").is_some_and(|o| o.contains("lock"))
        }))
    })
    .await;
    let dump = receiver.debug_dump();
    let mut secrets = vec![APP_KEY.to_owned(), HOST_PASSWORD.to_owned()];
    secrets.extend(control_tokens);
    secrets.extend(sim.issued_tokens());
    for s in &secrets {
        assert!(!dump.contains(s.as_str()), "a secret reached the collector");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_requests_nothing_and_is_logged_once() {
    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens there.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (cfg, admin) = traced_config(&sim, dir.path(), &dead);
    let mut gateway = RunningBinary::run(&cfg, &[(KEY_ENV, APP_KEY)]);
    let addr = gateway.listening();
    let client = http_client();
    let failed_batches = || {
        let client = client.clone();
        let admin = admin.clone();
        async move {
            let r = client
                .get(format!("http://{admin}/metrics").parse().expect("uri"))
                .await
                .expect("metrics");
            let text = String::from_utf8(
                r.into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes()
                    .to_vec(),
            )
            .expect("utf-8");
            text.lines()
                .find(|l| l.starts_with("meetgate_trace_export_batches_total{result=\"error\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    let statuses: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    // Requests go on while batch after batch fails.
    eventually(Duration::from_secs(30), "three failed exports", || {
        let client = client.clone();
        let addr = addr.clone();
        let failed = failed_batches();
        let statuses = statuses.clone();
        async move {
            let r = start_with(&client, &addr, &[]).await;
            *statuses
                .lock()
                .expect("lock")
                .entry(r.status().as_u16())
                .or_default() += 1;
            failed.await >= 3.0
        }
    })
    .await;
    let statuses = statuses.lock().expect("lock").clone();
    assert_eq!(statuses.keys().collect::<Vec<_>>(), [&200], "{statuses:?}");
    let lines = gateway.rest(Duration::from_millis(300));
    let said: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("trace export failing"))
        .collect();
    assert_eq!(said.len(), 1, "logged once, not per batch: {said:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_sampled_at_the_head_by_the_clients_flag_or_the_ratio() {
    let sim = start_sim(meetgate::simulator::SimConfig {
        apps: vec![sim_app()],
        limits: meetgate::simulator::SimLimits::unlimited(),
        ..Default::default()
    })
    .await;
    let (receiver, raddr) = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, _) = traced_config(&sim, dir.path(), &format!("http://{raddr}"));
    // No new trace is kept; a client's sampled flag still is followed.
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str("sample_ratio = 0.0\n");
    std::fs::write(&cfg, text).expect("config");
    let mut gateway = RunningBinary::run(&cfg, &[(KEY_ENV, APP_KEY)]);
    let addr = gateway.listening();
    let client = http_client();

    const UNSAMPLED: &str = "0af7651916cd43dd8448eb211c80319c";
    const SAMPLED: &str = "a3ce929d0e0e47364bf92f3577b34da6";
    let unsampled = format!("00-{UNSAMPLED}-{CLIENT_SPAN}-00");
    let sampled = format!("00-{SAMPLED}-{CLIENT_SPAN}-01");
    for (id, headers) in [
        ("root", vec![]),
        (
            "unsampled",
            vec![
                ("traceparent", unsampled.as_str()),
                ("tracestate", "vendor=2"),
            ],
        ),
        ("sampled", vec![("traceparent", sampled.as_str())]),
    ] {
        let mut headers = headers;
        headers.push(("x-request-id", id));
        assert_eq!(
            start_with(&client, &addr, &headers).await.status(),
            StatusCode::OK
        );
    }

    // The sampled client's request is exported as a tree (request, phases, upstream); the
    // batch that brings it brings whatever ended before it too.
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut spans = Vec::new();
    eventually(
        Duration::from_secs(20),
        "the sampled trace exported",
        || {
            spans = receiver.spans();
            let names: Vec<&str> = spans
                .iter()
                .filter(|(_, s)| hex(&s.trace_id) == SAMPLED)
                .map(|(_, s)| s.name.as_str())
                .collect();
            let done = ["request", "token wait", "quota wait", "upstream"]
                .iter()
                .all(|n| names.contains(n));
            async move { done }
        },
    )
    .await;
    // Nothing else: no span of the unsampled requests, none of their phases as roots of
    // traces of their own, and no sign-in at ratio 0.
    assert!(
        spans.iter().all(|(_, s)| hex(&s.trace_id) == SAMPLED),
        "{}",
        receiver.debug_dump()
    );

    // Upstream: the unsampled client's trace context as it sent it; none for the root that was
    // not sampled; a span of ours as the parent in the sampled client's trace.
    let upstream = received(&sim, START);
    let sent = |id: &str| {
        upstream
            .iter()
            .find(|r| r.header("x-request-id") == Some(id))
            .unwrap_or_else(|| panic!("{id} upstream"))
            .clone()
    };
    assert_eq!(
        sent("unsampled").header("traceparent"),
        Some(unsampled.as_str())
    );
    assert_eq!(sent("unsampled").header("tracestate"), Some("vendor=2"));
    assert_eq!(sent("root").header("traceparent"), None);
    let parent = sent("sampled")
        .header("traceparent")
        .expect("traceparent")
        .to_owned();
    assert!(
        parent.starts_with(&format!("00-{SAMPLED}-")) && !parent.contains(CLIENT_SPAN),
        "{parent}"
    );

    // The access lines: the client's trace id whether sampled or not.
    assert_eq!(gateway.next("\"root\"")["trace_id"], "-");
    assert_eq!(gateway.next("\"unsampled\"")["trace_id"], UNSAMPLED);
    assert_eq!(gateway.next("\"sampled\"")["trace_id"], SAMPLED);
}
