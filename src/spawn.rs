//! Building and starting the successor: the one fork/exec seam.
//!
//! Everything the child needs (argv, envp, the fd layout, a map of which fd sits where) is
//! allocated before `fork(2)`. Between fork and exec the child only makes
//! async-signal-safe system calls on that memory:
//!
//! 1. moves the error pipe above the target range, then `dup2`s each handed
//!    fd to `3, 4, ...` in order (`dup2` of two distinct fds clears
//!    `FD_CLOEXEC` on the target), first moving aside a later fd that sits on
//!    the target, and closing each old copy at once; an fd already at its
//!    target only has `FD_CLOEXEC` cleared, since `dup2(fd, fd)` would keep it;
//! 2. marks every fd above the layout close-on-exec (`close_range` with
//!    `CLOSE_RANGE_CLOEXEC`, or a loop of `fcntl` on older kernels);
//! 3. resets signal dispositions to default and unblocks all signals;
//! 4. writes its own pid into the pre-allocated `LISTEN_PID=` entry;
//! 5. `execve`s. If anything fails, it writes `(step, errno)` to the
//!    close-on-exec error pipe and `_exit(127)`s. EOF on that pipe in the
//!    parent means the exec succeeded.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::env;
use crate::sys::{self, syscall};

/// Room for the decimal digits of any pid plus the terminating NUL.
const PID_DIGITS: usize = 20;

/// The steps of the child that can fail, as reported over the error pipe.
const STEP_FDS: u32 = 1;
const STEP_EXEC: u32 = 2;
const STEP_FORK: u32 = 3;

/// A started successor.
///
/// It is started through an intermediate process (a double fork): the
/// intermediate forks the successor, reports its pid, and then either
/// forwards the successor's wait status (if it exits first) or exits when
/// released. Released after a successful upgrade, it leaves the successor
/// an orphan, reparented at once to the nearest subreaper — the service
/// manager under systemd — so that the successor is never a child of the
/// old generation when it becomes the main process.
#[derive(Debug)]
pub(crate) struct Child {
    /// The successor's pid.
    pub pid: libc::pid_t,
    intermediate: libc::pid_t,
    /// The successor's wait status, 4 bytes, written by the intermediate.
    status: OwnedFd,
    /// Closing it lets the intermediate exit.
    release: Option<OwnedFd>,
}

impl Child {
    /// Whether the successor has exited, without waiting: `Some(status)`
    /// (`None` inside if its status was lost).
    pub(crate) fn exited(&mut self) -> Option<Option<ExitStatus>> {
        self.wait_exit(Instant::now())
    }

    /// Waits until the successor exits or `until` passes.
    pub(crate) fn wait_exit(&mut self, until: Instant) -> Option<Option<ExitStatus>> {
        let rev = sys::poll_until(&[(self.status.as_fd(), libc::POLLIN)], until).ok()?;
        if rev[0] == 0 {
            return None;
        }
        use std::os::unix::process::ExitStatusExt;
        let mut buf = [0u8; 4];
        let status = match read_full(self.status.as_fd(), &mut buf) {
            Ok(true) => Some(ExitStatus::from_raw(i32::from_ne_bytes(buf))),
            _ => None,
        };
        reap_blocking(self.intermediate);
        self.intermediate = 0;
        Some(status)
    }

