//! Network faults between meetgate and the upstream, and between replicas and Redis: latency,
//! loss and partitions in network namespaces the tests make themselves.
//!
//! The kernel here has no `netem`, so each test makes a "remote host": a network namespace with a
//! veth pair to the host side. Loss and partitions are nftables rules inside it; latency is a
//! delaying TCP relay of ours (`tests/netfault/relay.py`) running inside it. Upstream tests run
//! the simulator in this process on the host side of the veth and reach it through the relay in
//! the namespace, so every byte crosses the degraded link twice and the simulator's own records
//! (requests per `X-Request-ID`, 429s, sign-ins) stay readable. The Redis test runs redis-server
//! inside the namespace. Where namespaces cannot be made (not root, no iproute2), each test says
//! so in one line and passes.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use meetgate::simulator::{self, SimConfig, SimHandle, SimLimits};

use crate::cluster::{limited_sim, small_limits};
use crate::support::*;

/// The relay's port inside the namespace (the namespace is ours alone).
const RELAY_PORT: u16 = 8443;

/// A network namespace joined to the host by a veth pair: a host of the test's own.
struct RemoteHost {
    name: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    ns_if: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl RemoteHost {
    /// A new namespace, or `None` (after one line saying why) where this machine cannot make one.
    fn create(test: &str) -> Option<RemoteHost> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("mgnf-{pid}-{n}");
        // Addresses of our own: 10.(200 + pid % 50).(n).{1,2}/24, one subnet per host.
        let (a, b) = (200 + (pid % 50) as u8, n as u8);
        let host_ip = Ipv4Addr::new(10, a, b, 1);
        let ns_ip = Ipv4Addr::new(10, a, b, 2);
        let host_if = format!("mgh{}x{n}", pid % 100_000);
        let ns_if = format!("mgn{}x{n}", pid % 100_000);
        remove_stale_namespaces();
        if let Err(e) = ip(&["netns", "add", &name]) {
            eprintln!("{test}: skipped, cannot make a network namespace here ({e})");
            return None;
        }
        let host = RemoteHost {
            name,
            host_ip,
            ns_ip,
            ns_if,
            children: Vec::new(),
        };
        let (h, ns) = (host_ip.to_string(), ns_ip.to_string());
        let steps: [&[&str]; 7] = [
            &[
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                &host.ns_if,
            ],
            &["link", "set", &host.ns_if, "netns", &host.name],
            &["addr", "add", &format!("{h}/24"), "dev", &host_if],
            &["link", "set", &host_if, "up"],
            &[
                "-n",
                &host.name,
                "addr",
                "add",
                &format!("{ns}/24"),
                "dev",
                &host.ns_if,
            ],
            &["-n", &host.name, "link", "set", &host.ns_if, "up"],
            &["-n", &host.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step).expect("veth pair into the namespace");
        }
        Some(host)
    }

    /// Runs `program args` inside the namespace; returns once it printed a line holding `ready`.
    fn spawn(&mut self, program: &str, args: &[&str], ready: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} in the namespace: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        self.children.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        let ready = ready.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(&ready) {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{program} did not get ready in the namespace"));
    }

    /// A TCP relay on the namespace's address to `target`, delaying every chunk.
    fn relay(&mut self, target: SocketAddr, delay_ms: u32, jitter_ms: u32) -> SocketAddr {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netfault/relay.py");
        let listen = SocketAddr::from((self.ns_ip, RELAY_PORT));
        self.spawn(
            "python3",
            &[
                script,
                &listen.to_string(),
                &target.to_string(),
                &delay_ms.to_string(),
                &jitter_ms.to_string(),
            ],
            "listening",
        );
        listen
    }

    /// Replaces the namespace's fault rules (`None`: no rules, a healthy link).
    fn faults(&self, rule: Option<&str>) {
        let mut script = String::from("table inet mgfault\ndelete table inet mgfault\n");
        if let Some(rule) = rule {
            let i = &self.ns_if;
            script.push_str(&format!(
                "table inet mgfault {{\n\
                 chain input {{ type filter hook input priority 0; policy accept; iifname \"{i}\" {rule}; }}\n\
                 chain output {{ type filter hook output priority 0; policy accept; oifname \"{i}\" {rule}; }}\n\
                 }}\n"
            ));
        }
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft runs (.ci/run installs nftables)");
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write rules");
        assert!(nft.wait().expect("nft").success(), "nft took:\n{script}");
    }

