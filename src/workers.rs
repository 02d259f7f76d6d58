//! The request workers: one single-threaded Tokio runtime per thread, each with its own
//! upstream connection pool, so a connection's requests run start to finish on one thread.
//!
//! A work-stealing runtime moves tasks between threads: the client connection, the upstream
//! connection and the log all wake each other across cores, and every such wake-up is a futex
//! call and a cache miss. Pinning a connection to a worker (as nginx pins it to a process)
//! keeps a request on one core; connections are dealt to workers in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

use crate::upstream::Upstream;

/// Period of the timer each worker keeps due (see [`anchor_timers`]); shorter than any
/// per-request timeout (the shortest, `limits.header_read_timeout`, is seconds).
const TIMER_ANCHOR: Duration = Duration::from_millis(500);

/// Keeps a timer due within [`TIMER_ANCHOR`] on the worker. Tokio wakes its driver (a
/// `write(2)` to an eventfd, then an extra `epoll_wait` round) whenever a timer is set earlier
/// than the driver's planned wake-up, and with no timer pending every timer is earlier: each
/// request's timeouts (header read, upstream response) would cost that round trip. With a
/// timer always due soon, the per-request ones are later and cost nothing extra; the price is
/// two wake-ups a second per idle worker.
async fn anchor_timers() {
    loop {
        tokio::time::sleep(TIMER_ANCHOR).await;
    }
}

/// One worker: where its connections run and the upstream pool they use.
pub struct Worker {
    handle: Handle,
    upstream: Arc<Upstream>,
}

impl Worker {
    /// Runs `task` on this worker's thread.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(task);
    }

    /// This worker's upstream client: its connections live on this worker's runtime.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

/// The running workers. Dropping this stops them; their connections are dropped with them.
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
    /// Dropped with `Workers`: each worker thread ends when its receiver sees that.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `count` (at least one) worker threads, each with its own pool to `upstream`.
    pub fn start(count: usize, upstream: &Upstream) -> std::io::Result<Workers> {
        let count = count.max(1);
        let mut workers = Vec::with_capacity(count);
        let mut stop = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            handle.spawn(anchor_timers());
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("mg-worker-{i}"))
                .spawn(move || {
                    // The runtime drives its tasks only inside block_on; it ends (and is
                    // dropped on its own thread, as Tokio requires) when `Workers` goes.
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            workers.push(Worker {
                handle,
                upstream: Arc::new(upstream.fresh_pool()),
            });
            stop.push(stop_tx);
        }
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// The worker for the next connection, in turn.
    pub fn next(&self) -> &Worker {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        &self.workers[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Upstream {
        let text = "[[apps]]\napp_id = \"a\"\napp_key = \"k\"\n";
        let config =
            crate::config::load_str(text, &std::collections::HashMap::new()).expect("valid");
        Upstream::new(&config.upstream).expect("upstream")
    }

    #[test]
    fn connections_are_dealt_in_turn_and_workers_stop_when_dropped() {
        let workers = Workers::start(2, &upstream()).expect("workers");
        let rt = Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let names: Vec<String> = (0..4)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                workers.next().spawn(async move {
                    let _ = tx.send(std::thread::current().name().map(str::to_owned));
                });
                rt.block_on(rx).expect("ran").expect("named")
            })
            .collect();
        assert_eq!(
            names,
            ["mg-worker-0", "mg-worker-1", "mg-worker-0", "mg-worker-1"]
        );

        let handle = workers.workers[0].handle.clone();
        drop(workers);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Once the worker's runtime is gone, what is spawned on it never runs.
        while rt.block_on(handle.spawn(async {})).is_ok() {
            assert!(std::time::Instant::now() < deadline, "worker still running");
            std::thread::yield_now();
        }
    }
}
