//! The control socket's client: one request and its reply, `reload` (which
//! follows `retry` to the successor), and [`command`], the `reload` and
//! `status` subcommands every service gets without writing them.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Why a control request did not succeed, and whether its outcome is known
/// ([`is_unknown`](Self::is_unknown)).
#[derive(Debug)]
#[non_exhaustive]
pub enum ControlError {
    /// The control socket cannot be reached (no server, wrong path, no
    /// permission): nothing was asked, nothing changed.
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The server answered `error <reason>` or `busy <reason>`: the request
    /// failed — an upgrade failed, and the generation that answered still
    /// serves — and this is why.
    Failed(String),
    /// No answer in time, or the connection broke after the request was
    /// sent: **the outcome is unknown**. An upgrade may still be running, or
    /// may have finished either way; `status` tells (the generation that
    /// serves, its last upgrade, and any upgrade in progress).
    NoAnswer {
        /// The socket's path.
        path: PathBuf,
        /// What happened.
        source: io::Error,
    },
    /// The server answered something this client does not understand: the
    /// outcome is unknown, as for [`NoAnswer`](Self::NoAnswer).
    Protocol(String),
}

impl ControlError {
    /// Whether the request may have taken effect all the same: no answer
    /// came ([`NoAnswer`](Self::NoAnswer), [`Protocol`](Self::Protocol)).
    /// Never say "failed" for these.
    pub fn is_unknown(&self) -> bool {
        matches!(
            self,
            ControlError::NoAnswer { .. } | ControlError::Protocol(_)
        )
    }
}

impl std::fmt::Display for ControlError {
    /// The message; with `{:#}`, followed by its source.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.message(f)?;
        crate::error::sources(self, f)
    }
}

impl ControlError {
    fn message(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Connect { path, .. } => write!(f, "cannot connect to {}", path.display()),
            ControlError::NoAnswer { path, .. } => write!(
                f,
                "no answer from {}: the outcome is unknown (an upgrade may still be running; \
                 `status` tells)",
                path.display()
            ),
            ControlError::Failed(reason) => f.write_str(reason),
            ControlError::Protocol(what) => {
                write!(f, "control protocol: {what}; the outcome is unknown")
            }
        }
    }
}

impl std::error::Error for ControlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ControlError::Connect { source, .. } | ControlError::NoAnswer { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// A reply line: `ok` or `retry` with its text, or none at all (the
/// connection closed first).
enum Reply {
    Ok(String),
    Retry(String),
    Busy(String),
    Closed,
}

fn exchange(path: &Path, request: &str, timeout: Duration) -> Result<Reply, ControlError> {
    let no_answer = |source| ControlError::NoAnswer {
        path: path.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let timeout = timeout.max(Duration::from_millis(1));
    let set = s
        .set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)));
    set.map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    // A refusal may come before the request is read: look for a reply even
    // if sending failed.
    let sent = s.write_all(format!("{request}\n").as_bytes());
    let mut line = String::new();
    match BufReader::new(s).take(1 << 20).read_line(&mut line) {
        Ok(_) => {}
        // The server went away mid-request: no reply, as with an EOF.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Reply::Closed),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(no_answer(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply within {:.1} s", timeout.as_secs_f64()),
            )));
        }
        Err(e) => return Err(no_answer(e)),
    }
    let line = line.trim_end();
    if let (Err(e), true) = (sent, line.is_empty()) {
        // The request did not get through: nothing was asked.
        return Err(ControlError::Connect {
            path: path.to_owned(),
            source: e,
        });
    }
    if let Some(body) = line.strip_prefix("ok ") {
        Ok(Reply::Ok(body.to_owned()))
    } else if let Some(reason) = line.strip_prefix("retry ") {
        Ok(Reply::Retry(reason.to_owned()))
    } else if let Some(reason) = line.strip_prefix("busy ") {
        Ok(Reply::Busy(reason.to_owned()))
    } else if let Some(reason) = line.strip_prefix("error ") {
        Err(ControlError::Failed(reason.to_owned()))
    } else if line.is_empty() {
        Ok(Reply::Closed)
    } else {
        Err(ControlError::Protocol(format!("unexpected reply {line:?}")))
    }
}

