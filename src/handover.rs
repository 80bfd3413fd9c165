//! [`Handover`]: one generation's side of the handover, as the application
//! sees it — its fds by name, its readiness, its upgrades, its drain and its
//! metrics. A thin layer: the work is done by `fds` (the registry),
//! `lifecycle` (the states), `upgrade` (the old generation's side) and
//! `successor` (the successor's side of the channel).

use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use socket2::Type;

use crate::error::{Error, UpgradeError};
use crate::fds::{self, Want};
use crate::lifecycle::{Generation, State, StateFn, Stats, lock};
use crate::sys;
use crate::systemd::Notifier;
use crate::upgrade::{UpgradeOptions, Upgraded};
#[cfg(feature = "tokio")]
use crate::upgrade::{Upgrader, run_caught};

/// One generation's side of the handover: its inherited and registered fds,
/// its readiness, and its upgrades.
///
/// Cheap to clone; clones share one state. Build one per process with
/// [`Handover::builder`].
///
/// Methods that wait come in two forms, named by one rule: the plain name is
/// `async` (feature `tokio`), and the blocking form ends in `_blocking`.
#[derive(Debug, Clone)]
pub struct Handover {
    pub(crate) g: Arc<Generation>,
    /// The thread that runs async upgrades, started by `ready()` so that no
    /// thread is created on the way from a trigger to the fork.
    #[cfg(feature = "tokio")]
    upgrader: Arc<std::sync::OnceLock<Upgrader>>,
    /// What this process did with connection migration.
    #[cfg(feature = "tokio")]
    migrate: Arc<std::sync::Mutex<crate::migrate::Slot>>,
}

fn one_addr(addr: impl ToSocketAddrs) -> Result<SocketAddr, Error> {
    let mut it = addr
        .to_socket_addrs()
        .map_err(|e| Error::io("cannot resolve the address", e))?;
    it.next().ok_or_else(|| {
        Error::io(
            "cannot resolve the address",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"),
        )
    })
}

impl Handover {
    pub(crate) fn from_generation(g: Generation) -> Handover {
        Handover {
            g: Arc::new(g),
            #[cfg(feature = "tokio")]
            upgrader: Arc::default(),
            #[cfg(feature = "tokio")]
            migrate: Arc::default(),
        }
    }

