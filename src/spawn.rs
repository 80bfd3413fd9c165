//! Building and starting the successor: the one fork/exec seam.
//!
//! Everything the child needs (argv, envp, the fd layout, a map of which fd sits where) is
//! allocated before `fork(2)`. The fds an upgrade needs (channel, pipes, lock file, the pid
//! file's temporary file) are opened in advance and kept in a [`Reserve`], so that an upgrade
//! works when the process is at its fd limit — which is when a fix for an fd leak must be
//! deployed.
//!
//! The successor is started the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)` on a
//! stack of its own, sharing its parent's memory until it execs, while the parent thread waits —
//! no page table is copied and nothing needs tearing down. Every signal is blocked around it
//! (restored by a guard on every path).
//!
//! Without a service manager the old generation's upgrade thread starts it directly and
//! watches it through a pidfd: it stays the old generation's child until that exits. Under a
//! service manager (which must see the successor as its own child before it is named main)
//! the old generation forks an *intermediate* process, which:
//!
//! 1. closes every fd it does not need: it is a copy of the old generation, which may hold
//!    thousands of connections and have no fd slot left;
//! 2. starts the successor (in a process group of its own, which exists before its pid is
//!    reported) and reports its pid;
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
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, pthread_sigmask};
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, getpgrp, getpid, setpgid};

use crate::env;
use crate::pidfile::{self, LockFile, TempFile, UpgradeLock};
use crate::sys;

/// Room for the decimal digits of any pid plus the terminating NUL.
const PID_DIGITS: usize = 20;

/// The steps of the child that can fail, as reported over the error pipe.
const STEP_FDS: u32 = 1;
const STEP_EXEC: u32 = 2;
const STEP_FORK: u32 = 3;

/// Old generation to intermediate, on the release socket: kill the
/// successor's process group, reap it and report its status.
const KILL: u8 = b'K';

/// Spare fds in the [`Reserve`], freed for what cannot be opened in advance:
/// the preflight check's pipes and `/dev/null` (6), or the commit's
/// `BARRIER=1` pipe (2).
const SPARE_FDS: usize = 6;

/// Copies of a successor's channel to its predecessor made at build, for
/// what uses one while the successor may already be at its fd limit: the
/// state reader, the discarding of an unread state, the ready message, and
/// the task waiting on the channel (`predecessor_exited`, `committed`).
const CHANNEL_COPIES: usize = 4;

/// The pipes of one spawn.
#[derive(Debug)]
pub(crate) struct SpawnFds {
    /// The child's `(step, errno)` report, `(read, write)`.
    err: (OwnedFd, OwnedFd),
    /// The intermediate's report (successor pid, then wait status), `(read, write)`.
    status: (OwnedFd, OwnedFd),
    /// `(ours, the intermediate's)`: a socket pair, so that a byte for an
    /// intermediate that is gone is `EPIPE`, never `SIGPIPE`.
    release: (OwnedFd, OwnedFd),
}

impl SpawnFds {
    fn open() -> io::Result<SpawnFds> {
        Ok(SpawnFds {
            err: sys::pipe_cloexec()?,
            status: sys::pipe_cloexec()?,
            release: sys::socketpair_cloexec()?,
        })
    }
}

/// The channel of one upgrade.
#[derive(Debug)]
pub(crate) struct ChannelFds {
    /// The old generation's end.
    pub(crate) ours: OwnedFd,
    /// A second fd for the old generation's end, for the thread that streams
    /// the state.
    pub(crate) ours_copy: OwnedFd,
    /// The successor's end.
    pub(crate) theirs: OwnedFd,
}

impl ChannelFds {
    fn open() -> io::Result<ChannelFds> {
        let (ours, theirs) = sys::socketpair_cloexec()?;
        let ours_copy = ours.try_clone()?;
        Ok(ChannelFds {
            ours,
            ours_copy,
            theirs,
        })
    }
}

/// What an upgrade needs, opened while fds are plentiful (at build, and again
/// after each failed upgrade), so that an upgrade works at the fd limit: the
/// lock file, the channel, the spawn's pipes, the pid file's temporary file
/// and a few spare fds. Each part that is missing (it could not be opened
/// in advance) is opened when needed instead. Every fd is close-on-exec.
///
/// The spare fds are a last resort for what cannot be opened in advance:
/// freed just before it is opened, a slot may be taken by another thread of
/// the application meanwhile (an accept loop at the limit).
#[derive(Debug, Default)]
pub(crate) struct Reserve {
    lock: Option<LockFile>,
    lock_path: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    pid_tmp: Option<TempFile>,
    channel: Option<ChannelFds>,
    spawn: Option<SpawnFds>,
    spare: Vec<OwnedFd>,
    channel_copies: Vec<OwnedFd>,
}

