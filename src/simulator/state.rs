//! The simulator's mutable state: tokens, nonces, meetings, faults and the logs tests read.
//!
//! Every collection here has a cap or is swept, so a long-running simulator stays bounded.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::limits::Limiter;
use super::meetings::Meetings;
use super::{Fault, RecordedRequest, SimLimits};

/// Cap for each log and store (request log, admission log per route, tokens, nonces per app, ...).
pub(crate) const CAP: usize = 100_000;

/// Which identity a token acts for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    pub(crate) app: String,
    /// `""` for single-enterprise apps and for the SP admin.
    pub(crate) corp: String,
    pub(crate) user: String,
}

#[derive(Clone)]
pub(crate) struct TokenRecord {
    pub(crate) access: String,
    pub(crate) refresh: String,
    pub(crate) key: TokenKey,
    pub(crate) client_type: i64,
    pub(crate) token_ip: String,
    pub(crate) created_ms: u64,
    pub(crate) expires_at: Instant,
    /// Rounded up to whole seconds: what `validPeriod` announced.
    pub(crate) valid_secs: u64,
    pub(crate) refresh_secs: u64,
}

struct RefreshRecord {
    key: TokenKey,
    client_type: i64,
    token_ip: String,
    expires_at: Instant,
}

/// What a token is issued for.
pub(crate) struct IssueRequest {
    pub(crate) key: TokenKey,
    pub(crate) client_type: i64,
    pub(crate) token_ip: String,
    pub(crate) lifetime: Duration,
    pub(crate) refresh_lifetime: Duration,
    pub(crate) max_per_user: usize,
}

#[derive(Default)]
pub(crate) struct TokenStore {
    access: HashMap<String, TokenRecord>,
    refresh: HashMap<String, RefreshRecord>,
    refresh_order: VecDeque<String>,
    per_user: HashMap<TokenKey, VecDeque<String>>,
    /// Issue order; doubles as the list `issued_tokens()` returns.
    issued: VecDeque<String>,
    sweep_at: usize,
}

impl TokenStore {
    pub(crate) fn issue(&mut self, req: IssueRequest, now: Instant) -> TokenRecord {
        self.sweep(now);
        // clientType 72 keeps up to max_per_user tokens per user; any other keeps one.
        let cap = if req.client_type == 72 {
            req.max_per_user.max(1)
        } else {
            1
        };
        let list = self.per_user.entry(req.key.clone()).or_default();
        list.retain(|t| self.access.contains_key(t));
        while list.len() >= cap {
            if let Some(old) = list.pop_front() {
                self.access.remove(&old);
            }
        }
        while self.access.len() >= CAP {
            match self.issued.pop_front() {
                Some(old) => {
                    self.access.remove(&old);
                }
                None => break,
            }
        }

        let access = random_token(48);
        let refresh = random_token(48);
        let record = TokenRecord {
            access: access.clone(),
            refresh: refresh.clone(),
            key: req.key.clone(),
            client_type: req.client_type,
            token_ip: req.token_ip.clone(),
            created_ms: epoch_ms(),
            expires_at: now + req.lifetime,
            valid_secs: ceil_secs(req.lifetime),
            refresh_secs: ceil_secs(req.refresh_lifetime),
        };
        if let Some(list) = self.per_user.get_mut(&req.key) {
            list.push_back(access.clone());
        }
        self.access.insert(access.clone(), record.clone());
        self.issued.push_back(access);
        if self.issued.len() > CAP {
            self.issued.pop_front();
        }
        self.refresh.insert(
            refresh.clone(),
            RefreshRecord {
                key: req.key,
                client_type: req.client_type,
                token_ip: req.token_ip,
                expires_at: now + req.refresh_lifetime,
            },
        );
        self.refresh_order.push_back(refresh);
        while self.refresh_order.len() > CAP {
            if let Some(old) = self.refresh_order.pop_front() {
                self.refresh.remove(&old);
            }
        }
        record
    }

    /// A live access token.
    pub(crate) fn get(&mut self, token: &str, now: Instant) -> Option<&TokenRecord> {
        if self.access.get(token).is_some_and(|r| r.expires_at <= now) {
            self.access.remove(token);
        }
        self.access.get(token)
    }

