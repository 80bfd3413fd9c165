//! [`Builder`] and [`Handover`]: what this generation inherited, the fds it
//! registers, and its readiness.

use std::ffi::OsString;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::Type;

use crate::channel::{self, Inbox, Message, Next};
use crate::env;
use crate::error::Error;
use crate::fds::{self, ListenOptions, Registry, Want};
use crate::pidfile;
use crate::stats::{Counters, Stats};
use crate::sys;
use crate::systemd::Notifier;
use crate::upgrade::State;

/// Set once the inherited fds are owned by a `Handover`: they can be owned
/// only once per process.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Configures and builds a [`Handover`].
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    ready_timeout: Duration,
    drain_timeout: Duration,
    pid_file: Option<PathBuf>,
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
    fd_store: bool,
    preflight: Option<Vec<OsString>>,
    probation: Duration,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            ready_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            pid_file: None,
            program: None,
            args: None,
            fd_store: false,
            preflight: None,
            probation: Duration::ZERO,
        }
    }
}

impl Builder {
    /// How long a successor may take from spawn to `ready()` before it is
    /// killed and the upgrade fails. Default: 60 s. At least 1 ms and at
    /// most one day, or [`build`](Self::build) fails with
    /// [`Error::InvalidConfig`].
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long the old generation should drain after a successful upgrade.
    /// `handover` does not enforce it; [`Handover::drain_timeout`] hands it to
    /// the application's drain (see [`Drain`](crate::Drain)). Default: 30 s;
    /// at most one day.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// A pid file naming the serving generation. It is written atomically
    /// (temporary file, then rename): by the first generation when it calls
    /// [`Handover::ready`], and by an old generation with its successor's pid
    /// once the successor is ready. A failed upgrade leaves it unchanged.
    ///
    /// `<path>.lock` is `flock`ed during an upgrade, so that two processes
    /// cannot upgrade one service at once. Default: none.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// The program plain upgrades run. Default: the path this service was
    /// started with (`argv[0]` made absolute, when it names the running
    /// binary; else the running binary), carried on to every successor —
    /// also one started from another program, such as a rollback's. It is
    /// resolved at each upgrade, symlinks followed, so a deploy that renames
    /// a new binary over the path, or switches a symlink on the way to it,
    /// runs the new version; [`Upgraded::program`](crate::Upgraded::program)
    /// names the binary that ran. A relative path is made absolute against
    /// the current directory at [`build`](Self::build).
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// The arguments successors get (without `argv[0]`). Default: this
    /// process's arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Preflight: before every upgrade, run the successor's program with
    /// these arguments (like `nginx -t`) and abort the upgrade, with the
    /// check's output in the error, unless it exits 0 within the ready
    /// timeout. Default: none.
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
    /// unhealthy ([`Handover::report_unhealthy`]) meanwhile. Otherwise the
    /// successor is reaped and this generation carries on alone, having lost
    /// no connection of its own; the upgrade fails with
    /// [`UpgradeError::Probation`](crate::UpgradeError::Probation).
    ///
    /// Only a committed upgrade is a success: the upgrade call returns, the
    /// pid file and the service manager (`MAINPID=`, `READY=1`) name the
    /// successor, and the successor learns that it is final only after the
    /// window. Until then the successor refuses to upgrade itself
    /// ([`UpgradeError::OnProbation`](crate::UpgradeError::OnProbation)).
    /// Default: zero (no probation); at most one day.
    pub fn probation(mut self, window: Duration) -> Self {
        self.probation = window;
        self
    }

    /// FD-store mode: when a first generation (one not started by a
    /// predecessor) calls [`Handover::ready`], it also stores every
    /// registered fd in systemd's fd store under its name (`FDSTORE=1`,
    /// `FDNAME=`), so that even `systemctl restart` — stop, then start —
    /// hands the same sockets to the next start through `LISTEN_FDNAMES`,
    /// and no queued connection is refused. The unit needs
    /// `FileDescriptorStoreMax=` (at least the number of fds). Without
    /// `NOTIFY_SOCKET` it does nothing. Default: off.
    pub fn fd_store(mut self, on: bool) -> Self {
        self.fd_store = on;
        self
    }

