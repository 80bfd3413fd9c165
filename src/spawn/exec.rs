//! The async-signal-safe side of `spawn`: what runs between a successor's
//! start and its exec (`clone_vfork`, `intermediate`, `child`), and what it
//! runs on (`Plan`, `Stack`), prepared by the parent before. Code that runs
//! in the new process makes only async-signal-safe system calls: it does not
//! allocate, lock, or return into code that does; every `unsafe` block says
//! which calls it makes.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

use crate::env;

/// Room for the decimal digits of any pid plus the terminating NUL.
pub(super) const PID_DIGITS: usize = 20;

/// The steps of the child that can fail, as reported over the error pipe.
pub(super) const STEP_FDS: u32 = 1;
pub(super) const STEP_EXEC: u32 = 2;
pub(super) const STEP_FORK: u32 = 3;

/// Old generation to intermediate, on the release socket: kill the
/// successor's process group, reap it and report its status.
pub(super) const KILL: u8 = b'K';

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
/// the calling thread is suspended until then, and nothing is copied.
/// Returns its pid, or -1 with `errno` set.
///
/// A successor hung before its exec (an unresponsive file system) holds the
/// calling thread meanwhile; the checks of the program before the spawn
/// read the same file system in the same thread.
///
/// # Safety
/// Every signal must be blocked in the calling thread: the child shares this
/// process's memory, and no handler of this process may run in it (it
/// resets every disposition before it unblocks them). `plan` must be built
/// by `spawn`.
pub(super) unsafe fn clone_vfork(plan: &mut Plan, stack: &mut Stack) -> libc::pid_t {
    extern "C" fn entry(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&mut Plan` given to clone below; the parent
        // is suspended until this process execs or exits, so nothing else
        // touches it meanwhile.
        unsafe { child(&mut *arg.cast::<Plan>()) }
    }
    // SAFETY: `entry` runs on `stack`, which nothing else uses, and makes
    // only async-signal-safe calls (see `child`); CLONE_VFORK keeps `plan`
    // and `stack` alive and untouched until the child has exec'd or exited.
    unsafe {
        libc::clone(
            entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (plan as *mut Plan).cast(),
        )
    }
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
    /// For each fd number below the end of the layout: the index of the
    /// source that sits there, or -1.
    pub(super) owner: Vec<i32>,
    pub(super) err_fd: RawFd,
    /// The fds the intermediate keeps (0-2, its pipes, the sources), sorted
    /// and without duplicates; it closes every other.
    pub(super) keep: Vec<RawFd>,
    /// `RLIMIT_NOFILE`, for the fallback close loops.
    pub(super) max_fd: RawFd,
    /// The highest signal number, read before fork.
    pub(super) max_signal: libc::c_int,
    /// Whether the child closes every fd but `keep` first (started
    /// directly: no intermediate did).
    pub(super) close_first: bool,
}

/// The intermediate process: closes what it does not need, forks the
/// successor into a process group of its own, reports its pid, then exits
/// when released, or kills the successor's group, reaps it and reports its
/// wait status when asked to or when the successor exits first.
///
/// # Safety
/// Must only be called in the child of `fork`, with `plan` built by `spawn`.
/// It makes only async-signal-safe calls and never returns.
pub(super) unsafe fn intermediate(plan: &mut Plan, status_fd: RawFd, release_fd: RawFd) -> ! {
    // SAFETY: close, close_range (syscall), fork, setpgid, kill, write,
    // read, poll, waitpid, waitid, syscall(pidfd_open) and _exit are
    // async-signal-safe system calls; every buffer is on this stack or in
    // `plan`, allocated before the first fork. Every signal is blocked
    // (inherited from the old generation's thread), so no handler runs.
    unsafe {
        // A copy of the old generation may hold every fd slot (thousands of
        // connections at the limit): keep only what the successor and this
        // process need — which also closes the release socket's other end,
        // whose closing is the signal to exit — so that pidfd_open and the
        // child's dups find room, and no connection the old generation
        // closes stays open here.
        close_all_but(&plan.keep, plan.max_fd);
        let (err_fd, channel) = (plan.err_fd, plan.sources.last().copied());
        // A fork, not `clone_vfork`: the pid must reach the old generation
        // before the successor execs, so that a successor hung before its
        // exec (a stuck file system) is killed at the deadline, not left to
        // start later on its own. This process is single-threaded.
        let pid = libc::fork();
        if pid == 0 {
            child(plan)
        }
        if pid < 0 {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&STEP_FORK.to_ne_bytes());
            buf[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err_fd, buf.as_ptr().cast(), buf.len());
            libc::_exit(127);
        }
        // The successor's own process group, set from this side too, so that
        // it exists before the old generation learns the pid (EACCES once
        // the child has exec'd: it has set it itself by then).
        libc::setpgid(pid, pid);
        // Our copies of the error pipe and of the channel must not keep
        // them open once the successor has closed them.
        libc::close(err_fd);
        if let Some(channel) = channel {
            libc::close(channel);
        }
        let bytes = pid.to_ne_bytes();
        if libc::write(status_fd, bytes.as_ptr().cast(), 4) != 4 {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as libc::c_int;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: release_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: pidfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let (n, timeout) = if pidfd >= 0 { (2, -1) } else { (1, 10) };
            libc::poll(fds.as_mut_ptr(), n, timeout);
            let mut kill = false;
            if fds[0].revents != 0 {
                let mut byte = 0u8;
                if libc::read(release_fd, (&mut byte as *mut u8).cast(), 1) != 1 {
                    libc::_exit(0); // released (or the old generation is gone)
                }
                kill = byte == KILL;
            }
            let exited = if pidfd >= 0 {
                fds[1].revents != 0
            } else {
                // Without a pidfd: look without reaping (WNOWAIT), so that
                // the group id stays the successor's until it is killed.
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
                // Everything the successor started dies with it: its start
                // group, and itself (it left that group at ready()). It is
                // still our unreaped child (a zombie at worst), so `pid`
                // still names it and its group.
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
                let mut status = 0;
                while libc::waitpid(pid, &mut status, 0) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                let bytes = status.to_ne_bytes();
                libc::write(status_fd, bytes.as_ptr().cast(), 4);
                libc::_exit(0);
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
/// (the fd layout, the pid entry) is scratch space nobody reads after it.
unsafe fn child(plan: &mut Plan) -> ! {
    let n = plan.sources.len() as RawFd;
    let floor = env::FDS_START + n;

    /// Reports `(step, errno)` and exits.
    ///
    /// # Safety
    /// Child-only; async-signal-safe.
    unsafe fn fail(err_fd: RawFd, step: u32) -> ! {
        // SAFETY: __errno_location returns this thread's errno slot.
        let errno = unsafe { *libc::__errno_location() };
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write and _exit are async-signal-safe; buf is valid for 8 bytes.
        unsafe {
            libc::write(err_fd, buf.as_ptr().cast(), buf.len());
            libc::_exit(127)
        }
    }

    // SAFETY: only setpgid, fcntl, dup2, close_range (syscall), close,
    // sigpending, sigaction, pthread_sigmask, getpid, write, execve and
    // _exit are called (and sigemptyset/sigismember, which only touch the
    // set on this stack): all async-signal-safe. Every pointer used points
    // into `plan`, allocated before fork and not freed in the child;
    // `pid_slot` has room for PID_DIGITS digits and a NUL.
    unsafe {
        // 1. A process group of its own, first: a signal sent to the
        // service's group from now on does not reach this process, and the
        // old generation can kill everything it will start. (Every signal
        // is blocked, inherited through the intermediate.)
        libc::setpgid(0, 0);
        if plan.close_first {
            // As the intermediate would have (see there): room for the
            // moves below even at the fd limit.
            close_all_but(&plan.keep, plan.max_fd);
        }

        // 2. Move the error pipe above the target range. Then place each
        // source at its target, in target order, without needing room for a
        // second copy of every fd (RLIMIT_NOFILE may be barely above the
        // number of fds): a source already at its target only loses
        // FD_CLOEXEC (dup2(fd, fd) would keep it); a target still holding a
        // later entry's source is vacated first, by moving that source above
        // the range (the intermediate closed what it does not need, so
        // there is room above).
        let err_fd = libc::fcntl(plan.err_fd, libc::F_DUPFD_CLOEXEC, floor);
        if err_fd < 0 {
            libc::_exit(126);
        }
        for i in 0..plan.sources.len() {
            let target = env::FDS_START + i as RawFd;
            let src = plan.sources[i];
            if src == target {
                if libc::fcntl(src, libc::F_SETFD, 0) < 0 {
                    fail(err_fd, STEP_FDS);
                }
                plan.owner[target as usize] = -1;
                continue;
            }
            let occupant = plan.owner[target as usize];
            if occupant >= 0 && occupant as usize != i {
                let moved = libc::fcntl(target, libc::F_DUPFD_CLOEXEC, floor);
                if moved < 0 {
                    fail(err_fd, STEP_FDS);
                }
                plan.sources[occupant as usize] = moved;
                plan.owner[target as usize] = -1;
            }
            // dup2 of two distinct fds clears FD_CLOEXEC on the target.
            if libc::dup2(src, target) < 0 {
                fail(err_fd, STEP_FDS);
            }
            if (env::FDS_START..floor).contains(&src) {
                // Inside the layout: a later dup2 replaces the old copy in
                // place, with no syscall of its own.
                plan.owner[src as usize] = -1;
            } else {
                // Outside it: close the old copy now, so that placing n fds
                // never needs room for 2n (and nothing lands on 0-2).
                libc::close(src);
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
        // handler (the crate docs say why); nothing blocked.
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
        fail(err_fd, STEP_EXEC)
    }
}
