//! A generation's life: the data every other module works on, its state and
//! the transitions between states.
//!
//! ```text
//!  Starting ──ready()──► Serving ──upgrade──► Upgrading ──commit──► HandedOver
//!                          ▲                      │
//!                          └──── failed ──────────┘
//!  Serving (a successor on probation) ──taken back (unhealthy, judged worse)──► RolledBack
//!  Starting, Serving ──stop()──► Stopping
//! ```
//!
//! Everything that changes as the generation lives — its [`State`], the
//! channel to its predecessor and what came over it, the channel to its
//! successor, the counters, its last upgrade — is one [`Life`] under one
//! lock. The few other locks guard independent things (the fd registry, the
//! drain, the state source, the state stream's reader, the fds reserved for
//! upgrades); the rule that keeps them free of deadlocks is that no code
//! takes one while it holds another — every function locks, copies or
//! changes what it needs, and lets go — with one exception in one order: the
//! reserve may be locked while `life` is held (a successor's channel copy),
//! never `life` while the reserve is.
//!
//! This module owns the states and their rules; it never touches a socket.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::channel::Inbox;
use crate::error::UpgradeError;
use crate::fds::Registry;
use crate::state::StateStream;
use crate::stats::{Counters, Phases};
use crate::systemd::Notifier;

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
    /// This generation's predecessor took the service back during its
    /// probation — it reported itself unhealthy
    /// ([`Handover::report_unhealthy`](crate::Handover::report_unhealthy)),
    /// or was judged worse (see [`canary`](crate::canary)): stop accepting,
    /// drain and exit (the generation's drain starts by itself).
    RolledBack,
    /// A real stop ([`Handover::stop`](crate::Handover::stop)): no successor;
    /// the listeners are closed, no upgrade starts, drain and exit.
    Stopping,
}

/// This generation's own last upgrade attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) struct LastUpgrade {
    /// The successor's pid, if it took over.
    pub successor: Option<u32>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// From the start of the attempt to its end.
    pub duration: Duration,
}

/// Makes the state for one upgrade.
pub(crate) type StateFn = Arc<dyn Fn() -> StateStream + Send + Sync>;

/// Told the outcome of every upgrade attempt, whatever triggered it.
pub(crate) type Observer =
    Arc<dyn Fn(&Result<crate::upgrade::Upgraded, UpgradeError>) + Send + Sync>;

/// What a generation is configured with; fixed at `build()`.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) ready_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) pid_file: Option<PathBuf>,
    /// The deploy path plain upgrades run (resolved at each upgrade).
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) preflight: Option<Vec<OsString>>,
    pub(crate) probation: Duration,
    pub(crate) canary: crate::canary::Policy,
    pub(crate) fd_store: bool,
    /// Options of the sockets this generation binds.
    pub(crate) listen: crate::fds::ListenOptions,
}

/// Everything that changes as a generation lives, under one lock.
#[derive(Debug)]
pub(crate) struct Life {
    pub(crate) state: State,
    /// The channel to the predecessor, while it may still be alive.
    pub(crate) predecessor: Option<OwnedFd>,
    /// What the predecessor sent and was not handled yet.
    pub(crate) inbox: Inbox,
    /// The predecessor committed the handover, or is gone; always for a
    /// first generation.
    pub(crate) committed: bool,
    /// When the commit arrived.
    pub(crate) committed_at: Option<Instant>,
    /// The predecessor took the service back after `report_unhealthy`.
    pub(crate) rolled_back: bool,
    /// After a handover: the channel to the successor, open until this
    /// process exits (its EOF tells the successor that we are gone).
    pub(crate) successor: Option<OwnedFd>,
    /// The kinds of connections the successor said it takes (`T` before
    /// its ready message; none if it said nothing).
    pub(crate) successor_takes: Vec<String>,
    /// Upgrade counters, inherited from the predecessor at its commit.
    pub(crate) counters: Counters,
    /// This generation's own last attempt.
    pub(crate) last: Option<LastUpgrade>,
    /// The upgrade running now, if any.
    pub(crate) upgrading: Option<InProgress>,
    /// Upgrades this generation tried and failed (refused on probation):
    /// they come on top of the counters its predecessor commits.
    pub(crate) own_failures: u64,
}

