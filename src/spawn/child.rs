//! A started successor (`Child`) from its start until it is let go or
//! reaped: how its exit is watched, how it and its start group are killed
//! and reaped, and how it is released at the commit — started directly (a
//! pidfd) or through the intermediate process (its records and requests).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::exec::{KILL, REC_STATUS, RECORD_LEN, RELEASE};
use super::group::{kill_direct, kill_orphan};
use super::pidfd::{ANSWER, child_unreaped, pidfd_send_sigkill, reap_child, wait_pidfd};
use crate::sys;

/// A started successor.
///
/// It is started one of two ways (see the module docs):
///
/// - **Directly**: the old generation's upgrade thread starts it with
///   `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)`, as `posix_spawn` does.
///   The successor stays the old generation's child until that exits, and
///   is then reparented to the nearest subreaper (or init), like any orphan.
///   Its exit is watched, and its status collected, through its pidfd.
/// - **Through an intermediate process**: the old generation forks an
///   intermediate, which starts the successor, reports its pid and its exec,
///   and then either reports the successor's wait status (if it exits
///   first, or when asked to kill it) or exits when released, leaving the
///   successor to the nearest subreaper — the service manager.
///
/// The successor leads a process group of its own (its pgid is its pid)
/// until it reports ready. Whenever it fails, it and that whole group are
/// killed before it is reaped, while its pid (and so the group id) cannot
/// have been reused: whatever the successor started before it was ready (a
/// shell wrapper's real server, a helper) dies with it.
#[derive(Debug)]
pub(crate) struct Child {
    /// The successor's pid, and the id of its process group.
    pub pid: libc::pid_t,
    pub(super) via: Via,
}

#[derive(Debug)]
pub(super) enum Via {
    /// Our own child.
    Direct {
        /// From the clone: readable once the successor has exited.
        pidfd: OwnedFd,
        /// Reaped, or let go: nothing left to do.
        done: bool,
    },
    Intermediate(Intermediate),
}

/// The old generation's side of an intermediate process.
#[derive(Debug)]
pub(super) struct Intermediate {
    /// Our child until reaped: its pid, and a pidfd for it where the kernel
    /// has pidfds.
    pub(super) proc: Option<(libc::pid_t, Option<OwnedFd>)>,
    /// A pidfd for the successor (not our child), where the kernel has
    /// pidfds and a slot was free.
    pub(super) successor: Option<OwnedFd>,
    /// Its records.
    pub(super) status: OwnedFd,
    /// Ours: a byte asks ([`KILL`], [`ACK`](super::exec::ACK),
    /// [`RELEASE`]); closing it releases the intermediate.
    pub(super) release: Option<OwnedFd>,
    /// The successor's status came (or is lost), or it was let go: nothing
    /// left to kill.
    pub(super) done: bool,
}

/// What the intermediate said next.
pub(super) enum Heard {
    Record(u32, i32, i32),
    /// Nothing by the deadline.
    Nothing,
    /// It is gone without a word (end of file, or a short record).
    Gone,
}

impl Intermediate {
    pub(super) fn send(&self, byte: u8) {
        if let Some(r) = &self.release {
            // Gone already: its report (or end of file) is on the pipe.
            let _ = sys::send_all(r.as_fd(), &[byte]);
        }
    }

    /// The next record, waiting until `until`.
    pub(super) fn next(&self, until: Instant) -> Heard {
        match sys::poll_until(&[(self.status.as_fd(), libc::POLLIN)], until) {
            Ok(rev) if rev[0] != 0 => {}
            _ => return Heard::Nothing,
        }
        let mut buf = [0u8; RECORD_LEN];
        match read_full(self.status.as_fd(), &mut buf) {
            Ok(true) => {
                let word = |i: usize| {
                    let bytes: [u8; 4] = buf[i..i + 4].try_into().expect("4 bytes");
                    i32::from_ne_bytes(bytes)
                };
                Heard::Record(word(0) as u32, word(4), word(8))
            }
            _ => Heard::Gone,
        }
    }

    /// Releases the intermediate and reaps it (bounded).
    pub(super) fn let_go(&mut self) {
        self.done = true;
        self.send(RELEASE);
        self.release.take();
        if let Some((pid, pidfd)) = self.proc.take() {
            reap_child(pid, pidfd.as_ref(), Instant::now() + ANSWER);
        }
    }

    /// SIGKILL to the intermediate itself, which does not answer: through
    /// its pidfd, or while it is our unreaped child (it never exits before
    /// it is released).
    pub(super) fn kill_proc(&self) {
        match &self.proc {
            Some((_, Some(pidfd))) => pidfd_send_sigkill(pidfd.as_fd()),
            Some((pid, None)) if child_unreaped(*pid) => {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            _ => {}
        }
    }
}

/// Whether a successor has exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Not yet (or not by the time asked).
    Running,
    /// It exited, with this wait status.
    Exited(ExitStatus),
    /// It is gone, its status unknown: reaped elsewhere, or reported by
    /// no one (an intermediate that died without a word), or already
    /// collected or let go before.
    Gone,
}