    /// The identity behind a live refresh token: (key, clientType, tokenIp).
    pub(crate) fn refresh_identity(
        &mut self,
        token: &str,
        now: Instant,
    ) -> Option<(TokenKey, i64, String)> {
        if self.refresh.get(token).is_some_and(|r| r.expires_at <= now) {
            self.refresh.remove(token);
        }
        self.refresh
            .get(token)
            .map(|r| (r.key.clone(), r.client_type, r.token_ip.clone()))
    }

    pub(crate) fn revoke(&mut self, token: &str) -> bool {
        self.access.remove(token).is_some()
    }

    pub(crate) fn revoke_all(&mut self) {
        self.access.clear();
        self.refresh.clear();
        self.refresh_order.clear();
        self.per_user.clear();
    }

    pub(crate) fn issued(&self) -> Vec<String> {
        self.issued.iter().cloned().collect()
    }

    // Amortised: a full sweep only when the store has doubled since the last one.
    fn sweep(&mut self, now: Instant) {
        if self.access.len() + self.refresh.len() < self.sweep_at {
            return;
        }
        self.access.retain(|_, r| r.expires_at > now);
        self.refresh.retain(|_, r| r.expires_at > now);
        let refresh = &self.refresh;
        self.refresh_order.retain(|t| refresh.contains_key(t));
        let access = &self.access;
        self.per_user.retain(|_, list| {
            list.retain(|t| access.contains_key(t));
            !list.is_empty()
        });
        self.sweep_at = (2 * (self.access.len() + self.refresh.len())).max(1024);
    }
}

/// Nonces already used with a valid signature, per app.
#[derive(Default)]
pub(crate) struct NonceMemory {
    /// nonce -> signature expiry (epoch s; 0 = never).
    seen: HashMap<String, u64>,
    order: VecDeque<String>,
    sweep_at: usize,
}

impl NonceMemory {
    /// Records the nonce; false when it was seen before (a replay).
    pub(crate) fn insert(&mut self, nonce: &str, expire_time: u64, now_epoch: u64) -> bool {
        if self.seen.contains_key(nonce) {
            return false;
        }
        if self.seen.len() >= self.sweep_at {
            // A nonce whose signature has expired cannot be replayed: the expiry check refuses it.
            self.seen.retain(|_, exp| *exp == 0 || *exp >= now_epoch);
            let seen = &self.seen;
            self.order.retain(|n| seen.contains_key(n));
            self.sweep_at = (2 * self.seen.len()).max(1024);
        }
        while self.seen.len() >= CAP {
            match self.order.pop_front() {
                Some(old) => {
                    self.seen.remove(&old);
                }
                None => break,
            }
        }
        self.seen.insert(nonce.to_owned(), expire_time);
        self.order.push_back(nonce.to_owned());
        true
    }
}

/// A queued fault and how many more requests it applies to.
pub(crate) struct QueuedFault {
    pub(crate) fault: Fault,
    remaining: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultStage {
    SignIn,
    /// Before throttling: APIG itself answers.
    BeforeLimits,
    /// After admission: the backend misbehaves.
    AfterAdmission,
}

impl Fault {
    fn count(&self) -> usize {
        match self {
            Fault::BusinessStatus { count, .. }
            | Fault::Throttle { count, .. }
            | Fault::RefuseStream { count }
            | Fault::SignInStatus { count, .. }
            | Fault::SignInBody { count, .. }
            | Fault::Delay { count, .. }
            | Fault::SlowBody { count, .. }
            | Fault::ResetMidBody { count }
            | Fault::ResetBeforeResponse { count } => *count,
        }
    }

