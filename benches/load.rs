//! Load benchmark: meetgate (the release binary, as a subprocess) against nginx and a direct
//! client, all in front of the in-process simulator on loopback. `cargo bench --bench load`;
//! what it measures and how to read it is in `benches/README.md`.
//!
//! Environment: `LOAD_SECONDS` (per run, default 5), `LOAD_ROUNDS` (default 3),
//! `LOAD_CONNS` (comma list, default `1,16,64`), `LOAD_VARIANTS` (comma list of the
//! `LAYER_VARIANTS` to run besides `meetgate`; default all), `LOAD_NGINX` (`off`, or the nginx
//! binary), `LOAD_KEEP_DIR=1` (keep the temp dir with the configs and logs), `LOAD_BARE=off`
//! (skip the bare hyper forwarder), `LOAD_BASELINE=BINARY` (also run another meetgate build,
//! e.g. the last commit's, as `mg-baseline`), `LOAD_MEETGATE=BINARY` (run that build instead
//! of Cargo's for the layer variants, e.g. `target/pgo/meetgate`), `LOAD_PERF_OUT=FILE`
//! (`perf record` meetgate, or the variant named by `LOAD_PERF_TARGET`, in one extra,
//! unreported run at 16 connections, or the first connection count given, after the rounds;
//! `LOAD_PERF_TOOL=strace` counts its system calls with `strace -c` instead).
//!
//! The target set: `LOAD_UPSTREAM=http1` (the simulator offers only HTTP/1.1 in ALPN),
//! `LOAD_LOG=json` (meetgate's and nginx's access logs as JSON), `LOAD_INBOUND=tls|h2c|h2`
//! (clients over TLS 1.3 with resumed sessions, HTTP/2 with prior knowledge, or HTTP/2 over
//! TLS; rows named `meetgate-tls`, `nginx-h2c`, ...), `LOAD_H2_CONNECTIONS` (the connections
//! an HTTP/2 run's streams share, default 1; `LOAD_CONNS` counts streams then),
//! `LOAD_NEW_CONN=1` (each request on a new connection: the handshake rate).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use meetgate::simulator::{self, DebugHeaders, SimApp, SimConfig, SimHandle, SimLimits};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[path = "common/process.rs"]
mod process;
use process::{children_of, env_or, free_port, rss_kib, signal, status_kib};

const APP_ID: &str = "bench-load-app-0123456789abcdef0";
const APP_KEY: &str = "bench-load-app-key-5b1f0c";
/// meetgate reads the key from this variable, set only in the child's environment.
const KEY_ENV: &str = "BENCH_MEETGATE_APP_KEY";
const PATH: &str = "/v1/mmc/management/conferences/start";
const BODY: &[u8] = br#"{"conferenceID":"914087436","password":"123456"}"#;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Each target is driven this long at the highest connection count before round 1, unmeasured,
/// so round 1 does not pay for first-touch allocations and pool growth.
const WARMUP: Duration = Duration::from_secs(1);

/// Quota settings that keep the layer doing its per-request work (classify, bucket lookup, two
/// GCRA checks, counter parsing) while never making a request wait.
const NON_BINDING_QUOTA: &str = "[quota]\nenabled = true\nper_api_per_minute = 100000000\n\
     all_env_per_second = 100000000\nburst = 1000000\n";

/// The meetgate processes to run, each with TOML added to the common config: a `[quota]` or
/// `[log]` table replaces the default one (`NON_BINDING_QUOTA`, text access log at INFO), a
/// line starting with `upstream.` goes into the `[upstream]` section, and one starting with
/// `top.` is a top-level key. The first is the one compared with nginx; the others are
/// compared with it, which is how the cost of a layer is measured (on vs off). The token layer
/// cannot be switched off by configuration; nginx, which injects a fixed token, stands for
/// "no token layer".
const LAYER_VARIANTS: &[(&str, &str)] = &[
    ("meetgate", ""),
    ("mg-quota-off", "[quota]\nenabled = false\n"),
    ("mg-log-off", "[log]\nlevel = \"warn\"\n"),
    ("mg-control-off", "[control]\nenabled = false\n"),
    // One worker thread instead of one per core.
    ("mg-1worker", "top.workers = 1\n"),
    // HTTP/1.1 keep-alive to the upstream, as nginx does.
    ("mg-http1", "upstream.http2 = false\n"),
    // HTTP/2 even for a worker's single client connection (the default before it had a rule).
    ("mg-h2", "upstream.http1_for_single_client = false\n"),
    // Traces on, every request sampled / one in a hundred, exported to the bench's OTLP sink.
    (
        "mg-trace-1",
        "[tracing]\notlp_endpoint = \"http://{otlp}\"\nsample_ratio = 1.0\n",
    ),
    (
        "mg-trace-0.01",
        "[tracing]\notlp_endpoint = \"http://{otlp}\"\nsample_ratio = 0.01\n",
    ),
];

/// An OTLP/HTTP collector that reads and drops what it gets (the traced variants export to
/// it): its address, and the export requests it answered.
async fn otlp_sink() -> Result<(SocketAddr, Arc<std::sync::atomic::AtomicU64>), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("otlp sink: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("otlp sink: {e}"))?;
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let counted = counted.clone();
                        async move {
                            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok((addr, count))
}

/// `LOAD_BASELINE=BINARY`: also runs that meetgate build (another commit's), as this variant,
/// with the default configuration: an A/B comparison in the same run.
const BASELINE: &str = "mg-baseline";
const BASELINE_ENV: &str = "LOAD_BASELINE";
/// `LOAD_MEETGATE=BINARY`: the build the layer variants run instead of the one Cargo built
/// for this bench, e.g. the profile-guided `target/pgo/meetgate` (`deploy/build-pgo`).
const MEETGATE_ENV: &str = "LOAD_MEETGATE";

/// The meetgate variants of this run: the layer variants, and the baseline build if given.
fn meetgate_targets() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = LAYER_VARIANTS.iter().map(|v| v.0).collect();
    if std::env::var_os(BASELINE_ENV).is_some() {
        names.push(BASELINE);
    }
    names
}

const NGINX: &str = "nginx";
const DIRECT: &str = "direct";

// ---------------------------------------------------------------------------------------------
// The target set: how clients reach the proxies and what the upstream speaks.

/// `LOAD_INBOUND`: how the load generator (and the readiness check) reach every proxy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Inbound {
    /// Plain HTTP/1.1 (the default).
    Plain,
    /// HTTP/1.1 over TLS 1.3 (`[tls]`; nginx `listen ssl`), sessions resumed.
    Tls,
    /// HTTP/2 with prior knowledge over plain TCP (nginx `listen ... http2`).
    H2c,
    /// HTTP/2 over TLS 1.3 (ALPN h2).
    H2Tls,
}

/// The run's target set, from the environment once (see the module doc).
struct TargetSet {
    inbound: Inbound,
    /// `LOAD_UPSTREAM=http1`: the simulator offers only HTTP/1.1 in ALPN (as the cloud's own
    /// exchange shows), so every proxy forwards over HTTP/1.1 keep-alive.
    upstream_http1: bool,
    /// `LOAD_LOG=json`: meetgate's access log as JSON lines, and nginx's too (`escape=json`).
    json_log: bool,
    /// `LOAD_NEW_CONN=1`: every request on a new connection (over TLS, a resumed handshake).
    new_conn: bool,
    /// `LOAD_H2_CONNECTIONS` (1): the connections an HTTP/2 run's streams share.
    h2_connections: usize,
    /// The proxies' listener certificate and the client config trusting it, when inbound TLS.
    inbound_tls: std::sync::OnceLock<TlsConnector>,
    /// The listener's certificate chain and key files, when inbound TLS.
    listener_cert: std::sync::OnceLock<(PathBuf, PathBuf)>,
}

