//! The accept loop in front of the axum router (it replaces `axum::serve`, which gives hyper no
//! timer): one hyper HTTP/1.1 connection per accepted socket, with
//!
//! - a header-read timeout (`--header-read-timeout-ms`): hyper closes a connection whose request
//!   head is not complete in time (slow loris), without an answer. Hyper's timer also runs while
//!   a kept-alive connection waits for its next request, so it bounds idle time too;
//! - an idle keep-alive timeout (`--keep-alive-idle-timeout-ms`, 0 = no keep-alive): a
//!   connection that has no request in the handler and has moved no byte for that long is
//!   closed (an idle one at once; one mid-head is left to the header timer);
//! - a connection limit (`--max-connections`): with that many connections open, the loop stops
//!   accepting, so new connections **wait** in the kernel's listen backlog until one closes
//!   (they are not refused; beyond the backlog the kernel drops their SYNs and clients retry);
//! - graceful close: once `stop` resolves the listener closes, every connection is told to
//!   finish its request in progress and close (idle ones close at once), and [`serve`] returns
//!   when the last one has.
//!
//! The body-read timeout (`--body-read-timeout-ms`) is the classify handler's: it alone reads
//! bodies (408 `body_timeout`, see `http::classify`).

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Connection-level limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Longest time to receive a request head (and, in hyper, to wait for the next one).
    pub header_read_timeout: Duration,
    /// Longest idle time of a kept-alive connection; zero turns keep-alive off.
    pub keep_alive_idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: u32,
}

/// Serves `app` on `listener` until `stop` resolves, then closes gracefully (see the module
/// documentation) and returns once every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let (close_tx, close_rx) = watch::channel(false);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(!limits.keep_alive_idle_timeout.is_zero());
    let mut saturated = false;
    tokio::pin!(stop);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !saturated {
                    saturated = true;
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait in the listen backlog"
                    );
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                }
            }
        };
        let stream = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    handle_accept_error(e).await;
                    continue;
                }
            },
        };
        if permits.available_permits() > 0 {
            saturated = false;
        }
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            inner: stream,
            activity: activity.clone(),
        });
        let service = {
            let activity = activity.clone();
            let app = app.clone();
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let busy = Busy::enter(activity.clone());
                let answer = app.clone().oneshot(req);
                async move {
                    let response = answer.await;
                    drop(busy);
                    response
                }
            })
        };
        let conn = builder.serve_connection(io, service);
        let mut close_rx = close_rx.clone();
        let idle = limits.keep_alive_idle_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(conn);
            let idle_timer = async {
                if idle.is_zero() {
                    std::future::pending::<()>().await
                }
                activity.idle_for(idle).await
            };
            tokio::pin!(idle_timer);
            let closing = async move {
                let _ = close_rx.wait_for(|closing| *closing).await;
            };
            tokio::pin!(closing);
            let mut told = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut idle_timer, if !told => {
                        tracing::trace!("idle keep-alive connection: closing");
                        conn.as_mut().graceful_shutdown();
                        told = true;
                    }
                    _ = &mut closing, if !told => {
                        conn.as_mut().graceful_shutdown();
                        told = true;
                    }
                }
            }
        });
    }
    drop(listener);
    close_tx.send_replace(true);
    // Every connection task holds a permit until its connection has closed.
    let _all = permits
        .acquire_many(limits.max_connections)
        .await
        .expect("the semaphore is never closed");
    Ok(())
}

/// As `axum::serve` (and hyper 0.14's server): errors of one connection are ignored; others
/// (e.g. EMFILE, out of file descriptors) are logged and accepting pauses for a second.
async fn handle_accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error: pausing for 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What a connection did last: when a byte last moved either way (or a request left the
/// handler), and how many requests are in the handler now.
struct Activity {
    epoch: Instant,
    last_nanos: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_nanos: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let nanos = self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }

    /// Resolves once no request is in the handler and nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() < deadline {
                tokio::time::sleep_until(deadline.into()).await;
            } else if self.busy.load(Ordering::SeqCst) == 0 {
                return;
            } else {
                // A request is being handled (e.g. waiting for the model): look again later;
                // its end counts as activity.
                tokio::time::sleep(idle).await;
            }
        }
    }
}

/// Counts a request in the handler; its end is activity.
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP stream that records when bytes move.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