/// How a process took the service over from a generation that did not
/// start it.
#[derive(Debug, Clone)]
pub(crate) struct TookOver {
    /// The control socket it asked.
    pub(crate) path: PathBuf,
    /// Its pid as the old generation sees it; 0 if it cannot (a sibling
    /// pid namespace, as another container's is).
    pub(crate) seen_as: u32,
}

/// The upgrade a generation is running, as `status` shows it.
#[derive(Debug, Clone, Default)]
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
pub(crate) struct InProgress {
    /// When it started (`CLOCK_MONOTONIC` µs).
    pub(crate) started_us: u128,
    /// The program it runs, once chosen (resolved).
    pub(crate) program: Option<PathBuf>,
    /// The successor's pid, once started.
    pub(crate) successor: Option<u32>,
}

impl Life {
    /// Serving → Upgrading, or why not.
    pub(crate) fn begin_upgrade(&mut self) -> Result<(), UpgradeError> {
        if !self.committed {
            return Err(UpgradeError::OnProbation);
        }
        match self.state {
            State::Starting => Err(UpgradeError::NotReady),
            State::Upgrading => Err(UpgradeError::InProgress),
            State::HandedOver | State::RolledBack => Err(UpgradeError::HandedOver),
            State::Stopping => Err(UpgradeError::Stopping),
            State::Serving => {
                self.state = State::Upgrading;
                self.upgrading = Some(InProgress {
                    started_us: crate::systemd::monotonic_usec(),
                    ..InProgress::default()
                });
                Ok(())
            }
        }
    }

    /// Upgrading → Serving: the attempt failed.
    pub(crate) fn upgrade_failed(&mut self) {
        self.upgrading = None;
        if self.state == State::Upgrading {
            self.state = State::Serving;
        }
    }

    /// Upgrading → HandedOver: the successor serves; keep its channel open
    /// until this process exits. Counts the success and returns the
    /// counters that travel with the commit.
    pub(crate) fn handed_over(
        &mut self,
        successor: OwnedFd,
        phases: Phases,
        judgement: Option<Box<crate::canary::Judgement>>,
    ) -> Counters {
        self.state = State::HandedOver;
        self.upgrading = None;
        self.successor = Some(successor);
        // Our own predecessor's channel is of no further use.
        self.predecessor = None;
        self.counters.succeeded += 1;
        self.counters.last = Some(phases);
        self.counters.judgement = judgement;
        self.counters.clone()
    }

    /// The predecessor committed: this generation's handover is final, and
    /// the service's counters come with it.
    pub(crate) fn commit_received(&mut self, mut counters: Counters) {
        // Attempts of our own (refused on probation) come on top.
        counters.failed += self.own_failures;
        self.counters = counters;
        self.mark_committed();
    }

    /// The handover is final (also when the commit could not be read: the
    /// predecessor sends one only when it is).
    pub(crate) fn mark_committed(&mut self) {
        self.committed = true;
        self.committed_at = Some(Instant::now());
    }

    /// The predecessor is gone: this generation serves alone, unless it
    /// handed the service back.
    pub(crate) fn predecessor_gone(&mut self) {
        self.predecessor = None;
        self.committed = !self.rolled_back;
    }

    /// Taken back after an unhealthy report: → RolledBack.
    pub(crate) fn taken_back(&mut self) {
        self.rolled_back = true;
    }
}

