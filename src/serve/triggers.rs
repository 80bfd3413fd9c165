//! What ends a generation: signals and the control socket, in a task of
//! their own so that accepting never waits for an upgrade.

use std::io;
use std::sync::Arc;
use std::task::Poll;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;

use crate::error::UpgradeError;
use crate::handover::Handover;
use crate::upgrade::Upgraded;

/// The triggers that end this generation, run by a task of their own:
/// signals that upgrade, signals that stop, and the control socket.
///
/// An upgrade takes up to the ready timeout (plus any probation window);
/// awaiting it in the `select!` that also accepts would stop accepting for
/// that long. The task started by [`spawn`](Self::spawn) runs it beside the
/// accept loop instead, and on the outcome:
///
/// - upgrade succeeded (by signal or through the control socket): starts
///   the generation's [`Drain`](crate::Drain) — the accept loop stops, the
///   drain runs;
/// - upgrade failed: logs it (`tracing` warn), keeps serving and waits for
///   the next trigger;
/// - stop signal: stops this generation ([`Handover::stop`]: `STOPPING=1`,
///   the listeners closed once the serving layer has taken what is queued,
///   the pid file and control socket removed) and starts the drain as a
///   stop.
///
/// The drain started any other way (`drain.start()`, say after
/// [`Handover::report_unhealthy`]) ends the task too. The control socket is
/// served until the task ends: then the successor answers it. A stop signal
/// that arrives while an upgrade runs (signalled, or requested through the
/// control socket) is acted on when the upgrade has ended (within the ready
/// timeout and any probation window): if it failed, this generation stops;
/// if it succeeded, the successor serves and this generation drains as
/// after any upgrade. When the task has ended, [`Handover::state`] tells
/// why: [`State::HandedOver`](crate::State::HandedOver) after an upgrade,
/// [`State::Stopping`](crate::State::Stopping) after a stop.
///
/// Signals: `handover` installs no handler of its own accord. `spawn`
/// installs tokio's handlers for exactly the signals named here, and they
/// stay installed for the life of the process (tokio never uninstalls
/// one). Call `spawn` before [`Handover::ready`]: from then on an operator
/// may signal this process, and SIGHUP's default action would kill it.
#[must_use = "nothing is triggered until spawn() is called"]
pub struct Triggers {
    handover: Handover,
    upgrade: Vec<SignalKind>,
    stop: Vec<SignalKind>,
    control: Option<crate::control::ControlSocket>,
}

