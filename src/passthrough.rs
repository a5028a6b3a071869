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

/// Frames an HTTP/2 passed-through body's task may have ready ahead of hyper.
const RELAY_FRAMES: usize = 4;

/// An HTTP/2 passed-through body, read in a task of its own.
///
/// hyper polls an HTTP/2 stream's body only while the client's flow-control
/// windows have room, so a client that stops reading (and still answers
/// pings) would leave the upstream's answer unread, and the upstream request
/// open, for as long as the connection lives. The task hands the frames over
/// a short channel; when hyper took none of them for `limits.send_timeout`,
/// the task lets go of the upstream's answer and the client's stream ends in
/// an error (a reset), not as if it were complete. Event streams do the same
/// in `crate::stream`.
pub struct Relayed {
    frames: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
    task: Option<tokio_util::task::AbortOnDropHandle<Result<(), BoxError>>>,
    hint: SizeHint,
}

impl Relayed {
    /// Starts reading `body` in a task on the current runtime.
    pub fn start<B>(body: B, send_timeout: Duration) -> Relayed
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        use http_body_util::BodyExt;
        let hint = body.size_hint();
        let (tx, frames) = tokio::sync::mpsc::channel(RELAY_FRAMES);
        let task = tokio::spawn(async move {
            let mut body = std::pin::pin!(body);
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                match tokio::time::timeout(send_timeout, tx.reserve()).await {
                    Ok(Ok(permit)) => permit.send(frame),
                    // hyper let go of the body: the client left.
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => return Err(Box::new(crate::send_timeout::Stalled) as BoxError),
                }
            }
            Ok(())
        });
        Relayed { frames, task: Some(tokio_util::task::AbortOnDropHandle::new(task)), hint }
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = ready!(this.frames.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(frame)));
        }
        // Every frame is out: the task's end says how the body ends.
        let Some(task) = &mut this.task else { return Poll::Ready(None) };
        let result = ready!(Pin::new(task).poll(cx));
        this.task = None;
        match result {
            Ok(Ok(())) => Poll::Ready(None),
            Ok(Err(e)) => Poll::Ready(Some(Err(e))),
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}
