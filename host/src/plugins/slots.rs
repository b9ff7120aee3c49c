//! Counted slots of the pooling allocator: a plugin's instances, the live
//! plugins, and the instances configuration checks may hold. Each bound is
//! a term of the pool's size (see `runtime::pooling`), so a plugin that
//! reaches its bound is refused, naming it, and takes nothing from others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// A counter with a bound.
#[derive(Debug, Default)]
pub(super) struct Slots {
    taken: AtomicUsize,
}

/// One slot taken; given back when dropped.
#[derive(Debug)]
pub(super) struct Slot(Arc<Slots>);

impl Slots {
    /// Takes a slot if fewer than `max` are taken.
    pub(super) fn take(self: &Arc<Self>, max: usize) -> Option<Slot> {
        if self.taken.fetch_add(1, Ordering::AcqRel) >= max {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bound that waits instead of refusing: configuration checks run at load
/// time, off the request path, and a flag file must not be refused because
/// another file was being checked at the same moment.
#[derive(Debug)]
pub(super) struct Gate {
    free: Mutex<usize>,
    freed: Condvar,
}

/// A turn through the gate; the next waiter goes when it is dropped.
pub(super) struct Turn<'a>(&'a Gate);

impl Gate {
    pub(super) fn new(turns: usize) -> Self {
        Self {
            free: Mutex::new(turns.max(1)),
            freed: Condvar::new(),
        }
    }

    /// Waits for a turn.
    pub(super) fn enter(&self) -> Turn<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self
                .freed
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}
