//! Building and starting the successor: the one fork/exec seam.
//!
//! Everything the child needs (argv, envp, the fd layout, a map of which fd sits where) is
//! allocated before `fork(2)`. The fds an upgrade needs (channel, pipes, lock file, the pid
//! file's temporary file) are opened in advance and kept in a [`Reserve`], so that an upgrade
//! works when the process is at its fd limit — which is when a fix for an fd leak must be
//! deployed.
//!
//! Without a service manager the old generation's upgrade thread starts the successor the way
//! `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, sharing its
//! parent's memory until it execs, while the parent thread waits — no page table is copied and
//! nothing needs tearing down — and watches it through a pidfd: it stays the old generation's
//! child until that exits. Every signal is blocked around the start (restored by a guard on
//! every path).
//!
//! Under a service manager (which must see the successor as its own child before it is named
//! main), and on kernels without pidfds, the old generation forks an *intermediate* process,
//! which:
//!
//! 1. closes every fd it does not need: it is a copy of the old generation, which may hold
//!    thousands of connections and have no fd slot left;
//! 2. forks the successor, puts it into a process group of its own (`setpgid` from both sides,
//!    so that the group exists before its pid is reported), reports its pid — before the exec,
//!    so that a successor hung before it is killed at the deadline;
//! 3. then waits: released (EOF on the release socket), it exits and leaves the successor to
//!    the nearest subreaper; asked to kill (a byte on it), or seeing the successor exit, it
//!    kills the successor's whole process group — while the successor is still its unreaped
//!    child, so the group id cannot have been reused — reaps it and reports its wait status.
//!
//! Between its start and exec the successor only makes async-signal-safe system calls on
//! memory prepared before:
//!
//! 1. `setpgid(0, 0)`: a process group of its own, so that a signal sent to the service's
//!    group (`kill -HUP -- -PGID`, a terminal's hangup) does not reach it before it can
//!    handle it, and so that killing the group ends everything it started; started directly,
//!    it then closes every fd it does not need, as an intermediate would have;
//! 2. moves the error pipe above the target range, then `dup2`s each handed
//!    fd to `3, 4, ...` in order (`dup2` of two distinct fds clears
//!    `FD_CLOEXEC` on the target), first moving aside a later fd that sits on
//!    the target, and closing each old copy above the layout at once (one inside it is
//!    replaced in place by a later `dup2`); an fd already at its target only has
//!    `FD_CLOEXEC` cleared, since `dup2(fd, fd)` would keep it;
//! 3. marks every fd above the layout close-on-exec (`close_range` with
//!    `CLOSE_RANGE_CLOEXEC`, or a loop of `fcntl` on older kernels);
//! 4. discards the signals that reached it before it had its own group, resets every
//!    disposition to the default except SIGHUP, which starts ignored (see the crate docs,
//!    "Signals and process groups"), and unblocks all signals;
//! 5. writes its own pid into the pre-allocated `LISTEN_PID=` entry;
//! 6. `execve`s. If anything fails, it writes `(step, errno)` to the
//!    close-on-exec error pipe and `_exit(127)`s. EOF on that pipe in the
//!    parent means the exec succeeded.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, pthread_sigmask};
use nix::unistd::{Pid, getpgrp, getpid, setpgid};

use crate::env;
use crate::sys;

mod exec;
mod reserve;

use exec::{KILL, PID_DIGITS, Plan, STEP_FDS, STEP_FORK, Stack, clone_vfork, intermediate};
pub(crate) use reserve::{ChannelFds, Reserve, SpawnFds};

/// Restores the calling thread's signal mask when dropped.
struct SigmaskGuard {
    old: SigSet,
}

impl SigmaskGuard {
    /// Blocks every signal in the calling thread until the guard is dropped.
    fn block_all() -> SigmaskGuard {
        let mut old = SigSet::empty();
        // Cannot fail with a valid `how`.
        let _ = pthread_sigmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        );
        SigmaskGuard { old }
    }
}