    /// The fd that becomes readable when the successor exits.
    pub(crate) fn exit_fd(&self) -> BorrowedFd<'_> {
        self.status.as_fd()
    }

    /// Kills the successor and waits (bounded) until it is reaped.
    pub(crate) fn kill_and_reap(&mut self) {
        if self.intermediate == 0 {
            return; // already reported and reaped
        }
        // SAFETY: kill with the pid of a successor the intermediate has not
        // reaped: it reaps only when reporting, which we have not read yet.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        if self
            .wait_exit(Instant::now() + Duration::from_secs(5))
            .is_none()
        {
            tracing::error!(
                pid = self.pid,
                "successor did not die within 5 s of SIGKILL"
            );
            // SAFETY: kill with the pid of our own, unreaped intermediate.
            unsafe {
                libc::kill(self.intermediate, libc::SIGKILL);
            }
            reap_blocking(self.intermediate);
            self.intermediate = 0;
        }
    }

    /// Lets the successor go: the intermediate exits and is reaped, and the
    /// successor is reparented to the nearest subreaper (or init).
    pub(crate) fn release(mut self) {
        self.release.take();
        if self.intermediate != 0 {
            reap_blocking(self.intermediate);
            self.intermediate = 0;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Never leave the intermediate behind; a successor that was not
        // released is killed with it.
        if self.release.is_some() {
            self.kill_and_reap();
        }
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
    /// `RLIMIT_NOFILE`, for the fallback close loop.
    max_fd: RawFd,
    /// The highest signal number, read before fork.
    max_signal: libc::c_int,
}

/// Starts `program` with `args`, the environment `vars` (the caller has
/// removed what must not be inherited) plus the successor variables, and
/// the fds `fds` at `3, 4, ...`; the last entry of `fds` is the channel.
pub(crate) fn spawn(
    program: &Path,
    args: &[OsString],
    vars: impl Iterator<Item = (OsString, OsString)>,
    successor_vars: &[(&'static str, String)],
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
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

    let (err_r, err_w) = sys::pipe_cloexec().map_err(|e| SpawnError::Parent("pipe2", e))?;
    // SAFETY: an all-zero rlimit is a valid value of this plain C struct.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // getrlimit writes into the struct it is given.
    let max_fd = match syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut rl)) {
        Ok(_) if rl.rlim_cur != libc::RLIM_INFINITY => rl.rlim_cur.min(i32::MAX as u64) as RawFd,
        _ => 65536,
    };
    let mut plan = Plan {
        program: program_c,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        envp_ptrs,
        pid_slot,
        sources: fds.iter().map(|f| f.as_raw_fd()).collect(),
        owner: {
            let end = env::FDS_START as usize + fds.len();
            let mut owner = vec![-1i32; end];
            for (i, f) in fds.iter().enumerate() {
                if (f.as_raw_fd() as usize) < end {
                    owner[f.as_raw_fd() as usize] = i as i32;
                }
            }
            owner
        },
        err_fd: err_w.as_raw_fd(),
        max_fd,
        max_signal: libc::SIGRTMAX(),
    };

    // Block every signal around fork, so that no handler of this process
    // runs in the child before its dispositions are reset.
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both point to valid sigset_t values.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let (status_r, status_w) = sys::pipe_cloexec().map_err(|e| SpawnError::Parent("pipe2", e))?;
    let (release_r, release_w) = sys::pipe_cloexec().map_err(|e| SpawnError::Parent("pipe2", e))?;
    let (status_fd, release_fd) = (status_w.as_raw_fd(), release_r.as_raw_fd());
    let release_w_fd = release_w.as_raw_fd();
    // SAFETY: the child branch only runs `intermediate`, which makes
    // async-signal-safe calls on memory allocated before fork and never
    // returns; the parent branch continues normally.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the child of fork; see `intermediate`.
        unsafe { intermediate(&mut plan, status_fd, release_fd, release_w_fd) }
    }
    // SAFETY: `old` was filled in by pthread_sigmask above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    if pid < 0 {
        return Err(SpawnError::Parent("fork", io::Error::last_os_error()));
    }
    drop((err_w, status_w, release_r));

    // The intermediate reports the successor's pid, or fails to fork it.
    let mut pid_buf = [0u8; 4];
    let got_pid = sys::poll_until(&[(status_r.as_fd(), libc::POLLIN)], deadline)
        .map_err(|e| SpawnError::Parent("poll", e))?[0]
        != 0
        && read_full(status_r.as_fd(), &mut pid_buf).unwrap_or(false);
    let mut child = Child {
        pid: i32::from_ne_bytes(pid_buf),
        intermediate: pid,
        status: status_r,
        release: Some(release_w),
    };
    if !got_pid {
        // It failed to fork (and wrote why to the error pipe), or hung.
        // SAFETY: kill with the pid of our own, unreaped intermediate.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        reap_blocking(pid);
        child.intermediate = 0;
        child.release = None;
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
    let mut got = 0;
    loop {
        let revents = sys::poll_until(&[(err_r.as_fd(), libc::POLLIN)], deadline)
            .map_err(|e| SpawnError::Parent("poll", e))?;
        if revents[0] == 0 {
            // The deadline passed while the child was still before exec
            // (e.g. a hung filesystem). Kill it; the caller reports a timeout.
            child.kill_and_reap();
            child.release = None;
            return Err(SpawnError::ExecTimeout { pid: child.pid });
        }
        match sys::read(err_r.as_fd(), &mut report[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == report.len() {
                    break;
                }
            }
            Err(e) => return Err(SpawnError::Parent("reading the exec error pipe", e)),
        }
    }
    if got == 0 {
        return Ok(child);
    }
    // The successor reported and _exit()ed: collect its status.
    child.wait_exit(Instant::now() + Duration::from_secs(5));
    child.kill_and_reap();
    child.release = None;
    if got < report.len() {
        return Err(SpawnError::Parent(
            "reading the exec error pipe",
            io::Error::new(io::ErrorKind::UnexpectedEof, "short report from the child"),
        ));
    }
    Err(child_error(&report))
}

