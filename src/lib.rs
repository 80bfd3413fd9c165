//! Graceful in-place restarts for Linux services.
//!
//! A server built on `handover` replaces its own binary while serving,
//! without losing a connection: the running process (the *old generation*)
//! fork+execs the new binary, hands it the named listening sockets, waits
//! until the successor reports ready, rolls back if it does not, and then
//! drains and exits.
//!
//! ```text
//!  old generation (gen N)                         successor (gen N+1)
//!  ──────────────────────                         ───────────────────
//!  upgrade() ── fork ──► child: fds → 3,4,…; LISTEN_PID = own pid; execve
//!      │                                      Handover::builder().build()
//!      │   (keeps accepting on the shared        takes "http" = fd 3 by name,
//!      │    sockets: nothing is dropped)          checks it (socket, family, address)
//!      │                                      handover.ready() ── 'R' over channel
//!      ◄──────────────────────────────────────────────┘
//!  Ok(Upgraded) → stop accepting, drain, exit ──► channel EOF: predecessor gone
//!  Err(_)       → successor killed and reaped; gen N serves on, untouched
//! ```
//!
//! Old and new generation share the *same* listening sockets (one open file
//! description each), so a connection waiting in the kernel's accept queue
//! is never lost: whoever accepts next, answers it.
//!
//! # Example
//!
//! An axum service that upgrades on SIGHUP and drains and stops on SIGTERM,
//! losing no request (feature `http`, on by default; the full service is
//! examples/axum.rs). The rules it follows: `build()` first, before the
//! runtime opens any fd; signal handlers before `ready()`; the upgrade in a
//! task of its own ([`serve::Triggers`]), so accepting goes on while a
//! successor starts (up to the ready timeout); SIGTERM stops
//! ([`Handover::stop`]): the port closes at once, the requests in flight
//! finish, idle keep-alive connections close, the pid file and control
//! socket go, and the service manager hears `STOPPING=1`.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use handover::{Handover, serve::{Server, Triggers}};
//! use tokio::signal::unix::SignalKind;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First thing, before any other fd is opened (like sd_listen_fds).
//!     let handover = Handover::builder().build()?;
//!     tokio::runtime::Runtime::new()?.block_on(async {
//!         // Inherited from the old generation, or bound now.
//!         let listener = handover.tcp_listener("http", "127.0.0.1:8080")?;
//!         // The upgrade runs in this task, beside the accept loop: while a
//!         // successor starts (up to the ready timeout), accepting goes on.
//!         Triggers::new(&handover)
//!             .upgrade_on(SignalKind::hangup())
//!             .stop_on(SignalKind::terminate())
//!             .spawn()?; // before ready(): SIGHUP must not kill a new generation
//!         // Before ready() too: the ready message tells the predecessor that
//!         // this generation takes its keep-alive connections.
//!         let server = Server::new(&handover).listener(listener);
//!         handover.ready()?;
//!         let app = Router::new().route("/", get(|| async { "hello\n" }));
//!         // Serves until the drain after an upgrade or a stop is done.
//!         let report = server.serve(app).await?;
//!         eprintln!("drained: {report:?}");
//!         Ok(())
//!     })
//! }
//! ```
//!
//! For another protocol, write the accept loop and follow the generation's
//! [`Drain`] (its documentation shows the loop; docs/how-it-works.md a complete one),
//! with [`serve::Triggers`] for the signals and [`serve::AcceptBackoff`] for
//! accept errors.
//!
//! # Signals
//!
//! `handover` installs no signal handler of its own accord. Only
//! [`serve::Triggers::spawn`] installs handlers — tokio's, for exactly the
//! signals the application names there. An application that handles its
//! signals itself calls [`Handover::upgrade`] from a task of its own, never
//! from the `select!` that accepts.
//!
//! # Serving HTTP without losing a request
//!
//! [`serve::Server`] (feature `http`) serves HTTP/1.1 and HTTP/2 with any
//! hyper or tower service. Its drain stops accepting, finishes requests in
//! flight, answers the next request on each keep-alive connection with
//! `Connection: close`, serves connections accepted but not read yet, sends
//! HTTP/2 a graceful GOAWAY, and ends as soon as nothing is left (at most
//! the drain timeout). `axum::serve`'s graceful shutdown instead closes idle
//! and unread connections, failing requests already on the wire.
//!
//! By default it hands HTTP/1.1 keep-alive connections to a successor that
//! takes them instead (its ready message says so), so an idle client does
//! not hold the old generation ([`serve::Server::migrate`]). With feature
//! `websocket`, WebSocket connections move too, between two messages
//! ([`websocket`]).
//!
//! # TLS
//!
//! With feature `tls` (rustls, the `ring` provider), `serve::Server::tls`
//! serves the same way over TLS, HTTP/2 chosen by ALPN, with the same
//! drain; each handshake is bounded (10 s, never past the drain deadline).
//! `serve::tls_config` reads the certificate and key at start (a renewed
//! certificate is deployed by an upgrade; one that cannot be used fails the
//! upgrade with the reason) and installs the service's session-ticket keys,
//! which each generation hands to its successor in a sealed memory file
//! (never on disk): clients resume their sessions across upgrades instead
//! of all paying a full handshake at once (examples/axum_tls.rs). An
//! established TLS connection is never handed over: it gets the lame duck.
//!
//! # The protocol
//!
//! The successor finds its fds exactly as under systemd socket activation:
//! `LISTEN_FDS`, `LISTEN_PID` (written by the child after fork, so it is
//! always the successor's own pid) and `LISTEN_FDNAMES`. The same code path
//! therefore serves a process started by its old generation, by systemd, or
//! by `systemd-socket-activate`. When the crate has secrets to hand on (the
//! TLS session-ticket keys), one more fd follows the named ones, under the
//! reserved name `handover.secrets`: a sealed memory file, read and closed
//! by `build()` (a build that does not know it closes it at `ready()`, with
//! a warning). `HANDOVER_CHANNEL_FD` names the readiness
//! channel and `HANDOVER_GENERATION` the generation. Over the channel the
//! successor sends `T<kinds>` (the connections it takes, right before
//! `R`), `R` (ready), `E<reason>` (state rejected) or, during a
//! probation window, `U<reason>` (unhealthy) and `P<counts>` (its canary
//! counts); the old generation answers `A` (taken back), `S<pacing>` (a
//! canary's share of new connections), or `C<counters>` once the handover
//! is final and later `D<drain time>`, and its end closes when it exits. Stale `LISTEN_*`,
//! `HANDOVER_*` and `WATCHDOG_PID` are never passed on, and the process
//! environment is never modified. Under systemd, [`systemd::Notifier`] tells
//! the manager about each upgrade (see docs/systemd.md).
//!
//! # Signals and process groups
//!
//! A successor starts in a process group of its own (`setpgid` between fork
//! and exec: its pgid is its pid), and [`Handover::ready`] moves it into the
//! group its predecessor is in just before it reports ready. So:
//!
//! - a signal sent to the service's process group while a successor starts
//!   (`kill -HUP -- -PGID`, a terminal's hangup or Ctrl-C) reaches the
//!   generations that serve, not the successor, which may not have its
//!   handlers yet; from `ready()` on, with its handlers installed, it is a
//!   normal member of the service's group;
//! - when an upgrade fails — the successor exits, misses the ready deadline,
//!   rejects the state, breaks the protocol, fails its probation — the
//!   successor and its start group are killed (SIGKILL) and the successor
//!   reaped: whatever it started before `ready()`, such as the real server
//!   behind a shell wrapper that does not `exec`, dies with it and holds
//!   neither a listener nor the channel. What it starts between `ready()`
//!   and a failed probation is in the service's group, and lives on.
//!
//! It joins at `ready()` rather than at the commit because the predecessor
//! is alive then (it waits for the ready message), so the group is too: a
//! predecessor that commits, drains and exits before its successor took the
//! commit in may have been the last member of the service's group, which
//! would be gone. The other side: a signal sent to the service's group while
//! a successor starts (`kill -TERM -- -PGID` to stop it) does not reach it.
//! Stop a service by its main pid (the pid file names it), or by its cgroup
//! under systemd.
//!
//! A process that leaves its group itself (`setsid`, `setpgid`: a
//! daemonizing wrapper) escapes that kill; under systemd the unit's cgroup
//! still ends it on stop (`KillMode=control-group`, the default), and no
//! part of systemd's process tracking depends on process groups.
//!
//! SIGHUP, the usual upgrade signal, starts *ignored* in a successor: one
//! sent before the application installed its handler (to the successor's
//! pid, by `pkill`, by `systemctl kill`) is discarded instead of killing the
//! process. Installing a handler (`tokio::signal::unix::signal`) replaces
//! that disposition; an application that installs none keeps SIGHUP ignored,
//! as under `nohup`, and programs it starts inherit that. SIGHUP is ignored
//! rather than blocked: a signal mask belongs to a thread and is inherited
//! by every thread the runtime starts, so `ready()` could unblock it only in
//! its own thread, and the signal would be lost for good once that thread
//! ended. A SIGHUP that arrives between `ready()` and the commit (sent to
//! the group, or to the pid) is the application's, and an upgrade it asks
//! for is refused ([`UpgradeError::OnProbation`]) until the commit has
//! arrived. Every other
//! signal starts at its default, nothing blocked, and nothing pending: what
//! reached the successor before it had its own group was meant for the old
//! generation's.
//!
//! # Canary upgrades
//!
//! With a probation window ([`UpgradeOptions::probation`]), a successor that reported ready is not
//! trusted at once: for the window both generations accept on the shared
//! sockets, so they serve the same traffic at the same time, and the old
//! generation judges the successor — the canary — on it ([`canary`]): each
//! generation counts its responses by class (5xx, failures) and their
//! latency ([`serve::Server`] does it by itself), the canary reports its
//! counts every 100 ms, and the old generation takes the service back when
//! the canary's error rate or p99 is worse than its own beyond the bounds
//! of [`canary::Policy`] (the upgrade fails with [`UpgradeError::Canary`],
//! whose message carries the numbers). It does so too, at once, if the
//! successor exits or reports itself unhealthy
//! ([`Handover::report_unhealthy`]; [`UpgradeError::Probation`]). A canary
//! taken back stops accepting and drains its connections (the lame duck),
//! by itself; the old generation carries on alone. Only after the window
//! does the upgrade succeed ([`Upgraded::judgement`] has the numbers): the
//! pid file, systemd's `MAINPID=` and the control socket's reply name the
//! successor then, and the successor learns that it is final
//! ([`Handover::committed`]).
//!
//! # Takeover
//!
//! A process that is not the old generation's child — a new container
//! beside the old one, the other unit of a blue/green pair, a build started
//! by hand — takes the service over through the control socket
//! ([`Builder::take_over`], allowed by
//! [`control::ControlSocket::allow_takeover`]): it receives the named fds,
//! a channel, the state and the counters, and from there it is the protocol
//! of every upgrade (ready, probation, commit, migration).
//!
//! # Containers
//!
//! As PID 1 of a container the server cannot hand over and exit: the
//! namespace dies with PID 1. [`supervisor::Supervisor`] keeps a small PID 1
//! that starts the server, follows the handover (`MAINPID=` over a private
//! `NOTIFY_SOCKET`), forwards signals to the serving process and reaps the
//! old ones.
//!
//! # Observability
//!
//! Every upgrade runs in a `tracing` span named `upgrade` (fields
//! `generation`, `successor_generation`) with one INFO line when it ends
//! (`successor ready; handed over`, or `upgrade failed; still serving` with
//! the reason) and one DEBUG `upgrade phase` event per phase (`phase` =
//! preflight, spawn, state, ready, probation, drain, exit; `ms`). [`Handover::stats`] returns a [`Stats`] snapshot —
//! generation, upgrades succeeded and failed (carried from generation to
//! generation), the last error, the last upgrade's [`Phases`], connections
//! still draining — with a Prometheus example in its documentation.
//!
//! # Fd hygiene
//!
//! Every fd `handover` creates is close-on-exec from birth; inherited fds are
//! made close-on-exec as soon as they are adopted. Only the child, between
//! fork and exec, makes the handed fds inheritable, and every other fd above
//! them is closed at exec (`close_range(CLOSE_RANGE_CLOEXEC)`). No other
//! process the application spawns ever inherits a listener.
//!
//! # Limitations
//!
//! - Linux only (pidfds, `close_range`, abstract sockets). Kernels before
//!   5.4 (no `CLONE_PIDFD`, no `waitid(P_PIDFD)`), glibc before 2.25, and an
//!   application that ignores `SIGCHLD` (whose children the kernel reaps,
//!   wait status lost) start every successor through an intermediate
//!   process (which polls for its exit before 5.3); kernels before 5.11
//!   fall back to a loop that closes fds one by one.
//! - `O_NONBLOCK` is a property of the shared socket: both generations see
//!   the same value. Listeners are handed out non-blocking.
//! - Without a service manager the successor is the old generation's child
//!   (started like `posix_spawn` does, sharing its memory until the exec),
//!   and is reparented to the nearest subreaper or init when the old
//!   generation exits. Under a service manager (systemd, the PID 1
//!   supervisor) it is started through a short-lived intermediate process
//!   and reparented to the manager before it is named main.
//! - The library installs no signal handlers of its own accord: the
//!   application names the signals that trigger an upgrade or a stop
//!   ([`serve::Triggers`]), or handles them itself. A successor starts with
//!   SIGHUP ignored (see "Signals and process groups").
//! - What a failed successor started is killed through its process group;
//!   a process that left that group escapes.
//! - An established TLS connection is never handed to the successor (its
//!   keys and record sequence numbers live in this process's rustls state;
//!   kernel TLS could lift this, and is not on every kernel): it gets the
//!   lame-duck drain. `handover.secrets` is a reserved fd name.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]
#![warn(missing_docs)]

