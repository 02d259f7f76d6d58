//! Scale: what ten thousand idle connections, ten thousand identities and a hundred thousand
//! SDK sessions cost meetgate (the release binary, as a subprocess) in memory and idle CPU,
//! against nginx doing the same forwarding job, all on loopback in front of the in-process
//! simulator. `cargo bench --bench scale`; what it measures and how to read it is in
//! `benches/README.md`.
//!
//! Environment: `SCALE_CONNS` (idle connections, default 10000), `SCALE_IDENTITIES` (default
//! 10000), `SCALE_SESSIONS` (SDK sign-ins, default 100000), `SCALE_PROBES` (fresh-connection
//! requests per probe series, default 200), `SCALE_IDLE_SECS` (idle CPU window, default 5),
//! `SCALE_PARALLEL` (connections driving identities and sign-ins, default 8), `SCALE_TIMEOUT`
//! (the whole run, default 600 s), `SCALE_NGINX` (`off`, or the nginx binary), `SCALE_MEETGATE`
//! (another meetgate build), `SCALE_PHASES` (comma list of `conns`, `identities`, `sessions`;
//! default all).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use meetgate::simulator::{self, SimApp, SimConfig, SimHandle, SimLimits};
use meetgate::token::sign::{authorization_header, SignInput};
use tokio::net::TcpStream;

#[path = "common/process.rs"]
mod process;
use process::{children_of, env_or, free_port, parent_of, rss_kib, signal};

const APP_ID: &str = "bench-scale-app-0123456789abcdef0";
const APP_KEY: &str = "bench-scale-app-key-7c2e4a";
/// meetgate reads the keys from these variables, set only in the child's environment.
const KEY_ENV: &str = "BENCH_SCALE_APP_KEY";
const SDK_APP_ID: &str = "bench-scale-sdk-client-000000001";
const SDK_KEY: &str = "bench-scale-sdk-key-3f9d1b";
const SDK_KEY_ENV: &str = "BENCH_SCALE_SDK_KEY";
const PATH: &str = "/v1/mmc/management/conferences/start";
const BODY: &[u8] = br#"{"conferenceID":"914087436","password":"123456"}"#;
const APPAUTH: &str = "/v2/usg/acs/auth/appauth";
/// Both proxies keep an idle keep-alive connection this long (meetgate's
/// `limits.header_read_timeout`, nginx's `keepalive_timeout`): longer than any phase.
const KEEP_IDLE: &str = "600s";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Any one request or connect; a stuck one fails the run rather than hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Concurrent connects while the idle connections are opened.
const OPEN_PARALLEL: usize = 128;
/// Requests (or sign-ins) before the "before" reading of the identity and session phases, so
/// that first-touch allocations (pools, buffers, arenas) are not counted per item.
const WARMUP: usize = 200;

// ---------------------------------------------------------------------------------------------
// /proc readings (the shared ones are in common/process.rs)

/// CPU time of every thread of `pids`, in ns (first field of each task's schedstat: finer than
/// the 10 ms ticks of /proc/<pid>/stat, which matters for a nearly idle process).
fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            total += std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// RSS once it has settled: read every 250 ms (after 1 s) until two readings in a row are
/// within 64 KiB, at most 5 s; the last reading.
async fn settled_rss(pids: &[u32]) -> u64 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut last = rss_kib(pids);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pids);
        if now.abs_diff(last) <= 64 {
            return now;
        }
        last = now;
    }
    last
}

/// The soft limit on open descriptors of this process (children inherit it).
fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()
        })
        .unwrap_or(1024)
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Stops its process when dropped (also on panic, early return and the run's timeout): SIGTERM
/// (nginx's master then stops its workers), SIGKILL after 3 s, and SIGKILL to any worker left.
struct ChildGuard {
    name: &'static str,
    child: Child,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = self.child.id();
        let workers = children_of(pid);
        signal(pid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            if parent_of(w).is_some() {
                signal(w, "KILL");
            }
        }
        eprintln!("stopped {} (pid {pid})", self.name);
    }
}

struct Proxy {
    guard: ChildGuard,
    addr: SocketAddr,
    /// meetgate's admin listener (for its connection gauges); nginx has none.
    admin: Option<SocketAddr>,
}

