//! Upstream connections: one multiplexed HTTP/2 connection per worker, HTTP/1.1 for a worker's
//! single client connection and when the upstream only speaks that (the worker's own
//! connections, reused), a refused stream sent again, reconnection after the upstream restarts,
//! and idle connections closed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode, Version};
use meetgate::simulator::{self, Fault, SimConfig, SimLimits};

use crate::support::*;

const START: &str = "/v1/mmc/management/conferences/start";
const BODY: &[u8] = br#"{"conferenceID":"914087436","password":"123456"}"#;
/// HTTP/2 for every request, however many client connections a worker serves.
const ALWAYS_H2: &str = "http1_for_single_client = false";

/// Business requests the simulator saw: (connection, protocol) pairs.
fn connections(sim: &simulator::SimHandle) -> Vec<(std::net::SocketAddr, Version)> {
    received(sim, START)
        .iter()
        .map(|r| (r.peer, r.version))
        .collect()
}

#[tokio::test]
async fn concurrent_requests_share_one_http2_connection_per_worker() {
    let sim = default_sim().await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                top: "workers = 1".into(),
                // The first connections accepted may each be alone for a moment.
                upstream: ALWAYS_H2.into(),
                ..Default::default()
            },
        )
        .await,
    );
    let statuses = concurrently(32, |_| {
        let gw = gw.clone();
        async move { gw.start_meeting().await.status }
    })
    .await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let seen = connections(&sim);
    assert_eq!(seen.len(), 32);
    assert!(seen.iter().all(|(_, v)| *v == Version::HTTP_2), "{seen:?}");
    let peers: HashSet<_> = seen.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        peers.len(),
        1,
        "one connection for the one worker: {peers:?}"
    );
}

/// A plain HTTP/1.1 connection of its own to the gateway.
async fn client_connection(
    gw: &TestGateway,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

/// Sends start_meeting on `conn` with `id` as its request id; the protocol the upstream saw.
async fn protocol_seen(
    sim: &simulator::SimHandle,
    gw: &TestGateway,
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    id: &str,
) -> Version {
    sent_on(sim, gw, conn, id, BODY, StatusCode::OK)
        .await
        .version
}

/// Sends `body` to start_meeting on `conn`, expecting `status`; what the upstream received.
async fn sent_on(
    sim: &simulator::SimHandle,
    gw: &TestGateway,
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    id: &str,
    body: &'static [u8],
    status: StatusCode,
) -> simulator::RecordedRequest {
    conn.ready().await.expect("connection ready");
    // Origin-form, as a client connection sends it (the gateway refuses absolute-form).
    let req = http::Request::post(START)
        .header("x-request-id", id)
        .header("content-type", "application/json")
        .header("host", gw.addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
        .expect("request");
    let resp = conn.send_request(req).await.expect("answer");
    assert_eq!(resp.status(), status);
    let mut seen: Vec<_> = received(sim, START)
        .into_iter()
        .filter(|r| header(r, "x-request-id") == Some(id))
        .collect();
    assert_eq!(seen.len(), 1, "{id}: one request upstream");
    seen.remove(0)
}

#[tokio::test]
async fn a_single_client_connection_goes_over_http1_and_more_share_http2() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            top: "workers = 1".into(),
            // No idle pooled connections: only the direct one is kept alive.
            upstream: "pool_max_idle_per_host = 0".into(),
            ..Default::default()
        },
    )
    .await;
    let mut a = client_connection(&gw).await;
    assert_eq!(
        protocol_seen(&sim, &gw, &mut a, "a-alone").await,
        Version::HTTP_11
    );
    assert_eq!(
        protocol_seen(&sim, &gw, &mut a, "a-alone-2").await,
        Version::HTTP_11
    );
    // Over one kept-alive upstream connection.
    let alone: HashSet<_> = received(&sim, START)
        .iter()
        .filter(|r| header(r, "x-request-id").is_some_and(|id| id.starts_with("a-alone")))
        .map(|r| r.peer)
        .collect();
    assert_eq!(alone.len(), 1, "{alone:?}");
    // Its lengths are announced as on the HTTP/2 lane: an empty POST says `content-length: 0`.
    let empty = sent_on(&sim, &gw, &mut a, "a-empty", b"", StatusCode::BAD_REQUEST).await;
    assert_eq!(empty.version, Version::HTTP_11);
    assert_eq!(header(&empty, "content-length"), Some("0"));
    // A second connection on the same worker: both now share the HTTP/2 connection.
    let mut b = client_connection(&gw).await;
    assert_eq!(
        protocol_seen(&sim, &gw, &mut b, "b-shared").await,
        Version::HTTP_2
    );
    assert_eq!(
        protocol_seen(&sim, &gw, &mut a, "a-shared").await,
        Version::HTTP_2
    );
    // Once the gateway has seen the second one close, the first is alone again.
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("a-after-{n}");
        if protocol_seen(&sim, &gw, &mut a, &id).await == Version::HTTP_11 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still HTTP/2 after {n} requests"
        );
        tokio::task::yield_now().await;
    }
    // The two connections shared one upstream HTTP/2 connection.
    let peers: HashSet<_> = received(&sim, START)
        .iter()
        .filter(|r| r.version == Version::HTTP_2)
        .map(|r| r.peer)
        .collect();
    assert_eq!(peers.len(), 1, "one HTTP/2 connection: {peers:?}");
    gw.stop().await;
}

