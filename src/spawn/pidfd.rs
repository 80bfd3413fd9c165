//! Watching, signalling and reaping a process through a pidfd — never by a
//! pid that may have been reaped and reused — and, where the kernel has no
//! pidfds, by the pid of a child of ours while it is unreaped.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::sys;

/// How long the old generation waits for an intermediate or a successor to
/// answer a kill, or for a released intermediate to exit.
pub(super) const ANSWER: Duration = Duration::from_secs(5);

/// The wait status in a `waitid` answer.
pub(super) fn status_of(info: &libc::siginfo_t) -> Option<ExitStatus> {
    // SAFETY: for a CLD_* code the kernel filled in the child fields.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => Some(ExitStatus::from_raw((status & 0xff) << 8)),
        libc::CLD_KILLED => Some(ExitStatus::from_raw(status & 0x7f)),
        libc::CLD_DUMPED => Some(ExitStatus::from_raw((status & 0x7f) | 0x80)),
        _ => None,
    }
}

/// `waitid(P_PIDFD, pidfd, flags)`.
pub(super) fn waitid_pidfd(
    pidfd: BorrowedFd<'_>,
    flags: libc::c_int,
) -> io::Result<libc::siginfo_t> {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid value to be written into.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes a siginfo_t through a valid pointer to a
        // local; the pidfd is open for the call.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                flags,
            )
        };
        if r == 0 {
            return Ok(info);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reaps our child behind `pidfd` (which has exited, or was just killed)
/// and returns its wait status, `None` if it could not be collected (reaped
/// elsewhere). Through the pidfd, never the pid: that may be another
/// process's by now.
pub(super) fn wait_pidfd(pidfd: BorrowedFd<'_>) -> Option<ExitStatus> {
    status_of(&waitid_pidfd(pidfd, libc::WEXITED).ok()?)
}

/// Whether our child behind `pidfd` is unreaped (running, or a zombie): its
/// pid, and so a group id equal to it, cannot have been taken by another
/// process.
pub(super) fn unreaped_pidfd(pidfd: BorrowedFd<'_>) -> bool {
    waitid_pidfd(pidfd, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT).is_ok()
}

/// Whether our child `pid` is unreaped, for kernels without pidfds.
pub(super) fn child_unreaped(pid: libc::pid_t) -> bool {
    // SAFETY: a zeroed siginfo_t is a valid value to be written into.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes a siginfo_t through a valid pointer to a local;
    // WNOWAIT leaves the child as it is.
    unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
    }
}

/// Whether the process behind `pidfd` has exited.
pub(super) fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    sys::poll_until(&[(pidfd, libc::POLLIN)], Instant::now()).is_ok_and(|r| r[0] != 0)
}

/// SIGKILL through a pidfd: never to another process than the one it was
/// opened for (`ESRCH` once that is gone).
pub(super) fn pidfd_send_sigkill(pidfd: BorrowedFd<'_>) {
    // SAFETY: pidfd_send_signal takes an fd, a signal number and a null
    // siginfo pointer (the kernel then fills one in itself).
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Reaps our child `pid`, which was told to exit, waiting until `until` at
/// most (then it is killed): through its pidfd if there is one; else by
/// its pid, which is still its own, as it never exits unasked and nothing
/// else of ours reaps it (with `SIGCHLD` ignored the kernel does, and
/// `waitpid` then says `ECHILD`).
pub(super) fn reap_child(pid: libc::pid_t, pidfd: Option<&OwnedFd>, until: Instant) {
    if let Some(pidfd) = pidfd {
        let exited =
            sys::poll_until(&[(pidfd.as_fd(), libc::POLLIN)], until).is_ok_and(|r| r[0] != 0);
        if !exited {
            tracing::error!(pid, "the intermediate process did not exit; killing it");
            pidfd_send_sigkill(pidfd.as_fd());
            let _ = sys::poll_until(&[(pidfd.as_fd(), libc::POLLIN)], Instant::now() + ANSWER);
        }
        let _ = waitid_pidfd(pidfd.as_fd(), libc::WEXITED | libc::WNOHANG);
        return;
    }
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes an int through a valid pointer to a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != 0 {
            if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return; // reaped, or not ours any more (ECHILD)
        }
        if Instant::now() >= until && !killed {
            tracing::error!(pid, "the intermediate process did not exit; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A pidfd for `pid` (close-on-exec by definition).
pub(super) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers; the fd it returns is owned by
    // no one else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd, owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