    /// Every packet on the link dropped with this probability, each way.
    fn loss(&self, percent: u32) {
        self.faults(Some(&format!("numgen random mod 100 < {percent} drop")));
    }

    /// Nothing crosses the link.
    fn partition(&self) {
        self.faults(Some("drop"));
    }

    fn heal(&self) {
        self.faults(None);
    }
}

/// Namespaces (and so their veth pairs and addresses) of test runs that were killed before
/// they could remove them: their process is gone.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("mgnf-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl Drop for RemoteHost {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace deletes its end of the veth pair, and so the pair.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The simulator on the host side of the link, its certificate naming the relay's address.
async fn sim_behind(host: &RemoteHost, dir: &std::path::Path, limits: SimLimits) -> SimHandle {
    let cert = simulator::tls::generate_default_cert(&[host.ns_ip.to_string()]).expect("cert");
    let (c, k) = (dir.join("sim.pem"), dir.join("sim.key"));
    std::fs::write(&c, &cert.cert_pem).expect("write");
    std::fs::write(&k, &cert.key_pem).expect("write");
    start_sim(SimConfig {
        listen: SocketAddr::from((host.host_ip, 0)),
        apps: vec![sim_app()],
        limits,
        tls: simulator::SimTls::Files {
            cert_file: c,
            key_file: k,
        },
        token_lifetime: Duration::from_secs(4),
        ..SimConfig::default()
    })
    .await
}

/// The simulator's limits, with a margin that covers the link's jitter: the upstream counts
/// arrivals, meetgate counts departures, and two departures a window apart can arrive closer by
/// up to the jitter's spread.
const QUOTA: &str =
    "[quota]\nmax_wait = \"30s\"\nper_api_per_minute = 20\nper_api_window = \"2s\"\n\
    all_env_per_second = 50\nall_env_window = \"1s\"\nsafety_margin = \"300ms\"\n";

/// As [`QUOTA`], with a margin for a lossy link: a lost segment reaches the upstream a
/// retransmission later (TCP's minimum RTO is 200 ms, doubling on each further loss), while a
/// request admitted a window later may go through at once. Found here: with 300 ms, 5% loss
/// gave the upstream 22 requests in one 2 s window now and then.
const LOSSY_QUOTA: &str =
    "[quota]\nmax_wait = \"30s\"\nper_api_per_minute = 20\nper_api_window = \"2s\"\n\
    all_env_per_second = 50\nall_env_window = \"1s\"\nsafety_margin = \"1s\"\n";

/// A gateway whose upstream is the simulator through the relay in `host`.
async fn gateway_through(sim: &SimHandle, relay: SocketAddr, quota: &str) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = GatewayOptions {
        quota: quota.to_owned(),
        ..Default::default()
    };
    let config = gateway_config(&format!("https://{relay}"), sim.ca_pem(), &opts, dir.path());
    spawn_with_config(config, dir).await
}

/// What one client request got, within its deadline.
#[derive(Debug)]
struct Outcome {
    id: String,
    status: StatusCode,
    code: String,
}

/// How long a client waits for any answer: longer than meetgate's own upstream timeouts and
/// quota wait, so a request that outlives it was left hanging.
const CLIENT_DEADLINE: Duration = Duration::from_secs(40);

async fn one_request(gw: &TestGateway, id: String) -> Outcome {
    let reply = tokio::time::timeout(
        CLIENT_DEADLINE,
        gw.request(
            Method::POST,
            START,
            &[("content-type", "application/json"), ("x-request-id", &id)],
            br#"{"conferenceID":"914087436","password":"123456"}"#,
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("request {id} got no answer within {CLIENT_DEADLINE:?}"));
    let code = if reply.status == StatusCode::OK {
        String::new()
    } else {
        reply.error_code()
    };
    Outcome {
        id,
        status: reply.status,
        code,
    }
}

/// `clients` clients sending one request after another until `stop` is set.
fn traffic(
    gw: Arc<TestGateway>,
    tag: String,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (gw, stop, tag) = (gw.clone(), stop.clone(), tag.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    out.push(one_request(&gw, format!("{tag}-{c}-{i}")).await);
                    i += 1;
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    })
}

