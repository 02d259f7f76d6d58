//! Token-layer benchmark: the per-request cost of the token layer (pick the identity's slot,
//! take its current token from the cache, inject it as `X-Access-Token`) against injecting a
//! fixed header, as nginx does, on one worker thread and on two at once (the workers share the
//! cache). `cargo bench --bench token`.
//!
//! The token layer cannot be switched off by configuration (meetgate holds the credentials), so
//! the load benchmark cannot measure it on vs off; this measures the layer's own work instead,
//! which divided by the CPU time per request in `cargo bench --bench load` is its share.
//! `TOKEN_ITERATIONS` (per thread, default 5,000,000), `TOKEN_ROUNDS` (default 5).

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use meetgate::clock::SystemClock;
use meetgate::headers::X_ACCESS_TOKEN;
use meetgate::token::AppConfig;
use meetgate::token::{Authenticator, Grant, SignInFuture, Slot, TokenCache};
use secrecy::SecretString;

/// Hands out a 12-hour token of a realistic length, as the upstream's sign-in does.
struct Granting;

impl Authenticator for Granting {
    fn sign_in<'a>(&'a self, _app: &'a AppConfig, _user: &'a str) -> SignInFuture<'a> {
        Box::pin(async {
            Ok(Grant {
                access_token: SecretString::from("cnr".repeat(30)),
                lifetime: Duration::from_secs(12 * 3600),
            })
        })
    }
}

#[derive(Clone, Copy)]
enum Case {
    /// The gateway's path: slot, cache, injected value.
    TokenLayer,
    /// A fixed value, what a proxy without a token layer does.
    FixedHeader,
}

/// Headers as the gateway holds them when the token goes in.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("48"));
    h.insert(
        meetgate::headers::X_REQUEST_ID,
        HeaderValue::from_static("0b6ceb73-34be-e716-9a1b-2f0c5b1e7d42"),
    );
    h
}

/// Nanoseconds per request on one thread.
fn run_one(case: Case, cache: &TokenCache, slot: &Arc<Slot>, iterations: u64) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let fixed = HeaderValue::from_static("a-fixed-token-as-nginx-would-set-it");
    let mut headers = request_headers();
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iterations {
            match case {
                Case::TokenLayer => {
                    // As the proxy does per attempt: the token's header from the app's slot.
                    let (token, _generation) = cache.header(slot).await.expect("token");
                    headers.insert(X_ACCESS_TOKEN, token);
                }
                Case::FixedHeader => {
                    headers.insert(X_ACCESS_TOKEN, fixed.clone());
                }
            }
            std::hint::black_box(&headers);
        }
        start.elapsed().as_nanos() as f64 / iterations as f64
    })
}

/// Nanoseconds per request on each of `threads` threads started together.
fn run(case: Case, cache: &TokenCache, slot: &Arc<Slot>, threads: usize, iterations: u64) -> f64 {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (cache, slot, barrier) = (cache.clone(), slot.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                run_one(case, &cache, &slot, iterations)
            })
        })
        .collect();
    let per: Vec<f64> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    per.iter().sum::<f64>() / per.len() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let iterations = env_u64("TOKEN_ITERATIONS", 5_000_000);
    let rounds = env_u64("TOKEN_ROUNDS", 5).max(1);
    let config = meetgate::config::load_str(
        "[[apps]]\napp_id = \"bench-token-app\"\napp_key = \"bench-token-key\"\n",
        &HashMap::new(),
    )
    .expect("config");
    let app = Arc::new(config.apps[0].clone());
    let cache = TokenCache::new(
        Arc::new(Granting),
        Arc::new(SystemClock),
        config.token.clone(),
        false,
        Arc::default(),
    );
    let slot = cache.slot(&app, "");
    // The first get signs in; every measured one finds the token fresh, as in steady state.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(cache.get(&slot)).expect("sign-in");

    println!(
        "# {iterations} requests per thread per round, {rounds} rounds (median), {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<10} {:>16} {:>16} {:>18}",
        "threads", "token layer ns", "fixed header ns", "token layer adds"
    );
    for threads in [1, 2] {
        let mut layer = Vec::new();
        let mut fixed = Vec::new();
        for _ in 0..rounds {
            layer.push(run(Case::TokenLayer, &cache, &slot, threads, iterations));
            fixed.push(run(Case::FixedHeader, &cache, &slot, threads, iterations));
        }
        let (layer, fixed) = (median(layer), median(fixed));
        println!(
            "{threads:<10} {layer:>16.1} {fixed:>16.1} {:>15.1} ns",
            layer - fixed
        );
    }
}
