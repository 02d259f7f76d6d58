//! Operating it: readiness, metrics, graceful shutdown, hot reload.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use meetgate::simulator::{Fault, SimConfig, SimLimits};

use crate::support::*;

#[tokio::test]
async fn readiness_follows_the_token_and_health_never_calls_upstream() {
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: SimLimits::unlimited(),
        token_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    eventually(
        Duration::from_secs(10),
        "ready after the first sign-in",
        || async { gw.admin("/readyz").await.status == StatusCode::OK },
    )
    .await;
    // From now on every sign-in fails: once the token expires, not ready, with a reason.
    sim.inject(Fault::SignInStatus {
        status: 500,
        count: 1_000_000,
    });
    eventually(
        Duration::from_secs(10),
        "not ready past token expiry",
        || async { gw.admin("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    let r = gw.admin("/readyz").await;
    let v = r.json();
    assert_eq!(v["ready"], false);
    let reason = v["reasons"][0].as_str().unwrap_or("").to_owned();
    assert!(
        reason.contains("app default") && reason.contains("500"),
        "{reason}"
    );
    let business_before = sim
        .requests()
        .iter()
        .filter(|r| !r.path_and_query.contains("/acs/"))
        .count();
    for _ in 0..3 {
        assert_eq!(gw.admin("/healthz").await.status, StatusCode::OK);
        let _ = gw.admin("/readyz").await;
    }
    let business_after = sim
        .requests()
        .iter()
        .filter(|r| !r.path_and_query.contains("/acs/"))
        .count();
    assert_eq!(
        business_before, business_after,
        "probes never call a paid upstream API"
    );
    // Recovery as soon as sign-in works again.
    sim.clear_faults();
    eventually(Duration::from_secs(10), "ready again", || async {
        gw.admin("/readyz").await.status == StatusCode::OK
    })
    .await;
    gw.stop().await;
}

fn metric(families: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => {
                h.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

async fn scrape(gw: &TestGateway) -> prometheus_parse::Scrape {
    let r = gw.admin("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/plain"));
    let text = String::from_utf8(r.body.to_vec()).expect("utf-8");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics/Prometheus text ends with # EOF"
    );
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("parses as Prometheus text")
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    // Default upstream limits, so responses carry the rate-limit counters.
    let sim = start_sim(SimConfig {
        apps: vec![sim_app()],
        ..SimConfig::default()
    })
    .await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    let before = scrape(&gw).await;
    let ok = [
        ("operation", "start_meeting"),
        ("status_class", "2xx"),
        ("client", "-"),
    ];
    let base = metric(&before, "meetgate_requests_total", &ok).expect("request counter");
    for _ in 0..3 {
        assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    }
    let _ = gw.request(http::Method::GET, "/elsewhere", &[], b"").await;
    let after = scrape(&gw).await;
    assert_eq!(
        metric(&after, "meetgate_requests_total", &ok),
        Some(base + 3.0)
    );
    assert_eq!(
        metric(
            &after,
            "meetgate_requests_total",
            &[("operation", "-"), ("status_class", "4xx")]
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &after,
            "meetgate_sign_ins_total",
            &[("app", "default"), ("result", "ok")]
        ) >= Some(1.0)
    );
    assert!(
        metric(
            &after,
            "meetgate_token_expiry_seconds",
            &[("app", "default")]
        ) > Some(3600.0)
    );
    assert!(
        metric(
            &after,
            "meetgate_request_duration_seconds_count",
            &[("operation", "start_meeting")]
        ) >= Some(4.0)
    );
    assert!(
        metric(
            &after,
            "meetgate_upstream_duration_seconds_count",
            &[("operation", "start_meeting")]
        ) >= Some(4.0)
    );
    assert!(
        metric(
            &after,
            "meetgate_queue_wait_seconds_count",
            &[("operation", "start_meeting")]
        ) >= Some(4.0)
    );
    assert!(metric(
        &after,
        "meetgate_quota_remaining",
        &[("operation", "start_meeting"), ("source", "local")]
    )
    .is_some());
    assert!(metric(
        &after,
        "meetgate_quota_remaining",
        &[("operation", "start_meeting"), ("source", "upstream")]
    )
    .is_some());
    assert_eq!(metric(&after, "meetgate_ready", &[]), Some(1.0));
    assert_eq!(
        metric(&after, "meetgate_in_flight_requests", &[]),
        Some(0.0)
    );
    // Never a token, a key or a user id in the exposition.
    let text = String::from_utf8(gw.admin("/metrics").await.body.to_vec()).expect("utf-8");
    assert!(!text.contains(APP_KEY));
    for t in sim.issued_tokens() {
        assert!(!text.contains(&t));
    }
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_answers_quota_waiters_with_503() {
    let sim = default_sim().await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                quota: "[quota]\nmax_wait = \"60s\"\nper_api_per_minute = 3\nburst = 2\n".into(),
                ..Default::default()
            },
        )
        .await,
    );
    for _ in 0..2 {
        assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    }
    // The third waits about 30 s for its slot.
    let waiter = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.start_meeting().await })
    };
    let quota = gw.gateway.quota().clone();
    eventually(Duration::from_secs(5), "a waiter", || {
        let quota = quota.clone();
        async move { quota.waiting() == 1 }
    })
    .await;
    gw.gateway.begin_shutdown();
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("answered at once")
        .expect("task");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "MEETGATE.SHUTTING_DOWN");
}

