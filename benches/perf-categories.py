#!/usr/bin/env python3
"""Where meetgate's CPU goes, by category, from a `perf record --call-graph dwarf` file.

Usage: benches/perf-categories.py FILE [TOP]   (FILE from `LOAD_PERF_OUT=FILE cargo bench --bench load`)

Each sample goes to exactly one category: kernel samples by what the kernel was doing (tokio
waking or parking threads, loopback TCP, epoll, context switches) unless the logger caused them; allocator samples to
"allocation"; any other user-space sample to the nearest frame, walking from the leaf towards
the root, that belongs to a known component. Then the TOP self symbols.
"""

import collections
import re
import subprocess
import sys

B = r"(?<![A-Za-z0-9_])"  # so that "alloc::string::" is not "ring::" and "sha2::" not "h2::"

COMPONENTS = [
    ("logging (tracing-subscriber fmt, access log)", B + r"(tracing_subscriber|tracing_core|nu_ansi_term|tracing::|meetgate::access)"),
    ("metrics (prometheus-client)", B + r"(prometheus_client|meetgate::metrics)"),
    ("quota (governor)", B + r"(governor|meetgate::quota)"),
    ("token cache", B + r"meetgate::token"),
    ("request id (uuid, rand)", B + r"(uuid|rand|rand_core|rand_chacha|getrandom)::"),
    ("TLS to upstream (rustls, ring)", B + r"(rustls|ring|tokio_rustls)::"),
    ("HTTP/2 codec to upstream (h2, hpack)", B + r"h2::"),
    ("HTTP/1.1 server side (hyper h1, httparse)", B + r"(hyper::proto::h1|httparse)"),
    ("hyper client pool (hyper-util legacy)", B + r"hyper_util::client"),
    ("header maps and rewrite (http, meetgate::headers)", B + r"(meetgate::headers|http::header|http::extensions)"),
    ("classification (meetgate::operations)", B + r"meetgate::operations"),
    ("meetgate request path (proxy, server, body, ...)", B + r"meetgate::"),
    ("hyper other (date cache, dispatch)", B + r"hyper::"),
    ("tokio scheduler and timers", B + r"tokio::(runtime|sync|time)"),
    ("tokio I/O driver (mio)", B + r"(mio::|tokio::io|tokio::net)"),
]
ALLOC = re.compile(r"^(__GI___libc_malloc|__GI___libc_free|__libc_malloc|__libc_free|malloc|free|cfree|realloc|__GI___libc_realloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|unlink_chunk|tcache_\w+|__rust_alloc|__rust_dealloc|__rust_realloc|alloc::alloc::\w+)")


def samples(path):
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "comm,tid,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout
    frames = []
    for line in out.splitlines():
        if not line.strip():
            if frames:
                yield frames
            frames = []
            continue
        if not line.startswith(("\t", " ")) or not re.match(r"^\s+[0-9a-f]+ ", line):
            continue
        m = re.match(r"^\s+[0-9a-f]+ (.*) \((.*)\)$", line)
        if m:
            sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(1))
            frames.append((sym, m.group(2)))
    if frames:
        yield frames


def categorize(frames):
    leaf, dso = frames[0]
    joined = " ".join(s for s, _ in frames)
    if "kernel" in dso:
        if re.search(B + r"(tracing_subscriber|meetgate::access)", joined):
            return "logging (write syscall to the log file)"
        if re.search(r"futex|eventfd", joined):
            return "kernel: tokio thread wake-up / park (futex, eventfd)"
        if re.search(r"tcp_|sock_|inet_|__sys_sendto|__sys_recvfrom|sendmsg|recvmsg|ksys_write|ksys_read|writev|readv", joined):
            return "kernel: loopback TCP send/recv (incl. waking the peer)"
        if re.search(r"epoll", joined):
            return "kernel: epoll"
        if re.search(r"schedule|finish_task_switch", joined):
            return "kernel: context switch"
        return "kernel: other"
    if ALLOC.match(leaf):
        return "allocation (malloc/free)"
    for sym, _ in frames:
        for name, pattern in COMPONENTS:
            if re.search(pattern, sym):
                return name
    return "other (std, libc, unresolved)"


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    cats = collections.Counter()
    selfs = collections.Counter()
    n = 0
    for frames in samples(path):
        n += 1
        cats[categorize(frames)] += 1
        selfs[frames[0][0]] += 1
    print(f"{n} samples")
    for name, k in cats.most_common():
        print(f"{100 * k / n:6.1f}%  {name}")
    print(f"\ntop {top} self symbols")
    for name, k in selfs.most_common(top):
        print(f"{100 * k / n:6.1f}%  {name[:150]}")


if __name__ == "__main__":
    main()
