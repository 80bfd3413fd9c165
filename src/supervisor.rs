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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys;

/// Set in the server's environment by the supervisor: a server that sees it
/// must not start another supervisor.
pub(crate) const SUPERVISED_VAR: &str = "HANDOVER_SUPERVISED";

/// The signals the supervisor passes on to the main process.
const FORWARDED: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
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
        let program = crate::program::running_binary()
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
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| err("cannot become a child subreaper", e.into()))?;
        let (sock, name) = bind_notify().map_err(|e| err("cannot bind the notify socket", e))?;
        let signals = block_signals().map_err(|e| err("cannot set up signal handling", e))?;

        let mut cmd = std::process::Command::new(&self.program);
        // SAFETY: the closure runs between fork and exec; it only calls
        // pthread_sigmask (async-signal-safe) with an empty set built on its
        // own stack, and allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // The server starts with no signal blocked, as if started
                // by a service manager.
                SigSet::empty().thread_set_mask().map_err(io::Error::from)
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
        let mut main = Pid::from_raw(child.id() as i32);
        // Reaped below with waitpid, not through the handle.
        drop(child);
        tracing::info!(pid = main.as_raw(), program = %self.program.display(), "supervising");

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
            for sig in read_signals(&signals) {
                if sig != Signal::SIGCHLD {
                    tracing::info!(signal = %sig, pid = main.as_raw(), "forwarding a signal");
                    let _ = nix::sys::signal::kill(main, sig);
                    continue;
                }
                // Messages sent before an exit are taken in first: an old
                // main names its successor before it drains and exits.
                take_notifications(sock.as_fd(), &mut main);
                while let Some((pid, code)) = reap_one() {
                    if pid != main {
                        tracing::debug!(pid = pid.as_raw(), code, "reaped");
                        continue;
                    }
                    tracing::info!(
                        pid = pid.as_raw(),
                        code,
                        "main process exited; supervisor exits"
                    );
                    return Ok(code);
                }
            }
        }
    }
}

/// Far enough to mean "no deadline" for [`sys::poll_until`].
fn far_future() -> std::time::Instant {
    crate::clock::after(std::time::Duration::MAX)
}

/// A datagram socket with credentials passing, bound to a fresh abstract
/// name (no file to clean up); `(socket, name)`.
fn bind_notify() -> io::Result<(OwnedFd, String)> {
    use std::hash::{BuildHasher, Hasher};
    // std seeds every RandomState from the OS: a random name, no syscall
    // of our own.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let name = format!("handover/supervisor/{}/{random:016x}", std::process::id());
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    // std creates the socket close-on-exec.
    let sock = OwnedFd::from(std::os::unix::net::UnixDatagram::bind_addr(&addr)?);
    socket2::SockRef::from(&sock).set_passcred(true)?;
    Ok((sock, name))
}

/// Blocks the forwarded signals and SIGCHLD, and returns a signalfd for
/// them.
fn block_signals() -> io::Result<SignalFd> {
    let mut set = SigSet::empty();
    for sig in FORWARDED.iter().chain(&[Signal::SIGCHLD]) {
        set.add(*sig);
    }
    set.thread_block()?;
    Ok(SignalFd::with_flags(
        &set,
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    )?)
}

/// The signals pending on the signalfd.
fn read_signals(fd: &SignalFd) -> Vec<Signal> {
    let mut out = Vec::new();
    loop {
        match fd.read_signal() {
            Ok(Some(info)) => {
                if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                    out.push(sig);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            _ => return out,
        }
    }
}

/// Reaps one exited child, without waiting: `(pid, exit code)`, the code
/// being `128 + signal` for a child killed by a signal.
fn reap_one() -> Option<(Pid, u8)> {
    match nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(pid, code)) => Some((pid, code as u8)),
        Ok(WaitStatus::Signaled(pid, sig, _)) => Some((pid, 128u8.wrapping_add(sig as u8))),
        Ok(WaitStatus::StillAlive) | Err(_) => None,
        // Stopped or continued children are not gone: look again.
        Ok(_) => reap_one(),
    }
}

/// Whether `pid` names a process of this PID namespace (by `kill(pid, 0)`,
/// not /proc, which may be the parent namespace's when it was not remounted).
fn exists(pid: Pid) -> bool {
    match nix::sys::signal::kill(pid, None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

/// Takes in every pending notification. Only the main process may speak
/// (`NotifyAccess=main`); `MAINPID=` from it names the new main process.
/// Received fds (a `BARRIER=1` pipe) are closed at once, which is what
/// releases the barrier.
fn take_notifications(sock: BorrowedFd<'_>, main: &mut Pid) {
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
        if sender != Some(main.as_raw()) {
            tracing::debug!(
                ?sender,
                main = main.as_raw(),
                "notification from a process that is not the main one; ignored"
            );
            continue;
        }
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("MAINPID=") {
                match v.parse::<i32>().map(Pid::from_raw) {
                    Ok(pid) if pid.as_raw() > 0 && exists(pid) => {
                        tracing::info!(old = main.as_raw(), new = pid.as_raw(), "new main process");
                        *main = pid;
                    }
                    _ => tracing::warn!(value = v, "MAINPID= names no live process; ignored"),
                }
            } else if line == "READY=1" || line == "STOPPING=1" || line == "RELOADING=1" {
                tracing::debug!(pid = main.as_raw(), message = line, "notification");
            }
        }
    }
}