    /// Reads what a predecessor or systemd handed to this process and
    /// builds the [`Handover`].
    ///
    /// The `LISTEN_*` variables count only when `LISTEN_PID` names this
    /// process. Each inherited fd is checked to be open and made
    /// close-on-exec at once. Errors name the variable or fd that is wrong.
    pub fn build(self) -> Result<Handover, Error> {
        let settings = [
            ("ready_timeout", self.ready_timeout, false),
            ("drain_timeout", self.drain_timeout, true),
            ("probation", self.probation, true),
        ];
        for (setting, value, zero_ok) in settings {
            crate::clock::check_setting(value, zero_ok)
                .map_err(|reason| Error::InvalidConfig { setting, reason })?;
        }
        let own_pid = std::process::id();
        let notifier = Notifier::from_env()?;
        let inherited = env::decode(|k| std::env::var_os(k), own_pid)?;
        let (fds, channel, generation, state_expected, deploy_path) = match inherited {
            None => (Vec::new(), None, 1, false, None),
            Some(inh) => {
                if TAKEN.swap(true, Ordering::SeqCst) {
                    return Err(Error::AlreadyTaken);
                }
                let channel = match inh.channel {
                    Some(raw) => Some(adopt_channel(raw)?),
                    None => None,
                };
                let fds = match fds::adopt(&inh.fds) {
                    Ok(fds) => fds,
                    Err(e) => {
                        if let Some(ch) = &channel {
                            send_failure(ch.as_fd(), &e.to_string());
                        }
                        return Err(e);
                    }
                };
                (fds, channel, inh.generation, inh.state, inh.program)
            }
        };
        let program = match (self.program, deploy_path) {
            (Some(p), _) if p.is_absolute() => p,
            (Some(p), _) => std::env::current_dir()
                .map_err(|e| Error::io("cannot make the program path absolute", e))?
                .join(p),
            (None, Some(p)) => p,
            (None, None) => crate::program::started_as()
                .map_err(|e| Error::io("cannot find the running binary", e))?,
        };
        let args = self
            .args
            .unwrap_or_else(|| std::env::args_os().skip(1).collect());
        let from_predecessor = channel.is_some();
        tracing::info!(
            generation,
            inherited = fds.len(),
            from_predecessor,
            names = ?fds.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            "handover started"
        );
        Ok(Handover {
            inner: Arc::new(Inner {
                ready_timeout: self.ready_timeout,
                drain_timeout: self.drain_timeout,
                pid_file: self.pid_file,
                program,
                args,
                generation,
                from_predecessor,
                started: Instant::now(),
                started_usec: crate::systemd::monotonic_usec(),
                registry: Mutex::new(Registry::new(fds)),
                state: Mutex::new(State::Starting),
                channel: Mutex::new(channel),
                notifier,
                fd_store: self.fd_store,
                preflight: self.preflight,
                last_upgrade: Mutex::new(None),
                probation: self.probation,
                counters: Mutex::default(),
                link: Mutex::new(Link {
                    committed: !from_predecessor,
                    ..Link::default()
                }),
                successor: Mutex::new(None),
                #[cfg(feature = "tokio")]
                drain: Mutex::new(None),
                #[cfg(feature = "tokio")]
                readied: tokio::sync::Notify::new(),
                #[cfg(feature = "tokio")]
                upgrade_ended: tokio::sync::Notify::new(),
                state_expected,
                state_source: Mutex::new(None),
                failure_sent: AtomicBool::new(false),
                state_taken: AtomicBool::new(false),
                state_progress: Arc::default(),
            }),
        })
    }
}

/// Sends `F<reason>` to the predecessor (best effort: it may be gone).
fn send_failure(channel: std::os::fd::BorrowedFd<'_>, reason: &str) {
    let msg = Message::Failed(reason.to_owned()).encode();
    if let Err(e) = sys::send_all(channel, &msg) {
        tracing::warn!(error = %e, "cannot send the failure reason to the predecessor");
    }
}

