//! What a generation counts of its upgrades: the counters, the phases of
//! the last upgrade, and the tracing span and events that report them.
//!
//! The counters live with the service, not with a process: when an old
//! generation commits a handover it sends its counters and the phases of
//! that upgrade to the successor (`C …` on the channel, see `channel`), and
//! later how long its drain took (`D …`). The successor measures the last phase itself: from
//! the commit until its predecessor's end of the channel closes.

use std::time::Duration;

/// How long each phase of an upgrade took. `None`: the phase did not happen
/// (no preflight check, no state, no probation), or has not happened yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Phases {
    /// fork+exec of the successor, until its `execve` succeeded.
    pub spawn: Option<Duration>,
    /// The preflight check ([`UpgradeOptions::preflight`](crate::UpgradeOptions::preflight)).
    pub preflight: Option<Duration>,
    /// Streaming the state ([`UpgradeOptions::state`](crate::UpgradeOptions::state)).
    pub state: Option<Duration>,
    /// From the successor's `execve` to its ready message.
    pub ready: Option<Duration>,
    /// The probation window ([`UpgradeOptions::probation`](crate::UpgradeOptions::probation)),
    /// as far as it ran.
    pub probation: Option<Duration>,
    /// The old generation's drain, as timed by a [`Drain`](crate::Drain)
    /// from [`Handover::drain`](crate::Handover::drain).
    pub drain: Option<Duration>,
    /// From the commit until the old generation exited, as seen by the
    /// successor (when [`Handover::predecessor_exited`](crate::Handover::predecessor_exited),
    /// or [`Handover::stats`](crate::Handover::stats) noticed it).
    pub exit: Option<Duration>,
}

/// The phases as `(name, duration)`, in the order they happen:
/// `if let Some(phases) = &stats.last_phases { for (name, took) in phases { … } }`.
impl IntoIterator for &Phases {
    type Item = (&'static str, Option<Duration>);
    type IntoIter = std::array::IntoIter<(&'static str, Option<Duration>), 7>;

    fn into_iter(self) -> Self::IntoIter {
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
}

impl Phases {
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

/// The span of the upgrade from `generation` to the next. The old
/// generation enters it for the upgrade and its drain; the successor for
/// the exit of its predecessor.
pub(crate) fn upgrade_span(generation: u64) -> tracing::Span {
    tracing::info_span!("upgrade", generation, successor_generation = generation + 1)
}

/// Records that phase `name` took `took`, and reports it as a DEBUG
/// `upgrade phase` event (fields `phase`, `ms`) in the current span: the
/// INFO log has one line per upgrade, and the phases are in [`Phases`].
pub(crate) fn record(phases: &mut Phases, name: &'static str, took: Duration) {
    phases.set(name, took);
    tracing::debug!(phase = name, ms = took.as_secs_f64() * 1e3, "upgrade phase");
}

/// The counters a generation keeps and hands on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub succeeded: u64,
    pub failed: u64,
    pub last_error: Option<String>,
    pub last: Option<Phases>,
    /// The canary judgement of the last upgrade, if it was judged.
    pub judgement: Option<Box<crate::canary::Judgement>>,
}
