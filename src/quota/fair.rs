//! Weighted fair queueing of a bucket's waiting requests across clients: start-time fair
//! queueing. Each request is tagged on arrival with `start = max(V, F_c)` and its client's
//! finish tag becomes `F_c = start + 1/w_c`; the waiting request with the smallest start tag
//! gets the next turn (ties in arrival order), and `V` becomes its start tag. A client that
//! waits for nothing starts again at `V`, so it saves up no credit beyond one slot; with one
//! class (no `[[clients]]`) the order is arrival order. Bound (SFQ): over any interval in which
//! clients i and j both wait, the slots they get, divided by their weights, differ by at most
//! `1/w_i + 1/w_j`.
//!
//! The turn is what the FIFO gate was: its holder waits for a slot and admits, then passes it.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// One unit of service in tag space: a weight-1 client's slot.
const SCALE: u64 = 1 << 32;

/// Who a waiting request belongs to, for fairness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// A configured client's name; `None`: the one class of an open sidecar or the gateway's
    /// own requests.
    pub name: Option<Arc<str>>,
    pub weight: NonZeroU32,
    /// Most of this class's requests waiting in one bucket; beyond, refused at once.
    pub max_queued: usize,
}

impl Class {
    /// The class of a gateway without clients, and of the gateway's own requests.
    pub fn anonymous() -> Class {
        Class {
            name: None,
            weight: NonZeroU32::MIN,
            max_queued: usize::MAX,
        }
    }

    fn step(&self) -> u64 {
        SCALE / u64::from(self.weight.get())
    }
}

#[derive(Default)]
struct ClassState {
    finish: u64,
    queued: usize,
}

struct Waiter {
    class: Option<Arc<str>>,
    wake: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    /// The start tag of the last request given the turn.
    vtime: u64,
    /// Someone holds the turn.
    busy: bool,
    /// Waiting requests by (start tag, arrival number).
    waiting: BTreeMap<(u64, u64), Waiter>,
    classes: HashMap<Option<Arc<str>>, ClassState>,
    seq: u64,
}

/// One bucket's queue.
#[derive(Default)]
pub(super) struct FairQueue {
    state: Mutex<State>,
}

/// A place in the queue: the turn now, or a wait for it.
pub(super) enum Joined {
    Turn,
    Wait {
        key: (u64, u64),
        turn: oneshot::Receiver<()>,
        /// Requests ahead of this one.
        ahead: usize,
    },
}

