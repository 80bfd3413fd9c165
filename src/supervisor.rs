//! A stable PID 1 for containers: a small supervisor that outlives every
//! generation.
//!
//! In a container the server is usually PID 1 of its PID namespace (or the
//! only child of `tini`/`dumb-init`, which exit when it does). An upgrade
//! starts a successor and ends the old process — and when PID 1 exits, the
//! kernel kills every process of the namespace, the successor included. So a
//! plain handover ends the container at the first upgrade.
//!
//! [`Supervisor`] keeps PID 1 alive instead. It starts the server as its
//! child and acts for it as a minimal service manager speaking the
//! `sd_notify` protocol over a private `NOTIFY_SOCKET`, exactly like systemd
//! with `NotifyAccess=main`:
//!
//! - the handover choreography already names the successor main
//!   (`MAINPID=`) before the old generation drains, so the supervisor always
//!   knows which process serves;
//! - signals sent to PID 1 (SIGTERM from `docker stop`, SIGHUP to upgrade, …)
//!   go to the current main process;
//! - every process of the namespace that exits is reaped: the old
//!   generations and anything else reparented to PID 1;
//! - when the main process exits, the supervisor exits with its status (a
//!   signal `n` becomes `128 + n`), ending the container as it should.
//!
//! It owns no listener: the server binds its sockets and hands them on as
//! usual. Outside PID 1 it makes itself a child subreaper, so that it also
//! works as the child of `tini` or `dumb-init`.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use crate::sys::{self, syscall};

/// Set in the server's environment by the supervisor: a server that sees it
/// must not start another supervisor.
pub const SUPERVISED_VAR: &str = "HANDOVER_SUPERVISED";

/// The signals the supervisor passes on to the main process.
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// Whether this process should become the supervisor of the server rather
/// than serve itself: it is PID 1 of its namespace, and was not started by
/// a supervisor.
pub fn should_supervise() -> bool {
    std::process::id() == 1 && std::env::var_os(SUPERVISED_VAR).is_none()
}

/// Runs a server as a child and outlives its generations; see the
/// [module documentation](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Supervisor {
    program: PathBuf,
    args: Vec<OsString>,
}

impl Supervisor {
    /// Supervises `program` run with `args` (without `argv[0]`).
    pub fn new<I, S>(program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Supervisor {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// Supervises this same binary, run again with `args`: the usual way to
    /// use it, at the top of `main` before anything else runs.
    ///
    /// ```no_run
    /// # fn serve() -> std::process::ExitCode { std::process::ExitCode::SUCCESS }
    /// fn main() -> std::process::ExitCode {
    ///     if handover::supervisor::should_supervise() {
    ///         let args = std::env::args_os().skip(1);
    ///         return match handover::supervisor::Supervisor::current_exe(args)
    ///             .and_then(|s| s.run())
    ///         {
    ///             Ok(code) => std::process::ExitCode::from(code),
    ///             Err(e) => {
    ///                 eprintln!("supervisor: {e}");
    ///                 std::process::ExitCode::FAILURE
    ///             }
    ///         };
    ///     }
    ///     serve()
    /// }
    /// ```
    pub fn current_exe<I, S>(args: I) -> Result<Self, crate::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let program = crate::spawn::current_exe()
            .map_err(|e| crate::Error::io("cannot find the running binary", e))?;
        Ok(Supervisor::new(program, args))
    }

    /// Starts the server and supervises it until the main process exits;
    /// returns the exit code for this process (the main process's code, or
    /// `128 + signal`).
    ///
    /// Errors only when the server cannot be started at all, or when
    /// waiting for it fails (`poll` on the supervisor's own fds).
    pub fn run(self) -> Result<u8, crate::Error> {
        let err = |what: &str, e: io::Error| crate::Error::io(what.to_owned(), e);
        // Orphans come to us even when we are not PID 1.
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag.
        syscall!(prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))
            .map_err(|e| err("cannot become a child subreaper", e))?;
        let (sock, name) = bind_notify().map_err(|e| err("cannot bind the notify socket", e))?;
        let signals = block_signals().map_err(|e| err("cannot set up signal handling", e))?;

        let mut cmd = std::process::Command::new(&self.program);
        // SAFETY: the closure runs between fork and exec and only calls
        // pthread_sigmask, which is async-signal-safe, on a set built on
        // its own stack.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // The server starts with no signal blocked, as if started
                // by a service manager.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                match libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e)),
                }
            });
        }
        let child = cmd
            .args(&self.args)
            .env("NOTIFY_SOCKET", format!("@{name}"))
            .env(SUPERVISED_VAR, "1")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .spawn()
            .map_err(|e| err(&format!("cannot start {}", self.program.display()), e))?;
        let mut main = child.id() as libc::pid_t;
        // Reaped below with waitpid, not through the handle.
        drop(child);
        tracing::info!(pid = main, program = %self.program.display(), "supervising");

        loop {
            let rev = match sys::poll_until(
                &[
                    (sock.as_fd(), libc::POLLIN),
                    (signals.as_fd(), libc::POLLIN),
                ],
                far_future(),
            ) {
                Ok(r) => r,
                Err(e) => return Err(err("poll", e)),
            };
            if rev[0] != 0 {
                take_notifications(sock.as_fd(), &mut main);
            }
            if rev[1] == 0 {
                continue;
            }
            for sig in read_signals(signals.as_fd()) {
                if sig != libc::SIGCHLD {
                    tracing::info!(signal = sig, pid = main, "forwarding a signal");
                    // SAFETY: kill takes a pid and a signal number.
                    let _ = syscall!(kill(main, sig));
                    continue;
                }
                // Messages sent before an exit are taken in first: an old
                // main names its successor before it drains and exits.
                take_notifications(sock.as_fd(), &mut main);
                while let Some((pid, status)) = reap_one() {
                    if pid != main {
                        tracing::debug!(pid, status, "reaped");
                        continue;
                    }
                    let status = std::process::ExitStatus::from_raw(status);
                    let code = match (status.code(), status.signal()) {
                        (Some(c), _) => c as u8,
                        (None, Some(s)) => 128u8.wrapping_add(s as u8),
                        _ => 1,
                    };
                    tracing::info!(pid, %status, code, "main process exited; supervisor exits");
                    return Ok(code);
                }
            }
        }
    }
}

