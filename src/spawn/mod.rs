//! Building and starting the successor: the one fork/exec seam.
//!
//! An upgrade starts its successor in two steps. [`prepare`] allocates
//! everything the new process needs (argv, envp, the fd layout, a map of
//! which fd sits where) while the caller holds the fd registry's lock;
//! [`Prepared::start`] then starts it without that lock, so that an exec
//! hung on a dead file system blocks no task that touches the registry.
//! What `start` opens (a pidfd, the intermediate's pipes) takes the spare
//! fds of the [`Reserve`], freed just before: an upgrade works when the
//! process is at its fd limit — which is when a fix for an fd leak must be
//! deployed.
//!
//! # Directly
//!
//! Without a service manager the old generation's upgrade thread starts the
//! successor the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)` on
//! a stack of its own, sharing its parent's memory until it execs, while
//! the parent thread waits — no page table is copied and nothing needs
//! tearing down. The kernel makes a pidfd for it in the same call
//! (`CLONE_PIDFD`): it is watched, waited for (`waitid(P_PIDFD)`) and
//! signalled through it, never by a pid that may have been reaped and
//! reused. It stays the old generation's child until that exits. A failure
//! before its exec is written into memory the two share (the parent reads
//! it once `clone` returns, which `CLONE_VFORK` makes after the exec or the
//! exit): nothing depends on the end of file of an fd that a child the
//! application forks (without exec) might hold a copy of.
//!
//! Every signal is blocked in the calling thread around the start, with the
//! system call itself as `posix_spawn` does, so that glibc's two internal
//! signals (which its `pthread_sigmask` leaves unblocked) are blocked too;
//! a guard restores the mask on every path. (Around the intermediate's
//! `fork` those two stay unblocked, as glibc's `fork` wants: they are only
//! ever sent to threads of this process, never to the new one.)
//!
//! The direct start needs `CLONE_PIDFD` and `waitid(P_PIDFD)` (Linux 5.4),
//! and, on glibc, version 2.25 or later (older ones kept a pid cache that a
//! `CLONE_VM` child would write into its parent's thread): both are checked
//! once ([`can_start_directly`]). It is also refused, at each start, while
//! this process's `SIGCHLD` disposition is `SIG_IGN` or has `SA_NOCLDWAIT`:
//! the kernel would then reap the successor the moment it exits, its wait
//! status lost (a crash could not be told from a clean exit) and its pid
//! free for reuse before its process group is killed. A wait status can
//! only be had from a process that is not reaped at exit, so such an
//! application's successors start through the intermediate, which sets
//! `SIGCHLD` back to the default first thing. (An application that turns
//! `SIGCHLD` off while a directly started successor is not yet committed,
//! or reaps children it did not start with `waitpid(-1)`, loses that
//! successor's status: the upgrade then fails with the status unknown.)
//!
//! # Through an intermediate process
//!
//! Under a service manager (which must see the successor as its own child
//! before it is named main), on kernels or libcs the direct start cannot
//! use, and while `SIGCHLD` is ignored, the old generation forks an
//! *intermediate* process, which:
//!
//! 1. sets `SIGCHLD` to its default (so that it, not the kernel, reaps the
//!    successor), and closes every fd it does not need: it is a copy of the
//!    old generation, which may hold thousands of connections and have no fd
//!    slot left;
//! 2. makes the successor's error pipe — itself, single-threaded, so that
//!    only the successor holds the write end and its end of file means the
//!    exec — forks the successor, puts it into a process group of its own
//!    (`setpgid` from both sides, so that the group exists before its pid is
//!    reported), and reports its pid — before the exec, so that a successor
//!    hung before it is killed at the deadline — then whether it exec'd;
//! 3. then waits: released (a byte, or end of file on the release socket),
//!    it exits and leaves the successor to the nearest subreaper; asked to
//!    kill (a byte), or seeing the successor exit, it kills the successor's
//!    whole process group — while the successor is still its unreaped child,
//!    so the group id cannot have been reused — reaps it and reports its wait
//!    status; it does not reap before the old generation says it has the
//!    pid (and a pidfd for it), and it never exits before it is released, so
//!    that the old generation can hold a pidfd for it too.
//!
//! Its pipes are made for each start, just before the fork (not reserved at
//! `ready()`, where a child the application forks later would hold them),
//! and nothing the old generation learns depends on their end of file:
//! every report is a record ([`RECORD_LEN`] bytes), every request a byte.
//!
//! # The successor, between its start and exec
//!
//! It only makes async-signal-safe system calls on memory prepared before:
//!
//! 1. `setpgid(0, 0)`: a process group of its own, so that a signal sent to
//!    the service's group (`kill -HUP -- -PGID`, a terminal's hangup) does
//!    not reach it before it can handle it, and so that killing the group
//!    ends everything it started; started directly, it then closes every fd
//!    it does not need, as an intermediate would have;
//! 2. moves the error pipe (if it has one) above the target range, then
//!    `dup2`s each handed fd to `3, 4, ...` in order (`dup2` of two distinct
//!    fds clears `FD_CLOEXEC` on the target), first moving aside a later fd
//!    that sits on the target, and closing each old copy above the layout at
//!    once (one inside it is replaced in place by a later `dup2`); an fd
//!    already at its target only has `FD_CLOEXEC` cleared, since
//!    `dup2(fd, fd)` would keep it;
//! 3. marks every fd above the layout close-on-exec (`close_range` with
//!    `CLOSE_RANGE_CLOEXEC`, or a loop of `fcntl` on older kernels);
//! 4. discards the signals that reached it before it had its own group,
//!    resets every disposition to the default except SIGHUP, which starts
//!    ignored (see the crate docs, "Signals and process groups"), and
//!    unblocks all signals;
//! 5. writes its own pid into the pre-allocated `LISTEN_PID=` entry;
//! 6. `execve`s. If anything fails, it reports `(step, errno)` (into the
//!    shared memory, or to the intermediate's pipe) and `_exit(127)`s.
//!
//! [`RECORD_LEN`]: exec::RECORD_LEN

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgrp, getpid, setpgid};

