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
use crate::spawn::{Child, Exit};
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

    fn exited(&mut self) -> Exit {
        match self {
            Started::Child(c) => c.exited(),
            Started::Peer(p) => peer_exit(p.wait_gone(Instant::now())),
        }
    }

    fn wait_exit(&mut self, until: Instant) -> Exit {
        match self {
            Started::Child(c) => c.wait_exit(until),
            Started::Peer(p) => peer_exit(p.wait_gone(until)),
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

/// Whether a peer has exited: its status is not ours to collect.
fn peer_exit(gone: bool) -> Exit {
    if gone { Exit::Gone } else { Exit::Running }
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
                    Exit::Running => Ok(takes),
                    exit => Err(UpgradeError::Exited {
                        pid,
                        status: exit.status(),
                    }),
                };
            }
            Heard::Message(Message::Takes(kinds)) => {
                tracing::debug!(pid, ?kinds, "the successor takes these connections");
                takes = kinds;
                continue;
            }
            Heard::Message(Message::Failed(reason)) => {
                // It exits next; give it a moment to, for its status.
                let exit = child.wait_exit(Instant::now() + EXIT_GRACE);
                if exit.is_running() {
                    child.kill_and_reap();
                }
                let status = exit.status();
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
                if let exit @ (Exit::Exited(_) | Exit::Gone) =
                    child.wait_exit(Instant::now() + EXIT_GRACE)
                {
                    let status = exit.status();
                    return Err(UpgradeError::Exited { pid, status });
                }
                return fail(child, UpgradeError::ClosedWithoutReady { pid });
            }
            Heard::Nothing => {}
        }
        if let exit @ (Exit::Exited(_) | Exit::Gone) = child.exited() {
            let status = exit.status();
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
/// and healthy (with the canary judgement, when `judging`). Otherwise the
/// successor is gone and reaped when this returns (one that reported itself
/// unhealthy, or was judged worse, is taken back and given `grace` to drain
/// and exit on its own before it is killed).
pub(crate) fn watch_probation(
    channel: BorrowedFd<'_>,
    inbox: &mut Inbox,
    child: &mut Started,
    window: Duration,
    grace: Duration,
    mut judging: Option<&mut crate::canary::Judging>,
) -> Result<Option<crate::canary::Judgement>, UpgradeError> {
    let pid = child.pid();
    let start = Instant::now();
    let end = crate::clock::after_from(start, window);
    let failed = |reason: String| UpgradeError::Probation {
        pid,
        after: start.elapsed(),
        reason,
    };
    let exited = |exit: Exit| match exit.status() {
        Some(s) => format!("exited ({s})"),
        None => "exited (status unavailable)".to_owned(),
    };
    let judged = |child: &mut Started, judgement: crate::canary::Judgement| {
        let after = start.elapsed();
        tracing::warn!(pid, %judgement, "canary judged worse than this generation; rolling back");
        take_back(channel, child, grace);
        UpgradeError::Canary {
            pid,
            after,
            judgement: Box::new(judgement),
        }
    };
    // With a share, the canary paces its accepts to this generation's
    // reports: the first goes at once; later ones only to a canary that
    // reports too (so reads the channel), so they never fill it.
    let mut next_pacing = judging
        .as_ref()
        .and_then(|j| j.pacing())
        .map(|_| Instant::now());
    let mut reports = 0u64;
    loop {
        if let (Some(at), Some(j)) = (next_pacing, judging.as_ref()) {
            if Instant::now() >= at {
                if let Some((share, accepted)) = j.pacing() {
                    let msg = Message::Pacing(share, accepted).encode();
                    let sent = send_bounded(channel, &msg, crate::clock::after(grace));
                    if let Err(e) = sent {
                        child.kill_and_reap();
                        return Err(failed(format!("does not read the channel ({e}); killed")));
                    }
                }
                next_pacing = (reports > 0).then(|| Instant::now() + crate::canary::REPORT_EVERY);
            }
        }
        let allowed = [channel::UNHEALTHY, channel::CANARY_COUNTS];
        let heard = match hear(channel, inbox, &allowed) {
            Ok(h) => h,
            Err(e) => {
                let reason = match child.wait_exit(Instant::now() + EXIT_GRACE) {
                    Exit::Running => {
                        child.kill_and_reap();
                        format!("channel failed ({e}); killed")
                    }
                    exit => exited(exit),
                };
                return Err(failed(reason));
            }
        };
        match heard {
            Heard::Message(Message::Unhealthy(reason)) => {
                let at = start.elapsed();
                tracing::warn!(pid, %reason, "successor reported itself unhealthy during probation; rolling back");
                take_back(channel, child, grace);
                return Err(UpgradeError::Probation {
                    pid,
                    after: at,
                    reason: format!("reported itself unhealthy: {reason}"),
                });
            }
            Heard::Message(Message::CanaryCounts(counts)) => {
                reports += 1;
                if next_pacing.is_none() && judging.as_ref().is_some_and(|j| j.pacing().is_some()) {
                    next_pacing = Some(Instant::now());
                }
                if let Some(judgement) = judging.as_mut().and_then(|j| j.report(counts)) {
                    return Err(judged(child, judgement));
                }
                continue;
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
                    Exit::Running => {
                        child.kill_and_reap();
                        "closed the channel; killed".to_owned()
                    }
                    exit => exited(exit),
                };
                return Err(failed(reason));
            }
            Heard::Nothing => {}
        }
        if let exit @ (Exit::Exited(_) | Exit::Gone) = child.exited() {
            return Err(failed(exited(exit)));
        }
        if Instant::now() >= end {
            let judgement = judging.as_ref().and_then(|j| j.conclude());
            return match judgement {
                Some(j) if j.rolled_back() => Err(judged(child, j)),
                judgement => Ok(judgement),
            };
        }
        let until = next_pacing.map_or(end, |at| at.min(end));
        if let Err(e) = sys::poll_until(
            &[(channel, libc::POLLIN), (child.exit_fd(), libc::POLLIN)],
            until,
        ) {
            child.kill_and_reap();
            return Err(UpgradeError::io("poll during probation", e));
        }
    }
}

/// Takes the service back from a successor on probation: tells it (`A`),
/// then gives it `grace` to drain and exit on its own before killing it.
fn take_back(channel: BorrowedFd<'_>, child: &mut Started, grace: Duration) {
    let pid = child.pid();
    // Tell it the service is ours again, then let it drain.
    let _ = send_bounded(
        channel,
        &Message::TakenBack.encode(),
        crate::clock::after(grace),
    );
    if child.wait_exit(crate::clock::after(grace)).is_running() {
        tracing::warn!(
            pid,
            grace_ms = grace.as_millis() as u64,
            "successor taken back did not exit in time; killing it"
        );
        child.kill_and_reap();
    }
}

/// Sends all of `buf`, waiting for room at most until `deadline` (a
/// successor that stopped reading must not hold this generation).
pub(crate) fn send_bounded(
    channel: BorrowedFd<'_>,
    mut buf: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    while !buf.is_empty() {
        match sys::send(channel, buf, true) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let rev = sys::poll_until(&[(channel, libc::POLLOUT)], deadline)?;
                if rev[0] == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no room on the channel",
                    ));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
