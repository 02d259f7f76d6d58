//! What one client connection is doing, shared by its task, its byte stream and its requests'
//! bodies: how many requests are open, how many were ever opened, and whether its last read and
//! last write had to wait. The connection task parks an HTTP/1.1 connection only when all of
//! them say it is idle (`conn`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

// Every field is written and read on the connection's own worker thread (the runtime is
// single-threaded), so Relaxed orders enough; the atomics are there because hyper and the
// body types require `Send`.
#[derive(Debug, Default)]
pub struct Activity {
    /// Request and response bodies alive (two per request until each is dropped).
    open: AtomicU64,
    /// Requests ever started on the connection.
    started: AtomicU64,
    /// The last read from the client returned `Pending`.
    read_waiting: AtomicBool,
    /// The last write (or flush, or shutdown) to the client returned `Pending`.
    write_waiting: AtomicBool,
}

/// Keeps its request open while alive: one sits in the request body, one in the response body.
#[derive(Debug)]
pub struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity::default())
    }

    /// A request arrives: the guards for its request body and its response body.
    pub fn start(self: &Arc<Self>) -> (Open, Open) {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(2, Ordering::Relaxed);
        (Open(self.clone()), Open(self.clone()))
    }

    /// Requests started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    pub fn set_read_waiting(&self, waiting: bool) {
        self.read_waiting.store(waiting, Ordering::Relaxed);
    }

    pub fn set_write_waiting(&self, waiting: bool) {
        self.write_waiting.store(waiting, Ordering::Relaxed);
    }

    /// Idle between requests: a request was served since `started_before` was read, none is
    /// open (both bodies dropped: the client's fully read or abandoned, the response fully
    /// handed to the connection), nothing waits to be written, and the last read found nothing.
    pub fn idle_after(&self, started_before: u64) -> bool {
        self.started() != started_before
            && self.open.load(Ordering::Relaxed) == 0
            && self.read_waiting.load(Ordering::Relaxed)
            && !self.write_waiting.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_after_a_request_with_both_bodies_dropped_and_nothing_waiting() {
        let a = Activity::new();
        a.set_read_waiting(true);
        // Nothing served since: not idle (a connection is parked only after a request).
        assert!(!a.idle_after(0));
        let (req, resp) = a.start();
        assert!(!a.idle_after(0));
        drop(resp);
        // The request body still alive (streaming upstream, say): not idle.
        assert!(!a.idle_after(0));
        drop(req);
        assert!(a.idle_after(0));
        a.set_write_waiting(true);
        assert!(!a.idle_after(0));
        a.set_write_waiting(false);
        a.set_read_waiting(false);
        assert!(!a.idle_after(0));
        a.set_read_waiting(true);
        // Counted from a later point, no request since: not idle.
        assert!(!a.idle_after(a.started()));
    }
}