#[tokio::test]
async fn with_http1_for_single_client_off_a_single_connection_uses_http2() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            top: "workers = 1".into(),
            upstream: ALWAYS_H2.into(),
            ..Default::default()
        },
    )
    .await;
    let mut a = client_connection(&gw).await;
    assert_eq!(
        protocol_seen(&sim, &gw, &mut a, "alone").await,
        Version::HTTP_2
    );
    gw.stop().await;
}

/// A simulator that offers only HTTP/1.1 in ALPN.
async fn http1_only_sim() -> simulator::SimHandle {
    start_sim(SimConfig {
        apps: vec![sim_app()],
        limits: SimLimits::unlimited(),
        http2: false,
        ..SimConfig::default()
    })
    .await
}

#[tokio::test]
async fn an_upstream_that_speaks_only_http1_is_served_over_http1() {
    let sim = http1_only_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    for _ in 0..3 {
        let r = gw.start_meeting().await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let seen = connections(&sim);
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|(_, v)| *v == Version::HTTP_11), "{seen:?}");
    gw.stop().await;
}

#[tokio::test]
async fn over_http1_a_worker_reuses_its_connections_and_closes_idle_ones() {
    let sim = http1_only_sim().await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                top: "workers = 1".into(),
                upstream: "pool_idle_timeout = \"1s\"".into(),
                ..Default::default()
            },
        )
        .await,
    );
    // Client connections sending at once, each several requests one after another.
    const CLIENTS: usize = 8;
    const EACH: usize = 6;
    concurrently(CLIENTS, |i| {
        let gw = gw.clone();
        async move {
            let mut conn = client_connection(&gw).await;
            for j in 0..EACH {
                conn.ready().await.expect("connection ready");
                let req = http::Request::post(START)
                    .header("x-request-id", format!("pool-{i}-{j}"))
                    .header("content-type", "application/json")
                    .header("host", gw.addr.to_string())
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(BODY)))
                    .expect("request");
                let resp = conn.send_request(req).await.expect("answer");
                assert_eq!(resp.status(), StatusCode::OK);
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .expect("body");
            }
        }
    })
    .await;
    let seen: Vec<_> = received(&sim, START)
        .into_iter()
        .filter(|r| header(r, "x-request-id").is_some_and(|id| id.starts_with("pool-")))
        .collect();
    assert_eq!(seen.len(), CLIENTS * EACH, "each request once upstream");
    assert!(seen.iter().all(|r| r.version == Version::HTTP_11));
    // A request opens a connection only when every one the worker has is busy: never more
    // than the requests in flight at once, though each was answered on a kept-alive one.
    let peers: HashSet<_> = seen.iter().map(|r| r.peer).collect();
    assert!(
        peers.len() <= CLIENTS,
        "{} upstream connections for {CLIENTS} clients",
        peers.len()
    );
    eventually(
        Duration::from_secs(10),
        "idle HTTP/1.1 connections closed",
        || async { sim.open_connections() == 0 },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_stream_the_upstream_refused_is_sent_again_and_answered_once() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            upstream: ALWAYS_H2.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.clear_requests();
    sim.inject(Fault::RefuseStream { count: 1 });
    let r = gw
        .request(
            Method::POST,
            START,
            &[("x-request-id", "rid-refused")],
            BODY,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let seen: Vec<_> = received(&sim, START)
        .into_iter()
        .filter(|s| header(s, "x-request-id") == Some("rid-refused"))
        .map(|s| s.status)
        .collect();
    assert_eq!(seen, [0, 200], "refused unanswered, then answered once");
    gw.stop().await;
}

#[tokio::test]
async fn over_http1_a_refusal_is_a_broken_connection_and_never_replayed() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            upstream: "http2 = false".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.clear_requests();
    sim.inject(Fault::RefuseStream { count: 1 });
    let r = gw.start_meeting().await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "MEETGATE.UPSTREAM_UNREACHABLE")
    );
    assert_eq!(received(&sim, START).len(), 1, "no replay over HTTP/1.1");
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    gw.stop().await;
}