/// Asks the service for its `status`: the serving generation as JSON (pid,
/// generation, program, counters, its last upgrade, and `upgrade`: the one
/// in progress, or `null`), waiting at most `timeout`.
pub fn status(path: impl AsRef<Path>, timeout: Duration) -> Result<String, ControlError> {
    request(path, "status", timeout)
}

/// Sends one request line and returns the body of an `ok` reply, waiting at
/// most `timeout` for it. `busy` is returned as [`ControlError::Failed`]
/// (nothing was done); `retry` as [`ControlError::Protocol`] ([`reload`]
/// follows it).
pub(crate) fn request(
    path: impl AsRef<Path>,
    request: &str,
    timeout: Duration,
) -> Result<String, ControlError> {
    match exchange(path.as_ref(), request, timeout)? {
        Reply::Ok(body) => Ok(body),
        Reply::Busy(reason) => Err(ControlError::Failed(format!("busy: {reason}"))),
        Reply::Retry(reason) => Err(ControlError::Protocol(format!("retry {reason}"))),
        Reply::Closed => Err(ControlError::NoAnswer {
            path: path.as_ref().to_owned(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the control socket closed without a reply",
            ),
        }),
    }
}

/// Requests an upgrade (to `program`, an absolute path, for this upgrade
/// only, if given — the service must allow it, see
/// [`ControlSocket::allow_program`](super::ControlSocket::allow_program))
/// and waits for its result, at most `timeout` in all: `Ok(json)` names the
/// generation that serves, its pid and the program it runs. The reply is
/// always about a generation that started after this call.
///
/// [`ControlError::is_unknown`] tells a failure (the old generation
/// serves) from no answer in time (the upgrade may still be running).
pub fn reload(
    path: impl AsRef<Path>,
    program: Option<&Path>,
    timeout: Duration,
) -> Result<String, ControlError> {
    let path = path.as_ref();
    // Say when we asked: only an upgrade (or a generation) that started
    // after that may answer.
    let since = crate::systemd::monotonic_usec();
    let req = match program {
        Some(p) => format!("upgrade since={since} {}", p.display()),
        None => format!("upgrade since={since}"),
    };
    let deadline = crate::clock::after(timeout);
    let mut pause = Duration::from_millis(5);
    let mut asked = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let reason = match exchange(path, &req, left) {
            Ok(Reply::Ok(body)) => return Ok(body),
            // Nothing was done: ask again while there is time.
            Ok(Reply::Busy(reason)) => format!("busy: {reason}"),
            Ok(Reply::Retry(reason)) => {
                asked = true;
                reason
            }
            // A generation that handed over may exit before it answers. Asking
            // again is safe: only a generation or an upgrade that started
            // after `since` may answer, so the reply is still the truth.
            Ok(Reply::Closed) => {
                asked = true;
                "the control socket closed without a reply".to_owned()
            }
            // The successor takes over the socket within moments: a refused
            // connect after a handover is asked again.
            Err(ControlError::Connect { .. }) if asked => {
                "the control socket refused the connection".to_owned()
            }
            Err(e) => return Err(e),
        };
        if left <= pause {
            let source = io::Error::new(
                io::ErrorKind::TimedOut,
                format!("still no answer at the deadline: {reason}"),
            );
            return Err(if asked {
                ControlError::NoAnswer {
                    path: path.to_owned(),
                    source,
                }
            } else {
                ControlError::Failed(reason)
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The exit status of [`command`]: upgraded (or status printed).
const EXIT_OK: u8 = 0;
/// The request failed; for `reload`, the old generation serves.
const EXIT_FAILED: u8 = 1;
/// Bad arguments.
const EXIT_USAGE: u8 = 2;
/// No answer in time: the outcome is unknown.
const EXIT_UNKNOWN: u8 = 3;

/// Runs the `reload` or `status` subcommand if `args` (the program's
/// arguments, without `argv[0]`) start with one, and returns its exit
/// status; `None` for any other arguments, which are the service's own.
/// Call it first thing in `main`:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     if let Some(code) = handover::control::command(std::env::args_os().skip(1)) {
///         return code; // `myservice reload …` or `myservice status …`
///     }
///     // … the service
///     # std::process::ExitCode::SUCCESS
/// }
/// ```
///
/// ```text
/// myservice reload --control PATH [--binary PATH] [--timeout SECS]
/// myservice status --control PATH [--wait SECS]
/// ```
///
/// `reload` asks the service behind the control socket `PATH` to upgrade
/// (to `--binary`, for this upgrade only: a rollback, which the service
/// must allow; a relative path is made absolute here) and waits for the
/// result, at most `--timeout` (default 120 s). It prints `upgraded:
/// <json>` and exits with:
///
/// | exit | meaning |
/// | --- | --- |
/// | 0 | upgraded: the reply names the new generation |
/// | 1 | failed: the old generation serves (the reason is printed), or the socket could not be reached |
/// | 2 | bad arguments |
/// | 3 | unknown: no answer within the timeout; the upgrade may still be running or may have finished — ask `status` |
///
/// `status` prints the serving generation as JSON (pid, generation,
/// program, counters, its last upgrade, and `upgrade`: the one in progress,
/// or `null`). With `--wait SECS` it first waits, at most SECS, until no
/// upgrade is in progress: after an exit 3 it tells how that upgrade ended.
/// It exits 0, 1 if the socket cannot be reached, or 3 if an upgrade is
/// still in progress after `--wait`.
pub fn command<I, S>(args: I) -> Option<ExitCode>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut args = args.into_iter().map(Into::into);
    let sub = args.next()?;
    let sub = match sub.to_str() {
        Some("reload") => Sub::Reload,
        Some("status") => Sub::Status,
        _ => return None,
    };
    let rest: Vec<OsString> = args.collect();
    let prog = std::env::args_os()
        .next()
        .map(|a| {
            Path::new(&a)
                .file_name()
                .map_or("service".into(), |n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "service".to_owned());
    let name = match sub {
        Sub::Reload => "reload",
        Sub::Status => "status",
    };
    let parsed = match parse(sub, &rest) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{prog} {name}: {e}");
            eprintln!(
                "usage: {prog} reload --control PATH [--binary PATH] [--timeout SECS]\n       \
                 {prog} status --control PATH [--wait SECS]"
            );
            return Some(ExitCode::from(EXIT_USAGE));
        }
    };
    Some(ExitCode::from(match sub {
        Sub::Reload => run_reload(&prog, &parsed),
        Sub::Status => run_status(&prog, &parsed),
    }))
}

#[derive(Clone, Copy)]
enum Sub {
    Reload,
    Status,
}

struct Parsed {
    control: PathBuf,
    binary: Option<PathBuf>,
    timeout: Duration,
    wait: Option<Duration>,
}

/// A number of seconds, as the operator types it: positive, at most a day.
fn seconds(flag: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = v
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .ok_or_else(|| format!("{flag} {v:?} is not a positive number of seconds"))?;
    let d = Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX);
    crate::clock::check_setting(d, false).map_err(|reason| format!("{flag} {v}: {reason}"))?;
    Ok(d)
}

fn parse(sub: Sub, args: &[OsString]) -> Result<Parsed, String> {
    let mut p = Parsed {
        control: PathBuf::new(),
        binary: None,
        timeout: Duration::from_secs(match sub {
            Sub::Reload => 120,
            Sub::Status => 10,
        }),
        wait: None,
    };
    let mut control = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let flag = flag.to_string_lossy();
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let text = || value.to_string_lossy().into_owned();
        match (sub, flag.as_ref()) {
            (_, "--control") => control = Some(PathBuf::from(value)),
            (Sub::Reload, "--binary") => {
                let b = PathBuf::from(value);
                let b = if b.is_absolute() {
                    b
                } else {
                    std::env::current_dir()
                        .map_err(|e| format!("cannot make --binary absolute: {e}"))?
                        .join(b)
                };
                p.binary = Some(b);
            }
            (_, "--timeout") => p.timeout = seconds("--timeout", &text())?,
            (Sub::Status, "--wait") => p.wait = Some(seconds("--wait", &text())?),
            (_, other) => return Err(format!("unknown flag {other:?}")),
        }
    }
    p.control = control.ok_or("--control PATH is required")?;
    Ok(p)
}

fn run_reload(prog: &str, p: &Parsed) -> u8 {
    match reload(&p.control, p.binary.as_deref(), p.timeout) {
        Ok(reply) => {
            println!("upgraded: {reply}");
            EXIT_OK
        }
        Err(e) if e.is_unknown() => {
            eprintln!(
                "{prog} reload: {}\n{prog} reload: the outcome is unknown: ask \
                 `{prog} status --control {} --wait SECS`, which waits until no upgrade \
                 is in progress and names the generation that serves",
                crate::error::chain(&e),
                p.control.display()
            );
            EXIT_UNKNOWN
        }
        Err(e @ ControlError::Connect { .. }) => {
            eprintln!(
                "{prog} reload: {}; nothing was asked",
                crate::error::chain(&e)
            );
            EXIT_FAILED
        }
        Err(e) => {
            eprintln!("{prog} reload: upgrade failed: {}", crate::error::chain(&e));
            EXIT_FAILED
        }
    }
}

fn run_status(prog: &str, p: &Parsed) -> u8 {
    let deadline = p.wait.map(crate::clock::after);
    let mut pause = Duration::from_millis(20);
    loop {
        let body = match status(&p.control, p.timeout) {
            Ok(body) => body,
            Err(e) => {
                eprintln!("{prog} status: {}", crate::error::chain(&e));
                return if e.is_unknown() {
                    EXIT_UNKNOWN
                } else {
                    EXIT_FAILED
                };
            }
        };
        let upgrading = !body.contains("\"upgrade\":null");
        match deadline {
            Some(d) if upgrading && Instant::now() < d => {
                std::thread::sleep(pause.min(d.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(250));
            }
            _ => {
                println!("{body}");
                return if upgrading && deadline.is_some() {
                    EXIT_UNKNOWN
                } else {
                    EXIT_OK
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_with_one_wording_for_durations() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let p = parse(
            Sub::Reload,
            &args(&[
                "--control",
                "/run/x",
                "--binary",
                "rel/bin",
                "--timeout",
                "1.5",
            ]),
        )
        .unwrap();
        assert!(p.binary.unwrap().is_absolute());
        assert_eq!(p.timeout, Duration::from_millis(1500));
        for bad in ["x", "-1", "0", "NaN", "inf"] {
            let e = parse(Sub::Reload, &args(&["--control", "c", "--timeout", bad]))
                .err()
                .unwrap();
            assert!(e.contains("not a positive number of seconds"), "{e}");
        }
        for big in ["1e6", "1e19", "2e19", "1e300"] {
            let e = parse(Sub::Reload, &args(&["--control", "c", "--timeout", big]))
                .err()
                .unwrap();
            assert!(e.contains("longer than the maximum"), "{big}: {e}");
        }
        assert!(parse(Sub::Status, &args(&["--binary", "x"])).is_err());
        assert!(parse(Sub::Reload, &args(&["--timeout", "1"])).is_err());
        assert!(command(["serve", "--listen", "x"]).is_none());
    }
}
