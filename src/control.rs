//! The control socket: `upgrade` and `status` requests over a Unix socket
//! that only this process's user may use, and a client that returns the
//! upgrade's real result — so `ExecReload=myservice reload --control PATH`
//! makes `systemctl reload` fail when the upgrade fails.
//!
//! The protocol is one line each way. Requests: `status`, or
//! `upgrade [since=USEC] [absolute program path]`. Replies: `ok <json>` or
//! `error <reason>`. The reply to `upgrade` comes when the upgrade has
//! succeeded or failed.
//!
//! Several `upgrade` requests during one upgrade: the first runs it, the
//! others wait for it and share its result (their reply says `shared`); a
//! generation that handed over answers later requests with that result too.
//! A request that says when it was made (`since=`, as [`reload`] does) and
//! reaches a generation that an upgrade started after that, or less than
//! [`COALESCE`] (250 ms) before, is answered `"already":true` instead of
//! upgrading again: 10 reloads within 100 ms make one upgrade. A request
//! naming a program (a rollback) is never coalesced.

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

/// Upgrade requests made less than this long after a generation started
/// (or before it) are answered with that generation: a burst of reloads
/// makes one upgrade. Two deploys this close together would be one.
pub const COALESCE: Duration = Duration::from_millis(250);
#[cfg(feature = "tokio")]
const COALESCE_USEC: u128 = COALESCE.as_micros();

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
    let last = match h.last_upgrade() {
        None => "null".to_owned(),
        Some(r) => format!(
            "{{\"ok\":{},\"successor\":{},\"error\":{},\"ms\":{:.3}}}",
            r.error.is_none(),
            r.successor.map_or("null".to_owned(), |p| p.to_string()),
            r.error.as_deref().map_or("null".to_owned(), json_str),
            r.duration.as_secs_f64() * 1e3
        ),
    };
    let stats = h.stats();
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
    /// path). `since` is the client's `CLOCK_MONOTONIC` in microseconds when
    /// it decided to ask: a generation that started after that, or less than
    /// [`COALESCE`] before, answers that the upgrade already happened, so a
    /// burst of requests, or one queued during a handover, upgrades once.
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
    use tokio::sync::{Mutex, watch};

    type Shared = Arc<Mutex<Option<watch::Receiver<Option<Result<String, String>>>>>>;

    /// Serves the control socket until an upgrade requested through it
    /// succeeds, and returns that upgrade: the caller then stops accepting,
    /// drains and exits, like after any other upgrade.
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

    /// [`serve`] with the options of each upgrade made by `options` (for
    /// instance with a [state](UpgradeOptions::state)); a program named in
    /// the request replaces theirs.
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn serve_with<F>(
        handover: Handover,
        listener: tokio::net::UnixListener,
        options: F,
    ) -> Upgraded
    where
        F: Fn() -> UpgradeOptions + Send + Sync + 'static,
    {
        let options = Arc::new(options);
        // A successor on probation leaves the requests to its predecessor,
        // which still accepts on the same socket: only one of them runs
        // upgrades.
        if let Err(e) = handover.committed().await {
            tracing::warn!(error = %e, "cannot learn whether the handover is final; serving control requests");
        }
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Upgraded>(1);
        let shared: Shared = Arc::new(Mutex::new(None));
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (h, tx, shared, o) = (handover.clone(), done_tx.clone(), shared.clone(), options.clone());
                    tokio::spawn(async move {
                        let opts = move || o();
                        let _ = tokio::time::timeout(Duration::from_secs(600), connection(h, stream, tx, shared, opts)).await;
                    });
                }
                Some(done) = done_rx.recv() => return done,
            }
        }
    }

    async fn connection(
        h: Handover,
        stream: tokio::net::UnixStream,
        done: tokio::sync::mpsc::Sender<Upgraded>,
        shared: Shared,
        options: impl Fn() -> UpgradeOptions,
    ) -> io::Result<()> {
        let own = rustix_euid();
        let (r, mut w) = stream.into_split();
        let peer = r.as_ref().peer_cred()?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(r).take(MAX_REQUEST as u64);
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
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
            Err(e) => format!("error {e}\n"),
            Ok(Request::Status) => format!("ok {}\n", status_json(&h)),
            // Only a generation started by an upgrade coalesces, and only
            // plain requests: one naming a program (a rollback) always runs.
            Ok(Request::Upgrade {
                since: Some(t),
                program: None,
            }) if h.from_predecessor() && h.inner.started_usec + COALESCE_USEC > t => {
                format!(
                    "ok {{\"pid\":{},\"generation\":{},\"already\":true}}\n",
                    std::process::id(),
                    h.generation()
                )
            }
            Ok(Request::Upgrade { program, .. }) => {
                upgrade(&h, program, &done, &shared, options).await
            }
        };
        w.write_all(reply.as_bytes()).await?;
        w.shutdown().await
    }

    async fn upgrade(
        h: &Handover,
        program: Option<PathBuf>,
        done: &tokio::sync::mpsc::Sender<Upgraded>,
        shared: &Shared,
        options: impl Fn() -> UpgradeOptions,
    ) -> String {
        // Join the upgrade in progress, if there is one.
        let tx = {
            let mut slot = shared.lock().await;
            if let Some(rx) = slot.as_ref() {
                let mut rx = rx.clone();
                drop(slot);
                let result = match rx.wait_for(Option::is_some).await {
                    Ok(r) => r.clone().expect("checked"),
                    Err(_) => Err("the upgrade task ended".to_owned()),
                };
                return match result {
                    Ok(json) => format!("ok {json} shared\n"),
                    Err(e) => format!("error {e} (shared)\n"),
                };
            }
            let (tx, rx) = watch::channel(None);
            *slot = Some(rx);
            tx
        };
        let mut opts = options();
        if let Some(p) = program {
            opts = opts.program(p);
        }
        let result = h.upgrade_with(opts).await;
        let outcome = match &result {
            Ok(u) => Ok(format!(
                "{{\"pid\":{},\"generation\":{},\"ready_ms\":{:.3}}}",
                u.pid,
                u.generation,
                u.ready_after.as_secs_f64() * 1e3
            )),
            Err(e) => Err(e.to_string()),
        };
        {
            let mut slot = shared.lock().await;
            let _ = tx.send(Some(outcome.clone()));
            if outcome.is_err() {
                // A failed upgrade may be retried by the next request. A
                // successful one stays: later requests to this (now
                // draining) generation share its result.
                *slot = None;
            }
        }
        if let Ok(u) = result {
            let _ = done.send(u).await;
        }
        match outcome {
            Ok(json) => format!("ok {json}\n"),
            Err(e) => format!("error {e}\n"),
        }
    }

    fn rustix_euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }
}