/// A simulator serving a certificate that a successor can serve too (on the same port), and a
/// one-worker gateway (with `upstream` keys) that trusts it and has made one request.
async fn restartable(
    upstream: String,
) -> (
    simulator::SimHandle,
    TestGateway,
    simulator::tls::GeneratedCert,
    tempfile::TempDir,
) {
    let now = time::OffsetDateTime::now_utc();
    let cert = simulator::tls::generate_cert(
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        now - time::Duration::days(1),
        now + time::Duration::days(30),
    )
    .expect("cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim_with_cert(LOOPBACK_ANY_PORT, &cert, dir.path()).await;
    let gw_dir = tempfile::tempdir().expect("tempdir");
    let config = gateway_config(
        &sim.url(),
        &cert.ca_pem,
        &GatewayOptions {
            top: "workers = 1".into(),
            upstream,
            ..Default::default()
        },
        gw_dir.path(),
    );
    let gw = spawn_with_config(config, gw_dir).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    (sim, gw, cert, dir)
}

#[tokio::test]
async fn after_the_upstream_restarts_requests_go_over_a_new_connection() {
    // The HTTP/2 lane after GOAWAY, and the single client's HTTP/1.1 connection after a close.
    // No idle pooled connections: were the direct connection not used, each request would open
    // one of its own.
    for (upstream, version) in [
        (ALWAYS_H2, Version::HTTP_2),
        ("pool_max_idle_per_host = 0", Version::HTTP_11),
    ] {
        reconnects_after_a_restart(upstream, version).await;
    }
}

async fn reconnects_after_a_restart(upstream: &str, version: Version) {
    let (first, gw, cert, dir) = restartable(upstream.into()).await;
    let addr = first.addr();
    let before = connections(&first);
    // A graceful stop: GOAWAY on every connection, then they close.
    first.shutdown().await;

    let second = sim_with_cert(addr, &cert, dir.path()).await;
    for _ in 0..3 {
        let r = gw.start_meeting().await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    // The first one was refused once more: the new upstream did not know the old token.
    let after = connections(&second);
    assert_eq!(after.len(), 4, "{after:?}");
    assert!(after.iter().all(|(_, v)| *v == version), "{after:?}");
    let peers: HashSet<_> = after.iter().map(|(p, _)| *p).collect();
    assert_eq!(peers.len(), 1, "one new connection: {peers:?}");
    assert!(!peers.contains(&before[0].0));
    gw.stop().await;
}

#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    // The HTTP/2 lane's connection, and the single client's HTTP/1.1 one.
    for upstream in [ALWAYS_H2, "pool_max_idle_per_host = 0"] {
        idle_connections_close(upstream).await;
    }
}

async fn idle_connections_close(upstream: &str) {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            upstream: format!("pool_idle_timeout = \"200ms\"\n{upstream}"),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    assert!(sim.open_connections() >= 1);
    eventually(
        Duration::from_secs(10),
        "idle connections closed",
        || async { sim.open_connections() == 0 },
    )
    .await;
    // And the next request opens one again.
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn requests_waiting_on_a_failed_connection_attempt_share_its_error() {
    let (sim, gw, _cert, _dir) = restartable("tls_timeout = \"1s\"".into()).await;
    let gw = Arc::new(gw);
    let addr = sim.addr();
    sim.shutdown().await;
    // The upstream's port now accepts TCP and never answers the TLS handshake.
    let silent = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    // Six requests on one worker: one at a time, each waiting out its own handshake, the
    // last ones would run into the 5 s request timeout instead.
    let replies = concurrently(6, |_| {
        let gw = gw.clone();
        async move {
            let r = gw.start_meeting().await;
            (
                r.status,
                r.json()["error_msg"].as_str().unwrap_or("").to_owned(),
            )
        }
    })
    .await;
    for (status, msg) in &replies {
        assert_eq!(*status, StatusCode::GATEWAY_TIMEOUT, "{replies:?}");
        assert!(msg.contains("TLS handshake"), "{replies:?}");
    }
    held.abort();
}

/// A body in two frames with no length known up front: hyper's client sends it chunked.
struct Chunked(std::collections::VecDeque<bytes::Bytes>);

impl http_body::Body for Chunked {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn bodies_are_announced_with_their_length_over_either_protocol() {
    let sim = default_sim().await;
    announced_lengths(&sim, ALWAYS_H2, Version::HTTP_2).await;
    // An upstream that declines HTTP/2 in ALPN gets the same announcement over HTTP/1.1 (and
    // so does a single client connection: see the test after `protocol_seen`).
    let sim = http1_only_sim().await;
    announced_lengths(&sim, ALWAYS_H2, Version::HTTP_11).await;
}

async fn announced_lengths(sim: &simulator::SimHandle, upstream: &str, version: Version) {
    let gw = spawn_gateway(
        sim,
        GatewayOptions {
            top: "workers = 1".into(),
            upstream: upstream.into(),
            ..Default::default()
        },
    )
    .await;
    // Sent chunked: the gateway buffers it and announces its length upstream.
    let (a, b) = BODY.split_at(BODY.len() / 2);
    let body = Chunked([a, b].map(bytes::Bytes::from_static).into());
    let req = http::Request::post(gw.url(START))
        .body(body)
        .expect("request");
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(req)
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    // An empty POST says so with `content-length: 0`, as hyper's own clients do.
    let r = gw.request(Method::POST, START, &[], b"").await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "the simulator wants a body"
    );
    let seen = received(sim, START);
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.version == version));
    let len = BODY.len().to_string();
    assert_eq!(header(&seen[0], "content-length"), Some(len.as_str()));
    assert_eq!(header(&seen[1], "content-length"), Some("0"));
    gw.stop().await;
}