impl Proxy {
    /// The process and its direct children (nginx's workers).
    fn pids(&self) -> Vec<u32> {
        let pid = self.guard.child.id();
        let mut v = vec![pid];
        v.extend(children_of(pid));
        v
    }
}

/// What the meetgate processes share: sidecar or gateway, a non-binding quota, no access log
/// (nginx logs none either), idle keep-alive connections kept, room for them all.
fn meetgate_config(
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    max_connections: usize,
    extra: &str,
) -> Result<(PathBuf, SocketAddr, SocketAddr), String> {
    let (port, admin) = (free_port()?, free_port()?);
    let toml = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nshutdown_grace = \"2s\"\n\n\
         [upstream]\nurl = \"{}\"\nca_file = {:?}\n\n\
         [[apps]]\nname = \"default\"\napp_id = \"{APP_ID}\"\napp_key_env = \"{KEY_ENV}\"\n\n\
         [log]\nlevel = \"warn\"\n\n\
         [quota]\nenabled = true\nper_api_per_minute = 100000000\nall_env_per_second = 100000000\nburst = 1000000\n\n\
         [limits]\nmax_connections = {max_connections}\nheader_read_timeout = \"{KEEP_IDLE}\"\n\n{extra}",
        sim.url(),
        ca_file.display().to_string(),
    );
    let path = dir.join(format!("meetgate-{port}.toml"));
    std::fs::write(&path, toml).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok((
        path,
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from(([127, 0, 0, 1], admin)),
    ))
}

fn meetgate_binary() -> PathBuf {
    std::env::var_os("SCALE_MEETGATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meetgate")))
}