/// Sends one request and returns the reply line: `Ok(body)` for `ok body`,
/// `Err(reason)` for `error reason` or when the socket cannot be reached.
/// Waits at most `timeout` for the reply.
pub fn request(path: impl AsRef<Path>, request: &str, timeout: Duration) -> Result<String, String> {
    let path = path.as_ref();
    let mut s = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // A refusal may come before the request is read: look for a reply even
    // if sending failed.
    let sent = s.write_all(format!("{request}\n").as_bytes());
    let mut line = String::new();
    BufReader::new(s)
        .take(1 << 20)
        .read_line(&mut line)
        .map_err(|e| format!("no reply from {}: {e}", path.display()))?;
    let line = line.trim_end();
    if let (Err(e), true) = (&sent, line.is_empty()) {
        return Err(format!("cannot send the request: {e}"));
    }
    if let Some(body) = line.strip_prefix("ok ") {
        Ok(body.to_owned())
    } else if let Some(reason) = line.strip_prefix("error ") {
        Err(reason.to_owned())
    } else if line.is_empty() {
        Err("the control socket closed without a reply".to_owned())
    } else {
        Err(format!("unexpected reply {line:?}"))
    }
}

/// Requests an upgrade (to `program`, if given) and waits for its result.
pub fn reload(
    path: impl AsRef<Path>,
    program: Option<&Path>,
    timeout: Duration,
) -> Result<String, String> {
    // Say when we asked: a generation started after that (the upgrade
    // happened meanwhile, e.g. for another request of the same burst)
    // answers instead of upgrading again.
    let since = crate::systemd::monotonic_usec();
    let req = match program {
        Some(p) => format!("upgrade since={since} {}", p.display()),
        None => format!("upgrade since={since}"),
    };
    request(path, &req, timeout)
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