impl FairQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tags a request of `class` and queues it, or gives it the turn when nobody holds it and
    /// nobody waits. `Err(ahead)`: the class has `max_queued` waiting already.
    pub(super) fn join(&self, class: &Class) -> Result<Joined, usize> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let idle = !s.busy && s.waiting.is_empty();
        let vtime = s.vtime;
        let c = s.classes.entry(class.name.clone()).or_default();
        let start = vtime.max(c.finish);
        if idle {
            c.finish = start.saturating_add(class.step());
            s.busy = true;
            s.vtime = start;
            return Ok(Joined::Turn);
        }
        if c.queued >= class.max_queued {
            return Err(s.waiting.len());
        }
        c.finish = start.saturating_add(class.step());
        c.queued += 1;
        s.seq += 1;
        let key = (start, s.seq);
        let (tx, rx) = oneshot::channel();
        let ahead = s.waiting.range(..key).count() + usize::from(s.busy);
        s.waiting.insert(
            key,
            Waiter {
                class: class.name.clone(),
                wake: tx,
            },
        );
        Ok(Joined::Wait {
            key,
            turn: rx,
            ahead,
        })
    }

    /// A waiting request gave up (deadline, shutdown, client gone) before its turn came. If
    /// the turn had just been passed to it, it passes it on.
    pub(super) fn leave(&self, key: (u64, u64)) {
        let mut s = self.lock();
        match s.waiting.remove(&key) {
            Some(w) => {
                if let Some(c) = s.classes.get_mut(&w.class) {
                    c.queued = c.queued.saturating_sub(1);
                }
            }
            // Not waiting any more: the turn was given to it.
            None => Self::pass(&mut s),
        }
    }

    /// The holder of the turn is done (admitted or refused): the next waiter gets it.
    pub(super) fn done(&self) {
        let mut s = self.lock();
        Self::pass(&mut s);
    }

    fn pass(s: &mut State) {
        while let Some(((start, _), w)) = s.waiting.pop_first() {
            if let Some(c) = s.classes.get_mut(&w.class) {
                c.queued = c.queued.saturating_sub(1);
            }
            s.vtime = start;
            if w.wake.send(()).is_ok() {
                return;
            }
            // Its receiver is gone (it is leaving too): the next one.
        }
        s.busy = false;
        // Classes that wait for nothing hold no state beyond their finish tag; drop those a
        // new request would start at `vtime` anyway.
        let vtime = s.vtime;
        s.classes.retain(|_, c| c.queued > 0 || c.finish > vtime);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn class(name: &str, weight: u32) -> Class {
        Class {
            name: Some(Arc::from(name)),
            weight: NonZeroU32::new(weight).expect("weight"),
            max_queued: usize::MAX,
        }
    }

    #[test]
    fn one_class_is_served_in_arrival_order() {
        let q = FairQueue::default();
        let anon = Class::anonymous();
        assert!(matches!(q.join(&anon), Ok(Joined::Turn)));
        let keys: Vec<_> = (0..3)
            .map(|_| match q.join(&anon) {
                Ok(Joined::Wait { key, turn, .. }) => (key, turn),
                _ => panic!("waits"),
            })
            .collect();
        for (i, (_, mut turn)) in keys.into_iter().enumerate() {
            q.done();
            assert!(turn.try_recv().is_ok(), "waiter {i} got the turn in order");
        }
    }

    #[test]
    fn a_newcomer_goes_before_a_backlog_and_max_queued_refuses() {
        let q = FairQueue::default();
        let a = Class {
            max_queued: 5,
            ..class("a", 1)
        };
        assert!(matches!(q.join(&a), Ok(Joined::Turn)));
        let mut waits = Vec::new();
        for _ in 0..5 {
            match q.join(&a) {
                Ok(Joined::Wait { turn, .. }) => waits.push(turn),
                _ => panic!("queued"),
            }
        }
        assert!(q.join(&a).is_err(), "a's sixth waiter is over max_queued");
        let b = class("b", 1);
        let mut b_turn = match q.join(&b) {
            Ok(Joined::Wait { ahead, turn, .. }) => {
                assert_eq!(ahead, 1, "only the holder is ahead of b");
                turn
            }
            _ => panic!("queued"),
        };
        q.done();
        assert!(b_turn.try_recv().is_ok(), "b next, before a's backlog");
        drop(waits);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Random weights, random arrivals, one slot per step: every slot goes to someone while
        /// anyone waits, and over the run each continuously backlogged pair's normalised
        /// service differs by at most 1/w_i + 1/w_j.
        #[test]
        fn shares_follow_the_weights_within_the_bound_and_no_slot_idles(
            weights in proptest::collection::vec(1u32..8, 2..5),
            arrivals in proptest::collection::vec((0usize..5, 0usize..4), 1..300),
            backlog in 20usize..60,
        ) {
            let classes: Vec<Class> = weights.iter().enumerate().map(|(i, w)| class(&format!("c{i}"), *w)).collect();
            let q = FairQueue::default();
            // Every class starts with a backlog, so all are backlogged throughout.
            prop_assert!(matches!(q.join(&classes[0]), Ok(Joined::Turn)));
            let mut pending: Vec<(usize, oneshot::Receiver<()>)> = Vec::new();
            for (i, c) in classes.iter().enumerate() {
                for _ in 0..backlog {
                    if let Ok(Joined::Wait { turn, .. }) = q.join(c) {
                        pending.push((i, turn));
                    }
                }
            }
            let mut served = vec![0u64; classes.len()];
            for (who, extra) in arrivals {
                // A few more arrivals, then one slot frees.
                let who = who % classes.len();
                for _ in 0..extra {
                    if let Ok(Joined::Wait { turn, .. }) = q.join(&classes[who]) {
                        pending.push((who, turn));
                    }
                }
                q.done();
                let got: Vec<usize> = pending
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(k, (_, t))| t.try_recv().is_ok().then_some(k))
                    .collect();
                prop_assert_eq!(got.len(), 1, "exactly one waiter gets each freed slot");
                let (class, _) = pending.swap_remove(got[0]);
                served[class] += 1;
            }
            let min_backlog = backlog as u64;
            for i in 0..classes.len() {
                for j in 0..classes.len() {
                    // Only while both stayed backlogged: neither ran out of its initial backlog.
                    if served[i] < min_backlog && served[j] < min_backlog {
                        let (wi, wj) = (f64::from(weights[i]), f64::from(weights[j]));
                        let gap = (served[i] as f64 / wi - served[j] as f64 / wj).abs();
                        prop_assert!(gap <= 1.0 / wi + 1.0 / wj + 1e-9, "{gap} {served:?} {weights:?}");
                    }
                }
            }
        }
    }
}
