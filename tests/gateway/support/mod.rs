//! Test harness: the real simulator over real TLS, the real gateway on an ephemeral loopback
//! port, an HTTP client, and polling with deadlines instead of sleeps.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meetgate::simulator::{self, SimApp, SimConfig, SimHandle, SimLimits};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const APP_ID: &str = "f1e2d3c4b5a697887766554433221100";
pub const APP_KEY: &str = "test-app-key-7c1d9e0b4a";
pub const KEY_ENV: &str = "TEST_MEETGATE_APP_KEY";
pub const START: &str = "/v1/mmc/management/conferences/start";

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The upstream app a simulator accepts by default.
pub fn sim_app() -> SimApp {
    SimApp::new(APP_ID, APP_KEY)
}

pub async fn start_sim(config: SimConfig) -> SimHandle {
    simulator::start(config).await.expect("simulator starts")
}

/// A simulator with the default test app and no rate limits (quota tests set their own).
pub async fn default_sim() -> SimHandle {
    start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: SimLimits::unlimited(),
        ..SimConfig::default()
    })
    .await
}

/// `127.0.0.1:0`: a free loopback port.
pub const LOOPBACK_ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A simulator on `listen` serving `cert` (its chain and key written to files in `dir`).
pub async fn sim_with_cert(
    listen: SocketAddr,
    cert: &simulator::tls::GeneratedCert,
    dir: &std::path::Path,
) -> SimHandle {
    let (c, k) = (dir.join("sim.pem"), dir.join("sim.key"));
    std::fs::write(&c, &cert.cert_pem).expect("write");
    std::fs::write(&k, &cert.key_pem).expect("write");
    start_sim(SimConfig {
        listen,
        apps: vec![sim_app()],
        limits: SimLimits::unlimited(),
        tls: simulator::SimTls::Files {
            cert_file: c,
            key_file: k,
        },
        ..SimConfig::default()
    })
    .await
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<meetgate::Gateway>,
    pub client: HttpClient,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Options for a gateway under test.
pub struct GatewayOptions {
    /// Extra TOML appended to the generated config (sections must come after `[upstream]`).
    pub extra: String,
    /// Whether the gateway trusts the simulator's CA.
    pub trust_sim: bool,
    /// Replaces the `[[apps]]` section.
    pub apps: Option<String>,
    /// Extra `[upstream]` keys.
    pub upstream: String,
    /// Top-level keys (before any table).
    pub top: String,
    /// The `[quota]` section; by default limits so high they never bind.
    pub quota: String,
}

/// Quota settings that never bind, for tests about something else.
pub const NO_BINDING_QUOTA: &str =
    "[quota]\nper_api_per_minute = 1000000\nall_env_per_second = 1000000\nburst = 10000\n";

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            extra: String::new(),
            trust_sim: true,
            apps: None,
            upstream: String::new(),
            top: String::new(),
            quota: NO_BINDING_QUOTA.to_owned(),
        }
    }
}

pub fn env() -> HashMap<String, String> {
    HashMap::from([
        (KEY_ENV.to_owned(), APP_KEY.to_owned()),
        // The gateway key of the SDK-style test client (tests/gateway/access.rs).
        (
            "TEST_SDK_CLIENT_KEY".to_owned(),
            "gateway-issued-sdk-key-9a8b7c".to_owned(),
        ),
    ])
}

/// Writes the config a test gateway runs with and loads it through the real loader.
pub fn gateway_config(
    sim_url: &str,
    ca_pem: &str,
    opts: &GatewayOptions,
    dir: &std::path::Path,
) -> meetgate::Config {
    let ca_file = dir.join("sim-ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write ca");
    let ca_line = if opts.trust_sim {
        format!("ca_file = {:?}\n", ca_file.display().to_string())
    } else {
        String::new()
    };
    let apps = opts.apps.clone().unwrap_or_else(|| {
        format!(
            "[[apps]]\nname = \"default\"\napp_id = \"{APP_ID}\"\napp_key_env = \"{KEY_ENV}\"\n"
        )
    });
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nreload_interval = \"50ms\"\n{}\n\
         [upstream]\nurl = \"{sim_url}\"\n{ca_line}connect_timeout = \"2s\"\nrequest_timeout = \"5s\"\n{}\n\
         [token]\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n\n{}\n{}\n{apps}",
        opts.top, opts.upstream, opts.quota, opts.extra
    );
    let path = dir.join("meetgate.toml");
    std::fs::write(&path, &toml).expect("write config");
    meetgate::config::load(&path, &env()).expect("test config is valid")
}

pub async fn spawn_gateway(sim: &SimHandle, opts: GatewayOptions) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway_config(&sim.url(), sim.ca_pem(), &opts, dir.path());
    spawn_with_config(config, dir).await
}

/// A gateway that also watches its config file (and the files it names) for changes.
pub async fn spawn_reloading_gateway(sim: &SimHandle, opts: GatewayOptions) -> TestGateway {
    let gw = spawn_gateway(sim, opts).await;
    let source = meetgate::reload::ConfigSource {
        path: gw.config_path(),
        env: Arc::new(env),
    };
    tokio::spawn(meetgate::reload::watch(
        gw.gateway.clone(),
        source,
        std::future::pending(),
    ));
    gw
}

