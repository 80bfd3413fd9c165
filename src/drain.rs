//! Draining the old generation: stop accepting, let in-flight connections
//! finish, exit when they are done or at a deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{Notify, watch};

/// Tracks in-flight connections and signals the start of a drain.
///
/// Clone it into every connection task. The accept loop selects on
/// [`draining`](Self::draining) and stops accepting when it resolves;
/// each connection holds a [`DrainGuard`] from [`guard`](Self::guard);
/// after the upgrade, [`wait`](Self::wait) returns when every guard is
/// dropped or the deadline passes.
///
/// ```no_run
/// # async fn serve(_: tokio::net::TcpStream, _: handover::Drain) {}
/// # async fn example(listener: tokio::net::TcpListener, drain: handover::Drain) {
/// loop {
///     tokio::select! {
///         accepted = listener.accept() => {
///             let Ok((stream, _)) = accepted else { continue };
///             let guard = drain.guard();
///             let drain = drain.clone();
///             tokio::spawn(async move {
///                 serve(stream, drain).await;
///                 drop(guard);
///             });
///         }
///         _ = drain.draining() => break,
///     }
/// }
/// drop(listener); // stop accepting: the successor takes every new connection
/// let report = drain.wait(std::time::Duration::from_secs(30)).await;
/// # let _ = report;
/// # }
/// # fn main() { let _ = example; }
/// ```
///
/// At a stop ([`is_stop`](Self::is_stop), from
/// [`Handover::stop`](crate::Handover::stop)) there is no successor: accept
/// what is queued (without waiting, until `WouldBlock`) before dropping the
/// listener, or the kernel resets it with the socket; and an idle
/// keep-alive connection need not be kept for its next request.
///
/// [`Handover::drain`](crate::Handover::drain) gives the generation's own
/// drain, which also feeds [`Handover::stats`](crate::Handover::stats).
///
/// For HTTP, [`serve::Server`](crate::serve::Server) (feature `http`) does
/// all of this, with the lame-duck rules HTTP/1.1 keep-alive needs; an
/// upgrade or a stop starts the drain through
/// [`serve::Triggers`](crate::serve::Triggers).
#[derive(Clone)]
pub struct Drain {
    /// Connections in flight: changes with every guard, waited on only by
    /// [`wait`](Self::wait), which is told when it reaches zero. An atomic
    /// count, so that a guard costs one atomic operation: 10,000
    /// connections handed over at once drop 10,000 guards.
    inner: Arc<Count>,
    /// Whether the drain started, and as what: changes at most twice,
    /// watched by every connection. Apart from the count, so that a guard
    /// taken or dropped does not wake every connection waiting for the drain
    /// (10,000 idle connections made that quadratic).
    started: Arc<watch::Sender<Started>>,
    observer: Option<Weak<dyn DrainObserver>>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("draining", &self.is_draining())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// Whether a drain started, and as what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Started {
    No,
    /// After a handover, or for a reason of the application's.
    Drain,
    /// A real stop: no successor takes over.
    Stop,
}

/// Told when a drain's wait ends (the generation records it as the drain
/// phase of its upgrade). Drain knows nothing else of whoever observes it.
pub(crate) trait DrainObserver: Send + Sync {
    /// The wait of the drain ended with `report`.
    fn drained(&self, report: &DrainReport);
}

/// The count of connections in flight.
#[derive(Debug, Default)]
struct Count {
    n: AtomicUsize,
    /// Notified each time the count reaches zero.
    zero: Notify,
}

/// Marks one connection in flight until dropped.
#[derive(Debug)]
#[must_use = "the connection counts as in flight only while the guard lives"]
pub struct DrainGuard {
    inner: Arc<Count>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.inner.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.zero.notify_waiters();
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still in flight at the deadline (0: all finished).
    pub remaining: usize,
    /// How long the wait took.
    pub elapsed: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain that has not started, with nothing in flight.
    pub fn new() -> Self {
        Drain {
            inner: Arc::new(Count::default()),
            started: Arc::new(watch::Sender::new(Started::No)),
            observer: None,
        }
    }

    /// A drain whose end is reported to `observer`.
    pub(crate) fn observed(observer: Weak<dyn DrainObserver>) -> Self {
        Drain {
            observer: Some(observer),
            ..Self::new()
        }
    }