impl Exit {
    /// Whether it is still running.
    pub(crate) fn is_running(self) -> bool {
        self == Exit::Running
    }

    /// Its wait status, if it exited and the status is known.
    pub(crate) fn status(self) -> Option<ExitStatus> {
        match self {
            Exit::Exited(status) => Some(status),
            Exit::Running | Exit::Gone => None,
        }
    }

    fn from_status(status: Option<ExitStatus>) -> Exit {
        status.map_or(Exit::Gone, Exit::Exited)
    }
}

impl Child {
    /// Whether the successor has exited, without waiting.
    pub(crate) fn exited(&mut self) -> Exit {
        self.wait_exit(Instant::now())
    }

    /// Waits until the successor exits or `until` passes. When it has, its
    /// process group has been killed too.
    pub(crate) fn wait_exit(&mut self, until: Instant) -> Exit {
        let pid = self.pid;
        match &mut self.via {
            Via::Direct { done: true, .. } => Exit::Gone,
            Via::Direct { pidfd, done } => {
                let exited = sys::poll_until(&[(pidfd.as_fd(), libc::POLLIN)], until)
                    .is_ok_and(|rev| rev[0] != 0);
                if !exited {
                    return Exit::Running;
                }
                // Exited: what it started dies with it.
                kill_direct(pid, pidfd.as_fd());
                *done = true;
                Exit::from_status(wait_pidfd(pidfd.as_fd()))
            }
            Via::Intermediate(it) if it.done => Exit::Gone,
            Via::Intermediate(it) => loop {
                match it.next(until) {
                    Heard::Nothing => return Exit::Running,
                    Heard::Record(REC_STATUS, status, known) => {
                        it.let_go();
                        return Exit::from_status(
                            (known == 1).then(|| ExitStatus::from_raw(status)),
                        );
                    }
                    // An exec report after a kill: not what is asked.
                    Heard::Record(..) => continue,
                    Heard::Gone => {
                        // The intermediate died without reporting (killed by
                        // someone else): the successor may live on, orphaned.
                        tracing::warn!(pid, "the intermediate process died; killing the successor");
                        kill_orphan(pid, it.successor.as_ref());
                        it.let_go();
                        return Exit::Gone;
                    }
                }
            },
        }
    }

    /// The fd that becomes readable when the successor exits.
    pub(crate) fn exit_fd(&self) -> BorrowedFd<'_> {
        match &self.via {
            Via::Direct { pidfd, .. } => pidfd.as_fd(),
            Via::Intermediate(it) => it.status.as_fd(),
        }
    }

    /// Kills the successor and everything it started (its process group),
    /// and waits (bounded) until it is reaped.
    pub(crate) fn kill_and_reap(&mut self) {
        let pid = self.pid;
        match &mut self.via {
            Via::Direct { done: true, .. } => {}
            Via::Intermediate(it) if it.done => {}
            Via::Direct { pidfd, .. } => {
                kill_direct(pid, pidfd.as_fd());
                if self.wait_exit(Instant::now() + ANSWER).is_running() {
                    // Left unreaped: a zombie of this process once it dies.
                    tracing::error!(pid, "successor did not die within 5 s of SIGKILL");
                    if let Via::Direct { done, .. } = &mut self.via {
                        *done = true;
                    }
                }
            }
            Via::Intermediate(it) => {
                // The intermediate kills the group: it is the successor's
                // parent, and kills before it reaps, so the group id is still
                // the successor's.
                it.send(KILL);
                if self.wait_exit(Instant::now() + ANSWER).is_running() {
                    tracing::error!(
                        pid,
                        "the intermediate process did not report the successor's end within 5 s"
                    );
                    if let Via::Intermediate(it) = &mut self.via {
                        kill_orphan(pid, it.successor.as_ref());
                        it.kill_proc();
                        it.let_go();
                    }
                }
            }
        }
    }

    /// Lets the successor go: it is no longer killed when this `Child` is
    /// dropped. An intermediate exits and is reaped here, and the successor
    /// is reparented to the nearest subreaper (or init); a successor started
    /// directly stays this process's child until this process exits.
    pub(crate) fn release(mut self) {
        match &mut self.via {
            Via::Direct { done, .. } => *done = true,
            Via::Intermediate(it) => it.let_go(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // A successor that was not let go is killed (and an intermediate is
        // never left behind).
        self.kill_and_reap();
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on an early EOF.
fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match sys::read(fd, &mut buf[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(true)
}
