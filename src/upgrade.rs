//! The upgrade, as named phases: begin (or refuse), announce, choose the
//! program, preflight, spawn, state, wait for ready, probation, commit. The
//! states it moves through belong to `lifecycle`; the bytes it exchanges
//! with the successor, to `channel`.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::channel::{Inbox, Message};
use crate::clock;
use crate::env;
use crate::error::UpgradeError;
use crate::lifecycle::{Generation, LastUpgrade, lock};
use crate::pidfile;
use crate::ready;
use crate::ready::Started;
use crate::spawn::{self, SpawnError};
use crate::state::StateStream;
use crate::stats::Phases;
use crate::sys;

type StateSource = Arc<Mutex<Option<StateStream>>>;

/// What an upgrade runs and how it is checked: the defaults of a generation
/// ([`Builder::upgrade_options`](crate::Builder::upgrade_options)), and the
/// overrides of one upgrade
/// ([`Handover::upgrade_with`](crate::Handover::upgrade_with)). What is not
/// set falls back: an upgrade's option to the generation's, the
/// generation's to the documented default.
#[derive(Clone, Default)]
#[must_use]
pub struct UpgradeOptions {
    pub(crate) program: Option<PathBuf>,
    pub(crate) args: Option<Vec<OsString>>,
    pub(crate) preflight: Option<Vec<OsString>>,
    pub(crate) state: Option<StateSource>,
    pub(crate) probation: Option<Duration>,
    pub(crate) canary: Option<crate::canary::Policy>,
    /// A takeover: the process to hand over to, instead of starting one.
    pub(crate) peer: Option<Arc<Mutex<Option<crate::takeover::PeerRequest>>>>,
}

impl std::fmt::Debug for UpgradeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeOptions")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("preflight", &self.preflight)
            .field("state", &self.state.is_some())
            .field("probation", &self.probation)
            .field("canary", &self.canary)
            .field("takeover", &self.peer.is_some())
            .finish()
    }
}

impl UpgradeOptions {
    /// Nothing set: everything falls back.
    pub fn new() -> Self {
        Self::default()
    }

    /// The program to run. Default: the path this service was started with
    /// (`argv[0]` made absolute, when it names the running binary; else the
    /// running binary), carried on to every successor — also one started
    /// from another program, such as a rollback's. It is resolved at each
    /// upgrade, symlinks followed, so a deploy that renames a new binary
    /// over the path, or switches a symlink on the way to it, runs the new
    /// version; [`Upgraded::program`] names the binary that ran. As the
    /// option of one upgrade it is a one-off (a rollback to a kept previous
    /// binary); later upgrades run the default again. A relative path is
    /// made absolute against the current directory when the builder builds.
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// The arguments the successor gets (without `argv[0]`). Default: this
    /// process's arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Preflight: before the upgrade, run the successor's program with these
    /// arguments (like `nginx -t`) and abort the upgrade, with the check's
    /// output in the error ([`UpgradeError::Preflight`]), unless it exits 0
    /// within the ready timeout. Default: none.
    pub fn preflight<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.preflight = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Probation (canary): after the successor reports ready, keep this
    /// generation accepting alongside it for `window`, and commit the
    /// handover only if the successor neither exits nor reports itself
    /// unhealthy ([`Handover::report_unhealthy`](crate::Handover::report_unhealthy))
    /// meanwhile. Otherwise the successor is reaped and this generation
    /// carries on alone, having lost no connection of its own; the upgrade
    /// fails with [`UpgradeError::Probation`].
    ///
    /// Only a committed upgrade is a success: the upgrade call returns, the
    /// pid file and the service manager (`MAINPID=`, `READY=1`) name the
    /// successor, and the successor learns that it is final only after the
    /// window. Until then the successor refuses to upgrade itself
    /// ([`UpgradeError::OnProbation`]). Default: zero (no probation); at most
    /// one day.
    ///
    /// During the window the canary is also judged on the traffic both
    /// generations serve: rolled back when it answers worse than this
    /// generation ([`UpgradeError::Canary`](crate::UpgradeError::Canary));
    /// see [`canary`](Self::canary) and the [`canary`](crate::canary)
    /// module.
    pub fn probation(mut self, window: Duration) -> Self {
        self.probation = Some(window);
        self
    }