fn adopt_channel(raw: RawFd) -> Result<OwnedFd, Error> {
    let name = env::CHANNEL_FD;
    if let Err(e) = sys::fd_flags(raw) {
        return Err(Error::InvalidFd {
            fd: raw,
            name: name.into(),
            reason: format!("not open ({e})"),
        });
    }
    // SAFETY: the fd is open, and the protocol (LISTEN_PID names this process)
    // hands it to us; `TAKEN` makes this run once per process.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    sys::set_cloexec(fd.as_fd())
        .map_err(|e| Error::io("cannot set FD_CLOEXEC on the channel", e))?;
    let mode = sys::file_mode(fd.as_fd()).map_err(|e| Error::io("fstat on the channel", e))?;
    let sock = socket2::SockRef::from(&fd);
    let ok = mode & libc::S_IFMT == libc::S_IFSOCK
        && sock.domain().ok() == Some(socket2::Domain::UNIX)
        && sock.r#type().ok() == Some(Type::STREAM);
    if !ok {
        return Err(Error::InvalidFd {
            fd: raw,
            name: name.into(),
            reason: format!(
                "expected a Unix stream socket, found {}",
                sys::describe_mode(mode)
            ),
        });
    }
    Ok(fd)
}

/// One generation's side of the handover: its inherited and registered fds,
/// its readiness, and its upgrades.
///
/// Cheap to clone; clones share one state. Build one per process with
/// [`Handover::builder`].
#[derive(Debug, Clone)]
pub struct Handover {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) ready_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) generation: u64,
    pub(crate) from_predecessor: bool,
    pub(crate) started: Instant,
    /// `CLOCK_MONOTONIC` at build, in µs (compared with control requests).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) started_usec: u128,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) state: Mutex<State>,
    /// The channel to the predecessor, while it may still be alive.
    pub(crate) channel: Mutex<Option<OwnedFd>>,
    pub(crate) notifier: Notifier,
    pub(crate) fd_store: bool,
    pub(crate) preflight: Option<Vec<OsString>>,
    pub(crate) last_upgrade: Mutex<Option<crate::upgrade::UpgradeRecord>>,
    pub(crate) probation: Duration,
    /// Upgrade counters, inherited from the predecessor at its commit.
    pub(crate) counters: Mutex<Counters>,
    /// What the predecessor told this generation after it was ready.
    pub(crate) link: Mutex<Link>,
    /// After a handover: the channel to the successor, open until this
    /// process exits.
    pub(crate) successor: Mutex<Option<OwnedFd>>,
    /// The drain from [`Handover::drain`], counted in [`Handover::stats`].
    #[cfg(feature = "tokio")]
    pub(crate) drain: Mutex<Option<crate::drain::Drain>>,
    /// Woken when `ready()` has run: the channel carries messages from then on.
    #[cfg(feature = "tokio")]
    pub(crate) readied: tokio::sync::Notify,
    /// Woken when an upgrade attempt ends, whatever triggered it.
    #[cfg(feature = "tokio")]
    pub(crate) upgrade_ended: tokio::sync::Notify,
    /// A state follows on the channel (HANDOVER_STATE=1).
    pub(crate) state_expected: bool,
    /// What every upgrade streams to its successor, unless its options say
    /// otherwise ([`Handover::set_state_source`]).
    pub(crate) state_source: Mutex<Option<StateFn>>,
    /// A failure reason was sent to the predecessor: one is enough.
    pub(crate) failure_sent: AtomicBool,
    pub(crate) state_taken: AtomicBool,
    pub(crate) state_progress: Arc<Mutex<crate::state::Progress>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("generation", &self.generation)
            .field("program", &self.program)
            .field("state", &*lock(&self.state))
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The application's drain ended: after a handover, record its duration
    /// as the drain phase of that upgrade, and tell the successor.
    #[cfg(feature = "tokio")]
    pub(crate) fn drained(&self, report: &crate::drain::DrainReport) {
        if *lock(&self.state) != State::HandedOver {
            return; // a stop, not the end of an upgrade
        }
        let span = crate::stats::upgrade_span(self.generation);
        let _e = span.enter();
        {
            let mut c = lock(&self.counters);
            let phases = c.last.get_or_insert_with(Default::default);
            crate::stats::record(phases, "drain", report.elapsed);
        }
        if let Some(ch) = lock(&self.successor).as_ref() {
            let msg = Message::Drained(report.elapsed).encode();
            // The successor may be gone or busy; this is only a report.
            let _ = sys::send_all(ch.as_fd(), &msg);
        }
    }
}