impl Drop for SigmaskGuard {
    fn drop(&mut self) {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}

/// A started successor.
///
/// It is started one of two ways:
///
/// - **Directly**, when no service manager is told a main pid: the old
///   generation's upgrade thread starts it with `clone(CLONE_VM |
///   CLONE_VFORK)`, as `posix_spawn` does — nothing of the old generation's
///   memory is copied, and there is no second process to start and reap. The
///   successor stays the old generation's child until that exits, and is
///   then reparented to the nearest subreaper (or init), like any orphan. Its
///   exit is watched through a pidfd.
/// - **Through an intermediate process**, under a service manager (one that
///   must see the successor as its own child before it is named main): the
///   old generation forks an intermediate, which starts the successor the
///   same way, reports its pid, and then either forwards the successor's wait
///   status (if it exits first, or when asked to kill it) or exits when
///   released, leaving the successor to the nearest subreaper — the service
///   manager.
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
        /// Readable once the successor has exited.
        pidfd: OwnedFd,
        /// Reaped, or let go: nothing left to do.
        done: bool,
    },
    Intermediate {
        /// 0 once reaped.
        pid: libc::pid_t,
        /// The successor's wait status, 4 bytes, written by the intermediate.
        status: OwnedFd,
        /// Closing it lets the intermediate exit; a [`KILL`] byte asks it to
        /// kill the successor's group.
        release: Option<OwnedFd>,
    },
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
                Some(wait_status(pid))
            }
            Via::Intermediate {
                pid: intermediate,
                status,
                ..
            } => {
                let rev = sys::poll_until(&[(status.as_fd(), libc::POLLIN)], until).ok()?;
                if rev[0] == 0 {
                    return None;
                }
                use std::os::unix::process::ExitStatusExt;
                let mut buf = [0u8; 4];
                let status = match read_full(status.as_fd(), &mut buf) {
                    Ok(true) => Some(ExitStatus::from_raw(i32::from_ne_bytes(buf))),
                    _ => None,
                };
                if status.is_none() {
                    // The intermediate died without reporting (killed by
                    // someone else): the successor may live on, orphaned.
                    // Best effort: its group, whose id stays taken while any
                    // member lives.
                    tracing::warn!(
                        pid,
                        "the intermediate process died; killing the successor's process group"
                    );
                    kill_group(pid);
                }
                if *intermediate != 0 {
                    reap_blocking(*intermediate);
                    *intermediate = 0;
                }
                Some(status)
            }
        }
    }

    /// The fd that becomes readable when the successor exits.
    pub(crate) fn exit_fd(&self) -> BorrowedFd<'_> {
        match &self.via {
            Via::Direct { pidfd, .. } => pidfd.as_fd(),
            Via::Intermediate { status, .. } => status.as_fd(),
        }
    }

    /// Kills the successor and everything it started (its process group),
    /// and waits (bounded) until it is reaped.
    pub(crate) fn kill_and_reap(&mut self) {
        let pid = self.pid;
        match &mut self.via {
            Via::Direct { done: true, .. } | Via::Intermediate { pid: 0, .. } => {}
            Via::Direct { pidfd, .. } => {
                kill_direct(pid, pidfd.as_fd());
                if self
                    .wait_exit(Instant::now() + Duration::from_secs(5))
                    .is_none()
                {
                    // Left unreaped: a zombie of this process once it dies.
                    tracing::error!(pid, "successor did not die within 5 s of SIGKILL");
                    if let Via::Direct { done, .. } = &mut self.via {
                        *done = true;
                    }
                }
            }
            Via::Intermediate { release, .. } => {
                // The intermediate kills the group: it is the successor's
                // parent, and kills before it reaps, so the group id is still
                // the successor's. If it is gone, its report (or EOF) is on
                // the pipe.
                if let Some(r) = release {
                    let _ = sys::send_all(r.as_fd(), &[KILL]);
                }
                if self
                    .wait_exit(Instant::now() + Duration::from_secs(5))
                    .is_none()
                {
                    tracing::error!(pid, "successor did not die within 5 s of SIGKILL");
                    // The intermediate has not reaped the successor (it would
                    // have reported), so the group id is still the successor's.
                    kill_group(pid);
                    if let Via::Intermediate {
                        pid: intermediate, ..
                    } = &mut self.via
                    {
                        // Our own, unreaped intermediate: the pid is still its.
                        let _ = kill(Pid::from_raw(*intermediate), Signal::SIGKILL);
                        reap_blocking(*intermediate);
                        *intermediate = 0;
                    }
                }
            }
        }
    }

    /// Nothing is left to do: reaped already, or dealt with by the caller.
    fn forget(&mut self) {
        match &mut self.via {
            Via::Direct { done, .. } => *done = true,
            Via::Intermediate { pid, release, .. } => {
                *pid = 0;
                release.take();
            }
        }
    }

    /// Lets the successor go: it is no longer killed when this `Child` is
    /// dropped. An intermediate exits and is reaped here, and the successor
    /// is reparented to the nearest subreaper (or init); a successor started
    /// directly stays this process's child until this process exits.
    pub(crate) fn release(mut self) {
        if let Via::Intermediate { pid, release, .. } = &mut self.via {
            release.take();
            if *pid != 0 {
                reap_blocking(*pid);
            }
        }
        self.forget();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // A successor that was not let go is killed (and an intermediate is
        // never left behind).
        let live = match &self.via {
            Via::Direct { done, .. } => !done,
            Via::Intermediate { release, .. } => release.is_some(),
        };
        if live {
            self.kill_and_reap();
        }
    }
}

