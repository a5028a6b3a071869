//! The accept loop: a bound on open connections, TLS, the header timeout,
//! HTTP/1.1 (hyper's http1 builder when the first bytes or ALPN say so) and
//! HTTP/2 (hyper-util's auto builder), graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::{BoxError, ClientBody, ResponseBody};
use crate::direct::{ClientSocket, SharedIo, Socket};
use crate::metrics::WorkerLabel;
use crate::proxy::ConnInfo;
use crate::send_timeout::{ConnWrites, SendTimeout};
use crate::wake::OnWake;
use crate::{admin, lean, router, App};

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Clients and browsers: routes and handoff.
    Public,
    /// Operators: health, readiness, metrics.
    Admin,
}

/// Worker threads, each running a single-threaded tokio runtime with its
/// own accept loop on the shared listening socket, as nginx workers share
/// theirs: a connection is accepted by the worker that serves it and stays
/// there with its upstream requests, its timers and its wake-ups. No
/// connection or event crosses threads, so no thread wakes another for it,
/// and a worker busy with its streams gets to `accept` later than an idle
/// one, which balances the load.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    balance: Arc<Balance>,
    /// Ends the workers' event loops (on drop: after the drain).
    stop: CancellationToken,
}

std::thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The worker thread the caller runs on, from 1; 0 off the workers. Pools of
/// upstream connections are kept per worker, as a socket is served by the
/// event loop it was opened on.
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

impl Workers {
    /// Starts `n` worker threads; with 0, connections are served on the
    /// runtime that calls [`accept_loop`].
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        // The workers log where the caller logs, also when that is a
        // subscriber set for this thread only (an embedding, a test).
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        for index in 1..=n {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let dispatch = dispatch.clone();
            std::thread::Builder::new().name(format!("ssegate-worker-{index}")).spawn(move || {
                let _logs = tracing::dispatcher::set_default(&dispatch);
                WORKER.with(|w| w.set(index));
                // Runs the worker's tasks until the proxy stops; the tasks
                // still open then are dropped with the runtime.
                runtime.block_on(stop.cancelled());
            })?;
        }
        let balance = Arc::new(Balance { open: (0..n).map(|_| AtomicUsize::new(0)).collect(), changed: Notify::new() });
        Ok(Workers { handles, balance, stop })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// Connections open on each worker. A worker that holds more than
/// [`Balance::SLACK`] above the least busy one leaves the next connection to
/// the others: which worker wins the race to `accept` is otherwise down to
/// which one the kernel wakes first.
struct Balance {
    open: Vec<AtomicUsize>,
    /// Fires when a count changes.
    changed: Notify,
}

impl Balance {
    const SLACK: usize = 4;

    fn ahead(&self, worker: usize) -> bool {
        let mine = self.open[worker].load(Ordering::Relaxed);
        self.open.iter().any(|o| o.load(Ordering::Relaxed) + Self::SLACK < mine)
    }

    /// Waits until `worker` is not ahead of the others.
    async fn turn(&self, worker: usize) {
        loop {
            let changed = self.changed.notified();
            if !self.ahead(worker) {
                return;
            }
            changed.await;
        }
    }

