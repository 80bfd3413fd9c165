//! What an accept loop does when `accept` fails.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// The first delay after a failed `accept`.
const FIRST: Duration = Duration::from_millis(5);
/// The longest delay.
const MAX: Duration = Duration::from_secs(1);
/// At most one log line per this period.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Backs an accept loop off after an error, as Go's `net/http` does: 5 ms,
/// doubling to at most 1 s, reset by the next successful accept. Errors are
/// logged (`tracing` warn) at most once a second, with the count of those
/// not logged since.
///
/// Without it a loop at the fd limit (`EMFILE`, `ENFILE`) spins a core: the
/// connection stays in the accept queue, so `accept` fails again at once,
/// and every failure logs a line. Errors that concern only the connection
/// being accepted (`ECONNABORTED`, `ECONNRESET`, `EPROTO`, `EPERM`) are not
/// backed off: the next connection may well succeed.
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener) {
/// let mut backoff = handover::serve::AcceptBackoff::new();
/// loop {
///     match listener.accept().await {
///         Ok((stream, _)) => {
///             backoff.reset();
///             # drop(stream);
///             // serve stream …
///         }
///         Err(e) => backoff.wait(&e).await,
///     }
/// }
/// # }
/// # fn main() { let _ = example; }
/// ```
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl AcceptBackoff {
    /// A backoff that has seen no error.
    pub fn new() -> Self {
        AcceptBackoff {
            delay: Duration::ZERO,
            last_log: None,
            unlogged: 0,
        }
    }

    /// After a successful accept: the next error waits 5 ms again.
    pub fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// How long to wait after `error` (zero for an error of one connection),
    /// and the delay of the next one. Does not log.
    pub(crate) fn next_delay(&mut self, error: &io::Error) -> Duration {
        if is_connection_error(error) {
            return Duration::ZERO;
        }
        self.delay = if self.delay.is_zero() {
            FIRST
        } else {
            (self.delay * 2).min(MAX)
        };
        self.delay
    }

    /// Logs `error` (rate-limited) and waits as long as
    /// the policy above says.
    pub async fn wait(&mut self, error: &io::Error) {
        let delay = self.next_delay(error);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                %error,
                retry_in_ms = delay.as_millis() as u64,
                unlogged = self.unlogged,
                "accept failed",
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

/// Errors about the one connection being accepted, not about the listener
/// or the process.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::PermissionDenied
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_5ms_to_1s_and_resets() {
        let mut b = AcceptBackoff::new();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let ms: Vec<u128> = (0..10).map(|_| b.next_delay(&emfile).as_millis()).collect();
        assert_eq!(ms, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(&emfile), FIRST);
    }

    #[test]
    fn errors_of_one_connection_do_not_wait() {
        let mut b = AcceptBackoff::new();
        for errno in [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EPROTO,
            libc::EPERM,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(b.next_delay(&e), Duration::ZERO, "{e}");
        }
        let e = io::Error::from_raw_os_error(libc::ENFILE);
        assert_eq!(b.next_delay(&e), FIRST);
    }

    #[test]
    fn wait_sleeps_the_delay() {
        // Time only, paused: no I/O driver, so no fd is opened (unit tests in
        // src/migrate count this process's fds).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut b = AcceptBackoff::new();
            let e = io::Error::from_raw_os_error(libc::EMFILE);
            let t = Instant::now();
            for _ in 0..3 {
                b.wait(&e).await;
            }
            assert_eq!(t.elapsed(), Duration::from_millis(5 + 10 + 20));
        });
    }
}