async fn start_meetgate(
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    max_connections: usize,
    extra: &str,
) -> Result<Proxy, String> {
    let (config, addr, admin) = meetgate_config(dir, sim, ca_file, max_connections, extra)?;
    let out = |ext: &str| {
        std::fs::File::create(dir.join(format!("meetgate-{}.{ext}", addr.port())))
            .map_err(|e| format!("log file: {e}"))
    };
    let child = Command::new(meetgate_binary())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env(KEY_ENV, APP_KEY)
        .env(SDK_KEY_ENV, SDK_KEY)
        .stdin(Stdio::null())
        .stdout(out("stdout")?)
        .stderr(out("stderr")?)
        .spawn()
        .map_err(|e| format!("spawn meetgate: {e}"))?;
    let proxy = Proxy {
        guard: ChildGuard {
            name: "meetgate",
            child,
        },
        addr,
        admin: Some(admin),
    };
    // Ready: the default identity holds a token.
    let started = Instant::now();
    loop {
        let probe = async {
            let mut s = connect(admin).await?;
            let req = http::Request::get("/readyz")
                .header(http::header::HOST, admin.to_string())
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            send(&mut s, req).await
        };
        if matches!(probe.await, Ok((200, _))) {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!("meetgate not ready after {READY_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "meetgate: pid {} on {addr}, ready {} ms after spawn",
        proxy.guard.child.id(),
        started.elapsed().as_millis()
    );
    Ok(proxy)
}

/// nginx doing meetgate's forwarding job as benches/load.rs configures it (plain HTTP in, TLS
/// to the simulator verified against its CA, a fixed X-Access-Token), with room for the idle
/// connections in any one worker, their descriptors, and no access log (meetgate logs none
/// here either).
fn nginx_config(
    dir: &Path,
    port: u16,
    sim: SocketAddr,
    ca_file: &Path,
    token: &str,
    workers: usize,
    conns: usize,
) -> String {
    let d = dir.display();
    format!(
        r#"# Written by benches/scale.rs; see benches/README.md.
worker_processes {workers};
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

events {{
    worker_connections {wc};
}}

http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    access_log off;

    keepalive_requests 1000000;
    keepalive_timeout {KEEP_IDLE};

    upstream sim {{
        server {sim};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        location / {{
            proxy_pass https://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Access-Token "{token}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#,
        nofile = fd_limit(),
        wc = conns + 1024,
        ca = ca_file.display(),
    )
}

fn nginx_binary() -> Option<PathBuf> {
    process::nginx_binary("SCALE_NGINX")
}

async fn start_nginx(
    bin: &Path,
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    token: &str,
    conns: usize,
) -> Result<Proxy, String> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_config(dir, port, sim.addr(), ca_file, token, workers, conns),
    )
    .map_err(|e| format!("write nginx.conf: {e}"))?;
    let out = |name: &str| {
        std::fs::File::create(dir.join(name)).map_err(|e| format!("nginx log file: {e}"))
    };
    // -e: errors before the config is read must not go to /var/log/nginx.
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(out("nginx.stdout")?)
        .stderr(out("nginx.stderr")?)
        .spawn()
        .map_err(|e| format!("spawn nginx: {e}"))?;
    let proxy = Proxy {
        guard: ChildGuard {
            name: "nginx",
            child,
        },
        addr,
        admin: None,
    };
    let started = Instant::now();
    while !matches!(start_request(addr, None).await, Ok(200)) {
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "nginx not ready after {READY_TIMEOUT:?} (see {})",
                dir.join("nginx-error.log").display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "nginx: master pid {} + {workers} workers on {addr}",
        proxy.guard.child.id()
    );
    Ok(proxy)
}

// ---------------------------------------------------------------------------------------------
// Client

type Sender = SendRequest<Full<Bytes>>;
/// Builds request i of a series.
type MakeReq = Arc<dyn Fn(usize) -> http::Request<Full<Bytes>> + Send + Sync>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let connecting = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(sender)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
}

/// One exchange, the body read to the end: (status, body).
/// meetgate's `client_connections` and `client_connections_parked` gauges.
async fn connection_gauges(admin: SocketAddr) -> Result<(String, String), String> {
    let mut s = connect(admin).await?;
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, admin.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let (_, body) = send(&mut s, req).await?;
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or("?")
            .to_owned()
    };
    Ok((
        value("meetgate_client_connections"),
        value("meetgate_client_connections_parked"),
    ))
}

async fn send(
    sender: &mut Sender,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, Bytes), String> {
    let exchange = async {
        sender.ready().await.map_err(|e| format!("ready: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| "request timed out".to_owned())?
}

/// start_meeting as the load bench sends it, as `user` if given (X-Meetgate-User).
fn start_meeting(addr: SocketAddr, user: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::post(PATH)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(u) = user {
        req = req.header("x-meetgate-user", u);
    }
    req.body(Full::new(Bytes::from_static(BODY)))
        .unwrap_or_default()
}

/// A fresh connection, one start_meeting on it, closed: the status.
async fn start_request(addr: SocketAddr, user: Option<&str>) -> Result<u16, String> {
    let mut s = connect(addr).await?;
    Ok(send(&mut s, start_meeting(addr, user)).await?.0)
}

/// `n` fresh-connection requests one after another: each one's time from connect to the end
/// of the response, in ms, sorted.
async fn probes(addr: SocketAddr, n: usize) -> Result<Vec<f64>, String> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        match start_request(addr, None).await? {
            200 => v.push(t.elapsed().as_secs_f64() * 1e3),
            s => return Err(format!("probe: HTTP {s}")),
        }
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `n` requests built by `make(i)` over `parallel` keep-alive connections (connection k
/// sends i = k, k + parallel, ...), each expected to answer 200. The connections are returned
/// open, so the "after" reading is taken with the same connections as the "before" one.
async fn drive(
    senders: Vec<Sender>,
    range: std::ops::Range<usize>,
    make: MakeReq,
) -> Result<Vec<Sender>, String> {
    let parallel = senders.len();
    let mut tasks = Vec::new();
    for (k, mut s) in senders.into_iter().enumerate() {
        let make = make.clone();
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = range.start + k;
            while i < range.end {
                match send(&mut s, make(i)).await? {
                    (200, _) => {}
                    (status, body) => {
                        // An error body names no secret (meetgate's error shapes).
                        return Err(format!(
                            "request {i}: HTTP {status} {}",
                            String::from_utf8_lossy(&body[..body.len().min(200)])
                        ));
                    }
                }
                i += parallel;
            }
            Ok(s)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(|e| format!("driver task: {e}"))??);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Phases

struct Settings {
    conns: usize,
    identities: usize,
    sessions: usize,
    probes: usize,
    idle: Duration,
    parallel: usize,
    phases: Vec<String>,
}

impl Settings {
    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

struct ConnRow {
    name: &'static str,
    rss_before: u64,
    rss_after: u64,
    idle_cpu_pct: f64,
    /// (p50, p99) in ms, without and with the idle connections.
    fresh_none: (f64, f64),
    fresh_idle: (f64, f64),
}

/// Phase 1 for one proxy: fresh-connection probes, `conns` connections each opened and used
/// once then left idle, RSS, idle CPU, the probes again, the connections closed.
async fn idle_connections(name: &'static str, p: &Proxy, s: &Settings) -> Result<ConnRow, String> {
    let pids = p.pids();
    // Unmeasured: the first connections pay for first-touch allocations.
    probes(p.addr, 20).await?;
    let none = probes(p.addr, s.probes).await?;
    let rss_before = settled_rss(&pids).await;

    let opened = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..OPEN_PARALLEL.min(s.conns) {
        let (addr, n) = (p.addr, s.conns);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = k;
            while i < n {
                let mut sender = connect(addr).await?;
                match send(&mut sender, start_meeting(addr, None)).await? {
                    (200, _) => mine.push(sender),
                    (status, _) => return Err(format!("connection {i}: HTTP {status}")),
                }
                i += OPEN_PARALLEL;
            }
            Ok::<_, String>(mine)
        }));
    }
    let mut idle = Vec::with_capacity(s.conns);
    for t in tasks {
        idle.extend(t.await.map_err(|e| format!("opener task: {e}"))??);
    }
    println!(
        "{name}: {} connections opened and used once in {:.1} s",
        idle.len(),
        opened.elapsed().as_secs_f64()
    );
    let rss_after = settled_rss(&pids).await;
    if let Some(admin) = p.admin {
        // Whether the idle connections wait parked (`meetgate_client_connections_parked`).
        let (open, parked) = connection_gauges(admin).await?;
        println!("{name}: {open} client connections open, {parked} of them parked");
    }

    let (cpu0, t0) = (cpu_ns(&pids), Instant::now());
    tokio::time::sleep(s.idle).await;
    let idle_cpu_pct = (cpu_ns(&pids) - cpu0) as f64 / t0.elapsed().as_nanos() as f64 * 100.0;

    let loaded = probes(p.addr, s.probes).await?;
    let closed = idle.iter().filter(|c| c.is_closed()).count();
    if closed > 0 {
        return Err(format!(
            "{name} closed {closed} of the idle connections during the phase"
        ));
    }
    drop(idle);
    Ok(ConnRow {
        name,
        rss_before,
        rss_after,
        idle_cpu_pct,
        fresh_none: (percentile(&none, 0.5), percentile(&none, 0.99)),
        fresh_idle: (percentile(&loaded, 0.5), percentile(&loaded, 0.99)),
    })
}

struct MemRow {
    what: &'static str,
    count: usize,
    rss_before: u64,
    rss_after: u64,
    secs: f64,
    note: String,
}

/// Phase 2: a meetgate of its own; `identities` requests, each as another X-Meetgate-User,
/// over `parallel` connections opened before the "before" reading.
async fn identities(
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    s: &Settings,
) -> Result<MemRow, String> {
    let n = s.identities;
    // Room for every identity (and the default one): none is dropped while counted.
    let extra = format!("[token]\nmax_identities = {}\n", n + WARMUP + 16);
    let p = start_meetgate(dir, sim, ca_file, 1024, &extra).await?;
    let pids = p.pids();
    let mut senders = Vec::new();
    for _ in 0..s.parallel {
        senders.push(connect(p.addr).await?);
    }
    let addr = p.addr;
    // Warm-up: identities of their own (a sign-in each), not counted.
    let warm: MakeReq = Arc::new(move |i| start_meeting(addr, Some(&format!("scale-warm-{i}"))));
    let senders = drive(senders, 0..WARMUP, warm).await?;
    let rss_before = settled_rss(&pids).await;
    let sign_ins = sim.sign_in_count();
    let t = Instant::now();
    let users: MakeReq =
        Arc::new(move |i| start_meeting(addr, Some(&format!("scale-user-{i:06}"))));
    let senders = drive(senders, 0..n, users).await?;
    let secs = t.elapsed().as_secs_f64();
    let rss_after = settled_rss(&pids).await;
    let signed = sim.sign_in_count() - sign_ins;
    drop(senders);
    Ok(MemRow {
        what: "identity",
        count: n,
        rss_before,
        rss_after,
        secs,
        note: format!("{signed} upstream sign-ins, {} connections", s.parallel),
    })
}

/// Phase 3: a meetgate with one SDK client; `sessions` App ID sign-ins (`appauth`, signed as
/// the official SDK signs them, each with its own user and nonce) over `parallel` connections.
async fn sessions(
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    s: &Settings,
) -> Result<MemRow, String> {
    let n = s.sessions;
    let extra = format!(
        "[[clients]]\nname = \"sdk-bench\"\napp_id = \"{SDK_APP_ID}\"\napp_key_env = \"{SDK_KEY_ENV}\"\nusers = [\"*\"]\n\n\
         [sdk]\nmax_sessions = {}\n",
        (n + WARMUP + 16).max(100_000)
    );
    let p = start_meetgate(dir, sim, ca_file, 1024, &extra).await?;
    let pids = p.pids();
    let mut senders = Vec::new();
    for _ in 0..s.parallel {
        senders.push(connect(p.addr).await?);
    }
    let addr = p.addr;
    let sign_in = move |user: String| {
        let expire = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 600;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let input = SignInput {
            app_id: SDK_APP_ID,
            corp_id: None,
            user_id: &user,
            expire_time: expire,
            nonce: &nonce,
        };
        let body = serde_json::json!({
            "appId": SDK_APP_ID, "userId": user, "corpId": null, "expireTime": expire,
            "nonce": nonce, "clientType": 72, "deptCode": null,
        });
        http::Request::post(APPAUTH)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::AUTHORIZATION,
                authorization_header(&input, SDK_KEY.as_bytes()),
            )
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_default()
    };
    let sign_in = Arc::new(sign_in);
    let f = sign_in.clone();
    let warm: MakeReq = Arc::new(move |i| f(format!("sdk-warm-{i}")));
    let senders = drive(senders, 0..WARMUP, warm).await?;
    let rss_before = settled_rss(&pids).await;
    let t = Instant::now();
    let f = sign_in.clone();
    let users: MakeReq = Arc::new(move |i| f(format!("sdk-user-{i:06}")));
    let senders = drive(senders, 0..n, users).await?;
    let secs = t.elapsed().as_secs_f64();
    let rss_after = settled_rss(&pids).await;
    drop(senders);
    Ok(MemRow {
        what: "SDK session",
        count: n,
        rss_before,
        rss_after,
        secs,
        note: format!(
            "appauth sign-ins, a nonce kept each, {} connections",
            s.parallel
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_conns(rows: &[ConnRow], s: &Settings) {
    println!();
    println!(
        "idle connections: {} keep-alive connections, each used for one request; idle CPU over {:.0} s; {} sequential fresh-connection requests (connect to end of response) without and with them",
        s.conns,
        s.idle.as_secs_f64(),
        s.probes
    );
    println!(
        "{:<9} {:>11} {:>10} {:>9} {:>9} {:>15} {:>15} {:>10}",
        "proxy",
        "RSS before",
        "RSS after",
        "per conn",
        "idle CPU",
        "fresh p50/p99",
        "with idle",
        "added p50"
    );
    for r in rows {
        let per = (r.rss_after.saturating_sub(r.rss_before)) as f64 * 1024.0 / s.conns as f64;
        println!(
            "{:<9} {:>7.1} MiB {:>6.1} MiB {:>7.0} B {:>8.2}% {:>6.3}/{:<6.3}ms {:>6.3}/{:<6.3}ms {:>7.3} ms",
            r.name,
            mib(r.rss_before),
            mib(r.rss_after),
            per,
            r.idle_cpu_pct,
            r.fresh_none.0,
            r.fresh_none.1,
            r.fresh_idle.0,
            r.fresh_idle.1,
            r.fresh_idle.0 - r.fresh_none.0,
        );
    }
    if let [mg, ng] = rows {
        println!(
            "meetgate/nginx: RSS with the connections {:.2}x, per connection {:.2}x",
            mg.rss_after as f64 / ng.rss_after as f64,
            mg.rss_after.saturating_sub(mg.rss_before) as f64
                / ng.rss_after.saturating_sub(ng.rss_before).max(1) as f64
        );
    }
}

fn print_mem(rows: &[MemRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<12} {:>7} {:>11} {:>10} {:>9} {:>8}  how",
        "item", "count", "RSS before", "RSS after", "per item", "took"
    );
    for r in rows {
        println!(
            "{:<12} {:>7} {:>7.1} MiB {:>6.1} MiB {:>7.0} B {:>6.1} s  {}",
            r.what,
            r.count,
            mib(r.rss_before),
            mib(r.rss_after),
            r.rss_after.saturating_sub(r.rss_before) as f64 * 1024.0 / r.count as f64,
            r.secs,
            r.note
        );
    }
}

async fn bench(s: &Settings, dir: &Path) -> Result<(), String> {
    let sim = simulator::start(SimConfig {
        apps: vec![SimApp::new(APP_ID, APP_KEY)],
        limits: SimLimits::unlimited(),
        // One token per identity for the whole run; nginx's fixed one stays valid.
        token_lifetime: Duration::from_secs(12 * 3600),
        record_bodies: false,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let ca_file = dir.join("sim-ca.pem");
    std::fs::write(&ca_file, sim.ca_pem()).map_err(|e| format!("write CA: {e}"))?;
    println!("simulator: {} (in this process)", sim.url());

    let mut conn_rows = Vec::new();
    if s.runs("conns") {
        let mg = start_meetgate(dir, &sim, &ca_file, s.conns + 1024, "").await?;
        conn_rows.push(idle_connections("meetgate", &mg, s).await?);
        drop(mg);
        match nginx_binary() {
            None => println!("nginx: not found or SCALE_NGINX=off; the nginx side is skipped"),
            Some(bin) => {
                // A token meetgate obtained: valid for the whole run.
                let token = sim
                    .issued_tokens()
                    .into_iter()
                    .next()
                    .ok_or("the simulator issued no token")?;
                let ng = start_nginx(&bin, dir, &sim, &ca_file, &token, s.conns).await?;
                conn_rows.push(idle_connections("nginx", &ng, s).await?);
                drop(ng);
            }
        }
        print_conns(&conn_rows, s);
    }
    let mut mem_rows = Vec::new();
    if s.runs("identities") {
        mem_rows.push(identities(dir, &sim, &ca_file, s).await?);
        print_mem(&mem_rows[mem_rows.len() - 1..]);
    }
    if s.runs("sessions") {
        mem_rows.push(sessions(dir, &sim, &ca_file, s).await?);
        print_mem(&mem_rows[mem_rows.len() - 1..]);
    }
    if !conn_rows.is_empty() || !mem_rows.is_empty() {
        println!("\nsummary");
        if !conn_rows.is_empty() {
            print_conns(&conn_rows, s);
        }
        print_mem(&mem_rows);
    }
    sim.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let began = Instant::now();
    let limit = fd_limit() as usize;
    let mut conns = env_or("SCALE_CONNS", 10_000_usize).max(1);
    // This process holds every idle connection plus the simulator's and a margin.
    if conns + 512 > limit {
        let fit = limit.saturating_sub(512).max(1);
        println!("SCALE_CONNS={conns} does not fit the descriptor limit {limit}: {fit} instead");
        conns = fit;
    }
    let settings = Settings {
        conns,
        identities: env_or("SCALE_IDENTITIES", 10_000_usize).max(1),
        sessions: env_or("SCALE_SESSIONS", 100_000_usize).max(1),
        probes: env_or("SCALE_PROBES", 200_usize).max(1),
        idle: Duration::from_secs_f64(env_or("SCALE_IDLE_SECS", 5.0_f64).max(0.5)),
        parallel: env_or("SCALE_PARALLEL", 8_usize).max(1),
        phases: std::env::var("SCALE_PHASES")
            .unwrap_or_else(|_| "conns,identities,sessions".into())
            .split(',')
            .map(|p| p.trim().to_owned())
            .collect(),
    };
    let timeout = Duration::from_secs_f64(env_or("SCALE_TIMEOUT", 600.0_f64).max(10.0));
    let dir = match tempfile::Builder::new().prefix("meetgate-scale-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("scale bench: temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scale bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On timeout the bench's future is dropped: every child process is stopped by its guard.
    let result = runtime.block_on(async {
        tokio::time::timeout(timeout, bench(&settings, dir.path()))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the run took longer than SCALE_TIMEOUT ({timeout:?})"
                ))
            })
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if std::env::var_os("SCALE_KEEP_DIR").is_some() {
        println!("configs and logs kept in {}", dir.keep().display());
    }
    println!("total runtime {:.1} s", began.elapsed().as_secs_f64());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
