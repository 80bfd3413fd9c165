//! The control socket: `upgrade` and `status` requests over a Unix socket
//! that only this process's user may use, and a client that returns the
//! upgrade's real result — so `ExecReload=myservice reload --control PATH`
//! makes `systemctl reload` fail when the upgrade fails.
//!
//! The protocol is one line each way. Requests: `status`, or
//! `upgrade [since=USEC] [absolute program path]`. Replies: `ok <json>`,
//! `error <reason>`, or `retry <reason>` (ask again: the generation that
//! answered has handed over). The reply to `upgrade` comes when the
//! upgrade has succeeded or failed, and names the generation, its pid, the
//! program it runs (resolved, symlinks followed) and `started_us`, when the
//! upgrade that made it started (`CLOCK_MONOTONIC`, µs).
//!
//! Which upgrade answers a request follows systemd's rule for reload jobs:
//! a request may share an upgrade only if that upgrade started — read the
//! binary and the configuration — after the request was made (`since=`,
//! the client's `CLOCK_MONOTONIC` in µs, as [`reload`] sends it; else when
//! the request arrived). A request that arrives while an older upgrade runs
//! waits for it and then gets an upgrade of its own; requests that wait
//! together share that one (`"shared":true`). So a burst of reloads made
//! together makes one or two upgrades (requests spread over longer than an
//! upgrade may make more), and every reply is the truth about a generation
//! that started after its request. A request that reaches a generation
//! started after it was made is answered by that generation
//! (`"already":true`). When the upgrade a request waited for hands over,
//! the request is answered `retry`, and [`reload`] asks again: the successor
//! answers (it accepts on the same socket once its handover is final).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;
use crate::fds::Want;
use crate::handover::Handover;

/// The registry name of the control socket.
pub const NAME: &str = "handover.control";

/// The longest request line accepted.
#[cfg(feature = "tokio")]
const MAX_REQUEST: usize = 4096;

/// Creates (or inherits) the control socket at `path`, mode 0600.
///
/// It is bound inside a fresh 0700 directory next to `path`, made 0600, and
/// renamed into place, so it is never reachable with looser permissions.
/// Like every registered fd it is handed to successors.
pub fn bind(
    handover: &Handover,
    path: impl AsRef<Path>,
) -> Result<std::os::unix::net::UnixListener, Error> {
    let path = path.as_ref();
    let fd = handover.claim(NAME, Want::UnixListenerAt(path.to_owned()), || {
        secure_bind(path)
    })?;
    Ok(fd.into())
}

fn secure_bind(path: &Path) -> io::Result<OwnedFd> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = dir.join(format!(".handover-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let tmp = private.join("control");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process serves {}", path.display()),
                ));
            }
        }
        std::fs::rename(&tmp, path)?;
        Ok(OwnedFd::from(listener))
    })();
    let _ = std::fs::remove_dir_all(&private);
    let fd = result?;
    crate::sys::set_nonblocking(fd.as_fd(), true)?;
    Ok(fd)
}

#[cfg(any(test, feature = "tokio"))]
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(feature = "tokio")]
fn status_json(h: &Handover) -> String {
    let state = format!("{:?}", h.state()).to_lowercase();
    let stats = h.stats();
    let last = match &stats.last_upgrade {
        None => "null".to_owned(),
        Some(r) => format!(
            "{{\"ok\":{},\"successor\":{},\"error\":{},\"ms\":{:.3}}}",
            r.error.is_none(),
            r.successor.map_or("null".to_owned(), |p| p.to_string()),
            r.error.as_deref().map_or("null".to_owned(), json_str),
            r.duration.as_secs_f64() * 1e3
        ),
    };
    format!(
        "{{\"pid\":{},\"generation\":{},\"state\":{},\"committed\":{},\"upgrades_succeeded\":{},\"upgrades_failed\":{},\"last_upgrade\":{last}}}",
        std::process::id(),
        h.generation(),
        json_str(&state),
        stats.committed,
        stats.upgrades_succeeded,
        stats.upgrades_failed
    )
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `status`
    Status,
    /// `upgrade [since=USEC] [PROGRAM]`: upgrade (to `program`, an absolute
    /// path, for this upgrade only). `since` is the client's
    /// `CLOCK_MONOTONIC` in microseconds when it decided to ask: only an
    /// upgrade (or a generation) that started after it may answer it.
    Upgrade {
        /// When the client asked (`CLOCK_MONOTONIC`, µs).
        since: Option<u128>,
        /// Another program to run.
        program: Option<PathBuf>,
    },
}