    /// Takes `worker` out of the balance for good (it has no accept loop):
    /// a count no other worker can be ahead of, so none waits for it.
    fn retire(&self, worker: usize) {
        self.open[worker].store(usize::MAX / 2, Ordering::Relaxed);
        self.changed.notify_waiters();
    }
}

/// A worker's place in the [`Balance`], with its `ssegate_worker_connections`
/// gauge.
#[derive(Clone)]
struct Seat {
    balance: Arc<Balance>,
    worker: usize,
    gauge: Gauge,
}

impl Seat {
    /// Counts a connection on this worker, in the balance and the gauge,
    /// while the value lives.
    fn count(&self) -> Counted {
        self.balance.open[self.worker].fetch_add(1, Ordering::Relaxed);
        self.gauge.inc();
        self.balance.changed.notify_waiters();
        Counted(self.clone())
    }
}

/// A connection counted on its worker.
struct Counted(Seat);

impl Drop for Counted {
    fn drop(&mut self) {
        let seat = &self.0;
        seat.balance.open[seat.worker].fetch_sub(1, Ordering::Relaxed);
        seat.gauge.dec();
        seat.balance.changed.notify_waiters();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts connections until `stop` fires; every connection runs on
/// `tracker`, so that the drain can wait for them. With `workers`, each
/// worker accepts on its own copy of the listening socket and serves what it
/// accepted; without, connections are accepted and served here.
pub async fn accept_loop(
    listener: TcpListener,
    side: Side,
    current: watch::Receiver<Arc<App>>,
    stop: CancellationToken,
    tracker: &TaskTracker,
    workers: Option<&Workers>,
) {
    // The connection bound is fixed at start and shared by the workers; a
    // reload changes the rest.
    let permits = Arc::new(Semaphore::new(current.borrow().config.limits.max_connections));
    let Some(workers) = workers.filter(|w| !w.is_empty()) else {
        return accept(listener, side, current, stop, tracker.clone(), permits, None).await;
    };
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the listening socket could not be shared with the workers");
            return;
        }
    };
    let mut loops = Vec::with_capacity(workers.len());
    for (worker, handle) in workers.handles.iter().enumerate() {
        // A duplicate descriptor of the same socket, registered with the
        // worker's own event loop; whichever worker is free takes the
        // connection, the others find nothing to accept.
        let copy = match listener.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the listening socket could not be shared with a worker");
                workers.balance.retire(worker);
                continue;
            }
        };
        let (current, stop, tracker, permits) = (current.clone(), stop.clone(), tracker.clone(), permits.clone());
        // The metrics outlive reloads: the gauge is taken once.
        let label = WorkerLabel { worker: worker as u32 + 1 };
        let gauge = current.borrow().metrics.worker_connections.get_or_create(&label).clone();
        let seat = Seat { balance: workers.balance.clone(), worker, gauge };
        loops.push(handle.spawn(async move {
            match TcpListener::from_std(copy) {
                Ok(listener) => accept(listener, side, current, stop, tracker, permits, Some(seat)).await,
                Err(e) => {
                    tracing::error!(error = %e, "a worker could not listen");
                    seat.balance.retire(seat.worker);
                }
            }
        }));
    }
    drop(listener);
    for l in loops {
        let _ = l.await;
    }
}

/// The most connections a worker takes from the listen queue in one turn of
/// its event loop.
const ACCEPT_BATCH: usize = 16;

