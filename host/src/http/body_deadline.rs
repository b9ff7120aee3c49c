//! A request body's deadline: the whole body must arrive within the body
//! timeout, counted from the first wait for it, plus a second for every
//! [`MIN_RATE`] bytes it brings. At the defaults a trickle holds an OFREP
//! request at most 10 s plus 16 s earned by its 1 MiB limit; a 32 MiB plugin
//! upload (admin token checked before its body is read) must keep up
//! 64 KiB/s, about 0.5 Mbit/s, or have `--body-timeout-ms` raised.
//!
//! Why not tower-http's `RequestBodyTimeoutLayer`: its timer starts again
//! with every frame, so a client that sends one byte a little faster than
//! the timeout is never cut off (measured: a 100-byte body sent a byte every
//! 0.5 s under a 1 s timeout was still being read after 5 s). At the
//! default 1 MiB limit and 10 s that holds a request for months. Here the
//! deadline runs from the first wait for the body and only moves by what
//! arrives: a large body sent at a fair rate (a plugin upload over a slow
//! link) gets the time its size needs, a trickle does not.
//!
//! It also costs nothing for the usual request, whose small body is already
//! read with its headers: the timer is made only when the body has to be
//! waited for. (tower-http's registers one on every request: perf of a
//! single-flag load put tokio's timer wheel at about 2% of the CPU.)

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::Request;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Bytes a second a body must keep up on average to earn more time than
/// the timeout: each `MIN_RATE` bytes received move the deadline a second.
pub const MIN_RATE: u64 = 64 << 10;

/// The layer giving every request body a deadline of `timeout` (see the
/// module's docs).
pub fn layer(
    timeout: Duration,
) -> tower::util::MapRequestLayer<impl Fn(Request<Body>) -> Request<Body> + Clone> {
    tower::util::MapRequestLayer::new(move |request: Request<Body>| {
        request.map(|body| Body::new(DeadlineBody::new(body, timeout)))
    })
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body did not arrive in time ({} ms, and a second more for each {} KiB received; \
     --body-timeout-ms)",
    .0.as_millis(),
    MIN_RATE >> 10
)]
pub struct BodyTimeout(Duration);

/// The [`BodyTimeout`] behind `error`, if that is why a body could not be
/// read (it reaches a handler wrapped in axum's and the body limit's
/// errors).
pub fn timed_out<'a>(mut error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyTimeout> {
    loop {
        if let Some(timeout) = error.downcast_ref::<BodyTimeout>() {
            return Some(timeout);
        }
        error = error.source()?;
    }
}

/// `inner`, failing with [`BodyTimeout`] once its deadline has passed.
pub struct DeadlineBody<B> {
    inner: B,
    timeout: Duration,
    /// Armed at the first wait for the body; boxed so the body stays
    /// `Unpin` and the usual request allocates nothing.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The deadline passed.
    timed_out: bool,
}

impl<B> DeadlineBody<B> {
    /// `inner` under a deadline of `timeout`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
            timed_out: false,
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout)))));
        }
        // NB: the body first: what is already here is never refused, and
        // needs no timer.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() {
                // NB: the handler may hold the body long after its end (an
                // upload is compiled first): no timer to fire meanwhile.
                this.deadline = None;
            }
            if let (Some(deadline), Some(Ok(frame))) = (&mut this.deadline, &frame)
                && let Some(data) = frame.data_ref()
            {
                let earned = Duration::from_secs_f64(data.len() as f64 / MIN_RATE as f64);
                // NB: moving a registered timer later is a compare-and-swap
                // in tokio's timer; the wheel is touched only when the
                // earlier time falls due.
                let later = deadline.deadline() + earned;
                deadline.as_mut().reset(later);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        ready!(deadline.as_mut().poll(cx));
        // NB: polled again, it fails again; what arrives late is not read.
        this.timed_out = true;
        this.deadline = None;
        Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::sync::mpsc;

    /// A body fed by hand, a frame at a time.
    struct Fed(mpsc::Receiver<Bytes>);

    impl HttpBody for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    const TIMEOUT: Duration = Duration::from_millis(200);

    /// A body under [`TIMEOUT`] that gets `count` copies of `chunk`, one
    /// every `every`, until it is dropped.
    fn fed(chunk: Bytes, every: Duration, count: usize) -> DeadlineBody<Fed> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for _ in 0..count {
                tokio::time::sleep(every).await;
                if tx.send(chunk.clone()).await.is_err() {
                    return;
                }
            }
        });
        DeadlineBody::new(Fed(rx), TIMEOUT)
    }

    #[tokio::test]
    async fn a_body_already_here_is_read_without_a_timer() {
        let body = DeadlineBody::new(Body::from("{\"context\":{}}"), TIMEOUT);
        let mut body = std::pin::pin!(body);
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "{\"context\":{}}");
        assert!(body.deadline.is_none(), "no timer was made");
    }

    #[tokio::test]
    async fn a_trickle_is_cut_off_at_the_deadline_however_often_it_sends() {
        // A byte every 50 ms, each well within the 200 ms timeout, for 5 s.
        let body = fed(Bytes::from_static(b" "), Duration::from_millis(50), 100);
        let started = std::time::Instant::now();
        let mut body = std::pin::pin!(body);
        let error = loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(error)) => break error,
                None => panic!("the trickle was read to its end"),
            }
        };
        assert!(error.is::<BodyTimeout>(), "{error}");
        // Polled again, it fails again: nothing more is read.
        let again = body.frame().await.expect("an answer").expect_err("fails");
        assert!(again.is::<BodyTimeout>(), "{again}");
        // NB: generous for a loaded machine; the trickle alone takes 5 s.
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "cut off at the deadline, not when the trickle ended: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_large_body_at_a_fair_rate_earns_the_time_it_needs() {
        // 10 chunks of MIN_RATE bytes, one every 100 ms: 1 s in all, five
        // times the timeout, at ten times the minimum rate.
        let chunk = Bytes::from(vec![b' '; MIN_RATE as usize]);
        let body = fed(chunk, Duration::from_millis(100), 10);
        let body = body.collect().await.expect("the whole body");
        assert_eq!(body.to_bytes().len(), 10 * MIN_RATE as usize);
    }
}
