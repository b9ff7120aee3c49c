//! The engine's epoch ticker: what makes deadlines fire.
//!
//! Guest code is interrupted when the engine's epoch passes the deadline its
//! store was given, and the epoch only moves when this ticker advances it.
//! It ticks every [`EPOCH_TICK`] while at least one guest call is in flight
//! ([`Ticker::hold`]) and sleeps otherwise: an idle flaghost wakes no
//! thread a thousand times a second for plugins nobody is calling.
//!
//! NB: a deadline counts ticks from when it is set, and the ticker is
//! awake for as long as any call holds it, so sleeping between calls loses
//! no tick a call is owed. On waking, the ticker sleeps a tick before its
//! first advance, so a call that woke it gets its whole first tick.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;

use wasmtime::Engine;

use super::EPOCH_TICK;

/// The ticker of one engine; the thread ends when this is dropped (or the
/// engine is).
pub(super) struct Ticker {
    shared: Arc<Shared>,
    thread: Thread,
}

struct Shared {
    /// Guest calls running now (holds of [`Ticker::hold`]).
    in_flight: AtomicUsize,
    /// Set when the [`Ticker`] is dropped.
    closed: AtomicBool,
}

impl Ticker {
    /// Starts the ticker of `engine`.
    ///
    /// # Panics
    ///
    /// When the thread cannot be started: without it no deadline fires,
    /// and running plugins unbounded is worse than not starting.
    pub(super) fn start(engine: &Engine) -> Arc<Self> {
        let engine = engine.weak();
        Self::start_with(move || {
            engine
                .upgrade()
                .map(|engine| engine.increment_epoch())
                .is_some()
        })
    }

    /// A ticker calling `tick` (false: stop, the engine is gone).
    fn start_with(tick: impl Fn() -> bool + Send + 'static) -> Arc<Self> {
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        let ticking = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("flaghost-epoch".into())
            .spawn(move || {
                loop {
                    if ticking.closed.load(Ordering::Acquire) {
                        return;
                    }
                    if ticking.in_flight.load(Ordering::Acquire) == 0 {
                        // NB: a `hold` between the load and the park leaves
                        // its unpark token, so this park returns at once.
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    if !tick() {
                        return;
                    }
                }
            });
        match spawned {
            Ok(handle) => Arc::new(Self {
                shared,
                thread: handle.thread().clone(),
            }),
            Err(e) => panic!("cannot start the epoch ticker thread: {e}"),
        }
    }

    /// Keeps the ticker ticking until the returned hold is dropped: taken
    /// around every stretch of guest code.
    pub(super) fn hold(&self) -> Hold<'_> {
        if self.shared.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Hold(self)
    }

    /// Whether the ticker is asleep (no call in flight).
    #[cfg(test)]
    fn idle(&self) -> bool {
        self.shared.in_flight.load(Ordering::Acquire) == 0
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// A guest call in flight (see [`Ticker::hold`]).
pub(super) struct Hold<'a>(&'a Ticker);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn it_ticks_while_a_call_holds_it_and_sleeps_otherwise() {
        let ticks = Arc::new(AtomicUsize::new(0));
        let counted = ticks.clone();
        let ticker = Ticker::start_with(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            true
        });
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ticks.load(Ordering::Relaxed), 0, "ticked with no call");
        assert!(ticker.idle());

        let hold = ticker.hold();
        let started = Instant::now();
        while ticks.load(Ordering::Relaxed) < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no tick while held"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(hold);
        assert!(ticker.idle());
        // NB: a tick already past its sleep may still land.
        std::thread::sleep(Duration::from_millis(20));
        let after = ticks.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            ticks.load(Ordering::Relaxed),
            after,
            "ticked after the call"
        );
    }

    #[test]
    fn dropping_it_ends_its_thread() {
        let ended = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let flag = SetOnDrop(ended.clone());
        // NB: the closure owns `flag`; it is dropped when the thread ends.
        let ticker = Ticker::start_with(move || {
            let _ = &flag;
            true
        });
        drop(ticker);
        let started = Instant::now();
        while !ended.load(Ordering::Acquire) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "thread lives on"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
