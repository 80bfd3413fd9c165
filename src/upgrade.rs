//! The upgrade state machine: Starting → Serving → Upgrading → Serving (on
//! failure) or HandedOver (on success). One upgrade at a time.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::env;
use crate::error::UpgradeError;
use crate::handover::{Handover, lock};
use crate::pidfile;
use crate::ready;
use crate::spawn::{self, SpawnError};
use crate::stats::Phases;
use crate::sys;

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Built, not ready yet.
    Starting,
    /// Ready; may upgrade.
    Serving,
    /// An upgrade is running.
    Upgrading,
    /// A successor is ready and serving: this generation should stop
    /// accepting, drain and exit.
    HandedOver,
    /// This generation reported itself unhealthy during its probation
    /// ([`Handover::report_unhealthy`]) and its predecessor took the service
    /// back: stop accepting, drain and exit.
    RolledBack,
}

type StateSource = Arc<Mutex<Option<(u32, Box<dyn Read + Send>)>>>;

/// Options for one upgrade.
#[derive(Clone, Default)]
#[must_use]
pub struct UpgradeOptions {
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
    preflight: Option<Vec<OsString>>,
    state: Option<StateSource>,
    probation: Option<Duration>,
}

impl std::fmt::Debug for UpgradeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeOptions")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("preflight", &self.preflight)
            .field("state", &self.state.is_some())
            .field("probation", &self.probation)
            .finish()
    }
}

impl UpgradeOptions {
    /// The defaults: the builder's program and arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Run this program instead (e.g. a kept previous binary, to roll back).
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// Streams `source` to the successor as its state, with format
    /// `version`, before it reports ready (see
    /// [`Handover::take_state`](crate::Handover::take_state)). The stream is
    /// chunked and never held whole in memory; it must be delivered within
    /// the ready timeout. A successor that rejects the version fails the
    /// upgrade with [`UpgradeError::StateRejected`].
    pub fn state(mut self, version: u32, source: impl Read + Send + 'static) -> Self {
        self.state = Some(Arc::new(Mutex::new(Some((version, Box::new(source))))));
        self
    }

    /// Run this preflight check instead of the builder's (see
    /// [`Builder::preflight`](crate::Builder::preflight)).
    pub fn preflight<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.preflight = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Use this probation window instead of the builder's (see
    /// [`Builder::probation`](crate::Builder::probation)); zero for none.
    pub fn probation(mut self, window: Duration) -> Self {
        self.probation = Some(window);
        self
    }

    /// Pass these arguments (without `argv[0]`) instead.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }
}

/// A successful upgrade: the successor is ready and serving. This
/// generation should now stop accepting (drop its listeners), drain, and exit.
#[derive(Debug, Clone)]
#[must_use = "after a successful upgrade this generation must stop accepting, drain and exit"]
pub struct Upgraded {
    /// The successor's pid.
    pub pid: u32,
    /// The successor's generation.
    pub generation: u64,
    /// From the start of the upgrade to the successor's ready message.
    pub ready_after: Duration,
    /// How long each phase took, up to the commit (the drain and the exit
    /// come later).
    pub phases: Phases,
}

/// The outcome of the last upgrade this generation attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeRecord {
    /// The successor's pid, if it became ready.
    pub successor: Option<u32>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// From the start of the attempt to its end.
    pub duration: Duration,
}

/// Resets the state to Serving unless the upgrade committed, and tells the
/// service manager that this generation still serves.
struct Attempt<'a> {
    handover: &'a Handover,
    committed: bool,
    reloading_sent: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let inner = &self.handover.inner;
        *lock(&inner.state) = State::Serving;
        if self.reloading_sent {
            let msg = format!(
                "READY=1\nSTATUS=upgrade failed; serving (generation {})",
                inner.generation
            );
            if let Err(e) = inner.notifier.notify(&msg) {
                tracing::warn!(error = %e, "cannot notify the service manager");
            }
        }
    }
}

impl Handover {
    /// Where this generation is in its life.
    pub fn state(&self) -> State {
        *lock(&self.inner.state)
    }