/// Makes the state for one upgrade.
pub(crate) type StateFn = Arc<dyn Fn() -> crate::upgrade::StateStream + Send + Sync>;

/// The successor's view of the channel after it reported ready.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// The predecessor committed the handover, or is gone; always for a
    /// first generation.
    pub(crate) committed: bool,
    /// When the commit arrived.
    committed_at: Option<Instant>,
    /// The predecessor took the service back after `report_unhealthy`.
    rolled_back: bool,
    /// What the predecessor sent and was not handled yet.
    inbox: Inbox,
}

/// Locks a mutex, recovering from poisoning: every critical section here
/// leaves the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// This process's generation: 1 for the first, then counting up by one
    /// per successful upgrade.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Whether this process was started by an old generation (and so reports
    /// readiness to it).
    pub fn from_predecessor(&self) -> bool {
        self.inner.from_predecessor
    }

    /// The drain timeout configured with [`Builder::drain_timeout`].
    pub fn drain_timeout(&self) -> Duration {
        self.inner.drain_timeout
    }

    /// Once the predecessor is gone, this generation serves: make sure the
    /// pid file says so, even if the predecessor died before writing it.
    fn claim_pid_file(&self) {
        let Some(path) = &self.inner.pid_file else {
            return;
        };
        // Held across the write: no upgrade can start (and write the file
        // with its successor's pid) meanwhile.
        let state = lock(&self.inner.state);
        if !matches!(*state, State::Serving) {
            return;
        }
        let me = std::process::id();
        if pidfile::read(path).ok() != Some(me) {
            if let Err(e) = pidfile::write(path, me) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the pid file");
            }
        }
    }

    /// The state every upgrade streams to its successor, whatever triggers
    /// it — a signal task, [`control::serve`](crate::control::serve), or a
    /// call of [`upgrade`](Self::upgrade_blocking): `source` is called at
    /// each upgrade and its bytes go out with format `version` (see
    /// [`UpgradeOptions::state`](crate::UpgradeOptions::state), which
    /// overrides it for one upgrade). Setting it again replaces it.
    pub fn set_state_source<F, R>(&self, version: u32, source: F)
    where
        F: Fn() -> R + Send + Sync + 'static,
        R: Read + Send + 'static,
    {
        let f: StateFn = Arc::new(move || (version, Box::new(source()) as Box<dyn Read + Send>));
        *lock(&self.inner.state_source) = Some(f);
    }

    /// Tells the old generation why this successor cannot start, before it
    /// gives up (exits): the old generation's upgrade fails with
    /// [`UpgradeError::Failed`](crate::UpgradeError::Failed) carrying
    /// `reason`, which reaches whoever triggered the upgrade (the `reload`
    /// reply, the old generation's log). `handover` does it itself for the
    /// errors it raises while this generation starts (an inherited socket
    /// refused, an unreadable state); call it for your own (a bad
    /// configuration). Only the first reason is sent. After
    /// [`ready`](Self::ready), or without a predecessor, it does nothing.
    pub fn report_failure(&self, reason: &str) {
        if self.state() != State::Starting || self.inner.failure_sent.swap(true, Ordering::SeqCst) {
            return;
        }
        let channel = lock(&self.inner.channel);
        let Some(ch) = channel.as_ref() else {
            return;
        };
        send_failure(ch.as_fd(), reason);
    }

    /// Passes `result` through, reporting its error to the predecessor
    /// first (see [`report_failure`](Self::report_failure)).
    pub(crate) fn reported<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            self.report_failure(&e.to_string());
        }
        result
    }

    /// The state the old generation streams to this one, if it sends one:
    /// its format version and its bytes. Call it once, before
    /// [`ready`](Self::ready); whatever is left unread is discarded by
    /// `ready()`. Check the version and call
    /// [`reject_state`](Self::reject_state) for one this build cannot read.
    pub fn take_state(&self) -> Result<Option<crate::state::StateReader>, Error> {
        if !self.inner.state_expected || self.inner.state_taken.swap(true, Ordering::SeqCst) {
            return Ok(None);
        }
        let Some(ch) = self.channel_copy()? else {
            return Ok(None);
        };
        crate::state::set_timeout(ch.as_fd(), libc::SO_RCVTIMEO, self.inner.ready_timeout)
            .map_err(|e| Error::io("setting the state stream timeout", e))?;
        let opened = crate::state::StateReader::open(ch, self.inner.state_progress.clone())
            .map(Some)
            .map_err(|e| Error::io("reading the state stream header", e));
        self.reported(opened)
    }

    /// Tells the old generation that its state cannot be used: its upgrade
    /// fails with `reason` and it keeps serving; this process is killed.
    pub fn reject_state(&self, reason: &str) -> Result<(), Error> {
        let channel = lock(&self.inner.channel);
        let Some(ch) = channel.as_ref() else {
            return Ok(());
        };
        let msg = Message::StateRejected(reason.to_owned()).encode();
        sys::send_all(ch.as_fd(), &msg).map_err(|e| Error::io("cannot send the rejection", e))
    }

    /// Reads and discards what is left of the state stream.
    fn drain_state(&self) -> Result<(), Error> {
        if !self.inner.state_expected {
            return Ok(());
        }
        let reader = self.take_state()?;
        if lock(&self.inner.state_progress).done {
            return Ok(());
        }
        let fd = match reader {
            Some(r) => r.into_fd(),
            None => match self.channel_copy()? {
                Some(fd) => fd,
                None => return Ok(()),
            },
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut progress = lock(&self.inner.state_progress);
        while crate::state::read_chunked(fd.as_fd(), &mut progress, &mut buf)
            .map_err(|e| Error::io("discarding the unread state", e))?
            > 0
        {}
        Ok(())
    }

    /// Reads what the predecessor sent since this generation reported ready
    /// (its commit, its drain report), without blocking. `Ok(true)` once the
    /// predecessor is gone (or there never was one). Must not run before
    /// `ready()`: until then the channel carries the state stream.
    pub(crate) fn pump_channel(&self) -> std::io::Result<bool> {
        let mut closed = false;
        // (ready() locks the state, then the channel: never the other way.)
        if *lock(&self.inner.state) == State::Starting {
            return Ok(lock(&self.inner.channel).is_none());
        }
        {
            let mut channel = lock(&self.inner.channel);
            let Some(ch) = channel.as_ref() else {
                return Ok(true);
            };
            let mut buf = [0u8; 512];
            let mut link = lock(&self.inner.link);
            loop {
                match sys::recv(ch.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                    Ok(0) => closed = true,
                    Ok(n) => {
                        link.inbox.push(&buf[..n]);
                        self.take_messages(&mut link);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                break;
            }
            if closed {
                channel.take();
                if let Some(at) = link.committed_at {
                    let span = crate::stats::upgrade_span(self.inner.generation - 1);
                    let _e = span.enter();
                    let mut c = lock(&self.inner.counters);
                    let phases = c.last.get_or_insert_with(Default::default);
                    crate::stats::record(phases, "exit", at.elapsed());
                }
                // Gone without committing: this generation serves alone
                // (unless it handed the service back).
                link.committed = !link.rolled_back;
            }
        }
        if closed {
            self.claim_pid_file();
        }
        Ok(closed)
    }

    /// Handles the complete messages in `link.inbox`.
    fn take_messages(&self, link: &mut Link) {
        loop {
            let kind = link.inbox.peek_kind();
            match link.inbox.next() {
                Next::Incomplete => return,
                Next::Message(Message::Commit(mut c)) => {
                    let mut mine = lock(&self.inner.counters);
                    // Attempts of our own (refused on probation) come on top.
                    c.failed += mine.failed;
                    *mine = c;
                    drop(mine);
                    self.mark_committed(link);
                }
                Next::Message(Message::TakenBack) => link.rolled_back = true,
                Next::Message(Message::Drained(d)) => {
                    let mut mine = lock(&self.inner.counters);
                    mine.last.get_or_insert_with(Default::default).drain = Some(d);
                }
                Next::Message(other) => {
                    tracing::warn!(message = ?other, "a successor's message from the predecessor; ignored");
                }
                Next::Unknown(kind) => {
                    tracing::debug!(kind = %(kind as char), "a message of a newer version from the predecessor; skipped");
                }
                Next::Bad(e) => {
                    tracing::warn!(error = %e, "unreadable message from the predecessor; ignored");
                    // A commit that cannot be read still commits: the
                    // predecessor only sends one when the handover is final.
                    if kind == Some(channel::COMMIT) {
                        self.mark_committed(link);
                    }
                }
            }
        }
    }

    /// The predecessor committed: this generation's handover is final.
    fn mark_committed(&self, link: &mut Link) {
        link.committed = true;
        link.committed_at = Some(Instant::now());
        tracing::info!(
            generation = self.inner.generation,
            "predecessor committed the handover"
        );
    }

    /// A snapshot of this generation's upgrade metrics; see [`Stats`].
    ///
    /// It also takes in what the predecessor sent meanwhile (its commit, its
    /// drain report), so the counters are current without any task awaiting
    /// [`predecessor_exited`](Self::predecessor_exited).
    pub fn stats(&self) -> Stats {
        let _ = self.pump_channel();
        let c = lock(&self.inner.counters).clone();
        let committed = lock(&self.inner.link).committed;
        #[cfg(feature = "tokio")]
        let draining = match &*lock(&self.inner.drain) {
            Some(d) if d.is_draining() => d.in_flight(),
            _ => 0,
        };
        #[cfg(not(feature = "tokio"))]
        let draining = 0;
        Stats {
            generation: self.inner.generation,
            state: self.state(),
            committed,
            upgrades_succeeded: c.succeeded,
            upgrades_failed: c.failed,
            last_error: c.last_error,
            last_phases: c.last,
            draining,
        }
    }

    /// The [`Drain`](crate::Drain) of this generation: the same one on every
    /// call. Unlike [`Drain::new`](crate::Drain::new), it counts in
    /// [`stats`](Self::stats) (`draining`), and when it has waited after a
    /// handover, the duration of the drain goes into the phases of the
    /// upgrade, here and in the successor.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn drain(&self) -> crate::drain::Drain {
        lock(&self.inner.drain)
            .get_or_insert_with(|| crate::drain::Drain::linked(Arc::downgrade(&self.inner)))
            .clone()
    }

    /// During its probation (see [`Builder::probation`]), a successor whose
    /// own health check fails reports it with this: the predecessor takes
    /// the service back and keeps serving alone, and its upgrade fails with
    /// `reason`.
    ///
    /// `Ok(true)`: the predecessor took the service back; the state is now
    /// [`State::RolledBack`] and this process must stop accepting, drain and
    /// exit (within the predecessor's drain timeout, or it is killed).
    /// `Ok(false)`: too late or pointless — the handover is already
    /// committed, or there is no predecessor; nothing changed.
    ///
    /// Before `ready()` it is an error: a successor that is not healthy
    /// should not report ready at all (exit instead; the upgrade fails).
    pub fn report_unhealthy(&self, reason: &str) -> Result<bool, Error> {
        if self.state() == State::Starting {
            return Err(Error::io(
                "report_unhealthy before ready()",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "exit instead: a successor that never reports ready fails the upgrade",
                ),
            ));
        }
        let _ = self.pump_channel();
        if lock(&self.inner.link).committed {
            return Ok(false);
        }
        let Some(ch) = self.channel_copy()? else {
            return Ok(false);
        };
        let msg = Message::Unhealthy(reason.to_owned()).encode();
        if let Err(e) = sys::send_all(ch.as_fd(), &msg) {
            if e.raw_os_error() == Some(libc::EPIPE) {
                return Ok(false); // gone: serving alone
            }
            return Err(Error::io("cannot report unhealthy to the predecessor", e));
        }
        // The answer: taken back, or committed just before (a race), or the
        // predecessor is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let closed = self
                .pump_channel()
                .map_err(|e| Error::io("reading the channel", e))?;
            {
                let link = lock(&self.inner.link);
                if link.rolled_back {
                    drop(link);
                    *lock(&self.inner.state) = State::RolledBack;
                    tracing::warn!(generation = self.inner.generation, %reason, "reported unhealthy; the predecessor took the service back");
                    return Ok(true);
                }
                if link.committed || closed {
                    return Ok(false);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    "no answer from the predecessor to the unhealthy report",
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            // Another task (awaiting `predecessor_exited`) may take in the
            // answer first: look again at least every 10 ms.
            let slice = deadline.min(Instant::now() + Duration::from_millis(10));
            sys::poll_until(&[(ch.as_fd(), libc::POLLIN)], slice)
                .map_err(|e| Error::io("poll on the channel", e))?;
        }
    }

    /// The sd_notify client of this process (disabled without `NOTIFY_SOCKET`).
    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    /// Tells the service manager that the whole service is stopping
    /// (`STOPPING=1`). Call it on a real stop (SIGTERM), never while draining
    /// after a handover: systemd would stop the unit the successor serves.
    pub fn stopping(&self) -> std::io::Result<()> {
        self.inner.notifier.stopping()
    }

    /// The names of the fds this generation will hand to a successor.
    pub fn names(&self) -> Vec<String> {
        lock(&self.inner.registry).names()
    }

    /// A TCP listener named `name`: the inherited one, or a new one bound to
    /// `addr` (close-on-exec, `SO_REUSEADDR`, backlog 1024).
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
        self.tcp_listener_with(name, addr, &ListenOptions::default())
    }

    /// [`tcp_listener`](Self::tcp_listener) with options for a new socket.
    pub fn tcp_listener_with(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
        opts: &ListenOptions,
    ) -> Result<std::net::TcpListener, Error> {
        let addr = one_addr(addr)?;
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
        self.udp_socket_with(name, addr, &ListenOptions::default())
    }

    /// [`udp_socket`](Self::udp_socket) with options for a new socket.
    pub fn udp_socket_with(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
        opts: &ListenOptions,
    ) -> Result<std::net::UdpSocket, Error> {
        let addr = one_addr(addr)?;
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
        let opts = ListenOptions::default();
        let fd = self.claim(name, Want::UnixListener(path.to_owned()), || {
            fds::bind_unix(path, Type::STREAM, &opts)
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
        let opts = ListenOptions::default();
        let fd = self.claim(name, Want::UnixDatagram(path.to_owned()), || {
            fds::bind_unix(path, Type::DGRAM, &opts)
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
        let claimed = lock(&self.inner.registry).claim(name, want, create);
        let (fd, inherited) = self.reported(claimed)?;
        tracing::debug!(
            generation = self.inner.generation,
            name,
            inherited,
            "fd registered"
        );
        Ok(fd)
    }

    /// Reports that this generation serves: closes inherited fds that were
    /// not claimed, tells the old generation (if any) over the readiness
    /// channel, and — for a first generation — writes the pid file.
    ///
    /// Until this is called, [`upgrade`](Self::upgrade_blocking) refuses to
    /// run. Calling it again is a no-op.
    pub fn ready(&self) -> Result<(), Error> {
        let mut alone = false;
        let mut state = lock(&self.inner.state);
        if *state != State::Starting {
            return Ok(());
        }
        let unclaimed = lock(&self.inner.registry).close_unclaimed();
        if !unclaimed.is_empty() {
            tracing::warn!(generation = self.inner.generation, names = ?unclaimed, "closed inherited fds nobody claimed");
        }
        self.drain_state()?;
        let channel = lock(&self.inner.channel);
        match channel.as_ref() {
            Some(ch) => match sys::send_all(ch.as_fd(), &Message::Ready.encode()) {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EPIPE)
                        || e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    tracing::warn!(
                        generation = self.inner.generation,
                        "predecessor is gone; serving alone"
                    );
                    alone = true;
                }
                Err(e) => return Err(Error::io("cannot report ready to the predecessor", e)),
            },
            None => {
                if let Some(path) = &self.inner.pid_file {
                    pidfile::write(path, std::process::id()).map_err(|e| {
                        Error::io(format!("cannot write pid file {}", path.display()), e)
                    })?;
                }
                // A successor is not the main process yet: its old generation
                // tells systemd on its behalf (MAINPID=, READY=1).
                let n = &self.inner.notifier;
                if self.inner.fd_store {
                    let registry = lock(&self.inner.registry);
                    for (name, fd) in registry.handed() {
                        n.fd_store(name, &[fd]).map_err(|e| {
                            Error::io(format!("cannot store fd {name:?} in the fd store"), e)
                        })?;
                    }
                }
                let msg = format!(
                    "READY=1\nSTATUS=serving (generation {})",
                    self.inner.generation
                );
                n.notify(&msg)
                    .map_err(|e| Error::io("cannot notify the service manager", e))?;
            }
        }
        *state = State::Serving;
        drop(channel);
        drop(state);
        #[cfg(feature = "tokio")]
        self.inner.readied.notify_waiters();
        if alone {
            lock(&self.inner.channel).take();
            lock(&self.inner.link).committed = true;
            self.claim_pid_file();
        }
        tracing::info!(
            generation = self.inner.generation,
            since_start_ms = self.inner.started.elapsed().as_secs_f64() * 1e3,
            "ready"
        );
        Ok(())
    }

    /// Waits until the predecessor has exited (its end of the channel
    /// closed), at most `timeout`. `true` if it has, or if there never was
    /// one. Call it after [`ready`](Self::ready).
    pub fn wait_predecessor_exit(&self, timeout: Duration) -> Result<bool, Error> {
        let deadline = crate::clock::after(timeout);
        let Some(ch) = self.channel_copy()? else {
            return Ok(true);
        };
        loop {
            if self
                .pump_channel()
                .map_err(|e| Error::io("reading the channel", e))?
            {
                return Ok(true);
            }
            let rev = sys::poll_until(&[(ch.as_fd(), libc::POLLIN)], deadline)
                .map_err(|e| Error::io("poll on the channel", e))?;
            if rev[0] == 0 {
                return Ok(false);
            }
        }
    }

    /// The async form of [`wait_predecessor_exit`](Self::wait_predecessor_exit),
    /// without a timeout: wrap it in `tokio::time::timeout` for one. Called
    /// before [`ready`](Self::ready), it waits for `ready()` first.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn predecessor_exited(&self) -> Result<(), Error> {
        self.await_channel(|_, closed| closed).await
    }

    /// Resolves once this generation's handover is final: at once for a
    /// first generation; for a successor when its predecessor committed (at
    /// once without probation, else after the window) or exited. Call it
    /// after [`ready`](Self::ready). Until then the successor should not act
    /// as the only generation; [`control::serve`](crate::control::serve),
    /// for one, accepts only after it. Called before `ready()`, it waits for
    /// `ready()` first.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn committed(&self) -> Result<(), Error> {
        self.await_channel(|h, closed| closed || lock(&h.inner.link).committed)
            .await
    }

    /// Takes in the predecessor's messages as they come until `done`
    /// (given whether the channel closed) holds.
    #[cfg(feature = "tokio")]
    async fn await_channel(&self, done: impl Fn(&Self, bool) -> bool) -> Result<(), Error> {
        // Before ready() the channel carries the state stream, read with
        // blocking calls: leave it alone (and blocking) until then.
        loop {
            let readied = self.inner.readied.notified();
            if self.state() != State::Starting {
                break;
            }
            readied.await;
        }
        let pumped = self
            .pump_channel()
            .map_err(|e| Error::io("reading the channel", e))?;
        if done(self, pumped) {
            return Ok(());
        }
        let Some(ch) = self.channel_copy()? else {
            return Ok(());
        };
        // The channel is a Unix stream socket. tokio needs it non-blocking:
        // the flag is shared with the original fd, whose every read and
        // write here uses MSG_DONTWAIT or polls first, and retries EINTR.
        let stream = std::os::unix::net::UnixStream::from(ch);
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("making the channel non-blocking", e))?;
        let stream = tokio::net::UnixStream::from_std(stream)
            .map_err(|e| Error::io("registering the channel with tokio", e))?;
        loop {
            stream
                .readable()
                .await
                .map_err(|e| Error::io("waiting on the channel", e))?;
            // Read through pump_channel; a WouldBlock from it clears tokio's
            // readiness so that the next `readable()` waits.
            let pumped = stream.try_io(tokio::io::Interest::READABLE, || {
                let closed = self.pump_channel()?;
                match done(self, closed) {
                    true => Ok(()),
                    false => Err(std::io::ErrorKind::WouldBlock.into()),
                }
            });
            match pumped {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::io("reading the channel", e)),
            }
        }
    }

    /// A copy of the channel to the predecessor, so that waiting on it holds
    /// no lock.
    fn channel_copy(&self) -> Result<Option<OwnedFd>, Error> {
        let channel = lock(&self.inner.channel);
        match channel.as_ref() {
            None => Ok(None),
            Some(ch) => ch
                .try_clone()
                .map(Some)
                .map_err(|e| Error::io("duplicating the channel", e)),
        }
    }
}