impl Reserve {
    /// The reserve of a new generation: copies of the channel to its
    /// predecessor, if it has one, at once; the rest is opened by
    /// [`refill`](Self::refill) once the generation is ready — not while
    /// its predecessor waits for it.
    pub(crate) fn for_generation(
        pid_file: Option<&Path>,
        predecessor: Option<&OwnedFd>,
    ) -> Reserve {
        let mut r = Reserve {
            pid_file: pid_file.map(Path::to_owned),
            lock_path: pid_file.map(pidfile::lock_path),
            ..Reserve::default()
        };
        if let Some(ch) = predecessor {
            r.keep_channel_copies(ch);
        }
        r
    }

    /// Opens again what an upgrade used (best effort).
    pub(crate) fn refill(&mut self) {
        let mut failed = None;
        if let (None, Some(path)) = (&self.lock, &self.lock_path) {
            match LockFile::open(path) {
                Ok(l) => self.lock = Some(l),
                Err(e) => failed = Some(e),
            }
        }
        if let (None, Some(path)) = (&self.pid_tmp, &self.pid_file) {
            // Not on every file system: the pid file is then written anew.
            self.pid_tmp = TempFile::reserve(path).ok();
        }
        if self.channel.is_none() {
            match ChannelFds::open() {
                Ok(c) => self.channel = Some(c),
                Err(e) => failed = Some(e),
            }
        }
        if self.spawn.is_none() {
            match SpawnFds::open() {
                Ok(p) => self.spawn = Some(p),
                Err(e) => failed = Some(e),
            }
        }
        if let Err(e) = self.refill_spares() {
            failed = Some(e);
        }
        if let Some(e) = failed {
            tracing::debug!(error = %e, "cannot reserve every fd an upgrade needs; opening the rest when needed");
        }
    }

    fn refill_spares(&mut self) -> io::Result<()> {
        while self.spare.len() < SPARE_FDS {
            let spare = match (self.spare.first(), &self.spawn) {
                (Some(fd), _) => fd.try_clone()?,
                (None, Some(p)) => p.err.0.try_clone()?,
                (None, None) => return Ok(()),
            };
            self.spare.push(spare);
        }
        Ok(())
    }

    /// Takes the upgrade lock at `path` (`<pid file>.lock`) without waiting,
    /// on the lock file opened in advance. `Ok(None)`: another process holds it.
    pub(crate) fn lock_upgrades(&mut self, path: &Path) -> io::Result<Option<UpgradeLock>> {
        if self.lock.as_ref().is_none_or(|l| l.path() != path) {
            self.lock = Some(LockFile::open(path)?);
            self.lock_path = Some(path.to_owned());
        }
        self.lock.as_ref().expect("just opened").try_lock()
    }

    /// The channel for an upgrade.
    pub(crate) fn channel(&mut self) -> io::Result<ChannelFds> {
        match self.channel.take() {
            Some(c) => Ok(c),
            None => ChannelFds::open(),
        }
    }

    /// The pipes for a spawn.
    pub(crate) fn spawn_fds(&mut self) -> io::Result<SpawnFds> {
        match self.spawn.take() {
            Some(p) => Ok(p),
            None => SpawnFds::open(),
        }
    }

    /// Keeps copies of `channel`, a successor's channel to its predecessor
    /// (best effort).
    pub(crate) fn keep_channel_copies(&mut self, channel: &OwnedFd) {
        while self.channel_copies.len() < CHANNEL_COPIES {
            match channel.try_clone() {
                Ok(c) => self.channel_copies.push(c),
                Err(_) => break,
            }
        }
    }

    /// A copy of the successor's channel made in advance, if one is left.
    pub(crate) fn channel_copy(&mut self) -> Option<OwnedFd> {
        self.channel_copies.pop()
    }

    /// The predecessor is gone: its channel's copies are of no further use.
    pub(crate) fn drop_channel_copies(&mut self) {
        self.channel_copies.clear();
    }

    /// The pid file's temporary file, for an upgrade to stage its
    /// successor's pid in.
    pub(crate) fn pid_tmp(&mut self) -> Option<TempFile> {
        self.pid_tmp.take()
    }

    /// At the commit: frees the spare fds (for the service manager's
    /// barrier).
    pub(crate) fn for_commit(&mut self) {
        self.spare.clear();
    }
}

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
                // Exited and not reaped: the pid, and so the group id, are
                // still its own.
                kill_group(pid);
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
            Via::Direct { .. } => {
                kill_group(pid);
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
    *CAN.get_or_init(|| pidfd_open(std::process::id() as libc::pid_t).is_ok())
}