    /// Upgrades with the default program and arguments, blocking until the
    /// successor is ready or the upgrade failed. See
    /// [`upgrade_blocking_with`](Self::upgrade_blocking_with).
    pub fn upgrade_blocking(&self) -> Result<Upgraded, UpgradeError> {
        self.upgrade_blocking_with(UpgradeOptions::new())
    }

    /// Fork+execs a successor, hands it this generation's registered fds,
    /// and waits until it reports ready.
    ///
    /// Refused without spawning anything when this generation is not ready
    /// yet, is already upgrading, has already handed over, or another process
    /// holds the upgrade lock. On any failure the successor (if one was
    /// started) is killed and reaped, and this generation keeps serving,
    /// untouched.
    ///
    /// On success the pid file names the successor, this generation drops its
    /// own copies of the fds (the application drops its listeners itself),
    /// and the channel stays open until this process exits, so the successor
    /// learns when its predecessor is gone. The successor is never this
    /// process's child: it is started through an intermediate process, which
    /// exits on success so that the successor is reparented to the nearest
    /// subreaper (the service manager under systemd) or init. Under systemd
    /// the manager is told `MAINPID=<successor>` and `READY=1` (see
    /// [`systemd`](crate::systemd)).
    pub fn upgrade_blocking_with(&self, opts: UpgradeOptions) -> Result<Upgraded, UpgradeError> {
        let start = Instant::now();
        let mut phases = Phases::default();
        let result = self.run_upgrade(opts, &mut phases);
        if let Err(e) = &result {
            if !matches!(e, UpgradeError::InProgress) {
                // A success was counted at the commit, before the successor
                // was told.
                let mut c = lock(&self.inner.counters);
                c.failed += 1;
                c.last_error = Some(e.to_string());
                if phases != Phases::default() {
                    c.last = Some(phases);
                }
            }
        }
        if !matches!(result, Err(UpgradeError::InProgress)) {
            let record = UpgradeRecord {
                successor: result.as_ref().ok().map(|u| u.pid),
                error: result.as_ref().err().map(|e| e.to_string()),
                duration: start.elapsed(),
            };
            *lock(&self.inner.last_upgrade) = Some(record);
        }
        result
    }

    /// The outcome of the last upgrade attempt of this generation.
    pub fn last_upgrade(&self) -> Option<UpgradeRecord> {
        lock(&self.inner.last_upgrade).clone()
    }

    fn run_upgrade(
        &self,
        opts: UpgradeOptions,
        phases: &mut Phases,
    ) -> Result<Upgraded, UpgradeError> {
        let inner = &self.inner;
        // Take in what the predecessor sent: its commit ends this
        // generation's probation.
        let _ = self.pump_channel();
        if !lock(&inner.link).committed {
            return Err(UpgradeError::OnProbation);
        }
        {
            let mut state = lock(&inner.state);
            match *state {
                State::Starting => return Err(UpgradeError::NotReady),
                State::Upgrading => return Err(UpgradeError::InProgress),
                State::HandedOver | State::RolledBack => return Err(UpgradeError::HandedOver),
                State::Serving => *state = State::Upgrading,
            }
        }
        let mut attempt = Attempt {
            handover: self,
            committed: false,
            reloading_sent: false,
        };
        let generation = inner.generation + 1;
        let start = Instant::now();
        let deadline = start + inner.ready_timeout;
        let probation = opts.probation.unwrap_or(inner.probation);
        let span = crate::stats::upgrade_span(inner.generation);
        let _enter = span.enter();

        let _lock = match &inner.pid_file {
            Some(pid_file) => {
                let path = pidfile::lock_path(pid_file);
                match pidfile::try_lock(&path) {
                    Ok(Some(l)) => Some(l),
                    Ok(None) => return Err(UpgradeError::Locked { path }),
                    Err(e) => {
                        return Err(UpgradeError::io(
                            format!("cannot lock {}", path.display()),
                            e,
                        ));
                    }
                }
            }
            None => None,
        };
        // Type=notify-reload needs RELOADING=1 with MONOTONIC_USEC; other
        // types take it as a status. The reload may take as long as the
        // ready timeout allows.
        let n = &inner.notifier;
        let msg = format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nEXTEND_TIMEOUT_USEC={}\nSTATUS=upgrading to generation {generation}",
            crate::systemd::monotonic_usec(),
            (inner.ready_timeout + probation + Duration::from_secs(5)).as_micros()
        );
        match n.notify(&msg) {
            Ok(()) => attempt.reloading_sent = n.is_enabled(),
            Err(e) => tracing::warn!(error = %e, "cannot notify the service manager"),
        }
        let program: &Path = opts.program.as_deref().unwrap_or(&inner.program);
        let args = opts.args.as_ref().unwrap_or(&inner.args);
        if let Err(source) = spawn::check_program(program) {
            tracing::warn!(program = %program.display(), error = %source, "successor program cannot run");
            return Err(UpgradeError::Program {
                path: program.to_owned(),
                source,
            });
        }
        if let Some(check) = opts.preflight.as_ref().or(inner.preflight.as_ref()) {
            let t = Instant::now();
            let checked = spawn::preflight(program, check, deadline);
            phase(phases, "preflight", t.elapsed());
            checked.map_err(|(status, output)| {
                tracing::warn!(?status, "preflight check failed");
                UpgradeError::Preflight { status, output }
            })?;
        }

