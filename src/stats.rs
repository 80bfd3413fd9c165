//! What a generation knows about its upgrades: counters, the phases of the
//! last upgrade, and the messages that carry them from one generation to the
//! next.
//!
//! The counters live with the service, not with a process: when an old
//! generation commits a handover it sends its counters and the phases of
//! that upgrade to the successor (`C …` on the channel), and later how long
//! its drain took (`D …`). The successor measures the last phase itself: from
//! the commit until its predecessor's end of the channel closes.

use std::fmt::{self, Write as _};
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

/// The commit message of the old generation (without its leading `C`):
/// `succeeded=N failed=N <phase>_us=N … [error=<rest of line>]`.
pub(crate) fn encode_commit(c: &Counters) -> String {
    let mut s = format!(" succeeded={} failed={}", c.succeeded, c.failed);
    if let Some(p) = &c.last {
        for (name, d) in p.iter() {
            if let Some(d) = d {
                let _ = write!(s, " {name}_us={}", d.as_micros());
            }
        }
    }
    if let Some(e) = &c.last_error {
        // Last, and on one line: it runs to the end of the line.
        let _ = write!(s, " error={}", e.replace('\n', " "));
    }
    s
}

/// A message from the old generation to its successor, after the successor
/// reported ready (see `ready::MSG_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// `C<fields>`: the handover is final; the counters travel with it.
    Commit(Counters),
    /// `A`: the unhealthy report was taken; the old generation serves.
    RolledBack,
    /// `D<fields>`: the old generation's drain took this long.
    Drained(Duration),
}

/// Parses one message line (without its `\n`).
pub(crate) fn parse_message(line: &[u8]) -> Result<Message, BadMessage> {
    let Some((&kind, rest)) = line.split_first() else {
        return Err(BadMessage("empty message".into()));
    };
    let text = std::str::from_utf8(rest)
        .map_err(|_| BadMessage(format!("message {:?} is not UTF-8", kind as char)))?;
    let mut c = Counters::default();
    match kind {
        crate::ready::MSG_COMMIT => {
            decode_fields(text, &mut c)?;
            Ok(Message::Commit(c))
        }
        crate::ready::MSG_ROLLED_BACK if text.is_empty() => Ok(Message::RolledBack),
        crate::ready::MSG_DRAINED => {
            decode_fields(text, &mut c)?;
            match c.last.and_then(|p| p.drain) {
                Some(d) => Ok(Message::Drained(d)),
                None => Err(BadMessage("drain report without drain_us".into())),
            }
        }
        other => Err(BadMessage(format!("unknown message {other:#04x}"))),
    }
}

/// Why a message from the predecessor could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadMessage(pub String);

impl fmt::Display for BadMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses the fields of a `C` or `D` line into `c`.
pub(crate) fn decode_fields(line: &str, c: &mut Counters) -> Result<(), BadMessage> {
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        if let Some(err) = rest.strip_prefix("error=") {
            c.last_error = Some(err.to_owned());
            return Ok(());
        }
        let (field, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        rest = tail.trim_start();
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| BadMessage(format!("field {field:?} has no '='")))?;
        let n: u64 = value
            .parse()
            .map_err(|_| BadMessage(format!("field {key:?}: {value:?} is not a number")))?;
        match key {
            "succeeded" => c.succeeded = n,
            "failed" => c.failed = n,
            _ => {
                let phase = key
                    .strip_suffix("_us")
                    .ok_or_else(|| BadMessage(format!("unknown field {key:?}")))?;
                let phases = c.last.get_or_insert_with(Phases::default);
                if !phases.set(phase, Duration::from_micros(n)) {
                    return Err(BadMessage(format!("unknown phase {phase:?}")));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_round_trips() {
        let c = Counters {
            succeeded: 7,
            failed: 2,
            last_error: Some("successor (pid 9) exited:\nsignal 6".into()),
            last: Some(Phases {
                spawn: Some(Duration::from_micros(1500)),
                ready: Some(Duration::from_micros(4000)),
                probation: Some(Duration::from_secs(3)),
                ..Phases::default()
            }),
        };
        let line = encode_commit(&c);
        assert!(!line.contains('\n'));
        let mut back = Counters::default();
        decode_fields(&line, &mut back).unwrap();
        assert_eq!(back.succeeded, 7);
        assert_eq!(back.failed, 2);
        assert_eq!(back.last, c.last);
        assert_eq!(
            back.last_error.as_deref(),
            Some("successor (pid 9) exited: signal 6")
        );
    }

    #[test]
    fn messages_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_message(b"A"), Ok(Message::RolledBack));
        assert_eq!(
            parse_message(b"Ddrain_us=1500"),
            Ok(Message::Drained(Duration::from_micros(1500)))
        );
        let Ok(Message::Commit(c)) = parse_message(b"C succeeded=2 failed=0") else {
            panic!("commit not parsed");
        };
        assert_eq!((c.succeeded, c.failed), (2, 0));
        for bad in [
            &b""[..],
            b"\xff",
            b"Ax",
            b"D",
            b"Dspawn_us=3",
            b"C\xff",
            b"Cx=1",
        ] {
            assert!(parse_message(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_fields_are_refused_with_the_field() {
        let mut c = Counters::default();
        let e = decode_fields(" succeeded=x", &mut c).unwrap_err();
        assert!(e.0.contains("\"succeeded\""), "{e}");
        let e = decode_fields(" warp_us=3", &mut c).unwrap_err();
        assert!(e.0.contains("warp"), "{e}");
        let e = decode_fields(" nonsense", &mut c).unwrap_err();
        assert!(e.0.contains("nonsense"), "{e}");
        decode_fields(" drain_us=250", &mut c).unwrap();
        assert_eq!(c.last.unwrap().drain, Some(Duration::from_micros(250)));
    }
}
