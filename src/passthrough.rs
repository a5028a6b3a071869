//! A response body passed through unchanged: each upstream chunk is written
//! on as soon as it arrives, under `idle_timeout` and the drain deadline.

use std::future::Future;
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

impl PassThrough {
    /// The body as a response to a `version` request gets it: on HTTP/2 read
    /// by a [`Relayed`] task, unless it is empty from the start.
    pub fn into_response_body(self, version: http::Version, send_timeout: Duration) -> crate::body::ResponseBody {
        use http_body_util::BodyExt;
        if version == http::Version::HTTP_2 && !self.is_end_stream() {
            Relayed::start(self, send_timeout).boxed_unsync()
        } else {
            self.boxed_unsync()
        }
    }
}

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
/// in `crate::stream`. Once the upstream's answer is known whole (with its
/// last frame, for an answer with a length), that last frame waits for the
/// client without the timeout, for as long as the stream lives: nothing is
/// left to free upstream. (On HTTP/1.1 a blocked write is cut after
/// `limits.send_timeout` even then, but there the socket's buffers, up to
/// megabytes, take the end of most answers first.)
pub struct Relayed {
    frames: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
    task: Option<tokio_util::task::AbortOnDropHandle<Result<(), BoxError>>>,
    hint: SizeHint,
}

impl Relayed {
    /// Starts reading `body` in a task on the current runtime. A body that
    /// is empty from the start (a `204`, a `304`, an answer to `HEAD`) has
    /// nothing to wait for: it is not worth a task, and hyper needs to see
    /// its end at once (see [`PassThrough::into_response_body`]).
    pub fn start<B>(body: B, send_timeout: Duration) -> Relayed
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        use http_body_util::BodyExt;
        let hint = body.size_hint();
        let (tx, frames) = tokio::sync::mpsc::channel(RELAY_FRAMES);
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let mut body = Box::pin(body);
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                if body.is_end_stream() {
                    // The upstream's answer is whole: nothing upstream is
                    // left to free, so its last frame waits for the client
                    // for as long as the stream lives.
                    drop(body);
                    let _ = tx.send(frame).await;
                    return Ok(());
                }
                match tokio::time::timeout(send_timeout, tx.reserve()).await {
                    Ok(Ok(permit)) => permit.send(frame),
                    // hyper let go of the body: the client left.
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => return Err(Box::new(crate::send_timeout::Stalled) as BoxError),
                }
            }
            Ok(())
        }));
        Relayed { frames, task: Some(tokio_util::task::AbortOnDropHandle::new(task)), hint }
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = ready!(this.frames.poll_recv(cx)) {
            // The length the upstream announced was for the whole body; hyper
            // reads it before the first frame.
            this.hint = SizeHint::default();
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A body of `frames`, then either its end (known with the last frame)
    /// or nothing more, ever: an upstream that still has more to send.
    struct Frames {
        frames: VecDeque<Bytes>,
        then_more: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(Frame::data(f)))),
                None if self.then_more => Poll::Pending,
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.frames.is_empty() && !self.then_more
        }
    }

    fn frames(n: usize, then_more: bool) -> Frames {
        Frames { frames: (0..n).map(|i| Bytes::from(format!("frame {i}"))).collect(), then_more }
    }

    /// Reads `body` to its end: the frames, and whether it ended in an error.
    async fn read_all(mut body: Relayed) -> (Vec<Bytes>, bool) {
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => match f.into_data() {
                    Ok(data) => got.push(data),
                    Err(_) => panic!("a trailers frame where only data was sent"),
                },
                Err(_) => return (got, true),
            }
        }
        (got, false)
    }

    /// A reader that takes nothing for longer than `send_timeout` while the
    /// upstream still has more: the queued frames, then an error.
    #[tokio::test(start_paused = true)]
    async fn a_body_nobody_takes_from_is_cut_after_send_timeout() {
        let body = Relayed::start(frames(RELAY_FRAMES + 1, true), Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok((got, cut)) = tokio::time::timeout(Duration::from_secs(10), read_all(body)).await else {
            panic!("the body neither ended nor was cut");
        };
        assert_eq!(got.len(), RELAY_FRAMES);
        assert!(cut, "a body the upstream had not finished ended as if complete");
    }

    /// The same pause on an answer the upstream has finished: nothing is
    /// left to free upstream, so its last frame waits and it arrives whole.
    #[tokio::test(start_paused = true)]
    async fn a_finished_answer_waits_for_a_slow_reader() {
        let body = Relayed::start(frames(RELAY_FRAMES + 1, false), Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (got, cut) = read_all(body).await;
        assert_eq!(got, (0..=RELAY_FRAMES).map(|i| Bytes::from(format!("frame {i}"))).collect::<Vec<_>>());
        assert!(!cut, "a finished answer was cut");
    }
}
