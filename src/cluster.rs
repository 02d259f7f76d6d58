//! Replicas sharing one quota and one token per identity through Redis: an atomic script per
//! decision (the exact limiter's sorted sets, with slots leased ahead and given back, or GCRA),
//! a token record with expiry, a sign-in lock, and a degraded mode (local fallbacks) while
//! Redis is unreachable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::secret::{print, redact_url};

/// While Redis is down a replica tries to connect at most this often, and shared mode resumes
/// once no call has failed for this long.
const RETRY: Duration = Duration::from_secs(1);

/// `Cluster::outages`: the degraded bit, and one outage.
const DEGRADED: u64 = 1;
const OUTAGE: u64 = 2;

/// Longest `lease`: well under `RETRY`, so no lease outlives an outage and the second without
/// failures that ends it (leases are used only while shared mode is on).
pub const MAX_LEASE: Duration = Duration::from_millis(500);

/// Most slots one exact decision reserves (the request's own and the leased ones).
pub const MAX_LEASE_SLOTS: u32 = 64;

/// `[cluster]`: several replicas sharing one quota and one token per identity through Redis.
#[derive(Clone, Serialize)]
pub struct ClusterConfig {
    /// May hold a password: never printed.
    #[serde(serialize_with = "print::redacted_url")]
    pub redis_url: secrecy::SecretString,
    pub key_prefix: String,
    /// When Redis is unreachable each replica falls back to 1/max_replicas of every limit.
    pub max_replicas: std::num::NonZeroU32,
    /// Longest wait for one Redis command before falling back.
    #[serde(serialize_with = "print::duration")]
    pub timeout: Duration,
    /// How long slots reserved ahead by one exact decision may be used; zero: one decision
    /// per request.
    #[serde(serialize_with = "print::duration")]
    pub lease: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis_url", &redact_url(self.redis_url.expose_secret()))
            .field("key_prefix", &self.key_prefix)
            .field("max_replicas", &self.max_replicas)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish()
    }
}

impl PartialEq for ClusterConfig {
    fn eq(&self, other: &Self) -> bool {
        self.redis_url.expose_secret() == other.redis_url.expose_secret()
            && self.key_prefix == other.key_prefix
            && self.max_replicas == other.max_replicas
            && self.timeout == other.timeout
            && self.lease == other.lease
    }
}

/// GCRA over every limit of one bucket, in one atomic step, on Redis' clock (so replicas need
/// not agree on time). KEYS: one per limit, then the "alive" marker. ARGV: per limit its
/// emission interval and tolerance in microseconds, then `drain` (1: a missing key counts as a
/// spent burst). A missing alive marker means Redis lost its data (restarted empty, or first
/// use): missing keys then count as spent too, so no replica is granted a fresh burst.
/// Returns {1, 0} when admitted (every limit updated) or {0, wait_us} (nothing updated).
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS - 1
local drain = tonumber(ARGV[2 * n + 1]) == 1
if redis.call('EXISTS', KEYS[n + 1]) == 0 then
  drain = true
  redis.call('SET', KEYS[n + 1], '1')
end
local wait = 0
local next_tat = {}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local stored = redis.call('GET', KEYS[i])
  local tat
  if stored then
    tat = tonumber(stored)
  elseif drain then
    tat = now + tau
  else
    tat = now
  end
  if tat < now then tat = now end
  local allow_at = tat - tau
  if now < allow_at then
    if allow_at - now > wait then wait = allow_at - now end
  end
  next_tat[i] = tat + interval
