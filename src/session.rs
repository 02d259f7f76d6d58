//! Session tokens meetgate issues to SDK clients that sign in to it: opaque, bound to
//! (client, app, user), stored only as their SHA-256, bounded in number, expiring.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// One signed-in SDK session.
pub struct Session {
    pub client: Arc<str>,
    pub app: Arc<str>,
    pub user: Arc<str>,
    pub created_ms: u64,
    pub expires_at_ms: u64,
    refresh_hash: [u8; 32],
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("client", &self.client)
            .field("app", &self.app)
            .field("user", &self.user)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// A freshly issued session: the only time the tokens exist in clear.
pub struct Issued {
    pub access_token: String,
    pub refresh_token: String,
    pub session: Arc<Session>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// 48 random alphanumeric characters.
fn random_token() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 48)
}

#[derive(Default)]
struct Maps {
    by_access: HashMap<[u8; 32], Arc<Session>>,
    by_refresh: HashMap<[u8; 32], [u8; 32]>,
    /// Client and app names, one copy each shared by all their sessions (a handful of names
    /// from the config, against up to `max` sessions: a copy per session was 64 B of each).
    names: std::collections::HashSet<Arc<str>>,
}

impl Maps {
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }
}

/// All live sessions.
pub struct SessionStore {
    maps: Mutex<Maps>,
    max: usize,
}

impl SessionStore {
    pub fn new(max: usize) -> SessionStore {
        SessionStore {
            maps: Mutex::new(Maps::default()),
            max: max.max(1),
        }
    }

    /// Issues a session for (client, app, user) valid for `lifetime_ms`.
    pub fn issue(
        &self,
        client: &str,
        app: &str,
        user: &str,
        now_ms: u64,
        lifetime_ms: u64,
    ) -> Issued {
        let access_token = random_token();
        let refresh_token = random_token();
        let refresh_hash = digest(&refresh_token);
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let session = Arc::new(Session {
            client: maps.name(client),
            app: maps.name(app),
            user: Arc::from(user),
            created_ms: now_ms,
            expires_at_ms: now_ms + lifetime_ms,
            refresh_hash,
        });
        if maps.by_access.len() >= self.max {
            Self::purge(&mut maps, now_ms);
        }
        // Still full of live sessions: the one closest to expiry makes room.
        while maps.by_access.len() >= self.max {
            let Some(oldest) = maps
                .by_access
                .iter()
                .min_by_key(|(_, s)| s.expires_at_ms)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(s) = maps.by_access.remove(&oldest) {
                maps.by_refresh.remove(&s.refresh_hash);
            }
        }
        let key = digest(&access_token);
        maps.by_refresh.insert(session.refresh_hash, key);
        maps.by_access.insert(key, session.clone());
        Issued {
            access_token,
            refresh_token,
            session,
        }
    }

    fn purge(maps: &mut Maps, now_ms: u64) {
        let expired: Vec<[u8; 32]> = maps
            .by_access
            .iter()
            .filter(|(_, s)| s.expires_at_ms <= now_ms)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some(s) = maps.by_access.remove(&k) {
                maps.by_refresh.remove(&s.refresh_hash);
            }
        }
    }

    /// The live session an access token names.
    pub fn find(&self, access_token: &str, now_ms: u64) -> Option<Arc<Session>> {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.by_access
            .get(&digest(access_token))
            .filter(|s| s.expires_at_ms > now_ms)
            .cloned()
    }

    /// The live session an access or refresh token names.
    pub fn find_any(&self, token: &str, now_ms: u64) -> Option<Arc<Session>> {
        let d = digest(token);
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let key = maps.by_refresh.get(&d).copied().unwrap_or(d);
        maps.by_access
            .get(&key)
            .filter(|s| s.expires_at_ms > now_ms)
            .cloned()
    }

    /// Ends the session an access or refresh token names. Returns whether one existed.
    pub fn revoke(&self, token: &str) -> bool {
        let d = digest(token);
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let key = maps.by_refresh.get(&d).copied().unwrap_or(d);
        match maps.by_access.remove(&key) {
            Some(s) => {
                maps.by_refresh.remove(&s.refresh_hash);
                true
            }
            None => false,
        }
    }

    /// Ends every session of the clients `keep` rejects (removed, or credentials changed).
    pub fn retain_clients(&self, keep: impl Fn(&str) -> bool) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<[u8; 32]> = maps
            .by_access
            .iter()
            .filter(|(_, s)| !keep(&s.client))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some(s) = maps.by_access.remove(&k) {
                maps.by_refresh.remove(&s.refresh_hash);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.maps.lock().map_or(0, |m| m.by_access.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_find_refresh_revoke_and_bound() {
        let store = SessionStore::new(2);
        let a = store.issue("c", "app", "u1", 1_000, 10_000);
        assert_eq!(a.access_token.len(), 48);
        assert_eq!(
            store
                .find(&a.access_token, 2_000)
                .map(|s| s.user.to_string()),
            Some("u1".into())
        );
        assert!(store.find(&a.access_token, 11_000).is_none(), "expired");
        assert!(
            store.find(&a.refresh_token, 2_000).is_none(),
            "a refresh token is no access token"
        );
        assert!(store.find_any(&a.refresh_token, 2_000).is_some());
        let _b = store.issue("c", "app", "u2", 1_000, 20_000);
        let c = store.issue("c", "app", "u3", 1_000, 30_000);
        assert_eq!(store.len(), 2, "bounded");
        assert!(
            store.find(&a.access_token, 2_000).is_none(),
            "the first to expire made room"
        );
        assert!(store.revoke(&c.refresh_token));
        assert!(store.find(&c.access_token, 2_000).is_none());
        store.retain_clients(|name| name != "c");
        assert!(store.is_empty());
        assert!(!format!("{:?}", a.session).contains(&a.access_token));
    }
}