/// A raw HTTP/1.1 `start` request, its id in `X-Request-Id`.
pub(crate) fn raw_start(id: &str) -> Vec<u8> {
    format!(
        "POST {START} HTTP/1.1\r\nhost: meetgate\r\ncontent-type: application/json\r\nx-request-id: {id}\r\ncontent-length: {}\r\n\r\n",
        BODY.len()
    )
    .into_bytes()
    .into_iter()
    .chain(BODY.iter().copied())
    .collect()
}

/// Reads `count` whole responses (head plus `content-length` bytes) from `s`; their statuses.
pub(crate) async fn read_responses(s: &mut tokio::net::TcpStream, count: usize) -> Vec<u16> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    while statuses.len() < count {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(n > 0, "closed after {} responses", statuses.len());
        buf.extend_from_slice(&chunk[..n]);
        // Every complete response at the front of `buf`.
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("content-length"));
            if buf.len() < end + 4 + len {
                break;
            }
            statuses.push(head[9..12].parse().expect("status"));
            buf.drain(..end + 4 + len);
        }
    }
    assert!(buf.is_empty(), "bytes past the responses: {buf:?}");
    statuses
}

/// (open, parked) client connections by the gateway's own gauges.
async fn client_connections(gw: &TestGateway) -> (f64, f64) {
    (
        gw.metric("meetgate_client_connections").await,
        gw.metric("meetgate_client_connections_parked").await,
    )
}

#[tokio::test]
async fn idle_http1_client_connections_are_parked_and_each_serves_its_next_requests() {
    use tokio::io::AsyncWriteExt;
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    const N: usize = 12;
    let mut conns = Vec::new();
    for i in 0..N {
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        s.write_all(&raw_start(&format!("park-{i}-a")))
            .await
            .expect("write");
        assert_eq!(read_responses(&mut s, 1).await, [200]);
        conns.push(s);
    }
    // Each answered connection waits for its next request parked, holding none of hyper's
    // state; without parking the second gauge stays at 0.
    eventually(
        Duration::from_secs(10),
        "every idle connection parked",
        || {
            let gw = &gw;
            async move { client_connections(gw).await == (N as f64, N as f64) }
        },
    )
    .await;
    // Each comes back for its next request: one alone, then two pipelined in one write,
    // then one split mid-head and mid-body across writes.
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&raw_start(&format!("park-{i}-b")))
            .await
            .expect("write");
        assert_eq!(read_responses(s, 1).await, [200]);
        let mut two = raw_start(&format!("park-{i}-c"));
        two.extend(raw_start(&format!("park-{i}-d")));
        s.write_all(&two).await.expect("write");
        assert_eq!(read_responses(s, 2).await, [200, 200]);
        let split = raw_start(&format!("park-{i}-e"));
        for part in [&split[..7], &split[7..40], &split[40..split.len() - 5]] {
            s.write_all(part).await.expect("write");
            s.flush().await.expect("flush");
            tokio::task::yield_now().await;
        }
        s.write_all(&split[split.len() - 5..]).await.expect("write");
        assert_eq!(read_responses(s, 1).await, [200]);
    }
    let ids: HashSet<String> = received(&sim, START)
        .iter()
        .filter_map(|r| header(r, "x-request-id").map(str::to_owned))
        .filter(|id| id.starts_with("park-"))
        .collect();
    assert_eq!(ids.len(), N * 5, "every request upstream once: {ids:?}");
    eventually(Duration::from_secs(10), "parked again", || {
        let gw = &gw;
        async move { client_connections(gw).await == (N as f64, N as f64) }
    })
    .await;
    // On shutdown a parked connection closes at once: there is nothing to finish.
    gw.stop().await;
    for mut s in conns {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("closed on shutdown");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