impl Request {
    /// Parses one request line (without its newline).
    pub fn parse(line: &str) -> Result<Request, String> {
        let line = line.trim_end_matches('\r');
        if line == "status" {
            return Ok(Request::Status);
        }
        let Some(rest) = line.strip_prefix("upgrade") else {
            return Err(format!(
                "unknown request {:?}",
                line.chars().take(64).collect::<String>()
            ));
        };
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return Err(format!(
                "unknown request {:?}",
                line.chars().take(64).collect::<String>()
            ));
        }
        let mut rest = rest.trim_start_matches(' ');
        let mut since = None;
        if let Some(r) = rest.strip_prefix("since=") {
            let (t, tail) = r.split_once(' ').unwrap_or((r, ""));
            since = Some(
                t.parse::<u128>()
                    .map_err(|_| format!("since={t:?} is not a time"))?,
            );
            rest = tail;
        }
        let program = match rest {
            "" => None,
            p if p.starts_with('/') && !p.contains('\0') => Some(PathBuf::from(p)),
            p => return Err(format!("the program must be an absolute path, not {p:?}")),
        };
        Ok(Request::Upgrade { since, program })
    }
}

#[cfg(feature = "tokio")]
pub use server::{serve, serve_with};

#[cfg(feature = "tokio")]
mod server {
    use super::*;
    use crate::upgrade::{UpgradeOptions, Upgraded};
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    /// How an upgrade made for control requests ended: `Ok(json)` or
    /// `Err(reply)`, the whole reply line without its newline.
    type Outcome = Result<String, String>;

    /// The latest upgrade this server started, for requests that may share it.
    struct Latest {
        /// `CLOCK_MONOTONIC` in µs, taken before the program was resolved.
        started: u128,
        program: Option<PathBuf>,
        outcome: watch::Receiver<Option<Outcome>>,
    }

    /// What the connections of one server share.
    struct Runner {
        handover: Handover,
        /// Held while an upgrade for control requests runs: later requests
        /// queue on it, in order (tokio's mutex is fair).
        gate: tokio::sync::Mutex<()>,
        latest: std::sync::Mutex<Option<Latest>>,
        options: Box<dyn Fn() -> UpgradeOptions + Send + Sync>,
        done: tokio::sync::mpsc::Sender<Upgraded>,
    }

    /// Serves the control socket until an upgrade requested through it
    /// succeeds, and returns that upgrade: the caller then stops accepting,
    /// drains and exits, like after any other upgrade. When an upgrade made
    /// otherwise (a signal) hands over, it stops accepting control
    /// connections (the successor answers them) and never returns.
    ///
    /// Every upgrade runs with the handover's options, state included (see
    /// [`Handover::set_state_source`]).
    ///
    /// Peers running as another user are refused (`SO_PEERCRED`). Each
    /// connection is bounded: one request line of at most 4 KiB within 10 s.
    ///
    /// A successor accepts only once its handover is final
    /// ([`Handover::committed`]): during a probation window the old
    /// generation, which still accepts on the same socket, answers.
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn serve(handover: Handover, listener: tokio::net::UnixListener) -> Upgraded {
        serve_with(handover, listener, UpgradeOptions::new).await
    }

