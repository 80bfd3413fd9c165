//! The async-signal-safe side of `spawn`: what runs between a successor's
//! start and its exec (`clone_vfork`, `intermediate`, `child`), and what it
//! runs on (`Plan`, `Stack`), prepared by the parent before. Code that runs
//! in the new process makes only async-signal-safe system calls: it does not
//! allocate, lock, or return into code that does; every `unsafe` block says
//! which calls it makes.
//!
//! How the new processes report, never through the end of file of an fd
//! that another process may hold a copy of (a child the application forks
//! without exec holds a copy of every fd open at its fork):
//!
//! - a successor started directly writes its `(step, errno)` into
//!   [`Plan::report`], in the memory it shares with its parent until it
//!   execs (`CLONE_VM`); the parent reads it once `clone` has returned,
//!   which with `CLONE_VFORK` is after the exec or the `_exit`;
//! - the intermediate process writes [`RECORD_LEN`]-byte records to the
//!   old generation (started, exec'd or failed, wait status), and takes
//!   single bytes from it ([`ACK`], [`KILL`], [`RELEASE`]). The successor
//!   it forks reports to it over a pipe the intermediate makes itself,
//!   single-threaded, just before that fork: only the successor holds the
//!   write end, so its end of file does mean the exec.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{FdOp, Src};
use crate::env;

/// Room for the decimal digits of any pid plus the terminating NUL.
pub(super) const PID_DIGITS: usize = 20;

/// The step of a new process (the successor, or the intermediate) that
/// failed before the successor's exec, as it reports it: a 32-bit code in a
/// record or in [`Plan::report`] ([`Step::code`], [`Step::from_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Putting the handed fds at `3, 4, ...` (the successor).
    Fds,
    /// `execve` (the successor).
    Exec,
    /// Forking the successor (the intermediate).
    Fork,
    /// Making the successor's error pipe (the intermediate).
    Pipe,
}

impl Step {
    /// Its code on the wire (never 0: a report of 0 means no failure).
    pub(super) const fn code(self) -> u32 {
        match self {
            Step::Fds => 1,
            Step::Exec => 2,
            Step::Fork => 3,
            Step::Pipe => 4,
        }
    }

    /// The step a code names; `None` for a code no version of this crate
    /// sends.
    pub(super) fn from_code(code: u32) -> Option<Step> {
        [Step::Fds, Step::Exec, Step::Fork, Step::Pipe]
            .into_iter()
            .find(|s| s.code() == code)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Fds => "arranging the handed fds",
            Step::Exec => "execve",
            Step::Fork => "fork",
            Step::Pipe => "pipe2 in the intermediate process",
        })
    }
}

/// Old generation to intermediate, on the release socket: kill the
/// successor's process group, reap it and report its status.
pub(super) const KILL: u8 = b'K';
/// Old generation to intermediate: exit, leaving the successor to the
/// nearest subreaper (end of file says the same).
pub(super) const RELEASE: u8 = b'R';
/// Old generation to intermediate: the successor's pid reached it (and it
/// took a pidfd for it): the successor may be reaped from now on.
pub(super) const ACK: u8 = b'A';

/// Intermediate to old generation: `[kind, a, b]`, three native-endian
/// 32-bit integers, written at once (a pipe write of at most `PIPE_BUF`
/// bytes is never split).
pub(super) const RECORD_LEN: usize = 12;
/// The successor was forked: `a` is its pid.
pub(super) const REC_STARTED: u32 = 1;
/// The successor exec'd.
pub(super) const REC_EXECD: u32 = 2;
/// Failed before the successor's exec: `a` is the step, `b` the errno.
pub(super) const REC_FAILED: u32 = 3;
/// The successor was reaped: `a` is its wait status, `b` 1 if that is
/// known (0: lost).
pub(super) const REC_STATUS: u32 = 4;

