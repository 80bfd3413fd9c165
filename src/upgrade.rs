//! The upgrade state machine: Starting → Serving → Upgrading → Serving (on
//! failure) or HandedOver (on success). One upgrade at a time.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::channel::{Inbox, Message};
use crate::clock;
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

type StateSource = Arc<Mutex<Option<StateStream>>>;

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
    /// The binary the successor runs: the program path resolved at the
    /// upgrade, symlinks followed.
    pub program: PathBuf,
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
        if !matches!(result, Err(UpgradeError::InProgress)) {
            // A success was counted at the commit, before the successor was
            // told.
            if let Err(e) = &result {
                // The one log line of every failure, in the log of the
                // generation that stays.
                tracing::warn!(
                    generation = self.inner.generation,
                    error = %e,
                    elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
                    "upgrade failed; still serving"
                );
                self.count_failure(e, phases);
            }
            let record = UpgradeRecord {
                successor: result.as_ref().ok().map(|u| u.pid),
                error: result.as_ref().err().map(|e| e.to_string()),
                duration: start.elapsed(),
            };
            *lock(&self.inner.last_upgrade) = Some(record);
        }
        #[cfg(feature = "tokio")]
        self.inner.upgrade_ended.notify_waiters();
        result
    }

    /// Counts a failed upgrade with its reason.
    fn count_failure(&self, e: &UpgradeError, phases: Phases) {
        let mut c = lock(&self.inner.counters);
        c.failed += 1;
        c.last_error = Some(e.to_string());
        if phases != Phases::default() {
            c.last = Some(phases);
        }
    }

    /// The outcome of the last upgrade attempt of this generation.
    pub fn last_upgrade(&self) -> Option<UpgradeRecord> {
        lock(&self.inner.last_upgrade).clone()
    }

    /// One upgrade, phase by phase: refuse or begin, announce, choose the
    /// program, preflight, spawn, state, wait for ready, probation, commit.
    /// Every failure on the way leaves this generation serving (see
    /// [`Attempt`]) with any successor killed and reaped.
    fn run_upgrade(
        &self,
        opts: UpgradeOptions,
        phases: &mut Phases,
    ) -> Result<Upgraded, UpgradeError> {
        let inner = &self.inner;
        let probation = opts.probation.unwrap_or(inner.probation);
        clock::check_setting(probation, true).map_err(|reason| UpgradeError::InvalidOptions {
            setting: "probation",
            reason,
        })?;
        let mut attempt = self.begin()?;
        let generation = inner.generation + 1;
        let start = Instant::now();
        let deadline = clock::after_from(start, inner.ready_timeout);
        let span = crate::stats::upgrade_span(inner.generation);
        let _enter = span.enter();

        let _lock = self.upgrade_lock()?;
        attempt.reloading_sent = self.announce_reload(generation, probation);
        let program = self.choose_program(&opts)?;
        let args = opts.args.as_ref().unwrap_or(&inner.args);
        if let Some(check) = opts.preflight.as_ref().or(inner.preflight.as_ref()) {
            let t = Instant::now();
            let checked = spawn::preflight(&program, check, deadline);
            phase(phases, "preflight", t.elapsed());
            checked.map_err(|(status, output)| {
                tracing::warn!(?status, "preflight check failed");
                UpgradeError::Preflight { status, output }
            })?;
        }
        let state = match &opts.state {
            Some(s) => lock(s).take(),
            None => self.default_state(),
        };

        let spawn_start = Instant::now();
        let (ours, mut child) =
            self.spawn_successor(&program, args, generation, state.is_some(), deadline)?;
        let pid = child.pid as u32;
        let writer = match state {
            Some(state) => Some(stream_state(&ours, state, deadline)?),
            None => None,
        };
        let exec_done = Instant::now();
        let exec_ms = (exec_done - start).as_secs_f64() * 1e3;
        phase(phases, "spawn", exec_done - spawn_start);

        let mut inbox = Inbox::default();
        let ready = ready::wait_ready(
            ours.as_fd(),
            &mut inbox,
            &mut child,
            deadline,
            inner.ready_timeout,
        );
        if let Some(w) = writer {
            join_state_writer(w, phases);
        }
        ready?;
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
            let watched = ready::watch_probation(
                ours.as_fd(),
                &mut inbox,
                &mut child,
                probation,
                inner.drain_timeout,
            );
            phase(phases, "probation", t.elapsed());
            watched?;
        }
        self.commit(ours, child, generation, phases)?;
        attempt.committed = true;
        tracing::info!(
            pid,
            program = %program.display(),
            exec_ms,
            ready_ms = ready_after.as_secs_f64() * 1e3,
            "successor ready; handed over"
        );
        Ok(Upgraded {
            pid,
            generation,
            program,
            ready_after,
            phases: *phases,
        })
    }

    /// Refuses an upgrade this generation cannot make now, or moves it to
    /// [`State::Upgrading`]; the returned guard moves it back unless the
    /// upgrade commits.
    fn begin(&self) -> Result<Attempt<'_>, UpgradeError> {
        let inner = &self.inner;
        // Take in what the predecessor sent: its commit ends this
        // generation's probation.
        let _ = self.pump_channel();
        if !lock(&inner.link).committed {
            return Err(UpgradeError::OnProbation);
        }
        let mut state = lock(&inner.state);
        match *state {
            State::Starting => return Err(UpgradeError::NotReady),
            State::Upgrading => return Err(UpgradeError::InProgress),
            State::HandedOver | State::RolledBack => return Err(UpgradeError::HandedOver),
            State::Serving => *state = State::Upgrading,
        }
        Ok(Attempt {
            handover: self,
            committed: false,
            reloading_sent: false,
        })
    }

    /// The lock next to the pid file, so that two processes never upgrade
    /// one service at once.
    fn upgrade_lock(&self) -> Result<Option<pidfile::UpgradeLock>, UpgradeError> {
        let Some(pid_file) = &self.inner.pid_file else {
            return Ok(None);
        };
        let path = pidfile::lock_path(pid_file);
        match pidfile::try_lock(&path) {
            Ok(Some(l)) => Ok(Some(l)),
            Ok(None) => Err(UpgradeError::Locked { path }),
            Err(e) => Err(UpgradeError::io(
                format!("cannot lock {}", path.display()),
                e,
            )),
        }
    }

    /// Tells the service manager that a reload started: `Type=notify-reload`
    /// needs `RELOADING=1` with `MONOTONIC_USEC`; other types take it as a
    /// status. The reload may take as long as the ready timeout and the
    /// probation window allow. Returns whether the manager was told.
    fn announce_reload(&self, generation: u64, probation: Duration) -> bool {
        let inner = &self.inner;
        let n = &inner.notifier;
        let extend = inner
            .ready_timeout
            .saturating_add(probation)
            .saturating_add(Duration::from_secs(5));
        let msg = format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nEXTEND_TIMEOUT_USEC={}\nSTATUS=upgrading to generation {generation}",
            crate::systemd::monotonic_usec(),
            extend.as_micros()
        );
        match n.notify(&msg) {
            Ok(()) => n.is_enabled(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot notify the service manager");
                false
            }
        }
    }

    /// The binary this upgrade runs: the deploy path (or the one-off program
    /// of these options), resolved now, symlinks followed, and checked to be
    /// an executable file.
    fn choose_program(&self, opts: &UpgradeOptions) -> Result<PathBuf, UpgradeError> {
        let asked: &Path = opts.program.as_deref().unwrap_or(&self.inner.program);
        let fail = |source: std::io::Error| {
            tracing::warn!(program = %asked.display(), error = %source, "successor program cannot run");
            UpgradeError::Program {
                path: asked.to_owned(),
                source,
            }
        };
        if !asked.is_absolute() {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an absolute path",
            )));
        }
        let program = crate::program::resolve(asked).map_err(fail)?;
        spawn::check_program(&program).map_err(fail)?;
        Ok(program)
    }

    /// The state the application provides for every upgrade (see
    /// [`Handover::set_state_source`]), if any.
    fn default_state(&self) -> Option<StateStream> {
        let source = lock(&self.inner.state_source).clone()?;
        Some(source())
    }

    /// Starts the successor with this generation's fds and a fresh channel;
    /// returns this generation's end of the channel and the child.
    fn spawn_successor(
        &self,
        program: &Path,
        args: &[OsString],
        generation: u64,
        with_state: bool,
        deadline: Instant,
    ) -> Result<(std::os::fd::OwnedFd, spawn::Child), UpgradeError> {
        let inner = &self.inner;
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
            // The successor upgrades to the deploy path, whatever it runs.
            let succ_vars = env::successor_vars(&names, generation, with_state, &inner.program);
            tracing::info!(program = %program.display(), fds = names.len(), "spawning successor");
            spawn::spawn(program, args, vars, &succ_vars, &fds, deadline)
        };
        drop(theirs);
        match child {
            Ok(c) => Ok((ours, c)),
            Err(SpawnError::Child { step, err }) => {
                tracing::warn!(step = SpawnError::describe_step(step), error = %err, "successor failed before exec completed");
                Err(UpgradeError::Exec {
                    path: program.to_owned(),
                    source: err,
                })
            }
            Err(SpawnError::ExecTimeout { pid }) => {
                tracing::warn!(
                    pid,
                    "successor did not exec before the ready deadline; killed"
                );
                Err(UpgradeError::Timeout {
                    pid: pid as u32,
                    after: inner.ready_timeout,
                })
            }
            Err(SpawnError::Parent(what, err)) => Err(UpgradeError::io(what, err)),
        }
    }

    /// The commit: from here on the successor serves. The pid file is
    /// written first — if it cannot be, the successor is killed (it is still
    /// ours) and the upgrade fails, so the pid file never names a process
    /// that does not serve. Then the successor is let go (reparented to the
    /// nearest subreaper before anyone names it main), the service manager
    /// is told, and the successor gets the commit with the counters.
    fn commit(
        &self,
        ours: std::os::fd::OwnedFd,
        child: spawn::Child,
        generation: u64,
        phases: &Phases,
    ) -> Result<(), UpgradeError> {
        let inner = &self.inner;
        let pid = child.pid as u32;
        if let Some(path) = &inner.pid_file {
            if let Err(source) = pidfile::write(path, pid) {
                tracing::error!(path = %path.display(), error = %source, "cannot write the pid file; killing the successor");
                drop(child); // kills and reaps it: it was not released
                return Err(UpgradeError::PidFile {
                    path: path.clone(),
                    source,
                });
            }
        }
        child.release();
        // The old main process names its successor main and ready, and waits
        // until the manager has taken that in before it drains, so the
        // manager never sees the main process exit.
        let n = &inner.notifier;
        let msg = format!("MAINPID={pid}\nREADY=1\nSTATUS=serving (generation {generation})");
        if let Err(e) = n
            .notify(&msg)
            .and_then(|()| n.barrier(Duration::from_secs(5)))
        {
            tracing::warn!(error = %e, "cannot notify the service manager of the new main pid");
        }
        *lock(&inner.state) = State::HandedOver;
        lock(&inner.registry).clear();
        // The counters travel with the service: the successor carries on
        // counting from ours.
        let commit = {
            let mut c = lock(&inner.counters);
            c.succeeded += 1;
            c.last = Some(*phases);
            Message::Commit(c.clone()).encode()
        };
        if let Err(e) = sys::send_all(ours.as_fd(), &commit) {
            tracing::warn!(pid, error = %e, "cannot send the commit to the successor");
        }
        // Keep our end of the channel open until this process exits: its EOF
        // tells the successor that its predecessor is gone. It is
        // close-on-exec, so no other child ever holds it.
        *lock(&inner.successor) = Some(ours);
        // Our own predecessor's channel is of no further use.
        lock(&inner.channel).take();
        Ok(())
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
        match tokio::task::spawn_blocking(move || this.upgrade_blocking_with(opts)).await {
            Ok(result) => result,
            Err(e) => {
                // A panic inside the upgrade (a bug): count it like any
                // failure, and say so.
                let e = UpgradeError::io("upgrade task", std::io::Error::other(e.to_string()));
                // (The attempt's guard has put the state back while unwinding.)
                self.count_failure(&e, Phases::default());
                Err(e)
            }
        }
    }
}

