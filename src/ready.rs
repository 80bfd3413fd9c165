//! Readiness over the channel: the successor reports ready with one byte;
//! the old generation waits for it, for the successor's exit (reported by the
//! intermediate process, see `spawn`), or for the deadline, and kills and
//! reaps a successor that failed.
//!
//! The channel is a close-on-exec `AF_UNIX` stream pair rather than a pipe:
//! `send(MSG_NOSIGNAL)` makes a vanished peer an `EPIPE` error instead of a
//! `SIGPIPE`, whatever the application's signal dispositions. The old
//! generation keeps its end open until it exits, so the successor reads EOF
//! exactly when its predecessor is gone.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::error::UpgradeError;
use crate::spawn::Child;
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
    child: &mut Child,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), UpgradeError> {
    let pid = child.pid as u32;
    let fail = |child: &mut Child, e: UpgradeError| {
        child.kill_and_reap();
        Err(e)
    };
    loop {
        let revents = match sys::poll_until(
            &[(channel, libc::POLLIN), (child.exit_fd(), libc::POLLIN)],
            deadline,
        ) {
            Ok(r) => r,
            Err(e) => return fail(child, UpgradeError::io("poll on the readiness channel", e)),
        };
        if revents[0] != 0 {
            let mut byte = [0u8; 1];
            match sys::recv(channel, &mut byte, libc::MSG_DONTWAIT) {
                Ok(1) if byte[0] == MSG_READY => {
                    // Ready, unless it died right after saying so.
                    return match child.exited() {
                        Some(status) => Err(UpgradeError::Exited { pid, status }),
                        None => Ok(()),
                    };
                }
                Ok(1) if byte[0] == crate::state::MSG_REJECT => {
                    let reason = read_line(channel, Instant::now() + Duration::from_secs(1));
                    return fail(child, UpgradeError::StateRejected { pid, reason });
                }
                Ok(1) => {
                    let reason =
                        format!("unexpected byte {:#04x} on the readiness channel", byte[0]);
                    return fail(child, UpgradeError::Protocol { pid, reason });
                }
                // EOF: it exited, or closed the channel and lives on. A reset
                // is the same, when it left state bytes unread.
                Ok(_) => {
                    if let Some(status) = child.wait_exit(Instant::now() + EXIT_GRACE) {
                        return Err(UpgradeError::Exited { pid, status });
                    }
                    return fail(child, UpgradeError::ClosedWithoutReady { pid });
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    if let Some(status) = child.wait_exit(Instant::now() + EXIT_GRACE) {
                        return Err(UpgradeError::Exited { pid, status });
                    }
                    return fail(child, UpgradeError::ClosedWithoutReady { pid });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return fail(child, UpgradeError::io("reading the readiness channel", e)),
            }
        }
        if let Some(status) = child.exited() {
            return Err(UpgradeError::Exited { pid, status });
        }
        if Instant::now() >= deadline {
            return fail(
                child,
                UpgradeError::Timeout {
                    pid,
                    after: timeout,
                },
            );
        }
    }
}

/// Reads a reason line (at most 1 KiB) until `until`.
fn read_line(channel: BorrowedFd<'_>, until: Instant) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while out.len() < 1024 {
        match sys::poll_until(&[(channel, libc::POLLIN)], until) {
            Ok(r) if r[0] != 0 => {}
            _ => break,
        }
        match sys::recv(channel, &mut byte, libc::MSG_DONTWAIT) {
            Ok(1) if byte[0] != b'\n' => out.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The successor's side: tells the old generation it is ready.
pub(crate) fn send_ready(channel: BorrowedFd<'_>) -> io::Result<()> {
    sys::send_all(channel, &[MSG_READY])
}