/// Waits for our child `pid` (which has exited, or was just killed) and
/// returns its wait status, `None` if it could not be collected.
fn wait_status(pid: libc::pid_t) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes an int through a valid pointer to a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Some(ExitStatus::from_raw(status));
        }
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// A pidfd for our child `pid`: readable once it has exited.
fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers; the fd it returns (close-on-exec
    // by definition) is owned by no one else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd, owned by us alone.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as RawFd) })
}

/// Whether this kernel has `pidfd_open` (Linux 5.3), which starting a
/// successor directly needs.
pub(crate) fn can_start_directly() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if let Some(can) = CAN.get() {
        return *can;
    }
    match pidfd_open(std::process::id() as libc::pid_t) {
        Ok(_) => *CAN.get_or_init(|| true),
        // No fd slot free just now (EMFILE, ENFILE) says nothing about the
        // kernel: through an intermediate this time, and ask again next.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => false,
        Err(_) => *CAN.get_or_init(|| false),
    }
}

/// SIGKILL to a successor and its start process group (whose id is its
/// pid): it may have joined its predecessor's group already.
fn kill_group(pid: libc::pid_t) {
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// SIGKILL to a successor started directly, through its pidfd, and to its
/// start process group — the group only while the successor is still our
/// unreaped child, so that its pid, and so the group id, cannot have been
/// reused: an application that reaps children it did not start (SIGCHLD
/// ignored, `waitpid(-1)`) may have reaped it behind our back.
fn kill_direct(pid: libc::pid_t, pidfd: BorrowedFd<'_>) {
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
    // SAFETY: a zeroed siginfo_t is a valid value to be written into.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes a siginfo_t through a valid pointer to a local;
    // WNOWAIT leaves the child as it is.
    let unreaped = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    } == 0;
    if unreaped {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
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
            _ => "execve",
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

/// Starts `program` with `args`, the environment `vars` (the caller has
/// removed what must not be inherited) plus the successor variables, and
/// the fds `fds` at `3, 4, ...`; the last entry of `fds` is the channel.
/// `pipes` come from the [`Reserve`]. `direct`: as this process's own child,
/// else through an intermediate process (see [`Child`]); direct needs
/// [`can_start_directly`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    program: &Path,
    args: &[OsString],
    vars: impl Iterator<Item = (OsString, OsString)>,
    successor_vars: &[(&'static str, String)],
    fds: &[BorrowedFd<'_>],
    pipes: SpawnFds,
    deadline: Instant,
    direct: bool,
) -> Result<Child, SpawnError> {
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

    let SpawnFds {
        err: (err_r, err_w),
        status: (status_r, status_w),
        release: (release_ours, release_theirs),
    } = pipes;
    let max_fd = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != libc::RLIM_INFINITY => soft.min(i32::MAX as u64) as RawFd,
        _ => 65536,
    };
    let (status_fd, release_fd) = (status_w.as_raw_fd(), release_theirs.as_raw_fd());
    let sources: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut keep: Vec<RawFd> = vec![0, 1, 2, err_w.as_raw_fd(), status_fd, release_fd];
    keep.extend_from_slice(&sources);
    keep.sort_unstable();
    keep.dedup();
    let mut plan = Plan {
        program: program_c,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        envp_ptrs,
        pid_slot,
        owner: {
            let end = env::FDS_START as usize + fds.len();
            let mut owner = vec![-1i32; end];
            for (i, f) in sources.iter().enumerate() {
                if (*f as usize) < end {
                    owner[*f as usize] = i as i32;
                }
            }
            owner
        },
        sources,
        err_fd: err_w.as_raw_fd(),
        keep,
        max_fd,
        max_signal: libc::SIGRTMAX(),
        close_first: direct,
    };

    if direct {
        let stack = Stack::new().map_err(|e| SpawnError::Parent("mmap", e))?;
        return spawn_direct(plan, stack, err_r, err_w, deadline);
    }
    // Block every signal around fork, so that no handler of this process
    // runs in the intermediate or the child before its dispositions are
    // reset; the guard restores the mask on every path.
    let mask = SigmaskGuard::block_all();
    // SAFETY: the child branch only runs `intermediate`, which makes
    // async-signal-safe calls on memory allocated before fork and never
    // returns; the parent branch continues normally.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the child of fork; see `intermediate`.
        unsafe { intermediate(&mut plan, status_fd, release_fd) }
    }
    let fork_err = io::Error::last_os_error();
    drop(mask);
    if pid < 0 {
        return Err(SpawnError::Parent("fork", fork_err));
    }
    drop((err_w, status_w, release_theirs));

    // The intermediate reports the successor's pid, or fails to fork it.
    let mut pid_buf = [0u8; 4];
    let got_pid = sys::poll_until(&[(status_r.as_fd(), libc::POLLIN)], deadline)
        .map_err(|e| SpawnError::Parent("poll", e))?[0]
        != 0
        && read_full(status_r.as_fd(), &mut pid_buf).unwrap_or(false);
    let mut child = Child {
        pid: i32::from_ne_bytes(pid_buf),
        via: Via::Intermediate {
            pid,
            status: status_r,
            release: Some(release_ours),
        },
    };
    if !got_pid {
        // It failed to fork (and wrote why to the error pipe), or hung. Our
        // own, unreaped intermediate: the pid is still its.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        reap_blocking(pid);
        child.forget();
        let mut report = [0u8; 8];
        let readable = sys::poll_until(&[(err_r.as_fd(), libc::POLLIN)], Instant::now())
            .is_ok_and(|r| r[0] != 0);
        if readable && read_full(err_r.as_fd(), &mut report).unwrap_or(false) {
            return Err(child_error(&report, report.len()));
        }
        return Err(SpawnError::Parent(
            "fork",
            io::Error::other("the intermediate process failed"),
        ));
    }

    // Wait for exec: EOF on the error pipe, or an 8-byte report.
    let mut report = [0u8; 8];
    let Some(got) = read_report(err_r.as_fd(), &mut report, deadline)? else {
        // The deadline passed while the child was still before exec (e.g. a
        // hung filesystem). Kill it; the caller reports a timeout.
        child.kill_and_reap();
        child.forget();
        return Err(SpawnError::ExecTimeout { pid: child.pid });
    };
    if got == 0 {
        return Ok(child);
    }
    // The successor reported and _exit()ed: collect its status.
    child.wait_exit(Instant::now() + Duration::from_secs(5));
    child.kill_and_reap();
    child.forget();
    Err(child_error(&report, got))
}

/// [`spawn`], directly: the successor is this process's child.
fn spawn_direct(
    mut plan: Plan,
    mut stack: Stack,
    err_r: OwnedFd,
    err_w: OwnedFd,
    deadline: Instant,
) -> Result<Child, SpawnError> {
    let mask = SigmaskGuard::block_all();
    // SAFETY: every signal is blocked in this thread; `plan` was built by
    // `spawn`. The call returns once the child has exec'd or exited.
    let pid = unsafe { clone_vfork(&mut plan, &mut stack) };
    let clone_err = io::Error::last_os_error();
    drop(mask);
    if pid < 0 {
        return Err(SpawnError::Parent("clone", clone_err));
    }
    drop(err_w);
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            kill_group(pid);
            wait_status(pid);
            return Err(SpawnError::Parent("pidfd_open", e));
        }
    };
    let mut child = Child {
        pid,
        via: Via::Direct { pidfd, done: false },
    };
    // Exec'd already (EOF on the error pipe: it was close-on-exec), or an
    // 8-byte report and an exit.
    let mut report = [0u8; 8];
    let got = read_report(err_r.as_fd(), &mut report, deadline)?;
    if got == Some(0) {
        return Ok(child);
    }
    child.kill_and_reap();
    let Some(got) = got else {
        return Err(SpawnError::ExecTimeout { pid: child.pid });
    };
    Err(child_error(&report, got))
}

