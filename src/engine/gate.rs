//! Time-slicing of the device between models whose weights do not all fit in the budget.
//!
//! Without it, every model with requests runs a batched step whenever it can, and when their
//! weights together exceed the budget each step of one model evicts layers the next model's step
//! needs: the device spends its time paging. The gate admits models while their weight bytes fit
//! in the budget together; the others wait in arrival order. A model that has run for a
//! [`super::EngineOptions::slice`] while another waits steps aside after its current step and
//! queues again behind the waiting ones, so a page-in is paid once per slice instead of once per
//! step. When everything fits, nobody ever waits at the gate.
//!
//! Residency is no pass: a model whose layers are all still on the device is admitted only when
//! it fits next to the running ones too. (An earlier rule admitted any fully resident model at
//! once; a model that had just stepped aside was still resident, so it came straight back, three
//! models ran in a budget for two, and every step paged — 217 ms per 27-row step with four 2B
//! models on the H100.)

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The shared gate of one engine.
pub(super) struct Gate {
    state: Mutex<State>,
    changed: Condvar,
    slice: Duration,
}

#[derive(Default)]
struct State {
    /// Admitted models and their weight bytes.
    active: Vec<(String, usize)>,
    /// Models waiting to be admitted, first come first served.
    waiting: VecDeque<String>,
}

impl Gate {
    pub fn new(slice: Duration) -> Gate {
        Gate {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            slice,
        }
    }

    /// Waits until `name` (`bytes` of weights) may run: it is first in line and fits next to
    /// the running models (or none runs). `budget` reads the current weight budget.
    pub fn enter(&self, name: &str, bytes: usize, budget: impl Fn() -> usize) {
        let Ok(mut s) = self.state.lock() else { return };
        if s.active.iter().any(|(n, _)| n == name) {
            return;
        }
        s.waiting.push_back(name.to_string());
        loop {
            let first = s.waiting.front().is_some_and(|n| n == name);
            let used: usize = s.active.iter().map(|(_, b)| b).sum();
            let fits = s.active.is_empty() || used.saturating_add(bytes) <= budget();
            if first && fits {
                s.waiting.retain(|n| n != name);
                s.active.push((name.to_string(), bytes));
                self.changed.notify_all();
                return;
            }
            // Re-check now and then: the budget changes without a notification.
            s = match self.changed.wait_timeout(s, Duration::from_millis(20)) {
                Ok((s, _)) => s,
                Err(_) => return,
            };
        }
    }

    /// The models waiting to be admitted, first in line first.
    pub fn waiting(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.waiting.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether a model admitted at `since` should step aside for a waiting one.
    pub fn should_yield(&self, since: Instant) -> bool {
        since.elapsed() >= self.slice && self.state.lock().is_ok_and(|s| !s.waiting.is_empty())
    }

    /// `name` stops running (its batch is empty, or its slice is over).
    pub fn leave(&self, name: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.active.retain(|(n, _)| n != name);
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn admits_what_fits_and_queues_the_rest() {
        let gate = Arc::new(Gate::new(Duration::from_millis(1)));
        gate.enter("a", 60, || 100);
        // b does not fit next to a: it waits until a leaves.
        let entered = Arc::new(AtomicBool::new(false));
        let (g, e) = (gate.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            g.enter("b", 60, || 100);
            e.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst));
        assert!(gate.should_yield(Instant::now() - Duration::from_millis(5)));
        gate.leave("a");
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        // A model that fits next to b is admitted at once, and nobody waits.
        gate.enter("d", 40, || 100);
        assert!(!gate.should_yield(Instant::now() - Duration::from_millis(5)));
    }

    /// A model that stepped aside queues behind the one it made room for, even though its
    /// weights are all still resident (nothing has paged them out yet).
    #[test]
    fn a_model_that_steps_aside_waits_its_turn() {
        let gate = Arc::new(Gate::new(Duration::from_millis(1)));
        gate.enter("a", 60, || 100);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (g, o) = (gate.clone(), order.clone());
        let c = std::thread::spawn(move || {
            g.enter("c", 60, || 100);
            o.lock().unwrap().push("c");
            std::thread::sleep(Duration::from_millis(30));
            g.leave("c");
        });
        std::thread::sleep(Duration::from_millis(30));
        // a's slice is over and c waits: a steps aside and asks again at once.
        assert!(gate.should_yield(Instant::now() - Duration::from_millis(5)));
        gate.leave("a");
        gate.enter("a", 60, || 100);
        order.lock().unwrap().push("a");
        c.join().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["c", "a"]);
    }
}
