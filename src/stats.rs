//! What a generation knows about its upgrades: counters, the phases of the
//! last upgrade, and the messages that carry them from one generation to the
//! next.
//!
//! The counters live with the service, not with a process: when an old
//! generation commits a handover it sends its counters and the phases of
//! that upgrade to the successor (`C …` on the channel, see `channel`), and
//! later how long its drain took (`D …`). The successor measures the last phase itself: from
//! the commit until its predecessor's end of the channel closes.

use std::time::Duration;

use crate::upgrade::State;

/// How long each phase of an upgrade took. `None`: the phase did not happen
/// (no preflight check, no state, no probation), or has not happened yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Phases {
    /// fork+exec of the successor, until its `execve` succeeded.
    pub spawn: Option<Duration>,
    /// The preflight check ([`Builder::preflight`](crate::Builder::preflight)).
    pub preflight: Option<Duration>,
    /// Streaming the state ([`UpgradeOptions::state`](crate::UpgradeOptions::state)).
    pub state: Option<Duration>,
    /// From the successor's `execve` to its ready message.
    pub ready: Option<Duration>,
    /// The probation window ([`Builder::probation`](crate::Builder::probation)),
    /// as far as it ran.
    pub probation: Option<Duration>,
    /// The old generation's drain, as timed by a [`Drain`](crate::Drain)
    /// from [`Handover::drain`](crate::Handover::drain).
    pub drain: Option<Duration>,
    /// From the commit until the old generation exited, as seen by the
    /// successor (when [`Handover::predecessor_exited`](crate::Handover::predecessor_exited),
    /// [`Handover::wait_predecessor_exit`](crate::Handover::wait_predecessor_exit)
    /// or [`Handover::stats`](crate::Handover::stats) noticed it).
    pub exit: Option<Duration>,
}

impl Phases {
    /// The phases as `(name, duration)`, in the order they happen.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Option<Duration>)> {
        [
            ("preflight", self.preflight),
            ("spawn", self.spawn),
            ("state", self.state),
            ("ready", self.ready),
            ("probation", self.probation),
            ("drain", self.drain),
            ("exit", self.exit),
        ]
        .into_iter()
    }

    pub(crate) fn set(&mut self, name: &str, d: Duration) -> bool {
        let slot = match name {
            "preflight" => &mut self.preflight,
            "spawn" => &mut self.spawn,
            "state" => &mut self.state,
            "ready" => &mut self.ready,
            "probation" => &mut self.probation,
            "drain" => &mut self.drain,
            "exit" => &mut self.exit,
            _ => return false,
        };
        *slot = Some(d);
        true
    }
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
///         for (phase, took) in phases.iter() {
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
    /// Connections still in flight while this generation drains (0 before
    /// its drain starts); counted by the [`Drain`](crate::Drain) from
    /// [`Handover::drain`](crate::Handover::drain).
    pub draining: usize,
}

/// The span of the upgrade from `generation` to the next. The old
/// generation enters it for the upgrade and its drain; the successor for
/// the exit of its predecessor.
pub(crate) fn upgrade_span(generation: u64) -> tracing::Span {
    tracing::info_span!("upgrade", generation, successor_generation = generation + 1)
}

/// Records that phase `name` took `took`, and reports it as an
/// `upgrade phase` event (fields `phase`, `ms`) in the current span.
pub(crate) fn record(phases: &mut Phases, name: &'static str, took: Duration) {
    phases.set(name, took);
    tracing::info!(phase = name, ms = took.as_secs_f64() * 1e3, "upgrade phase");
}

/// The counters a generation keeps and hands on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub succeeded: u64,
    pub failed: u64,
    pub last_error: Option<String>,
    pub last: Option<Phases>,
}
