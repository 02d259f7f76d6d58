//! Alert rules, the dashboard and a real Prometheus scraping a running gateway: every metric name
//! a rule or panel uses is one the gateway exports.
//!
//! `promtool` runs the rules' unit tests (`deploy/prometheus/meetgate-rules.test.yaml`); the
//! gateway runs against the simulator with traffic that makes every metric family appear (a
//! family with no series yet is not in `/metrics` at all); a real `prometheus` (Debian's
//! package, `.ci/run` installs it) scrapes it on loopback and loads the rules. Without
//! `promtool` or `prometheus` on `PATH` those two tests print one line and pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use meetgate::simulator::Fault;
use serde_yaml_ng::Value as Yaml;
use sha2::{Digest, Sha256};

use crate::support::*;

const RULES: &str = "deploy/prometheus/meetgate-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/meetgate-rules.test.yaml";
const DASHBOARD: &str = "deploy/grafana/meetgate.json";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn yaml(path: &str) -> Yaml {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is YAML: {e}"))
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD} is JSON: {e}"))
}

/// Every alerting rule of the rules file: (group, rule).
fn alert_rules(rules: &Yaml) -> Vec<(String, &Yaml)> {
    let groups = rules["groups"].as_sequence().expect("groups");
    let mut out = Vec::new();
    for g in groups {
        let name = g["name"].as_str().expect("group name").to_owned();
        for r in g["rules"].as_sequence().expect("rules") {
            out.push((name.clone(), r));
        }
    }
    out
}

/// The `meetgate_` metric names a PromQL expression uses, parsed loosely: identifiers starting
/// with `meetgate_`, outside string literals (label values never count).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::with_capacity(expr.len());
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                unquoted.push(' ');
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
                unquoted.push(' ');
            }
            None => unquoted.push(c),
        }
    }
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut rest = unquoted.as_str();
    while let Some(at) = rest.find("meetgate_") {
        let starts_word = !rest[..at].chars().next_back().is_some_and(ident);
        let end = rest[at..]
            .find(|c| !ident(c))
            .map_or(rest.len(), |e| at + e);
        if starts_word {
            names.insert(rest[at..end].to_owned());
        }
        rest = &rest[end..];
    }
    names
}