/// A state for the successor: its format version and its bytes.
pub(crate) type StateStream = (u32, Box<dyn Read + Send>);

/// Streams `state` over a copy of the channel from a thread of its own, so
/// that waiting for ready goes on meanwhile. Its sends time out at the
/// ready deadline.
fn stream_state(
    channel: &std::os::fd::OwnedFd,
    state: StateStream,
    deadline: Instant,
) -> Result<std::thread::JoinHandle<(std::io::Result<u64>, Duration)>, UpgradeError> {
    let (version, mut source) = state;
    let fd = channel
        .try_clone()
        .map_err(|e| UpgradeError::io("duplicating the channel", e))?;
    let left = deadline.saturating_duration_since(Instant::now());
    crate::state::set_timeout(fd.as_fd(), libc::SO_SNDTIMEO, left)
        .map_err(|e| UpgradeError::io("setting the state timeout", e))?;
    Ok(std::thread::spawn(move || {
        let t = Instant::now();
        let result = crate::state::write(fd.as_fd(), version, &mut source);
        if result.is_err() {
            // A broken source must not leave the successor waiting for
            // bytes that never come.
            let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write);
        }
        (result, t.elapsed())
    }))
}

/// Waits for the state writer (bounded: its sends time out at the ready
/// deadline, and fail at once when the successor is gone) and records it.
fn join_state_writer(
    writer: std::thread::JoinHandle<(std::io::Result<u64>, Duration)>,
    phases: &mut Phases,
) {
    match writer.join() {
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

/// Records a phase and reports it as an event of the current upgrade span.
fn phase(phases: &mut Phases, name: &'static str, took: Duration) {
    crate::stats::record(phases, name, took);
}
