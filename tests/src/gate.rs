//! A gate that stops a device operation at an exact point until the test lets it go (with
//! `Hooked`): the world is frozen there while the test injects a fault.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Holds writes while armed: `hold` blocks the caller until `release` (all of them with
/// `hold_all`, else only the first).
#[derive(Default)]
pub struct Gate {
    /// Set to hold; `hold_all`: every operation that reaches the gate, else only the first.
    pub armed: AtomicBool,
    pub hold_all: AtomicBool,
    state: Mutex<(usize, bool)>, // (writes held so far, released)
    changed: Condvar,
}

impl Gate {
    pub fn hold_if_armed(&self) {
        let take = if self.hold_all.load(Ordering::Acquire) {
            self.armed.load(Ordering::Acquire)
        } else {
            self.armed.swap(false, Ordering::AcqRel)
        };
        if !take {
            return;
        }
        let mut s = self.state.lock().unwrap();
        if s.1 {
            return;
        }
        s.0 += 1;
        self.changed.notify_all();
        while !s.1 {
            s = self.changed.wait(s).unwrap();
        }
    }

    pub fn wait_held(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap();
        while s.0 == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
        true
    }

    pub fn release(&self) {
        self.armed.store(false, Ordering::Release);
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}
