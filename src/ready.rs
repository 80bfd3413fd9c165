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

/// Successor to old generation: "ready".
pub(crate) const MSG_READY: u8 = b'R';
/// Successor to old generation, during probation: `U<reason>\n`, "my own
/// health check failed; take the service back".
pub(crate) const MSG_UNHEALTHY: u8 = b'U';
/// Successor to old generation, before ready: `F<reason>\n`, "I cannot
/// start, and this is why" (it exits next).
pub(crate) const MSG_FAILED: u8 = b'F';
/// Old generation to successor: `C<fields>\n`, the handover is final (see
/// `stats::encode_commit`).
pub(crate) const MSG_COMMIT: u8 = b'C';
/// Old generation to successor: `A\n`, the unhealthy report was taken: the
/// old generation serves alone again.
pub(crate) const MSG_ROLLED_BACK: u8 = b'A';
/// Old generation to successor: `D<fields>\n`, its drain ended.
pub(crate) const MSG_DRAINED: u8 = b'D';

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
                Ok(1) if byte[0] == MSG_FAILED => {
                    let reason = read_line(channel, Instant::now() + Duration::from_secs(1));
                    // It exits next; give it a moment to, for its status.
                    let status = match child.wait_exit(Instant::now() + EXIT_GRACE) {
                        Some(status) => status,
                        None => {
                            child.kill_and_reap();
                            None
                        }
                    };
                    return Err(UpgradeError::Failed {
                        pid,
                        reason,
                        status,
                    });
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

/// Watches a successor that reported ready for `window`: both generations
/// accept meanwhile. `Ok` once the window passed with the successor alive
/// and healthy. Otherwise the successor is gone and reaped when this returns
/// (one that reported itself unhealthy is given `grace` to drain and exit
/// on its own before it is killed).
pub(crate) fn watch_probation(
    channel: BorrowedFd<'_>,
    child: &mut Child,
    window: Duration,
    grace: Duration,
) -> Result<(), UpgradeError> {
    let pid = child.pid as u32;
    let start = Instant::now();
    let end = crate::clock::after_from(start, window);
    let failed = |reason: String| UpgradeError::Probation {
        pid,
        after: start.elapsed(),
        reason,
    };
    let exited = |status: Option<std::process::ExitStatus>| match status {
        Some(s) => format!("exited ({s})"),
        None => "exited (status unavailable)".to_owned(),
    };
    loop {
        let revents = match sys::poll_until(
            &[(channel, libc::POLLIN), (child.exit_fd(), libc::POLLIN)],
            end,
        ) {
            Ok(r) => r,
            Err(e) => {
                child.kill_and_reap();
                return Err(UpgradeError::io("poll during probation", e));
            }
        };
        if revents[1] != 0 {
            if let Some(status) = child.exited() {
                return Err(failed(exited(status)));
            }
        }
        if revents[0] != 0 {
            let mut byte = [0u8; 1];
            match sys::recv(channel, &mut byte, libc::MSG_DONTWAIT) {
                Ok(1) if byte[0] == MSG_UNHEALTHY => {
                    let reason = read_line(channel, Instant::now() + Duration::from_secs(1));
                    let at = start.elapsed();
                    // Tell it the service is ours again, then let it drain.
                    let _ = sys::send_all(channel, &[MSG_ROLLED_BACK, b'\n']);
                    tracing::warn!(pid, %reason, "successor reported itself unhealthy during probation; rolling back");
                    if child.wait_exit(crate::clock::after(grace)).is_none() {
                        tracing::warn!(
                            pid,
                            grace_ms = grace.as_millis() as u64,
                            "unhealthy successor did not exit in time; killing it"
                        );
                        child.kill_and_reap();
                    }
                    return Err(UpgradeError::Probation {
                        pid,
                        after: at,
                        reason: format!("reported itself unhealthy: {reason}"),
                    });
                }
                Ok(1) => {
                    child.kill_and_reap();
                    let reason = format!("unexpected byte {:#04x} during probation", byte[0]);
                    return Err(UpgradeError::Protocol { pid, reason });
                }
                Ok(_) => {
                    let reason = match child.wait_exit(Instant::now() + EXIT_GRACE) {
                        Some(status) => exited(status),
                        None => {
                            child.kill_and_reap();
                            "closed the channel; killed".to_owned()
                        }
                    };
                    return Err(failed(reason));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    let reason = match child.wait_exit(Instant::now() + EXIT_GRACE) {
                        Some(status) => exited(status),
                        None => {
                            child.kill_and_reap();
                            format!("channel failed ({e}); killed")
                        }
                    };
                    return Err(failed(reason));
                }
            }
        }
        if Instant::now() >= end {
            return Ok(());
        }
    }
}

/// Reads a reason line (at most 4 KiB) until `until`.
fn read_line(channel: BorrowedFd<'_>, until: Instant) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while out.len() < 4096 {
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
