//! The control socket's server: who is let in, how requests share upgrades,
//! and what is answered.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{Json, MAX_REQUEST, Policy, Request};
use crate::handover::Handover;
use crate::lifecycle::lock;
use crate::serve::AcceptBackoff;
use crate::upgrade::Upgraded;

/// The most control connections served at once; past it, `busy`.
const MAX_CONNECTIONS: usize = 16;

/// How long a peer has to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a finished upgrade tells the requests that shared it.
#[derive(Debug, Clone)]
struct Done {
    pid: u32,
    generation: u64,
    program: String,
    started_us: u128,
    ready_ms: f64,
    /// The canary judgement of its probation window, if judged.
    judgement: Option<Box<crate::canary::Judgement>>,
}

impl Done {
    /// The `ok` reply, with `flag` (`shared`, `already`) set if given.
    fn reply(&self, flag: Option<&str>) -> String {
        let mut j = Json::new()
            .raw("pid", self.pid)
            .raw("generation", self.generation)
            .str("program", &self.program)
            .raw("started_us", self.started_us);
        if self.ready_ms >= 0.0 {
            j = j.raw("ready_ms", format_args!("{:.3}", self.ready_ms));
        }
        if let Some(judgement) = &self.judgement {
            j = j.raw("canary", judgement_json(judgement));
        }
        if let Some(flag) = flag {
            j = j.raw(flag, true);
        }
        format!("ok {}", j.finish())
    }
}

/// How an upgrade made for control requests ended: `Ok(done)`, or the
/// whole reply line (without its newline).
type Outcome = Result<Done, String>;

/// The latest upgrade this server started, for requests that may share it.
struct Latest {
    /// `CLOCK_MONOTONIC` in µs, taken before the program was resolved.
    started: u128,
    program: Option<std::path::PathBuf>,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// What the connections of one server share.
struct Runner {
    handover: Handover,
    options: Policy,
    /// Held while an upgrade for control requests runs: later requests
    /// queue on it, in order (tokio's mutex is fair).
    gate: tokio::sync::Mutex<()>,
    latest: std::sync::Mutex<Option<Latest>>,
    done: tokio::sync::mpsc::Sender<Upgraded>,
    /// Connections being served.
    active: AtomicUsize,
    /// One fd slot kept for accepting at the fd limit: freed to accept a
    /// control connection there, and refilled with that connection's own
    /// slot when it ends (a new fd could not be had at the limit).
    spare: std::sync::Mutex<Option<OwnedFd>>,
}

/// Serves the control socket (checked and registered) until an upgrade
/// requested through it succeeds, and returns that upgrade: the caller then
/// stops accepting, drains and exits, like after any other upgrade. When an
/// upgrade made otherwise (a signal) hands over, it stops accepting control
/// connections (the successor answers them) and never returns.
///
/// Accept errors back off like the serving layer's ([`AcceptBackoff`]); at
/// the fd limit one fd kept in reserve is freed to accept a control
/// connection. A successor accepts only once its handover is final: during
/// a probation window the old generation, which still accepts on the same
/// socket, answers.
pub(crate) async fn serve_checked(
    handover: Handover,
    listener: tokio::net::UnixListener,
    options: Policy,
    spare: Option<OwnedFd>,
) -> Upgraded {
    // A successor on probation leaves the requests to its predecessor,
    // which still accepts on the same socket: only one of them runs
    // upgrades.
    if let Err(e) = handover.committed().await {
        tracing::warn!(error = %e, "cannot learn whether the handover is final; serving control requests");
    }
    let (done, mut done_rx) = tokio::sync::mpsc::channel::<Upgraded>(1);
    let runner = Arc::new(Runner {
        handover: handover.clone(),
        options,
        gate: tokio::sync::Mutex::new(()),
        latest: std::sync::Mutex::new(None),
        done,
        active: AtomicUsize::new(0),
        spare: std::sync::Mutex::new(spare),
    });
    let mut listener = Some(listener);
    let mut backoff = AcceptBackoff::new();
    loop {
        let ended = handover.generation_data().upgrade_ended.notified();
        if handover.state() == crate::State::HandedOver {
            // Leave the socket to the successor.
            listener = None;
            lock(&runner.spare).take();
        }
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = accept => match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    admit(&runner, stream);
                }
                Err(e) if is_fd_limit(&e) && lock(&runner.spare).take().is_some() => {
                    // The reserved slot is free: accept again at once.
                    tracing::debug!("control socket: accepting with the reserved fd slot");
                }
                Err(e) => tokio::select! {
                    _ = backoff.wait(&e) => {}
                    Some(done) = done_rx.recv() => return done,
                },
            },
            _ = ended => {}
            Some(done) = done_rx.recv() => return done,
        }
    }
}