/// Every PromQL expression of the rules file, named by where it is.
fn rule_exprs() -> Vec<(String, String)> {
    let rules = yaml(RULES);
    alert_rules(&rules)
        .into_iter()
        .map(|(group, r)| {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            (
                format!("{RULES}: {group}/{name}"),
                r["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets (rows' nested panels too) and the
/// templating queries.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn panels<'a>(list: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            panels(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dash["panels"], &mut all);
    let mut out = Vec::new();
    for p in all {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    format!(
                        "{DASHBOARD}: panel {:?}",
                        p["title"].as_str().unwrap_or("?")
                    ),
                    expr.to_owned(),
                ));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        let query = v["query"]["query"].as_str().or(v["query"].as_str());
        if v["type"] == "query" {
            out.push((
                format!("{DASHBOARD}: variable {}", v["name"]),
                query.expect("a query variable's query").to_owned(),
            ));
        }
    }
    out
}

/// The series names a `/metrics` text can hold, from its `# TYPE` lines: a counter `x` is
/// `x_total`, a histogram `x` is `x_bucket`, `x_sum` and `x_count`, a gauge `x` is `x`. Each maps
/// to its family.
fn exported_series(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(decl) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = decl.split_whitespace();
        let (Some(family), Some(kind)) = (words.next(), words.next()) else {
            panic!("a TYPE line without a type: {line}");
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            out.insert(format!("{family}{s}"), family.to_owned());
        }
    }
    out
}

fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Starts of a meeting by client `obs` that the traffic makes, all answered 200 (one of them
/// after an upstream 429 and its replay).
const OBS_STARTS: u64 = 4;

/// A gateway in front of the simulator with two bearer clients: `obs`, and `capped` (one
/// request a minute).
async fn observed_gateway(sim: &meetgate::simulator::SimHandle) -> TestGateway {
    spawn_gateway(
        sim,
        GatewayOptions {
            extra: format!(
                "[[clients]]\nname = \"obs\"\nkey_sha256 = \"{}\"\n\n\
                 [[clients]]\nname = \"capped\"\nkey_sha256 = \"{}\"\nrate = \"1/m\"\n",
                sha("key-obs"),
                sha("key-capped")
            ),
            ..Default::default()
        },
    )
    .await
}

/// Traffic that makes every metric family appear: starts (sign-in, requests, latency, queue
/// wait, quota remaining, admissions per client), an upstream 429 and its replay, a
/// meeting-control call (a control-token request), and a client over its rate (a refusal).
async fn traffic(gw: &TestGateway, sim: &meetgate::simulator::SimHandle) {
    let obs = [
        ("authorization", "Bearer key-obs"),
        ("content-type", "application/json"),
    ];
    for _ in 0..OBS_STARTS - 1 {
        let r = gw.start_meeting_with(&obs).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    sim.inject(Fault::Throttle {
        count: 1,
        retry_after: Some(0),
    });
    let r = gw.start_meeting_with(&obs).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "replayed after the 429: {:?}",
        r.body
    );
    assert_eq!(sim.rejected_429(), 1, "the upstream throttled one request");
    let r = gw
        .request(
            Method::PUT,
            "/v1/mmc/control/conferences/lock?conferenceID=914087436",
            &obs,
            br#"{"isLock":1}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let capped = [("authorization", "Bearer key-capped")];
    assert_eq!(gw.start_meeting_with(&capped).await.status, StatusCode::OK);
    let r = gw.start_meeting_with(&capped).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "MEETGATE.CLIENT_RATE_LIMITED");
}

async fn metrics_text(gw: &TestGateway) -> String {
    let r = gw.admin("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    String::from_utf8(r.body.to_vec()).expect("utf-8 metrics")
}

/// The value of the one sample of `name` with exactly these labels in a `/metrics` text.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("parses as Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && s.labels.len() == labels.len())
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = on_path("promtool") else {
        eprintln!("note: promtool not on PATH (apt-get install prometheus); `promtool check rules` and `promtool test rules` skipped");
        return;
    };
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every alert pages with a severity, says what and why, waits a `for`, and its unit tests see
/// it firing and see it quiet.
#[test]
fn every_alert_is_labelled_annotated_and_tested_firing_and_quiet() {
    let rules = yaml(RULES);
    let tests = yaml(RULE_TESTS);
    assert_eq!(
        tests["rule_files"].as_sequence().map(Vec::len),
        Some(1),
        "the unit tests load the rules file"
    );
    assert_eq!(
        tests["rule_files"][0].as_str(),
        Path::new(RULES).file_name().and_then(|f| f.to_str())
    );
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in tests["tests"].as_sequence().expect("tests") {
        for a in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = a["alertname"].as_str().expect("alertname").to_owned();
            match a["exp_alerts"].as_sequence() {
                Some(exp) if !exp.is_empty() => firing.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let guide = read("docs/observability.md");
    let mut names = BTreeSet::new();
    for (group, r) in alert_rules(&rules) {
        let Some(name) = r["alert"].as_str() else {
            continue;
        };
        assert!(names.insert(name.to_owned()), "{name} defined twice");
        assert!(
            name.starts_with("Meetgate"),
            "{group}/{name}: alerts are named Meetgate*"
        );
        let severity = r["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{group}/{name}: severity critical or warning, not {severity:?}"
        );
        for a in ["summary", "description"] {
            assert!(
                r["annotations"][a]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{group}/{name}: annotation {a}"
            );
        }
        let wait = r["for"]
            .as_str()
            .unwrap_or_else(|| panic!("{group}/{name}: a `for`"));
        assert!(
            humantime::parse_duration(wait).is_ok_and(|d| d >= Duration::from_secs(60)),
            "{group}/{name}: `for: {wait}` of at least a minute (a scrape missed is no page)"
        );
        assert!(
            guide.contains(&format!("| `{name}` |")),
            "docs/observability.md's table has no row for {name}"
        );
        assert!(firing.contains(name), "{name}: no unit test sees it fire");
        assert!(quiet.contains(name), "{name}: no unit test sees it quiet");
    }
    let unknown: Vec<_> = firing
        .union(&quiet)
        .filter(|n| !names.contains(*n))
        .collect();
    assert!(
        unknown.is_empty(),
        "unit tests of unknown alerts: {unknown:?}"
    );
    // What the issue asks to be paged for, each by at least one alert.
    for family in [
        "meetgate_sign_ins_total",
        "meetgate_token_expiry_seconds",
        "meetgate_ready",
        "meetgate_upstream_429_total",
        "meetgate_waiting_requests",
        "meetgate_queue_wait_seconds_bucket",
        "meetgate_client_refused_total",
        "meetgate_requests_total",
        "meetgate_upstream_duration_seconds_bucket",
        "meetgate_cluster_degraded",
        "meetgate_control_token_requests_total",
    ] {
        assert!(
            rule_exprs()
                .iter()
                .any(|(_, e)| metric_names(e).contains(family)),
            "no alert on {family}"
        );
    }
}

/// The dashboard imports into Grafana with any Prometheus data source: schema 39, a
/// `datasource` variable every panel and target uses, unique ids, and the panels the operator
/// needs.
#[test]
fn the_dashboard_takes_its_datasource_from_a_variable_and_covers_the_gateway() {
    let dash = dashboard();
    assert_eq!(dash["schemaVersion"], 39);
    assert_eq!(dash["uid"], "meetgate");
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            v["datasource"]["uid"], "${datasource}",
            "variable {}",
            v["name"]
        );
    }
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().expect("a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("an id")),
            "id of {title}"
        );
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title), "two panels titled {title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no target");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{title}: target without expr"
            );
        }
    }
    let used: BTreeSet<String> = dashboard_exprs(&dash)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    // Requests and statuses per operation, latency and queue wait, quota remaining (local and
    // upstream-reported), tokens, sign-ins, sessions, cluster state.
    for family in [
        "meetgate_requests_total",
        "meetgate_request_duration_seconds_bucket",
        "meetgate_upstream_duration_seconds_bucket",
        "meetgate_queue_wait_seconds_bucket",
        "meetgate_quota_remaining",
        "meetgate_upstream_429_total",
        "meetgate_token_expiry_seconds",
        "meetgate_sign_ins_total",
        "meetgate_control_sessions",
        "meetgate_control_token_requests_total",
        "meetgate_cluster_degraded",
        "meetgate_cluster_fallback_decisions",
        "meetgate_cluster_leased_admissions",
    ] {
        assert!(used.contains(family), "no panel shows {family}");
    }
    let exprs: Vec<String> = dashboard_exprs(&dash).into_iter().map(|(_, e)| e).collect();
    for source in ["source=\"local\"", "source=\"upstream\""] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains("meetgate_quota_remaining") && e.contains(source)),
            "a quota-remaining panel for {source}"
        );
    }
    for status in ["status_class", "operation"] {
        assert!(
            exprs
                .iter()
                .any(|e| e.contains("meetgate_requests_total") && e.contains(status)),
            "requests by {status}"
        );
    }
}

