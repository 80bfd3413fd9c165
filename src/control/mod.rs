//! The control socket: the service's one operator endpoint, a Unix socket on
//! which `reload` and `status` requests get the real result of an upgrade —
//! so `ExecReload=myservice reload --control PATH` makes `systemctl reload`
//! fail when the upgrade fails — and the [`command`] that sends them.
//!
//! # Who may do what
//!
//! What the control socket lets a peer do decides who can run code as the
//! service, so every request is checked, in this order:
//!
//! 1. **The peer's uid**, right after `accept` and before anything is read
//!    (`SO_PEERCRED`): only the service's own effective uid, and those added
//!    with [`ControlSocket::allow_uid`]. Anyone else is answered `error
//!    permission denied` and nothing of theirs is read.
//! 2. **How many**: at most 16 control connections at a time; past that a
//!    connection is answered `busy` at once. A request line is at most
//!    4 KiB and must arrive within 10 s.
//! 3. **What runs**: a plain `reload` runs the service's deploy path — the
//!    path it was started with, which the operator chose (whoever can write
//!    it can change what the service runs anyway). A `reload --binary
//!    PATH` (a rollback) names another program: it is refused unless the
//!    application allowed that program, or a directory holding it, with
//!    [`ControlSocket::allow_program`]. By default nothing else may run,
//!    because a peer that may name the program runs any code it likes with
//!    the service's listening sockets and environment.
//! 4. **Takeover**: a `takeover` request hands every listener, the state and
//!    the connections to the peer — as much as running code as the service —
//!    so it is refused unless the application turned it on
//!    ([`ControlSocket::allow_takeover`]), and then only for the allowed
//!    uids of step 1. A plain `reload` never gives a peer more than the
//!    deploy path; a takeover gives the peer whatever it runs.
//!
//! The socket is created 0600 (see [`bind`]); one inherited from a service
//! manager (socket activation) or the fd store is checked the same way: an
//! abstract socket, or a file whose mode or owner lets another user connect,
//! is refused unless the application allows it
//! ([`ControlSocket::allow_open_socket`]).
//!
//! # The protocol
//!
//! One line each way. Requests: `status`, `upgrade [since=USEC]
//! [absolute program path]`, or `takeover` (see
//! [`Builder::take_over`](crate::Builder::take_over); answered with an offer
//! and fds when allowed). Replies: `ok <json>`, `error <reason>`, `busy
//! <reason>` (nothing was done; ask again later), or `retry <reason>` (ask
//! again: the generation that answered has handed over). The reply to
//! `upgrade` comes when the upgrade has succeeded or failed, and names the
//! generation, its pid, the program it runs (resolved, symlinks followed)
//! and `started_us`, when the upgrade that made it started
//! (`CLOCK_MONOTONIC`, µs). `status` names the serving generation, its
//! counters, its last upgrade (its own last attempt, or the upgrade that
//! made it), and the upgrade in progress, if any (since
//! when, which program, the successor's pid).
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
//! answers (it accepts on the same socket once its handover is final). A
//! request whose client has gone (closed its connection) before its upgrade
//! would start starts nothing.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::fds::Want;
use crate::handover::Handover;

mod client;
#[cfg(feature = "tokio")]
mod server;

pub use client::{ControlError, command, reload, status};
#[cfg(feature = "tokio")]
pub(crate) use server::serve_checked;

/// The registry name of the control socket.
pub(crate) const NAME: &str = "handover.control";

/// The longest request line accepted.
#[cfg(feature = "tokio")]
const MAX_REQUEST: usize = 4096;

/// What the control socket allows beyond its defaults (see the module
/// documentation, "Who may do what"), set on [`ControlSocket`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    programs: Vec<PathBuf>,
    uids: Vec<u32>,
    open_socket: bool,
    pub(crate) takeover: bool,
}

#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
impl Policy {
    /// Whether a peer with `uid` may make requests.
    pub(crate) fn uid_allowed(&self, uid: u32) -> bool {
        uid == nix::unistd::geteuid().as_raw() || self.uids.contains(&uid)
    }

    /// The program a request for `asked` runs: the resolved path, if the
    /// policy allows it; else why not.
    pub(crate) fn program_allowed(&self, asked: &Path, deploy: &Path) -> Result<PathBuf, String> {
        let resolved = crate::program::resolve(asked)
            .map_err(|e| format!("cannot run {}: {e}", asked.display()))?;
        if crate::program::resolve(deploy).is_ok_and(|d| d == resolved) {
            return Ok(resolved);
        }
        for allowed in &self.programs {
            let Ok(allowed) = crate::program::resolve(allowed) else {
                continue;
            };
            if resolved == allowed || (allowed.is_dir() && resolved.starts_with(&allowed)) {
                return Ok(resolved);
            }
        }
        Err(format!(
            "refused: this service runs only its deploy path ({}) on request; {} is not \
             among the programs it allows (ControlSocket::allow_program)",
            deploy.display(),
            asked.display()
        ))
    }
}