fn is_fd_limit(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Counts a connection while it is served.
struct Active(Arc<Runner>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Checks the peer before reading anything, and serves it in a task of its
/// own, or refuses it at once.
fn admit(runner: &Arc<Runner>, stream: tokio::net::UnixStream) {
    let refuse = |stream: tokio::net::UnixStream, reply: String| {
        // A fresh socket's buffer has room for one line; a peer that does
        // not read it loses nothing it was owed.
        let _ = stream.try_write(reply.as_bytes());
        let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Both);
    };
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "control connection without credentials refused");
            return;
        }
    };
    if !runner.options.uid_allowed(uid) {
        tracing::warn!(peer_uid = uid, "control request refused");
        let own = nix::unistd::geteuid().as_raw();
        return refuse(
            stream,
            format!("error permission denied: uid {uid} is not the service's uid {own}\n"),
        );
    }
    if runner.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        runner.active.fetch_sub(1, Ordering::SeqCst);
        tracing::debug!("control connection refused: busy");
        return refuse(
            stream,
            format!("busy {MAX_CONNECTIONS} control connections are open; nothing was done\n"),
        );
    }
    let active = Active(runner.clone());
    tokio::spawn(async move {
        let runner = active.0.clone();
        let mut stream = stream;
        // Bounded: an upgrade ends within its ready timeout and probation.
        let served = connection(&runner, &mut stream);
        let _ = tokio::time::timeout(Duration::from_secs(24 * 3600), served).await;
        recycle(&runner, stream);
        drop(active);
    });
}

/// Closes a served connection — or, if the reserved slot was used, keeps
/// its fd (shut down: the peer sees the end) as the new reserve.
fn recycle(runner: &Runner, stream: tokio::net::UnixStream) {
    let mut spare = lock(&runner.spare);
    if spare.is_some() {
        return;
    }
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Both);
    if let Ok(std) = stream.into_std() {
        *spare = Some(OwnedFd::from(std));
    }
}

/// Reads one request line: at most [`MAX_REQUEST`] bytes within
/// [`READ_TIMEOUT`]. `None` if the peer sent no complete line in time.
async fn read_request(stream: &mut tokio::net::UnixStream) -> Option<String> {
    let mut buf = Vec::with_capacity(256);
    let read = async {
        let mut chunk = [0u8; 512];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                buf.truncate(end);
                return String::from_utf8(std::mem::take(&mut buf)).ok();
            }
            if buf.len() > MAX_REQUEST {
                return None;
            }
        }
    };
    tokio::time::timeout(READ_TIMEOUT, read).await.ok()?
}

async fn connection(runner: &Runner, stream: &mut tokio::net::UnixStream) -> std::io::Result<()> {
    let Some(line) = read_request(stream).await else {
        return stream
            .write_all(b"error expected one request line (at most 4 KiB, within 10 s)\n")
            .await;
    };
    let arrived = crate::systemd::monotonic_usec();
    let reply = match Request::parse(&line) {
        Err(e) => format!("error {e}"),
        Ok(Request::Status) => format!("ok {}", status_json(&runner.handover)),
        Ok(Request::TakeOver) => take_over(runner, stream).await,
        Ok(Request::Upgrade { since, program }) => {
            let deploy = &runner.handover.generation_data().config.program;
            match program.map(|p| runner.options.program_allowed(&p, deploy)) {
                Some(Err(refused)) => {
                    tracing::warn!(reason = %refused, "control request refused");
                    format!("error {refused}")
                }
                allowed => {
                    // When the client decided to ask; never later than arrival.
                    let asked = since.map_or(arrived, |t| t.min(arrived));
                    upgrade(runner, asked, allowed.and_then(Result::ok), stream).await
                }
            }
        }
    };
    stream.write_all(format!("{reply}\n").as_bytes()).await?;
    stream.shutdown().await
}

