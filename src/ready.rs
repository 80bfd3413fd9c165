//! Readiness over the channel: the successor reports ready with one byte;
//! the old generation waits for it, for the successor's exit (pidfd), or for
//! the deadline, and kills and reaps a successor that failed.
//!
//! The channel is a close-on-exec `AF_UNIX` stream pair rather than a pipe:
//! `send(MSG_NOSIGNAL)` makes a vanished peer an `EPIPE` error instead of a
//! `SIGPIPE`, whatever the application's signal dispositions. The old
//! generation keeps its end open until it exits, so the successor reads EOF
//! exactly when its predecessor is gone.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::error::UpgradeError;
use crate::spawn::{self, Child};
use crate::sys;

/// The one message of the channel: "ready".
pub(crate) const MSG_READY: u8 = b'R';

/// How long an EOF on the channel may precede the successor's exit before
/// it counts as "closed without ready" rather than "exited".
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Waits until the successor reports ready. On any failure the successor is
/// killed (if still running) and reaped before this returns.
pub(crate) fn wait_ready(
    channel: BorrowedFd<'_>,
    child: &Child,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), UpgradeError> {
    let pid = child.pid as u32;
    let fail = |e: UpgradeError| {
        spawn::kill_and_reap(child, Instant::now());
        Err(e)
    };
    loop {
        // Without a pidfd, wake up every 50 ms to look for an exit.
        let slice = match child.pidfd {
            Some(_) => deadline,
            None => deadline.min(Instant::now() + Duration::from_millis(50)),
        };
        let mut fds = vec![(channel, libc::POLLIN)];
        if let Some(pidfd) = &child.pidfd {
            fds.push((pidfd.as_fd(), libc::POLLIN));
        }
        let revents = match sys::poll_until(&fds, slice) {
            Ok(r) => r,
            Err(e) => return fail(UpgradeError::io("poll on the readiness channel", e)),
        };
        if revents[0] != 0 {
            let mut byte = [0u8; 1];
            match sys::recv(channel, &mut byte, libc::MSG_DONTWAIT) {
                Ok(1) if byte[0] == MSG_READY => {
                    // Ready, unless it died right after saying so.
                    return match exited(child) {
                        Some(status) => Err(UpgradeError::Exited { pid, status }),
                        None => Ok(()),
                    };
                }
                Ok(1) => {
                    return fail(UpgradeError::Protocol {
                        pid,
                        reason: format!(
                            "unexpected byte {:#04x} on the readiness channel",
                            byte[0]
                        ),
                    });
                }
                Ok(_) => {
                    // EOF: it exited, or closed the channel and lives on.
                    if let Some(status) = wait_exit(child, Instant::now() + EXIT_GRACE) {
                        return Err(UpgradeError::Exited { pid, status });
                    }
                    return fail(UpgradeError::ClosedWithoutReady { pid });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return fail(UpgradeError::io("reading the readiness channel", e)),
            }
        }
        if let Some(status) = exited(child) {
            return Err(UpgradeError::Exited { pid, status });
        }
        if Instant::now() >= deadline {
            return fail(UpgradeError::Timeout {
                pid,
                after: timeout,
            });
        }
    }
}

/// `Some(status)` (reaped) if the child has exited; `Some(None)` if it is
/// gone but was reaped elsewhere.
fn exited(child: &Child) -> Option<Option<std::process::ExitStatus>> {
    match spawn::reap_now(child.pid) {
        Ok(None) => None,
        Ok(Some(status)) => Some(Some(status)),
        Err(_) => Some(None),
    }
}

/// Waits until the child exits or `until` passes.
fn wait_exit(child: &Child, until: Instant) -> Option<Option<std::process::ExitStatus>> {
    loop {
        if let Some(s) = exited(child) {
            return Some(s);
        }
        let now = Instant::now();
        if now >= until {
            return None;
        }
        match &child.pidfd {
            Some(pidfd) => {
                let _ = sys::poll_until(&[(pidfd.as_fd(), libc::POLLIN)], until);
            }
            None => {
                // No pidfd on this kernel: a short, bounded wait for the
                // next look.
                let _ = sys::poll_until(&[], now + Duration::from_millis(10).min(until - now));
            }
        }
    }
}

/// The successor's side: tells the old generation it is ready.
pub(crate) fn send_ready(channel: BorrowedFd<'_>) -> io::Result<()> {
    sys::send_all(channel, &[MSG_READY])
}
