//! Body types shared by the server and the upstream client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Errors inside bodies are boxed: they come from hyper, timers and limits.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every response carries.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// What every upstream request carries.
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// A client's request body: hyper's (`Left`), or none (`Right`: a request
/// the lean HTTP/1.1 path read itself, which has no body: `crate::lean`).
pub type ClientBody = http_body_util::Either<hyper::body::Incoming, Empty<Bytes>>;

/// A whole body in one piece.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The request body went past `limits.max_body` while it streamed.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than {0} bytes")]
pub struct BodyTooLarge(pub u64);

pin_project_lite::pin_project! {
    /// Streams a client's body on, failing with [`BodyTooLarge`] as soon as
    /// more than `limit` bytes went through, so nothing is held whole.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        left: u64,
        limit: u64,
    }
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`, allowing at most `limit` bytes.
    pub fn new(inner: B, limit: u64) -> Self {
        LimitedBody { inner, left: limit, limit }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *this.left {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(*this.limit)))));
                    }
                    *this.left -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an error, or any error it was caused by, is of type `T`.
pub fn caused_by<T: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<T>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A body fed through a channel, for responses produced by a task.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    cut: Cut,
}

impl ChannelBody {
    /// A body and the sender that feeds it; dropping the sender ends it.
    pub fn new(capacity: usize) -> (tokio::sync::mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (tx, ChannelBody { rx, cut: Cut::default() })
    }

    /// Makes the body end with an error instead, after what is queued,
    /// once [`Cut::cut`] was called: HTTP/2 resets the stream, HTTP/1.1
    /// closes the connection without the last chunk.
    pub fn cut(&self) -> Cut {
        self.cut.clone()
    }
}

/// Ends a [`ChannelBody`] with an error (see [`ChannelBody::cut`]).
#[derive(Clone, Default)]
pub struct Cut(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cut {
    pub fn cut(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None if self.cut.0.load(std::sync::atomic::Ordering::Acquire) => {
                Poll::Ready(Some(Err(crate::send_timeout::Stalled.into())))
            }
            None => Poll::Ready(None),
        }
    }
}