/// Hands the service over to the peer of `stream`, if takeovers are
/// allowed (its uid was checked at accept): the upgrade sends it the offer
/// over a copy of `stream`. The reply line matters only for a refusal,
/// which the peer reads in place of the offer.
async fn take_over(runner: &Runner, stream: &tokio::net::UnixStream) -> String {
    if !runner.options.takeover {
        tracing::warn!("takeover refused: not allowed");
        return "error refused: this service does not allow takeover \
                (ControlSocket::allow_takeover)"
            .to_owned();
    }
    // One upgrade or takeover at a time: refused now, not queued behind
    // the one running (begin() decides if both race here).
    match runner.handover.state() {
        crate::State::Serving => {}
        crate::State::Upgrading => {
            return "error refused: an upgrade or takeover is in progress; ask again when \
                    it has ended"
                .to_owned();
        }
        other => {
            return format!(
                "error refused: this generation cannot hand over now ({})",
                format!("{other:?}").to_lowercase()
            );
        }
    }
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .filter(|p| *p > 0)
        .map_or(0, |p| p as u32);
    let conn = match stream.as_fd().try_clone_to_owned() {
        Ok(c) => c,
        Err(e) => return format!("error cannot take the request: {e}"),
    };
    tracing::info!(peer_pid = pid, "takeover requested");
    let request = crate::takeover::PeerRequest { conn, pid };
    let opts = crate::UpgradeOptions {
        peer: Some(Arc::new(std::sync::Mutex::new(Some(request)))),
        ..crate::UpgradeOptions::new()
    };
    let started_us = crate::systemd::monotonic_usec();
    match runner.handover.upgrade_with(opts).await {
        Ok(u) => {
            let done = Done {
                pid: u.pid,
                generation: u.generation,
                program: u.program.to_string_lossy().into_owned(),
                started_us,
                ready_ms: u.ready_after.as_secs_f64() * 1e3,
                judgement: u.judgement.clone(),
            };
            let _ = runner.done.send(u).await;
            done.reply(Some("takeover"))
        }
        Err(e) => format!("error {}", crate::error::chain(&e)),
    }
}