/// The stack a `CLONE_VM` child runs on, with a guard page below it.
pub(super) struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    const LEN: usize = 256 * 1024;

    pub(super) fn new() -> io::Result<Stack> {
        // SAFETY: an anonymous private mapping asks nothing of existing
        // memory; mprotect only touches the mapping just made.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = Stack {
                base,
                len: Self::LEN,
            };
            if libc::mprotect(base, 4096, libc::PROT_NONE) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    /// The highest address: stacks grow down on every Linux target we build for.
    fn top(&mut self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is what clone takes.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no child runs on
        // it any more (a CLONE_VFORK child has exec'd or exited).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Starts `child(plan)` in a new process that shares this process's memory
/// until it execs (`clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does):
/// the calling thread is suspended until then, and nothing is copied. The
/// kernel makes a pidfd for it in the same call (`CLONE_PIDFD`,
/// close-on-exec), so that no moment exists in which it could have been
/// reaped and its pid reused before we hold it.
///
/// Returns `(pid, pidfd)`, or `-1` with `errno` set. Whether it exec'd is
/// in `plan.report` once this returns.
///
/// A successor hung before its exec (an unresponsive file system) holds the
/// calling thread meanwhile; the checks of the program before the spawn
/// read the same file system in the same thread.
///
/// # Safety
/// Every signal must be blocked in the calling thread with the system call
/// itself (glibc's internal ones included): the child shares this process's
/// memory, and no handler of this process may run in it before it resets
/// the dispositions. `plan` must be built by `spawn`, and the kernel must
/// know `CLONE_PIDFD` (older kernels ignore the flag).
pub(super) unsafe fn clone_vfork(plan: &mut Plan, stack: &mut Stack) -> (libc::pid_t, RawFd) {
    extern "C" fn entry(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&mut Plan` given to clone below; the parent
        // is suspended until this process execs or exits, so nothing else
        // touches it meanwhile.
        unsafe { child(&mut *arg.cast::<Plan>()) }
    }
    let mut pidfd: libc::c_int = -1;
    // SAFETY: `entry` runs on `stack`, which nothing else uses, and makes
    // only async-signal-safe calls (see `child`); CLONE_VFORK keeps `plan`
    // and `stack` alive and untouched until the child has exec'd or exited.
    // With CLONE_PIDFD, glibc's wrapper passes the fifth argument as the
    // kernel's `parent_tid`, where the kernel stores the pidfd: a valid
    // pointer to a local int.
    let pid = unsafe {
        libc::clone(
            entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            (plan as *mut Plan).cast(),
            &mut pidfd as *mut libc::c_int,
        )
    };
    (pid, pidfd)
}

/// Everything the child touches, allocated before fork.
pub(super) struct Plan {
    pub(super) program: CString,
    pub(super) _argv: Vec<CString>,
    pub(super) argv_ptrs: Vec<*const libc::c_char>,
    pub(super) _envp: Vec<Vec<u8>>,
    pub(super) envp_ptrs: Vec<*const libc::c_char>,
    /// Points at the digits of the `LISTEN_PID=` entry inside `_envp`.
    pub(super) pid_slot: *mut u8,
    /// Source fds, in target order (target of `sources[i]` is `3 + i`).
    pub(super) sources: Vec<RawFd>,
    /// The steps that put them there (`layout::plan`).
    pub(super) layout: Vec<FdOp>,
    /// Where the child reports `(step, errno)`: the intermediate's pipe, or
    /// -1 (started directly: `report` only).
    pub(super) err_fd: RawFd,
    /// `(step << 32) | errno` of the child's failure, 0 if none: written by
    /// a child started directly, in the memory it shares with its parent.
    pub(super) report: AtomicU64,
    /// The fds the first new process keeps (0-2, the intermediate's pipes,
    /// the sources), sorted and without duplicates; it closes every other.
    pub(super) keep: Vec<RawFd>,
    /// `RLIMIT_NOFILE`, for the fallback close loops.
    pub(super) max_fd: RawFd,
    /// The highest signal number, read before fork.
    pub(super) max_signal: libc::c_int,
    /// Whether the child closes every fd but `keep` first (started
    /// directly: no intermediate did).
    pub(super) close_first: bool,
}

/// This thread's `errno` (async-signal-safe: reads a thread-local slot).
fn errno() -> libc::c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Writes one record to the old generation; whether it went.
///
/// # Safety
/// Child-of-fork only; async-signal-safe (one write of a stack buffer).
unsafe fn record(fd: RawFd, kind: u32, a: i32, b: i32) -> bool {
    let mut buf = [0u8; RECORD_LEN];
    buf[..4].copy_from_slice(&kind.to_ne_bytes());
    buf[4..8].copy_from_slice(&a.to_ne_bytes());
    buf[8..].copy_from_slice(&b.to_ne_bytes());
    loop {
        // SAFETY: write of a buffer on this stack, valid for its length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), RECORD_LEN) };
        if n == RECORD_LEN as isize {
            return true;
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return false;
    }
}

/// Reads the successor's `(step, errno)` from `err_r`, whose write end only
/// the successor held, and reports it: 8 bytes are a failure, end of file
/// before them the exec.
///
/// # Safety
/// Child-of-fork only; async-signal-safe (reads into a stack buffer, one
/// write).
unsafe fn relay_exec(status_fd: RawFd, err_r: RawFd) {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: read into the rest of a buffer on this stack.
        let n = unsafe { libc::read(err_r, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if !(n < 0 && errno() == libc::EINTR) {
            break;
        }
    }
    // SAFETY: as for this function.
    unsafe {
        if got == buf.len() {
            let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            record(status_fd, REC_FAILED, step as i32, errno);
        } else {
            record(status_fd, REC_EXECD, 0, 0);
        }
    }
}

/// Waits until the old generation lets this process go ([`RELEASE`], or
/// end of file: it let go or is gone), then exits. This process never exits
/// on its own otherwise, so the old generation can take a pidfd for it
/// after its fork, with its pid still its own.
///
/// # Safety
/// Child-of-fork only; async-signal-safe (read, _exit).
unsafe fn linger(release_fd: RawFd) -> ! {
    loop {
        let mut byte = 0u8;
        // SAFETY: read of one byte into a local; _exit ends the process.
        unsafe {
            let n = libc::read(release_fd, (&mut byte as *mut u8).cast(), 1);
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n != 1 || byte == RELEASE {
                libc::_exit(0);
            }
        }
    }
}

/// The intermediate process: closes what it does not need, forks the
/// successor into a process group of its own, reports its pid and its exec,
/// then exits when released, or kills the successor's group, reaps it and
/// reports its wait status when asked to or when the successor exits first
/// (and then waits to be released).
///
/// # Safety
/// Must only be called in the child of `fork`, with `plan` built by `spawn`.
/// It makes only async-signal-safe calls and never returns.
pub(super) unsafe fn intermediate(plan: &mut Plan, status_fd: RawFd, release_fd: RawFd) -> ! {
    // SAFETY: sigaction, close, close_range (syscall), pipe2, fork, setpgid,
    // kill, write, read, poll, waitpid, waitid, syscall(pidfd_open) and
    // _exit are async-signal-safe system calls; every buffer is on this
    // stack or in `plan`, allocated before the first fork. Every signal is
    // blocked (inherited from the old generation's thread), so no handler
    // of the old generation runs here — but glibc's two internal signals
    // (SIGCANCEL, SIGSETXID), which its `pthread_sigmask` does not block:
    // glibc sends them only to threads of its own process, and no one
    // sends them to this one.
    unsafe {
        // SIGCHLD back to the default first: the application may ignore it
        // (SIG_IGN, or SA_NOCLDWAIT), and the kernel would then reap the
        // successor the moment it exits — its wait status lost, and its pid
        // free for reuse before its group is killed.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGCHLD, &dfl, std::ptr::null_mut());
        // A copy of the old generation may hold every fd slot (thousands of
        // connections at the limit): keep only what the successor and this
        // process need, so that the pipe, pidfd_open and the child's dups
        // find room, and no connection the old generation closes stays open
        // here.
        close_all_but(&plan.keep, plan.max_fd);
        let channel = plan.sources.last().copied();
        // The successor's error pipe, made here: this process has one
        // thread, so only the successor will hold its write end.
        let mut pipe: [libc::c_int; 2] = [-1, -1];
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            record(status_fd, REC_FAILED, Step::Pipe.code() as i32, errno());
            linger(release_fd)
        }
        plan.err_fd = pipe[1];
        // A fork, not `clone_vfork`: the pid must reach the old generation
        // before the successor execs, so that a successor hung before its
        // exec (a stuck file system) is killed at the deadline, not left to
        // start later on its own. This process is single-threaded.
        let pid = libc::fork();
        if pid == 0 {
            child(plan)
        }
        let fork_errno = errno();
        libc::close(pipe[1]);
        if pid < 0 {
            libc::close(pipe[0]);
            record(status_fd, REC_FAILED, Step::Fork.code() as i32, fork_errno);
            linger(release_fd)
        }
        // The successor's own process group, set from this side too, so that
        // it exists before the old generation learns the pid (EACCES once
        // the child has exec'd: it has set it itself by then).
        libc::setpgid(pid, pid);
        // Our copy of the channel must not keep it open once the successor
        // has closed it.
        if let Some(channel) = channel {
            libc::close(channel);
        }
        if !record(status_fd, REC_STARTED, pid, 0) {
            // The old generation is gone, and the upgrade with it. The
            // successor is our unreaped child: its pid and group are its own.
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            while libc::waitpid(pid, &mut status, 0) < 0 && errno() == libc::EINTR {}
            libc::_exit(0);
        }
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as libc::c_int;
        let mut err_r = pipe[0];
        // The successor is not reaped before the old generation says it has
        // the pid (and a pidfd for it), so that the pid it acts on is the
        // successor's.
        let mut acked = false;
        loop {
            let watch_exit = acked && pidfd >= 0;
            // poll skips entries with a negative fd.
            let mut fds = [
                libc::pollfd {
                    fd: release_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: err_r,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if watch_exit { pidfd } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout = if acked && pidfd < 0 { 10 } else { -1 };
            libc::poll(fds.as_mut_ptr(), 3, timeout);
            let mut kill = false;
            if fds[0].revents != 0 {
                let mut byte = 0u8;
                let n = libc::read(release_fd, (&mut byte as *mut u8).cast(), 1);
                if n == 1 {
                    match byte {
                        KILL => kill = true,
                        ACK => acked = true,
                        _ => libc::_exit(0), // released
                    }
                } else if !(n < 0 && errno() == libc::EINTR) {
                    libc::_exit(0); // let go, or the old generation is gone
                }
            }
            if err_r >= 0 && fds[1].revents != 0 {
                relay_exec(status_fd, err_r);
                libc::close(err_r);
                err_r = -1;
            }
            let exited = acked
                && if pidfd >= 0 {
                    fds[2].revents != 0
                } else {
                    // Without a pidfd: look without reaping (WNOWAIT), so
                    // that the group id stays the successor's until it is
                    // killed.
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                    ) == 0
                        && info.si_pid() == pid
                };
            if kill || exited {
                if err_r >= 0 {
                    // Its exec comes before its status (a successor killed
                    // before its exec gets no report: reading could block).
                    if exited {
                        relay_exec(status_fd, err_r);
                    }
                    libc::close(err_r);
                }
                // Everything the successor started dies with it: its start
                // group, and itself (it left that group at ready()). It is
                // still our unreaped child (a zombie at worst), so `pid`
                // still names it and its group.
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
                let mut status = 0;
                let reaped = loop {
                    let r = libc::waitpid(pid, &mut status, 0);
                    if r == pid {
                        break true;
                    }
                    if r < 0 && errno() == libc::EINTR {
                        continue;
                    }
                    break false;
                };
                record(status_fd, REC_STATUS, status, reaped as i32);
                linger(release_fd)
            }
        }
    }
}

/// Closes every fd except those in `keep` (sorted, no duplicates).
///
/// # Safety
/// Child-of-fork only: closes fds other code may think it owns; makes only
/// async-signal-safe calls.
unsafe fn close_all_but(keep: &[RawFd], max_fd: RawFd) {
    /// Closes `lo..=hi`.
    ///
    /// # Safety
    /// As for `close_all_but`.
    unsafe fn close_between(lo: RawFd, hi: libc::c_uint, max_fd: RawFd) {
        // SAFETY: close_range and close are async-signal-safe system calls
        // that take plain integers.
        unsafe {
            if libc::syscall(
                libc::SYS_close_range,
                lo as libc::c_uint,
                hi,
                0 as libc::c_uint,
            ) < 0
            {
                let mut fd = lo;
                while fd < max_fd && (fd as libc::c_uint) <= hi {
                    libc::close(fd);
                    fd += 1;
                }
            }
        }
    }
    let mut next: RawFd = 0;
    for &k in keep {
        if k > next {
            // SAFETY: as for this function.
            unsafe { close_between(next, (k - 1) as libc::c_uint, max_fd) };
        }
        next = k + 1;
    }
    // SAFETY: as for this function.
    unsafe { close_between(next, libc::c_uint::MAX, max_fd) };
}

/// The successor between its start and exec.
///
/// # Safety
/// Must only be called in the child of [`clone_vfork`] (which shares its
/// parent's memory while the parent is suspended) or of the intermediate's
/// `fork`, with `plan` built by `spawn`. It makes only async-signal-safe
/// calls, allocates nothing, and never returns; what it changes in `plan`
/// (the pid entry) is scratch space nobody reads after it,
/// but for `report`, which a parent sharing this memory reads.
unsafe fn child(plan: &mut Plan) -> ! {
    let n = plan.sources.len() as RawFd;
    let floor = env::FDS_START + n;

    /// Reports `(step, errno)` and exits: into `report`, which a parent
    /// that shares this memory reads, and to `err_fd` if there is one.
    ///
    /// # Safety
    /// Child-only; async-signal-safe.
    unsafe fn fail(report: &AtomicU64, err_fd: RawFd, step: Step) -> ! {
        let errno = errno();
        let step = step.code();
        report.store(
            (u64::from(step) << 32) | u64::from(errno as u32),
            Ordering::SeqCst,
        );
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write and _exit are async-signal-safe; buf is valid for 8 bytes.
        unsafe {
            if err_fd >= 0 {
                libc::write(err_fd, buf.as_ptr().cast(), buf.len());
            }
            libc::_exit(127)
        }
    }

    // SAFETY: only setpgid, fcntl, dup2, close_range (syscall), close,
    // sigpending, sigaction, pthread_sigmask, getpid, write, execve and
    // _exit are called (and sigemptyset/sigismember, which only touch the
    // set on this stack): all async-signal-safe. Every pointer used points
    // into `plan`, allocated before the start and not freed in the child;
    // `pid_slot` has room for PID_DIGITS digits and a NUL.
    unsafe {
        // 1. A process group of its own, first: a signal sent to the
        // service's group from now on does not reach this process, and the
        // old generation can kill everything it will start. (Every signal
        // is blocked, by the mask inherited from the old generation's
        // thread: started directly, glibc's two internal ones too, blocked
        // with the system call itself; through the intermediate, all but
        // those two, which only glibc sends, and only to threads of its own
        // process, never to this one.)
        libc::setpgid(0, 0);
        if plan.close_first {
            // As the intermediate would have (see there): room for the
            // moves below even at the fd limit.
            close_all_but(&plan.keep, plan.max_fd);
        }

        // 2. Move the error pipe above the target range, then take the
        // planned steps (see `layout`): each source to its target, without
        // ever needing room for a second copy of every fd (RLIMIT_NOFILE may
        // be barely above the number of fds; the intermediate, or the close
        // above, left room above the layout for the one copy aside).
        let err_fd = if plan.err_fd >= 0 {
            let moved = libc::fcntl(plan.err_fd, libc::F_DUPFD_CLOEXEC, floor);
            if moved < 0 {
                // Reported where it still is.
                fail(&plan.report, plan.err_fd, Step::Fds);
            }
            moved
        } else {
            -1
        };
        let mut aside: RawFd = -1;
        let fd_of = |src: Src, aside: RawFd| match src {
            Src::Fd(fd) => fd,
            Src::Aside => aside,
        };
        for &op in &plan.layout {
            let ok = match op {
                // dup2 of two distinct fds clears FD_CLOEXEC on the target.
                FdOp::Dup2 { from, to } => libc::dup2(fd_of(from, aside), to) >= 0,
                FdOp::MoveAside { from, lowest } => {
                    aside = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, lowest);
                    aside >= 0
                }
                FdOp::ClearCloexec(fd) => libc::fcntl(fd, libc::F_SETFD, 0) >= 0,
                FdOp::Close(src) => {
                    libc::close(fd_of(src, aside));
                    true
                }
            };
            if !ok {
                fail(&plan.report, err_fd, Step::Fds);
            }
        }
        // 3. Everything above the layout closes at exec, fds moved aside
        // and the error pipe included.
        let r = libc::syscall(
            libc::SYS_close_range,
            floor as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
        if r < 0 {
            let mut fd = floor;
            while fd < plan.max_fd {
                if fd != err_fd {
                    libc::close(fd);
                }
                fd += 1;
            }
        }
        // Fds 0-2 are left as they are; anything that is not one of them or
        // the layout is now gone at exec.

        // 4. A fork starts with no signal pending: whatever is pending now
        // was sent to the old generation's process group before this
        // process had its own, and is not meant for it. Setting SIG_IGN
        // discards a pending signal. Then default dispositions, except
        // SIGHUP, which starts ignored until the application installs its
        // handler (the crate docs say why); nothing blocked. glibc's
        // sigaction refuses its two internal signals (SIGCANCEL and
        // SIGSETXID), which keep glibc's handlers until the exec: glibc only
        // sends them to threads of its own process, never to this one.
        let mut ign: libc::sigaction = std::mem::zeroed();
        ign.sa_sigaction = libc::SIG_IGN;
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pending);
        libc::sigpending(&mut pending);
        for sig in 1..=plan.max_signal {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            if libc::sigismember(&pending, sig) == 1 {
                libc::sigaction(sig, &ign, std::ptr::null_mut());
            }
            let action = if sig == libc::SIGHUP { &ign } else { &dfl };
            libc::sigaction(sig, action, std::ptr::null_mut());
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

        // 5. LISTEN_PID=<own pid>, written without allocating.
        let mut pid = libc::getpid() as u64;
        let mut digits = [0u8; PID_DIGITS];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (pid % 10) as u8;
            len += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        for i in 0..len {
            *plan.pid_slot.add(i) = digits[len - 1 - i];
        }
        *plan.pid_slot.add(len) = 0;

        // 6. Exec.
        libc::execve(
            plan.program.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        fail(&plan.report, err_fd, Step::Exec)
    }
}