/// One generation: its configuration, its [`Life`], and the independent
/// parts beside it. Shared by every clone of a `Handover`.
pub(crate) struct Generation {
    pub(crate) config: Config,
    pub(crate) generation: u64,
    pub(crate) from_predecessor: bool,
    /// How it took the service over, if it did (its predecessor did not
    /// start it).
    pub(crate) took_over: Option<TookOver>,
    /// The predecessor's channel protocol version: a message version 1 does
    /// not know goes only to a predecessor of version 2 or later.
    pub(crate) predecessor_protocol: u32,
    pub(crate) started: Instant,
    /// When this generation's binary and configuration were chosen, in
    /// `CLOCK_MONOTONIC` µs: the start of the upgrade that made it, else
    /// `build()` (compared with control requests).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) started_usec: u128,
    pub(crate) notifier: Notifier,
    life: Mutex<Life>,
    /// The named fds. Never locked while `life` is held.
    pub(crate) registry: Mutex<Registry>,
    /// The drain from `Handover::drain`, counted in the stats.
    #[cfg(feature = "tokio")]
    pub(crate) drain: Mutex<Option<crate::drain::Drain>>,
    /// What every upgrade streams to its successor, unless its options say
    /// otherwise.
    pub(crate) state_source: Mutex<Option<StateFn>>,
    /// Told the outcome of every upgrade attempt (`Triggers::on_upgrade`).
    pub(crate) observers: Mutex<Vec<Observer>>,
    /// A state follows on the channel (HANDOVER_STATE=1).
    pub(crate) state_expected: bool,
    pub(crate) state_taken: AtomicBool,
    pub(crate) state_progress: Arc<Mutex<crate::state::Progress>>,
    /// A failure reason was sent to the predecessor: one is enough.
    pub(crate) failure_sent: AtomicBool,
    /// `ready()` ran (or runs): once.
    pub(crate) ready_called: AtomicBool,
    /// Woken when `ready()` has run: the channel carries messages from then on.
    #[cfg(feature = "tokio")]
    pub(crate) readied: tokio::sync::Notify,
    /// Woken when an upgrade attempt ends, whatever triggered it.
    #[cfg(feature = "tokio")]
    pub(crate) upgrade_ended: tokio::sync::Notify,
    /// Woken at the commit, when the state becomes [`State::HandedOver`].
    #[cfg(feature = "tokio")]
    pub(crate) handed: tokio::sync::Notify,
    /// Woken when `pump` took something in from the predecessor (or its
    /// end closed): for tasks waiting on the channel, which another reader
    /// may have emptied first.
    #[cfg(feature = "tokio")]
    pub(crate) channel_news: tokio::sync::Notify,
    /// The fds an upgrade needs, opened in advance. May be locked while
    /// `life` is held, never the other way round.
    pub(crate) reserve: Mutex<crate::spawn::Reserve>,
    /// What this generation answers during a probation window: as the
    /// canary (from `ready()` to its commit), or as the old generation
    /// judging one (see `canary`).
    pub(crate) canary: crate::canary::Recorder,
    /// The crate's secrets: handed over by the predecessor, and handed on
    /// at each upgrade (see `secrets`).
    pub(crate) secrets: Mutex<crate::secrets::Secrets>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("generation", &self.generation)
            .field("program", &self.config.program)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// What a generation starts with.
pub(crate) struct Birth {
    pub(crate) config: Config,
    pub(crate) generation: u64,
    pub(crate) notifier: Notifier,
    pub(crate) registry: Registry,
    pub(crate) predecessor: Option<OwnedFd>,
    pub(crate) state_expected: bool,
    /// When the upgrade that started this process began (`CLOCK_MONOTONIC`
    /// µs), if a predecessor said so.
    pub(crate) started_usec: Option<u128>,
    /// The service's counters as the predecessor left them (this upgrade
    /// counted as a success), kept if it never commits.
    pub(crate) counters: Counters,
    /// How this process took the service over (see `takeover`), if it
    /// did: its predecessor did not start it.
    pub(crate) took_over: Option<TookOver>,
    /// The predecessor's channel protocol version (see `channel::VERSION`).
    pub(crate) predecessor_protocol: u32,
    /// The secrets the predecessor handed over (see `secrets`).
    pub(crate) secrets: crate::secrets::Secrets,
}

impl Generation {
    pub(crate) fn new(b: Birth) -> Generation {
        let from_predecessor = b.predecessor.is_some();
        let reserve = crate::spawn::Reserve::for_generation(
            b.config.pid_file.as_deref(),
            b.predecessor.as_ref(),
        );
        Generation {
            config: b.config,
            generation: b.generation,
            from_predecessor,
            took_over: b.took_over,
            predecessor_protocol: b.predecessor_protocol,
            started: Instant::now(),
            started_usec: b
                .started_usec
                .unwrap_or_else(crate::systemd::monotonic_usec),
            notifier: b.notifier,
            life: Mutex::new(Life {
                state: State::Starting,
                predecessor: b.predecessor,
                inbox: Inbox::default(),
                committed: !from_predecessor,
                committed_at: None,
                rolled_back: false,
                successor: None,
                successor_takes: Vec::new(),
                counters: b.counters,
                last: None,
                upgrading: None,
                own_failures: 0,
            }),
            registry: Mutex::new(b.registry),
            #[cfg(feature = "tokio")]
            drain: Mutex::new(None),
            state_source: Mutex::new(None),
            observers: Mutex::new(Vec::new()),
            state_expected: b.state_expected,
            state_taken: AtomicBool::new(false),
            state_progress: Arc::default(),
            failure_sent: AtomicBool::new(false),
            ready_called: AtomicBool::new(false),
            #[cfg(feature = "tokio")]
            readied: tokio::sync::Notify::new(),
            #[cfg(feature = "tokio")]
            upgrade_ended: tokio::sync::Notify::new(),
            #[cfg(feature = "tokio")]
            handed: tokio::sync::Notify::new(),
            #[cfg(feature = "tokio")]
            channel_news: tokio::sync::Notify::new(),
            reserve: Mutex::new(reserve),
            canary: crate::canary::Recorder::new(),
            secrets: Mutex::new(b.secrets),
        }
    }

