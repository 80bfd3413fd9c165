//! Error types: [`Error`] for setting up and reading what was handed over,
//! [`UpgradeError`] for an upgrade that did not happen.
//!
//! Display says what failed; the underlying cause is the error's
//! [`source`](std::error::Error::source), never repeated in Display. To show
//! an operator the whole story on one line (as the crate does for the
//! `reload` reply and its logs), use the alternate form: `format!("{e:#}")`
//! writes the message and every source, joined by `": "`.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// An error while building a [`Handover`](crate::Handover), claiming a
/// named fd, or reporting readiness.
///
/// Converts into [`io::Error`] (keeping the kind of an underlying I/O error),
/// so `?` works in functions that return `io::Result`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A variable of the handoff protocol (`LISTEN_*`, `HANDOVER_*`) is malformed.
    Env {
        /// The variable's name.
        var: &'static str,
        /// Its value, lossily converted to UTF-8.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An inherited fd is not what the application asked for under that name.
    InvalidFd {
        /// The fd number in this process.
        fd: RawFd,
        /// The name it was handed over under.
        name: String,
        /// What was expected and what was found.
        reason: String,
    },
    /// An fd name that the protocol cannot carry.
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The name (with this address) is already registered in this process.
    AlreadyRegistered {
        /// The name.
        name: String,
    },
    /// The fds handed to this process were already taken by another
    /// [`Handover`](crate::Handover) in the same process.
    AlreadyTaken,
    /// Taking over from the service at a control socket
    /// ([`Builder::take_over`](crate::Builder::take_over)) failed: refused,
    /// or the running generation called it off (the reason says which).
    /// The running generation serves on.
    TakeOver {
        /// The control socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A setting of the [`Builder`](crate::Builder) (or of
    /// [`UpgradeOptions`](crate::UpgradeOptions)) is out of range.
    InvalidConfig {
        /// The setting, as its method is named (`ready_timeout`).
        setting: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// A system call failed.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The [`io::ErrorKind`] this error maps to.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Io { source, .. } => source.kind(),
            Error::AlreadyRegistered { .. } | Error::AlreadyTaken => io::ErrorKind::AlreadyExists,
            Error::TakeOver { .. } => io::ErrorKind::Other,
            Error::Env { .. }
            | Error::InvalidFd { .. }
            | Error::InvalidName { .. }
            | Error::InvalidConfig { .. } => io::ErrorKind::InvalidInput,
        }
    }
}

impl fmt::Display for Error {
    /// The message; with `{:#}`, followed by its sources, each after `": "`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.message(f)?;
        sources(self, f)
    }
}

