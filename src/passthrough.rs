//! A response body passed through unchanged: each upstream chunk is written
//! on as soon as it arrives, under `idle_timeout` and the drain deadline.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::body::BoxError;
use crate::upstream::UpstreamBody;
use crate::wake::OnWake;

/// Why a passed-through body was cut.
#[derive(Debug, thiserror::Error)]
pub enum Cut {
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
    #[error("proxy shutting down")]
    Shutdown,
}

/// The upstream body, forwarded chunk by chunk.
pub struct PassThrough {
    inner: UpstreamBody,
    idle: Duration,
    /// When the last upstream bytes arrived; the timer is re-armed from it
    /// lazily, so a chunk costs no timer re-registration.
    last: Instant,
    timer: Pin<Box<Sleep>>,
    deadline: OnWake<WaitForCancellationFutureOwned>,
}

impl PassThrough {
    /// Wraps an upstream body.
    pub fn new(inner: UpstreamBody, idle: Duration, deadline: CancellationToken) -> PassThrough {
        let now = Instant::now();
        PassThrough {
            inner,
            idle,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            deadline: OnWake::new(deadline.cancelled_owned()),
        }
    }
}

impl Body for PassThrough {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if Pin::new(&mut this.deadline).poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(Cut::Shutdown))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last = Instant::now();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        loop {
            ready!(this.timer.as_mut().poll(cx));
            let due = this.last + this.idle;
            if Instant::now() >= due {
                return Poll::Ready(Some(Err(Box::new(Cut::Idle(this.idle)))));
            }
            this.timer.as_mut().reset(due);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;