    /// [`serve`] with the options of each upgrade made by `options`; a
    /// program named in the request replaces theirs.
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn serve_with<F>(
        handover: Handover,
        listener: tokio::net::UnixListener,
        options: F,
    ) -> Upgraded
    where
        F: Fn() -> UpgradeOptions + Send + Sync + 'static,
    {
        // A successor on probation leaves the requests to its predecessor,
        // which still accepts on the same socket: only one of them runs
        // upgrades.
        if let Err(e) = handover.committed().await {
            tracing::warn!(error = %e, "cannot learn whether the handover is final; serving control requests");
        }
        let (done, mut done_rx) = tokio::sync::mpsc::channel::<Upgraded>(1);
        let runner = Arc::new(Runner {
            handover: handover.clone(),
            gate: tokio::sync::Mutex::new(()),
            latest: std::sync::Mutex::new(None),
            options: Box::new(options),
            done,
        });
        let mut listener = Some(listener);
        loop {
            let ended = handover.generation_data().upgrade_ended.notified();
            if handover.state() == crate::State::HandedOver {
                // Leave the socket to the successor.
                listener = None;
            }
            let accept = async {
                match &listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                accepted = accept => {
                    let Ok((stream, _)) = accepted else { continue };
                    let runner = runner.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(24 * 3600),
                            connection(runner, stream),
                        )
                        .await;
                    });
                }
                _ = ended => {}
                Some(done) = done_rx.recv() => return done,
            }
        }
    }

    async fn connection(runner: Arc<Runner>, stream: tokio::net::UnixStream) -> io::Result<()> {
        let own = euid();
        let (r, mut w) = stream.into_split();
        let peer = r.as_ref().peer_cred()?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(r).take(MAX_REQUEST as u64);
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
        let arrived = crate::systemd::monotonic_usec();
        if peer.uid() != own {
            let msg = format!(
                "error permission denied: uid {} is not the service's uid {own}\n",
                peer.uid()
            );
            tracing::warn!(peer_uid = peer.uid(), "control request refused");
            return w.write_all(msg.as_bytes()).await;
        }
        if !matches!(read, Ok(Ok(n)) if n > 0 && line.ends_with('\n')) {
            return w.write_all(b"error expected one request line\n").await;
        }
        let reply = match Request::parse(line.trim_end_matches('\n')) {
            Err(e) => format!("error {e}"),
            Ok(Request::Status) => format!("ok {}", status_json(&runner.handover)),
            Ok(Request::Upgrade { since, program }) => {
                // When the client decided to ask; never later than arrival.
                let asked = since.map_or(arrived, |t| t.min(arrived));
                upgrade(&runner, asked, program).await
            }
        };
        w.write_all(format!("{reply}\n").as_bytes()).await?;
        w.shutdown().await
    }

    /// Answers one upgrade request made at `asked`: with this generation if
    /// it started after that, with an upgrade this server started after
    /// that, or with a new upgrade once the one running (older) has ended.
    async fn upgrade(runner: &Runner, asked: u128, program: Option<PathBuf>) -> String {
        let h = &runner.handover;
        if program.is_none() && h.generation_data().started_usec > asked {
            // This generation read the binary and its configuration after
            // the request was made: it is the answer.
            let exe = crate::program::running_binary()
                .map(|p| json_str(&p.to_string_lossy()))
                .unwrap_or_else(|_| "null".to_owned());
            return format!(
                "ok {{\"pid\":{},\"generation\":{},\"program\":{exe},\"started_us\":{},\"already\":true}}",
                std::process::id(),
                h.generation(),
                h.generation_data().started_usec
            );
        }
        loop {
            if let Some(rx) = shareable(runner, asked, &program) {
                match shared(rx).await {
                    Some(reply) => return reply,
                    None => continue, // that attempt gave way: look again
                }
            }
            let gate = runner.gate.lock().await;
            // While we queued, a request that queued before us may have run
            // an upgrade that started after ours was made.
            if let Some(rx) = shareable(runner, asked, &program) {
                drop(gate);
                match shared(rx).await {
                    Some(reply) => return reply,
                    None => continue,
                }
            }
            if h.state() == crate::State::HandedOver {
                return handed_over(h);
            }
            let ended = h.generation_data().upgrade_ended.notified();
            let (tx, rx) = watch::channel(None);
            let started = crate::systemd::monotonic_usec();
            *crate::lifecycle::lock(&runner.latest) = Some(Latest {
                started,
                program: program.clone(),
                outcome: rx,
            });
            let mut opts = (runner.options)();
            if let Some(p) = &program {
                opts = opts.program(p);
            }
            let result = h.upgrade_with(opts).await;
            let outcome = match &result {
                Err(crate::UpgradeError::InProgress) => {
                    // An upgrade triggered otherwise (a signal) runs: it
                    // started before us. Wait for its end, then start ours
                    // (or tell the client to ask the successor).
                    *crate::lifecycle::lock(&runner.latest) = None;
                    drop(gate);
                    let _ = tokio::time::timeout(Duration::from_secs(24 * 3600), ended).await;
                    continue;
                }
                Err(crate::UpgradeError::HandedOver) => {
                    // Another trigger handed over just now.
                    let _ = tx.send(Some(Err(handed_over(h))));
                    return handed_over(h);
                }
                Ok(u) => Ok(format!(
                    "{{\"pid\":{},\"generation\":{},\"program\":{},\"started_us\":{started},\"ready_ms\":{:.3}}}",
                    u.pid,
                    u.generation,
                    json_str(&u.program.to_string_lossy()),
                    u.ready_after.as_secs_f64() * 1e3
                )),
                Err(e) => Err(format!("error {}", crate::error::chain(e))),
            };
            let _ = tx.send(Some(outcome.clone()));
            drop(gate);
            if let Ok(u) = result {
                let _ = runner.done.send(u).await;
            }
            return match outcome {
                Ok(json) => format!("ok {json}"),
                Err(reply) => reply,
            };
        }
    }

    /// The answer of a generation that handed over to a successor that
    /// started before the request: ask the successor.
    fn handed_over(h: &Handover) -> String {
        format!(
            "retry this generation handed over (to a successor that started before \
             the request was made); ask again: the successor answers (generation {})",
            h.generation() + 1
        )
    }

    /// The latest upgrade, if it started after `asked` for the same program.
    fn shareable(
        runner: &Runner,
        asked: u128,
        program: &Option<PathBuf>,
    ) -> Option<watch::Receiver<Option<Outcome>>> {
        let latest = crate::lifecycle::lock(&runner.latest);
        let l = latest.as_ref()?;
        (l.started > asked && &l.program == program).then(|| l.outcome.clone())
    }

    /// The reply of a request that shares an upgrade: `None` if that
    /// attempt gave way to another trigger's upgrade without an outcome.
    async fn shared(mut rx: watch::Receiver<Option<Outcome>>) -> Option<String> {
        let outcome = rx.wait_for(Option::is_some).await.ok()?.clone()?;
        Some(match outcome {
            Ok(json) => format!("ok {},\"shared\":true}}", json.trim_end_matches('}')),
            Err(reply) => format!("{reply} (shared)"),
        })
    }

    fn euid() -> u32 {
        nix::unistd::geteuid().as_raw()
    }
}