/// One accept loop: waits for its worker's turn, takes a connection slot,
/// accepts, serves the connection on this runtime; then takes up to
/// [`ACCEPT_BATCH`] in all of the connections already queued, each in its
/// worker's turn and with a slot, before the event loop's next turn.
async fn accept(
    listener: TcpListener,
    side: Side,
    current: watch::Receiver<Arc<App>>,
    stop: CancellationToken,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    seat: Option<Seat>,
) {
    let serve = |stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit| {
        let _ = stream.set_nodelay(true);
        let app = current.borrow().clone();
        let tls = if side == Side::Public { app.tls.clone() } else { None };
        let conn = Conn { peer, side, tls, app, current: current.clone(), stop: stop.clone() };
        let span = tracing::debug_span!("conn", client = %peer);
        let counted = seat.as_ref().map(Seat::count);
        tracker.spawn(Box::pin(
            async move {
                let _counted = counted;
                conn.app.metrics.connections_open.inc();
                conn.serve(stream).await;
                conn.app.metrics.connections_open.dec();
                drop(permit);
            }
            .instrument(span),
        ));
    };
    loop {
        // The turn first: a worker that waits for the others holds no slot
        // they could use.
        if let Some(seat) = &seat {
            tokio::select! {
                _ = seat.balance.turn(seat.worker) => {}
                _ = stop.cancelled() => break,
            }
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        serve(stream, peer, permit);
        // The connections queued meanwhile, a few at a time: in a burst
        // they wait in the listen queue, and one per turn leaves the worker
        // polling its event loop for each. Each of them waits for the
        // turn and a slot as the first did. An accept error ends the batch:
        // one that lasts (EMFILE) comes again at the `accept` above, which
        // reports it.
        for _ in 1..ACCEPT_BATCH {
            if stop.is_cancelled() || seat.as_ref().is_some_and(|s| s.balance.ahead(s.worker)) {
                break;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else { break };
            let Some(Ok((stream, peer))) = queued(&listener).await else { break };
            serve(stream, peer, permit);
        }
        // Then the new connections' requests and the open streams' events
        // are served before more are taken, as nginx without `multi_accept`
        // takes one per turn: a burst does not hold back the streams
        // already open.
        tokio::task::yield_now().await;
    }
}

/// A connection already in `listener`'s queue, without waiting for one.
async fn queued(listener: &TcpListener) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
    std::future::poll_fn(|cx| match listener.poll_accept(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

fn builder(app: &App) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(app.config.limits.header_timeout).max_buf_size(MAX_BUF);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    b
}

/// What a connection speaks, as far as is known before hyper reads it.
#[derive(Clone, Copy, Debug)]
enum Proto {
    Http1,
    /// HTTP/2 (its preface came, or TLS agreed on `h2`), or not told apart
    /// (TLS without ALPN): hyper-util's auto builder decides, and
    /// [`Conn::drive`] watches for the connection being idle.
    Either,
}

/// The largest request head hyper buffers.
const MAX_BUF: usize = 64 * 1024;

/// The first read from a plain-TCP client, before hyper reads: a browser's
/// request head fits, a longer one's rest is read by hyper.
const FIRST_READ: usize = 4096;

/// HTTP/2 with prior knowledge starts with this (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A plain-TCP client's first bytes: once the socket is readable (nothing
/// is allocated for a client that sends nothing), one read of up to
/// [`FIRST_READ`], and more while what came is a strict beginning of the
/// HTTP/2 preface, which hyper-util would otherwise wait for with no
/// timeout. `None` when the client closed first.
async fn first_bytes(stream: &TcpStream) -> std::io::Result<Option<BytesMut>> {
    let mut first = BytesMut::new();
    loop {
        stream.readable().await?;
        if first.capacity() == first.len() {
            first.reserve(FIRST_READ);
        }
        // Less than there was room for: the socket is empty. Its readiness
        // is cleared (`WouldBlock` here), so that the next read (the lean
        // path's watch, or hyper's) waits for the socket instead of costing
        // a `recv` that finds nothing, as `SharedIo` reads.
        let room = first.capacity() - first.len();
        let mut drained = false;
        let read = stream.try_io(Interest::READABLE, || {
            let n = stream.try_read_buf(&mut first)?;
            if n > 0 && n < room {
                drained = true;
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match read {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(_) if drained => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let n = first.len().min(H2_PREFACE.len());
        if first.len() >= H2_PREFACE.len() || first[..n] != H2_PREFACE[..n] {
            return Ok(Some(first));
        }
    }
}

/// The next tick of `check`; never without one.
async fn tick(check: &mut Option<tokio::time::Interval>) {
    match check {
        Some(check) => {
            check.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A connection's requests: how many came, and how many are open (their
/// responses, bodies included, not over yet; counted where [`Conn::drive`]
/// watches for an idle connection).
#[derive(Default)]
struct Activity {
    requests: AtomicUsize,
    open: AtomicUsize,
}

/// One open request of an [`Activity`], until its response body is dropped
/// (sent, reset by the client, or the connection gone).
struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn new(activity: &Arc<Activity>) -> OpenRequest {
        activity.open.fetch_add(1, Ordering::Relaxed);
        OpenRequest(activity.clone())
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its request's [`OpenRequest`], if counted.
struct Tracked {
    body: crate::body::ResponseBody,
    _open: Option<OpenRequest>,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

struct Conn {
    peer: SocketAddr,
    side: Side,
    tls: Option<TlsAcceptor>,
    /// The app generation the connection started under (its timeouts).
    app: Arc<App>,
    /// The newest generation: each request uses the one current when it arrives.
    current: watch::Receiver<Arc<App>>,
    /// Fires on SIGINT/SIGTERM: a connection that has not sent a request
    /// yet is closed at once instead of holding up the drain.
    stop: CancellationToken,
}

impl Conn {
    /// Serves HTTP on `io` until the client is done or, after the stop
    /// signal, until its open requests are: hyper's graceful shutdown. A
    /// connection that never got a whole request (half a head, or a spare
    /// connection that sent only a byte) is closed 100 ms after the signal,
    /// as hyper would wait for its head.
    ///
    /// A connection that is or may be HTTP/2 ([`Proto::Either`]) is also
    /// shut down once it has had no request open (response bodies included)
    /// for `limits.header_timeout` (checked every `header_timeout`, so after
    /// up to twice that), and dropped when it is still there, with nothing
    /// open, new or written, two or three checks later (or at the stop
    /// signal, with nothing open): hyper times only
    /// HTTP/1.1's wait for the next request head, and an HTTP/2 client that
    /// answers pings (or a TLS client without ALPN that sends nothing) would
    /// otherwise hold its connection, and one of `limits.max_connections`,
    /// for good.
    ///
    /// `socket` is the client's plain-TCP socket, which HTTP/1.1 event
    /// streams write their chunks to (`crate::direct`); the requests whose
    /// responses hyper writes get `writes`, which the connection's send
    /// timeout keeps.
    async fn drive<I>(
        &self,
        io: I,
        proto: Proto,
        socket: Option<Arc<Socket>>,
        writes: ConnWrites,
        answer: Option<http::Response<ResponseBody>>,
    ) -> Result<(), BoxError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let info = ConnInfo { peer: self.peer, tls: self.tls.is_some() };
        let current = self.current.clone();
        let side = self.side;
        let activity = Arc::new(Activity::default());
        let for_requests = writes.clone();
        let counted = activity.clone();
        // Only a connection whose idle time this proxy watches counts its
        // open requests: HTTP/2, and TLS without ALPN, whose version check
        // in hyper-util has no timeout of its own. (Should that be HTTP/1.1
        // with a head under way at the second idle check, the head is cut
        // short.)
        let watch_idle = matches!(proto, Proto::Either);
        // The answer the lean path made for the first request (which hyper
        // reads again), if any.
        let answer = std::sync::Mutex::new(answer);
        let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let app = current.borrow().clone();
            // hyper sends these responses' bodies chunked (see `crate::direct`).
            match &socket {
                Some(socket) if req.version() == http::Version::HTTP_11 && req.method() != http::Method::HEAD => {
                    req.extensions_mut().insert(ClientSocket(socket.clone()));
                }
                _ => {
                    req.extensions_mut().insert(for_requests.clone());
                }
            }
            counted.requests.fetch_add(1, Ordering::Relaxed);
            let open = watch_idle.then(|| OpenRequest::new(&counted));
            let answered = answer.lock().ok().and_then(|mut a| a.take());
            // Boxed: hyper keeps the slot for the request future for as long
            // as the connection lives; a stream is idle in it for minutes.
            Box::pin(async move {
                let resp = match (answered, side) {
                    (Some(resp), _) => resp,
                    (None, Side::Public) => router::handle(app, req.map(ClientBody::Left), info).await,
                    (None, Side::Admin) => admin::handle(&app, req).await,
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked { body, _open: open }))
            })
        });
        match proto {
            Proto::Http1 => {
                let mut h1 = hyper::server::conn::http1::Builder::new();
                h1.timer(TokioTimer::new())
                    .header_read_timeout(self.app.config.limits.header_timeout)
                    .max_buf_size(MAX_BUF)
                    .max_header_size(MAX_BUF);
                let conn = h1.serve_connection(io, svc);
                tokio::pin!(conn);
                self.until_done(conn, |c| c.graceful_shutdown(), &activity, None).await
            }
            Proto::Either => {
                // Boxed: the auto builder's connection is sized for HTTP/2,
                // which HTTP/1.1 connections need not carry.
                // Built here, not per connection: most connections are HTTP/1.1.
                let auto = builder(&self.app);
                let mut conn = Box::pin(auto.serve_connection(io, svc));
                self.until_done(conn.as_mut(), |c| c.graceful_shutdown(), &activity, watch_idle.then_some(&writes))
                    .await
            }
        }
    }

    /// Runs `conn` until it is done; on the stop signal, or when watched
    /// (`idle`: the connection's write count) and idle too long, `shutdown`
    /// starts its graceful shutdown (see [`Conn::drive`]).
    async fn until_done<F, E>(
        &self,
        mut conn: Pin<&mut F>,
        shutdown: impl FnOnce(Pin<&mut F>),
        activity: &Activity,
        idle: Option<&ConnWrites>,
    ) -> Result<(), BoxError>
    where
        F: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        let mut shutdown = Some(shutdown);
        // Polled only when the signal fires, not on every wake of the connection.
        let mut stop = OnWake::new(self.stop.clone().cancelled_owned());
        let period = self.app.config.limits.header_timeout;
        let mut check = idle.map(|_| {
            let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            check
        });
        // The request and write counts at the last check, when no request
        // was open then.
        let mut idle_since: Option<(usize, u64)> = None;
        let mut stopped = false;
        loop {
            tokio::select! {
                biased;
                r = conn.as_mut() => return r.map_err(Into::into),
                _ = &mut stop, if !stopped => {
                    stopped = true;
                    if shutdown.is_some() {
                        break;
                    }
                    // After the goodbye: nothing open, nothing to wait for;
                    // else the checks below end the connection.
                    if activity.open.load(Ordering::Relaxed) == 0 {
                        return Ok(());
                    }
                }
                _ = tick(&mut check), if idle.is_some() => {
                    let now = (
                        activity.requests.load(Ordering::Relaxed),
                        idle.map_or(0, ConnWrites::moved),
                    );
                    if activity.open.load(Ordering::Relaxed) > 0 {
                        idle_since = None;
                    } else if shutdown.is_some() && idle_since.is_some_and(|(requests, _)| requests == now.0) {
                        // Nothing open at two checks and nothing came in
                        // between: idle for a whole period at least. The
                        // goodbye: HTTP/2 then waits for the client's answer
                        // to a ping, and serves whole a request the client
                        // sent before the goodbye reached it.
                        if let Some(shutdown) = shutdown.take() {
                            shutdown(conn.as_mut());
                        }
                        idle_since = Some(now);
                    } else if shutdown.is_none() && idle_since == Some(now) {
                        // After the goodbye, a whole period with nothing open,
                        // nothing new and nothing written (the end of a
                        // response hyper let go of may still be going out to a
                        // slow client): the client did not close, it is dropped.
                        return Ok(());
                    } else {
                        idle_since = Some(now);
                    }
                }
            }
        }
        if let Some(shutdown) = shutdown.take() {
            shutdown(conn.as_mut());
        }
        let abandon = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if activity.requests.load(Ordering::Relaxed) > 0 {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = conn.as_mut() => r.map_err(Into::into),
            _ = abandon => Ok(()),
        }
    }

    /// The TLS handshake, then HTTP; `None` when there was no connection
    /// to serve (the handshake failed, timed out, or the proxy stopped).
    async fn serve_tls(&self, acceptor: &TlsAcceptor, stream: TcpStream) -> Option<Result<(), BoxError>> {
        let header_timeout = self.app.config.limits.header_timeout;
        let handshake = tokio::select! {
            r = tokio::time::timeout(header_timeout, acceptor.accept(stream)) => r,
            _ = self.stop.cancelled() => return None,
        };
        match handshake {
            Ok(Ok(tls)) => {
                let proto = match tls.get_ref().1.alpn_protocol() {
                    Some(b"http/1.1") => Proto::Http1,
                    _ => Proto::Either,
                };
                let writes = ConnWrites::default();
                let io = SendTimeout::new(tls, self.app.config.limits.send_timeout, writes.clone());
                Some(self.drive(TokioIo::new(io), proto, None, writes, None).await)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                None
            }
        }
    }

    /// The first bytes of a plain-TCP client's next request (see
    /// [`first_bytes`]), within `limits.header_timeout`; `None` when there
    /// is no request to serve.
    async fn next_request(&self, stream: &TcpStream) -> Option<BytesMut> {
        let header_timeout = self.app.config.limits.header_timeout;
        let first = tokio::select! {
            r = tokio::time::timeout(header_timeout, first_bytes(stream)) => r,
            _ = self.stop.cancelled() => return None,
        };
        match first {
            Ok(Ok(Some(first))) => return Some(first),
            Ok(Ok(None)) => tracing::debug!("client closed before sending a request"),
            Ok(Err(e)) => tracing::debug!(error = %e, "reading the request failed"),
            Err(_) => tracing::debug!("no request within header_timeout"),
        }
        None
    }

    async fn serve(&self, stream: TcpStream) {
        let result = match &self.tls {
            // Boxed: a TLS connection's state (rustls, the handshake) is
            // large, and a plain connection's future would be sized for it.
            Some(acceptor) => match Box::pin(self.serve_tls(acceptor, stream)).await {
                Some(result) => result,
                None => return,
            },
            None => {
                // A client that connects and sends nothing, or only part of
                // the HTTP/2 preface, is dropped here after header_timeout.
                // hyper's own header timeout runs from its first poll, so a
                // head whose first byte came just before this one ran out
                // gets up to twice as long. What is read here (usually the
                // whole request head) goes to the lean path or to hyper
                // first, which saves the `recv` a peek would cost.
                let Some(first) = self.next_request(&stream).await else { return };
                let proto = if first.starts_with(H2_PREFACE) { Proto::Either } else { Proto::Http1 };
                let writes = ConnWrites::default();
                let socket = Socket::new(stream, writes.clone());
                let mut first = first.freeze();
                let mut answer = None;
                // Event streams on the lean path (`crate::lean`), for as
                // long as the client's requests are for it; then hyper.
                let plain_public = matches!(proto, Proto::Http1) && self.side == Side::Public;
                while let Some((req, len)) = plain_public.then(|| lean::request(&first)).flatten() {
                    // What came after the request (the next ones, pipelined),
                    // copied: the read buffer is not held for the stream's life.
                    let rest = Bytes::copy_from_slice(&first[len..]);
                    let app = self.current.borrow().clone();
                    let info = ConnInfo { peer: self.peer, tls: false };
                    match lean::serve(app, req, std::mem::take(&mut first), &socket, info).await {
                        lean::Served::Done(ahead) => {
                            if self.stop.is_cancelled() {
                                return;
                            }
                            first = if ahead.is_empty() { rest } else { [rest, ahead].concat().into() };
                            if first.is_empty() {
                                // Nothing came after the request: the next
                                // one is waited for here, so that a client
                                // that leaves costs no hyper connection.
                                let Some(next) = self.next_request(socket.tcp()).await else { return };
                                first = next.freeze();
                            }
                        }
                        lean::Served::Fallback(resp, read) => {
                            first = read;
                            answer = Some(resp);
                            break;
                        }
                        lean::Served::Closed => return,
                    }
                }
                let io = SendTimeout::new(
                    SharedIo::new(socket.clone(), first),
                    self.app.config.limits.send_timeout,
                    writes.clone(),
                );
                self.drive(TokioIo::new(io), proto, Some(socket), writes, answer).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;

    fn balance(open: &[usize]) -> Arc<Balance> {
        Arc::new(Balance { open: open.iter().map(|&n| AtomicUsize::new(n)).collect(), changed: Notify::new() })
    }

    #[test]
    fn a_worker_is_ahead_only_past_the_slack() {
        let b = balance(&[Balance::SLACK, 0]);
        assert!(!b.ahead(0), "within the slack");
        assert!(!b.ahead(1), "the least busy one is never ahead");
        let b = balance(&[Balance::SLACK + 1, 0, 9]);
        assert!(b.ahead(0));
        assert!(!b.ahead(1));
        assert!(b.ahead(2));
    }

    #[tokio::test]
    async fn a_worker_ahead_waits_until_the_others_catch_up() {
        let b = balance(&[Balance::SLACK + 2, 0]);
        let mut turn = std::pin::pin!(b.turn(0));
        assert!((&mut turn).now_or_never().is_none(), "worker 1 went on while ahead");
        let seat = Seat { balance: b.clone(), worker: 1, gauge: Gauge::default() };
        let mut counted = vec![seat.count()];
        assert!((&mut turn).now_or_never().is_none(), "worker 1 went on while still ahead");
        counted.push(seat.count());
        let went_on = tokio::time::timeout(Duration::from_secs(5), turn).await;
        assert!(went_on.is_ok(), "worker 1 was not let on once worker 2 caught up");
        drop(counted);
        assert_eq!(b.open[1].load(Ordering::Relaxed), 0, "closed connections stay counted");
    }

    #[tokio::test]
    async fn a_worker_without_an_accept_loop_holds_no_one_back() {
        let b = balance(&[Balance::SLACK + 2, 0]);
        let mut turn = std::pin::pin!(b.turn(0));
        assert!((&mut turn).now_or_never().is_none(), "worker 1 went on while ahead");
        b.retire(1);
        let went_on = tokio::time::timeout(Duration::from_secs(5), turn).await;
        assert!(went_on.is_ok(), "worker 1 waited for a worker that accepts nothing");
        assert!(!b.ahead(0));
    }
}
