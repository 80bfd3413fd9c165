//! The old generation's side of the channel: it waits for its successor's
//! ready message, for the successor's exit (a pidfd, or the report of the
//! intermediate process; see `spawn`), or for the deadline, watches a probation window,
//! and kills and reaps a successor that failed. What the messages are is
//! `channel`'s business; what to do about them is this module's.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::channel::{self, Inbox, Message, Next};
use crate::error::UpgradeError;
use crate::spawn::Child;
use crate::sys;
use crate::takeover::Peer;

/// The successor an upgrade watches: a process this generation started, or
/// one that took over (which it cannot kill or reap: it calls the takeover
/// off instead, and the process must not serve).
#[derive(Debug)]
pub(crate) enum Started {
    Child(Child),
    Peer(Peer),
}

impl Started {
    pub(crate) fn pid(&self) -> u32 {
        match self {
            Started::Child(c) => c.pid as u32,
            Started::Peer(p) => p.pid,
        }
    }

    fn exited(&mut self) -> Option<Option<std::process::ExitStatus>> {
        match self {
            Started::Child(c) => c.exited(),
            Started::Peer(p) => p.wait_gone(Instant::now()).then_some(None),
        }
    }

    fn wait_exit(&mut self, until: Instant) -> Option<Option<std::process::ExitStatus>> {
        match self {
            Started::Child(c) => c.wait_exit(until),
            // Its status is not ours to collect.
            Started::Peer(p) => p.wait_gone(until).then_some(None),
        }
    }

    fn exit_fd(&self) -> BorrowedFd<'_> {
        match self {
            Started::Child(c) => c.exit_fd(),
            Started::Peer(p) => p.exit_fd(),
        }
    }

    /// The upgrade failed with `why`: a child is killed (with what it
    /// started) and reaped; a peer is told why, and its channel closed.
    pub(crate) fn give_up(&mut self, why: &UpgradeError) {
        match self {
            Started::Child(c) => c.kill_and_reap(),
            Started::Peer(p) => p.call_off(&crate::error::chain(why)),
        }
    }

    fn kill_and_reap(&mut self) {
        match self {
            Started::Child(c) => c.kill_and_reap(),
            Started::Peer(p) => p.call_off("the running generation called the takeover off"),
        }
    }

    /// The upgrade committed: let the successor go.
    pub(crate) fn release(self) {
        match self {
            Started::Child(c) => c.release(),
            Started::Peer(p) => p.release(),
        }
    }
}

/// How long an EOF on the channel may precede the successor's exit before
/// it counts as "closed without ready" rather than "exited".
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// What the old generation heard on the channel, without waiting.
enum Heard {
    Message(Message),
    /// The successor's end closed.
    Closed,
    /// Nothing complete yet.
    Nothing,
    /// Bytes that break the protocol.
    Bad(String),
}

/// Reads what is pending on the channel and decodes the next message.
/// `allowed` are the kinds the successor may send now; a known kind that is
/// not allowed, or a byte that is no kind at all, is a broken protocol at
/// once (a successor writing garbage is not left to the deadline). A line of
/// a kind this version does not know — an uppercase letter, from a newer
/// successor — is skipped (protocol version 2; see `channel`).
fn hear(channel: BorrowedFd<'_>, inbox: &mut Inbox, allowed: &[u8]) -> io::Result<Heard> {
    loop {
        if let Some(kind) = inbox.peek_kind() {
            let newer = kind.is_ascii_uppercase() && !channel::KNOWN.contains(&kind);
            if !allowed.contains(&kind) && !newer {
                return Ok(Heard::Bad(format!(
                    "unexpected byte {kind:#04x} on the readiness channel"
                )));
            }
        }
        match inbox.next() {
            Next::Message(m) => return Ok(Heard::Message(m)),
            Next::Bad(e) => return Ok(Heard::Bad(e.0)),
            Next::Unknown(k) => {
                tracing::debug!(kind = %(k as char), "a message of a newer version from the successor; skipped");
                continue;
            }
            Next::Incomplete => {}
        }
        let mut buf = [0u8; 4096];
        match sys::recv(channel, &mut buf, libc::MSG_DONTWAIT) {
            Ok(0) => return Ok(Heard::Closed),
            Ok(n) => inbox.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Heard::Nothing),
            // A reset is an EOF that left bytes (state) unread.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Heard::Closed),
            Err(e) => return Err(e),
        }
    }
}