    /// How the canary is judged during the probation window (see the
    /// [`canary`](crate::canary) module): the bounds, the minimum traffic,
    /// the application's own check, a share of new connections. Without a
    /// window it does nothing. Default: [`canary::Policy::new`](crate::canary::Policy::new)
    /// (judged, with the documented bounds).
    pub fn canary(mut self, policy: crate::canary::Policy) -> Self {
        self.canary = Some(policy);
        self
    }

    /// Streams `source` to the successor as its state, with format
    /// `version`, before it reports ready (see
    /// [`Handover::take_state`](crate::Handover::take_state)); for this
    /// upgrade only, in place of the state source
    /// ([`Handover::set_state_source`](crate::Handover::set_state_source)).
    /// The stream is chunked and never held whole in memory; it must be
    /// delivered within the ready timeout. A successor that rejects the
    /// version fails the upgrade with [`UpgradeError::StateRejected`].
    pub fn state(mut self, version: u32, source: impl Read + Send + 'static) -> Self {
        self.state = Some(Arc::new(Mutex::new(Some((version, Box::new(source))))));
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
    /// The canary judgement of the probation window, if it had one and
    /// judging was on: why the successor was committed, with both
    /// generations' numbers.
    pub judgement: Option<Box<crate::canary::Judgement>>,
}

/// Puts the state back to Serving unless the upgrade committed, and tells
/// the service manager that this generation still serves.
struct Attempt<'a> {
    generation: &'a Generation,
    committed: bool,
    reloading_sent: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let g = self.generation;
        // What this attempt used is opened again while fds may be plentiful.
        lock(&g.reserve).refill();
        g.life().upgrade_failed();
        if self.reloading_sent {
            let msg = format!(
                "READY=1\nSTATUS=upgrade failed; serving (generation {})",
                g.generation
            );
            g.notifier.send(&msg); // best effort, logged once
        }
    }
}

impl Generation {
    /// Runs one upgrade, records its outcome (counters, last upgrade, the
    /// one log line of a failure) and wakes whoever waits for its end.
    pub(crate) fn upgrade(&self, opts: UpgradeOptions) -> Result<Upgraded, UpgradeError> {
        let start = Instant::now();
        let mut phases = Phases::default();
        let result = self.run_upgrade(opts, &mut phases);
        if !matches!(result, Err(UpgradeError::InProgress)) {
            if let Err(e) = &result {
                // The one log line of every failure, in the log of the
                // generation that stays.
                tracing::warn!(
                    generation = self.generation,
                    error = %crate::error::chain(e),
                    elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
                    "upgrade failed; still serving"
                );
            }
            self.record_outcome(result.as_ref().map(|u| u.pid), phases, start.elapsed());
            let observers = lock(&self.observers).clone();
            for observe in observers {
                observe(&result);
            }
        }
        #[cfg(feature = "tokio")]
        self.upgrade_ended.notify_waiters();
        result
    }