use crate::env;
use crate::sys;

mod exec;
mod reserve;

use exec::{
    ACK, KILL, PID_DIGITS, Plan, REC_EXECD, REC_FAILED, REC_STARTED, REC_STATUS, RECORD_LEN,
    RELEASE, STEP_FDS, STEP_FORK, STEP_PIPE, Stack, clone_vfork, intermediate,
};
use reserve::SpawnFds;
pub(crate) use reserve::{ChannelFds, Reserve};

/// The size of the kernel's signal set (`_NSIG / 8`), for `rt_sigprocmask`.
const KERNEL_SIGSET: usize = if cfg!(any(target_arch = "mips", target_arch = "mips64")) {
    16
} else {
    8
};

/// How long the old generation waits for an intermediate or a successor to
/// answer a kill, or for a released intermediate to exit.
const ANSWER: Duration = Duration::from_secs(5);

/// Blocks signals in the calling thread until dropped, restoring the mask
/// it had then.
struct SigmaskGuard {
    old: libc::sigset_t,
}

impl SigmaskGuard {
    /// Every signal, with the system call itself, as glibc's `posix_spawn`
    /// does around its `CLONE_VM` start: glibc's `pthread_sigmask` silently
    /// leaves its two internal signals (SIGCANCEL, SIGSETXID) unblocked, and
    /// no handler may run in a child that shares this memory. A thread of
    /// this process that calls `setuid` meanwhile (glibc signals every
    /// thread with SIGSETXID and waits for each) waits until the mask is
    /// restored: after the exec.
    fn block_all() -> SigmaskGuard {
        // SAFETY: a zeroed sigset_t is a valid value.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: writes bytes into a local of that type: a full set (the
        // kernel ignores SIGKILL and SIGSTOP in it).
        unsafe { std::ptr::write_bytes(&mut all, 0xff, 1) };
        SigmaskGuard::set(&all)
    }

