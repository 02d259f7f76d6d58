//! Hardening: malformed requests, limits, upstream faults and replay safety. Every refusal is a
//! clear 4xx/5xx, nothing reaches the upstream that should not, and the gateway recovers.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use meetgate::simulator::{self, Fault};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const BODY: &[u8] = br#"{"conferenceID":"914087436","password":"123456"}"#;

/// Sends raw bytes and reads until the server closes or `wait` passes; returns what came back.
/// Stops early once one complete response (headers plus `content-length` bytes) is in, unless
/// `all` asks for everything until the server closes.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> String {
    raw_until(addr, bytes, wait, false).await
}

async fn raw_until(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration, all: bool) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // A server may answer and close before reading everything: that is fine here.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if !all && complete(&out) {
                return;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

fn complete(out: &[u8]) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let len = text[..end]
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    out.len() >= end + 4 + len
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn business(sim: &simulator::SimHandle) -> usize {
    sim.requests()
        .iter()
        .filter(|r| !r.path_and_query.contains("/acs/"))
        .count()
}

#[tokio::test]
async fn malformed_requests_get_a_clear_4xx_and_never_reach_the_upstream() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            extra: "[limits]\nmax_headers = 20\nmax_header_bytes = 8192\n".into(),
            ..Default::default()
        },
    )
    .await;
    eventually(Duration::from_secs(10), "sign-in", || async {
        sim.sign_in_count() == 1
    })
    .await;
    let addr = gw.addr;
    let wait = Duration::from_secs(5);
    let start = "POST /v1/mmc/management/conferences/start HTTP/1.1\r\nHost: x\r\n";
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        (
            "two different Content-Lengths",
            format!("{start}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!").into_bytes(),
            &[400],
        ),
        ("invalid header bytes", [start.as_bytes(), b"X-Bad\x01Name: v\r\n\r\n"].concat(), &[400]),
        (
            "non-UTF-8 path",
            b"GET /v1/mmc/management/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "over-long path",
            format!("GET /v1/mmc/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(4000)).into_bytes(),
            &[400, 414],
        ),
        (
            "absolute-form URI to another host",
            b"POST http://evil.example/v1/mmc/management/conferences/start HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            &[400],
        ),
        (
            "CONNECT",
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "too many headers",
            format!("{start}{}\r\n", (0..40).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()).into_bytes(),
            &[431],
        ),
        (
            "headers too large",
            format!("{start}X-Big: {}\r\n\r\n", "v".repeat(20_000)).into_bytes(),
            &[431],
        ),
    ];
    for (what, bytes, expected) in cases {
        let resp = raw(addr, &bytes, wait).await;
        let status = status_of(&resp);
        assert!(expected.contains(&status), "{what}: got {status}: {resp}");
        assert_eq!(business(&sim), 0, "{what} reached the upstream: {resp}");
    }
    // Content-Length with Transfer-Encoding: hyper settles it (chunked wins, Content-Length
    // dropped) before meetgate sees the request; the connection watch refuses it, and nothing
    // smuggled behind it reaches the upstream either.
    let smuggle = format!(
        "{start}Content-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         DELETE /v1/usg/dcs/corp/dept/victim HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let resp = raw_until(addr, smuggle.as_bytes(), wait, true).await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(resp.contains("MEETGATE.BAD_REQUEST"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );
    assert_eq!(
        resp.matches("HTTP/1.1 ").count(),
        1,
        "one answer only: {resp}"
    );
    assert_eq!(business(&sim), 0, "neither request reached the upstream");
    sim.clear_requests();
    // Path tricks, through a normal client: refused, or classified as the upstream routes them.
    for path in [
        "/v1/mmc//management/conferences/start",
        "/v1/mmc/./management/conferences/start",
        "/v1/mmc/x/../management/conferences/start",
        "/v1/mmc/management%2Fconferences/start",
        "/v1/mmc/management/conferences/%2e%2e/start",
        "/v1/mmc/management/conferences/start/",
    ] {
        let r = gw.request(Method::POST, path, &[], BODY).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::BAD_REQUEST, "MEETGATE.BAD_PATH"),
            "{path}"
        );
    }
    assert_eq!(business(&sim), 0, "none of it reached the upstream");
    // And the gateway still serves.
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn slow_clients_cannot_hold_connections() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            extra: "[limits]\nheader_read_timeout = \"300ms\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    // Headers that never finish: the server closes (408 or plain close) on its own.
    let resp = raw(
        gw.addr,
        b"POST /v1/mmc/management/conferences/start HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(resp.is_empty() || status_of(&resp) == 408, "{resp}");
    // An idle keep-alive connection is closed too.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /healthz-not-here HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("a response");
    assert!(n > 0);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle keep-alive connection was closed");
    gw.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            extra: "[limits]\nmax_body_bytes = 2048\nreplay_body_bytes = 1024\n".into(),
            ..Default::default()
        },
    )
    .await;
    eventually(Duration::from_secs(10), "sign-in", || async {
        sim.sign_in_count() == 1
    })
    .await;
    let big = vec![b'x'; 4096];
    // Declared length: refused before anything goes upstream.
    let r = gw.request(Method::POST, START, &[], &big).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "MEETGATE.BODY_TOO_LARGE")
    );
    assert_eq!(business(&sim), 0);
    // Chunked, no length: cut off while streaming.
    let chunk = |n: usize| format!("{n:x}\r\n{}\r\n", "y".repeat(n));
    let req = format!(
        "POST {START} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{}{}{}0\r\n\r\n",
        chunk(1000),
        chunk(1000),
        chunk(1000)
    );
    let resp = raw(gw.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), 413, "{resp}");
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn excess_requests_and_connections_get_503_never_a_hang() {
    let sim = default_sim().await;
    let gw = Arc::new(
        spawn_gateway(
            &sim,
            GatewayOptions {
                extra: "[limits]\nmax_concurrent_requests = 2\nmax_connections = 8\n".into(),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.inject(Fault::Delay {
        delay: Duration::from_millis(800),
        count: 2,
    });
    let slow = {
        let gw = gw.clone();
        tokio::spawn(async move {
            concurrently(2, move |_| {
                let gw = gw.clone();
                async move { gw.start_meeting().await.status }
            })
            .await
        })
    };
    eventually(
        Duration::from_secs(5),
        "two requests held upstream",
        || async { received(&sim, START).len() == 3 },
    )
    .await;
    let r = gw.start_meeting().await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "MEETGATE.OVERLOADED")
    );
    assert!(slow
        .await
        .expect("join")
        .iter()
        .all(|s| *s == StatusCode::OK));

    // Connections: hold 8 open, the 9th is told 503 and closed.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    // The gateway's own client pool may hold some; wait until the cap is really reached.
    let resp = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("MEETGATE.OVERLOADED"));
    drop(held);
    eventually(Duration::from_secs(10), "serving again", || async {
        raw(gw.addr, format!("POST {START} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", BODY.len()).as_bytes().iter().chain(BODY).copied().collect::<Vec<u8>>().as_slice(), Duration::from_secs(5))
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test]
async fn a_post_whose_connection_broke_after_sending_is_never_replayed() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.clear_requests();
    sim.inject(Fault::ResetBeforeResponse { count: 1 });
    let r = gw
        .request(Method::POST, START, &[("x-request-id", "rid-reset")], BODY)
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "MEETGATE.UPSTREAM_UNREACHABLE")
    );
    let seen: Vec<_> = received(&sim, START)
        .into_iter()
        .filter(|s| header(s, "x-request-id") == Some("rid-reset"))
        .collect();
    assert_eq!(seen.len(), 1, "the upstream saw it at most once");
    // Recovery at once.
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn upstream_5xx_passes_through_unreplayed() {
    let sim = default_sim().await;
    let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    sim.clear_requests();
    sim.inject(Fault::BusinessStatus {
        status: 503,
        count: 1,
    });
    let r = gw.start_meeting().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "SIM.FAULT", "the upstream's own error body");
    assert_eq!(received(&sim, START).len(), 1);
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn broken_sign_in_answers_give_503_then_recover() {
    for (what, body) in [
        ("garbage", "<html>oops</html>".to_owned()),
        ("truncated JSON", "{\"accessToken\":".to_owned()),
        ("missing accessToken", "{\"validPeriod\":3600}".to_owned()),
        (
            "lifetime 0",
            "{\"accessToken\":\"t0k3n-zero-life\",\"validPeriod\":0}".to_owned(),
        ),
    ] {
        let sim = default_sim().await;
        sim.inject(Fault::SignInBody { body, count: 1 });
        let gw = spawn_gateway(&sim, GatewayOptions::default()).await;
        // The first sign-in fails; a request inside the back-off gets a precise 503.
        eventually(
            Duration::from_secs(10),
            "the bad answer was received",
            || async { !received(&sim, "/v2/usg/acs/auth/appauth").is_empty() },
        )
        .await;
        let r = gw.start_meeting().await;
        if r.status != StatusCode::OK {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
            assert_eq!(r.error_code(), "MEETGATE.TOKEN_UNAVAILABLE", "{what}");
            assert!(
                r.json()["error_msg"]
                    .as_str()
                    .unwrap_or("")
                    .contains("unusable"),
                "{what}: {:?}",
                r.body
            );
        }
        eventually(Duration::from_secs(10), "recovery", || async {
            gw.start_meeting().await.status == StatusCode::OK
        })
        .await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn certificates_for_another_name_or_expired_are_refused() {
    let now = time::OffsetDateTime::now_utc();
    let dir = tempfile::tempdir().expect("tempdir");
    let other = simulator::tls::generate_cert(
        &["other.example".to_owned()],
        now - time::Duration::days(1),
        now + time::Duration::days(30),
    )
    .expect("cert");
    let expired = simulator::tls::generate_cert(
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .expect("cert");
    for (what, cert) in [("another name", other), ("expired", expired)] {
        let sub = dir.path().join(what.replace(' ', "-"));
        std::fs::create_dir_all(&sub).expect("dir");
        let sim = sim_with_cert(LOOPBACK_ANY_PORT, &cert, &sub).await;
        // Trust the issuing CA, so only the name or the dates are wrong.
        let d = tempfile::tempdir().expect("tempdir");
        let config = gateway_config(
            &sim.url(),
            &cert.ca_pem,
            &GatewayOptions::default(),
            d.path(),
        );
        let gw = spawn_with_config(config, d).await;
        let r = gw.start_meeting().await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "MEETGATE.TOKEN_UNAVAILABLE"
            ),
            "{what}"
        );
        let msg = r.json()["error_msg"].as_str().unwrap_or("").to_owned();
        assert!(msg.contains("TLS handshake"), "{what}: {msg}");
        assert!(
            sim.requests().is_empty(),
            "{what}: nothing crossed the bad TLS session"
        );
        gw.stop().await;
    }
}

/// Sends a POST start and reads the whole answer: the status, or the body error.
async fn start_and_read(gw: &TestGateway) -> (StatusCode, Result<bytes::Bytes, String>) {
    use http_body_util::BodyExt;
    let req = http::Request::post(gw.url(START))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(BODY)))
        .expect("request");
    let resp = gw.client.request(req).await.expect("headers arrive");
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

