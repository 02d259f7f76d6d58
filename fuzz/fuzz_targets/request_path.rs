//! The request path from raw bytes: a byte stream into the listener's HTTP/1.1 (or h2c)
//! handling, with the framing watch, classification, access, header rewriting and forwarding,
//! served in-process (`server::serve_io` over an in-memory stream) against the real simulator.
//! Invariants: never a panic; the connection is answered and closed within a deadline (no
//! hang); every answer is an HTTP/1.1 response (or h2 frames for the h2 preface); and whatever
//! reaches the upstream carries a token the upstream issued and none of the client's
//! credentials.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_ID: &str = "fuzz-request-path-app-0000000001";
const APP_KEY: &str = "fuzz-request-path-key";

struct World {
    runtime: tokio::runtime::Runtime,
    sim: meetgate::simulator::SimHandle,
    gateway: Arc<meetgate::Gateway>,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (sim, gateway) = runtime.block_on(async {
        let sim = meetgate::simulator::start(meetgate::simulator::SimConfig {
            apps: vec![meetgate::simulator::SimApp::new(APP_ID, APP_KEY)],
            limits: meetgate::simulator::SimLimits::unlimited(),
            record_bodies: false,
            ..Default::default()
        })
        .await
        .expect("simulator");
        let dir = std::env::temp_dir().join(format!("meetgate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, sim.ca_pem()).expect("ca");
        let text = format!(
            "[upstream]\nurl = \"{}\"\nca_file = {:?}\nrequest_timeout = \"2s\"\n\
             [limits]\nheader_read_timeout = \"1s\"\nreplay_body_bytes = 4096\nmax_body_bytes = 65536\n\
             [quota]\nper_api_per_minute = 1000000\nall_env_per_second = 1000000\nmax_wait = \"1s\"\n\
             [log]\nlevel = \"off\"\n\
             [[apps]]\napp_id = \"{APP_ID}\"\napp_key = \"{APP_KEY}\"\n",
            sim.url(),
            ca.display().to_string()
        );
        let config = meetgate::config::load_str(&text, &HashMap::new()).expect("config");
        let gateway = meetgate::Gateway::new(
            Arc::new(config),
            Arc::new(meetgate::clock::SystemClock),
        )
        .expect("gateway");
        (sim, gateway)
    });
    World {
        runtime,
        sim,
        gateway,
    }
});

fuzz_target!(|data: &[u8]| {
    let world = &*WORLD;
    let output = world.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let serving = tokio::spawn(meetgate::server::serve_io(
            world.gateway.clone(),
            server,
            "127.0.0.1:40000".parse().expect("addr"),
            world.gateway.upstream().clone(),
        ));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the connection was neither answered nor closed in 10 s"
        );
        let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
        out
    });
    if !output.is_empty() && !data.starts_with(b"PRI * HTTP/2.0") {
        assert!(
            output.starts_with(b"HTTP/1.1 ") || output.starts_with(b"HTTP/1.0 "),
            "not an HTTP response: {:?}",
            String::from_utf8_lossy(&output[..output.len().min(200)])
        );
    }
    let issued = world.sim.issued_tokens();
    for r in world.sim.requests() {
        if r.path().contains("/acs/auth/") {
            continue;
        }
        let token = r.header("x-access-token").expect("a token was injected");
        assert!(
            issued.iter().any(|t| t == token),
            "a token the upstream did not issue"
        );
        for name in [
            "authorization",
            "cookie",
            "x-meetgate-app",
            "x-meetgate-user",
        ] {
            assert!(
                r.header(name).is_none(),
                "the client's {name} reached the upstream"
            );
        }
    }
    world.sim.clear_requests();
});