impl std::fmt::Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers")
            .field("upgrade", &self.upgrade)
            .field("stop", &self.stop)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl Triggers {
    /// No triggers yet, for `handover`'s generation.
    pub fn new(handover: &Handover) -> Self {
        Triggers {
            handover: handover.clone(),
            upgrade: Vec::new(),
            stop: Vec::new(),
            control: None,
        }
    }

    /// Upgrades on `signal` (typically `SignalKind::hangup()`).
    pub fn upgrade_on(mut self, signal: SignalKind) -> Self {
        self.upgrade.push(signal);
        self
    }

    /// Drains and stops on `signal` (typically `SignalKind::terminate()`
    /// and `SignalKind::interrupt()`).
    pub fn stop_on(mut self, signal: SignalKind) -> Self {
        self.stop.push(signal);
        self
    }

    /// Serves upgrade, status and takeover requests on the control socket
    /// `socket` (from [`control::bind`](crate::control::bind)); see the
    /// [`control`](crate::control) module for who may ask for what. The
    /// triggers' task ends (and the drain starts) when an upgrade requested
    /// through it succeeds; an application that handles its signals itself
    /// uses `Triggers::new(&handover).control(socket).spawn()`.
    ///
    /// Every upgrade, signalled or requested, takes the options of
    /// [`Builder::upgrade_options`](crate::Builder::upgrade_options) and the
    /// state of [`Handover::set_state_source`].
    pub fn control(mut self, socket: crate::control::ControlSocket) -> Self {
        self.control = Some(socket);
        self
    }

    /// Called with the result of every upgrade attempt of this generation,
    /// whatever triggered it — a signal, the control socket, a call of
    /// [`Handover::upgrade`] — once it has ended, on the thread that ran
    /// it: keep it short. Attempts refused because another upgrade runs
    /// ([`UpgradeError::InProgress`]) are not upgrades and are not
    /// reported. Failures are also logged.
    pub fn on_upgrade<F>(self, f: F) -> Self
    where
        F: Fn(&Result<Upgraded, UpgradeError>) + Send + Sync + 'static,
    {
        crate::lifecycle::lock(&self.handover.g.observers).push(Arc::new(f));
        self
    }

    /// Installs the signal handlers now and starts the task. Must be called
    /// within a tokio runtime.
    ///
    /// The task ends once the drain started; abort it
    /// (`JoinHandle::abort`) to act on no trigger any more and leave the
    /// control socket. Fails if a signal handler cannot be installed, or the
    /// control socket is refused (see
    /// [`ControlSocket::allow_open_socket`](crate::control::ControlSocket::allow_open_socket)).
    pub fn spawn(self) -> io::Result<JoinHandle<()>> {
        let listen = |kinds: &[SignalKind]| -> io::Result<Vec<(SignalKind, Signal)>> {
            kinds.iter().map(|&k| Ok((k, signal(k)?))).collect()
        };
        let upgrade = listen(&self.upgrade)?;
        let stop = listen(&self.stop)?;
        let control = match self.control {
            Some(socket) => {
                socket.check()?;
                let crate::control::ControlSocket {
                    listener,
                    policy,
                    spare,
                    ..
                } = socket;
                listener.set_nonblocking(true)?;
                Some((tokio::net::UnixListener::from_std(listener)?, policy, spare))
            }
            None => None,
        };
        Ok(tokio::spawn(run(self.handover, upgrade, stop, control)))
    }
}

/// The control socket, checked and registered.
type Control = (
    tokio::net::UnixListener,
    crate::control::Policy,
    Option<std::os::fd::OwnedFd>,
);

/// Resolves with the kind of the first of `signals` to arrive; never if
/// there are none.
async fn any(signals: &mut [(SignalKind, Signal)]) -> SignalKind {
    std::future::poll_fn(|cx| {
        for (kind, s) in signals.iter_mut() {
            if let Poll::Ready(Some(())) = s.poll_recv(cx) {
                return Poll::Ready(*kind);
            }
        }
        Poll::Pending
    })
    .await
}

async fn run(
    handover: Handover,
    mut upgrade: Vec<(SignalKind, Signal)>,
    mut stop: Vec<(SignalKind, Signal)>,
    control: Option<Control>,
) {
    let drain = handover.drain();
    // The control socket is served by a task of its own, as
    // the control server expects: its requests are answered while an upgrade
    // triggered by a signal runs. It stops when this task ends.
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let _control = control.map(|(listener, policy, spare)| {
        let h = handover.clone();
        AbortOnDrop(tokio::spawn(async move {
            let done = crate::control::serve_checked(h, listener, policy, spare).await;
            let _ = done_tx.send(done);
        }))
    });
    let control = async {
        match (&mut done_rx).await {
            Ok(done) => done,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::pin!(control);
    loop {
        tokio::select! {
            _ = any(&mut upgrade) => {
                match handover.upgrade().await {
                    Ok(_) => break,
                    // Logged (and counted) by the upgrade itself.
                    Err(e) => tracing::debug!(error = %e, "signalled upgrade did not hand over"),
                }
            }
            _ = &mut control => break,
            kind = any(&mut stop) => {
                tracing::debug!(signal = ?kind, "stop signal");
                stop_after_upgrades(&handover).await;
                break;
            }
            _ = drain.draining() => return,
        }
    }
    drain.start();
}

/// Stops this generation ([`Handover::stop`]) once no upgrade runs: an
/// upgrade started through the control socket may run beside this task.
async fn stop_after_upgrades(handover: &Handover) {
    loop {
        let ended = handover.generation_data().upgrade_ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        match handover.stop() {
            crate::State::Upgrading => {
                tracing::info!("stop asked for while upgrading: waiting for the upgrade to end");
                ended.await;
            }
            _ => return,
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
