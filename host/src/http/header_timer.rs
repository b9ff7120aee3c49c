//! The timer behind a connection's header timeout, registered once per
//! connection instead of once per request.
//!
//! hyper starts a new sleep for every request it reads the headers of and
//! drops it once they are in. With hyper-util's `TokioTimer` each one is a
//! tokio timer: put into the runtime's timer wheel when first polled (the
//! read is usually pending: the client has not sent its next request yet)
//! and taken out again when dropped, a lock each way, about 4% of a
//! single-flag request's CPU (perf, `wrk -c64`).
//!
//! Here each connection keeps one tokio sleep. A request's sleep is a
//! deadline that polls it: it moves the shared sleep earlier if it must,
//! never later. When the shared sleep fires before the deadline now being
//! waited for (an earlier request's, long answered), it is set to that
//! deadline and waited on again. So a connection serving requests back to
//! back touches the timer wheel once per header timeout, not per request,
//! and a deadline still fires at its instant: the behaviour is hyper's.
//! (The one cost: the shared sleep, left at an answered request's deadline,
//! wakes the connection's task once, for nothing, if it fires while a slow
//! request is being served.)

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// The tokio sleep a connection's deadlines wait on, made at the first one
/// polled.
// NB: a mutex because hyper wants a `Sync` timer; only the connection's own
// task polls it, so it is never contended.
type SharedSleep = Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>;

/// hyper's timer for one connection (one per connection: the sleep it
/// shares is that connection's).
#[derive(Clone, Default)]
pub struct ConnectionTimer {
    shared: SharedSleep,
}

impl Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(Deadline {
            at: tokio::time::Instant::from_std(deadline),
            shared: Arc::clone(&self.shared),
        })
    }

    fn now(&self) -> Instant {
        // NB: tokio's clock, which tests can pause.
        tokio::time::Instant::now().into_std()
    }
}

/// One sleep hyper asked for: done at `at`.
struct Deadline {
    at: tokio::time::Instant,
    shared: SharedSleep,
}

impl Sleep for Deadline {}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let sleep = shared.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() > at {
            sleep.as_mut().reset(at);
        }
        loop {
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // NB: it fired at `at` or later: this deadline has passed.
                Poll::Ready(()) if sleep.deadline() >= at => return Poll::Ready(()),
                // It fired at an earlier deadline, one no longer waited for.
                Poll::Ready(()) => sleep.as_mut().reset(at),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// Whether `sleep` is done, polled once.
    async fn done(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_is_done_at_its_instant_and_not_before() {
        let timer = ConnectionTimer::default();
        let mut sleep = timer.sleep(Duration::from_secs(10));
        assert!(!done(&mut sleep).await);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(!done(&mut sleep).await, "not before its deadline");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(done(&mut sleep).await, "done at its deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_requests_deadline_does_not_end_a_later_one() {
        let timer = ConnectionTimer::default();
        // Request 1's headers: waited on, then in after 6 s.
        let mut first = timer.sleep(Duration::from_secs(10));
        assert!(!done(&mut first).await);
        tokio::time::advance(Duration::from_secs(6)).await;
        drop(first);
        // Request 2's: the shared sleep still stands at request 1's 10 s.
        let mut second = timer.sleep(Duration::from_secs(10));
        assert!(!done(&mut second).await);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            !done(&mut second).await,
            "11 s in: past request 1's deadline, 5 s into request 2's"
        );
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert!(!done(&mut second).await, "not before its own deadline");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(done(&mut second).await, "done at its own deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_deadline_than_the_one_waited_on_is_kept() {
        let timer = ConnectionTimer::default();
        let mut long = timer.sleep(Duration::from_secs(30));
        assert!(!done(&mut long).await);
        drop(long);
        let mut short = timer.sleep(Duration::from_secs(1));
        assert!(!done(&mut short).await);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(done(&mut short).await, "1 s, not the 30 s set before");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_past_is_done_at_once() {
        let timer = ConnectionTimer::default();
        let mut sleep = timer.sleep(Duration::from_secs(10));
        assert!(!done(&mut sleep).await);
        drop(sleep);
        tokio::time::advance(Duration::from_secs(20)).await;
        let mut past = timer.sleep_until(timer.now() - Duration::from_secs(1));
        assert!(done(&mut past).await);
    }
}
