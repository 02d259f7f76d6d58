//! Tokens shared by replicas through Redis: one replica signs in per identity per lifetime
//! (a lock with expiry decides which; the others wait for its result), and a token refused
//! upstream is dropped for the whole fleet. Without Redis, each replica signs in on its own.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::cache::{Authenticator, Grant, SignInError, SignInFuture};
use super::{AppConfig, TokenConfig};
use crate::clock::Clock;
use crate::cluster::{Cluster, SharedToken};

/// How many refused tokens are remembered, so a replica never takes one back from Redis.
const DEAD_TOKENS: usize = 1024;

pub struct SharedAuthenticator {
    inner: Arc<dyn Authenticator>,
    cluster: Arc<Cluster>,
    clock: Arc<dyn Clock>,
    cfg: TokenConfig,
    dead: Mutex<VecDeque<[u8; 32]>>,
    /// Identifies this replica as a lock holder.
    holder: String,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl SharedAuthenticator {
    pub fn new(
        inner: Arc<dyn Authenticator>,
        cluster: Arc<Cluster>,
        clock: Arc<dyn Clock>,
        cfg: TokenConfig,
    ) -> Self {
        SharedAuthenticator {
            inner,
            cluster,
            clock,
            cfg,
            dead: Mutex::new(VecDeque::new()),
            holder: hex::encode(rand::random::<[u8; 12]>()),
        }
    }

    fn is_dead(&self, token: &str) -> bool {
        let d = digest(token);
        self.dead.lock().map(|q| q.contains(&d)).unwrap_or(false)
    }

    fn keys(&self, app: &AppConfig, user: &str) -> (String, String) {
        let corp = app.corp_id.as_deref().unwrap_or("-");
        (
            self.cluster.key(&["tok", &app.app_id, corp, user]),
            self.cluster.key(&["lock", &app.app_id, corp, user]),
        )
    }

    /// A usable token from the shared store: `Ok(None)` when there is none (a dead one is
    /// deleted), `Err` when the store cannot be read.
    async fn shared_token(&self, key: &str) -> Result<Option<Grant>, ()> {
        let now = self.clock.now_ms();
        match self.cluster.get_token(key).await {
            Ok(Some(t)) if self.is_dead(&t.token) => {
                let _ = self.cluster.delete_token_if(key, &t).await;
                Ok(None)
            }
            Ok(Some(t)) if now < t.refresh_at_ms && now < t.expires_at_ms => Ok(Some(Grant {
                lifetime: Duration::from_millis(t.expires_at_ms - now),
                access_token: SecretString::from(t.token),
            })),
            Ok(_) => Ok(None),
            Err(_) => Err(()),
        }
    }

    async fn shared_sign_in(&self, app: &AppConfig, user: &str) -> Result<Grant, SignInError> {
        let (key, lock) = self.keys(app, user);
        let give_up = self.clock.now_ms() + (self.cfg.sign_in_timeout.as_millis() as u64) * 3 / 4;
        loop {
            match self.shared_token(&key).await {
                Ok(Some(grant)) => return Ok(grant),
                Ok(None) => {}
                Err(()) => return self.inner.sign_in(app, user).await,
            }
            match self
                .cluster
                .try_lock(&lock, &self.holder, self.cfg.sign_in_timeout)
                .await
            {
                Ok(true) => {
                    // The holder before us may have stored its token and let go between our
                    // look and our lock: look again before signing in a second time.
                    if let Ok(Some(grant)) = self.shared_token(&key).await {
                        self.cluster.unlock(&lock, &self.holder).await;
                        return Ok(grant);
                    }
                    let result = self.inner.sign_in(app, user).await;
                    if let Ok(grant) = &result {
                        let now = self.clock.now_ms();
                        let life = grant.lifetime.as_millis() as u64;
                        let shared = SharedToken {
                            token: grant.access_token.expose_secret().to_owned(),
                            expires_at_ms: now + life,
                            refresh_at_ms: now + (life as f64 * self.cfg.refresh_at) as u64,
                        };
                        let _ = self.cluster.put_token(&key, &shared, now).await;
                    }
                    self.cluster.unlock(&lock, &self.holder).await;
                    return result;
                }
                Ok(false) if self.clock.now_ms() < give_up => {
                    // Another replica is signing in: wait for its token.
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                // The lock holder is stuck, or Redis failed: sign in ourselves.
                Ok(false) | Err(_) => return self.inner.sign_in(app, user).await,
            }
        }
    }
}

impl Authenticator for SharedAuthenticator {
    fn sign_in<'a>(&'a self, app: &'a AppConfig, user: &'a str) -> SignInFuture<'a> {
        Box::pin(self.shared_sign_in(app, user))
    }

    fn invalidated(&self, token: &http::HeaderValue) {
        if let Ok(t) = token.to_str() {
            if let Ok(mut dead) = self.dead.lock() {
                if dead.len() >= DEAD_TOKENS {
                    dead.pop_front();
                }
                dead.push_back(digest(t));
            }
        }
    }
}