/// Why a control request did not succeed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ControlError {
    /// The control socket cannot be reached (no server, wrong path).
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Sending the request or reading the reply failed or timed out.
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The server answered `error <reason>`: the request (the upgrade)
    /// failed, and this is why.
    Failed(String),
    /// The server answered something this client does not understand, or
    /// nothing.
    Protocol(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Connect { path, .. } => write!(f, "cannot connect to {}", path.display()),
            ControlError::Io { path, .. } => {
                write!(f, "no reply from {}", path.display())
            }
            ControlError::Failed(reason) => f.write_str(reason),
            ControlError::Protocol(what) => write!(f, "control protocol: {what}"),
        }
    }
}

impl std::error::Error for ControlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ControlError::Connect { source, .. } | ControlError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A reply line: `ok` or `retry` with its text, or none at all (the
/// connection closed first).
enum Reply {
    Ok(String),
    Retry(String),
    Closed,
}

fn exchange(path: &Path, request: &str, timeout: Duration) -> Result<Reply, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(io_err)?;
    s.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(io_err)?;
    // A refusal may come before the request is read: look for a reply even
    // if sending failed.
    let sent = s.write_all(format!("{request}\n").as_bytes());
    let mut line = String::new();
    match BufReader::new(s).take(1 << 20).read_line(&mut line) {
        Ok(_) => {}
        // The server went away mid-request: no reply, as with an EOF.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Reply::Closed),
        Err(e) => return Err(io_err(e)),
    }
    let line = line.trim_end();
    if let (Err(e), true) = (sent, line.is_empty()) {
        return Err(io_err(e));
    }
    if let Some(body) = line.strip_prefix("ok ") {
        Ok(Reply::Ok(body.to_owned()))
    } else if let Some(reason) = line.strip_prefix("retry ") {
        Ok(Reply::Retry(reason.to_owned()))
    } else if let Some(reason) = line.strip_prefix("error ") {
        Err(ControlError::Failed(reason.to_owned()))
    } else if line.is_empty() {
        Ok(Reply::Closed)
    } else {
        Err(ControlError::Protocol(format!("unexpected reply {line:?}")))
    }
}

