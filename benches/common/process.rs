//! What the benches that run proxies as processes share: settings from the environment, free
//! ports, /proc readings, signals, and finding nginx. Included by path (`load`, `scale`); each
//! uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `name` from the environment, parsed; `default` when unset or unparsable.
pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A loopback port free at the time of asking.
pub(crate) fn free_port() -> Result<u16, String> {
    // Bound and released at once: a small race with other programs, acceptable on loopback.
    let l =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// The parent pid (field 4) of /proc/<pid>/stat; `None` once the process is gone.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The direct children of `parent` (nginx's workers).
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

/// A `Vm*:` line of /proc/<pid>/status, in KiB; 0 if unreadable.
pub(crate) fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Summed VmRSS of `pids`, in KiB.
pub(crate) fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_kib(*p, "VmRSS:")).sum()
}

/// `kill -SIG pid`, quietly for a process already gone.
pub(crate) fn signal(pid: u32, sig: &str) {
    // A process that is already gone is not worth a message; no `kill` program is.
    if let Err(e) = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
    {
        eprintln!("cannot run `kill -{sig} {pid}`: {e}");
    }
}

/// `name` on `PATH`, or in `/usr/sbin` or `/sbin`.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// nginx as the variable `var` says: `off` (none), a binary, or unset (`nginx` found by
/// [`which`]).
pub(crate) fn nginx_binary(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)).filter(|p| p.is_file()),
        None => which("nginx"),
    }
}
