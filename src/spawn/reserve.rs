//! The fds an upgrade needs, opened in advance (see [`Reserve`]).

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::pidfile::{self, LockFile, TempFile, UpgradeLock};
use crate::sys;

/// Spare fds in the [`Reserve`], freed for what cannot be opened in advance:
/// the preflight check's pipes and `/dev/null` (6), what a start opens (a
/// pidfd started directly; the intermediate's pipes and two pidfds, at most
/// 5 at once), or the commit's `BARRIER=1` pipe (2).
const SPARE_FDS: usize = 6;

/// Copies of a successor's channel to its predecessor made at build, for
/// what uses one while the successor may already be at its fd limit: the
/// state reader, the discarding of an unread state, the ready message, the
/// thread that watches for the predecessor's exit, and the task waiting on
/// the channel (`predecessor_exited`, `committed`). All are closed once the
/// predecessor is gone.
const CHANNEL_COPIES: usize = 5;

/// The name of the secrets' memory file (shown in `/proc/PID/fd`).
const SECRETS_FILE: &std::ffi::CStr = c"handover.secrets";

/// The old generation's pipes to an intermediate process, made for each
/// start just before its fork (not in advance: a child that the
/// application forks in between would hold a copy).
#[derive(Debug)]
pub(super) struct SpawnFds {
    /// The intermediate's records, `(read, write)`.
    pub(super) status: (OwnedFd, OwnedFd),
    /// `(ours, the intermediate's)`: a socket pair, so that a byte for an
    /// intermediate that is gone is `EPIPE`, never `SIGPIPE`.
    pub(super) release: (OwnedFd, OwnedFd),
}

impl SpawnFds {
    pub(super) fn open() -> io::Result<SpawnFds> {
        Ok(SpawnFds {
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

/// What an upgrade needs, opened while fds are plentiful (in `ready()`, and
/// again after each failed upgrade), so that an upgrade works at the fd limit: the
/// lock file, the channel, the pid file's temporary file and a few spare
/// fds. Each part that is missing (it could not be opened in advance) is
/// opened when needed instead. Every fd is close-on-exec.
///
/// The spare fds are a last resort for what cannot be opened in advance
/// (or must not be: the start's pipes, see [`SpawnFds`]): freed just before
/// it is opened, a slot may be taken by another thread of the application
/// meanwhile (an accept loop at the limit).
#[derive(Debug, Default)]
pub(crate) struct Reserve {
    lock: Option<LockFile>,
    lock_path: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    pid_tmp: Option<TempFile>,
    channel: Option<ChannelFds>,
    spare: Vec<OwnedFd>,
    channel_copies: Vec<OwnedFd>,
    /// An empty memory file for the secrets an upgrade hands on (see
    /// `secrets`), kept once the generation has secrets.
    secrets: Option<OwnedFd>,
    wants_secrets: bool,
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
        if let (None, true) = (&self.secrets, self.wants_secrets) {
            match sys::memfd_sealable(SECRETS_FILE) {
                Ok(f) => self.secrets = Some(f),
                Err(e) => failed = Some(e),
            }
        }
        // Asked once, while a slot is free for the question.
        super::platform::can_start_directly();
        if let Err(e) = self.refill_spares() {
            failed = Some(e);
        }
        if let Some(e) = failed {
            tracing::debug!(error = %e, "cannot reserve every fd an upgrade needs; opening the rest when needed");
        }
    }

    pub(super) fn refill_spares(&mut self) -> io::Result<()> {
        if self.spare.is_empty() {
            let (r, w) = sys::pipe_cloexec()?;
            self.spare.extend([r, w]);
        }
        while self.spare.len() < SPARE_FDS {
            let spare = self.spare[0].try_clone()?;
            self.spare.push(spare);
        }
        Ok(())
    }

    /// Frees `n` spare fds (or all there are), for what a start opens.
    pub(super) fn free_spare_fds(&mut self, n: usize) {
        let keep = self.spare.len().saturating_sub(n);
        self.spare.truncate(keep);
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

    /// From now on, keep an empty memory file for the secrets an upgrade
    /// hands on (made now, best effort, and again by each refill).
    pub(crate) fn want_secrets_file(&mut self) {
        self.wants_secrets = true;
        if self.secrets.is_none() {
            self.secrets = sys::memfd_sealable(SECRETS_FILE).ok();
        }
    }

    /// The empty memory file for this upgrade's secrets: the one kept, or a
    /// new one.
    pub(crate) fn secrets_file(&mut self) -> io::Result<OwnedFd> {
        match self.secrets.take() {
            Some(f) => Ok(f),
            None => sys::memfd_sealable(SECRETS_FILE),
        }
    }

    /// Frees the spare fds, for what cannot be opened in advance: the
    /// commit's `BARRIER=1` pipe, a preflight check's pipes.
    pub(crate) fn free_spares(&mut self) {
        self.spare.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn the_reserve_holds_close_on_exec_fds_and_opens_more_when_empty() {
        let dir = std::env::temp_dir().join(format!("handover-reserve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("x.pid");
        let mut r = Reserve::for_generation(Some(&pid_file), None);
        assert!(r.lock.is_none() && r.channel.is_none(), "opened by refill");
        r.refill();
        assert!(r.lock.is_some() && r.channel.is_some());
        assert_eq!(r.spare.len(), SPARE_FDS);
        let c = r.channel().unwrap();
        let p = SpawnFds::open().unwrap();
        for fd in [
            &c.ours,
            &c.ours_copy,
            &c.theirs,
            &p.status.0,
            &p.status.1,
            &p.release.0,
            &p.release.1,
        ]
        .into_iter()
        .chain(&r.spare)
        {
            assert!(sys::is_cloexec(fd.as_fd()).unwrap());
        }
        // Taken: the next ones are opened on demand; refill reserves again.
        assert!(r.channel.is_none());
        assert!(r.channel().is_ok());
        r.refill();
        assert!(r.channel.is_some());
        // Spares freed a few at a time, or all, come back, from nothing too.
        r.free_spare_fds(2);
        assert_eq!(r.spare.len(), SPARE_FDS - 2);
        r.free_spare_fds(SPARE_FDS + 1);
        assert!(r.spare.is_empty());
        r.refill_spares().unwrap();
        assert_eq!(r.spare.len(), SPARE_FDS);
        let lock_path = pidfile::lock_path(&pid_file);
        let held = r.lock_upgrades(&lock_path).unwrap().expect("free");
        let other = LockFile::open(&lock_path).unwrap();
        assert!(other.try_lock().unwrap().is_none());
        drop(held);
        assert!(other.try_lock().unwrap().is_some());
        r.free_spares();
        assert!(r.spare.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
