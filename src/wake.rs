//! [`OnWake`]: a future polled only when it asked to be.
//!
//! A stream's body is polled on every upstream chunk; the drain and stop
//! signals it also waits on (a `CancellationToken` shared by every stream)
//! take a lock shared by all streams each time they are polled. Wrapped in
//! [`OnWake`], such a future is polled once to register, and again only
//! after its own waker fired, so a chunk costs one atomic load for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Wraps `F`, polling it only on its first poll and after its waker fired.
pub struct OnWake<F> {
    inner: Pin<Box<F>>,
    gate: Gate,
}

/// Lets a poll through only when the last one was ready, or after the
/// waker it was given fired: [`OnWake`] for a future, and by hand for
/// anything polled like one (an upstream body's next chunk).
pub struct Gate {
    signal: Arc<Signal>,
    /// The waker handed to what is polled (it wakes `signal`).
    waker: Waker,
    /// The task's waker `signal` holds, to skip registering it again.
    task: Option<Waker>,
    /// The last poll was pending.
    waiting: bool,
}

struct Signal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for Gate {
    fn default() -> Gate {
        let signal = Arc::new(Signal { fired: AtomicBool::new(false), task: AtomicWaker::new() });
        let waker = Waker::from(signal.clone());
        Gate { signal, waker, task: None, waiting: false }
    }
}

impl Gate {
    /// Runs `poll` with the gate's waker, unless it was pending last time
    /// and nothing woke it since: then `Pending` at once, for one atomic load.
    pub fn poll_with<T>(&mut self, cx: &mut Context<'_>, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        let same = self.task.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        // Only a wake takes the stored waker, and it sets `fired` first: not
        // fired, the same task's waker is still there and nothing is to do.
        if self.waiting && same && !self.signal.fired.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        self.signal.task.register(cx.waker());
        if !same {
            self.task = Some(cx.waker().clone());
        }
        if self.waiting {
            if !self.signal.fired.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
        } else {
            // A wake from before this poll is answered by this poll.
            self.signal.fired.store(false, Ordering::Relaxed);
        }
        let result = poll(&mut Context::from_waker(&self.waker));
        self.waiting = result.is_pending();
        result
    }

    /// The next poll goes through, woken or not.
    pub fn open(&mut self) {
        self.waiting = false;
    }
}

impl<F: Future> OnWake<F> {
    pub fn new(inner: F) -> OnWake<F> {
        OnWake { inner: Box::pin(inner), gate: Gate::default() }
    }
}

impl<F> OnWake<F> {
    /// The wrapped future, to change it (a timer's deadline); it is polled
    /// again on the next poll, so that it registers what changed.
    pub fn inner_mut(&mut self) -> Pin<&mut F> {
        self.gate.open();
        self.inner.as_mut()
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let inner = &mut this.inner;
        this.gate.poll_with(cx, |cx| inner.as_mut().poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set (then it wakes nobody:
    /// the test wakes the stored waker itself).
    struct Probe {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            if self.open.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_only_after_its_own_wake() -> Result<(), &'static str> {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let stored = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let probe = Probe { polls: polls.clone(), open: open.clone(), waker: stored.clone() };
        let mut wrapped = Box::pin(OnWake::new(probe));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..100 {
            assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "100 outer polls, one inner poll");
        open.store(true, Ordering::SeqCst);
        assert!(wrapped.as_mut().poll(&mut cx).is_pending(), "not woken yet, so not polled");
        let inner_waker = stored.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or("no waker")?;
        // The task's waker is woken through the wrapper when the inner one is.
        let (task_waker, woken) = counting_waker();
        assert!(wrapped.as_mut().poll(&mut Context::from_waker(&task_waker)).is_pending());
        inner_waker.wake();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(wrapped.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        Ok(())
    }

    #[test]
    fn every_wake_reaches_a_task_that_polls_with_the_same_waker() -> Result<(), &'static str> {
        let stored = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let probe = Probe { polls: Arc::default(), open: Arc::default(), waker: stored.clone() };
        let mut wrapped = Box::pin(OnWake::new(probe));
        let (task_waker, woken) = counting_waker();
        let mut cx = Context::from_waker(&task_waker);
        for round in 1..=3 {
            // Polls without a wake skip the registration; the wake still
            // reaches the task, and the poll after it registers again.
            for _ in 0..3 {
                assert!(wrapped.as_mut().poll(&mut cx).is_pending());
            }
            let inner = stored.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or("no waker")?;
            inner.wake();
            assert_eq!(woken.0.load(Ordering::SeqCst), round, "wake {round} was lost");
        }
        Ok(())
    }

    /// One poll through `gate` of something ready or not; counts the calls
    /// that got through and keeps the waker they were given.
    fn through(
        gate: &mut Gate,
        cx: &mut Context<'_>,
        ready: bool,
        calls: &mut usize,
        given: &mut Option<Waker>,
    ) -> bool {
        gate.poll_with(cx, |inner| {
            *calls += 1;
            *given = Some(inner.waker().clone());
            if ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .is_ready()
    }

    #[test]
    fn a_gate_lets_polls_through_after_a_ready_one_and_after_a_wake() -> Result<(), &'static str> {
        let mut gate = Gate::default();
        let (task_waker, _) = counting_waker();
        let cx = &mut Context::from_waker(&task_waker);
        let (mut calls, mut given) = (0, None);
        // A source with chunks queued is ready poll after poll.
        assert!(through(&mut gate, cx, true, &mut calls, &mut given));
        assert!(through(&mut gate, cx, true, &mut calls, &mut given));
        // Pending once: the polls after it do not reach it until it wakes.
        assert!(!through(&mut gate, cx, false, &mut calls, &mut given));
        assert!(!through(&mut gate, cx, true, &mut calls, &mut given));
        assert!(!through(&mut gate, cx, true, &mut calls, &mut given));
        given.take().ok_or("no waker given")?.wake();
        assert!(through(&mut gate, cx, true, &mut calls, &mut given));
        assert_eq!(calls, 4);
        Ok(())
    }

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Waker, Arc<Count>) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (Waker::from(count.clone()), count)
    }

    #[tokio::test]
    async fn a_cancellation_token_still_ends_it() {
        let token = tokio_util::sync::CancellationToken::new();
        let wrapped = OnWake::new(token.clone().cancelled_owned());
        let waiter = tokio::spawn(wrapped);
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .map_err(|_| "not woken")
            .and_then(|r| r.map_err(|_| "panicked"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