/// The stack a `CLONE_VM` child runs on, with a guard page below it.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    const LEN: usize = 256 * 1024;

    fn new() -> io::Result<Stack> {
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
unsafe fn clone_vfork(plan: &mut Plan, stack: &mut Stack) -> libc::pid_t {
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

/// SIGKILL to a successor and its start process group (whose id is its
/// pid): it may have joined its predecessor's group already.
fn kill_group(pid: libc::pid_t) {
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
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

/// Everything the child touches, allocated before fork.
struct Plan {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<Vec<u8>>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Points at the digits of the `LISTEN_PID=` entry inside `_envp`.
    pid_slot: *mut u8,
    /// Source fds, in target order (target of `sources[i]` is `3 + i`).
    sources: Vec<RawFd>,
    /// For each fd number below the end of the layout: the index of the
    /// source that sits there, or -1.
    owner: Vec<i32>,
    err_fd: RawFd,
    /// The fds the intermediate keeps (0-2, its pipes, the sources), sorted
    /// and without duplicates; it closes every other.
    keep: Vec<RawFd>,
    /// `RLIMIT_NOFILE`, for the fallback close loops.
    max_fd: RawFd,
    /// The highest signal number, read before fork.
    max_signal: libc::c_int,
    /// Whether the child closes every fd but `keep` first (started
    /// directly: no intermediate did).
    close_first: bool,
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

    let mut stack = Stack::new().map_err(|e| SpawnError::Parent("mmap", e))?;
    if direct {
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
        unsafe { intermediate(&mut plan, &mut stack, status_fd, release_fd) }
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
            return Err(child_error(&report));
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
    if got < report.len() {
        return Err(SpawnError::Parent(
            "reading the exec error pipe",
            io::Error::new(io::ErrorKind::UnexpectedEof, "short report from the child"),
        ));
    }
    Err(child_error(&report))
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
    if got < report.len() {
        return Err(SpawnError::Parent(
            "reading the exec error pipe",
            io::Error::new(io::ErrorKind::UnexpectedEof, "short report from the child"),
        ));
    }
    Err(child_error(&report))
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

fn child_error(report: &[u8; 8]) -> SpawnError {
    let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
    let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
    SpawnError::Child {
        step,
        err: io::Error::from_raw_os_error(errno),
    }
}

/// The intermediate process: closes what it does not need, forks the
/// successor into a process group of its own, reports its pid, then exits
/// when released, or kills the successor's group, reaps it and reports its
/// wait status when asked to or when the successor exits first.
///
/// # Safety
/// Must only be called in the child of `fork`, with `plan` built by `spawn`.
/// It makes only async-signal-safe calls and never returns.
unsafe fn intermediate(
    plan: &mut Plan,
    stack: &mut Stack,
    status_fd: RawFd,
    release_fd: RawFd,
) -> ! {
    // SAFETY: close, close_range (syscall), clone, setpgid, kill, write,
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
        // Read before the child, which shares this memory, rearranges them.
        let (err_fd, channel) = (plan.err_fd, plan.sources.last().copied());
        let pid = clone_vfork(plan, stack);
        if pid < 0 {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&STEP_FORK.to_ne_bytes());
            buf[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err_fd, buf.as_ptr().cast(), buf.len());
            libc::_exit(127);
        }
        // The successor has exec'd (or failed) by now, in a process group
        // of its own, which exists before the old generation learns the pid.
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
/// Must only be called in the child of [`clone_vfork`], with `plan` built by
/// `spawn`. It shares its parent's memory (the parent is suspended), so it
/// makes only async-signal-safe calls, allocates nothing, and never
/// returns; what it changes in `plan` (the fd layout, the pid entry) is
/// scratch space nobody reads after it.
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

/// Reaps our child `pid`: only called for one that has exited or been sent
/// SIGKILL.
fn reap_blocking(pid: libc::pid_t) {
    while let Err(nix::errno::Errno::EINTR) = waitpid(Pid::from_raw(pid), None) {}
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
    spares(|r| r.spare.clear());
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

    #[test]
    fn the_reserve_holds_close_on_exec_fds_and_opens_more_when_empty() {
        let dir = std::env::temp_dir().join(format!("handover-reserve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("x.pid");
        let mut r = Reserve::for_generation(Some(&pid_file), None);
        assert!(r.lock.is_none() && r.channel.is_none(), "opened by refill");
        r.refill();
        assert!(r.lock.is_some() && r.channel.is_some() && r.spawn.is_some());
        assert_eq!(r.spare.len(), SPARE_FDS);
        let c = r.channel().unwrap();
        let p = r.spawn_fds().unwrap();
        for fd in [
            &c.ours,
            &c.ours_copy,
            &c.theirs,
            &p.err.0,
            &p.status.1,
            &p.release.0,
        ]
        .into_iter()
        .chain(&r.spare)
        {
            assert!(sys::is_cloexec(fd.as_fd()).unwrap());
        }
        // Taken: the next ones are opened on demand; refill reserves again.
        assert!(r.channel.is_none());
        assert!(r.channel().is_ok() && r.spawn_fds().is_ok());
        r.refill();
        assert!(r.channel.is_some() && r.spawn.is_some());
        let lock_path = pidfile::lock_path(&pid_file);
        let held = r.lock_upgrades(&lock_path).unwrap().expect("free");
        let other = LockFile::open(&lock_path).unwrap();
        assert!(other.try_lock().unwrap().is_none());
        drop(held);
        assert!(other.try_lock().unwrap().is_some());
        r.for_commit();
        assert!(r.spare.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