/// Waits until the successor reports ready; returns the kinds of connections
/// it said it takes (`T`, right before `R`; none from a build that says
/// nothing). On any failure the successor is killed (if still running) and
/// reaped before this returns. Bytes received after the ready message stay
/// in `inbox`.
pub(crate) fn wait_ready(
    channel: BorrowedFd<'_>,
    inbox: &mut Inbox,
    child: &mut Started,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<String>, UpgradeError> {
    let pid = child.pid();
    let fail = |child: &mut Started, e: UpgradeError| {
        child.give_up(&e);
        Err(e)
    };
    let allowed = [
        channel::READY,
        channel::FAILED,
        channel::STATE_REJECTED,
        channel::TAKES,
    ];
    let mut takes = Vec::new();
    loop {
        let heard = match hear(channel, inbox, &allowed) {
            Ok(h) => h,
            Err(e) => return fail(child, UpgradeError::io("reading the readiness channel", e)),
        };
        match heard {
            Heard::Message(Message::Ready) => {
                // Ready, unless it died right after saying so.
                return match child.exited() {
                    Some(status) => Err(UpgradeError::Exited { pid, status }),
                    None => Ok(takes),
                };
            }
            Heard::Message(Message::Takes(kinds)) => {
                tracing::debug!(pid, ?kinds, "the successor takes these connections");
                takes = kinds;
                continue;
            }
            Heard::Message(Message::Failed(reason)) => {
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
            Heard::Message(Message::StateRejected(reason)) => {
                return fail(child, UpgradeError::StateRejected { pid, reason });
            }
            Heard::Message(other) => {
                let reason = format!("unexpected {other:?} before ready");
                return fail(child, UpgradeError::Protocol { pid, reason });
            }
            Heard::Bad(reason) => return fail(child, UpgradeError::Protocol { pid, reason }),
            // EOF: it exited, or closed the channel and lives on.
            Heard::Closed => {
                if let Some(status) = child.wait_exit(Instant::now() + EXIT_GRACE) {
                    return Err(UpgradeError::Exited { pid, status });
                }
                return fail(child, UpgradeError::ClosedWithoutReady { pid });
            }
            Heard::Nothing => {}
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
        if let Err(e) = sys::poll_until(
            &[(channel, libc::POLLIN), (child.exit_fd(), libc::POLLIN)],
            deadline,
        ) {
            return fail(child, UpgradeError::io("poll on the readiness channel", e));
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
    inbox: &mut Inbox,
    child: &mut Started,
    window: Duration,
    grace: Duration,
) -> Result<(), UpgradeError> {
    let pid = child.pid();
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
        let heard = match hear(channel, inbox, &[channel::UNHEALTHY]) {
            Ok(h) => h,
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
        };
        match heard {
            Heard::Message(Message::Unhealthy(reason)) => {
                let at = start.elapsed();
                // Tell it the service is ours again, then let it drain.
                let _ = sys::send_all(channel, &Message::TakenBack.encode());
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
            Heard::Message(other) => {
                child.kill_and_reap();
                let reason = format!("unexpected {other:?} during probation");
                return Err(UpgradeError::Protocol { pid, reason });
            }
            Heard::Bad(reason) => {
                child.kill_and_reap();
                return Err(UpgradeError::Protocol { pid, reason });
            }
            Heard::Closed => {
                let reason = match child.wait_exit(Instant::now() + EXIT_GRACE) {
                    Some(status) => exited(status),
                    None => {
                        child.kill_and_reap();
                        "closed the channel; killed".to_owned()
                    }
                };
                return Err(failed(reason));
            }
            Heard::Nothing => {}
        }
        if let Some(status) = child.exited() {
            return Err(failed(exited(status)));
        }
        if Instant::now() >= end {
            return Ok(());
        }
        if let Err(e) = sys::poll_until(
            &[(channel, libc::POLLIN), (child.exit_fd(), libc::POLLIN)],
            end,
        ) {
            child.kill_and_reap();
            return Err(UpgradeError::io("poll during probation", e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn heard(bytes: &[u8]) -> Heard {
        let (a, b) = sys::socketpair_cloexec().unwrap();
        sys::send_all(a.as_fd(), bytes).unwrap();
        let mut inbox = Inbox::default();
        let allowed = [channel::READY, channel::FAILED, channel::STATE_REJECTED];
        hear(b.as_fd(), &mut inbox, &allowed).unwrap()
    }

    #[test]
    fn a_newer_kind_is_skipped_a_known_one_out_of_place_and_garbage_are_not() {
        assert!(matches!(
            heard(b"Zfrom a newer build\nR"),
            Heard::Message(Message::Ready)
        ));
        assert!(
            matches!(heard(b"A\n"), Heard::Bad(_)),
            "taken back, before ready"
        );
        assert!(matches!(heard(b"z"), Heard::Bad(_)));
        assert!(matches!(heard(b"\x01"), Heard::Bad(_)));
        // A newer line not complete yet: wait for the rest.
        assert!(matches!(heard(b"Zhalf"), Heard::Nothing));
    }
}
