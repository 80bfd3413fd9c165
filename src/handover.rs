//! [`Builder`] and [`Handover`]: what this generation inherited, the fds it
//! registers, and its readiness.

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::Type;

use crate::env;
use crate::error::Error;
use crate::fds::{self, ListenOptions, Registry, Want};
use crate::pidfile;
use crate::ready;
use crate::spawn;
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
        }
    }
}

impl Builder {
    /// How long a successor may take from spawn to `ready()` before it is
    /// killed and the upgrade fails. Default: 60 s.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long the old generation should drain after a successful upgrade.
    /// `handover` does not enforce it; [`Handover::drain_timeout`] hands it to
    /// the application's drain (see [`Drain`](crate::Drain)). Default: 30 s.
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

    /// The program successors run. Default: the absolute path of the running
    /// binary as captured when [`build`](Self::build) runs — so a deploy that
    /// renames a new binary over that path runs the new version.
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
        let own_pid = std::process::id();
        let notifier = Notifier::from_env()?;
        let inherited = env::decode(|k| std::env::var_os(k), own_pid)?;
        let (fds, channel, generation, state_expected) = match inherited {
            None => (Vec::new(), None, 1, false),
            Some(inh) => {
                if TAKEN.swap(true, Ordering::SeqCst) {
                    return Err(Error::AlreadyTaken);
                }
                let fds = fds::adopt(&inh.fds)?;
                let channel = match inh.channel {
                    Some(raw) => Some(adopt_channel(raw)?),
                    None => None,
                };
                (fds, channel, inh.generation, inh.state)
            }
        };
        let program = match self.program {
            Some(p) => p,
            None => {
                spawn::current_exe().map_err(|e| Error::io("cannot find the running binary", e))?
            }
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
                state_expected,
                state_taken: AtomicBool::new(false),
                state_progress: Arc::default(),
            }),
        })
    }
}

/// Reads what is pending on the channel without blocking; `true` once the
/// peer has closed it.
fn channel_closed(ch: &OwnedFd) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match sys::recv(ch.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
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
    /// A state follows on the channel (HANDOVER_STATE=1).
    pub(crate) state_expected: bool,
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
        crate::state::StateReader::open(ch, self.inner.state_progress.clone())
            .map(Some)
            .map_err(|e| Error::io("reading the state stream header", e))
    }

    /// Tells the old generation that its state cannot be used: its upgrade
    /// fails with `reason` and it keeps serving; this process is killed.
    pub fn reject_state(&self, reason: &str) -> Result<(), Error> {
        let channel = lock(&self.inner.channel);
        let Some(ch) = channel.as_ref() else {
            return Ok(());
        };
        let mut msg = vec![crate::state::MSG_REJECT];
        msg.extend(reason.replace('\n', " ").bytes().take(1000));
        msg.push(b'\n');
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
        let (fd, inherited) = lock(&self.inner.registry).claim(name, want, create)?;
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
            Some(ch) => match ready::send_ready(ch.as_fd()) {
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
        if alone {
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
        let deadline = Instant::now() + timeout;
        let Some(ch) = self.channel_copy()? else {
            return Ok(true);
        };
        loop {
            let rev = sys::poll_until(&[(ch.as_fd(), libc::POLLIN)], deadline)
                .map_err(|e| Error::io("poll on the channel", e))?;
            if rev[0] == 0 {
                return Ok(false);
            }
            if channel_closed(&ch) {
                break;
            }
        }
        lock(&self.inner.channel).take();
        self.claim_pid_file();
        Ok(true)
    }

    /// The async form of [`wait_predecessor_exit`](Self::wait_predecessor_exit),
    /// without a timeout: wrap it in `tokio::time::timeout` for one.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn predecessor_exited(&self) -> Result<(), Error> {
        let Some(ch) = self.channel_copy()? else {
            return Ok(());
        };
        // The channel is a Unix stream socket. tokio needs it non-blocking:
        // the flag is shared with the original fd, which only ever sends the
        // one-byte ready message (before this) with a retry on EINTR.
        let stream = std::os::unix::net::UnixStream::from(ch);
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("making the channel non-blocking", e))?;
        let stream = tokio::net::UnixStream::from_std(stream)
            .map_err(|e| Error::io("registering the channel with tokio", e))?;
        let mut buf = [0u8; 64];
        loop {
            stream
                .readable()
                .await
                .map_err(|e| Error::io("waiting on the channel", e))?;
            match stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        }
        lock(&self.inner.channel).take();
        self.claim_pid_file();
        Ok(())
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
