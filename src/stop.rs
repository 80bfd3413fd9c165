//! A real stop: this generation is the last, no successor takes over.
//!
//! [`Handover::stop`](crate::Handover::stop) moves the generation to
//! [`State::Stopping`] (no upgrade starts from there) and, at once:
//!
//! - tells the service manager `STOPPING=1` (only a generation that is the
//!   main process: never one on probation, whose predecessor still is);
//! - closes the registry's copies of every fd. The registry keeps a copy of
//!   each listener for a successor; with no successor to come, that copy
//!   would keep the port in LISTEN for the whole drain: new connections
//!   would complete their handshake and hang, and a restart could not bind.
//!   The socket itself closes when its last fd does — the application's
//!   listener, which the serving layer drops once it has taken what is
//!   already queued. Where someone else holds the socket too, it stays
//!   open and new connections queue in it: the service manager (socket
//!   activation, the fd store: the next start takes them), or a predecessor
//!   still watching this generation's probation;
//! - removes the files this generation owns, if it is the main process: the
//!   pid file if it still names this process, its `.lock` unless an upgrade
//!   holds it, and the control socket's path if the socket file there is
//!   still this generation's socket (not under the fd store, which keeps
//!   the socket for the next start). From the stop on there is no serving
//!   generation for them to name, as after a handover the pid file names
//!   the successor while the old generation drains. So a process that ends
//!   before its drain does leaves nothing behind either.
//!
//! Unix socket paths the application registered (`unix_listener`) are left
//! alone: one passed by the service manager is its to remove (systemd's
//! `RemoveOnStop=`), and `unix_listener` replaces a stale socket file at
//! the next start.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::fds::Want;
use crate::lifecycle::{Generation, State, lock};
use crate::pidfile;
use crate::sys::{self, FileId};

impl Generation {
    /// `Handover::stop`'s work, without the drain.
    pub(crate) fn stop(&self) -> State {
        let main = {
            let mut life = self.life();
            match life.state {
                State::Stopping => return State::Stopping,
                State::Upgrading => return State::Upgrading,
                s @ (State::HandedOver | State::RolledBack) => return s,
                State::Starting | State::Serving => {}
            }
            life.state = State::Stopping;
            // A successor on probation is not the main process, and its
            // predecessor still serves the files and sockets they share.
            life.committed
        };
        if main {
            self.notifier.send("STOPPING=1");
        }
        let control = {
            let mut registry = lock(&self.registry);
            // Which file the control socket is, asked before it is closed.
            let control = registry
                .find(crate::control::NAME)
                .into_iter()
                .find_map(|(want, fd)| match want {
                    Want::UnixListenerAt(path) => Some(ControlSocket {
                        path: path.clone(),
                        file: sys::unix_socket_file(fd.as_fd()),
                    }),
                    _ => None,
                });
            registry.clear();
            control
        };
        let mut removed = Vec::new();
        if main {
            self.remove_files(control, &mut removed);
        }
        tracing::info!(
            generation = self.generation,
            removed = ?removed,
            "stopping: listeners closed, draining"
        );
        State::Stopping
    }

    /// Removes the pid file, the lock and the control socket's path where
    /// they are still this generation's; what it removed goes to `removed`.
    fn remove_files(&self, control: Option<ControlSocket>, removed: &mut Vec<PathBuf>) {
        let mut note = |what: &str, path: &Path, result: std::io::Result<bool>| match result {
            Ok(true) => removed.push(path.to_owned()),
            Ok(false) => {
                tracing::debug!(path = %path.display(), "{what} is not this generation's; left alone")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the {what}")
            }
        };
        if let Some(pid_file) = &self.config.pid_file {
            let me = std::process::id();
            note("pid file", pid_file, pidfile::remove_if_names(pid_file, me));
            let lock_path = pidfile::lock_path(pid_file);
            note("lock file", &lock_path, pidfile::remove_lock(&lock_path));
        }
        let Some(ControlSocket { path, file }) = control else {
            return;
        };
        if self.config.fd_store && self.notifier.is_enabled() {
            // The manager keeps the socket for the next start, which serves
            // it at this path.
            return;
        }
        let result = match file {
            Ok(Some(ours)) => pidfile::remove_if(&path, |p| Ok(file_id(p)? == ours)),
            Ok(None) => Ok(false), // abstract: no file
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("cannot tell whether the socket file is ours: {e}"),
            )),
        };
        note("control socket", &path, result);
    }
}

/// The control socket's path, and the file its socket is bound to.
struct ControlSocket {
    path: PathBuf,
    file: std::io::Result<Option<FileId>>,
}

/// The file at `path`, not following a symlink.
fn file_id(path: &Path) -> std::io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}