/// Every answer is a success or meetgate's own 502/503/504; nothing went upstream twice, the
/// upstream never throttled.
fn assert_outcomes(sim: &SimHandle, outcomes: &[Outcome]) {
    for o in outcomes {
        let ok = o.status == StatusCode::OK
            || (matches!(o.status.as_u16(), 502..=504) && o.code.starts_with("MEETGATE."));
        assert!(ok, "{o:?}");
    }
    let counts = sim.counts_by_request_id();
    for o in outcomes {
        let n = counts.get(&o.id).copied().unwrap_or(0);
        assert!(n <= 1, "{} was processed {n} times upstream", o.id);
        if o.status == StatusCode::OK {
            assert_eq!(n, 1, "{} succeeded without reaching the upstream", o.id);
        }
    }
    if sim.rejected_429() > 0 {
        // What the upstream saw, for the failure's diagnosis: arrival (ms), status, request id.
        let reqs = sim.requests();
        let t0 = reqs.first().map(|r| r.at);
        for r in &reqs {
            let at = t0.map_or(0, |t0| r.at.duration_since(t0).as_millis());
            eprintln!(
                "{at:>6} ms {} {} {:?}",
                r.status,
                r.path(),
                r.header("x-request-id")
            );
        }
    }
    assert_eq!(sim.rejected_429(), 0, "no upstream 429");
    assert!(sim.max_in_any_window("start_meeting", Duration::from_secs(2)) <= 20);
}

fn successes(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| o.status == StatusCode::OK)
        .count()
}

/// Runs traffic until the simulator has issued `sign_ins` tokens (lifetimes pass under it).
async fn run_until_sign_ins(
    gw: &Arc<TestGateway>,
    sim: &SimHandle,
    tag: &str,
    sign_ins: usize,
) -> Vec<Outcome> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = traffic(gw.clone(), tag.to_owned(), 8, stop.clone());
    eventually(
        Duration::from_secs(60),
        "tokens refreshed while traffic ran",
        || async { sim.sign_in_count() >= sign_ins },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("traffic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_jitter_on_the_upstream_link() {
    let Some(mut host) = RemoteHost::create("latency_and_jitter_on_the_upstream_link") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim_behind(&host, dir.path(), small_limits()).await;
    let relay = host.relay(sim.addr(), 200, 50);
    let gw = Arc::new(gateway_through(&sim, relay, QUOTA).await);

    // Three token lifetimes of paced traffic over a 200 +- 50 ms link.
    let outcomes = run_until_sign_ins(&gw, &sim, "lat", 3).await;
    assert_outcomes(&sim, &outcomes);
    assert_eq!(
        successes(&outcomes),
        outcomes.len(),
        "latency alone fails nothing: {:?}",
        outcomes.iter().find(|o| o.status != StatusCode::OK)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_loss_on_the_upstream_link() {
    let Some(mut host) = RemoteHost::create("five_percent_loss_on_the_upstream_link") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim_behind(&host, dir.path(), small_limits()).await;
    let relay = host.relay(sim.addr(), 0, 0);
    let gw = Arc::new(gateway_through(&sim, relay, LOSSY_QUOTA).await);
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);

    host.loss(5);
    let outcomes = run_until_sign_ins(&gw, &sim, "loss", 4).await;
    assert_outcomes(&sim, &outcomes);
    // TCP carries the requests through the loss; the token was refreshed in time across it.
    assert!(
        successes(&outcomes) * 10 >= outcomes.len() * 9,
        "most requests succeed through 5% loss: {} of {}",
        successes(&outcomes),
        outcomes.len()
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.code != "MEETGATE.TOKEN_UNAVAILABLE"),
        "no request waited for a token that was not refreshed in time"
    );

    host.heal();
    eventually(
        Duration::from_secs(10),
        "a success after the link healed",
        || async { gw.start_meeting().await.status == StatusCode::OK },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_partition_of_the_upstream_link() {
    let Some(mut host) = RemoteHost::create("ten_second_partition_of_the_upstream_link") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim_behind(&host, dir.path(), small_limits()).await;
    let relay = host.relay(sim.addr(), 0, 0);
    let gw = Arc::new(gateway_through(&sim, relay, QUOTA).await);
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = traffic(gw.clone(), "part".to_owned(), 8, stop.clone());
    host.partition();
    // The fault's length, not a wait for a condition: the token (4 s) lapses inside it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    host.heal();
    let healed = tokio::time::Instant::now();
    eventually(
        Duration::from_secs(15),
        "a success after the partition",
        || async { gw.start_meeting().await.status == StatusCode::OK },
    )
    .await;
    eprintln!("recovered {:?} after the link healed", healed.elapsed());
    stop.store(true, Ordering::Relaxed);
    let outcomes = load.await.expect("traffic");
    assert_outcomes(&sim, &outcomes);
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o.status.as_u16(), 502..=504)),
        "the partition was seen: {} outcomes, all OK",
        outcomes.len()
    );
    // After recovery, everything goes through again, with a new token.
    let after: Vec<Outcome> = {
        let mut v = Vec::new();
        for i in 0..10 {
            v.push(one_request(&gw, format!("healed-{i}")).await);
        }
        v
    };
    assert_outcomes(&sim, &after);
    assert_eq!(successes(&after), after.len(), "{after:?}");
}