    /// The life of this generation, locked.
    pub(crate) fn life(&self) -> MutexGuard<'_, Life> {
        lock(&self.life)
    }

    pub(crate) fn state(&self) -> State {
        self.life().state
    }
}

/// Locks a mutex, recovering from poisoning: every critical section here
/// leaves the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A snapshot of a generation's upgrade metrics, from
/// [`Handover::stats`](crate::Handover::stats).
///
/// The counters count every upgrade of the service since its first
/// generation, whichever generation ran it: each successor inherits them.
///
/// Exporting it is up to the application. For Prometheus, render the text
/// format at `/metrics`:
///
/// ```
/// use std::fmt::Write;
///
/// fn metrics(stats: &handover::Stats) -> String {
///     let mut out = String::new();
///     let _ = writeln!(out, "# TYPE handover_generation gauge");
///     let _ = writeln!(out, "handover_generation {}", stats.generation);
///     let _ = writeln!(out, "# TYPE handover_upgrades_total counter");
///     let _ = writeln!(out, "handover_upgrades_total{{result=\"ok\"}} {}", stats.upgrades_succeeded);
///     let _ = writeln!(out, "handover_upgrades_total{{result=\"failed\"}} {}", stats.upgrades_failed);
///     let _ = writeln!(out, "# TYPE handover_draining_connections gauge");
///     let _ = writeln!(out, "handover_draining_connections {}", stats.draining);
///     let _ = writeln!(out, "# TYPE handover_last_upgrade_phase_seconds gauge");
///     if let Some(phases) = &stats.last_phases {
///         for (phase, took) in phases {
///             if let Some(took) = took {
///                 let _ = writeln!(
///                     out,
///                     "handover_last_upgrade_phase_seconds{{phase=\"{phase}\"}} {}",
///                     took.as_secs_f64()
///                 );
///             }
///         }
///     }
///     out
/// }
///
/// let h = handover::Handover::builder().build()?;
/// let text = metrics(&h.stats());
/// assert!(text.contains("handover_generation 1\n"));
/// # Ok::<(), handover::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// This process's generation.
    pub generation: u64,
    /// Where this generation is in its life.
    pub state: State,
    /// Whether this generation's own handover is final: always for a first
    /// generation; for a successor once its predecessor committed (after
    /// the probation window, if any) or exited.
    pub committed: bool,
    /// Upgrades that succeeded, counting the one that started this process.
    pub upgrades_succeeded: u64,
    /// Upgrades that failed (the generation that tried kept serving).
    pub upgrades_failed: u64,
    /// The error of the last failed upgrade.
    pub last_error: Option<String>,
    /// The phases of the last upgrade: the one that started this process,
    /// or a later attempt of this process, whichever came last.
    pub last_phases: Option<Phases>,
    /// This generation's own last upgrade attempt, if it made one.
    pub(crate) last_upgrade: Option<LastUpgrade>,
    /// Connections still in flight while this generation drains (0 before
    /// its drain starts); counted by the [`Drain`](crate::Drain) from
    /// [`Handover::drain`](crate::Handover::drain).
    pub draining: usize,
    /// The canary judgement of the last upgrade (see
    /// [`canary`](crate::canary)): of this generation's own last attempt
    /// that reached its probation window, or of the upgrade that started
    /// this process, whichever came last; `None` if it had no judged
    /// window. Its `Display` is the line for an operator.
    pub last_judgement: Option<crate::canary::Judgement>,
}