pub async fn spawn_with_config(config: meetgate::Config, dir: tempfile::TempDir) -> TestGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin_addr = admin.local_addr().expect("admin addr");
    let (tx, rx) = oneshot::channel::<()>();
    let gateway = meetgate::Gateway::new(Arc::new(config), Arc::new(meetgate::clock::SystemClock))
        .expect("gateway builds");
    let served = gateway.clone();
    let task = tokio::spawn(async move {
        meetgate::serve(served, listener, Some(admin), async {
            let _ = rx.await;
        })
        .await;
    });
    TestGateway {
        addr,
        admin_addr,
        gateway,
        client: Client::builder(TokioExecutor::new()).build_http(),
        dir,
        shutdown: Some(tx),
        task: Some(task),
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn error_code(&self) -> String {
        self.json()["error_code"].as_str().unwrap_or("").to_owned()
    }
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("meetgate.toml")
    }

    /// The value of an unlabelled gauge or counter in `/metrics` (NaN when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = String::from_utf8(self.admin("/metrics").await.body.to_vec()).expect("utf-8");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// GET on the admin listener.
    pub async fn admin(&self, path: &str) -> Reply {
        let req = Request::get(format!("http://{}{}", self.admin_addr, path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.send(req).await
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let resp = self.client.request(req).await.expect("gateway answers");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut b = Request::builder().method(method).uri(self.url(path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(
            b.body(Full::new(Bytes::copy_from_slice(body)))
                .expect("request"),
        )
        .await
    }

    pub async fn start_meeting(&self) -> Reply {
        self.start_meeting_with(&[("content-type", "application/json")])
            .await
    }

    /// `start_meeting` with these request headers (credentials, identity selection...).
    pub async fn start_meeting_with(&self, headers: &[(&str, &str)]) -> Reply {
        self.request(
            Method::POST,
            START,
            headers,
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )
        .await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `check` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Business requests the simulator received for `path`.
pub fn received(sim: &SimHandle, path: &str) -> Vec<simulator::RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.path_and_query.split('?').next() == Some(path))
        .collect()
}

pub type TlsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client that talks to the simulator directly, trusting its CA: "another consumer".
pub fn sim_client(sim: &SimHandle) -> TlsClient {
    tls_client(sim.ca_pem())
}

/// An HTTPS client trusting `ca_pem` (HTTP/1.1).
pub fn tls_client(ca_pem: &str) -> TlsClient {
    use rustls_pki_types::pem::PemObject;
    let roots = rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("CA PEM");
    let mut tls = meetgate::upstream::tls_config(&roots).expect("tls config");
    tls.alpn_protocols.clear();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// Runs `n` copies of `f` concurrently and collects their results in order.
pub async fn concurrently<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

pub fn header<'a>(r: &'a simulator::RecordedRequest, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A real `redis-server` on an ephemeral loopback port, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        // Redis cannot take port 0: ask the OS for a free port, then hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = RedisServer { port, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (.ci/run installs it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .map(|n| buf[..n].starts_with(b"+PONG"))
                .unwrap_or(false)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port, empty (no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a config for the real binary into `dir`: both listeners on free ports, the simulator
/// as upstream (its CA next to the config), the test app with its key from `KEY_ENV`, JSON logs.
/// `top` goes before the first section, `log` into `[log]`.
pub fn binary_config(
    sim: &SimHandle,
    dir: &std::path::Path,
    top: &str,
    log: &str,
) -> std::path::PathBuf {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, sim.ca_pem()).expect("write ca");
    let cfg = dir.join("meetgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{top}\n[upstream]\nurl = \"{}\"\nca_file = {:?}\n\
             [[apps]]\napp_id = \"{APP_ID}\"\napp_key_env = \"{KEY_ENV}\"\n[log]\nformat = \"json\"\n{log}\n",
            sim.url(),
            ca.display().to_string()
        ),
    )
    .expect("write config");
    cfg
}

/// `meetgate run --config <file>` as a child process, its stdout lines (JSON logs) on a
/// channel; killed when dropped.
pub struct RunningBinary {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl RunningBinary {
    pub fn run(config: &std::path::Path, envs: &[(&str, &str)]) -> RunningBinary {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meetgate"));
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("meetgate spawns");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        RunningBinary {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line containing `marker`, parsed as JSON (waits up to 20 s).
    pub fn next(&mut self, marker: &str) -> serde_json::Value {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line with {marker:?} in time"));
            self.seen.push(line.clone());
            if line.contains(marker) {
                return serde_json::from_str(&line).unwrap_or_default();
            }
        }
    }

    /// Waits for the "Listening" line and returns the proxy address from it.
    pub fn listening(&mut self) -> String {
        self.next("\"Listening\"")["addr"]
            .as_str()
            .expect("addr field")
            .to_owned()
    }

    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success());
    }

    /// Waits (up to `within`) for the process to exit; its status.
    pub async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "did not exit in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every line still to come, until none arrives for `quiet`.
    pub fn rest(&mut self, quiet: Duration) -> &[String] {
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            self.seen.push(line);
        }
        &self.seen
    }
}

impl Drop for RunningBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POST start_meeting to a gateway at `addr` (plain HTTP); the status.
pub async fn post_start(
    client: &HttpClient,
    addr: &str,
    request_id: Option<&str>,
) -> http::Response<hyper::body::Incoming> {
    let mut b = Request::post(format!("http://{addr}{START}"));
    if let Some(r) = request_id {
        b = b.header("x-request-id", r);
    }
    let req = b
        .body(Full::new(Bytes::from_static(
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        )))
        .expect("request");
    client.request(req).await.expect("an answer")
}

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client that speaks HTTP/2 over plain TCP (h2c, prior knowledge).
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}