    /// Every signal but glibc's two internal ones, which its
    /// `pthread_sigmask` refuses to block, for the intermediate's `fork`:
    /// glibc runs the application's `pthread_atfork` handlers in it, which
    /// may wait for a lock that a thread in `setuid` holds while it waits
    /// for every thread to take SIGSETXID. (glibc blocks them itself around
    /// the system call of the fork.)
    fn block_all_but_libc() -> SigmaskGuard {
        use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
        let mut old = SigSet::empty();
        // Cannot fail with a valid `how`.
        let _ = pthread_sigmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        );
        SigmaskGuard { old: *old.as_ref() }
    }

    fn set(mask: &libc::sigset_t) -> SigmaskGuard {
        // SAFETY: a zeroed sigset_t is a valid value.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: rt_sigprocmask reads KERNEL_SIGSET bytes of `mask` and
        // writes as many into `old`, both of a type larger than that. It
        // cannot fail with these arguments.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                mask as *const libc::sigset_t,
                &mut old as *mut libc::sigset_t,
                KERNEL_SIGSET,
            )
        };
        SigmaskGuard { old }
    }
}

impl Drop for SigmaskGuard {
    fn drop(&mut self) {
        // SAFETY: as in `set`: the mask read when the guard was made, given
        // back with the system call (so that whatever glibc's
        // `pthread_sigmask` would filter is restored exactly).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &self.old as *const libc::sigset_t,
                std::ptr::null_mut::<libc::sigset_t>(),
                KERNEL_SIGSET,
            )
        };
    }
}

/// Spare fds of the [`Reserve`] freed for what a start opens, taken again
/// when dropped (best effort: an accept loop at the limit may take a slot
/// first).
struct SparesFreed<'a>(&'a Mutex<Reserve>);

impl<'a> SparesFreed<'a> {
    fn new(reserve: &'a Mutex<Reserve>, n: usize) -> SparesFreed<'a> {
        crate::lifecycle::lock(reserve).free_spare_fds(n);
        SparesFreed(reserve)
    }
}

impl Drop for SparesFreed<'_> {
    fn drop(&mut self) {
        let _ = crate::lifecycle::lock(self.0).refill_spares();
    }
}

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
    via: Via,
}

#[derive(Debug)]
enum Via {
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
struct Intermediate {
    /// Our child until reaped: its pid, and a pidfd for it where the kernel
    /// has pidfds.
    proc: Option<(libc::pid_t, Option<OwnedFd>)>,
    /// A pidfd for the successor (not our child), where the kernel has
    /// pidfds and a slot was free.
    successor: Option<OwnedFd>,
    /// Its records.
    status: OwnedFd,
    /// Ours: a byte asks ([`KILL`], [`ACK`], [`RELEASE`]); closing it
    /// releases the intermediate.
    release: Option<OwnedFd>,
    /// The successor's status came (or is lost), or it was let go: nothing
    /// left to kill.
    done: bool,
}

/// What the intermediate said next.
enum Heard {
    Record(u32, i32, i32),
    /// Nothing by the deadline.
    Nothing,
    /// It is gone without a word (end of file, or a short record).
    Gone,
}

impl Intermediate {
    fn send(&self, byte: u8) {
        if let Some(r) = &self.release {
            // Gone already: its report (or end of file) is on the pipe.
            let _ = sys::send_all(r.as_fd(), &[byte]);
        }
    }