static TARGET_SET: std::sync::OnceLock<TargetSet> = std::sync::OnceLock::new();

fn target_set() -> &'static TargetSet {
    TARGET_SET.get_or_init(|| {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        TargetSet {
            inbound: match var("LOAD_INBOUND").as_str() {
                "tls" => Inbound::Tls,
                "h2c" => Inbound::H2c,
                "h2" => Inbound::H2Tls,
                _ => Inbound::Plain,
            },
            upstream_http1: var("LOAD_UPSTREAM") == "http1",
            json_log: var("LOAD_LOG") == "json",
            new_conn: var("LOAD_NEW_CONN") == "1",
            h2_connections: env_or("LOAD_H2_CONNECTIONS", 1_usize).max(1),
            inbound_tls: std::sync::OnceLock::new(),
            listener_cert: std::sync::OnceLock::new(),
        }
    })
}

impl TargetSet {
    fn tls(&self) -> bool {
        matches!(self.inbound, Inbound::Tls | Inbound::H2Tls)
    }

    /// What every row's name carries for this set (`meetgate-tls`, `nginx-h2c`, ...).
    fn suffix(&self) -> &'static str {
        match self.inbound {
            Inbound::Plain => "",
            Inbound::Tls => "-tls",
            Inbound::H2c => "-h2c",
            Inbound::H2Tls => "-h2-tls",
        }
    }

    fn describe(&self) -> String {
        format!(
            "inbound {:?}{}{}, upstream {}, {} access logs",
            self.inbound,
            if self.new_conn {
                ", a new connection per request"
            } else {
                ""
            },
            if matches!(self.inbound, Inbound::H2c | Inbound::H2Tls) {
                format!(", streams over {} connection(s)", self.h2_connections)
            } else {
                String::new()
            },
            if self.upstream_http1 {
                "HTTP/1.1 only"
            } else {
                "offering HTTP/2"
            },
            if self.json_log { "JSON" } else { "text" },
        )
    }
}

/// A target's name as its rows show it.
fn label(name: &str) -> String {
    format!("{name}{}", target_set().suffix())
}

