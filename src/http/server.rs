//! The accept loop: `axum::serve` with the limits it does not set.
//!
//! - **Idle connections are closed.** `axum::serve` gives hyper no timer,
//!   and nothing closes a connection that sends nothing (or half a request
//!   line, or an HTTP/2 preface and then silence): with no token at all, a
//!   client could hold connections, and file descriptors, for ever. Here a
//!   connection with no request in flight (its response body included) for
//!   [`IDLE_TIMEOUT`] is shut down gracefully, and dropped if it has not
//!   closed [`IDLE_TIMEOUT`] later; hyper's own HTTP/1 header read timeout
//!   is set to the same.
//! - **Connection cap.** At most [`max_connections`] connections are served
//!   at once, leaving descriptors for the database and the data dir; further
//!   connections wait in the kernel's accept queue (and, idle ones being
//!   closed, a crowd of silent clients holds the cap for at most twice the
//!   idle timeout).
//!
//! Graceful shutdown is as in `axum::serve`: on the signal, accepting stops,
//! every connection finishes its request in flight and closes, and this
//! returns once they all have (a connection with nothing in flight that
//! does not close within [`IDLE_TIMEOUT`] of being asked is dropped).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// What a connection is doing: requests in flight, and when it last had one.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.last.lock().expect("activity lock").elapsed()
    }
}

/// A request in flight until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().expect("activity lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in flight while it is sent.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long a connection may go without a request in flight (and how long
/// a client has to send a request's headers) before it is closed; so also
/// how long an idle keep-alive connection stays open (hyper's default
/// header timeout; clients that pool connections longer reconnect).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once: the process's descriptor limit less room
/// for the database, the data dir and the logs.
pub fn max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur as usize
    } else {
        1024
    };
    soft.saturating_sub(256).clamp(64, 16_384)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(max_connections()));
    let (signal_tx, signal_rx) = watch::channel(());
    let (close_tx, close_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let service = TowerToHyperService::new(tower::service_fn({
            let (router, activity) = (router.clone(), activity.clone());
            move |req: Request<Incoming>| {
                let in_flight = activity.begin();
                let router = router.clone();
                async move {
                    let response = router.oneshot(req.map(Body::new)).await?;
                    Ok::<_, std::convert::Infallible>(response.map(|inner| {
                        Body::new(Tracked {
                            inner,
                            _in_flight: in_flight,
                        })
                    }))
                }
            }
        }));
        let mut signal = signal_rx.clone();
        let close = close_rx.clone();
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            // Asked to close (idle, or shutting down) since this instant.
            let mut closing: Option<Instant> = None;
            let mut check = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = signal.changed(), if closing.is_none() => {
                        closing = Some(Instant::now());
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = check.tick() => match closing {
                        // Nothing in flight, and the peer does not close
                        // (a half-sent request, an unanswered GOAWAY): drop it.
                        Some(since)
                            if since.elapsed() >= IDLE_TIMEOUT
                                && activity.idle_for() > Duration::ZERO => break,
                        Some(_) => {}
                        None if activity.idle_for() >= IDLE_TIMEOUT => {
                            closing = Some(Instant::now());
                            conn.as_mut().graceful_shutdown();
                        }
                        None => {}
                    },
                }
            }
            drop((close, slot));
        });
    }
    drop(listener);
    let _ = signal_tx.send(());
    drop(close_rx);
    close_tx.closed().await;
}
