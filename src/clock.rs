//! Wall-clock time as a parameter, so time-dependent logic can be tested with a fake clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: token lifetimes and signatures are in epoch time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;

    fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// When something was last used, in milliseconds on some clock, as every request of every
/// worker notes it: written at most once per [`LastUse::RESOLUTION_MS`], since a write per
/// request would move its cache line between the cores each time. Idle eviction counts in
/// minutes, so the lag is harmless.
#[derive(Debug)]
pub struct LastUse(AtomicU64);

impl LastUse {
    /// How stale the recorded time may be.
    pub const RESOLUTION_MS: u64 = 1000;

    pub fn new(now_ms: u64) -> LastUse {
        LastUse(AtomicU64::new(now_ms))
    }

    /// Records a use at `now_ms` (read only, unless the record is a resolution old).
    pub fn touch(&self, now_ms: u64) {
        if now_ms.saturating_sub(self.get()) >= Self::RESOLUTION_MS {
            self.0.store(now_ms, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct FakeClock(AtomicU64);

impl FakeClock {
    pub fn new(start_ms: u64) -> FakeClock {
        FakeClock(AtomicU64::new(start_ms))
    }

    pub fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
