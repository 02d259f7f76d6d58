//! The pacing queue: a request waits its turn (weighted fair across clients, see `fair`) for
//! a slot in its bucket, up to its deadline, or is refused at once when its slot is surely
//! further away or its client has `max_queued` waiting already.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bucket::{Admission, Bucket, BucketKey, Refused, WaitGuard};
use super::fair::{Class, FairQueue, Joined};
use super::{QuotaManager, QuotaMode};

/// A request's place in the queue, however its wait ends (admitted, refused, its client
/// gone): a holder of the turn passes it on; a waiter leaves the queue (passing the turn on
/// if it had just been given to it).
struct Place<'a> {
    queue: &'a FairQueue,
    /// `None`: holds the turn.
    waiting: Option<(u64, u64)>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        match self.waiting {
            None => self.queue.done(),
            Some(key) => self.queue.leave(key),
        }
    }
}

impl QuotaManager {
    /// Waits for a slot in every limit of `key`'s bucket, its turn given fairly across the
    /// waiting requests' classes, until `deadline`. In `reject` mode, when the slot is further
    /// away than the deadline, or when `class` has `max_queued` waiting, refuses at once.
    pub async fn acquire(
        &self,
        key: &BucketKey,
        deadline: Instant,
        class: &Class,
    ) -> Result<Admission, Refused> {
        let bucket = self.bucket(key);
        let start = Instant::now();
        bucket.touch(start);
        // Nobody queued and a slot free now: admitted without the gate. The limiter's own
        // lock keeps the count exact; skipping the async gate means requests on different
        // workers never wake each other through it (a cross-thread wake-up per contended
        // request otherwise). Shared mode decides on Redis, asynchronously, so it queues,
        // unless this replica holds a leased slot.
        // (A free slot means no wait to estimate: with nobody ahead the estimate is zero.)
        // Only reads of the shared counters here: every write to a line that all workers
        // touch moves it between cores.
        if bucket.waiting.load(Ordering::Relaxed) == 0
            && !self.shutting_down.load(Ordering::Relaxed)
            && match &self.cluster {
                None => bucket.try_admit(start).is_ok(),
                Some(cluster) => bucket.try_admit_leased(start, cluster),
            }
        {
            return Ok(Admission {
                bucket,
                waited: Duration::ZERO,
                finished: false,
            });
        }
        // Out of line (see `cold`): a request admitted at once carries neither the wait's
        // size nor its code.
        crate::cold::out_of_line(self.queue_for(bucket, start, deadline, class)).await
    }

    /// The slow path of [`acquire`](Self::acquire): queue for a turn, then for a slot.
    async fn queue_for(
        &self,
        bucket: Arc<Bucket>,
        start: Instant,
        deadline: Instant,
        class: &Class,
    ) -> Result<Admission, Refused> {
        bucket.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = WaitGuard(&bucket.waiting);
        let cfg = self.cfg.load_full();
        let mut shutdown = self.shutdown.subscribe();
        if *shutdown.borrow() {
            return Err(Refused::ShuttingDown);
        }
        let joined = match bucket.queue.join(class) {
            Ok(j) => j,
            Err(ahead) => {
                return Err(Refused::ClientQueueFull {
                    retry_after: bucket.estimate_wait(ahead as u64, start),
                })
            }
        };
        let mut place = Place {
            queue: &bucket.queue,
            waiting: None,
        };
        if let Joined::Wait { key, turn, ahead } = joined {
            place.waiting = Some(key);
            // Where this request stands: everyone ahead of it needs a slot first. A slot that
            // is surely further away than the deadline is refused now rather than after the
            // wait.
            let estimate = bucket.estimate_wait(ahead as u64, start);
            if !estimate.is_zero() && (cfg.mode == QuotaMode::Reject || start + estimate > deadline)
            {
                return Err(Refused::Exhausted {
                    retry_after: estimate,
                });
            }
            let got = tokio::select! {
                got = tokio::time::timeout_at(deadline.into(), turn) => got,
                _ = shutdown.wait_for(|down| *down) => return Err(Refused::ShuttingDown),
            };
            if !matches!(got, Ok(Ok(()))) {
                return Err(Refused::Exhausted {
                    retry_after: bucket.estimate_wait(ahead as u64, Instant::now()),
                });
            }
            // The turn is this request's now.
            place.waiting = None;
        }
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
                    // Sleeping with the turn held keeps the queue's order.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|down| *down) => return Err(Refused::ShuttingDown),
                    }
                }
            }
        }
    }
}