end
if wait > 0 then return {0, wait} end
for i = 1, n do
  local ttl = math.floor((next_tat[i] - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', next_tat[i]), 'PX', ttl)
end
return {1, 0}
"#;

/// The exact limiter over every limit of one bucket, in one atomic step, on Redis' clock: per
/// limit a sorted set of admission times (µs), trimmed to the last span, capped at its limit,
/// expiring a second after its span and the lease. KEYS: per limit its set and its "spent"
/// marker, then the "alive" marker. ARGV: per limit its N and span (µs), then `drain` (1: a
/// limit with no admissions on record counts as spent, its window used evenly up to now, so no
/// replica gets a fresh burst after Redis lost its data or after this one was falling back),
/// then a member id unique to this decision, then `want` (slots asked for: this request's and
/// leased ones) and the lease's life (µs). A lease is granted only while every limit, with it,
/// stays at or under half its N; otherwise one slot. Leased slots are booked at now + life,
/// the latest they can be used, as members `<member>:2`..`<member>:<granted>`: each counts
/// from now until its latest use's window has passed, never less than an admission at its use
/// would. Returns {1, 0, now_us, granted} when admitted (every set updated) or
/// {0, wait_us, now_us, 0} (nothing updated).
const EXACT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = (#KEYS - 1) / 2
local drain = tonumber(ARGV[2 * n + 1]) == 1
local member = ARGV[2 * n + 2]
local grant = tonumber(ARGV[2 * n + 3])
local life = tonumber(ARGV[2 * n + 4])
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then
  drain = true
  redis.call('SET', KEYS[#KEYS], '1')
end
local wait = 0
for i = 1, n do
  local set, spent = KEYS[2 * i - 1], KEYS[2 * i]
  local limit = tonumber(ARGV[2 * i - 1])
  local span = tonumber(ARGV[2 * i])
  if drain and redis.call('EXISTS', set) == 0 and redis.call('EXISTS', spent) == 0 then
    redis.call('SET', spent, string.format('%.0f', now), 'PX', math.floor(span / 1000) + 1000)
  end
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now - span - 1)
  local real = redis.call('ZCARD', set)
  -- Virtual admissions of a spent start still in the window: the k-th leaves at
  -- from + floor(span * k / limit) + 1.
  local from = tonumber(redis.call('GET', spent) or '-1')
  local left = limit
  if from >= 0 then
    if now <= from then left = 0 else left = math.min(limit, math.ceil((now - from) * limit / span) - 1) end
  end
  local used = real + (limit - left)
  if used + grant > math.floor(limit / 2) then grant = 1 end
  local excess = used + 1 - limit
  if excess > 0 then
    -- The excess-th exit among the real (oldest first) and the virtual ones.
    local oldest = redis.call('ZRANGE', set, 0, excess - 1, 'WITHSCORES')
    local r, k, at = 1, left + 1, now
    for _ = 1, excess do
      local re = oldest[2 * r]
      local ve = nil
      if from >= 0 and k <= limit then ve = from + math.floor(span * k / limit) + 1 end
      if re and (not ve or tonumber(re) + span + 1 <= ve) then
        at = tonumber(re) + span + 1
        r = r + 1
      elseif ve then
        at = ve
        k = k + 1
      end
    end
    if at - now > wait then wait = at - now end
  end
end
if wait > 0 then return {0, wait, now, 0} end
local leased = {}
for j = 2, grant do
  leased[#leased + 1] = now + life
  leased[#leased + 1] = member .. ':' .. j
end
for i = 1, n do
  local set = KEYS[2 * i - 1]
  local limit = tonumber(ARGV[2 * i - 1])
  local span = tonumber(ARGV[2 * i])
  redis.call('ZADD', set, now, member)
  if grant > 1 then redis.call('ZADD', set, unpack(leased)) end
  local count = redis.call('ZCARD', set)
  if count > limit then
    redis.call('ZREMRANGEBYRANK', set, 0, count - limit - 1)
  end
  redis.call('PEXPIRE', set, math.floor((span + life) / 1000) + 1000)
end
return {1, 0, now, grant}
"#;

/// A shared exact decision: admitted at Redis' `at_us` with `leased` more slots reserved
/// (members `<member>:2`..), or not before `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExactVerdict {
    Admitted { at_us: u64, leased: u32 },
    Wait(Duration),
}

impl ExactVerdict {
    /// The script's reply `{ok, wait_us, now_us, granted}`: a refusal always waits at least
    /// 1 µs; an admission leases `granted - 1` slots, never more than `want - 1`.
    pub fn from_reply(ok: i64, wait_us: i64, now_us: i64, granted: i64, want: u32) -> ExactVerdict {
        if ok == 1 {
            let granted = u32::try_from(granted).unwrap_or(1).clamp(1, want.max(1));
            ExactVerdict::Admitted {
                at_us: u64::try_from(now_us).unwrap_or(0),
                leased: granted - 1,
            }
        } else {
            ExactVerdict::Wait(Duration::from_micros(
                u64::try_from(wait_us).unwrap_or(0).max(1),
            ))
        }
    }
}

/// The GCRA script's reply `{ok, wait_us}`: `None` when admitted, else the wait (at least 1 µs).
pub fn gcra_verdict(ok: i64, wait_us: i64) -> Option<Duration> {
    (ok != 1).then(|| Duration::from_micros(u64::try_from(wait_us).unwrap_or(0).max(1)))
}

/// Deletes a key only if it still holds the given value.
const DELETE_IF: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// A token as shared between replicas (the only secret meetgate puts in Redis).
#[derive(Serialize, Deserialize)]
pub struct SharedToken {
    #[serde(rename = "t")]
    pub token: String,
    /// Epoch ms after which it must not be used.
    #[serde(rename = "e")]
    pub expires_at_ms: u64,
    /// Epoch ms after which one replica should refresh it.
    #[serde(rename = "r")]
    pub refresh_at_ms: u64,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("redis timed out")]
    Timeout,
}

/// One thread's connection and its number: a timed-out one is forgotten only if still
/// current. The async lock makes the requests that find it empty wait for one connection
/// instead of each making its own.
type Lane = tokio::sync::Mutex<Option<(u64, ConnectionManager)>>;

/// The connections and the shared/degraded state of this replica.
pub struct Cluster {
    cfg: ClusterConfig,
    client: Option<redis::Client>,
    /// A connection per calling thread. A connection's driver task runs on the runtime that
    /// made it; each request worker is a single-threaded runtime, so with one connection per
    /// replica a call from any other worker crossed threads twice (the command to the driver,
    /// the reply back), each a futex wake-up costing more than Redis's own round trip on a
    /// loaded machine. Per thread, the reply wakes the request on the worker that reads it.
    /// The threads are the workers and the main runtime's: `workers + 1` per replica. Keyed by
    /// std's `ThreadId`, which is never reused: a per-object thread-local that recycles the
    /// slots of exited threads could hand a new thread a connection whose runtime is gone.
    lanes: Mutex<HashMap<ThreadId, Arc<Lane>>>,
    connections: AtomicU64,
    /// Set by a failed connection attempt: no lane tries again before then, and the one that
    /// does moves it a second on first, so a down Redis sees one attempt a second per replica.
    /// A success clears it: the other lanes' first connections are not held back.
    retry_after: Mutex<Option<Instant>>,
    /// When a call last failed: shared mode resumes only after a second without one, so lanes
    /// still reconnecting after Redis returns do not flip the replica in and out of it.
    failed_at: Mutex<Option<Instant>>,
    /// Degraded (on local fallbacks) in the low bit, the number of outages so far above it:
    /// one word, so a call that finds the replica degraded also finds the outage that made it
    /// so (a bucket's fallback share is built anew for each, see `outage`).
    outages: AtomicU64,
    last_error: Mutex<String>,
    /// When shared mode last resumed after a fallback period.
    resumed_at: Mutex<Option<Instant>>,
    pub fallbacks: AtomicU64,
    /// Admissions on leased slots: requests decided without a Redis round trip of their own.
    pub leased: AtomicU64,
    gcra: redis::Script,
    exact: redis::Script,
    delete_if: redis::Script,
    /// Makes each exact decision's member unique: this replica's id and a counter.
    replica: String,
    decisions: AtomicU64,
}

impl Cluster {
    pub fn new(cfg: ClusterConfig) -> Arc<Cluster> {
        let client = redis::Client::open(cfg.redis_url.expose_secret()).ok();
        Arc::new(Cluster {
            cfg,
            client,
            lanes: Mutex::new(HashMap::new()),
            connections: AtomicU64::new(0),
            retry_after: Mutex::new(None),
            failed_at: Mutex::new(None),
            outages: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            resumed_at: Mutex::new(None),
            fallbacks: AtomicU64::new(0),
            leased: AtomicU64::new(0),
            gcra: redis::Script::new(GCRA),
            exact: redis::Script::new(EXACT),
            delete_if: redis::Script::new(DELETE_IF),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            decisions: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.cfg.key_prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    /// Whether this replica is running on its local fallbacks, and why.
    pub fn degraded(&self) -> Option<String> {
        self.is_degraded().then(|| {
            self.last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default()
        })
    }

    /// Falling back now, or shared mode resumed within the last `window`: missing keys count
    /// as a spent window, and a replica still holds itself to its fallback share. (The call
    /// that finds Redis back is made while still degraded.)
    pub fn recently_resumed(&self, window: Duration) -> bool {
        self.is_degraded()
            || self
                .resumed_at
                .lock()
                .ok()
                .and_then(|r| *r)
                .is_some_and(|t| t.elapsed() < window)
    }

    fn failed(&self, e: &ClusterError) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = e.to_string();
        }
        let entered = {
            // Under the lock `succeeded` decides under: a failure is never lost to a resume
            // deciding at the same time.
            let mut failed_at = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
            *failed_at = Some(Instant::now());
            // Degraded and counted in one step: no call sees the flag without the new count.
            self.outages
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    (w & DEGRADED == 0).then_some((w + OUTAGE) | DEGRADED)
                })
                .is_ok()
        };
        if entered {
            tracing::warn!(error = %e, max_replicas = self.cfg.max_replicas.get(),
                "Redis unavailable: falling back to local limits at 1/max_replicas and a local token cache");
        }
    }

    fn succeeded(&self) {
        if !self.is_degraded() {
            return;
        }
        let failed_at = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        if !failed_at.is_none_or(|t| t.elapsed() >= RETRY) {
            return;
        }
        // The resume time is set before the flag clears as seen by `recently_resumed`, which
        // reads the flag and then waits for this lock: no call finds the replica neither
        // degraded nor resuming.
        let mut resumed_at = self.resumed_at.lock().unwrap_or_else(|p| p.into_inner());
        if self.outages.fetch_and(!DEGRADED, Ordering::Relaxed) & DEGRADED != 0 {
            *resumed_at = Some(Instant::now());
            drop((resumed_at, failed_at));
            tracing::info!("Redis reachable again: shared limits and tokens resumed");
        }
    }

    /// This thread's lane.
    fn lane(&self) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes
            .entry(std::thread::current().id())
            .or_default()
            .clone()
    }

    /// This thread's connection, made on first use; while Redis is down, one attempt a second
    /// per replica (after the first failure: until then, each lane's first call tries).
    async fn connection(&self, lane: &Lane) -> Result<(u64, ConnectionManager), ClusterError> {
        let mut guard = lane.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let client = self
            .client
            .clone()
            .ok_or_else(|| ClusterError::Unavailable("invalid redis_url".into()))?;
        {
            let mut retry_after = self.retry_after.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match *retry_after {
                Some(at) if now < at => {
                    return Err(ClusterError::Unavailable(
                        "not connected (retrying every second)".into(),
                    ))
                }
                // This second's attempt is this lane's.
                Some(_) => *retry_after = Some(now + RETRY),
                None => {}
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.cfg.timeout))
            .set_response_timeout(Some(self.cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let made = tokio::time::timeout(
            self.cfg.timeout * 2,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| ClusterError::Timeout)
        .and_then(|r| r.map_err(|e| ClusterError::Unavailable(format!("{:?}", e.kind()))));
        *self.retry_after.lock().unwrap_or_else(|p| p.into_inner()) =
            made.is_err().then(|| Instant::now() + RETRY);
        let manager = made?;
        let id = self.connections.fetch_add(1, Ordering::Relaxed);
        *guard = Some((id, manager.clone()));
        Ok((id, manager))
    }

    /// Gives up connection `id` after a command on it timed out. A partition drops packets
    /// without resetting the connection, and TCP's retransmissions back off to many seconds, so
    /// after the link heals the old connection may stay silent long after a new one would
    /// answer: the next command connects afresh (see above for how often).
    async fn forget(lane: &Lane, id: u64) {
        let mut guard = lane.lock().await;
        if guard.as_ref().is_some_and(|(current, _)| *current == id) {
            *guard = None;
        }
    }

    /// Runs one Redis operation under the timeout, tracking degraded mode.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, ClusterError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = async {
            let lane = self.lane();
            let (id, conn) = self.connection(&lane).await?;
            match tokio::time::timeout(self.cfg.timeout, op(conn)).await {
                Err(_) => {
                    Self::forget(&lane, id).await;
                    Err(ClusterError::Timeout)
                }
                Ok(Err(e)) => {
                    // A dropped connection the manager reconnects on its own.
                    if e.is_timeout() {
                        Self::forget(&lane, id).await;
                    }
                    Err(ClusterError::Unavailable(format!("{:?}", e.kind())))
                }
                Ok(Ok(v)) => Ok(v),
            }
        }
        .await;
        match &result {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        result
    }

    /// One shared GCRA decision over a bucket's limits: `None` when admitted, else the wait.
    /// `limits` are (key, emission interval, tolerance).
    pub async fn gcra(
        &self,
        limits: &[(String, Duration, Duration)],
        longest_window: Duration,
    ) -> Result<Option<Duration>, ClusterError> {
        let drain = self.recently_resumed(longest_window);
        let alive = self.key(&["alive"]);
        let script = &self.gcra;
        let (ok, wait_us): (i64, i64) = self
            .run(|mut conn| async move {
                let mut inv = script.prepare_invoke();
                for (k, _, _) in limits {
                    inv.key(k);
                }
                inv.key(&alive);
                for (_, interval, tau) in limits {
                    inv.arg(interval.as_micros() as u64)
                        .arg(tau.as_micros() as u64);
                }
                inv.arg(u8::from(drain));
                inv.invoke_async(&mut conn).await
            })
            .await?;
        Ok(gcra_verdict(ok, wait_us))
    }

    /// A member id for one exact decision, unique across replicas.
    pub fn member(&self) -> String {
        format!(
            "{}:{}",
            self.replica,
            self.decisions.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// One shared exact decision over a bucket's limits: `limits` are (key, N, span). `want`
    /// slots are asked for (this request's, and up to `MAX_LEASE_SLOTS - 1` leased for
    /// `[cluster] lease`), booked as `member`.
    pub async fn exact(
        &self,
        limits: &[(String, u32, Duration)],
        longest_window: Duration,
        member: &str,
        want: u32,
    ) -> Result<ExactVerdict, ClusterError> {
        let drain = self.recently_resumed(longest_window);
        let alive = self.key(&["alive"]);
        let want = want.clamp(1, MAX_LEASE_SLOTS);
        let life = self.cfg.lease.as_micros() as u64;
        let script = &self.exact;
        let (ok, wait_us, now_us, granted): (i64, i64, i64, i64) = self
            .run(|mut conn| async move {
                let mut inv = script.prepare_invoke();
                for (k, _, _) in limits {
                    inv.key(k).key(format!("{k}:spent"));
                }
                inv.key(&alive);
                for (_, n, span) in limits {
                    inv.arg(*n).arg(span.as_micros() as u64);
                }
                inv.arg(u8::from(drain)).arg(member).arg(want).arg(life);
                inv.invoke_async(&mut conn).await
            })
            .await?;
        Ok(ExactVerdict::from_reply(ok, wait_us, now_us, granted, want))
    }

    /// Gives back leased slots `<member>:<from>`..=`<member>:<to>` that were not used, in every
    /// limit's set, so the quota they held is free again before its window passes.
    pub async fn release(
        &self,
        keys: &[String],
        member: &str,
        from: u32,
        to: u32,
    ) -> Result<(), ClusterError> {
        if from > to {
            return Ok(());
        }
        let members: Vec<String> = (from..=to).map(|j| format!("{member}:{j}")).collect();
        self.run(|mut conn| async move {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.zrem(k, &members).ignore();
            }
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    /// For tests: a cluster whose Redis client cannot be made (every call fails at once), of
    /// 3 replicas at most, with `lease`.
    #[cfg(test)]
    pub(crate) fn unreachable(lease: Duration) -> Arc<Cluster> {
        Cluster::new(ClusterConfig {
            redis_url: secrecy::SecretString::from("not a url"),
            key_prefix: "t:".to_owned(),
            max_replicas: std::num::NonZeroU32::new(3).expect("3"),
            timeout: Duration::from_millis(100),
            lease,
        })
    }

    /// Whether this replica is on its local fallbacks now (no leased slot is used then).
    pub fn is_degraded(&self) -> bool {
        self.outages.load(Ordering::Relaxed) & DEGRADED != 0
    }

    /// Which outage this replica is in, or was last in: a fallback share built in an earlier
    /// one is not this one's (it never waited for what shared mode admitted in between).
    pub fn outage(&self) -> u64 {
        self.outages.load(Ordering::Relaxed) >> 1
    }

    pub async fn get_token(&self, key: &str) -> Result<Option<SharedToken>, ClusterError> {
        let raw: Option<String> = self
            .run(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    pub async fn put_token(
        &self,
        key: &str,
        token: &SharedToken,
        now_ms: u64,
    ) -> Result<(), ClusterError> {
        let ttl = token.expires_at_ms.saturating_sub(now_ms).max(1);
        let value =
            serde_json::to_string(token).map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        self.run(|mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Deletes the shared token at `key` if it is still `token` (a 401 invalidation).
    pub async fn delete_token_if(
        &self,
        key: &str,
        token: &SharedToken,
    ) -> Result<(), ClusterError> {
        let value =
            serde_json::to_string(token).map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        let script = &self.delete_if;
        self.run(|mut conn| async move {
            script
                .key(key)
                .arg(value)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Takes the lock at `key` for `ttl` (it expires on its own if the holder dies).
    pub async fn try_lock(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, ClusterError> {
        let set: Option<String> = self
            .run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    pub async fn unlock(&self, key: &str, holder: &str) {
        let script = &self.delete_if;
        let _ = self
            .run(|mut conn| async move {
                script
                    .key(key)
                    .arg(holder)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outage is counted once however many calls fail in it; after a resume the next
    /// failure is a new one; a resume is seen as one (not a moment of neither state).
    #[test]
    fn outages_are_counted_across_a_resume() {
        let c = Cluster::unreachable(Duration::ZERO);
        let window = Duration::from_secs(60);
        assert_eq!((c.is_degraded(), c.outage()), (false, 0));
        assert!(!c.recently_resumed(window));
        c.failed(&ClusterError::Timeout);
        c.failed(&ClusterError::Timeout);
        assert_eq!((c.is_degraded(), c.outage()), (true, 1));
        // A success within a second of the last failure does not resume.
        c.succeeded();
        assert!(c.is_degraded());
        *c.failed_at.lock().expect("lock") = Instant::now().checked_sub(RETRY);
        c.succeeded();
        assert_eq!((c.is_degraded(), c.outage()), (false, 1));
        assert!(c.recently_resumed(window), "resuming for a window");
        c.failed(&ClusterError::Timeout);
        assert_eq!((c.is_degraded(), c.outage()), (true, 2), "a second outage");
    }

    /// A failing decision counts the outage once, with the degraded flag.
    #[tokio::test]
    async fn an_outage_is_counted_once_when_it_begins() {
        let cluster = Cluster::unreachable(Duration::ZERO);
        assert!(!cluster.is_degraded());
        assert_eq!(cluster.outage(), 0);
        let limits = [("t:k".to_owned(), 10, Duration::from_secs(60))];
        for _ in 0..3 {
            cluster
                .exact(&limits, Duration::from_secs(60), "m", 1)
                .await
                .expect_err("no Redis");
            assert!(cluster.is_degraded());
            assert_eq!(
                cluster.outage(),
                1,
                "one outage, however many calls fail in it"
            );
        }
    }
}
