//! Meeting control through meetgate against a direct one: a control call's latency with the
//! control token meetgate keeps, the same call straight to the simulator with a token the
//! caller holds itself, and a plain business call through meetgate for reference; and how
//! many control-token requests one meeting cost over the run.
//! `cargo bench --bench control` (`CONTROL_SECONDS` per mode, default 10; the simulator's
//! control tokens live `CONTROL_TOKEN_LIFETIME` seconds, default 4, so the run spans several
//! lifetimes and keep-alives).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

mod common;

const APP_ID: &str = "bench-control-app-0123456789abcd";
const APP_KEY: &str = "bench-control-key";
const LOCK: &str = "/v1/mmc/control/conferences/lock?conferenceID=914087436";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;
type TlsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sequential calls of `call` for `secs`: (count, p50, p99). Every call must succeed.
async fn measure<F, Fut>(secs: u64, mut call: F) -> (usize, Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let status = call().await;
        assert_eq!(status, 200, "a call failed");
        lat.push(t.elapsed());
    }
    lat.sort();
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    (lat.len(), at(0.5), at(0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env_secs("CONTROL_SECONDS", 10);
    let lifetime = Duration::from_secs(env_secs("CONTROL_TOKEN_LIFETIME", 4));
    let sim = common::unlimited_sim(APP_ID, APP_KEY).await;
    // The direct caller's token lives through its whole run (it would keep it alive as
    // meetgate does, off the measured path); meetgate's gets the short lifetime below.
    sim.set_conf_token_lifetime(Duration::from_secs(3600));
    const NO_BINDING: &str =
        "[quota]\nper_api_per_minute = 1000000\nall_env_per_second = 1000000\nburst = 100000\n";
    let (gw, stop) = common::gateway(&sim, APP_ID, APP_KEY, NO_BINDING).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let send = |method: &'static str, path: &str, body: &'static [u8]| {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{gw}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body)))
            .expect("request");
        let client = client.clone();
        async move {
            match client.request(req).await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = r.into_body().collect().await.map(|b| b.to_bytes());
                    if status != 200 {
                        eprintln!("{status}: {body:?}");
                    }
                    status
                }
                Err(_) => 0,
            }
        }
    };
    let start = br#"{"conferenceID":"914087436","password":"123456"}"#;
    // The gateway is ready once it forwards.
    let deadline = Instant::now() + Duration::from_secs(10);
    while send("POST", "/v1/mmc/management/conferences/start", start).await != 200 {
        assert!(Instant::now() < deadline, "the gateway never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A direct caller holds the host password and its own control token.
    let roots = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("CA")
    };
    let mut tls = meetgate::upstream::tls_config(&roots).expect("tls");
    tls.alpn_protocols.clear();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let direct: TlsClient = Client::builder(TokioExecutor::new()).build(https);
    let req = http::Request::get(format!(
        "{}/v1/mmc/control/conferences/token?conferenceID=914087436",
        sim.url()
    ))
    .header("x-password", "123456")
    .header("x-login-type", "1")
    .body(Full::new(Bytes::new()))
    .expect("request");
    let answer = direct.request(req).await.expect("token answer");
    let body = answer.into_body().collect().await.expect("body").to_bytes();
    let token = serde_json::from_slice::<serde_json::Value>(&body).expect("json")["data"]["token"]
        .as_str()
        .expect("token")
        .to_owned();

    println!(
        "control bench: 1 connection, sequential calls, {secs} s per mode, control tokens living {} s",
        lifetime.as_secs()
    );
    let before = sim.control_stats();
    let (n_mg, p50_mg, p99_mg) = {
        sim.set_conf_token_lifetime(lifetime);
        let r = measure(secs, || send("PUT", LOCK, br#"{"isLock":1}"#)).await;
        sim.set_conf_token_lifetime(Duration::from_secs(3600));
        r
    };
    let during = sim.control_stats();
    let (n_start, p50_start, p99_start) = measure(secs, || {
        send("POST", "/v1/mmc/management/conferences/start", start)
    })
    .await;
    let (n_direct, p50_direct, p99_direct) = measure(secs, || {
        let req = http::Request::put(format!("{}{LOCK}", sim.url()))
            .header("content-type", "application/json")
            .header("x-conference-authorization", token.as_str())
            .body(Full::new(Bytes::from_static(br#"{"isLock":1}"#)))
            .expect("request");
        let direct = direct.clone();
        async move {
            match direct.request(req).await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let _ = r.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            }
        }
    })
    .await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "  lock through meetgate (no credential): {n_mg:>6} calls, p50 {:>6.0} us, p99 {:>6.0} us",
        us(p50_mg),
        us(p99_mg)
    );
    println!(
        "  lock direct (caller's own token):      {n_direct:>6} calls, p50 {:>6.0} us, p99 {:>6.0} us",
        us(p50_direct),
        us(p99_direct)
    );
    println!(
        "  start through meetgate (reference):    {n_start:>6} calls, p50 {:>6.0} us, p99 {:>6.0} us",
        us(p50_start),
        us(p99_start)
    );
    println!(
        "  added by meetgate to a control call: p50 {:+.0} us; over a plain call through it: {:+.0} us",
        us(p50_mg) - us(p50_direct),
        us(p50_mg) - us(p50_start)
    );
    println!(
        "  control-token requests for the meeting during the meetgate run: {} ({} new token, {} keep-alives) for {n_mg} control calls over {:.1} token lifetimes",
        during.token_requests - before.token_requests,
        during.issued - before.issued,
        during.keepalives - before.keepalives,
        secs as f64 / lifetime.as_secs_f64()
    );
    let _ = stop.send(());
}