fn write_config(
    path: &std::path::Path,
    sim_url: &str,
    ca: &std::path::Path,
    key_file: &std::path::Path,
    extra: &str,
) {
    std::fs::write(
        path,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n{extra}\n\
             [upstream]\nurl = \"{sim_url}\"\nca_file = {:?}\n\
             [[apps]]\napp_id = \"{APP_ID}\"\napp_key_file = {:?}\n[log]\nformat = \"json\"\n",
            ca.display().to_string(),
            key_file.display().to_string()
        ),
    )
    .expect("write config");
}

#[tokio::test]
async fn sigterm_lets_a_long_upstream_response_complete_then_exits_0() {
    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, sim.ca_pem()).expect("ca");
    let key = dir.path().join("key");
    std::fs::write(&key, format!("{APP_KEY}\n")).expect("key");
    let cfg = dir.path().join("meetgate.toml");
    write_config(&cfg, &sim.url(), &ca, &key, "");
    let mut gateway = RunningBinary::run(&cfg, &[]);
    let addr = gateway.listening();
    sim.inject(Fault::Delay {
        delay: Duration::from_secs(2),
        count: 1,
    });
    let client = http_client();
    let slow = tokio::spawn(async move { post_start(&client, &addr, None).await.status() });
    eventually(
        Duration::from_secs(10),
        "the slow request reached the upstream",
        || async { !received(&sim, START).is_empty() },
    )
    .await;
    gateway.signal("TERM");
    assert_eq!(slow.await.expect("answer despite SIGTERM"), StatusCode::OK);
    let exit = gateway.exited(Duration::from_secs(15)).await;
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_and_a_broken_config_keeps_the_old_one() {
    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, sim.ca_pem()).expect("ca");
    let key = dir.path().join("key");
    std::fs::write(&key, APP_KEY).expect("key");
    let cfg = dir.path().join("meetgate.toml");
    // Files are not polled often here: the reload below comes from SIGHUP.
    write_config(&cfg, &sim.url(), &ca, &key, "reload_interval = \"1h\"");
    let mut gateway = RunningBinary::run(&cfg, &[]);
    let addr = gateway.listening();
    let client = http_client();
    let start = |client: HttpClient, addr: String| async move {
        post_start(&client, &addr, None).await.status()
    };
    assert_eq!(start(client.clone(), addr.clone()).await, StatusCode::OK);

    // A quota change through SIGHUP.
    write_config(
        &cfg,
        &sim.url(),
        &ca,
        &key,
        "reload_interval = \"1h\"\n[quota]\nburst = 5",
    );
    gateway.signal("HUP");
    let reloaded = gateway.next("Configuration reloaded");
    assert_eq!(reloaded["trigger"], "SIGHUP");
    assert_eq!(reloaded["quota_changed"], true);

    // A broken config is refused with an error; the old one keeps serving.
    std::fs::write(&cfg, "listen = \"nowhere\"\n[[apps]]\n").expect("write");
    gateway.signal("HUP");
    let refused = gateway.next("Reload refused");
    assert_eq!(refused["level"], "ERROR");
    assert!(
        refused["problems"]
            .as_str()
            .unwrap_or("")
            .contains("listen"),
        "{refused}"
    );
    assert_eq!(start(client.clone(), addr.clone()).await, StatusCode::OK);
}

#[tokio::test]
async fn a_key_file_swapped_like_a_kubernetes_secret_takes_effect_without_restart() {
    let sim = default_sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Kubernetes mounts secrets as key -> ..data/key, ..data -> ..<timestamp>; an update swaps
    // the ..data symlink atomically.
    let v1 = dir.path().join("..2026_v1");
    std::fs::create_dir(&v1).expect("dir");
    std::fs::write(v1.join("app_key"), "an-old-wrong-key\n").expect("key");
    std::os::unix::fs::symlink("..2026_v1", dir.path().join("..data")).expect("symlink");
    let key_path = dir.path().join("app_key");
    std::os::unix::fs::symlink("..data/app_key", &key_path).expect("symlink");
    let apps = format!(
        "[[apps]]\nname = \"default\"\napp_id = \"{APP_ID}\"\napp_key_file = {:?}\n",
        key_path.display().to_string()
    );
    let gw = spawn_reloading_gateway(
        &sim,
        GatewayOptions {
            apps: Some(apps),
            ..Default::default()
        },
    )
    .await;
    let r = gw.start_meeting().await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the old key is refused upstream"
    );

    let v2 = dir.path().join("..2026_v2");
    std::fs::create_dir(&v2).expect("dir");
    std::fs::write(v2.join("app_key"), format!("{APP_KEY}\n")).expect("key");
    std::os::unix::fs::symlink("..2026_v2", dir.path().join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap");

    eventually(Duration::from_secs(10), "the new key signs in", || async {
        gw.start_meeting().await.status == StatusCode::OK
    })
    .await;
    assert_eq!(sim.sign_in_count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_reloaded_quota_never_grants_a_fresh_burst() {
    let sim = default_sim().await;
    let gw = spawn_reloading_gateway(
        &sim,
        GatewayOptions {
            quota: "[quota]\nmode = \"reject\"\nper_api_per_minute = 10\nburst = 3\n".into(),
            ..Default::default()
        },
    )
    .await;
    let mut ok = 0;
    for _ in 0..5 {
        if gw.start_meeting().await.status == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "the burst");
    // A bigger burst through reload: requests in the same minute still get nothing at once.
    let text = std::fs::read_to_string(gw.config_path()).expect("read");
    std::fs::write(gw.config_path(), text.replace("burst = 3", "burst = 8")).expect("write");
    let config = gw.gateway.clone();
    eventually(Duration::from_secs(10), "reloaded", || {
        let config = config.clone();
        async move { config.config().quota.burst.map(|b| b.get()) == Some(8) }
    })
    .await;
    let r = gw.start_meeting().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "MEETGATE.QUOTA_EXCEEDED");
    gw.stop().await;
}