/// Far enough to mean "no deadline" for [`sys::poll_until`].
fn far_future() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(86400 * 365)
}

/// A datagram socket with credentials passing, bound to a fresh abstract
/// name (no file to clean up); `(socket, name)`.
fn bind_notify() -> io::Result<(OwnedFd, String)> {
    let mut random = [0u8; 8];
    // getrandom fills at most the length of the buffer it is given.
    syscall!(getrandom(random.as_mut_ptr().cast(), random.len(), 0))?;
    let name = format!(
        "handover/supervisor/{}/{:016x}",
        std::process::id(),
        u64::from_ne_bytes(random)
    );
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    // std creates the socket close-on-exec.
    let sock = OwnedFd::from(std::os::unix::net::UnixDatagram::bind_addr(&addr)?);
    let one: libc::c_int = 1;
    // setsockopt reads an int from a valid pointer of the given size.
    syscall!(setsockopt(
        sock.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_PASSCRED,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t
    ))?;
    Ok((sock, name))
}

/// Blocks the forwarded signals and SIGCHLD, and returns a signalfd for
/// them.
fn block_signals() -> io::Result<OwnedFd> {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // sigemptyset/sigaddset write into the set they are given.
    syscall!(sigemptyset(&mut set))?;
    for sig in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
        syscall!(sigaddset(&mut set, *sig))?;
    }
    // SAFETY: pthread_sigmask reads the set and writes no old set (null).
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // signalfd reads the set; -1 asks for a new fd.
    let fd = syscall!(signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK))?;
    // SAFETY: signalfd succeeded: a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The signals pending on the signalfd.
fn read_signals(fd: BorrowedFd<'_>) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    loop {
        // SAFETY: an all-zero signalfd_siginfo is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // read writes at most `size` bytes into `info`.
        match syscall!(read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size
        )) {
            Ok(n) if n as usize == size => out.push(info.ssi_signo as libc::c_int),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return out,
        }
    }
}

/// Reaps one exited child, without waiting: `(pid, wait status)`.
fn reap_one() -> Option<(libc::pid_t, libc::c_int)> {
    let mut status = 0;
    // waitpid writes the status into the int it is given.
    match syscall!(waitpid(-1, &mut status, libc::WNOHANG)) {
        Ok(pid) if pid > 0 => Some((pid, status)),
        _ => None,
    }
}

/// Whether `pid` names a process of this PID namespace (by `kill(pid, 0)`,
/// not /proc, which may be the parent namespace's when it was not remounted).
fn exists(pid: libc::pid_t) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    match syscall!(kill(pid, 0)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    }
}

/// Takes in every pending notification. Only the main process may speak
/// (`NotifyAccess=main`); `MAINPID=` from it names the new main process.
/// Received fds (a `BARRIER=1` pipe) are closed at once, which is what
/// releases the barrier.
fn take_notifications(sock: BorrowedFd<'_>, main: &mut libc::pid_t) {
    loop {
        let (text, sender) = match sys::recv_notification(sock, libc::MSG_DONTWAIT) {
            Ok(Some(m)) => {
                // Closing a received barrier pipe is what releases it.
                drop(m.fds);
                (m.text, m.sender)
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a notification");
                return;
            }
        };
        if sender != Some(*main) {
            tracing::debug!(
                ?sender,
                main = *main,
                "notification from a process that is not the main one; ignored"
            );
            continue;
        }
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("MAINPID=") {
                match v.parse::<libc::pid_t>() {
                    Ok(pid) if pid > 0 && exists(pid) => {
                        tracing::info!(old = *main, new = pid, "new main process");
                        *main = pid;
                    }
                    _ => tracing::warn!(value = v, "MAINPID= names no live process; ignored"),
                }
            } else if line == "READY=1" || line == "STOPPING=1" || line == "RELOADING=1" {
                tracing::debug!(pid = *main, message = line, "notification");
            }
        }
    }
}