#[tokio::test]
async fn slow_or_broken_upstream_bodies_are_cut_off_and_the_gateway_recovers() {
    let sim = default_sim().await;
    let gw = spawn_gateway(
        &sim,
        GatewayOptions {
            upstream: "body_timeout = \"300ms\"".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gw.start_meeting().await.status, StatusCode::OK);

    // A body that stalls longer than body_timeout: the client's body ends in an error, not a hang.
    sim.inject(Fault::SlowBody {
        delay: Duration::from_secs(5),
        count: 1,
    });
    let (status, body) = tokio::time::timeout(Duration::from_secs(4), start_and_read(&gw))
        .await
        .expect("cut off well before the upstream's 5 s stall");
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.is_err(),
        "an incomplete body is reported as such: {body:?}"
    );

    // A body that stalls less than body_timeout arrives whole.
    sim.inject(Fault::SlowBody {
        delay: Duration::from_millis(50),
        count: 1,
    });
    let (_, body) = start_and_read(&gw).await;
    assert!(body.is_ok_and(|b| serde_json::from_slice::<serde_json::Value>(&b).is_ok()));

    // A reset mid-body: processed upstream once, never replayed, the client sees the break.
    sim.clear_requests();
    sim.inject(Fault::ResetMidBody { count: 1 });
    let (status, body) = start_and_read(&gw).await;
    // Over h2 the reset can overtake the headers: then it is a clean 502 instead.
    if status == StatusCode::BAD_GATEWAY {
        let v: serde_json::Value =
            serde_json::from_slice(&body.expect("error body")).expect("json");
        assert_eq!(v["error_code"], "MEETGATE.UPSTREAM_UNREACHABLE");
    } else {
        assert!(body.is_err(), "{body:?}");
    }
    assert_eq!(received(&sim, START).len(), 1, "not replayed");

    assert_eq!(gw.start_meeting().await.status, StatusCode::OK, "recovered");
    gw.stop().await;
}
