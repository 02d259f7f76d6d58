//! Per-client inbound rate limits (`rate` of `[[clients]]`): governor's keyed GCRA limiters, one
//! per distinct rate, keyed by client name. A request over its client's rate is refused with 429
//! before it queues for the upstream's quota, so one client's flood never takes a place in line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::access::{ClientConfig, ClientRate};

/// The limiters of the clients in force.
#[derive(Default)]
pub struct Inbound {
    /// Client name -> the limiter of its rate.
    clients: HashMap<Arc<str>, Arc<DefaultKeyedRateLimiter<Arc<str>>>>,
    /// Rate -> its limiter, kept across reloads so a reload grants no fresh burst.
    by_rate: HashMap<(u32, Duration), Arc<DefaultKeyedRateLimiter<Arc<str>>>>,
}

impl Inbound {
    /// The limiters for `clients`, reusing `previous`'s for rates that did not change.
    pub fn new(clients: &[ClientConfig], previous: Option<&Inbound>) -> Inbound {
        let mut out = Inbound::default();
        for c in clients {
            let Some(rate) = c.rate else { continue };
            let key = (rate.count.get(), rate.period);
            let limiter = out
                .by_rate
                .entry(key)
                .or_insert_with(|| {
                    previous
                        .and_then(|p| p.by_rate.get(&key).cloned())
                        .unwrap_or_else(|| Arc::new(limiter(rate)))
                })
                .clone();
            out.clients.insert(c.name.clone(), limiter);
        }
        out
    }

    /// `Err(retry_after)` when `client` is over its rate.
    pub fn check(&self, client: &Arc<str>) -> Result<(), Duration> {
        let Some(limiter) = self.clients.get(client) else {
            return Ok(());
        };
        limiter
            .check_key(client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// `count` per `period`, all of it usable at once.
fn limiter(rate: ClientRate) -> DefaultKeyedRateLimiter<Arc<str>> {
    let quota = Quota::with_period(rate.period / rate.count.get())
        .unwrap_or_else(|| Quota::per_second(rate.count))
        .allow_burst(rate.count);
    DefaultKeyedRateLimiter::keyed(quota)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, rate: Option<&str>) -> ClientConfig {
        let text = format!(
            "[[apps]]\napp_id = \"a\"\napp_key = \"k\"\n[[clients]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n{}",
            "0".repeat(64),
            rate.map(|r| format!("rate = \"{r}\"\n")).unwrap_or_default()
        );
        crate::config::load_str(&text, &HashMap::new())
            .expect("valid")
            .clients
            .remove(0)
    }

    #[test]
    fn a_client_over_its_rate_is_refused_and_a_reload_keeps_its_state() {
        let c = client("batch", Some("3/m"));
        let inbound = Inbound::new(std::slice::from_ref(&c), None);
        for _ in 0..3 {
            assert!(inbound.check(&c.name).is_ok());
        }
        let wait = inbound.check(&c.name).expect_err("over its rate");
        assert!(wait > Duration::from_secs(15), "{wait:?}");
        // Reloaded with the same rate: still over it.
        let reloaded = Inbound::new(std::slice::from_ref(&c), Some(&inbound));
        assert!(reloaded.check(&c.name).is_err());
        // Clients without a rate are never refused here.
        let free = client("free", None);
        assert!(reloaded.check(&free.name).is_ok());
    }
}