    /// Starts draining: [`draining`](Self::draining) resolves everywhere.
    pub fn start(&self) {
        self.started.send_if_modified(|s| {
            let was = *s;
            *s = was.max(Started::Drain);
            *s != was
        });
    }

    /// Starts draining as a stop: no successor takes over. Beside what
    /// [`start`](Self::start) does, [`is_stop`](Self::is_stop) tells
    /// connections and accept loops so, and
    /// [`serve::Server`](crate::serve::Server) (feature `http`) takes the
    /// connections already queued on its listeners before it closes them,
    /// and closes idle HTTP/1.1 keep-alive connections instead of waiting
    /// for their next request. [`Handover::stop`](crate::Handover::stop)
    /// calls it; call it yourself for a drain of your own.
    pub fn start_stop(&self) {
        self.started.send_if_modified(|s| {
            let was = *s;
            *s = Started::Stop;
            *s != was
        });
    }

    /// Whether the drain has started. Connections use it to answer with
    /// `Connection: close` (lame duck) instead of closing idle keep-alive
    /// connections, which would fail a request already on the wire.
    pub fn is_draining(&self) -> bool {
        *self.started.borrow() != Started::No
    }

    /// Whether the drain is a stop ([`start_stop`](Self::start_stop)): no
    /// successor takes over, so there is nobody to leave queued or idle
    /// connections to.
    pub fn is_stop(&self) -> bool {
        *self.started.borrow() == Started::Stop
    }

    /// Resolves when the drain starts.
    pub async fn draining(&self) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|started| *started != Started::No).await;
    }

    /// Resolves when the drain starts as a stop; never for another drain
    /// (unless it becomes a stop).
    #[cfg_attr(not(feature = "http"), allow(dead_code))] // the serving layer's
    pub(crate) async fn stopping(&self) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|started| *started == Started::Stop).await;
    }

    /// Counts one connection as in flight until the guard is dropped.
    pub fn guard(&self) -> DrainGuard {
        self.inner.n.fetch_add(1, Ordering::AcqRel);
        DrainGuard {
            inner: self.inner.clone(),
        }
    }

    /// Connections in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.n.load(Ordering::Acquire)
    }

    /// Waits until no connection is in flight, or `timeout` passes.
    pub async fn wait(&self, timeout: Duration) -> DrainReport {
        let start = Instant::now();
        let zero = async {
            loop {
                // Registered before the count is read: a guard dropped in
                // between still wakes this wait.
                let notified = self.inner.zero.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, zero).await;
        let report = DrainReport {
            remaining: self.in_flight(),
            elapsed: start.elapsed(),
        };
        if let Some(o) = self.observer.as_ref().and_then(Weak::upgrade) {
            o.drained(&report);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_when_guards_drop() {
        let d = Drain::new();
        let g1 = d.guard();
        let g2 = d.guard();
        assert_eq!(d.in_flight(), 2);
        assert!(!d.is_draining());
        d.start();
        assert!(d.is_draining());
        assert!(!d.is_stop());
        d.draining().await;
        let t = tokio::spawn({
            let d = d.clone();
            async move { d.wait(Duration::from_secs(10)).await }
        });
        drop(g1);
        drop(g2);
        let r = t.await.unwrap();
        assert_eq!(r.remaining, 0);
    }

    #[test]
    fn a_stop_is_a_drain_that_says_so() {
        // No I/O driver: it opens no fd (unit tests in src/migrate count
        // this process's fds).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let d = Drain::new();
            d.start_stop();
            assert!(d.is_draining() && d.is_stop());
            d.draining().await;
            d.stopping().await;
            d.start(); // a later plain start leaves it a stop
            assert!(d.is_stop());
            let plain = Drain::new();
            plain.start();
            assert!(!plain.is_stop());
            tokio::select! {
                biased;
                _ = plain.stopping() => panic!("a plain drain is no stop"),
                _ = std::future::ready(()) => {}
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn wait_stops_at_the_deadline() {
        let d = Drain::new();
        let _g = d.guard();
        let r = d.wait(Duration::from_secs(5)).await;
        assert_eq!(r.remaining, 1);
        assert!(r.elapsed >= Duration::from_secs(5), "{:?}", r.elapsed);
    }
}
