//! The pacing queue: a request waits in arrival order for a slot in its bucket, up to its
//! deadline, or is refused at once when its slot is surely further away.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::bucket::{Admission, BucketKey, Refused, WaitGuard};
use super::{QuotaManager, QuotaMode};

impl QuotaManager {
    /// Waits for a slot in every limit of `key`'s bucket, in arrival order, until `deadline`.
    /// In `reject` mode, or when the slot is further away than the deadline, refuses at once.
    pub async fn acquire(&self, key: &BucketKey, deadline: Instant) -> Result<Admission, Refused> {
        let bucket = self.bucket(key);
        let start = Instant::now();
        bucket.touch(start);
        // Nobody queued and a slot free now: admitted without the gate. The limiter's own
        // lock keeps the count exact; skipping the async gate means requests on different
        // workers never wake each other through it (a cross-thread wake-up per contended
        // request otherwise). Shared mode decides on Redis, asynchronously, so it queues.
        // (A free slot means no wait to estimate: with nobody ahead the estimate is zero.)
        // Only reads of the shared counters here: every write to a line that all workers
        // touch moves it between cores.
        if bucket.waiting.load(Ordering::Relaxed) == 0
            && self.cluster.is_none()
            && !self.shutting_down.load(Ordering::Relaxed)
            && bucket.try_admit(start).is_ok()
        {
            return Ok(Admission {
                bucket,
                waited: Duration::ZERO,
                finished: false,
            });
        }
        bucket.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = WaitGuard(&bucket.waiting);
        let ahead = bucket.waiting.load(Ordering::Relaxed).saturating_sub(1) as u64;
        // Estimate where this request stands: everyone ahead needs a slot first. A slot that is
        // surely further away than the deadline is refused now rather than after the wait.
        let estimate = bucket.estimate_wait(ahead, start);
        let cfg = self.cfg.load_full();
        if !estimate.is_zero() && (cfg.mode == QuotaMode::Reject || start + estimate > deadline) {
            return Err(Refused::Exhausted {
                retry_after: estimate,
            });
        }
        let mut shutdown = self.shutdown.subscribe();
        if *shutdown.borrow() {
            return Err(Refused::ShuttingDown);
        }
        let _turn = tokio::select! {
            turn = tokio::time::timeout_at(deadline.into(), bucket.gate.lock()) => match turn {
                Ok(guard) => guard,
                Err(_) => {
                    return Err(Refused::Exhausted {
                        retry_after: bucket.estimate_wait(ahead, Instant::now()),
                    })
                }
            },
            _ = shutdown.wait_for(|down| *down) => return Err(Refused::ShuttingDown),
        };
        loop {
            let now = Instant::now();
            let verdict = match &self.cluster {
                None => bucket.try_admit(now),
                Some(cluster) => self.admit_shared(&bucket, cluster, now, &cfg).await,
            };
            match verdict {
                Ok(()) => {
                    return Ok(Admission {
                        bucket: bucket.clone(),
                        waited: now.duration_since(start),
                        finished: false,
                    });
                }
                Err(wait) => {
                    if cfg.mode == QuotaMode::Reject || now + wait > deadline {
                        return Err(Refused::Exhausted { retry_after: wait });
                    }
                    // Sleeping with the gate held keeps the queue in arrival order.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|down| *down) => return Err(Refused::ShuttingDown),
                    }
                }
            }
        }
    }
}