    /// Counts a failed upgrade with its reason (a success was counted at
    /// the commit, before the successor was told), and keeps this
    /// generation's last attempt.
    pub(crate) fn record_outcome(
        &self,
        outcome: Result<u32, &UpgradeError>,
        phases: Phases,
        duration: Duration,
    ) {
        let mut life = self.life();
        let error = outcome.as_ref().err().map(|e| crate::error::chain(*e));
        if let Some(e) = &error {
            life.own_failures += 1;
            let c = &mut life.counters;
            c.failed += 1;
            c.last_error = Some(e.clone());
            if phases != Phases::default() {
                c.last = Some(phases);
            }
            if phases.probation.is_some() {
                // The judgement of this attempt's window, if it was judged.
                c.judgement = match outcome {
                    Err(UpgradeError::Canary { judgement, .. }) => Some(judgement.clone()),
                    _ => None,
                };
            }
        }
        life.last = Some(LastUpgrade {
            successor: outcome.ok(),
            error,
            duration,
        });
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
        let cfg = &self.config;
        let probation = opts.probation.unwrap_or(cfg.probation);
        clock::check_setting(probation, true).map_err(|reason| UpgradeError::InvalidOptions {
            setting: "probation",
            reason,
        })?;
        let policy = opts.canary.clone().unwrap_or_else(|| cfg.canary.clone());
        policy
            .validate()
            .map_err(|(setting, reason)| UpgradeError::InvalidOptions { setting, reason })?;
        let mut attempt = self.begin()?;
        let generation = self.generation + 1;
        let start = Instant::now();
        let deadline = clock::after_from(start, cfg.ready_timeout);
        let span = crate::stats::upgrade_span(self.generation);
        let _enter = span.enter();

        let _lock = self.upgrade_lock()?;
        if let Some(path) = &cfg.pid_file {
            // Fail before anything starts (and accepts), rather than kill a
            // successor at the commit.
            pidfile::check_replaceable(path).map_err(|source| UpgradeError::PidFile {
                path: path.clone(),
                source,
            })?;
        }
        attempt.reloading_sent = self.announce_reload(generation, probation);
        // The successor's binary and configuration are at least this new:
        // it tells control requests made later that it is no answer to them.
        let started_us = crate::systemd::monotonic_usec();
        let peer = opts.peer.as_ref().and_then(|p| lock(p).take());
        let program = match &peer {
            // A takeover runs what its peer runs: nothing is chosen here.
            Some(p) => crate::takeover::peer_program(p.pid),
            None => self.choose_program(&opts)?,
        };
        if let Some(u) = self.life().upgrading.as_mut() {
            u.program = Some(program.clone());
        }
        let args = opts.args.as_ref().unwrap_or(&cfg.args);
        let preflight = opts.preflight.as_ref().or(cfg.preflight.as_ref());
        if let Some(check) = preflight.filter(|_| peer.is_none()) {
            let t = Instant::now();
            let checked = spawn::preflight(&program, check, deadline, &self.reserve);
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

        let spawn::ChannelFds {
            ours,
            ours_copy,
            theirs,
        } = lock(&self.reserve)
            .channel()
            .map_err(|e| UpgradeError::io("socketpair", e))?;
        let with_state = state.is_some();
        let writer = match state {
            Some(state) => Some(stream_state(ours_copy, state, deadline)?),
            None => None,
        };
        let spawn_start = Instant::now();
        // If this generation dies before its commit, the successor serves
        // alone: this upgrade counts as a success then.
        let counters = {
            let c = &self.life().counters;
            (c.succeeded + 1, c.failed)
        };
        let next = Next {
            generation,
            started_us,
            with_state,
            counters,
        };
        let mut child = match peer {
            None => Started::Child(self.spawn_successor(&program, args, next, theirs, deadline)?),
            Some(req) => Started::Peer(self.offer(req, next, theirs, &ours, deadline)?),
        };
        let pid = child.pid();
        if let Some(u) = self.life().upgrading.as_mut() {
            u.successor = Some(pid);
        }
        // Written while the successor starts: a pid file that cannot be
        // written fails the upgrade now, and the commit only renames it.
        let pid_file = match &cfg.pid_file {
            // A peer in a pid namespace this process cannot see (pid 0)
            // writes its own when its predecessor is gone.
            Some(_) if pid == 0 => None,
            Some(path) => {
                let tmp = lock(&self.reserve).pid_tmp();
                Some(pidfile::stage(path, pid, tmp).map_err(|source| {
                    tracing::error!(path = %path.display(), error = %source, "cannot write the pid file; killing the successor");
                    UpgradeError::PidFile {
                        path: path.clone(),
                        source,
                    }
                })?)
            }
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
            cfg.ready_timeout,
        );
        if let Some(w) = writer {
            join_state_writer(w, phases);
        }
        let takes = ready?;
        let ready_after = start.elapsed();
        phase(phases, "ready", exec_done.elapsed());
        let mut judgement = None;
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
            // This generation's own traffic is counted for the window, to
            // judge the canary's against.
            let mut judging = (policy.judge || policy.share.is_some())
                .then(|| crate::canary::Judging::begin(policy, self.canary.clone()));
            let watched = ready::watch_probation(
                ours.as_fd(),
                &mut inbox,
                &mut child,
                probation,
                cfg.drain_timeout,
                judging.as_mut(),
            );
            drop(judging);
            phase(phases, "probation", t.elapsed());
            judgement = watched?.map(Box::new);
            if let Some(j) = &judgement {
                tracing::info!(pid, judgement = %j, "canary judged; committing");
            }
        }
        // Known at the commit: whether a migration offer will come.
        self.life().successor_takes = takes;
        self.commit(ours, child, generation, phases, pid_file, judgement.clone());
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
            judgement,
        })
    }

    /// Refuses an upgrade this generation cannot make now, or moves it to
    /// [`State::Upgrading`]; the returned guard moves it back unless the
    /// upgrade commits.
    fn begin(&self) -> Result<Attempt<'_>, UpgradeError> {
        // Take in what the predecessor sent: its commit ends this
        // generation's probation.
        let _ = self.pump();
        self.life().begin_upgrade()?;
        Ok(Attempt {
            generation: self,
            committed: false,
            reloading_sent: false,
        })
    }

    /// The lock next to the pid file, so that two processes never upgrade
    /// one service at once.
    fn upgrade_lock(&self) -> Result<Option<pidfile::UpgradeLock>, UpgradeError> {
        let Some(pid_file) = &self.config.pid_file else {
            return Ok(None);
        };
        let path = pidfile::lock_path(pid_file);
        match lock(&self.reserve).lock_upgrades(&path) {
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
        let n = &self.notifier;
        let extend = self
            .config
            .ready_timeout
            .saturating_add(probation)
            .saturating_add(Duration::from_secs(5));
        let msg = format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nEXTEND_TIMEOUT_USEC={}\nSTATUS=upgrading to generation {generation}",
            crate::systemd::monotonic_usec(),
            extend.as_micros()
        );
        n.send(&msg) // best effort, logged once
    }

    /// The binary this upgrade runs: the deploy path (or the one-off program
    /// of these options), resolved now, symlinks followed, and checked to be
    /// an executable file.
    fn choose_program(&self, opts: &UpgradeOptions) -> Result<PathBuf, UpgradeError> {
        let asked: &Path = opts.program.as_deref().unwrap_or(&self.config.program);
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
        let source = lock(&self.state_source).clone()?;
        Some(source())
    }

    /// Starts the successor with this generation's fds and `theirs`, its end
    /// of the channel (opened in advance, see `spawn::Reserve`).
    fn spawn_successor(
        &self,
        program: &Path,
        args: &[OsString],
        next: Next,
        theirs: OwnedFd,
        deadline: Instant,
    ) -> Result<spawn::Child, UpgradeError> {
        let Next {
            generation,
            started_us,
            with_state,
            counters,
        } = next;
        // This upgrade's copy of the crate's secrets, if any (see
        // `secrets`): handed after the registered fds, open through the start.
        let secrets = self.secrets_file();
        // The registry is locked only to prepare the start, not across it:
        // an exec hung on a dead file system must not block every task that
        // touches the registry.
        let prepared = {
            let registry = lock(&self.registry);
            let mut handed = registry.handed();
            if let Some(file) = &secrets {
                handed.push((crate::secrets::FD_NAME, file.as_fd()));
            }
            let names: Vec<&str> = handed.iter().map(|(n, _)| *n).collect();
            let fds: Vec<_> = handed.iter().map(|(_, fd)| *fd).collect();
            let vars =
                std::env::vars_os().filter(|(k, _)| !env::NOT_INHERITED.iter().any(|n| k == n));
            // The successor upgrades to the deploy path, whatever it runs.
            let succ_vars = env::successor_vars(
                &names,
                generation,
                with_state,
                &self.config.program,
                started_us,
                counters,
            );
            tracing::debug!(program = %program.display(), fds = names.len(), "spawning successor");
            spawn::prepare(program, args, vars, &succ_vars, &fds, theirs)
        };
        // Under a service manager the successor must be the manager's child
        // before it is named main: through an intermediate.
        let direct = !self.notifier.is_enabled();
        // SAFETY: a registered fd is closed only by `Registry::clear`, at the
        // commit of an upgrade, and one upgrade runs at a time (this one);
        // the secrets file is `secrets`, dropped only after the start: the
        // fds prepared above stay open, under their numbers, through the
        // start.
        let child = prepared.and_then(|p| unsafe { p.start(&self.reserve, deadline, direct) });
        drop(secrets);
        match child {
            Ok(c) => Ok(c),
            Err(SpawnError::Child { step, err }) => {
                tracing::warn!(step = %step, error = %err, "successor failed before exec completed");
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
                    after: self.config.ready_timeout,
                })
            }
            Err(SpawnError::Parent(what, err)) => Err(UpgradeError::io(what, err)),
        }
    }

    /// A takeover's "spawn": sends the peer the offer — what a successor
    /// would find in its environment, this generation's fds and `theirs`,
    /// its end of the channel — over its control connection.
    fn offer(
        &self,
        req: crate::takeover::PeerRequest,
        next: Next,
        theirs: OwnedFd,
        ours: &OwnedFd,
        deadline: Instant,
    ) -> Result<crate::takeover::Peer, UpgradeError> {
        let watch = ours
            .try_clone()
            .map_err(|e| UpgradeError::io("duplicating the channel", e))?;
        // The crate's secrets go to a peer that authenticated, as to a child.
        let secrets = self.secrets_file();
        let sent = {
            let registry = lock(&self.registry);
            let mut handed = registry.handed();
            if let Some(file) = &secrets {
                handed.push((crate::secrets::FD_NAME, file.as_fd()));
            }
            let header = crate::takeover::Header {
                generation: next.generation,
                names: handed.iter().map(|(n, _)| (*n).to_owned()).collect(),
                state: next.with_state,
                started_us: next.started_us,
                counters: next.counters,
                pid: req.pid,
                protocol: crate::channel::VERSION,
            };
            let fds: Vec<_> = handed.iter().map(|(_, fd)| *fd).collect();
            tracing::debug!(
                pid = req.pid,
                fds = fds.len(),
                "offering the service to a takeover"
            );
            crate::takeover::send_offer(req.conn.as_fd(), &header, &fds, theirs.as_fd(), deadline)
        };
        drop((theirs, secrets));
        sent.map_err(|e| UpgradeError::io("sending the takeover offer", e))?;
        Ok(crate::takeover::Peer::new(req.pid, watch))
    }

    /// The commit: from here on the successor serves. The successor is let
    /// go (reparented to the nearest subreaper before anyone names it main),
    /// the service manager is told, the serving layer stops accepting, the
    /// successor gets the commit with the counters, and the pid file, staged
    /// with the successor's pid while it started (a failure there failed the
    /// upgrade), is renamed into place: it never names a process that does
    /// not serve.
    fn commit(
        &self,
        ours: std::os::fd::OwnedFd,
        child: Started,
        generation: u64,
        phases: &Phases,
        pid_file: Option<pidfile::Staged>,
        judgement: Option<Box<crate::canary::Judgement>>,
    ) {
        let pid = child.pid();
        let took_over = matches!(child, Started::Peer(_));
        lock(&self.reserve).free_spares();
        // An intermediate exits: the successor is reparented to the nearest
        // subreaper (the service manager) before it is named main.
        child.release();
        let n = &self.notifier;
        if took_over {
            // The process that took over is not this unit's: it tells its
            // own manager. This unit stops once the drain is done.
            n.send(&format!(
                "STOPPING=1\nSTATUS=taken over by pid {pid}; draining"
            ));
        } else {
            // The old main process names its successor main and ready, and
            // waits until the manager has taken that in before it drains, so
            // the manager never sees the main process exit.
            let msg = format!("MAINPID={pid}\nREADY=1\nSTATUS=serving (generation {generation})");
            // Best effort, logged once: a stale NOTIFY_SOCKET is no reason to
            // fail an upgrade, and the barrier is bounded.
            if n.send(&msg) {
                n.send_barrier(Duration::from_secs(5));
            }
        }
        lock(&self.registry).clear();
        // The counters travel with the service: the successor carries on
        // counting from ours. Our end of the channel stays open until this
        // process exits: its EOF tells the successor that its predecessor is
        // gone. It is close-on-exec, so no other child ever holds it.
        let commit = Message::Commit(self.life().handed_over(ours, *phases, judgement)).encode();
        // The serving layer stops accepting now, without waiting for the
        // caller of `upgrade` to be scheduled first.
        #[cfg(feature = "tokio")]
        self.handed.notify_waiters();
        if let Some(ch) = self.life().successor.as_ref() {
            if let Err(e) = sys::send_all(ch.as_fd(), &commit) {
                tracing::warn!(pid, error = %e, "cannot send the commit to the successor");
            }
        }
        if let Some(staged) = pid_file {
            let path = staged.path().to_owned();
            if let Err(e) = staged.publish().or_else(|_| pidfile::write(&path, pid)) {
                tracing::error!(error = %e, "cannot rename the pid file into place: it names this generation until it exits");
            }
        }
    }
}