/// The listener certificate meetgate and nginx both serve over TLS (written to `dir`), and
/// the client configuration trusting it, with TLS 1.3 session resumption (rustls' default
/// in-memory cache, shared by every connection the generator opens).
fn inbound_tls(dir: &Path) -> Result<(), String> {
    let cert = simulator::tls::generate_default_cert(&["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| format!("listener certificate: {e}"))?;
    let (cert_file, key_file) = (dir.join("listener.pem"), dir.join("listener.key"));
    std::fs::write(&cert_file, &cert.cert_pem).map_err(|e| format!("write cert: {e}"))?;
    std::fs::write(&key_file, &cert.key_pem).map_err(|e| format!("write key: {e}"))?;
    let roots = CertificateDer::pem_slice_iter(cert.ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA PEM: {e}"))?;
    let mut tls = meetgate::upstream::tls_config(&roots).map_err(|e| format!("TLS config: {e}"))?;
    tls.alpn_protocols = if target_set().inbound == Inbound::H2Tls {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let _ = target_set()
        .inbound_tls
        .set(TlsConnector::from(Arc::new(tls)));
    let _ = target_set().listener_cert.set((cert_file, key_file));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /proc readings

/// Clock ticks per second for /proc/<pid>/stat; `getconf` avoids a libc dependency.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Fields after the `(comm)` of /proc/<pid>/stat: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    stat_fields_at(&format!("/proc/{pid}/stat"))
}

/// As [`stat_fields`], of any `stat` file (a process's or a thread's).
fn stat_fields_at(path: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The simulator thread's id, set once it runs: its CPU time is read apart from the
/// generator's.
static SIM_TID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// utime + stime of the simulator thread, in ticks; 0 if unknown.
fn sim_cpu_ticks() -> u64 {
    let (user, system) = SIM_TID
        .get()
        .map(|tid| user_system_ticks_at(&format!("/proc/self/task/{tid}/stat")))
        .unwrap_or((0, 0));
    user + system
}

/// utime + stime in ticks (fields 14 and 15), all threads.
fn cpu_ticks(pid: u32) -> u64 {
    let (user, system) = user_system_ticks(pid);
    user + system
}

/// utime and stime in ticks, all threads.
fn user_system_ticks(pid: u32) -> (u64, u64) {
    user_system_ticks_at(&format!("/proc/{pid}/stat"))
}

/// utime and stime (fields 14 and 15) of any `stat` file; zeros if unreadable.
fn user_system_ticks_at(path: &str) -> (u64, u64) {
    stat_fields_at(path)
        .and_then(|f| Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?)))
        .unwrap_or((0, 0))
}

/// Busy and total jiffies of the whole host (first line of /proc/stat).
fn host_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        // user nice system idle iowait irq softirq steal; guest time is already in user.
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy; steal is (another guest took the CPU).
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Samples the summed VmRSS of `pids` every 20 ms on its own thread (so a saturated runtime
/// cannot starve it) and returns the peak when stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(&pids));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(rss_kib(&pids))
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Kills its process (and, for nginx, the workers) when dropped, also on panic and early
/// return, so a failed bench leaves nothing listening.
struct ChildGuard {
    name: String,
    child: Child,
    /// SIGTERM first, then SIGKILL if still running 3 s later. nginx: its master forks the
    /// workers, which a SIGKILL of the master would orphan. meetgate: a profiling build writes
    /// its profile only when it exits by itself.
    graceful: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = self.child.id();
        let workers = children_of(pid);
        let mut exited = false;
        if self.graceful {
            signal(pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            if stat_fields(w).is_some() {
                signal(w, "KILL");
            }
        }
        let how = match (self.graceful, exited) {
            (true, true) => "exited on SIGTERM",
            (true, false) => "killed: still running 3 s after SIGTERM",
            (false, _) => "killed",
        };
        eprintln!("stopped {} (pid {pid}): {how}", self.name);
    }
}

/// One proxy under test.
struct Proxy {
    name: String,
    addr: SocketAddr,
    guard: ChildGuard,
    /// Its access log (the file is truncated between runs, which keeps the disk bounded: the
    /// writer opened it O_APPEND). Lines other than 200 access lines, and every other log
    /// line, are kept in `<name>-kept.log` (the first ones) before the log is truncated.
    log: LogFormat,
    /// Lines kept so far, and the first of them.
    kept: std::cell::RefCell<(usize, Option<String>)>,
    startup: Duration,
    idle_rss_kib: u64,
}

impl Proxy {
    /// The process and its direct children (nginx workers).
    fn pids(&self) -> Vec<u32> {
        let pid = self.guard.child.id();
        let mut v = vec![pid];
        v.extend(children_of(pid));
        v
    }

    /// utime and stime of the process(es), in ticks.
    fn user_system_ticks(&self) -> (u64, u64) {
        self.pids()
            .iter()
            .map(|p| user_system_ticks(*p))
            .fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps))
    }

    /// Access-log lines since the last call; truncates the file. Waits first until the file
    /// stops growing: meetgate writes its log in batches (up to 10 ms late).
    fn take_access_lines(&self) -> LogView {
        const KEEP_AT_MOST: usize = 10_000;
        let len = || std::fs::metadata(&self.log.path).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(2);
        let (mut last, mut still) = (len(), 0);
        while still < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = len();
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log.path) {
            let _ = f.read_to_string(&mut text);
        }
        let mut view = LogView::default();
        let mut kept = self.kept.borrow_mut();
        let (total_key, upstream_key, unit) = self.log.time_fields;
        let field = |line: &str, key: &str| -> Option<f64> {
            let v = &line[line.find(key)? + key.len()..];
            let v = v.split([' ', ',']).next()?;
            v.parse::<f64>().ok().map(|x| x * unit)
        };
        let mut out = String::new();
        for line in text.lines() {
            let access = line.contains(self.log.marker);
            view.lines += usize::from(access);
            let ok = access && line.contains(self.log.ok);
            if ok {
                view.total_ms.extend(field(line, total_key));
                view.upstream_ms.extend(field(line, upstream_key));
            } else {
                kept.0 += 1;
                if kept.1.is_none() {
                    kept.1 = Some(line.to_owned());
                }
                if kept.0 <= KEEP_AT_MOST {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        if !out.is_empty() {
            let path = self
                .log
                .path
                .with_file_name(format!("{}-kept.log", self.name));
            if let Ok(mut f) = append_file(&path) {
                let _ = std::io::Write::write_all(&mut f, out.as_bytes());
            }
        }
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.log.path) {
            let _ = f.set_len(0);
        }
        view
    }
}

/// What one run's access-log lines say.
#[derive(Default)]
struct LogView {
    lines: usize,
    /// Of the 200s: the proxy's own request time and upstream time, ms.
    total_ms: Vec<f64>,
    upstream_ms: Vec<f64>,
}

impl LogView {
    /// (p50, p99) of the total and upstream times.
    fn percentiles(mut self) -> [f64; 4] {
        let p = |v: &mut Vec<f64>, q: f64| {
            if v.is_empty() {
                return f64::NAN;
            }
            v.sort_by(f64::total_cmp);
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        [
            p(&mut self.total_ms, 0.5),
            p(&mut self.total_ms, 0.99),
            p(&mut self.upstream_ms, 0.5),
            p(&mut self.upstream_ms, 0.99),
        ]
    }
}

fn meetgate_config(
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    extra: &str,
) -> Result<(PathBuf, SocketAddr), String> {
    let port = free_port()?;
    let admin = free_port()?;
    // A variant may bring its own `[log]` (e.g. `level = "warn"`: no access log) and `[quota]`.
    let log = match (extra.contains("[log]"), target_set().json_log) {
        (true, _) => "",
        (false, false) => "[log]\nformat = \"text\"\nlevel = \"info\"\n",
        (false, true) => "[log]\nformat = \"json\"\nlevel = \"info\"\n",
    };
    let tls = match target_set().listener_cert.get() {
        Some((cert, key)) => format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        None => String::new(),
    };
    let quota = if extra.contains("[quota]") {
        ""
    } else {
        NON_BINDING_QUOTA
    };
    // The lines with `prefix`, without it; `""` picks the lines with neither prefix.
    let lines = |prefix: &str| -> String {
        extra
            .lines()
            .filter_map(|l| match prefix {
                "" => (!l.starts_with("upstream.") && !l.starts_with("top.")).then_some(l),
                p => l.strip_prefix(p),
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let (top_extra, upstream_extra, extra) = (lines("top."), lines("upstream."), lines(""));
    // The drain fits in the 3 s a stop waits after SIGTERM, so a profiling build always exits
    // by itself and writes its profile.
    let toml = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         shutdown_grace = \"2s\"\n{top_extra}\n\
         [upstream]\nurl = \"{}\"\nca_file = {:?}\n{upstream_extra}\n\
         [[apps]]\nname = \"default\"\napp_id = \"{APP_ID}\"\napp_key_env = \"{KEY_ENV}\"\n\n\
         {log}\n{quota}\n{tls}\n{extra}",
        sim.url(),
        ca_file.display().to_string(),
    );
    let path = dir.join(format!("meetgate-{port}.toml"));
    std::fs::write(&path, toml).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok((path, SocketAddr::from(([127, 0, 0, 1], port))))
}

fn append_file(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

/// How a proxy's access log is read: its file, the substring marking an access line, the one
/// marking a 200, and the fields with its own total and upstream times (with a leading space,
/// so `rt=` does not match `urt=`) and their unit in ms.
struct LogFormat {
    path: PathBuf,
    marker: &'static str,
    ok: &'static str,
    time_fields: (&'static str, &'static str, f64),
}

/// Spawns `cmd` (its arguments and output already set) and waits until it answers.
async fn spawn_proxy(
    name: &str,
    mut cmd: Command,
    addr: SocketAddr,
    graceful: bool,
    log: LogFormat,
) -> Result<Proxy, String> {
    let spawned = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", cmd.get_program().to_string_lossy()))?;
    let guard = ChildGuard {
        name: name.to_owned(),
        child,
        graceful,
    };
    let startup = wait_ready(name, &proxy_target(addr), spawned, &guard).await?;
    let pid = guard.child.id();
    let ready_ms = startup.as_secs_f64() * 1e3;
    match children_of(pid).len() {
        0 => println!("{name}: pid {pid} on {addr}, ready {ready_ms:.0} ms after spawn"),
        n => println!(
            "{name}: master pid {pid} + {n} workers on {addr}, ready {ready_ms:.0} ms after spawn"
        ),
    }
    Ok(Proxy {
        name: name.to_owned(),
        addr,
        guard,
        log,
        kept: Default::default(),
        startup,
        idle_rss_kib: 0,
    })
}

async fn start_meetgate(
    name: &str,
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    extra: &str,
) -> Result<Proxy, String> {
    let (bin, chosen_by) = meetgate_binary(name);
    if !bin.exists() {
        return Err(if let Some(var) = chosen_by {
            format!("{var}={}: no such file", bin.display())
        } else {
            format!(
                "{} is missing; `cargo bench --bench load` builds it (or run `cargo build --release`)",
                bin.display()
            )
        });
    }
    let (config, addr) = meetgate_config(dir, sim, ca_file, extra)?;
    let log = dir.join(format!("{name}.log"));
    if let Some(var) = chosen_by {
        println!("{name}: runs {} ({var})", bin.display());
    }
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env(KEY_ENV, APP_KEY)
        .stdout(append_file(&log)?)
        .stderr(append_file(&dir.join(format!("{name}.stderr")))?);
    let format = if target_set().json_log {
        LogFormat {
            path: log,
            marker: "meetgate::access",
            ok: "\"status\":200,",
            time_fields: ("\"total_ms\":", "\"upstream_ms\":", 1.0),
        }
    } else {
        LogFormat {
            path: log,
            marker: "meetgate::access",
            ok: " status=200 ",
            time_fields: (" total_ms=", " upstream_ms=", 1.0),
        }
    };
    // Stopped with SIGTERM first: an instrumented build writes its profile as it exits.
    spawn_proxy(name, cmd, addr, true, format).await
}

/// The binary a meetgate target runs, and the variable that chose it (none: Cargo's build).
fn meetgate_binary(name: &str) -> (PathBuf, Option<&'static str>) {
    let var = if name == BASELINE {
        BASELINE_ENV
    } else {
        MEETGATE_ENV
    };
    match std::env::var_os(var) {
        Some(b) => (PathBuf::from(b), Some(var)),
        None => (PathBuf::from(env!("CARGO_BIN_EXE_meetgate")), None),
    }
}

fn nginx_config(
    dir: &Path,
    port: u16,
    sim: SocketAddr,
    ca_file: &Path,
    token: &str,
    workers: usize,
) -> String {
    let d = dir.display();
    let set = target_set();
    let listen = match set.inbound {
        Inbound::Plain => "",
        Inbound::Tls => " ssl",
        Inbound::H2c => " http2",
        Inbound::H2Tls => " ssl http2",
    };
    // The same certificate as meetgate's; TLS 1.3 only, sessions resumed with tickets (the
    // key shared by the workers) as meetgate resumes them.
    let tls = match set.listener_cert.get() {
        Some((cert, key)) => format!(
            "        ssl_certificate {};\n        ssl_certificate_key {};\n        \
             ssl_protocols TLSv1.3;\n        ssl_session_cache shared:SSL:10m;\n        \
             ssl_session_tickets on;\n",
            cert.display(),
            key.display()
        ),
        None => String::new(),
    };
    // The simulator's leaf names `localhost` and `127.0.0.1`; nginx checks the name with
    // X509_check_host, which does not match IP SANs, so verify against `localhost`.
    format!(
        r#"# Written by benches/load.rs; see benches/README.md.
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    log_format bench '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                     'rt=$request_time urt=$upstream_response_time '
                     'upstream_request_id=$upstream_http_x_request_id';
    log_format benchjson escape=json '{{"time":"$time_iso8601","client":"$remote_addr",'
                     '"method":"$request_method","path":"$uri","status":$status,'
                     '"bytes":$body_bytes_sent,"rt":$request_time,'
                     '"urt":$upstream_response_time,'
                     '"upstream_request_id":"$upstream_http_x_request_id"}}';
    access_log {d}/nginx-access.log {log_format};

    # nginx closes a keep-alive connection after 1000 requests by default; meetgate does not,
    # so both sides are lifted to keep connection churn out of the comparison.
    keepalive_requests 1000000;

    upstream sim {{
        server {sim};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port}{listen};
{tls}

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
        ca = ca_file.display(),
        log_format = if set.json_log { "benchjson" } else { "bench" },
    )
}

async fn start_nginx(
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    token: &str,
    workers: usize,
) -> Result<Proxy, String> {
    let Some(bin) = nginx_binary() else {
        return Err("nginx not found".into());
    };
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_config(dir, port, sim.addr(), ca_file, token, workers),
    )
    .map_err(|e| format!("write {}: {e}", conf.display()))?;
    // -e: errors before the config is read must not go to /var/log/nginx.
    let mut cmd = Command::new(&bin);
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(&conf)
        .stdout(append_file(&dir.join("nginx.stdout"))?)
        .stderr(append_file(&dir.join("nginx.stderr"))?);
    let format = if target_set().json_log {
        LogFormat {
            path: dir.join("nginx-access.log"),
            marker: "\"upstream_request_id\":",
            ok: "\"status\":200,",
            time_fields: ("\"rt\":", "\"urt\":", 1000.0),
        }
    } else {
        LogFormat {
            path: dir.join("nginx-access.log"),
            marker: "upstream_request_id=",
            ok: "\" 200 ",
            time_fields: (" rt=", " urt=", 1000.0),
        }
    };
    spawn_proxy(NGINX, cmd, addr, true, format).await
}

/// `LOAD_NGINX`: `off`, or the binary to use; otherwise `nginx` from `PATH` or `/usr/sbin`.
fn nginx_binary() -> Option<PathBuf> {
    process::nginx_binary("LOAD_NGINX")
}

/// Polls with start_meeting until a 200; returns the time since spawn.
async fn wait_ready(
    name: &str,
    target: &Target,
    spawned: Instant,
    guard: &ChildGuard,
) -> Result<Duration, String> {
    let mut last = String::from("no answer");
    while spawned.elapsed() < READY_TIMEOUT {
        match connect(target).await {
            Ok(mut sender) => match send(&mut sender, target).await {
                Ok(200) => return Ok(spawned.elapsed()),
                Ok(status) => last = format!("HTTP {status}"),
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
        if stat_fields(guard.child.id()).is_none_or(|f| f.first().is_some_and(|s| s == "Z")) {
            return Err(format!("{name} exited during start-up (see its log)"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(format!(
        "{name} not ready after {READY_TIMEOUT:?}; last: {last}"
    ))
}

// ---------------------------------------------------------------------------------------------
// Load generator: C keep-alive connections (HTTP/1.1), or C streams over a few HTTP/2
// connections, each sending requests back to back.

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// TLS to the target: the client configuration (one per target set, so TLS 1.3 sessions
    /// are resumed across its connections, as a client library's shared config does).
    tls: Option<TlsConnector>,
    /// Direct: the token the proxies would inject.
    token: Option<String>,
    /// HTTP/2 (prior knowledge over plain TCP, or ALPN h2 over TLS).
    h2: bool,
}

/// How the proxies are reached in this run's target set (`LOAD_INBOUND`).
fn proxy_target(addr: SocketAddr) -> Target {
    let set = target_set();
    Target {
        addr,
        tls: set.inbound_tls.get().cloned(),
        token: None,
        h2: matches!(set.inbound, Inbound::H2c | Inbound::H2Tls),
    }
}

enum Sender {
    H1(SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Another stream on the same HTTP/2 connection; `None` for HTTP/1.1.
    fn stream(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }
}

async fn handshake<IO>(io: IO, h2: bool) -> Result<Sender, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }
}

async fn connect(t: &Target) -> Result<Sender, String> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", t.addr))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    match &t.tls {
        None => handshake(tcp, t.h2).await,
        Some(tls) => {
            let name = ServerName::IpAddress(t.addr.ip().into());
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            handshake(stream, t.h2).await
        }
    }
}

/// One exchange, body read to the end; the status.
async fn send(sender: &mut Sender, t: &Target) -> Result<u16, String> {
    let mut req = http::Request::post(PATH)
        .header(http::header::HOST, t.addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/json");
    if t.h2 {
        // HTTP/2 carries the scheme and authority as pseudo-headers: an absolute URI.
        let scheme = if t.tls.is_some() { "https" } else { "http" };
        req = http::Request::post(format!("{scheme}://{}{PATH}", t.addr))
            .header(http::header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = &t.token {
        req = req.header("x-access-token", token.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from_static(BODY)))
        .map_err(|e| format!("request: {e}"))?;
    let resp = match sender {
        Sender::H1(s) => {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            s.send_request(req).await
        }
        Sender::H2(s) => {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            s.send_request(req).await
        }
    }
    .map_err(|e| format!("send: {e}"))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(status)
}

#[derive(Default)]
struct ConnResult {
    /// Microseconds per 200, send to end of body.
    latencies: Vec<u32>,
    errors: u64,
    /// "HTTP 503", "send: connection closed ...": how many of each.
    error_kinds: BTreeMap<String, u64>,
    sent: u64,
}

async fn drive(mut sender: Sender, target: Target, deadline: Instant) -> ConnResult {
    let mut r = ConnResult {
        latencies: Vec::with_capacity(65536),
        ..ConnResult::default()
    };
    let new_conn = target_set().new_conn;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        r.sent += 1;
        // LOAD_NEW_CONN: each request on a connection of its own (the handshake is timed).
        if new_conn {
            match connect(&target).await {
                Ok(s) => sender = s,
                Err(e) => {
                    r.errors += 1;
                    *r.error_kinds.entry(e).or_default() += 1;
                    continue;
                }
            }
        }
        match send(&mut sender, &target).await {
            Ok(200) => r
                .latencies
                .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX)),
            Ok(status) => {
                r.errors += 1;
                *r.error_kinds.entry(format!("HTTP {status}")).or_default() += 1;
            }
            Err(e) => {
                // A lost connection counts once and is replaced; if that fails, this
                // connection's share of the run ends.
                r.errors += 1;
                *r.error_kinds.entry(e).or_default() += 1;
                match connect(&target).await {
                    Ok(s) => sender = s,
                    Err(_) => break,
                }
            }
        }
    }
    r
}

#[derive(Clone, Debug, Default)]
struct RunStats {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    error_kinds: BTreeMap<String, u64>,
    sent: u64,
    /// Proxy process(es) CPU per successful request; NaN for direct.
    cpu_us_per_req: f64,
    /// The user-space part of it (utime); the rest is the kernel's work for the proxy.
    user_us_per_req: f64,
    /// This bench process (load generator and simulator) CPU per request.
    gen_cpu_us_per_req: f64,
    /// The simulator thread's part of it: the upstream's work for the target's requests.
    sim_cpu_us_per_req: f64,
    /// Share of the host's CPU capacity used by processes outside this bench (the generator,
    /// the simulator and every proxy): nonzero means the figures are contaminated.
    others_pct: f64,
    peak_rss_kib: u64,
    rss_after_kib: u64,
    /// From the proxy's access log, ms: p50 and p99 of its total time, then of its upstream
    /// time (meetgate: `total_ms`, `upstream_ms`; nginx: `$request_time`,
    /// `$upstream_response_time`, millisecond resolution).
    log_ms: [f64; 4],
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i])
}

/// The connections a run of `conns` opens: one each over HTTP/1.1; over HTTP/2 the streams
/// share `LOAD_H2_CONNECTIONS`, dealt in turn.
fn connections_opened(target: &Target, conns: usize) -> usize {
    if target.h2 {
        conns.min(target_set().h2_connections)
    } else {
        conns
    }
}

/// Opens the connections (each warmed by one request), then drives `conns` senders (HTTP/1.1
/// connections or HTTP/2 streams) for `dur`.
async fn load(
    target: &Target,
    proxy: Option<&Proxy>,
    ours: &[u32],
    conns: usize,
    dur: Duration,
    ticks: f64,
) -> Result<RunStats, String> {
    let opened = connections_opened(target, conns);
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..opened {
        let mut s = connect(target).await?;
        let status = send(&mut s, target).await?;
        if status != 200 {
            return Err(format!("warm-up request got HTTP {status}"));
        }
        senders.push(s);
    }
    for i in opened..conns {
        let stream = senders[i % opened]
            .stream()
            .ok_or("HTTP/1.1 connections carry one request at a time")?;
        senders.push(stream);
    }
    let pids = proxy.map(Proxy::pids).unwrap_or_default();
    let sampler = RssSampler::start(pids.clone());
    let cpu0 = proxy.map_or((0, 0), Proxy::user_system_ticks);
    let self0 = cpu_ticks(std::process::id());
    let sim0 = sim_cpu_ticks();
    let ours0: u64 = ours.iter().map(|p| cpu_ticks(*p)).sum();
    let host0 = host_jiffies();
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| tokio::spawn(drive(s, target.clone(), deadline)))
        .collect();
    let mut latencies = Vec::new();
    let (mut errors, mut sent) = (0, 0);
    let mut error_kinds = BTreeMap::new();
    for t in tasks {
        let r = t.await.map_err(|e| format!("load task: {e}"))?;
        latencies.extend(r.latencies);
        errors += r.errors;
        for (k, n) in r.error_kinds {
            *error_kinds.entry(k).or_default() += n;
        }
        sent += r.sent;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = proxy.map_or((0, 0), Proxy::user_system_ticks);
    let self1 = cpu_ticks(std::process::id());
    let sim1 = sim_cpu_ticks();
    let ours1: u64 = ours.iter().map(|p| cpu_ticks(*p)).sum();
    let host1 = host_jiffies();
    let peak_rss_kib = sampler.finish();
    let rss_after_kib = rss_kib(&pids);
    latencies.sort_unstable();
    let ok = latencies.len() as f64;
    let per_req = |d: u64| d as f64 / ticks * 1e6 / ok.max(1.0);
    let host_total = (host1.1 - host0.1).max(1) as f64;
    Ok(RunStats {
        rps: ok / elapsed,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        errors,
        error_kinds,
        sent,
        cpu_us_per_req: if proxy.is_some() {
            per_req((cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1))
        } else {
            f64::NAN
        },
        user_us_per_req: if proxy.is_some() {
            per_req(cpu1.0 - cpu0.0)
        } else {
            f64::NAN
        },
        gen_cpu_us_per_req: per_req(self1 - self0),
        sim_cpu_us_per_req: per_req(sim1 - sim0),
        // /proc/stat counts in the same USER_HZ ticks as /proc/<pid>/stat.
        others_pct: 100.0 * (host1.0 - host0.0).saturating_sub(ours1 - ours0) as f64 / host_total,
        peak_rss_kib,
        rss_after_kib,
        log_ms: [f64::NAN; 4],
    })
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .filter(|x| !x.is_nan())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// "median [min–max]" with `decimals` digits.
fn cell(v: &[f64], decimals: usize) -> String {
    let m = median(v.to_vec());
    if m.is_nan() {
        return "-".into();
    }
    let (lo, hi) = spread(v);
    format!("{m:.decimals$} [{lo:.decimals$}–{hi:.decimals$}]")
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

type Results = HashMap<(String, usize), Vec<RunStats>>;

fn column(results: &Results, target: &str, c: usize, f: fn(&RunStats) -> f64) -> Vec<f64> {
    results
        .get(&(target.to_owned(), c))
        .map(|v| v.iter().map(f).collect())
        .unwrap_or_default()
}

/// `a` against `b` round by round (`cmp` of the two runs of a round): the median, the spread,
/// and in how many rounds `a` came out ahead or level (`ahead` of that round's value). Two
/// targets' runs in one round are at most one round's length apart, not the whole run's, so
/// slow host drift mostly cancels out here, where it does not between medians taken over all
/// rounds.
fn paired(
    results: &Results,
    a: &str,
    b: &str,
    c: usize,
    cmp: fn(&RunStats, &RunStats) -> f64,
    ahead: fn(f64) -> bool,
    decimals: usize,
) -> Option<String> {
    let (xs, ys) = (
        results.get(&(a.to_owned(), c))?,
        results.get(&(b.to_owned(), c))?,
    );
    // Every target runs once per round and connection count, and a failed run ends the
    // bench: the two lists are in round order and of one length.
    debug_assert_eq!(xs.len(), ys.len());
    let per_round: Vec<f64> = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| cmp(x, y))
        .filter(|v| !v.is_nan())
        .collect();
    let won = per_round.iter().filter(|v| ahead(**v)).count();
    let n = per_round.len();
    let (lo, hi) = spread(&per_round);
    Some(format!(
        "{:.decimals$} [{lo:.decimals$}–{hi:.decimals$}], ahead or level in {won} of {n}",
        median(per_round)
    ))
}

fn ratio(results: &Results, a: &str, b: &str, c: usize, f: fn(&RunStats) -> f64) -> String {
    let (x, y) = (
        median(column(results, a, c, f)),
        median(column(results, b, c, f)),
    );
    if x.is_nan() || y.is_nan() || y == 0.0 {
        "-".into()
    } else {
        format!("{:.2}x", x / y)
    }
}

fn print_table(results: &Results, targets: &[String], c: usize, rounds: usize) {
    println!(
        "\n== {c} connection{} (median of {rounds} round{} [min–max]) ==",
        if c == 1 { "" } else { "s" },
        if rounds == 1 { "" } else { "s" }
    );
    println!(
        "{:<13} {:>24} {:>22} {:>22} {:>20} {:>10} {:>7} {:>11} {:>11} {:>8} {:>9}",
        "target",
        "req/s",
        "p50 µs",
        "p99 µs",
        "proxy CPU µs/req",
        "of it user",
        "errors",
        "peak RSS MiB",
        "gen CPU µs/req",
        "of it sim",
        "others CPU"
    );
    for t in targets {
        let Some(runs) = results.get(&(t.clone(), c)) else {
            continue;
        };
        let col = |f: fn(&RunStats) -> f64| runs.iter().map(f).collect::<Vec<_>>();
        let errors: u64 = runs.iter().map(|r| r.errors).sum();
        println!(
            "{:<13} {:>24} {:>22} {:>22} {:>20} {:>10} {:>7} {:>11.1} {:>14} {:>9} {:>8.0}%",
            label(t),
            cell(&col(|r| r.rps), 0),
            cell(&col(|r| r.p50_us), 0),
            cell(&col(|r| r.p99_us), 0),
            cell(&col(|r| r.cpu_us_per_req), 1),
            match median(col(|r| r.user_us_per_req)) {
                u if u.is_nan() => "-".to_owned(),
                u => format!("{u:.1}"),
            },
            errors,
            mib(median(col(|r| r.peak_rss_kib as f64))),
            format!("{:.1}", median(col(|r| r.gen_cpu_us_per_req))),
            format!("{:.1}", median(col(|r| r.sim_cpu_us_per_req))),
            median(col(|r| r.others_pct)),
        );
    }
    if !results.contains_key(&(NGINX.to_owned(), c)) {
        return;
    }
    // Every meetgate variant that ran, and the bare forwarder, against nginx.
    for mg in meetgate_targets().into_iter().chain([BARE]) {
        if !results.contains_key(&(mg.to_owned(), c)) {
            continue;
        }
        println!(
            "{:<18} {:>19} {:>22} {:>22} {:>20} {:>10}",
            format!("{}/{}", label(mg), label(NGINX)),
            ratio(results, mg, NGINX, c, |r| r.rps),
            ratio(results, mg, NGINX, c, |r| r.p50_us),
            ratio(results, mg, NGINX, c, |r| r.p99_us),
            ratio(results, mg, NGINX, c, |r| r.cpu_us_per_req),
            ratio(results, mg, NGINX, c, |r| r.user_us_per_req),
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// `perf record` of one process for the length of one run, when `LOAD_PERF_OUT` asks for it;
/// with `LOAD_PERF_TOOL=strace`, `strace -c` of it and its children (nginx's workers) instead:
/// system calls counted by kind.
struct Perf(Option<Child>);

impl Perf {
    fn start(out: Option<&str>, pid: u32) -> Perf {
        let Some(out) = out else { return Perf(None) };
        let strace = std::env::var("LOAD_PERF_TOOL").as_deref() == Ok("strace");
        let mut cmd = if strace {
            let children = Command::new("pgrep")
                .arg("-P")
                .arg(pid.to_string())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let mut cmd = Command::new("strace");
            cmd.args(["-c", "-f", "-o", out]);
            for p in std::iter::once(pid.to_string())
                .chain(children.split_whitespace().map(String::from))
            {
                cmd.arg("-p").arg(p);
            }
            cmd
        } else {
            let mut cmd = Command::new("perf");
            cmd.args([
                "record",
                "-F",
                "999",
                "--call-graph",
                "dwarf,16384",
                "-o",
                out,
            ])
            .arg("-p")
            .arg(pid.to_string());
            cmd
        };
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        match child {
            Ok(c) => {
                // perf and strace need a moment to attach before the run starts.
                std::thread::sleep(Duration::from_millis(500));
                Perf(Some(c))
            }
            Err(e) => {
                let tool = if strace { "strace" } else { "perf" };
                eprintln!("LOAD_PERF_OUT: cannot run {tool}: {e}");
                Perf(None)
            }
        }
    }

    fn stop(mut self) {
        if let Some(mut c) = self.0.take() {
            signal(c.id(), "INT");
            let _ = c.wait();
        }
    }
}

struct Settings {
    seconds: Duration,
    rounds: usize,
    conns: Vec<usize>,
    workers: usize,
    perf_out: Option<String>,
}

/// The simulator on a thread and single-threaded runtime of its own, as a real upstream would
/// be a process of its own. On the generator's work-stealing runtime its HTTP/2 streams (one
/// task each) were woken across threads: a futex call per stream, 10–15 µs more CPU per
/// request for the HTTP/2 targets than for the HTTP/1.1 ones, taken from the same two cores
/// the proxies under test run on.
struct SimThread {
    sim: SimHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl SimThread {
    fn start() -> Result<SimThread, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("simulator".into())
            .spawn(move || {
                // `/proc/thread-self` is `<pid>/task/<tid>`.
                if let Some(tid) = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name()?.to_str()?.parse().ok())
                {
                    let _ = SIM_TID.set(tid);
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(format!("simulator runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = simulator::start(SimConfig {
                        apps: vec![SimApp::new(APP_ID, APP_KEY)],
                        limits: SimLimits::unlimited(),
                        token_lifetime: Duration::from_secs(12 * 3600),
                        debug_headers: DebugHeaders::Always,
                        // Bodies are not needed; 100 000 of them would only grow this process.
                        record_bodies: false,
                        http2: !target_set().upstream_http1,
                        ..SimConfig::default()
                    })
                    .await
                    .map_err(|e| format!("simulator: {e}"));
                    let ok = started.is_ok();
                    let _ = tx.send(started);
                    // The runtime drives the simulator's tasks until the bench is done with it.
                    if ok {
                        let _ = stop_rx.await;
                    }
                });
            })
            .map_err(|e| format!("simulator thread: {e}"))?;
        let sim = rx
            .recv()
            .map_err(|_| "simulator thread ended".to_owned())??;
        Ok(SimThread { sim, stop, thread })
    }

    async fn shutdown(self) {
        self.sim.shutdown().await;
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

async fn bench(s: &Settings, dir: &Path, ticks: f64) -> Result<(), String> {
    let sim_thread = SimThread::start()?;
    let sim = &sim_thread.sim;
    let ca_file = dir.join("sim-ca.pem");
    std::fs::write(&ca_file, sim.ca_pem()).map_err(|e| format!("write CA: {e}"))?;
    println!("simulator: {} (in this process)", sim.url());
    let set = target_set();
    println!("target set: {}", set.describe());
    if set.tls() {
        inbound_tls(dir)?;
    }

    let (otlp, exports) = otlp_sink().await?;
    let mut proxies = Vec::new();
    let only = std::env::var("LOAD_VARIANTS").ok();
    for (i, (name, extra)) in LAYER_VARIANTS.iter().enumerate() {
        // The first variant is the one compared with nginx: always there.
        if i > 0
            && only
                .as_deref()
                .is_some_and(|o| !o.split(',').any(|v| v.trim() == *name))
        {
            continue;
        }
        let extra = extra.replace("{otlp}", &otlp.to_string());
        let p = start_meetgate(name, dir, sim, &ca_file, &extra).await?;
        proxies.push(p);
    }
    if std::env::var_os(BASELINE_ENV).is_some() {
        proxies.push(start_meetgate(BASELINE, dir, sim, &ca_file, "").await?);
    }
    // Any token meetgate obtained is valid for 12 h; the simulator keeps 64 per user.
    let token = sim
        .issued_tokens()
        .into_iter()
        .next()
        .ok_or("the simulator issued no token")?;
    match nginx_binary() {
        None => println!(
            "nginx: not found (`apt-get install -y nginx`) or LOAD_NGINX=off; the nginx side is skipped"
        ),
        Some(_) => {
            let p = start_nginx(dir, sim, &ca_file, &token, s.workers).await?;
            proxies.push(p);
        }
    }
    if std::env::var("LOAD_BARE").is_ok_and(|v| v == "off") {
        println!("{BARE}: LOAD_BARE=off; skipped");
    } else if set.inbound != Inbound::Plain {
        println!("{BARE}: serves plain HTTP/1.1 only; skipped in this target set");
    } else {
        let p = start_bare(dir, sim, &ca_file, &token, s.workers).await?;
        proxies.push(p);
    }
    // Idle RSS: after start-up and the one readiness request, before any load.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for p in &mut proxies {
        p.idle_rss_kib = rss_kib(&p.pids());
        // Start-up lines are not worth reporting.
        p.take_access_lines();
        *p.kept.borrow_mut() = (0, None);
    }

    let roots = CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA PEM: {e}"))?;
    let mut tls = meetgate::upstream::tls_config(&roots).map_err(|e| format!("TLS config: {e}"))?;
    // The generator speaks HTTP/1.1 only; the proxies' upstream side is what differs.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let direct = Target {
        addr: sim.addr(),
        tls: Some(TlsConnector::from(Arc::new(tls))),
        token: Some(token),
        h2: false,
    };

    let ours: Vec<u32> = std::iter::once(std::process::id())
        .chain(proxies.iter().flat_map(Proxy::pids))
        .collect();
    println!(
        "load average before the runs: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let max_c = s.conns.iter().copied().max().unwrap_or(1);
    for p in &proxies {
        load(&proxy_target(p.addr), Some(p), &ours, max_c, WARMUP, ticks).await?;
        p.take_access_lines();
    }

    // Interleaved so that drift (thermal, noisy neighbours) spreads over every target.
    let mut results: Results = HashMap::new();
    let mut log_lines: HashMap<String, (usize, u64)> = HashMap::new();
    let perf_c = if s.conns.contains(&16) {
        16
    } else {
        s.conns[0]
    };
    for round in 1..=s.rounds {
        for &c in &s.conns {
            // Each round starts at the next target, so that none always runs first (right
            // after the direct run or a change of connection count).
            for p in proxies.iter().cycle().skip(round - 1).take(proxies.len()) {
                let mut r =
                    load(&proxy_target(p.addr), Some(p), &ours, c, s.seconds, ticks).await?;
                let view = p.take_access_lines();
                let entry = log_lines.entry(p.name.clone()).or_default();
                entry.0 += view.lines;
                // And the warm-up request on each connection opened (HTTP/2: fewer than c).
                entry.1 += r.sent + connections_opened(&proxy_target(p.addr), c) as u64;
                r.log_ms = view.percentiles();
                eprintln!(
                    "round {round} c={c:<3} {:<13} {:>8.0} req/s p50 {:>6.0} µs p99 {:>6.0} µs cpu {:>6.1} µs/req \
                     | log total p50/p99 {:.2}/{:.2} ms upstream {:.2}/{:.2} ms | errors {} {:?}",
                    label(&p.name), r.rps, r.p50_us, r.p99_us, r.cpu_us_per_req,
                    r.log_ms[0], r.log_ms[1], r.log_ms[2], r.log_ms[3], r.errors, r.error_kinds
                );
                results.entry((p.name.clone(), c)).or_default().push(r);
            }
            if c == 1 && set.inbound == Inbound::Plain && !set.new_conn {
                let r = load(&direct, None, &ours, 1, s.seconds, ticks).await?;
                eprintln!(
                    "round {round} c=1   {DIRECT:<13} {:>8.0} req/s p50 {:>6.0} µs p99 {:>6.0} µs",
                    r.rps, r.p50_us, r.p99_us
                );
                results.entry((DIRECT.into(), 1)).or_default().push(r);
            }
        }
    }

    // Profiled in an extra, unreported run: perf slows its target down.
    let perf_target = std::env::var("LOAD_PERF_TARGET").ok();
    let profiled = proxies
        .iter()
        .find(|p| perf_target.as_deref().is_none_or(|t| p.name == t));
    if let (Some(out), Some(p)) = (s.perf_out.as_deref(), profiled) {
        let perf = Perf::start(Some(out), p.guard.child.id());
        let r = load(
            &proxy_target(p.addr),
            Some(p),
            &ours,
            perf_c,
            s.seconds,
            ticks,
        )
        .await?;
        perf.stop();
        p.take_access_lines();
        println!(
            "perf: {} at {perf_c} connections for {:.0} s ({:.0} req/s under perf) -> {out}",
            p.name,
            s.seconds.as_secs_f64(),
            r.rps
        );
    }

    let mut targets: Vec<String> = meetgate_targets().into_iter().map(str::to_owned).collect();
    targets.push(NGINX.into());
    targets.push(BARE.into());
    targets.push(DIRECT.into());
    println!(
        "\n# {}; {} s per run, {} rounds, {} meetgate worker threads / nginx workers, {} cores; \
         generator, simulator and proxies share the cores",
        set.describe(),
        s.seconds.as_secs_f64(),
        s.rounds,
        s.workers,
        s.workers
    );
    for &c in &s.conns {
        print_table(&results, &targets, c, s.rounds);
    }

    let mut out = String::new();
    let _ = writeln!(out, "\n== summary ==");
    for p in &proxies {
        let after64 = column(&results, &p.name, max_c, |r| r.rss_after_kib as f64);
        let vm_hwm: u64 = p.pids().iter().map(|q| status_kib(*q, "VmHWM:")).sum();
        let _ = writeln!(
            out,
            "{:<13} start-up to ready {:>5.0} ms | idle RSS {:>5.1} MiB | RSS after {max_c}-conn run {:>5.1} MiB | VmHWM (sum) {:>5.1} MiB",
            label(&p.name),
            p.startup.as_secs_f64() * 1e3,
            mib(p.idle_rss_kib as f64),
            mib(median(after64)),
            mib(vm_hwm as f64),
        );
    }
    let _ = writeln!(
        out,
        "access-log view, 200s only, ms, median over rounds: total p50 / p99 | upstream p50 / p99"
    );
    for &c in &s.conns {
        for p in &proxies {
            let m = |f: fn(&RunStats) -> f64| median(column(&results, &p.name, c, f));
            let _ = writeln!(
                out,
                "  c={c:<3} {:<13} {:>6.2} / {:>6.2} | {:>6.2} / {:>6.2}",
                p.name,
                m(|r| r.log_ms[0]),
                m(|r| r.log_ms[1]),
                m(|r| r.log_ms[2]),
                m(|r| r.log_ms[3]),
            );
        }
    }
    let direct_p50 = median(column(&results, DIRECT, 1, |r| r.p50_us));
    if !direct_p50.is_nan() {
        for p in &proxies {
            let p50 = median(column(&results, &p.name, 1, |r| r.p50_us));
            let _ = writeln!(
                out,
                "{:<13} added p50 at 1 connection vs direct ({direct_p50:.0} µs): {:+.0} µs",
                p.name,
                p50 - direct_p50
            );
        }
    }
    if results.keys().any(|(t, _)| t == NGINX) {
        let _ = writeln!(
            out,
            "paired with nginx round by round: added p50 difference (µs) at 1 connection; \
             requests/s and CPU/request ratios at more"
        );
    }
    for name in meetgate_targets().into_iter().chain([BARE]) {
        for &c in &s.conns {
            let line = if c == 1 {
                paired(
                    &results,
                    name,
                    NGINX,
                    c,
                    |x, y| x.p50_us - y.p50_us,
                    |d| d <= 0.0,
                    0,
                )
                .map(|p50| format!("p50 {p50}"))
            } else {
                paired(
                    &results,
                    name,
                    NGINX,
                    c,
                    |x, y| x.rps / y.rps,
                    |r| r >= 1.0,
                    2,
                )
                .zip(paired(
                    &results,
                    name,
                    NGINX,
                    c,
                    |x, y| x.cpu_us_per_req / y.cpu_us_per_req,
                    |r| r <= 1.0,
                    2,
                ))
                .map(|(rps, cpu)| format!("req/s {rps}; CPU/req {cpu}"))
            };
            if let Some(line) = line {
                let _ = writeln!(out, "  {:<17} c={c:<3} {line}", label(name));
            }
        }
    }
    let base = LAYER_VARIANTS[0].0;
    for name in meetgate_targets().into_iter().skip(1) {
        for &c in s
            .conns
            .iter()
            .filter(|&&c| results.contains_key(&(name.to_owned(), c)))
        {
            let _ = writeln!(
                out,
                "{name:<13} vs {base} at {c:>2} conns: req/s {} CPU/req {}",
                ratio(&results, name, base, c, |r| r.rps),
                ratio(&results, name, base, c, |r| r.cpu_us_per_req),
            );
        }
    }
    for t in &targets {
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &s.conns {
            for r in results.get(&(t.clone(), *c)).into_iter().flatten() {
                for (k, n) in &r.error_kinds {
                    *kinds.entry(k).or_default() += n;
                }
            }
        }
        if !kinds.is_empty() {
            let _ = writeln!(out, "{t:<13} errors: {kinds:?}");
        }
    }
    for p in &proxies {
        let kept = p.kept.borrow();
        if let Some(first) = &kept.1 {
            let first: String = first.chars().take(600).collect();
            let _ = writeln!(
                out,
                "{:<13} {} log lines other than 200 access lines (kept in {}-kept.log); first: {first}",
                p.name, kept.0, p.name
            );
        }
    }
    let mut names: Vec<_> = log_lines.keys().cloned().collect();
    names.sort();
    // The bare forwarder keeps no access log.
    for n in names.into_iter().filter(|n| n != BARE) {
        let (lines, sent) = log_lines[&n];
        let _ = writeln!(
            out,
            "{n:<13} access-log lines {lines} for {sent} requests sent"
        );
    }
    let _ = writeln!(
        out,
        "otlp sink: {} export requests from the traced variants",
        exports.load(Ordering::Relaxed)
    );
    print!("{out}");
    drop(proxies);
    sim_thread.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The issue's other reference: a bare hyper forwarder with no features (no quota, token cache,
// access log, metrics or request id), run as `load bare-forwarder ...` in a process of its own.

const BARE: &str = "hyper-bare";

/// The bare forwarder reads the token from here, set only in its environment.
const BARE_TOKEN_ENV: &str = "BENCH_BARE_TOKEN";

/// `load bare-forwarder LISTEN_PORT UPSTREAM_URL CA_FILE WORKERS`: plain HTTP/1.1 in,
/// each request sent on with the token over hyper-util's pooled HTTP/1.1 TLS client (as nginx
/// sends it), the response streamed back. A work-stealing runtime, as a plain hyper program has.
fn bare_forwarder(args: &[String]) -> ExitCode {
    let [port, upstream, ca_file, workers] = args else {
        eprintln!(
            "usage: {BARE_TOKEN_ENV}=... load bare-forwarder PORT UPSTREAM_URL CA_FILE WORKERS"
        );
        return ExitCode::FAILURE;
    };
    let run = || -> Result<(), String> {
        let pem = std::fs::read(ca_file).map_err(|e| format!("{ca_file}: {e}"))?;
        let roots = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CA PEM: {e}"))?;
        let mut tls = meetgate::upstream::tls_config(&roots).map_err(|e| format!("TLS: {e}"))?;
        // The connector sets ALPN from the protocols enabled below.
        tls.alpn_protocols.clear();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client: BareClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        let token = std::env::var(BARE_TOKEN_ENV).map_err(|_| format!("{BARE_TOKEN_ENV} unset"))?;
        let mut token = http::HeaderValue::from_str(&token).map_err(|e| format!("token: {e}"))?;
        token.set_sensitive(true);
        let port: u16 = port.parse().map_err(|e| format!("port {port:?}: {e}"))?;
        let upstream: http::Uri = upstream.parse().map_err(|e| format!("url: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.parse().map_err(|e| format!("workers: {e}"))?)
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .map_err(|e| format!("bind: {e}"))?;
            loop {
                let tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        eprintln!("bare forwarder: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (client, token, upstream) = (client.clone(), token.clone(), upstream.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        bare_forward(client.clone(), token.clone(), upstream.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        })
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare forwarder: {e}");
            ExitCode::FAILURE
        }
    }
}

type BareClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    hyper::body::Incoming,
>;

async fn bare_forward(
    client: BareClient,
    token: http::HeaderValue,
    upstream: http::Uri,
    mut req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
    let mut uri = upstream.into_parts();
    uri.path_and_query = req.uri().path_and_query().cloned();
    if let Ok(uri) = http::Uri::from_parts(uri) {
        *req.uri_mut() = uri;
    }
    // The client writes the upstream's own Host.
    req.headers_mut().remove(http::header::HOST);
    req.headers_mut().insert("x-access-token", token);
    client.request(req).await
}

async fn start_bare(
    dir: &Path,
    sim: &SimHandle,
    ca_file: &Path,
    token: &str,
    workers: usize,
) -> Result<Proxy, String> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = dir.join("hyper-bare.log");
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("bare-forwarder")
        .arg(port.to_string())
        .arg(sim.url())
        .arg(ca_file)
        .arg(workers.to_string())
        .env(BARE_TOKEN_ENV, token)
        .stdout(append_file(&log)?)
        .stderr(append_file(&log)?);
    // It logs nothing unless it fails: every line in its log is kept and reported.
    let format = LogFormat {
        path: log,
        marker: "\0no access log",
        ok: "\0",
        time_fields: ("\0", "\0", 1.0),
    };
    spawn_proxy(BARE, cmd, addr, false, format).await
}

fn main() -> ExitCode {
    let began = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "bare-forwarder") {
        return bare_forwarder(&args[1..]);
    }
    // Cargo passes `--bench`; there is nothing else to parse.
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let conns: Vec<usize> = std::env::var("LOAD_CONNS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty() && !v.contains(&0))
        .unwrap_or_else(|| vec![1, 16, 64]);
    let settings = Settings {
        seconds: Duration::from_secs_f64(env_or("LOAD_SECONDS", 5.0_f64).max(0.1)),
        rounds: env_or("LOAD_ROUNDS", 3_usize).max(1),
        conns,
        workers,
        perf_out: std::env::var("LOAD_PERF_OUT").ok(),
    };
    let dir = match tempfile::Builder::new().prefix("meetgate-load-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("load bench: temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(bench(&settings, dir.path(), clock_ticks()));
    drop(runtime);
    if std::env::var_os("LOAD_KEEP_DIR").is_some() {
        let kept = dir.keep();
        println!("configs and logs kept in {}", kept.display());
    }
    println!("total runtime {:.1} s", began.elapsed().as_secs_f64());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load bench: setup failed: {e}");
            ExitCode::FAILURE
        }
    }
}