/// Whether the peer of `stream` has closed its end (or reset it): a
/// request it made is no longer wanted.
fn peer_gone(stream: &tokio::net::UnixStream) -> bool {
    let mut byte = [0u8; 1];
    match crate::sys::recv(
        stream.as_fd(),
        &mut byte,
        libc::MSG_PEEK | libc::MSG_DONTWAIT,
    ) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Answers one upgrade request made at `asked`: with this generation if
/// it started after that, with an upgrade this server started after
/// that, or with a new upgrade once the one running (older) has ended.
async fn upgrade(
    runner: &Runner,
    asked: u128,
    program: Option<std::path::PathBuf>,
    stream: &tokio::net::UnixStream,
) -> String {
    let h = &runner.handover;
    if program.is_none() && h.generation_data().started_usec > asked {
        // This generation read the binary and its configuration after
        // the request was made: it is the answer.
        let exe = crate::program::running_binary()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let done = Done {
            pid: std::process::id(),
            generation: h.generation(),
            program: exe,
            started_us: h.generation_data().started_usec,
            ready_ms: -1.0,
            judgement: None,
        };
        return done.reply(Some("already"));
    }
    loop {
        if let Some(rx) = shareable(runner, asked, &program) {
            match shared(rx).await {
                Some(reply) => return reply,
                None => continue, // that attempt gave way: look again
            }
        }
        let gate = runner.gate.lock().await;
        // While we queued, a request that queued before us may have run
        // an upgrade that started after ours was made.
        if let Some(rx) = shareable(runner, asked, &program) {
            drop(gate);
            match shared(rx).await {
                Some(reply) => return reply,
                None => continue,
            }
        }
        if h.state() == crate::State::HandedOver {
            return handed_over(h);
        }
        if peer_gone(stream) {
            // Nobody waits for this upgrade (a client that gave up, say
            // one whose request waited in the accept queue at the fd
            // limit): start nothing.
            tracing::info!("control request dropped: its client is gone");
            return "error the client closed the connection; nothing was started".to_owned();
        }
        let ended = h.generation_data().upgrade_ended.notified();
        let (tx, rx) = watch::channel(None);
        let started = crate::systemd::monotonic_usec();
        *lock(&runner.latest) = Some(Latest {
            started,
            program: program.clone(),
            outcome: rx,
        });
        let mut opts = crate::UpgradeOptions::new();
        if let Some(p) = &program {
            opts = opts.program(p);
        }
        let result = h.upgrade_with(opts).await;
        let outcome = match &result {
            Err(crate::UpgradeError::InProgress) => {
                // An upgrade triggered otherwise (a signal) runs: it
                // started before us. Wait for its end, then start ours
                // (or tell the client to ask the successor).
                *lock(&runner.latest) = None;
                drop(gate);
                let _ = tokio::time::timeout(Duration::from_secs(24 * 3600), ended).await;
                continue;
            }
            Err(crate::UpgradeError::HandedOver) => {
                // Another trigger handed over just now.
                let _ = tx.send(Some(Err(handed_over(h))));
                return handed_over(h);
            }
            Ok(u) => Ok(Done {
                pid: u.pid,
                generation: u.generation,
                program: u.program.to_string_lossy().into_owned(),
                started_us: started,
                ready_ms: u.ready_after.as_secs_f64() * 1e3,
                judgement: u.judgement.clone(),
            }),
            Err(e) => Err(format!("error {}", crate::error::chain(e))),
        };
        let _ = tx.send(Some(outcome.clone()));
        drop(gate);
        if let Ok(u) = result {
            let _ = runner.done.send(u).await;
        }
        return match outcome {
            Ok(done) => done.reply(None),
            Err(reply) => reply,
        };
    }
}

/// The answer of a generation that handed over to a successor that
/// started before the request: ask the successor.
fn handed_over(h: &Handover) -> String {
    format!(
        "retry this generation handed over (to a successor that started before \
         the request was made); ask again: the successor answers (generation {})",
        h.generation() + 1
    )
}

/// The latest upgrade, if it started after `asked` for the same program.
fn shareable(
    runner: &Runner,
    asked: u128,
    program: &Option<std::path::PathBuf>,
) -> Option<watch::Receiver<Option<Outcome>>> {
    let latest = lock(&runner.latest);
    let l = latest.as_ref()?;
    (l.started > asked && &l.program == program).then(|| l.outcome.clone())
}

/// The reply of a request that shares an upgrade: `None` if that
/// attempt gave way to another trigger's upgrade without an outcome.
async fn shared(mut rx: watch::Receiver<Option<Outcome>>) -> Option<String> {
    let outcome = rx.wait_for(Option::is_some).await.ok()?.clone()?;
    Some(match outcome {
        Ok(done) => done.reply(Some("shared")),
        Err(reply) => format!("{reply} (shared)"),
    })
}

/// A canary judgement as JSON: the verdict, the operator's line, and both
/// generations' numbers.
fn judgement_json(j: &crate::canary::Judgement) -> String {
    let side = |s: &crate::canary::Summary| {
        let ms = |d: Option<std::time::Duration>| {
            d.map_or("null".to_owned(), |d| {
                format!("{:.3}", d.as_secs_f64() * 1e3)
            })
        };
        Json::new()
            .raw("requests", s.requests)
            .raw("errors", s.errors)
            .raw("error_rate", format_args!("{:.6}", s.error_rate()))
            .raw("connections", s.connections)
            .raw("p50_ms", ms(s.p50))
            .raw("p99_ms", ms(s.p99))
            .finish()
    };
    Json::new()
        .str("verdict", &j.verdict.to_string())
        .raw("rolled_back", j.rolled_back())
        .str("summary", &j.to_string())
        .raw("canary", side(&j.canary))
        .raw("baseline", side(&j.baseline))
        .finish()
}

/// The `status` reply's JSON.
fn status_json(h: &Handover) -> String {
    let g = h.generation_data();
    let state = format!("{:?}", h.state()).to_lowercase();
    let stats = h.stats();
    let last = match &stats.last_upgrade {
        // No attempt of its own: the upgrade that made this generation
        // succeeded (its phases came with the commit).
        None if h.generation() > 1 => {
            let to_commit: std::time::Duration = stats
                .last_phases
                .map(|p| {
                    [p.spawn, p.state, p.ready, p.probation]
                        .into_iter()
                        .flatten()
                        .sum()
                })
                .unwrap_or_default();
            Json::new()
                .raw("ok", true)
                .raw("successor", std::process::id())
                .raw("error", "null")
                .raw("ms", format_args!("{:.3}", to_commit.as_secs_f64() * 1e3))
                .finish()
        }
        None => "null".to_owned(),
        Some(r) => Json::new()
            .raw("ok", r.error.is_none())
            .raw(
                "successor",
                r.successor.map_or("null".to_owned(), |p| p.to_string()),
            )
            .opt_str("error", r.error.as_deref())
            .raw("ms", format_args!("{:.3}", r.duration.as_secs_f64() * 1e3))
            .finish(),
    };
    let upgrading = g.life().upgrading.clone();
    let upgrade = match upgrading {
        None => "null".to_owned(),
        Some(u) => {
            let now = crate::systemd::monotonic_usec();
            let for_ms = now.saturating_sub(u.started_us) as f64 / 1e3;
            Json::new()
                .raw("since_us", u.started_us)
                .raw("for_ms", format_args!("{for_ms:.3}"))
                .opt_str(
                    "program",
                    u.program.as_ref().map(|p| p.to_string_lossy()).as_deref(),
                )
                .raw(
                    "successor",
                    u.successor.map_or("null".to_owned(), |p| p.to_string()),
                )
                .finish()
        }
    };
    Json::new()
        .raw("pid", std::process::id())
        .raw("generation", h.generation())
        .str("state", &state)
        .raw("committed", stats.committed)
        .str("program", &g.config.program.to_string_lossy())
        .raw("upgrades_succeeded", stats.upgrades_succeeded)
        .raw("upgrades_failed", stats.upgrades_failed)
        .raw("upgrade", upgrade)
        .raw("last_upgrade", last)
        .raw(
            "last_judgement",
            stats
                .last_judgement
                .as_ref()
                .map_or("null".to_owned(), judgement_json),
        )
        .finish()
}