#[cfg(feature = "tokio")]
impl crate::drain::DrainObserver for Generation {
    /// The application's drain ended: after a handover, record its duration
    /// as the drain phase of that upgrade, and tell the successor.
    fn drained(&self, report: &crate::drain::DrainReport) {
        let mut life = self.life();
        if life.state != crate::lifecycle::State::HandedOver {
            return; // a stop, not the end of an upgrade
        }
        let span = crate::stats::upgrade_span(self.generation);
        let _e = span.enter();
        let phases = life.counters.last.get_or_insert_with(Default::default);
        crate::stats::record(phases, "drain", report.elapsed);
        if let Some(ch) = life.successor.as_ref() {
            // The successor may be gone or busy; this is only a report.
            let _ = sys::send_all(ch.as_fd(), &Message::Drained(report.elapsed).encode());
        }
    }
}

/// An upgrade for the upgrade thread, and where its result goes.
#[cfg(feature = "tokio")]
pub(crate) type Job = (
    UpgradeOptions,
    tokio::sync::oneshot::Sender<Result<Upgraded, UpgradeError>>,
);

#[cfg(feature = "tokio")]
#[derive(Debug)]
pub(crate) struct Upgrader(pub(crate) std::sync::Mutex<std::sync::mpsc::Sender<Job>>);