/// Sends one request and returns the body of an `ok` reply. Waits at most
/// `timeout` for the reply. A `retry` reply is returned as
/// [`ControlError::Protocol`]; [`reload`] follows it.
pub fn request(
    path: impl AsRef<Path>,
    request: &str,
    timeout: Duration,
) -> Result<String, ControlError> {
    match exchange(path.as_ref(), request, timeout)? {
        Reply::Ok(body) => Ok(body),
        Reply::Retry(reason) => Err(ControlError::Protocol(format!("retry {reason}"))),
        Reply::Closed => Err(ControlError::Protocol(
            "the control socket closed without a reply".to_owned(),
        )),
    }
}

/// Requests an upgrade (to `program`, for this upgrade only, if given) and
/// waits for its result, at most `timeout` in all: `Ok(json)` names the
/// generation that serves, its pid and the program it runs. The reply is
/// always about a generation that started after this call.
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
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let reason = match exchange(path, &req, left)? {
            Reply::Ok(body) => return Ok(body),
            Reply::Retry(reason) => reason,
            // A generation that handed over may exit before it answers. Asking
            // again is safe: only a generation or an upgrade that started
            // after `since` may answer, so the reply is still the truth.
            Reply::Closed => "the control socket closed without a reply".to_owned(),
        };
        if left <= pause {
            return Err(ControlError::Protocol(format!(
                "still no answer at the deadline: {reason}"
            )));
        }
        // The successor takes over the socket within moments.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(Request::parse("status"), Ok(Request::Status));
        assert_eq!(
            Request::parse("upgrade"),
            Ok(Request::Upgrade {
                since: None,
                program: None
            })
        );
        assert_eq!(
            Request::parse("upgrade since=3 /bin/x"),
            Ok(Request::Upgrade {
                since: Some(3),
                program: Some("/bin/x".into())
            })
        );
        assert_eq!(
            Request::parse("upgrade since=3"),
            Ok(Request::Upgrade {
                since: Some(3),
                program: None
            })
        );
        assert!(Request::parse("upgrade since=x").is_err());
        assert!(Request::parse("upgraded").is_err());
        assert_eq!(
            Request::parse("upgrade /usr/bin/x"),
            Ok(Request::Upgrade {
                since: None,
                program: Some("/usr/bin/x".into())
            })
        );
        assert!(Request::parse("upgrade x").is_err());
        assert!(Request::parse("shutdown").is_err());
        assert!(Request::parse("").is_err());
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