fn child_error(report: &[u8; 8]) -> SpawnError {
    let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
    let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
    SpawnError::Child {
        step,
        err: io::Error::from_raw_os_error(errno),
    }
}

/// The intermediate process: forks the successor, reports its pid, then
/// forwards its wait status or exits when released.
///
/// # Safety
/// Must only be called in the child of `fork`, with `plan` built by `spawn`.
/// It makes only async-signal-safe calls and never returns.
unsafe fn intermediate(
    plan: &mut Plan,
    status_fd: RawFd,
    release_fd: RawFd,
    release_w: RawFd,
) -> ! {
    // SAFETY: fork, close, write, poll, waitpid, syscall(pidfd_open) and
    // _exit are async-signal-safe; every buffer is on this stack or in
    // `plan`, allocated before the first fork.
    unsafe {
        // Only the old generation may hold the release pipe's write end:
        // its closing is the signal to exit.
        libc::close(release_w);
        let pid = libc::fork();
        if pid == 0 {
            child(plan)
        }
        if pid < 0 {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&STEP_FORK.to_ne_bytes());
            buf[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(plan.err_fd, buf.as_ptr().cast(), buf.len());
            libc::_exit(127);
        }
        // Our copies of the error pipe and of the channel must not keep
        // them open once the successor has closed them.
        libc::close(plan.err_fd);
        if let Some(channel) = plan.sources.last() {
            libc::close(*channel);
        }
        let bytes = pid.to_ne_bytes();
        if libc::write(status_fd, bytes.as_ptr().cast(), 4) != 4 {
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
            if fds[0].revents != 0 {
                libc::_exit(0); // released (or the old generation is gone)
            }
            let mut status = 0;
            if libc::waitpid(pid, &mut status, libc::WNOHANG) == pid {
                let bytes = status.to_ne_bytes();
                libc::write(status_fd, bytes.as_ptr().cast(), 4);
                libc::_exit(0);
            }
        }
    }
}

/// The child between fork and exec.
///
/// # Safety
/// Must only be called in the child of `fork`, with `plan` built by `spawn`.
/// It makes only async-signal-safe calls and never returns.
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

    // SAFETY: only fcntl, dup2, close_range (syscall), close, sigaction,
    // pthread_sigmask, getpid, write, execve and _exit are called: all
    // async-signal-safe. Every pointer used points into `plan`, allocated
    // before fork and not freed in the child; `pid_slot` has room for
    // PID_DIGITS digits and a NUL.
    unsafe {
        // 1. Move the error pipe above the target range. Then place each
        // source at its target, in target order, without needing room for a
        // second copy of every fd (RLIMIT_NOFILE may be barely above the
        // number of fds): a source already at its target only loses
        // FD_CLOEXEC (dup2(fd, fd) would keep it); a target still holding a
        // later entry's source is vacated first, by moving that source above
        // the range; every placed source's old copy is closed at once.
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
            if (src as usize) < plan.owner.len() {
                plan.owner[src as usize] = -1;
            }
            libc::close(src);
        }
        // 2. Everything above the layout closes at exec, fds moved aside
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

        // 3. Default dispositions, nothing blocked.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=plan.max_signal {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

        // 4. LISTEN_PID=<own pid>, written without allocating.
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

        // 5. Exec.
        libc::execve(
            plan.program.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        fail(err_fd, STEP_EXEC)
    }
}

fn reap_blocking(pid: libc::pid_t) {
    let mut status = 0;
    // waitpid writes the status into the int it is given. Only called for a
    // child that has exited or been sent SIGKILL.
    while let Err(e) = syscall!(waitpid(pid, &mut status, 0)) {
        if e.kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
}

/// The absolute path of the running binary, as captured at start.
///
/// A binary replaced while running reads as `"/path (deleted)"`; the
/// suffix is removed, so that the path names what is there now.
pub(crate) fn current_exe() -> io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").or_else(|_| std::env::current_exe())?;
    let bytes = exe.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(stripped) => PathBuf::from(OsStr::from_bytes(stripped)),
        None => exe,
    })
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
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))?;
    // access reads the NUL-terminated path.
    syscall!(access(c.as_ptr(), libc::X_OK))?;
    Ok(())
}

/// Runs `program args` as a check, with its output captured (64 KiB at
/// most), killed at `deadline`. `Err((status, output))` unless it exits 0.
pub(crate) fn preflight(
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