#[cfg(feature = "tokio")]
impl Upgrader {
    /// A thread of its own that runs upgrades one after another until every
    /// handle of the generation is gone.
    pub(crate) fn start(g: std::sync::Arc<Generation>) -> std::io::Result<Upgrader> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("handover-upgrade".into())
            .spawn(move || {
                for (opts, reply) in rx {
                    let _ = reply.send(run_caught(&g, opts));
                }
            })?;
        Ok(Upgrader(std::sync::Mutex::new(tx)))
    }
}

/// Runs an upgrade; a panic inside it (a bug) is counted like any failure
/// and returned as one. The attempt's guard puts the state back while
/// unwinding.
#[cfg(feature = "tokio")]
pub(crate) fn run_caught(g: &Generation, opts: UpgradeOptions) -> Result<Upgraded, UpgradeError> {
    let run = std::panic::AssertUnwindSafe(|| g.upgrade(opts));
    std::panic::catch_unwind(run).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        let e = UpgradeError::io("upgrade task panicked", std::io::Error::other(what));
        g.record_outcome(Err(&e), crate::stats::Phases::default(), Duration::ZERO);
        let result = Err(e);
        let observers = lock(&g.observers).clone();
        for observe in observers {
            observe(&result);
        }
        result
    })
}

/// What a successor is told about itself (see `env::successor_vars`).
struct Next {
    generation: u64,
    /// When the upgrade began (`CLOCK_MONOTONIC` µs).
    started_us: u128,
    /// A state stream follows on the channel.
    with_state: bool,
    /// The service's counters `(succeeded, failed)`, this upgrade counted
    /// as a success.
    counters: (u64, u64),
}