/// A bound (or inherited) control socket and what it allows, for
/// [`serve::Triggers::control`](crate::serve::Triggers::control). By default: only the service's own uid, only the deploy path,
/// no takeover, only a private socket.
#[derive(Debug)]
#[must_use]
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub struct ControlSocket {
    pub(crate) listener: std::os::unix::net::UnixListener,
    pub(crate) policy: Policy,
    /// An fd slot kept from the start (before the service accepts and may
    /// take every slot), for accepting a control connection at the fd limit.
    pub(crate) spare: Option<OwnedFd>,
    /// Reports a refused socket to the predecessor, if any.
    handover: Handover,
}

impl ControlSocket {
    /// Lets `reload --binary PATH` run `path` — or, if `path` is a
    /// directory, any program inside it (at any depth) — as the next
    /// generation, for that upgrade only (a rollback to a kept build). The
    /// requested program is resolved (symlinks followed) before it is
    /// checked, and what was checked is what runs. May be given several
    /// times. Default: none; a request naming another program than the
    /// deploy path is refused.
    pub fn allow_program(mut self, path: impl Into<PathBuf>) -> Self {
        self.policy.programs.push(path.into());
        self
    }

    /// Lets peers running as `uid` make requests too (for instance root, or
    /// a deploy user). Default: only the service's own effective uid.
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.policy.uids.push(uid);
        self
    }

    /// Lets a process started by someone else take the service over through
    /// this socket ([`Builder::take_over`](crate::Builder::take_over)):
    /// every listener, the state and (with migration) the connections go to
    /// it, so this gives an allowed peer as much as running its own program
    /// as the service — which is why it is off by default. Only peers of an
    /// allowed uid (the service's own, and [`allow_uid`](Self::allow_uid))
    /// may, checked before anything is sent. Default: off.
    pub fn allow_takeover(mut self, on: bool) -> Self {
        self.policy.takeover = on;
        self
    }

    /// Accepts an inherited control socket that other users can reach: an
    /// abstract one, or a file whose mode lets group or others write (that
    /// is, connect) or that another user owns. The uid check still applies
    /// to every request. Default: such a socket is refused when serving
    /// starts ([`Triggers::spawn`](crate::serve::Triggers::spawn) fails with
    /// [`Error::InvalidFd`]).
    pub fn allow_open_socket(mut self, on: bool) -> Self {
        self.policy.open_socket = on;
        self
    }

    /// The check of [`allow_open_socket`](Self::allow_open_socket), made when
    /// serving starts; a refusal is reported to a predecessor waiting for
    /// this generation.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.policy.open_socket {
            return Ok(());
        }
        let fd = self.listener.as_fd();
        match check_private(fd) {
            Ok(()) => Ok(()),
            Err(reason) => {
                let e = Error::InvalidFd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                    name: NAME.to_owned(),
                    reason: format!(
                        "{reason}: other users could reach the control socket \
                         (ControlSocket::allow_open_socket accepts it)"
                    ),
                };
                self.handover.generation_data().reported(Err(e))
            }
        }
    }
}

/// Creates (or inherits) the control socket at `path`; what it allows is
/// set on the [`ControlSocket`].
///
/// A new socket is bound inside a fresh 0700 directory with an
/// unpredictable name next to `path`, made 0600, and renamed into place, so
/// it is never reachable with looser permissions. A live socket at `path`
/// (another process serves it) or a file that is not a socket is an error.
/// Like every registered fd it is handed to successors.
pub fn bind(handover: &Handover, path: impl AsRef<Path>) -> Result<ControlSocket, Error> {
    let path = path.as_ref();
    let fd = handover.claim(NAME, Want::UnixListenerAt(path.to_owned()), || {
        secure_bind(path)
    })?;
    Ok(ControlSocket {
        spare: fd.try_clone().ok(),
        listener: fd.into(),
        policy: Policy::default(),
        handover: handover.clone(),
    })
}

/// Checks that only this user can reach the socket `fd`: a filesystem
/// socket owned by our effective uid without group or other write
/// permission. `Err(why not)`.
fn check_private(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), String> {
    let addr = socket2::SockRef::from(&fd)
        .local_addr()
        .map_err(|e| format!("getsockname: {e}"))?;
    if addr.is_unnamed() {
        return Ok(()); // nobody can connect to it
    }
    let Some(path) = addr.as_pathname() else {
        return Err(
            "it is an abstract socket, which any process of the network namespace \
                    can connect to"
                .to_owned(),
        );
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        // Removed: nobody can connect to it by name any more.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot check {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!("{} is not a socket", path.display()));
    }
    let own = nix::unistd::geteuid().as_raw();
    if meta.uid() != own {
        return Err(format!(
            "{} is owned by uid {}, not the service's uid {own}",
            path.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: group or others may connect",
            path.display()
        ));
    }
    Ok(())
}