impl Generation {
    /// The metrics as they stand (the caller takes in the predecessor's
    /// messages first).
    pub(crate) fn stats(&self) -> Stats {
        let (state, committed, c, last) = {
            let life = self.life();
            (
                life.state,
                life.committed,
                life.counters.clone(),
                life.last.clone(),
            )
        };
        #[cfg(feature = "tokio")]
        let draining = match &*lock(&self.drain) {
            Some(d) if d.is_draining() => d.in_flight(),
            _ => 0,
        };
        #[cfg(not(feature = "tokio"))]
        let draining = 0;
        Stats {
            generation: self.generation,
            state,
            committed,
            upgrades_succeeded: c.succeeded,
            upgrades_failed: c.failed,
            last_error: c.last_error,
            last_phases: c.last,
            last_judgement: c.judgement.map(|j| *j),
            last_upgrade: last,
            draining,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life() -> Life {
        Life {
            state: State::Serving,
            predecessor: None,
            inbox: Inbox::default(),
            committed: true,
            committed_at: None,
            rolled_back: false,
            successor: None,
            successor_takes: Vec::new(),
            counters: Counters::default(),
            last: None,
            upgrading: None,
            own_failures: 0,
        }
    }

    #[test]
    fn one_upgrade_at_a_time_and_only_when_serving_and_final() {
        let mut l = life();
        l.begin_upgrade().unwrap();
        assert!(matches!(l.begin_upgrade(), Err(UpgradeError::InProgress)));
        l.upgrade_failed();
        assert_eq!(l.state, State::Serving);
        l.committed = false;
        assert!(matches!(l.begin_upgrade(), Err(UpgradeError::OnProbation)));
        l.committed = true;
        l.state = State::Starting;
        assert!(matches!(l.begin_upgrade(), Err(UpgradeError::NotReady)));
        l.state = State::RolledBack;
        assert!(matches!(l.begin_upgrade(), Err(UpgradeError::HandedOver)));
        l.state = State::Stopping;
        assert!(matches!(l.begin_upgrade(), Err(UpgradeError::Stopping)));
    }

    #[test]
    fn a_commit_brings_the_counters_and_ends_probation() {
        let mut l = life();
        l.committed = false;
        // Inherited at start (HANDOVER_COUNTERS), plus one failure of its own.
        l.counters.failed = 3;
        l.own_failures = 1;
        l.commit_received(Counters {
            succeeded: 4,
            failed: 2,
            ..Counters::default()
        });
        assert!(l.committed);
        assert_eq!((l.counters.succeeded, l.counters.failed), (4, 3));
        let mut l = life();
        l.committed = false;
        l.taken_back();
        l.predecessor_gone();
        assert!(!l.committed, "a generation taken back never serves alone");
    }
}
