//! `Handover::stats()` and the tracing span of an upgrade: the test process
//! is the old generation; its successors are small shell scripts that speak
//! the channel protocol (`R` on fd 3: ready; `U<reason>` : unhealthy).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::procs;
use handover::{Handover, UpgradeError, UpgradeOptions};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// Tests here fork from this process and count its children: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    procs::become_subreaper();
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// One `upgrade phase` event: its span (name and fields) and its fields.
#[derive(Debug, Clone)]
struct PhaseEvent {
    span: String,
    phase: String,
    ms: f64,
}

#[derive(Default)]
struct Fields {
    text: String,
    phase: Option<String>,
    ms: Option<f64>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.text
            .push_str(&format!("{}={:?} ", field.name(), value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "phase" {
            self.phase = Some(value.to_owned());
        }
        self.record_debug(field, &value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "ms" {
            self.ms = Some(value);
        }
        self.record_debug(field, &value);
    }
}

/// Collects the phase events of this thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<PhaseEvent>>>);

struct SpanFields(String);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(f.text));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let (Some(phase), Some(ms)) = (f.phase, f.ms) else {
            return;
        };
        let span = ctx
            .event_span(event)
            .map(|s| {
                let fields = s
                    .extensions()
                    .get::<SpanFields>()
                    .map(|f| f.0.clone())
                    .unwrap_or_default();
                format!("{}{{{}}}", s.name(), fields.trim_end())
            })
            .unwrap_or_default();
        self.0.lock().unwrap().push(PhaseEvent { span, phase, ms });
    }
}

/// Runs `f` with phase events captured, on this thread only.
fn captured<T>(f: impl FnOnce() -> T) -> (T, Vec<PhaseEvent>) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let out = tracing::subscriber::with_default(subscriber, f);
    let events = capture.0.lock().unwrap().clone();
    (out, events)
}

fn sh(script: &str) -> UpgradeOptions {
    UpgradeOptions::new()
        .program("/bin/sh")
        .args(["-c", script])
}

fn phases_of(events: &[PhaseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.phase.as_str()).collect()
}

#[test]
fn a_successful_upgrade_reports_its_phases_in_a_span_and_in_stats() {
    let _g = serial();
    let h = Handover::builder().build().unwrap();
    h.ready().unwrap();
    let before = h.stats();
    assert_eq!(before.generation, 1);
    assert!(before.committed);
    assert_eq!((before.upgrades_succeeded, before.upgrades_failed), (0, 0));
    assert_eq!(before.last_phases, None);

    // The successor reads nothing: the state (8 bytes) waits in the socket
    // buffer, and it reports ready at once.
    let opts = sh("printf R >&3; exec sleep 30").state(1, std::io::Cursor::new([7u8; 8]));
    let (done, events) = captured(|| h.upgrade_blocking_with(opts));
    let done = done.unwrap();
    assert_eq!(
        phases_of(&events),
        ["spawn", "state", "ready"],
        "{events:?}"
    );
    for e in &events {
        assert_eq!(
            e.span, "upgrade{generation=1 successor_generation=2}",
            "{e:?}"
        );
        assert!(e.ms >= 0.0);
    }
    let s = h.stats();
    assert_eq!(s.state, handover::State::HandedOver);
    assert_eq!((s.upgrades_succeeded, s.upgrades_failed), (1, 0));
    let p = s.last_phases.expect("phases");
    assert!(p.spawn.is_some() && p.state.is_some() && p.ready.is_some());
    assert_eq!((p.preflight, p.probation, p.drain), (None, None, None));
    assert_eq!(Some(p), Some(done.phases));

    // The drain of this generation is the last phase it sees; connections
    // in flight count as draining meanwhile.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let drain = h.drain();
    let guard = drain.guard();
    assert_eq!(h.stats().draining, 0, "not draining yet");
    drain.start();
    assert_eq!(h.stats().draining, 1);
    drop(guard);
    let (report, events) = captured(|| rt.block_on(drain.wait(Duration::from_secs(5))));
    assert_eq!(report.remaining, 0);
    assert_eq!(phases_of(&events), ["drain"], "{events:?}");
    assert_eq!(
        events[0].span,
        "upgrade{generation=1 successor_generation=2}"
    );
    let s = h.stats();
    assert_eq!(s.draining, 0);
    assert_eq!(s.last_phases.unwrap().drain, Some(report.elapsed));

    procs::signal(done.pid, libc::SIGKILL).unwrap();
    procs::reap(done.pid, common::EVENT_TIMEOUT).unwrap();
}

#[test]
fn a_successor_that_exits_on_probation_is_a_counted_failure() {
    let _g = serial();
    let h = Handover::builder().build().unwrap();
    h.ready().unwrap();
    let children = procs::children(std::process::id()).len();
    let opts = sh("printf R >&3; sleep 0.2; exit 7")
        .preflight(["-c", "exit 0"])
        .probation(Duration::from_secs(10));
    let (result, events) = captured(|| h.upgrade_blocking_with(opts));
    let e = result.unwrap_err();
    match &e {
        UpgradeError::Probation { reason, after, .. } => {
            assert!(reason.contains("exit status: 7"), "{e}");
            assert!(*after < Duration::from_secs(10), "{e}");
        }
        other => panic!("expected a probation failure, got {other}"),
    }
    assert!(e.spawned());
    assert_eq!(
        phases_of(&events),
        ["preflight", "spawn", "ready", "probation"],
        "{events:?}"
    );
    let s = h.stats();
    assert_eq!(s.state, handover::State::Serving);
    assert_eq!((s.upgrades_succeeded, s.upgrades_failed), (0, 1));
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("failed its probation"),
        "{s:?}"
    );
    let p = s.last_phases.unwrap();
    assert!(p.preflight.is_some() && p.probation.is_some(), "{p:?}");
    // Reaped: no child left behind.
    assert_eq!(procs::children(std::process::id()).len(), children);
    assert!(procs::zombies(std::process::id()).is_empty());
}

#[test]
fn a_successor_that_reports_itself_unhealthy_is_taken_back() {
    let _g = serial();
    let h = Handover::builder().build().unwrap();
    // Before ready there is nothing to take back: an error, not a message.
    let e = h.report_unhealthy("too early").unwrap_err();
    assert!(e.to_string().contains("before ready()"), "{e}");
    h.ready().unwrap();
    // A first generation has no predecessor to hand the service back to.
    assert!(!h.report_unhealthy("no one to tell").unwrap());
    let children = procs::children(std::process::id()).len();
    // Ready, then unhealthy; it waits for the answer (`A`) and exits 0 only
    // if it got it.
    let script = "printf R >&3; printf 'Uout of disk\\n' >&3; read answer <&3; \
                  [ \"$answer\" = A ] && exit 0; exit 9";
    let opts = sh(script).probation(Duration::from_secs(10));
    let e = h.upgrade_blocking_with(opts).unwrap_err();
    assert!(
        e.to_string()
            .contains("reported itself unhealthy: out of disk; rolled back"),
        "{e}"
    );
    assert_eq!(h.stats().upgrades_failed, 1);
    assert_eq!(procs::children(std::process::id()).len(), children);
    // The refused handover leaves this generation able to upgrade again.
    let e = h
        .upgrade_blocking_with(sh("exit 4").probation(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(e, UpgradeError::Exited { .. }), "{e}");
    assert_eq!(h.stats().upgrades_failed, 2);
}