    /// The generation behind this handle (for the control server).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn generation_data(&self) -> &Generation {
        &self.g
    }

    /// This process's generation: 1 for the first, then counting up by one
    /// per successful upgrade.
    pub fn generation(&self) -> u64 {
        self.g.generation
    }

    /// The drain timeout configured with
    /// [`Builder::drain_timeout`](crate::Builder::drain_timeout).
    pub fn drain_timeout(&self) -> Duration {
        self.g.config.drain_timeout
    }

    /// Where this generation is in its life.
    pub fn state(&self) -> State {
        self.g.state()
    }

    /// Resolves once this generation has handed over (the commit), which is
    /// before `upgrade()` returns to its caller: the serving layer stops
    /// accepting then.
    #[cfg(feature = "http")]
    pub(crate) async fn handed_over(&self) {
        loop {
            let notified = self.g.handed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.g.state() == State::HandedOver {
                return;
            }
            notified.await;
        }
    }

    /// A snapshot of this generation's upgrade metrics, its own last upgrade
    /// included; see [`Stats`].
    ///
    /// It also takes in what the predecessor sent meanwhile (its commit, its
    /// drain report), so the counters are current without any task awaiting
    /// [`predecessor_exited`](Self::predecessor_exited).
    pub fn stats(&self) -> Stats {
        let _ = self.g.pump();
        self.g.stats()
    }

    /// The state every upgrade streams to its successor, whatever triggers
    /// it — a signal task, the control socket, or a
    /// call of [`upgrade`](Self::upgrade): `source` is called at each
    /// upgrade and its bytes go out with format `version` (see
    /// [`UpgradeOptions::state`], which overrides it for one upgrade).
    /// Setting it again replaces it.
    pub fn set_state_source<F, R>(&self, version: u32, source: F)
    where
        F: Fn() -> R + Send + Sync + 'static,
        R: Read + Send + 'static,
    {
        let f: StateFn = Arc::new(move || (version, Box::new(source()) as Box<dyn Read + Send>));
        *lock(&self.g.state_source) = Some(f);
    }

    /// The state the old generation streams to this one, if it sends one:
    /// its format version and its bytes. Call it once, before
    /// [`ready`](Self::ready); whatever is left unread is discarded by
    /// `ready()`. Check the version and call
    /// [`reject_state`](Self::reject_state) for one this build cannot read.
    pub fn take_state(&self) -> Result<Option<crate::state::StateReader>, Error> {
        self.g.take_state()
    }

    /// Tells the old generation that its state cannot be used: its upgrade
    /// fails with `reason` and it keeps serving; this process is killed.
    pub fn reject_state(&self, reason: &str) -> Result<(), Error> {
        self.g.reject_state(reason)
    }

    /// Tells the old generation why this successor cannot start, before it
    /// gives up (exits): the old generation's upgrade fails with
    /// [`UpgradeError::Failed`] carrying `reason`, which reaches whoever
    /// triggered the upgrade (the `reload` reply, the old generation's log).
    /// `handover` does it itself for the errors it raises while this
    /// generation starts (an inherited socket refused, an unreadable state);
    /// call it for your own (a bad configuration). Only the first reason is
    /// sent. After [`ready`](Self::ready), or without a predecessor, it does
    /// nothing.
    pub fn report_failure(&self, reason: &str) {
        self.g.report_failure(reason);
    }

    /// During its probation (see
    /// [`UpgradeOptions::probation`](crate::UpgradeOptions::probation)), a
    /// successor whose own health check fails reports it with this: the
    /// predecessor takes the service back and keeps serving alone, and its
    /// upgrade fails with `reason`.
    ///
    /// `Ok(true)`: the predecessor took the service back; the state is now
    /// [`State::RolledBack`] and this process must stop accepting, drain and
    /// exit (within the predecessor's drain timeout, or it is killed). The
    /// generation's [`drain`](Self::drain) has started by itself then (as
    /// when the predecessor takes the service back after judging this
    /// generation worse, see [`canary`](crate::canary)), which ends
    /// [`serve::Server`](crate::serve::Server) and
    /// [`serve::Triggers`](crate::serve::Triggers).
    /// `Ok(false)`: too late or pointless — the handover is already
    /// committed, or there is no predecessor; nothing changed.
    ///
    /// Before `ready()` it is an error: a successor that is not healthy
    /// should not report ready at all (exit instead; the upgrade fails).
    /// It blocks for at most 10 s (the predecessor's answer).
    pub fn report_unhealthy(&self, reason: &str) -> Result<bool, Error> {
        self.g.report_unhealthy(reason)
    }

    /// What this generation answers during a probation window, counted for
    /// the canary judgement (see [`canary`](crate::canary)): as the canary,
    /// from `ready()` until its commit; as the old generation, during its
    /// upgrade's window. [`serve::Server`](crate::serve::Server) records
    /// into it by itself; an application that serves otherwise records its
    /// responses here.
    pub fn canary(&self) -> crate::canary::Recorder {
        self.g.canary.clone()
    }

    /// The [`Drain`](crate::Drain) of this generation: the same one on every
    /// call. Unlike [`Drain::new`](crate::Drain::new), it counts in
    /// [`stats`](Self::stats) (`draining`), and when it has waited after a
    /// handover, the duration of the drain goes into the phases of the
    /// upgrade, here and in the successor.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn drain(&self) -> crate::drain::Drain {
        let observer: std::sync::Weak<dyn crate::drain::DrainObserver> = {
            let weak: std::sync::Weak<Generation> = Arc::downgrade(&self.g);
            weak
        };
        lock(&self.g.drain)
            .get_or_insert_with(|| crate::drain::Drain::observed(observer))
            .clone()
    }

    /// The sd_notify client of this process (disabled without
    /// `NOTIFY_SOCKET`): status, watchdog, the fd store. The messages of the
    /// handover itself (`MAINPID=`, `READY=`, `RELOADING=`) are the crate's
    /// alone; the notifier does not offer them.
    pub fn notifier(&self) -> &Notifier {
        &self.g.notifier
    }

    /// A real stop: this generation is the last one, no successor takes
    /// over. Call it on SIGTERM ([`serve::Triggers`](crate::serve::Triggers)
    /// does) instead of only starting the drain.
    ///
    /// From a generation that serves (or is still starting), it moves to
    /// [`State::Stopping`], where no upgrade starts, and at once:
    ///
    /// - tells the service manager `STOPPING=1`, if this generation is the
    ///   main process (not a successor on probation);
    /// - closes this generation's own copies of its fds. A listening socket
    ///   closes when the application's listener does too (the serving layer
    ///   drops it once it has taken the connections already queued): new
    ///   connections are then refused, so a proxy or load balancer fails
    ///   over at once and a restart can bind the port while this process
    ///   still drains. A socket the service manager holds as well (socket
    ///   activation, [`Builder::fd_store`](crate::Builder::fd_store)) stays
    ///   open, and connections queue in it for the next start. A connection
    ///   whose handshake completes in the microseconds between the last
    ///   accept and the close is reset by the kernel, as with any server
    ///   that closes a listening socket (its request was never read: a
    ///   client may safely send it again);
    /// - removes the pid file if it still names this process, its `.lock`
    ///   unless an upgrade holds it, and the control socket's path if the
    ///   socket file there is still this generation's (not in fd-store
    ///   mode, where the next start inherits the socket). From here on no
    ///   generation serves, as after a handover the pid file names the
    ///   successor: so a process that ends before its drain leaves nothing
    ///   behind either. Unix socket paths of the application's are left:
    ///   `unix_listener` replaces a stale one at the next start;
    /// - (feature `tokio`) starts this generation's [`drain`](Self::drain)
    ///   as a stop ([`Drain::start_stop`](crate::Drain::start_stop)):
    ///   [`serve::Server`](crate::serve::Server) takes what is queued, then
    ///   closes its listeners, finishes the requests in flight (their
    ///   responses say `Connection: close`), and closes idle keep-alive
    ///   connections — there is no successor to hand them to; the drain
    ///   timeout bounds the rest.
    ///
    /// Returns the generation's state: [`State::Stopping`] when it stops
    /// (now, or it already was). While an upgrade runs it does nothing and
    /// returns [`State::Upgrading`]: call it again when the upgrade has ended
    /// (or the successor serves, and this generation drains as after any
    /// handover: [`State::HandedOver`], or [`State::RolledBack`] for a
    /// successor taken back; nothing is done then either).
    pub fn stop(&self) -> State {
        let state = self.g.stop();
        #[cfg(feature = "tokio")]
        if state == State::Stopping {
            self.drain().start_stop();
        }
        state
    }

    /// A TCP listener named `name`: the inherited one, or a new one bound to
    /// `addr` (close-on-exec, `SO_REUSEADDR`, and the options of
    /// [`Builder::listen_options`](crate::Builder::listen_options): backlog
    /// 1024 by default).
    ///
    /// An inherited listener must be a listening TCP socket of `addr`'s
    /// family bound to `addr`; when `addr`'s port is 0, any port matches, so
    /// a kernel-chosen port stays the same in every later generation.
    ///
    /// The listener is non-blocking, ready for `tokio::net::TcpListener::from_std`.
    /// `O_NONBLOCK` belongs to the socket, not the fd: it is shared with the
    /// other generation, which must not switch it back.
    pub fn tcp_listener(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<std::net::TcpListener, Error> {
        let addr = one_addr(addr)?;
        let opts = &self.g.config.listen;
        let fd = self.claim(name, Want::TcpListener(addr), || fds::bind_tcp(addr, opts))?;
        Ok(fd.into())
    }

    /// A UDP socket named `name`: the inherited one, or a new one bound to
    /// `addr`. Datagrams queued on an inherited socket are read by this
    /// generation. Non-blocking; see [`tcp_listener`](Self::tcp_listener).
    pub fn udp_socket(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<std::net::UdpSocket, Error> {
        let addr = one_addr(addr)?;
        let opts = &self.g.config.listen;
        let fd = self.claim(name, Want::Udp(addr), || fds::bind_udp(addr, opts))?;
        Ok(fd.into())
    }

    /// A Unix stream listener named `name`: the inherited one, or a new one
    /// bound to `path`. A path starting with `@` names an abstract socket
    /// (as in systemd's `ListenStream=`).
    ///
    /// Before binding a filesystem path, a stale socket file there (nobody
    /// accepting) is removed; a live one, or a file that is not a socket, is
    /// an error. `handover` never unlinks the path of a socket it hands
    /// over: the successor keeps serving on it. Non-blocking; see
    /// [`tcp_listener`](Self::tcp_listener).
    pub fn unix_listener(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<std::os::unix::net::UnixListener, Error> {
        let path = path.as_ref();
        let opts = &self.g.config.listen;
        let fd = self.claim(name, Want::UnixListener(path.to_owned()), || {
            fds::bind_unix(path, Type::STREAM, opts)
        })?;
        Ok(fd.into())
    }

    /// A Unix datagram socket named `name`, bound to `path` (`@` for
    /// abstract); see [`unix_listener`](Self::unix_listener).
    pub fn unix_datagram(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<std::os::unix::net::UnixDatagram, Error> {
        let path = path.as_ref();
        let opts = &self.g.config.listen;
        let fd = self.claim(name, Want::UnixDatagram(path.to_owned()), || {
            fds::bind_unix(path, Type::DGRAM, opts)
        })?;
        Ok(fd.into())
    }

    /// Any other fd, named `name`: the inherited one, or the one `create`
    /// returns (it should be close-on-exec; `handover` makes it so). The
    /// inherited fd is only checked to be open; its mode flags (such as
    /// `O_NONBLOCK`) are left as they are.
    pub fn fd(
        &self,
        name: &str,
        create: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> Result<OwnedFd, Error> {
        self.claim(name, Want::Any, || {
            let fd = create()?;
            sys::set_cloexec(fd.as_fd())?;
            Ok(fd)
        })
    }

    pub(crate) fn claim(
        &self,
        name: &str,
        want: Want,
        create: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> Result<OwnedFd, Error> {
        let claimed = lock(&self.g.registry).claim(name, want, create);
        let (fd, inherited) = self.g.reported(claimed)?;
        tracing::debug!(
            generation = self.g.generation,
            name,
            inherited,
            "fd registered"
        );
        Ok(fd)
    }

    /// Reports that this generation serves: closes inherited fds that were
    /// not claimed, tells the old generation (if any) over the channel, and —
    /// for a first generation — writes the pid file and tells the service
    /// manager.
    ///
    /// It also opens, after the ready message, what this generation's own
    /// upgrades need (the channel, pipes, the lock file, spare fds), so that
    /// an upgrade works later at the fd limit: call it before accepting.
    ///
    /// The ready message also says which connections this generation takes
    /// from its predecessor (feature `tokio`): those of a
    /// [`serve::Server`](crate::serve::Server) made before this call (it
    /// migrates by default), and those of an
    /// [`incoming_connections`](Self::incoming_connections) called before
    /// it. A predecessor told nothing keeps its connections (lame duck)
    /// without waiting for an offer.
    ///
    /// Until this is called, [`upgrade`](Self::upgrade) refuses to run.
    /// Calling it again is a no-op.
    pub fn ready(&self) -> Result<(), Error> {
        #[cfg(feature = "tokio")]
        let takes = crate::migrate::announce(&self.migrate);
        #[cfg(not(feature = "tokio"))]
        let takes: Vec<&str> = Vec::new();
        if !self.g.ready(&takes)? {
            return Ok(());
        }
        // What an upgrade needs is opened now: after the ready message (not
        // while a predecessor waits for it), before the application accepts
        // (which may take every fd slot).
        lock(&self.g.reserve).refill();
        #[cfg(feature = "tokio")]
        match Upgrader::start(self.g.clone()) {
            Ok(u) => {
                let _ = self.upgrader.set(u);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the upgrade thread; upgrades will use tokio's blocking pool")
            }
        }
        Ok(())
    }

    /// Resolves once the predecessor has exited (its end of the channel
    /// closed), or at once if there never was one. Without a timeout: wrap
    /// it in `tokio::time::timeout` for one. Called before
    /// [`ready`](Self::ready), it waits for `ready()` first.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn predecessor_exited(&self) -> Result<(), Error> {
        self.g.wait_channel(|_, closed| closed).await
    }

    /// Resolves once this generation's handover is final: at once for a
    /// first generation; for a successor when its predecessor committed (at
    /// once without probation, else after the window) or exited. Until then
    /// the successor should not act as the only generation;
    /// the control socket's server, for one, accepts only
    /// after it. Called before [`ready`](Self::ready), it waits for
    /// `ready()` first.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn committed(&self) -> Result<(), Error> {
        self.g
            .wait_channel(|g, closed| closed || g.life().committed)
            .await
    }

    /// Upgrades with this generation's options (its builder's, and the
    /// state source), waiting until the successor is ready (and through its
    /// probation window) or the upgrade failed.
    ///
    /// Fork+execs a successor, hands it this generation's registered fds,
    /// and waits until it reports ready. Refused without spawning anything
    /// when this generation is not ready yet, is already upgrading, has
    /// already handed over, is itself on probation, or another process
    /// holds the upgrade lock. On any failure the successor (if one was
    /// started) is killed and reaped, and this generation keeps serving,
    /// untouched.
    ///
    /// On success the pid file names the successor, this generation drops its
    /// own copies of the fds (the application drops its listeners itself),
    /// and the channel stays open until this process exits, so the successor
    /// learns when its predecessor is gone. Under a service manager the
    /// successor is started through an intermediate process, which exits on
    /// success so that the successor is reparented to the manager before it
    /// is named main: under systemd the manager is told `MAINPID=<successor>`
    /// and `READY=1` (see
    /// [`systemd`](crate::systemd)).
    ///
    /// The work runs on a thread of this generation's, started by
    /// [`ready`](Self::ready) so that none is created on the trigger path.
    /// Dropping the future does not cancel the upgrade: it runs to its end,
    /// and [`state`](Self::state) tells how it ended. Keep accepting while it runs: call it from a task
    /// of its own (the one that owns the signal), not from the accept loop.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeError> {
        self.upgrade_with(UpgradeOptions::new()).await
    }

    /// [`upgrade`](Self::upgrade) with options for this upgrade only: what
    /// they set replaces this generation's defaults.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn upgrade_with(&self, opts: UpgradeOptions) -> Result<Upgraded, UpgradeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = match self.upgrader.get() {
            Some(u) => lock(&u.0).send((opts, tx)).map_err(|e| e.0),
            None => Err((opts, tx)),
        };
        if let Err((opts, _)) = sent {
            // No upgrade thread (not ready yet, or it could not start): one
            // from tokio's blocking pool.
            let g = self.g.clone();
            return tokio::task::spawn_blocking(move || run_caught(&g, opts))
                .await
                .unwrap_or_else(|e| {
                    Err(UpgradeError::io("upgrade task", std::io::Error::other(e)))
                });
        }
        rx.await.unwrap_or_else(|_| {
            Err(UpgradeError::io(
                "upgrade task",
                std::io::Error::other("the upgrade thread ended"),
            ))
        })
    }

    /// The blocking form of [`upgrade_with`](Self::upgrade_with) (and of
    /// [`upgrade`](Self::upgrade), with `UpgradeOptions::new()`).
    pub fn upgrade_blocking_with(&self, opts: UpgradeOptions) -> Result<Upgraded, UpgradeError> {
        self.g.upgrade(opts)
    }

    /// After an upgrade committed, the sender that hands established
    /// connections (and later state) to the successor; the same one on every
    /// call. Its deadline is the drain timeout from the first call: what
    /// the successor has not taken by then is closed (state may still go
    /// for 5 s more). See [`ConnectionSender`](crate::ConnectionSender) and
    /// [`MigrateError::NotHandedOver`](crate::migrate::MigrateError::NotHandedOver).
    ///
    /// Needs a tokio runtime, which runs its writer.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn connection_sender(
        &self,
    ) -> Result<crate::ConnectionSender, crate::migrate::MigrateError> {
        crate::migrate::connection_sender(&self.g, &self.migrate)
    }

    /// Hands `connection` with `payload` to the successor through
    /// [`connection_sender`](Self::connection_sender); see
    /// [`ConnectionSender::send`](crate::ConnectionSender::send).
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn send_connection(
        &self,
        connection: impl Into<OwnedFd>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), crate::migrate::SendError> {
        match self.connection_sender() {
            Ok(sender) => sender.send(connection, payload).await,
            Err(error) => Err(crate::migrate::SendError::not_sent(
                error,
                connection.into(),
                payload.into(),
            )),
        }
    }

    /// The connections and state the old generation hands to this one, once
    /// per process. Call it **before** [`ready`](Self::ready): the ready
    /// message tells the old generation that this one takes connections
    /// (called later, only an older predecessor, which does not read that,
    /// offers them). Read it from `ready()` on: the old generation waits
    /// for this generation's offer (made by the first
    /// [`IncomingConnections::recv`](crate::IncomingConnections::recv), after
    /// the commit) at most 5 s before it keeps its connections. For a
    /// process without predecessor it yields nothing.
    ///
    /// A [`serve::Server`](crate::serve::Server) that migrates reads them
    /// itself: it takes this (do not call it then).
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn incoming_connections(
        &self,
    ) -> Result<crate::IncomingConnections, crate::migrate::MigrateError> {
        crate::migrate::incoming(self.g.clone(), &self.migrate, false)
    }

    /// [`incoming_connections`](Self::incoming_connections) for
    /// `serve::Server`, which declared what it takes when it was made.
    #[cfg(feature = "http")]
    pub(crate) fn incoming_for_server(
        &self,
    ) -> Result<crate::IncomingConnections, crate::migrate::MigrateError> {
        crate::migrate::incoming(self.g.clone(), &self.migrate, true)
    }

    /// `serve::Server` takes `kinds` of connections (none: not migrating).
    #[cfg(feature = "http")]
    pub(crate) fn declare_server(&self, kinds: Vec<&'static str>) {
        crate::migrate::declare_server(&self.migrate, kinds);
    }

    /// Whether the committed successor takes connections of `kind`.
    #[cfg(feature = "http")]
    pub(crate) fn successor_takes(&self, kind: &str) -> bool {
        crate::migrate::successor_takes(&self.g, kind)
    }
}
