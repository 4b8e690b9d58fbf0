//! A caller's handle on long work of the core (loading a checkpoint, processing a prompt):
//! another thread may ask the work to stop, and may read how far it has got. The work checks
//! the request at points where stopping leaves everything consistent (between tensors of a
//! load, between layers of a forward pass) and then returns [`Error::Interrupted`].
//!
//! The Python bindings run such work on a helper thread while the caller's thread watches for
//! Ctrl-C and reports progress; the native CLI, whose process Ctrl-C ends, passes [`NEVER`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// Stop request and progress of one piece of work. Progress counts steps of the work's own
/// kind (tensors for a load, layers for a forward pass).
#[derive(Debug)]
pub struct Control {
    /// [`NEVER`]: requests and progress are ignored (many passes share it).
    never: bool,
    stop: AtomicBool,
    /// Steps after which the work stops by itself (`usize::MAX`: never).
    limit: AtomicUsize,
    done: AtomicUsize,
    total: AtomicUsize,
}

impl Default for Control {
    fn default() -> Control {
        Control::new()
    }
}

/// A control nobody can stop and that counts nothing, for callers that do not interrupt.
pub static NEVER: Control = Control {
    never: true,
    ..Control::new()
};

impl Control {
    pub const fn new() -> Control {
        Control {
            never: false,
            stop: AtomicBool::new(false),
            limit: AtomicUsize::new(usize::MAX),
            done: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
        }
    }

    /// Back to a fresh control (no stop request, no limit, no progress), to serve another
    /// piece of work.
    pub fn reset(&self) {
        self.stop.store(false, Ordering::Relaxed);
        self.limit.store(usize::MAX, Ordering::Relaxed);
        self.begin(0);
    }

    /// Ask the work to stop at its next check. An atomic store: safe in a signal handler.
    pub fn stop(&self) {
        if !self.never {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Ask the work to stop at the first check after `steps` steps are done (0: at once), as
    /// if [`Self::stop`] were called then: the way to cut a piece of work at a known point.
    pub fn stop_after(&self, steps: usize) {
        if !self.never {
            self.limit.store(steps, Ordering::Relaxed);
        }
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self.done.load(Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed)
    }

    /// `Err(Error::Interrupted)` once a stop was asked for.
    pub fn check(&self) -> Result<()> {
        if self.stop_requested() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    /// `(steps done, steps in all)`; `(0, 0)` before the work has counted its steps.
    pub fn progress(&self) -> (usize, usize) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// The work starts: `total` steps, none done.
    pub(crate) fn begin(&self, total: usize) {
        if self.never {
            return;
        }
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// One more step done.
    pub(crate) fn step(&self) {
        if self.never {
            return;
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_request_fails_the_next_check() {
        let c = Control::new();
        assert!(c.check().is_ok());
        c.begin(3);
        c.step();
        assert_eq!(c.progress(), (1, 3));
        c.stop();
        assert!(matches!(c.check(), Err(Error::Interrupted)));
        NEVER.stop();
        NEVER.stop_after(0);
        assert!(NEVER.check().is_ok(), "NEVER cannot be stopped");
        let c = Control::new();
        c.stop_after(2);
        c.begin(5);
        c.step();
        assert!(c.check().is_ok());
        c.step();
        assert!(matches!(c.check(), Err(Error::Interrupted)));
        c.reset();
        assert!(c.check().is_ok() && c.progress() == (0, 0));
    }
}