#[test]
fn metric_names_are_found_outside_strings_only() {
    let names = metric_names(
        r#"sum by (op) (rate(meetgate_requests_total{x="meetgate_not_a_metric"}[5m]))
           / on() group_left meetgate_ready unless ameetgate_no and meetgate_b:rule"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "meetgate_b:rule",
            "meetgate_ready",
            "meetgate_requests_total"
        ]
    );
    let exported = exported_series(
        "# HELP meetgate_x X.\n# TYPE meetgate_x counter\nmeetgate_x_total 1\n\
         # TYPE meetgate_h histogram\n# TYPE meetgate_g gauge\n",
    );
    assert_eq!(
        exported.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "meetgate_g",
            "meetgate_h_bucket",
            "meetgate_h_count",
            "meetgate_h_sum",
            "meetgate_x_total"
        ]
    );
}

/// Every metric a rule or panel names is one a running gateway exports, after traffic that
/// makes every family appear. A name the gateway does not export (a typo, `_total` missing,
/// a metric renamed) fails here with where it is used.
#[tokio::test]
async fn every_metric_a_rule_or_panel_uses_is_exported_by_a_running_gateway() {
    let sim = default_sim().await;
    let gw = observed_gateway(&sim).await;
    traffic(&gw, &sim).await;
    let text = metrics_text(&gw).await;
    let exported = exported_series(&text);
    // Series with a sample, for the families a scrape fills in or an event creates.
    for (name, labels) in [
        (
            "meetgate_upstream_429_total",
            vec![("operation", "start_meeting")],
        ),
        (
            "meetgate_client_refused_total",
            vec![("client", "capped"), ("reason", "rate")],
        ),
        (
            "meetgate_control_token_requests_total",
            vec![("kind", "acquire"), ("result", "ok")],
        ),
        ("meetgate_control_sessions", vec![]),
    ] {
        assert_eq!(
            sample(&text, name, &labels),
            Some(1.0),
            "{name}{labels:?} in\n{text}"
        );
    }
    let mut used = BTreeMap::<String, Vec<String>>::new();
    for (place, expr) in rule_exprs()
        .into_iter()
        .chain(dashboard_exprs(&dashboard()))
    {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{place}: no meetgate_ metric in {expr}");
        for n in names {
            used.entry(n).or_default().push(place.clone());
        }
    }
    let missing: Vec<String> = used
        .iter()
        .filter(|(n, _)| !exported.contains_key(*n))
        .map(|(n, places)| format!("{n} (used by {})", places.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by a running meetgate:\n  {}\nexported: {:?}",
        missing.join("\n  "),
        exported.keys().collect::<Vec<_>>()
    );
    gw.stop().await;
}

/// A `prometheus` server on a free loopback port with its own storage, killed when dropped.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &Path, scrape: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n  evaluation_interval: 200ms\n\
                 rule_files:\n  - {:?}\n\
                 scrape_configs:\n  - job_name: meetgate\n    static_configs:\n      - targets: [\"{scrape}\"]\n",
                repo(RULES).display().to_string()
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus runs");
        Prometheus { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` on the HTTP API: its JSON, or `None` while it does not answer 200.
    async fn get(&mut self, client: &HttpClient, path: &str) -> Option<serde_json::Value> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("prometheus exited ({status}):\n{}", self.log());
        }
        let req = Request::get(format!("http://127.0.0.1:{}{path}", self.port))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = client.request(req).await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }

    async fn query(&mut self, client: &HttpClient, promql: &str) -> Option<serde_json::Value> {
        let q: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let v = self
            .get(client, &format!("/api/v1/query?query={q}"))
            .await?;
        assert_eq!(v["status"], "success", "{promql}: {v}");
        Some(v["data"]["result"].clone())
    }

    /// Panics with `what` and the server's log once `deadline` has passed.
    fn before(&self, deadline: tokio::time::Instant, what: &str) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; prometheus log:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's Prometheus scrapes a running gateway on loopback: the requests counter read back
/// through the HTTP API has the value the gateway reports, and the alert rules are loaded and
/// evaluate with health ok against the live series.
#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway_and_evaluates_the_rules() {
    let Some(binary) = on_path("prometheus") else {
        eprintln!("note: prometheus not on PATH (apt-get install prometheus); the real-Prometheus scrape test skipped");
        return;
    };
    let sim = default_sim().await;
    let gw = observed_gateway(&sim).await;
    traffic(&gw, &sim).await;
    let labels = [
        ("operation", "start_meeting"),
        ("status_class", "2xx"),
        ("client", "obs"),
    ];
    let text = metrics_text(&gw).await;
    assert_eq!(
        sample(&text, "meetgate_requests_total", &labels),
        Some(OBS_STARTS as f64),
        "{text}"
    );

    let client = http_client();
    let mut prom = Prometheus::start(&binary, gw.admin_addr);
    let promql =
        r#"meetgate_requests_total{operation="start_meeting",status_class="2xx",client="obs"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let series = loop {
        let first = prom
            .query(&client, promql)
            .await
            .and_then(|r| r.as_array().and_then(|r| r.first()).cloned());
        if let Some(series) = first {
            break series;
        }
        prom.before(deadline, "the requests counter through Prometheus");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let instance = gw.admin_addr.to_string();
    assert_eq!(series["metric"]["job"], "meetgate", "{series}");
    assert_eq!(series["metric"]["instance"], instance.as_str(), "{series}");
    assert_eq!(
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok()),
        Some(OBS_STARTS as f64),
        "{series}"
    );
    // The scrape itself is healthy, and the gauges came with it.
    let up = prom
        .query(
            &client,
            &format!("up{{job=\"meetgate\",instance=\"{instance}\"}}"),
        )
        .await
        .expect("up answers");
    assert_eq!(up[0]["value"][1], "1", "{up}");
    let ready = prom
        .query(&client, "meetgate_ready")
        .await
        .expect("ready answers");
    assert_eq!(ready[0]["value"][1], "1", "{ready}");

    // The rules: every group of the file loaded, every rule evaluated with health ok.
    let rules_file = yaml(RULES);
    let expected: BTreeMap<String, usize> = rules_file["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["name"].as_str().expect("name").to_owned(),
                g["rules"].as_sequence().map_or(0, Vec::len),
            )
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let groups = loop {
        let groups = prom
            .get(&client, "/api/v1/rules")
            .await
            .and_then(|v| v["data"]["groups"].as_array().cloned())
            .unwrap_or_default();
        let evaluated = groups.iter().all(|g| {
            g["rules"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["health"] != "unknown"))
        });
        if evaluated && groups.len() == expected.len() {
            break groups;
        }
        prom.before(deadline, "every rule evaluated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let loaded: BTreeMap<String, usize> = groups
        .iter()
        .map(|g| {
            (
                g["name"].as_str().expect("name").to_owned(),
                g["rules"].as_array().map_or(0, Vec::len),
            )
        })
        .collect();
    assert_eq!(loaded, expected, "groups and rule counts as in {RULES}");
    for g in &groups {
        assert_eq!(
            g["file"].as_str(),
            repo(RULES).to_str(),
            "group {} from the rules file",
            g["name"]
        );
        for r in g["rules"].as_array().expect("rules") {
            assert_eq!(r["type"], "alerting", "{r}");
            assert_eq!(r["health"], "ok", "{r}");
            assert!(r["lastError"].as_str().unwrap_or("").is_empty(), "{r}");
        }
    }
    drop(prom);
    gw.stop().await;
}