fn secure_bind(path: &Path) -> io::Result<OwnedFd> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // mkdtemp: a fresh directory with an unpredictable name, 0700.
    let private =
        nix::unistd::mkdtemp(&dir.join(".handover-control-XXXXXX")).map_err(io::Error::from)?;
    let result = (|| {
        let tmp = private.join("control");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
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

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(any(feature = "tokio", feature = "fuzzing")), allow(dead_code))]
pub(crate) enum Request {
    /// `status`
    Status,
    /// `takeover`: hand the service over to the peer.
    TakeOver,
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

#[cfg_attr(not(any(feature = "tokio", feature = "fuzzing")), allow(dead_code))]
impl Request {
    /// Parses one request line (without its newline).
    pub(crate) fn parse(line: &str) -> Result<Request, String> {
        let line = line.trim_end_matches('\r');
        if line == "status" {
            return Ok(Request::Status);
        }
        if line == crate::takeover::REQUEST {
            return Ok(Request::TakeOver);
        }
        let unknown = || {
            format!(
                "unknown request {:?}",
                line.chars().take(64).collect::<String>()
            )
        };
        let Some(rest) = line.strip_prefix("upgrade") else {
            return Err(unknown());
        };
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return Err(unknown());
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

/// One JSON object, written field by field: the replies of the control
/// socket are small and flat, and this keeps them well-formed.
#[derive(Debug)]
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub(crate) struct Json(String);

#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
impl Json {
    pub(crate) fn new() -> Json {
        Json(String::from("{"))
    }

    fn key(&mut self, key: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        push_str(&mut self.0, key);
        self.0.push(':');
    }

    /// A number, `true`/`false`, or a nested object already written.
    pub(crate) fn raw(mut self, key: &str, value: impl std::fmt::Display) -> Json {
        self.key(key);
        use std::fmt::Write;
        let _ = write!(self.0, "{value}");
        self
    }

    /// A string.
    pub(crate) fn str(mut self, key: &str, value: &str) -> Json {
        self.key(key);
        push_str(&mut self.0, value);
        self
    }

    /// A string, or `null`.
    pub(crate) fn opt_str(self, key: &str, value: Option<&str>) -> Json {
        match value {
            Some(v) => self.str(key, v),
            None => self.raw(key, "null"),
        }
    }

    pub(crate) fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// Appends `s` as a JSON string: quotes, backslashes and control characters
/// escaped.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
fn push_str(out: &mut String, s: &str) {
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
    fn json_objects_are_well_formed() {
        let j = Json::new()
            .raw("pid", 7)
            .str("s", "a\"b\\c\n")
            .opt_str("none", None)
            .raw("nested", Json::new().raw("ok", true).finish())
            .finish();
        assert_eq!(
            j,
            "{\"pid\":7,\"s\":\"a\\\"b\\\\c\\u000a\",\"none\":null,\"nested\":{\"ok\":true}}"
        );
    }

    #[test]
    fn only_the_deploy_path_and_allowed_programs_run() {
        let dir = std::env::temp_dir().join(format!("handover-ctl-allow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("releases/v1")).unwrap();
        let deploy = dir.join("server");
        let kept = dir.join("releases/v1/server");
        let other = dir.join("other");
        for p in [&deploy, &kept, &other] {
            std::fs::write(p, b"#!/bin/sh\n").unwrap();
        }
        let current = dir.join("current");
        std::os::unix::fs::symlink(&kept, &current).unwrap();
        let none = Policy::default();
        assert!(none.program_allowed(&deploy, &deploy).is_ok());
        let e = none.program_allowed(&other, &deploy).unwrap_err();
        assert!(e.contains("refused") && e.contains("allow_program"), "{e}");
        let by_dir = Policy {
            programs: vec![dir.join("releases")],
            ..Policy::default()
        };
        assert_eq!(by_dir.program_allowed(&kept, &deploy).unwrap(), kept);
        // A symlink into the allowed directory runs its target, resolved.
        assert_eq!(by_dir.program_allowed(&current, &deploy).unwrap(), kept);
        assert!(by_dir.program_allowed(&other, &deploy).is_err());
        // A symlink out of it is refused, though it sits inside.
        let escape = dir.join("releases/escape");
        std::os::unix::fs::symlink(&other, &escape).unwrap();
        assert!(by_dir.program_allowed(&escape, &deploy).is_err());
        let by_file = Policy {
            programs: vec![other.clone()],
            ..Policy::default()
        };
        assert_eq!(by_file.program_allowed(&other, &deploy).unwrap(), other);
        assert!(by_file.program_allowed(&kept, &deploy).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