mod builder;
pub mod canary;
mod channel;
mod clock;
pub mod control;
mod env;
mod error;
mod fds;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handover;
mod lifecycle;
mod pidfile;
mod program;
mod ready;
mod secrets;
mod spawn;
mod state;
mod stats;
mod stop;
mod successor;
pub mod supervisor;
mod sys;
pub mod systemd;
mod takeover;
mod upgrade;

#[cfg(feature = "tokio")]
mod drain;
#[cfg(feature = "tokio")]
pub mod migrate;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub mod serve;
#[cfg(feature = "websocket")]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub mod websocket;

/// The README's examples, compiled as doctests.
#[cfg(all(doctest, feature = "http"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The guides' examples (docs/), compiled as doctests.
#[cfg(all(doctest, feature = "http"))]
mod guides {
    #[doc = include_str!("../docs/systemd.md")]
    pub struct Systemd;
    #[doc = include_str!("../docs/deploying.md")]
    pub struct Deploying;
    #[doc = include_str!("../docs/migration.md")]
    pub struct Migration;
    #[doc = include_str!("../docs/containers.md")]
    pub struct Containers;
    #[doc = include_str!("../docs/how-it-works.md")]
    pub struct HowItWorks;
    #[doc = include_str!("../docs/guarantees.md")]
    pub struct Guarantees;
    #[cfg(feature = "tls")]
    #[doc = include_str!("../docs/tls.md")]
    pub struct Tls;
}

pub use builder::Builder;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use drain::{Drain, DrainGuard, DrainReport};
pub use error::{Error, UpgradeError};
pub use fds::ListenOptions;
pub use handover::Handover;
pub use lifecycle::{State, Stats};
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use migrate::{ConnectionSender, IncomingConnections, Migrated, MigratedConnection};
pub use state::StateReader;
pub use stats::Phases;
pub use upgrade::{UpgradeOptions, Upgraded};