impl Error {
    fn message(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Env { var, value, reason } => write!(f, "{var}={value:?} is invalid: {reason}"),
            Error::InvalidFd { fd, name, reason } => {
                write!(f, "inherited fd {fd} named {name:?} is refused: {reason}")
            }
            Error::InvalidName { name, reason } => write!(f, "invalid fd name {name:?}: {reason}"),
            Error::AlreadyRegistered { name } => {
                write!(
                    f,
                    "an fd named {name:?} with this address is already registered"
                )
            }
            Error::AlreadyTaken => {
                write!(
                    f,
                    "the inherited fds were already taken by another Handover in this process"
                )
            }
            Error::InvalidConfig { setting, reason } => {
                write!(f, "invalid setting {setting}: {reason}")
            }
            Error::TakeOver { path, reason } => {
                write!(f, "cannot take over from {}: {reason}", path.display())
            }
            Error::Io { context, .. } => f.write_str(context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Why an upgrade did not happen. In every case the calling generation keeps
/// serving, untouched, and may try again (except after
/// [`UpgradeError::HandedOver`] and [`UpgradeError::Stopping`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum UpgradeError {
    /// [`Handover::ready`](crate::Handover::ready) has not been called: a
    /// generation that is not serving yet does not spawn a successor.
    NotReady,
    /// Another upgrade of this process is running.
    InProgress,
    /// This generation already handed over to a successor.
    HandedOver,
    /// This generation is stopping ([`Handover::stop`](crate::Handover::stop)).
    Stopping,
    /// This generation's own handover is not final yet: its predecessor has
    /// not committed it — it still watches a probation window (see
    /// [`UpgradeOptions::probation`](crate::UpgradeOptions::probation)) and
    /// may roll back to itself, or, without a window, its commit has not
    /// arrived yet (a matter of milliseconds after `ready()`).
    OnProbation,
    /// Another process holds the upgrade lock next to the pid file.
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The successor's program cannot be run: missing, not a file, not executable.
    Program {
        /// The program path.
        path: PathBuf,
        /// What the check found.
        source: io::Error,
    },
    /// The preflight check of the new program failed (or did not finish
    /// within the ready timeout); no successor was started.
    Preflight {
        /// Its exit status; `None` if it was killed at the deadline.
        status: Option<ExitStatus>,
        /// Its standard output and error (at most 64 KiB).
        output: String,
    },
    /// The child could not exec the program (`execve` failed), or could not
    /// set up its fds first.
    Exec {
        /// The program path.
        path: PathBuf,
        /// The errno the child reported.
        source: io::Error,
    },
    /// The successor exited before it reported ready.
    Exited {
        /// Its pid.
        pid: u32,
        /// Its exit status; `None` if it was reaped elsewhere (e.g. `SIGCHLD`
        /// is ignored).
        status: Option<ExitStatus>,
    },
    /// The successor said why it cannot start (an inherited socket it
    /// refuses, a configuration error: see
    /// [`Handover::report_failure`](crate::Handover::report_failure)) and
    /// exited, or was killed. It was reaped.
    Failed {
        /// Its pid.
        pid: u32,
        /// The reason it sent.
        reason: String,
        /// Its exit status; `None` if it had to be killed or its status was
        /// lost.
        status: Option<ExitStatus>,
    },
    /// The pid file cannot be replaced (checked before the successor is
    /// started), or could not be written with the successor's pid at the
    /// commit: then the successor was killed and reaped before the commit.
    /// Either way the pid file never names a process that does not serve.
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// An option of this upgrade is out of range (see
    /// [`Error::InvalidConfig`]). Nothing was started.
    InvalidOptions {
        /// The option.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The successor closed the readiness channel without reporting ready.
    /// It was killed and reaped.
    ClosedWithoutReady {
        /// Its pid.
        pid: u32,
    },
    /// The successor did not report ready within the ready timeout. It was
    /// killed and reaped.
    Timeout {
        /// Its pid.
        pid: u32,
        /// The timeout that passed.
        after: Duration,
    },
    /// The successor rejected the state it was sent (e.g. an unknown
    /// format version). It was killed and reaped.
    StateRejected {
        /// Its pid.
        pid: u32,
        /// Its reason.
        reason: String,
    },
    /// The successor reported ready, but failed within the probation window
    /// (see [`UpgradeOptions::probation`](crate::UpgradeOptions::probation)): it exited,
    /// reported itself unhealthy, or closed the channel. This generation
    /// accepted alongside it throughout and keeps serving alone; the
    /// successor is gone and reaped.
    Probation {
        /// Its pid.
        pid: u32,
        /// How far into the window it failed.
        after: Duration,
        /// What happened: its exit status, or the reason it reported.
        reason: String,
    },
    /// The successor was judged worse than this generation on the traffic
    /// both served during the probation window (see
    /// [`canary`](crate::canary)) and taken back: it stops accepting and
    /// drains, as after [`Handover::report_unhealthy`](crate::Handover::report_unhealthy)
    /// (and is killed if it has not exited within the drain timeout); it was
    /// reaped. This generation accepted alongside it throughout and keeps
    /// serving alone.
    Canary {
        /// Its pid.
        pid: u32,
        /// How far into the window it was judged.
        after: Duration,
        /// The judgement, with both generations' numbers.
        judgement: Box<crate::canary::Judgement>,
    },
    /// The successor wrote something other than the protocol's messages.
    Protocol {
        /// Its pid.
        pid: u32,
        /// What was wrong.
        reason: String,
    },
    /// A system call in the calling process failed.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl UpgradeError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        UpgradeError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether a successor process was started (and, the upgrade having
    /// failed, killed and reaped) for this attempt.
    pub fn spawned(&self) -> bool {
        matches!(
            self,
            UpgradeError::Exec { .. }
                | UpgradeError::Exited { .. }
                | UpgradeError::Failed { .. }
                | UpgradeError::PidFile { .. }
                | UpgradeError::ClosedWithoutReady { .. }
                | UpgradeError::Timeout { .. }
                | UpgradeError::Protocol { .. }
                | UpgradeError::StateRejected { .. }
                | UpgradeError::Probation { .. }
                | UpgradeError::Canary { .. }
        )
    }
}

impl fmt::Display for UpgradeError {
    /// The message; with `{:#}`, followed by its sources, each after `": "`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.message(f)?;
        sources(self, f)
    }
}

impl UpgradeError {
    fn message(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeError::NotReady => {
                write!(f, "upgrade refused: this generation has not called ready()")
            }
            UpgradeError::InProgress => {
                write!(f, "upgrade refused: an upgrade is already in progress")
            }
            UpgradeError::HandedOver => {
                write!(
                    f,
                    "upgrade refused: this generation already handed over to a successor"
                )
            }
            UpgradeError::Stopping => {
                write!(f, "upgrade refused: this generation is stopping")
            }
            UpgradeError::OnProbation => {
                write!(
                    f,
                    "upgrade refused: its predecessor has not committed the handover to this generation yet (during a probation window it may still roll back)"
                )
            }
            UpgradeError::Locked { path } => {
                write!(
                    f,
                    "upgrade refused: another process holds the upgrade lock {}",
                    path.display()
                )
            }
            UpgradeError::Program { path, .. } => {
                write!(f, "cannot run successor program {}", path.display())
            }
            UpgradeError::Preflight { status, output } => {
                let status = match status {
                    Some(s) => s.to_string(),
                    None => "timed out".to_owned(),
                };
                write!(f, "preflight check failed ({status}): {}", output.trim())
            }
            UpgradeError::Exec { path, .. } => {
                write!(f, "successor could not exec {}", path.display())
            }
            UpgradeError::Exited {
                pid,
                status: Some(status),
            } => {
                write!(
                    f,
                    "successor (pid {pid}) exited before it was ready: {status}"
                )
            }
            UpgradeError::Exited { pid, status: None } => {
                write!(
                    f,
                    "successor (pid {pid}) exited before it was ready (status unavailable)"
                )
            }
            UpgradeError::Failed {
                pid,
                reason,
                status,
            } => {
                write!(f, "successor (pid {pid}) failed to start: {reason}")?;
                match status {
                    Some(s) => write!(f, " ({s})"),
                    None => Ok(()),
                }
            }
            UpgradeError::PidFile { path, .. } => {
                write!(
                    f,
                    "cannot write the pid file {} (still serving)",
                    path.display()
                )
            }
            UpgradeError::InvalidOptions { setting, reason } => {
                write!(f, "upgrade refused: invalid option {setting}: {reason}")
            }
            UpgradeError::ClosedWithoutReady { pid } => {
                write!(
                    f,
                    "successor (pid {pid}) closed the readiness channel without reporting ready"
                )
            }
            UpgradeError::Timeout { pid, after } => {
                write!(
                    f,
                    "successor (pid {pid}) was not ready within {after:?}; killed"
                )
            }
            UpgradeError::StateRejected { pid, reason } => {
                write!(f, "successor (pid {pid}) rejected the state: {reason}")
            }
            UpgradeError::Probation { pid, after, reason } => {
                write!(
                    f,
                    "successor (pid {pid}) failed its probation after {:.3} s: {reason}; rolled back",
                    after.as_secs_f64()
                )
            }
            UpgradeError::Canary {
                pid,
                after,
                judgement,
            } => {
                // The judgement's line ends with "; rolled back: <why>".
                write!(
                    f,
                    "successor (pid {pid}) failed its probation after {:.3} s: {judgement}",
                    after.as_secs_f64()
                )
            }
            UpgradeError::Protocol { pid, reason } => {
                write!(
                    f,
                    "successor (pid {pid}) broke the handoff protocol: {reason}"
                )
            }
            UpgradeError::Io { context, .. } => write!(f, "upgrade failed: {context}"),
        }
    }
}

impl std::error::Error for UpgradeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpgradeError::Program { source, .. }
            | UpgradeError::Exec { source, .. }
            | UpgradeError::PidFile { source, .. }
            | UpgradeError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<UpgradeError> for io::Error {
    fn from(e: UpgradeError) -> io::Error {
        let kind = match &e {
            UpgradeError::Program { source, .. }
            | UpgradeError::Exec { source, .. }
            | UpgradeError::PidFile { source, .. }
            | UpgradeError::Io { source, .. } => source.kind(),
            UpgradeError::Timeout { .. } => io::ErrorKind::TimedOut,
            UpgradeError::InvalidOptions { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// With the alternate flag (`{:#}`), writes the sources of `e` after its
/// message, each after `": "`: the whole story on one line, as an operator
/// reads it in a `reload` reply or a log line. Without it, nothing: plain
/// `Display` never repeats a source.
pub(crate) fn sources(e: &dyn std::error::Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if f.alternate() {
        let mut next = e.source();
        while let Some(s) = next {
            write!(f, ": {s}")?;
            next = s.source();
        }
    }
    Ok(())
}

/// An error and its sources on one line, joined by `": "` — what an
/// operator reads in a `reload` reply or a log line; `format!("{e:#}")` for
/// the crate's errors.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_does_not_repeat_the_source_and_chain_joins_it() {
        let e = Error::io(
            "cannot write pid file /run/x.pid",
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(e.to_string(), "cannot write pid file /run/x.pid");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            chain(&e),
            "cannot write pid file /run/x.pid: Permission denied (os error 13)"
        );
        let u = UpgradeError::Program {
            path: "/srv/x".into(),
            source: io::ErrorKind::NotFound.into(),
        };
        assert_eq!(u.to_string(), "cannot run successor program /srv/x");
        assert!(chain(&u).ends_with(": entity not found"), "{}", chain(&u));
    }
}