    /// The next record, waiting until `until`.
    fn next(&self, until: Instant) -> Heard {
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
    fn let_go(&mut self) {
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
    fn kill_proc(&self) {
        match &self.proc {
            Some((_, Some(pidfd))) => pidfd_send_sigkill(pidfd.as_fd()),
            Some((pid, None)) if child_unreaped(*pid) => {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            _ => {}
        }
    }
}

impl Child {
    /// Whether the successor has exited, without waiting: `Some(status)`
    /// (`None` inside if its status was lost).
    pub(crate) fn exited(&mut self) -> Option<Option<ExitStatus>> {
        self.wait_exit(Instant::now())
    }

    /// Waits until the successor exits or `until` passes. When it has, its
    /// process group has been killed too.
    pub(crate) fn wait_exit(&mut self, until: Instant) -> Option<Option<ExitStatus>> {
        let pid = self.pid;
        match &mut self.via {
            Via::Direct { done: true, .. } => Some(None),
            Via::Direct { pidfd, done } => {
                let rev = sys::poll_until(&[(pidfd.as_fd(), libc::POLLIN)], until).ok()?;
                if rev[0] == 0 {
                    return None;
                }
                // Exited: what it started dies with it.
                kill_direct(pid, pidfd.as_fd());
                *done = true;
                Some(wait_pidfd(pidfd.as_fd()))
            }
            Via::Intermediate(it) if it.done => Some(None),
            Via::Intermediate(it) => loop {
                match it.next(until) {
                    Heard::Nothing => return None,
                    Heard::Record(REC_STATUS, status, known) => {
                        it.let_go();
                        return Some((known == 1).then(|| ExitStatus::from_raw(status)));
                    }
                    // An exec report after a kill: not what is asked.
                    Heard::Record(..) => continue,
                    Heard::Gone => {
                        // The intermediate died without reporting (killed by
                        // someone else): the successor may live on, orphaned.
                        tracing::warn!(pid, "the intermediate process died; killing the successor");
                        kill_orphan(pid, it.successor.as_ref());
                        it.let_go();
                        return Some(None);
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
                if self.wait_exit(Instant::now() + ANSWER).is_none() {
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
                if self.wait_exit(Instant::now() + ANSWER).is_none() {
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

/// The wait status in a `waitid` answer.
fn status_of(info: &libc::siginfo_t) -> Option<ExitStatus> {
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
fn waitid_pidfd(pidfd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<libc::siginfo_t> {
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
fn wait_pidfd(pidfd: BorrowedFd<'_>) -> Option<ExitStatus> {
    status_of(&waitid_pidfd(pidfd, libc::WEXITED).ok()?)
}

/// Whether our child behind `pidfd` is unreaped (running, or a zombie): its
/// pid, and so a group id equal to it, cannot have been taken by another
/// process.
fn unreaped_pidfd(pidfd: BorrowedFd<'_>) -> bool {
    waitid_pidfd(pidfd, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT).is_ok()
}

/// Whether our child `pid` is unreaped, for kernels without pidfds.
fn child_unreaped(pid: libc::pid_t) -> bool {
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
fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    sys::poll_until(&[(pidfd, libc::POLLIN)], Instant::now()).is_ok_and(|r| r[0] != 0)
}

/// SIGKILL through a pidfd: never to another process than the one it was
/// opened for (`ESRCH` once that is gone).
fn pidfd_send_sigkill(pidfd: BorrowedFd<'_>) {
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
fn reap_child(pid: libc::pid_t, pidfd: Option<&OwnedFd>, until: Instant) {
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
fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers; the fd it returns is owned by
    // no one else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd, owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether this kernel has what watching a process through a pidfd needs:
/// `pidfd_open` (Linux 5.3), and `waitid(P_PIDFD)` (5.4; also the version
/// that has `CLONE_PIDFD`, which older kernels silently ignore). Asked once,
/// unless no fd slot was free to ask.
fn pidfds() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if let Some(can) = CAN.get() {
        return *can;
    }
    let me = match pidfd_open(std::process::id() as libc::pid_t) {
        Ok(fd) => fd,
        // No fd slot free just now (EMFILE, ENFILE) says nothing about the
        // kernel: not this time, and ask again next.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => return false,
        Err(_) => return *CAN.get_or_init(|| false),
    };
    // We are not our own child: ECHILD where P_PIDFD is known, EINVAL where
    // it is not.
    let known = match waitid_pidfd(me.as_fd(), libc::WEXITED | libc::WNOHANG) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::ECHILD),
    };
    *CAN.get_or_init(|| known)
}

/// Whether the C library lets a `CLONE_VM` child run without harm: glibc
/// 2.25 or later (no pid cache); other libcs keep none.
fn libc_allows_clone_vm() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
        let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        glibc_at_least(version.to_bytes(), (2, 25))
    }
    #[cfg(not(target_env = "gnu"))]
    true
}

/// Whether a glibc version string ("2.36", "2.25.90") is at least `min`.
#[cfg_attr(not(target_env = "gnu"), allow(dead_code))]
fn glibc_at_least(version: &[u8], min: (u32, u32)) -> bool {
    let text = String::from_utf8_lossy(version);
    let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        _ => false,
    }
}

/// Whether this kernel and C library can start a successor directly (see
/// the module docs): checked once, and by `Reserve::refill`, while fd slots
/// are plentiful.
pub(crate) fn can_start_directly() -> bool {
    libc_allows_clone_vm() && pidfds()
}

/// SIGKILL to a successor started directly and to its start process group —
/// the group only while the successor is still our unreaped child, so that
/// its pid, and so the group id, cannot have been reused: an application
/// that reaps children it did not start (`waitpid(-1)`) may have reaped it
/// behind our back. The successor itself only through its pidfd.
fn kill_direct(pid: libc::pid_t, pidfd: BorrowedFd<'_>) {
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
fn kill_orphan(pid: libc::pid_t, successor: Option<&OwnedFd>) {
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

/// Why a spawn failed.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// Failed in this process, before or at fork.
    Parent(&'static str, io::Error),
    /// The child reported a failure in `step` and exited; it was reaped.
    Child { step: u32, err: io::Error },
    /// The child had not exec'd by the deadline; it was killed and reaped.
    ExecTimeout { pid: libc::pid_t },
}

impl SpawnError {
    pub(crate) fn describe_step(step: u32) -> &'static str {
        match step {
            STEP_FDS => "arranging the handed fds",
            STEP_FORK => "fork",
            STEP_PIPE => "pipe2 in the intermediate process",
            _ => "execve",
        }
    }

    fn child(step: u32, errno: i32) -> SpawnError {
        SpawnError::Child {
            step,
            err: io::Error::from_raw_os_error(errno),
        }
    }
}

fn cstring(bytes: &[u8], what: &'static str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| {
        SpawnError::Parent(
            what,
            io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
        )
    })
}

/// A successor ready to start: everything its start needs, allocated.
pub(crate) struct Prepared {
    plan: Plan,
    /// The successor's end of the channel (the last source of `plan`).
    _channel: OwnedFd,
}

/// Prepares the start of `program` with `args`, the environment `vars` (the
/// caller has removed what must not be inherited) plus the successor
/// variables, and the fds `fds` at `3, 4, ...`, followed by `channel`.
///
/// Only the numbers of `fds` are kept: see [`Prepared::start`].
pub(crate) fn prepare(
    program: &Path,
    args: &[OsString],
    vars: impl Iterator<Item = (OsString, OsString)>,
    successor_vars: &[(&'static str, String)],
    fds: &[BorrowedFd<'_>],
    channel: OwnedFd,
) -> Result<Prepared, SpawnError> {
    let program_c = cstring(program.as_os_str().as_bytes(), "program path")?;
    let mut argv = Vec::with_capacity(args.len() + 1);
    argv.push(cstring(program.as_os_str().as_bytes(), "program path")?);
    for a in args {
        argv.push(cstring(a.as_bytes(), "argument")?);
    }
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let mut envp: Vec<Vec<u8>> = Vec::new();
    for (k, v) in vars {
        let mut e = k.into_vec();
        if e.is_empty() || e.contains(&b'=') || e.contains(&0) || v.as_bytes().contains(&0) {
            continue;
        }
        e.push(b'=');
        e.extend_from_slice(v.as_bytes());
        e.push(0);
        envp.push(e);
    }
    for (k, v) in successor_vars {
        let mut e = format!("{k}={v}").into_bytes();
        e.push(0);
        envp.push(e);
    }
    // The process group the successor joins when it reports ready (see
    // `join_predecessor_group`).
    let pgrp = getpgrp();
    envp.push(format!("{}={pgrp}\0", env::PGID).into_bytes());
    let mut pid_entry = format!("{}=", env::LISTEN_PID).into_bytes();
    let prefix = pid_entry.len();
    pid_entry.resize(prefix + PID_DIGITS + 1, 0);
    envp.push(pid_entry);
    let last = envp.len() - 1;
    // SAFETY: `prefix` is within the entry, whose heap buffer never moves:
    // `envp` is not resized after this point.
    let pid_slot = unsafe { envp[last].as_mut_ptr().add(prefix) };
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr().cast())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let max_fd = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != libc::RLIM_INFINITY => soft.min(i32::MAX as u64) as RawFd,
        _ => 65536,
    };
    let sources: Vec<RawFd> = fds
        .iter()
        .map(|f| f.as_raw_fd())
        .chain(std::iter::once(channel.as_raw_fd()))
        .collect();
    let end = env::FDS_START as usize + sources.len();
    let mut owner = vec![-1i32; end];
    for (i, f) in sources.iter().enumerate() {
        if (*f as usize) < end {
            owner[*f as usize] = i as i32;
        }
    }
    // The fds the first new process keeps: 0-2, the sources, and (room
    // made here) the intermediate's two.
    let mut keep: Vec<RawFd> = Vec::with_capacity(sources.len() + 5);
    keep.extend_from_slice(&[0, 1, 2]);
    keep.extend_from_slice(&sources);
    Ok(Prepared {
        plan: Plan {
            program: program_c,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            pid_slot,
            owner,
            sources,
            err_fd: -1,
            report: AtomicU64::new(0),
            keep,
            max_fd,
            max_signal: libc::SIGRTMAX(),
            close_first: false,
        },
        _channel: channel,
    })
}

impl Prepared {
    /// Starts the successor: directly if `direct_allowed` (no service
    /// manager must adopt it) and this process can (see the module docs),
    /// else through an intermediate process. The spare fds of `reserve` are
    /// freed for what the start opens. A successor that has not exec'd by
    /// `deadline` is killed (through an intermediate; started directly, the
    /// calling thread waits for the exec).
    ///
    /// # Safety
    /// Every fd given to [`prepare`] must still be open, under the same
    /// number, until this returns: the new process takes them by number.
    pub(crate) unsafe fn start(
        self,
        reserve: &Mutex<Reserve>,
        deadline: Instant,
        direct_allowed: bool,
    ) -> Result<Child, SpawnError> {
        let Prepared { mut plan, _channel } = self;
        if direct_allowed && can_start_directly() && !sys::children_reaped_by_kernel() {
            plan.keep.sort_unstable();
            plan.keep.dedup();
            plan.close_first = true;
            start_direct(plan, reserve)
        } else {
            start_intermediate(plan, reserve, deadline)
        }
    }
}

/// The direct start: the successor is this process's child.
fn start_direct(mut plan: Plan, reserve: &Mutex<Reserve>) -> Result<Child, SpawnError> {
    let mut stack = Stack::new().map_err(|e| SpawnError::Parent("mmap", e))?;
    // One slot, for the pidfd.
    let spares = SparesFreed::new(reserve, 1);
    let mask = SigmaskGuard::block_all();
    // SAFETY: every signal is blocked in this thread with the system call;
    // `plan` was built by `prepare`, its fds are open (`start`'s contract);
    // `can_start_directly` said the kernel knows CLONE_PIDFD. The call
    // returns once the child has exec'd or exited.
    let (pid, pidfd) = unsafe { clone_vfork(&mut plan, &mut stack) };
    // (The child shares this thread's errno: this is clone's only if it failed.)
    let clone_err = io::Error::last_os_error();
    drop(mask);
    drop(spares);
    if pid < 0 {
        return Err(SpawnError::Parent("clone", clone_err));
    }
    if pidfd < 0 {
        // The kernel ignored CLONE_PIDFD after all. Our unreaped child: its
        // pid is its own.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let mut status = 0;
        // SAFETY: waitpid writes an int through a valid pointer to a local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(SpawnError::Parent(
            "clone",
            io::Error::other("the kernel made no pidfd (CLONE_PIDFD)"),
        ));
    }
    // SAFETY: the kernel made this pidfd for us in the clone (close-on-exec);
    // nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut child = Child {
        pid,
        via: Via::Direct { pidfd, done: false },
    };
    // Written by the child before its `_exit`, if it failed; CLONE_VFORK
    // resumed this thread only after that.
    let report = plan.report.load(Ordering::SeqCst);
    if report == 0 {
        return Ok(child);
    }
    child.kill_and_reap();
    Err(SpawnError::child(
        (report >> 32) as u32,
        report as u32 as i32,
    ))
}

/// The start through an intermediate process.
fn start_intermediate(
    mut plan: Plan,
    reserve: &Mutex<Reserve>,
    deadline: Instant,
) -> Result<Child, SpawnError> {
    // Its pipes (4), a pidfd for it, one for the successor later (its own
    // two pipe ends are closed by then).
    let spares = SparesFreed::new(reserve, 5);
    let SpawnFds {
        status: (status_r, status_w),
        release: (release_ours, release_theirs),
    } = SpawnFds::open().map_err(|e| SpawnError::Parent("pipe2", e))?;
    let (status_fd, release_fd) = (status_w.as_raw_fd(), release_theirs.as_raw_fd());
    plan.keep.extend_from_slice(&[status_fd, release_fd]);
    plan.keep.sort_unstable();
    plan.keep.dedup();
    // Every signal blocked around fork (but glibc's internal two, which
    // glibc sends only to threads of this process), so that no handler of
    // this process runs in the intermediate or the child before its
    // dispositions are reset; the guard restores the mask on every path.
    let mask = SigmaskGuard::block_all_but_libc();
    // SAFETY: the child branch only runs `intermediate`, which makes
    // async-signal-safe calls on memory allocated before fork and never
    // returns; the parent branch continues normally. The fds of `plan` are
    // open (`start`'s contract).
    let ipid = unsafe { libc::fork() };
    if ipid == 0 {
        // SAFETY: we are the child of fork; see `intermediate`.
        unsafe { intermediate(&mut plan, status_fd, release_fd) }
    }
    let fork_err = io::Error::last_os_error();
    drop(mask);
    if ipid < 0 {
        return Err(SpawnError::Parent("fork", fork_err));
    }
    // It never exits before it is released (see `exec::linger`): its pid is
    // still its own.
    let ipidfd = if pidfds() {
        pidfd_open(ipid).ok()
    } else {
        None
    };
    drop((status_w, release_theirs));
    let mut it = Intermediate {
        proc: Some((ipid, ipidfd)),
        successor: None,
        status: status_r,
        release: Some(release_ours),
        done: false,
    };
    let pid = match it.next(deadline) {
        Heard::Record(REC_STARTED, pid, _) if pid > 0 => pid,
        Heard::Record(REC_FAILED, step, errno) => {
            it.let_go();
            return Err(SpawnError::child(step as u32, errno));
        }
        _ => {
            // Silent past the deadline (stopped?), or dead.
            it.kill_proc();
            it.let_go();
            return Err(SpawnError::Parent(
                "fork",
                io::Error::other("the intermediate process failed"),
            ));
        }
    };
    // It does not reap the successor before the ACK: the pid is the
    // successor's.
    it.successor = if pidfds() { pidfd_open(pid).ok() } else { None };
    it.send(ACK);
    drop(spares);
    let mut child = Child {
        pid,
        via: Via::Intermediate(it),
    };
    let Via::Intermediate(it) = &child.via else {
        unreachable!("made just above")
    };
    match it.next(deadline) {
        Heard::Record(REC_EXECD, ..) => Ok(child),
        Heard::Record(REC_FAILED, step, errno) => {
            // The successor reported and _exit()ed: collect its status.
            child.wait_exit(Instant::now() + ANSWER);
            child.kill_and_reap();
            Err(SpawnError::child(step as u32, errno))
        }
        Heard::Nothing => {
            // The deadline passed while the child was still before exec
            // (e.g. a hung filesystem). Kill it; the caller reports a
            // timeout.
            child.kill_and_reap();
            Err(SpawnError::ExecTimeout { pid })
        }
        Heard::Record(..) | Heard::Gone => {
            child.kill_and_reap();
            Err(SpawnError::Parent(
                "exec",
                io::Error::other("the intermediate process died before the successor's exec"),
            ))
        }
    }
}

/// Checks that `path` is an executable regular file, for a clear error
/// before fork.
pub(crate) fn check_program(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path",
        ));
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not executable",
        ));
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)?;
    Ok(())
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

/// Runs `program args` as a check, with its output captured (64 KiB at
/// most), killed at `deadline`. `Err((status, output))` unless it exits 0.
///
/// The spare fds of `reserve` are freed for it, and taken again after.
pub(crate) fn preflight(
    program: &Path,
    args: &[OsString],
    deadline: Instant,
    reserve: &Mutex<Reserve>,
) -> Result<(), (Option<ExitStatus>, String)> {
    let spares = |f: fn(&mut Reserve)| f(&mut reserve.lock().unwrap_or_else(|p| p.into_inner()));
    spares(Reserve::free_spares);
    let result = run_check(program, args, deadline);
    spares(|r| {
        let _ = r.refill_spares();
    });
    result
}

fn run_check(
    program: &Path,
    args: &[OsString],
    deadline: Instant,
) -> Result<(), (Option<ExitStatus>, String)> {
    use std::process::{Command, Stdio};
    const LIMIT: usize = 64 * 1024;
    let fail = |e: io::Error| (None, format!("cannot run the check: {e}"));
    let (r, w) = sys::pipe_cloexec().map_err(fail)?;
    let w2 = w.try_clone().map_err(fail)?;
    // Every fd of this process is close-on-exec: the check inherits only
    // 0, 1 and 2.
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::from(w2))
        .spawn()
        .map_err(fail)?;
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    let mut timed_out = false;
    loop {
        match sys::poll_until(&[(r.as_fd(), libc::POLLIN)], deadline) {
            Ok(rev) if rev[0] == 0 => {
                timed_out = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
        match sys::read(r.as_fd(), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = LIMIT.saturating_sub(output.len());
                output.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    // A check that closed its output may still run: wait for it, bounded.
    while !timed_out && matches!(child.try_wait(), Ok(None)) {
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().ok();
    let text = String::from_utf8_lossy(&output).into_owned();
    match status {
        Some(s) if s.success() && !timed_out => Ok(()),
        _ if timed_out => Err((None, text)),
        s => Err((s, text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's mask as the kernel has it (bit `n - 1` for
    /// signal `n`): glibc's `pthread_sigmask` hides its internal signals.
    fn kernel_mask() -> u64 {
        let mut old: libc::sigset_t = unsafe_zeroed();
        // SAFETY: rt_sigprocmask with a null new set only writes the
        // current mask, KERNEL_SIGSET bytes, into a local larger than that.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                std::ptr::null::<libc::sigset_t>(),
                &mut old as *mut libc::sigset_t,
                KERNEL_SIGSET,
            )
        };
        assert_eq!(r, 0);
        // SAFETY: the first 8 bytes of the set, as the kernel wrote them.
        unsafe { std::ptr::read_unaligned((&old as *const libc::sigset_t).cast::<u64>()) }
    }

    fn unsafe_zeroed() -> libc::sigset_t {
        // SAFETY: a zeroed sigset_t is a valid value.
        unsafe { std::mem::zeroed() }
    }

    fn bit(sig: libc::c_int) -> u64 {
        1 << (sig - 1)
    }

    #[test]
    fn every_signal_is_blocked_while_the_guard_lives_and_the_mask_is_restored() {
        let before = kernel_mask();
        assert_eq!(before & bit(libc::SIGUSR2), 0);
        {
            let _guard = SigmaskGuard::block_all();
            let during = kernel_mask();
            // glibc's internal signals (32 and 33) too; the kernel never
            // blocks SIGKILL and SIGSTOP.
            let unblockable = bit(libc::SIGKILL) | bit(libc::SIGSTOP);
            assert_eq!(during | unblockable, u64::MAX, "{during:#x}");
        }
        assert_eq!(kernel_mask(), before);
    }

    #[test]
    fn the_fork_guard_blocks_all_but_the_libc_signals_and_restores_the_mask() {
        let before = kernel_mask();
        {
            let _guard = SigmaskGuard::block_all_but_libc();
            let during = kernel_mask();
            for sig in (1..32).filter(|s| ![libc::SIGKILL, libc::SIGSTOP].contains(s)) {
                assert_ne!(during & bit(sig), 0, "signal {sig}");
            }
            assert_ne!(during & bit(libc::SIGRTMAX()), 0);
        }
        assert_eq!(kernel_mask(), before);
    }

    #[test]
    fn glibc_versions_compare_by_number() {
        assert!(glibc_at_least(b"2.36", (2, 25)));
        assert!(glibc_at_least(b"2.25", (2, 25)));
        assert!(glibc_at_least(b"3.0", (2, 25)));
        assert!(!glibc_at_least(b"2.24", (2, 25)));
        assert!(!glibc_at_least(b"2.9", (2, 25)));
        assert!(!glibc_at_least(b"garbage", (2, 25)));
    }

    /// A probe that always said no would send every start through the
    /// intermediate, and every test would still pass.
    #[test]
    fn a_kernel_from_5_4_on_starts_directly() {
        // SAFETY: a zeroed utsname is a valid value; uname fills it in.
        let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: uname writes into a valid pointer to a local.
        assert_eq!(unsafe { libc::uname(&mut uts) }, 0);
        // SAFETY: uname NUL-terminates `release`.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
        let release = release.to_string_lossy().into_owned();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if (major, minor) >= (5, 4) {
            assert!(can_start_directly(), "Linux {release}");
        }
    }
}