        let spawn_start = Instant::now();
        let (ours, theirs) =
            sys::socketpair_cloexec().map_err(|e| UpgradeError::io("socketpair", e))?;
        let child = {
            let registry = lock(&inner.registry);
            let handed = registry.handed();
            let names: Vec<&str> = handed.iter().map(|(n, _)| *n).collect();
            let mut fds: Vec<_> = handed.iter().map(|(_, fd)| *fd).collect();
            fds.push(theirs.as_fd());
            let vars =
                std::env::vars_os().filter(|(k, _)| !env::NOT_INHERITED.iter().any(|n| k == n));
            let succ_vars = env::successor_vars(&names, generation, opts.state.is_some());
            tracing::info!(program = %program.display(), fds = names.len(), "spawning successor");
            spawn::spawn(program, args, vars, &succ_vars, &fds, deadline)
        };
        drop(theirs);
        let mut child = match child {
            Ok(c) => c,
            Err(SpawnError::Child { step, err }) => {
                tracing::warn!(step = SpawnError::describe_step(step), error = %err, "successor failed before exec completed");
                return Err(UpgradeError::Exec {
                    path: program.to_owned(),
                    source: err,
                });
            }
            Err(SpawnError::ExecTimeout { pid }) => {
                tracing::warn!(
                    pid,
                    "successor did not exec before the ready deadline; killed"
                );
                return Err(UpgradeError::Timeout {
                    pid: pid as u32,
                    after: inner.ready_timeout,
                });
            }
            Err(SpawnError::Parent(what, err)) => return Err(UpgradeError::io(what, err)),
        };
        let pid = child.pid as u32;
        let state_source = opts.state.as_ref().and_then(|s| lock(s).take());
        let writer = match state_source {
            None => None,
            Some((version, mut source)) => {
                let fd = ours
                    .try_clone()
                    .map_err(|e| UpgradeError::io("duplicating the channel", e))?;
                let left = deadline.saturating_duration_since(Instant::now());
                crate::state::set_timeout(fd.as_fd(), libc::SO_SNDTIMEO, left)
                    .map_err(|e| UpgradeError::io("setting the state timeout", e))?;
                Some(std::thread::spawn(move || {
                    let t = Instant::now();
                    let result = crate::state::write(fd.as_fd(), version, &mut source);
                    if result.is_err() {
                        // A broken source must not leave the successor
                        // waiting for bytes that never come.
                        // SAFETY: shutdown on a socket we hold.
                        unsafe {
                            libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SHUT_WR);
                        }
                    }
                    (result, t.elapsed())
                }))
            }
        };
        let exec_ms = start.elapsed().as_secs_f64() * 1e3;
        let exec_done = Instant::now();
        phase(phases, "spawn", exec_done - spawn_start);

        let ready = ready::wait_ready(ours.as_fd(), &mut child, deadline, inner.ready_timeout);
        if let Some(w) = writer {
            // Bounded: the writer's sends time out at the ready deadline,
            // and fail at once when the successor is gone.
            match w.join() {
                Ok((Ok(bytes), took)) => {
                    phases.state = Some(took);
                    tracing::info!(
                        phase = "state",
                        ms = took.as_secs_f64() * 1e3,
                        bytes,
                        mb_per_s = bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6,
                        "upgrade phase"
                    )
                }
                Ok((Err(e), _)) => tracing::warn!(error = %e, "state stream failed"),
                Err(_) => tracing::error!("state writer panicked"),
            }
        }
        if let Err(e) = ready {
            tracing::warn!(pid, error = %e, elapsed_ms = start.elapsed().as_secs_f64() * 1e3, "upgrade failed; still serving");
            return Err(e);
        }
        let ready_after = start.elapsed();
        phase(phases, "ready", exec_done.elapsed());
        if !probation.is_zero() {
            // Canary: both generations accept on the shared sockets until
            // the window passes; a successor that fails meanwhile is reaped
            // and this generation simply carries on.
            tracing::info!(
                pid,
                window_ms = probation.as_millis() as u64,
                "successor ready; probation started"
            );
            let t = Instant::now();
            let watched =
                ready::watch_probation(ours.as_fd(), &mut child, probation, inner.drain_timeout);
            phase(phases, "probation", t.elapsed());
            if let Err(e) = watched {
                tracing::warn!(pid, error = %e, "upgrade failed during probation; still serving");
                return Err(e);
            }
        }
        // Let the successor go: its intermediate exits, and it is reparented
        // to the nearest subreaper (the service manager under systemd) before
        // anyone is told it is the main process.
        child.release();

        // Commit: from here on the successor serves.
        if let Some(path) = &inner.pid_file {
            if let Err(e) = pidfile::write(path, pid) {
                tracing::error!(path = %path.display(), error = %e, "cannot write the pid file");
            }
        }
        // The old main process names its successor main and ready, and waits
        // until the manager has taken that in before it drains, so the
        // manager never sees the main process exit.
        let msg = format!("MAINPID={pid}\nREADY=1\nSTATUS=serving (generation {generation})");
        match n
            .notify(&msg)
            .and_then(|()| n.barrier(Duration::from_secs(5)))
        {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot notify the service manager of the new main pid")
            }
        }
        *lock(&inner.state) = State::HandedOver;
        attempt.committed = true;
        lock(&inner.registry).clear();
        // The counters travel with the service: the successor carries on
        // counting from ours.
        let commit = {
            let mut c = lock(&inner.counters);
            c.succeeded += 1;
            c.last = Some(*phases);
            crate::stats::encode_commit(&c)
        };
        let mut msg = vec![ready::MSG_COMMIT];
        msg.extend_from_slice(commit.as_bytes());
        msg.push(b'\n');
        if let Err(e) = sys::send_all(ours.as_fd(), &msg) {
            tracing::warn!(pid, error = %e, "cannot send the commit to the successor");
        }
        // Keep our end of the channel open until this process exits: its EOF
        // tells the successor that its predecessor is gone. It is
        // close-on-exec, so no other child ever holds it.
        *lock(&inner.successor) = Some(ours);
        // Our own predecessor's channel is of no further use.
        lock(&inner.channel).take();
        tracing::info!(
            pid,
            exec_ms,
            ready_ms = ready_after.as_secs_f64() * 1e3,
            "successor ready; handed over"
        );
        Ok(Upgraded {
            pid,
            generation,
            ready_after,
            phases: *phases,
        })
    }

    /// Upgrades with the default program and arguments; the async form of
    /// [`upgrade_blocking`](Self::upgrade_blocking).
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeError> {
        self.upgrade_with(UpgradeOptions::new()).await
    }

    /// The async form of [`upgrade_blocking_with`](Self::upgrade_blocking_with).
    ///
    /// The work runs on tokio's blocking pool. Dropping the future does not
    /// cancel the upgrade: it runs to its end, and [`state`](Self::state)
    /// tells how it ended.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn upgrade_with(&self, opts: UpgradeOptions) -> Result<Upgraded, UpgradeError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.upgrade_blocking_with(opts))
            .await
            .map_err(|e| UpgradeError::io("upgrade task", std::io::Error::other(e)))?
    }
}

/// Records a phase and reports it as an event of the current upgrade span.
fn phase(phases: &mut Phases, name: &'static str, took: Duration) {
    crate::stats::record(phases, name, took);
}