/// Waits until every replica's `/readyz` says it is degraded (or, `false`, that none is).
async fn every_replica(fleet: &[Arc<TestGateway>], degraded: bool, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        let mut all = true;
        for gw in fleet {
            all &= gw.admin("/readyz").await.json()["degraded"].is_string() == degraded;
        }
        all
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_redis_link_falls_back_without_a_burst_on_return() {
    let Some(mut host) = RemoteHost::create("partitioned_redis_link_falls_back") else {
        return;
    };
    let redis_addr = SocketAddr::from((host.ns_ip, 6379));
    host.spawn(
        "redis-server",
        &[
            "--bind",
            &host.ns_ip.to_string(),
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            // Our own host on our own link: the replicas are not on its loopback.
            "--protected-mode",
            "no",
            "--loglevel",
            "notice",
        ],
        "Ready to accept connections",
    );
    let sim = limited_sim().await;
    let prefix = format!("nf{}:", rand::random::<u32>());
    let quota = "[quota]\nmax_wait = \"30s\"\nper_api_per_minute = 20\nper_api_window = \"2s\"\n\
        all_env_per_second = 50\nall_env_window = \"1s\"\nsafety_margin = \"100ms\"\n";
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(Arc::new(
            spawn_gateway(
                &sim,
                GatewayOptions {
                    quota: quota.to_owned(),
                    extra: format!(
                        "[cluster]\nredis_url = \"redis://{redis_addr}/0\"\nkey_prefix = \"{prefix}\"\nmax_replicas = 3\ntimeout = \"200ms\"\n"
                    ),
                    ..Default::default()
                },
            )
            .await,
        ));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<_> = fleet
        .iter()
        .enumerate()
        .map(|(i, gw)| traffic(gw.clone(), format!("redis{i}"), 4, stop.clone()))
        .collect();
    // Shared mode first: requests admitted through Redis.
    eventually(
        Duration::from_secs(20),
        "traffic in shared mode",
        || async { sim.counts_by_request_id().len() >= 20 },
    )
    .await;
    for gw in &fleet {
        let r = gw.admin("/readyz").await.json();
        assert!(r["degraded"].is_null(), "shared mode before the fault: {r}");
    }

    host.partition();
    every_replica(&fleet, true, "every replica degraded to its share").await;
    let during = sim.counts_by_request_id().len();
    eventually(
        Duration::from_secs(30),
        "traffic on the fallback share",
        || async { sim.counts_by_request_id().len() >= during + 10 },
    )
    .await;

    host.heal();
    every_replica(&fleet, false, "shared mode resumed on every replica").await;
    let resumed = sim.counts_by_request_id().len();
    eventually(
        Duration::from_secs(30),
        "traffic after Redis returned",
        || async { sim.counts_by_request_id().len() >= resumed + 20 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for l in loads {
        outcomes.extend(l.await.expect("traffic"));
    }
    // Redis is not on the request's critical path: no client saw an error.
    assert!(
        outcomes.iter().all(|o| o.status == StatusCode::OK),
        "{:?}",
        outcomes.iter().find(|o| o.status != StatusCode::OK)
    );
    assert_outcomes(&sim, &outcomes);
}
