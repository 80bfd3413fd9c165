//! The successor's process groups: the start group it leads until it is
//! ready, killed with it whenever it fails — only while its pid, and so the
//! group id, cannot have been reused — and the predecessor's group, which
//! it joins when it reports ready.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpgrp, getpid, setpgid};

use super::pidfd::{pidfd_exited, pidfd_send_sigkill, unreaped_pidfd};
use crate::env;

/// SIGKILL to a successor started directly and to its start process group —
/// the group only while the successor is still our unreaped child, so that
/// its pid, and so the group id, cannot have been reused: an application
/// that reaps children it did not start (`waitpid(-1)`) may have reaped it
/// behind our back. The successor itself only through its pidfd.
pub(super) fn kill_direct(pid: libc::pid_t, pidfd: BorrowedFd<'_>) {
    if unreaped_pidfd(pidfd) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    pidfd_send_sigkill(pidfd);
}

/// SIGKILL to a successor whose intermediate is gone or does not answer
/// (it may be orphaned): only through its pidfd, and its start group only
/// while it is alive (while it lives, no other process can lead a group
/// with its pid). Without a pidfd it is left alone: its pid may be
/// another process's by now.
pub(super) fn kill_orphan(pid: libc::pid_t, successor: Option<&OwnedFd>) {
    let Some(pidfd) = successor else {
        tracing::error!(
            pid,
            "no pidfd for the successor: it is not signalled (its pid may have been reused); it may live on"
        );
        return;
    };
    if !pidfd_exited(pidfd.as_fd()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    pidfd_send_sigkill(pidfd.as_fd());
}

/// A successor's side of the process-group rule, called by `ready()` just
/// before it reports ready: it leaves the process group it was started in
/// and joins the one its predecessor is in (`HANDOVER_PGID`), and so is a
/// normal member of the service from then on: `kill -- -PGID` and a
/// terminal's job control reach it. Processes it started before stay in
/// its start group, which is killed if the upgrade still fails.
///
/// Not at the commit: a predecessor that commits, drains and exits before
/// its successor took the commit in may have been the group's last member,
/// and the service's process group would be gone. Before the ready message
/// the predecessor is alive, waiting for it.
///
/// Does nothing in a process that does not lead its own process group, or
/// when that group is gone (the predecessor died; the successor then stays
/// in its own, which its successors join in turn).
pub(crate) fn join_predecessor_group() {
    let Some(pgid) = std::env::var_os(env::PGID)
        .and_then(|v| v.to_str()?.parse::<libc::pid_t>().ok())
        .filter(|p| *p > 0)
    else {
        return;
    };
    let (me, group) = (getpid(), getpgrp());
    if group != me || pgid == me.as_raw() {
        return;
    }
    match setpgid(Pid::from_raw(0), Pid::from_raw(pgid)) {
        Ok(_) => tracing::debug!(pgid, "joined the predecessor's process group"),
        Err(e) => {
            tracing::debug!(pgid, error = %e, "cannot join the predecessor's process group; staying in its own")
        }
    }
}
