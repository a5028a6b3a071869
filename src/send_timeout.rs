//! `limits.send_timeout`: a client that takes none of the bytes waiting for
//! it for this long is dropped, as nginx's `send_timeout` does. The clock
//! runs only while a write is blocked, and restarts whenever a write goes
//! through again: a slow reader keeps its stream, one that stopped reading
//! does not hold its stream slot, its upstream request and its buffers for
//! ever. (Linux lets a blocked socket take more once a third of its send
//! buffer is free: a client must read that much within the timeout.)
//!
//! A write that goes through costs nothing here; the timer is made the first
//! time a connection's writes block, and then reused.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A client that took nothing for `limits.send_timeout`: the error a
/// stream ends with then (from a [`Stall`], or a cut
/// [`ChannelBody`](crate::body::ChannelBody)).
#[derive(Debug, thiserror::Error)]
#[error("the client took nothing for limits.send_timeout")]
pub struct Stalled;

/// The clock of one connection's blocked writes.
pub struct Stall {
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the current blockage.
    armed: bool,
    /// A connection's: told when the clock runs out and of each write that
    /// moved bytes.
    writes: Option<ConnWrites>,
}

impl Stall {
    pub fn new(timeout: Duration) -> Stall {
        Stall { timeout, timer: None, armed: false, writes: None }
    }

    /// Bytes went out: the clock stops.
    pub fn progress(&mut self) {
        self.armed = false;
    }

    /// Counts a write that moved bytes on the connection.
    fn count(&self, result: &Poll<io::Result<usize>>) {
        if let (Some(writes), Poll::Ready(Ok(1..))) = (&self.writes, result) {
            writes.0.moved.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A write is blocked: starts the clock if it is not running, and
    /// registers for its end; an error once it ran out.
    fn blocked(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.armed {
            self.armed = true;
            let deadline = Instant::now() + self.timeout;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let ran_out = self.timer.as_mut().is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
        if ran_out {
            if let Some(writes) = &self.writes {
                writes.0.stalled.store(true, Ordering::Relaxed);
            }
            return Err(io::Error::new(io::ErrorKind::TimedOut, Stalled));
        }
        Ok(())
    }

    /// [`Stall::blocked`] as the poll of a blocked write: `Pending`, or the
    /// error once the clock ran out.
    pub fn poll_blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.blocked(cx) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// What a write, flush or shutdown returned, with the clock run for it;
    /// `moved` tells whether a ready result took bytes out.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
        moved: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.poll_blocked(cx),
            Poll::Ready(Ok(v)) => {
                if moved(&v) {
                    self.progress();
                }
                Poll::Ready(Ok(v))
            }
            other => other,
        }
    }
}

/// What a connection's send timeout saw of its writes: whether it gave the
/// connection up for a blocked write (its streams, which hyper drops with
/// it, then end as `send_timeout`, not `client_gone`), and how many writes
/// moved bytes (which tell an idle connection from one still sending what
/// hyper has let go of).
#[derive(Clone, Default)]
pub struct ConnWrites(Arc<WriteCounts>);

#[derive(Default)]
struct WriteCounts {
    stalled: AtomicBool,
    moved: AtomicU64,
}

impl ConnWrites {
    /// Whether the send timeout gave the connection up.
    pub fn stalled(&self) -> bool {
        self.0.stalled.load(Ordering::Relaxed)
    }

    /// How many of the connection's writes moved bytes.
    pub fn moved(&self) -> u64 {
        self.0.moved.load(Ordering::Relaxed)
    }
}

/// A connection's I/O with the send timeout on its writes (hyper's side).
pub struct SendTimeout<T> {
    io: T,
    stall: Stall,
}

impl<T> SendTimeout<T> {
    /// `writes` hears of each write that moved bytes and of the clock
    /// running out.
    pub fn new(io: T, timeout: Duration, writes: ConnWrites) -> SendTimeout<T> {
        SendTimeout { io, stall: Stall { writes: Some(writes), ..Stall::new(timeout) } }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        let result = this.stall.watch(cx, result, |n| *n > 0);
        this.stall.count(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        let result = this.stall.watch(cx, result, |n| *n > 0);
        this.stall.count(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// A TLS stream's flush writes its buffered records: blocked the same way.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.stall.watch(cx, result, |_| true)
    }

    /// A TLS stream's shutdown writes its `close_notify`: blocked the same way.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_shutdown(cx);
        this.stall.watch(cx, result, |_| true)
    }
}