    fn stage(&self) -> FaultStage {
        match self {
            Fault::SignInStatus { .. } | Fault::SignInBody { .. } => FaultStage::SignIn,
            Fault::Throttle { .. } | Fault::RefuseStream { .. } => FaultStage::BeforeLimits,
            Fault::BusinessStatus { .. }
            | Fault::Delay { .. }
            | Fault::SlowBody { .. }
            | Fault::ResetMidBody { .. }
            | Fault::ResetBeforeResponse { .. } => FaultStage::AfterAdmission,
        }
    }
}

/// Arrival-ordered request log with stable sequence numbers so a status can be filled in later.
#[derive(Default)]
pub(crate) struct RequestLog {
    entries: VecDeque<RecordedRequest>,
    first_seq: u64,
}

impl RequestLog {
    pub(crate) fn push(&mut self, r: RecordedRequest) -> u64 {
        if self.entries.len() >= CAP {
            self.entries.pop_front();
            self.first_seq += 1;
        }
        self.entries.push_back(r);
        self.first_seq + self.entries.len() as u64 - 1
    }

    pub(crate) fn set_status(&mut self, seq: u64, status: u16) {
        let Some(idx) = seq.checked_sub(self.first_seq) else {
            return;
        };
        if let Some(e) = usize::try_from(idx)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
        {
            e.status = status;
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<RecordedRequest> {
        self.entries.iter().cloned().collect()
    }

    pub(crate) fn clear(&mut self) {
        self.first_seq += self.entries.len() as u64;
        self.entries.clear();
    }
}

pub(crate) struct State {
    pub(crate) token_lifetime: Duration,
    pub(crate) limits: SimLimits,
    pub(crate) limiter: Limiter,
    pub(crate) tokens: TokenStore,
    pub(crate) nonces: HashMap<String, NonceMemory>,
    pub(crate) meetings: Meetings,
    pub(crate) conf_token_lifetime: Duration,
    pub(crate) requests: RequestLog,
    faults: VecDeque<QueuedFault>,
    /// Admission timestamps per operation, for `max_in_any_window`.
    pub(crate) admissions: HashMap<String, VecDeque<Instant>>,
    processed: HashMap<String, usize>,
    processed_order: VecDeque<String>,
    pub(crate) sign_ins: usize,
    pub(crate) rejected_429: usize,
}

impl State {
    pub(crate) fn new(config: &super::SimConfig, start: Instant) -> Self {
        Self {
            token_lifetime: config.token_lifetime,
            limits: config.limits.clone(),
            limiter: Limiter::new(start),
            tokens: TokenStore::default(),
            nonces: HashMap::new(),
            meetings: Meetings::new(&config.meetings),
            conf_token_lifetime: config.conf_token_lifetime,
            requests: RequestLog::default(),
            faults: VecDeque::new(),
            admissions: HashMap::new(),
            processed: HashMap::new(),
            processed_order: VecDeque::new(),
            sign_ins: 0,
            rejected_429: 0,
        }
    }

    pub(crate) fn push_fault(&mut self, fault: Fault) {
        let remaining = fault.count();
        if remaining > 0 {
            self.faults.push_back(QueuedFault { fault, remaining });
        }
    }

    pub(crate) fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Takes one use of the first queued fault for this stage.
    pub(crate) fn take_fault(&mut self, stage: FaultStage) -> Option<Fault> {
        let idx = self.faults.iter().position(|q| q.fault.stage() == stage)?;
        let q = self.faults.get_mut(idx)?;
        q.remaining -= 1;
        let fault = q.fault.clone();
        if q.remaining == 0 {
            self.faults.remove(idx);
        }
        Some(fault)
    }

    pub(crate) fn admit(&mut self, op: &str, now: Instant) {
        let log = self.admissions.entry(op.to_owned()).or_default();
        if log.len() >= CAP {
            log.pop_front();
        }
        log.push_back(now);
    }

    pub(crate) fn count_processed(&mut self, request_id: &str) {
        if let Some(n) = self.processed.get_mut(request_id) {
            *n += 1;
            return;
        }
        if self.processed_order.len() >= CAP {
            if let Some(old) = self.processed_order.pop_front() {
                self.processed.remove(&old);
            }
        }
        self.processed.insert(request_id.to_owned(), 1);
        self.processed_order.push_back(request_id.to_owned());
    }

    pub(crate) fn processed(&self) -> HashMap<String, usize> {
        self.processed.clone()
    }
}

/// Random alphanumeric token, like the real service's opaque tokens.
pub(crate) fn random_token(len: usize) -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

pub(crate) fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `validPeriod` is whole seconds; a sub-second lifetime still announces 1 so that clients do not
/// read it as "no lifetime".
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn unique(tokens: &[String]) -> bool {
        tokens.iter().collect::<HashSet<_>>().len() == tokens.len()
    }

    fn req(user: &str, client_type: i64, max: usize) -> IssueRequest {
        IssueRequest {
            key: TokenKey {
                app: "a".into(),
                corp: String::new(),
                user: user.into(),
            },
            client_type,
            token_ip: "127.0.0.1".into(),
            lifetime: Duration::from_secs(60),
            refresh_lifetime: Duration::from_secs(600),
            max_per_user: max,
        }
    }

    #[test]
    fn eviction_per_user_and_client_type() {
        let now = Instant::now();
        let mut s = TokenStore::default();
        let t: Vec<_> = (0..4)
            .map(|_| s.issue(req("u", 72, 3), now).access)
            .collect();
        assert!(unique(&t));
        assert!(s.get(&t[0], now).is_none(), "the 4th evicts the oldest");
        assert!(t[1..].iter().all(|x| s.get(x, now).is_some()));
        let other = s.issue(req("v", 72, 3), now).access;
        assert!(s.get(&t[1], now).is_some(), "other users are separate");
        let single = s.issue(req("v", 1, 3), now).access;
        assert!(s.get(&other, now).is_none(), "non-72 keeps one token");
        assert!(s.get(&single, now).is_some());
    }

    #[test]
    fn expiry_refresh_and_revocation() {
        let now = Instant::now();
        let mut s = TokenStore::default();
        let r = s.issue(req("u", 72, 64), now);
        assert!(s.get(&r.access, now + Duration::from_secs(59)).is_some());
        assert!(s.get(&r.access, now + Duration::from_secs(60)).is_none());
        assert!(s
            .refresh_identity(&r.refresh, now + Duration::from_secs(60))
            .is_some());
        assert!(s
            .refresh_identity(&r.refresh, now + Duration::from_secs(600))
            .is_none());
        let r2 = s.issue(req("u", 72, 64), now);
        assert!(s.revoke(&r2.access));
        assert!(!s.revoke(&r2.access));
        assert!(s.get(&r2.access, now).is_none());
        assert_eq!(s.issued().len(), 2);
    }

    #[test]
    fn nonce_replay_and_expiry_sweep() {
        let mut m = NonceMemory::default();
        assert!(m.insert("n1", 100, 50));
        assert!(!m.insert("n1", 100, 50));
        assert!(m.insert("n2", 0, 50));
    }

    #[test]
    fn faults_apply_count_times_per_stage() {
        let mut st = State::new(&super::super::SimConfig::default(), Instant::now());
        st.push_fault(Fault::Delay {
            delay: Duration::ZERO,
            count: 1,
        });
        st.push_fault(Fault::Throttle {
            count: 2,
            retry_after: None,
        });
        assert!(st.take_fault(FaultStage::SignIn).is_none());
        assert!(matches!(
            st.take_fault(FaultStage::BeforeLimits),
            Some(Fault::Throttle { .. })
        ));
        assert!(st.take_fault(FaultStage::BeforeLimits).is_some());
        assert!(st.take_fault(FaultStage::BeforeLimits).is_none());
        assert!(matches!(
            st.take_fault(FaultStage::AfterAdmission),
            Some(Fault::Delay { .. })
        ));
        assert!(st.take_fault(FaultStage::AfterAdmission).is_none());
    }

    #[test]
    fn request_log_keeps_sequence_after_clear() {
        let mut log = RequestLog::default();
        let rec = || RecordedRequest {
            method: "GET".into(),
            path_and_query: "/".into(),
            headers: vec![],
            body: bytes::Bytes::new(),
            status: 0,
            at: Instant::now(),
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
            version: http::Version::HTTP_11,
        };
        let a = log.push(rec());
        log.clear();
        let b = log.push(rec());
        log.set_status(a, 500);
        log.set_status(b, 200);
        let snap = log.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].status, 200);
    }
}