/// Reads the child's `(step, errno)` report until EOF or 8 bytes:
/// `Some(0)` is EOF at once (the exec succeeded), `None` the deadline.
fn read_report(
    err_r: BorrowedFd<'_>,
    report: &mut [u8; 8],
    deadline: Instant,
) -> Result<Option<usize>, SpawnError> {
    let mut got = 0;
    loop {
        let revents = sys::poll_until(&[(err_r, libc::POLLIN)], deadline)
            .map_err(|e| SpawnError::Parent("poll", e))?;
        if revents[0] == 0 {
            return Ok(None);
        }
        match sys::read(err_r, &mut report[got..]) {
            Ok(0) => return Ok(Some(got)),
            Ok(n) => {
                got += n;
                if got == report.len() {
                    return Ok(Some(got));
                }
            }
            Err(e) => return Err(SpawnError::Parent("reading the exec error pipe", e)),
        }
    }
}

/// The error a child reported: `got` bytes of its `(step, errno)`.
fn child_error(report: &[u8; 8], got: usize) -> SpawnError {
    if got < report.len() {
        return SpawnError::Parent(
            "reading the exec error pipe",
            io::Error::new(io::ErrorKind::UnexpectedEof, "short report from the child"),
        );
    }
    let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
    let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
    SpawnError::Child {
        step,
        err: io::Error::from_raw_os_error(errno),
    }
}

/// Reaps our child `pid`: only called for one that has exited or been sent
/// SIGKILL.
fn reap_blocking(pid: libc::pid_t) {
    let _ = wait_status(pid);
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

    fn mask() -> SigSet {
        SigSet::thread_get_mask().expect("the thread's signal mask")
    }

    fn blocked(set: &SigSet, sig: libc::c_int) -> bool {
        Signal::try_from(sig).is_ok_and(|s| set.contains(s))
    }

    #[test]
    fn the_signal_mask_is_restored_when_the_guard_drops() {
        let before = mask();
        assert!(!blocked(&before, libc::SIGUSR2));
        {
            let _guard = SigmaskGuard::block_all();
            let during = mask();
            assert!(blocked(&during, libc::SIGUSR2) && blocked(&during, libc::SIGHUP));
        }
        let after = mask();
        for sig in 1..32 {
            assert_eq!(blocked(&before, sig), blocked(&after, sig), "signal {sig}");
        }
    }
}