/// How the state went, or is going, to the successor.
enum StateSent {
    /// It all fit in the channel's socket buffer before the successor
    /// started (or failed at once): the result and how long it took.
    Done(std::io::Result<u64>, Duration),
    /// The rest goes from a thread of its own, so that waiting for ready
    /// goes on meanwhile.
    Thread(std::thread::JoinHandle<(std::io::Result<u64>, Duration)>),
}

/// Streams `state` over `fd`, a copy of the channel, before the successor
/// starts: what fits in the socket buffer is written at once, and waits
/// there for the successor, which so never waits for this generation to be
/// scheduled. The rest goes from a thread, whose sends time out at the
/// ready deadline.
fn stream_state(
    fd: OwnedFd,
    state: StateStream,
    deadline: Instant,
) -> Result<StateSent, UpgradeError> {
    // A broken source must not leave the successor waiting for bytes that
    // never come.
    fn give_up(fd: &OwnedFd) {
        let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Write);
    }
    let t = Instant::now();
    let mut writer = crate::state::Writer::new(state);
    match writer.send(fd.as_fd(), true) {
        Ok(true) => return Ok(StateSent::Done(Ok(writer.total()), t.elapsed())),
        Ok(false) => {}
        Err(e) => {
            give_up(&fd);
            return Ok(StateSent::Done(Err(e), t.elapsed()));
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    crate::state::set_timeout(fd.as_fd(), crate::state::Direction::Send, left)
        .map_err(|e| UpgradeError::io("setting the state timeout", e))?;
    Ok(StateSent::Thread(std::thread::spawn(move || {
        let result = writer.send(fd.as_fd(), false).map(|_| writer.total());
        if result.is_err() {
            give_up(&fd);
        }
        (result, t.elapsed())
    })))
}

/// Waits for the state writer (bounded: its sends time out at the ready
/// deadline, and fail at once when the successor is gone) and records it.
fn join_state_writer(sent: StateSent, phases: &mut Phases) {
    let outcome = match sent {
        StateSent::Done(result, took) => Some((result, took)),
        StateSent::Thread(t) => t.join().ok(),
    };
    match outcome {
        Some((Ok(bytes), took)) => {
            phases.state = Some(took);
            tracing::debug!(
                phase = "state",
                ms = took.as_secs_f64() * 1e3,
                bytes,
                mb_per_s = bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6,
                "upgrade phase"
            )
        }
        Some((Err(e), _)) => tracing::warn!(error = %e, "state stream failed"),
        None => tracing::error!("state writer panicked"),
    }
}

/// Records a phase and reports it as an event of the current upgrade span.
fn phase(phases: &mut Phases, name: &'static str, took: Duration) {
    crate::stats::record(phases, name, took);
}
