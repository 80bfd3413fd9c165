//! [`Builder`]: a generation's configuration, and `build()`, which reads
//! what a predecessor or systemd handed to this process.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::Type;

use crate::env;
use crate::error::Error;
use crate::fds::{self, Registry};
use crate::handover::Handover;
use crate::lifecycle::{Birth, Config, Generation};
use crate::successor::send_failure;
use crate::sys;
use crate::systemd::Notifier;
use crate::upgrade::UpgradeOptions;

impl Handover {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

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
    fd_store: bool,
    defaults: UpgradeOptions,
    take_over: Option<PathBuf>,
    listen: crate::fds::ListenOptions,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            ready_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            pid_file: None,
            fd_store: false,
            defaults: UpgradeOptions::new(),
            take_over: None,
            listen: crate::fds::ListenOptions::default(),
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
    /// — written while the successor starts, renamed into place at the
    /// commit. A failed upgrade leaves it unchanged.
    ///
    /// `<path>.lock` is `flock`ed during an upgrade, so that two processes
    /// cannot upgrade one service at once. Default: none.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// The options of every upgrade of this generation and its successors'
    /// defaults: the program, its arguments, a preflight check, a probation
    /// window (see [`UpgradeOptions`], whose setters document each). An
    /// upgrade may override any of them for itself
    /// ([`Handover::upgrade_with`]). A state streams once, so it is not a
    /// default: give every upgrade one with
    /// [`Handover::set_state_source`]. Default: [`UpgradeOptions::new`].
    pub fn upgrade_options(mut self, defaults: UpgradeOptions) -> Self {
        self.defaults = defaults;
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

    /// The options of every socket this generation binds itself
    /// ([`Handover::tcp_listener`], `udp_socket`, `unix_listener`,
    /// `unix_datagram`): the backlog, `SO_REUSEPORT`, `IPV6_V6ONLY`. An
    /// inherited socket keeps its own. Default: [`ListenOptions::default`](crate::ListenOptions).
    pub fn listen_options(mut self, options: crate::ListenOptions) -> Self {
        self.listen = options;
        self
    }

    /// Takes the service over from the generation serving the control socket
    /// at `path` — a process this one was not started by (another container,
    /// the other unit of a blue/green pair, a new build started by hand) —
    /// as a successor it had started would: [`build`](Self::build) asks it
    /// for its named fds (the control socket among them), its state and its
    /// counters; then [`Handover::ready`] commits the takeover (after the
    /// old generation's probation window, if it has one), and the old
    /// generation drains and exits. The old generation must allow it
    /// ([`control::ControlSocket::allow_takeover`](crate::control::ControlSocket::allow_takeover)).
    ///
    /// Nobody at `path` (no socket, or nobody accepting): this process
    /// starts as a first generation. A refusal (takeover not allowed,
    /// another upgrade running, a uid not allowed) is
    /// [`Error::TakeOver`] from `build()`, and the old generation serves
    /// on. Ignored in a process started by its predecessor or by systemd
    /// with fds (`LISTEN_PID` naming it): a later upgrade of the process
    /// that took over starts with the same arguments, and must not take
    /// over again. Default: none.
    pub fn take_over(mut self, path: impl Into<PathBuf>) -> Self {
        self.take_over = Some(path.into());
        self
    }

    /// Reads what a predecessor or systemd handed to this process and
    /// builds the [`Handover`].
    ///
    /// The `LISTEN_*` variables count only when `LISTEN_PID` names this
    /// process. Each inherited fd is checked to be open and made
    /// close-on-exec at once. Errors name the variable or fd that is wrong.
    ///
    /// A `NOTIFY_SOCKET` or `WATCHDOG_USEC` that cannot be used is no
    /// error: it is logged as a warning and ignored (see
    /// [`systemd`](crate::systemd)).
    pub fn build(self) -> Result<Handover, Error> {
        let d = self.defaults;
        if d.state.is_some() {
            return Err(Error::InvalidConfig {
                setting: "upgrade_options",
                reason: "a state streams once, so it cannot be a default: use \
                         Handover::set_state_source"
                    .to_owned(),
            });
        }
        let probation = d.probation.unwrap_or(Duration::ZERO);
        let canary = d.canary.unwrap_or_default();
        canary
            .validate()
            .map_err(|(setting, reason)| Error::InvalidConfig { setting, reason })?;
        let settings = [
            ("ready_timeout", self.ready_timeout, false),
            ("drain_timeout", self.drain_timeout, true),
            ("probation", probation, true),
        ];
        for (setting, value, zero_ok) in settings {
            crate::clock::check_setting(value, zero_ok)
                .map_err(|reason| Error::InvalidConfig { setting, reason })?;
        }
        let own_pid = std::process::id();
        // A stale NOTIFY_SOCKET is warned about, never fatal.
        let notifier = Notifier::from_env_or_warn();
        let inherited = env::decode(|k| std::env::var_os(k), own_pid)?;
        let offer = match (&inherited, &self.take_over) {
            (None, Some(path)) => {
                if TAKEN.swap(true, Ordering::SeqCst) {
                    return Err(Error::AlreadyTaken);
                }
                crate::takeover::request(path)?
            }
            _ => None,
        };
        let took_over = match (&offer, &self.take_over) {
            (Some(o), Some(path)) => Some(crate::lifecycle::TookOver {
                path: path.clone(),
                seen_as: o.header.pid,
            }),
            _ => None,
        };
        let protocol = match (&inherited, &offer) {
            (Some(inh), _) => inh.protocol,
            (None, Some(o)) => o.header.protocol,
            (None, None) => crate::channel::VERSION,
        };
        let (mut fds, channel, generation, state_expected, deploy_path, started_usec, counters) =
            match inherited {
                None => match offer {
                    None => (Vec::new(), None, 1, false, None, None, None),
                    Some(o) => (
                        o.fds,
                        Some(o.channel),
                        o.header.generation,
                        o.header.state,
                        None,
                        Some(o.header.started_us),
                        Some(o.header.counters),
                    ),
                },
                Some(inh) => {
                    if TAKEN.swap(true, Ordering::SeqCst) {
                        return Err(Error::AlreadyTaken);
                    }
                    let channel = match inh.channel {
                        Some(raw) => Some(adopt_channel(raw)?),
                        None => None,
                    };
                    let fds = match fds::adopt(inh.fds) {
                        Ok(fds) => fds,
                        Err(e) => {
                            if let Some(ch) = &channel {
                                send_failure(ch.as_fd(), &e.to_string());
                            }
                            return Err(e);
                        }
                    };
                    (
                        fds,
                        channel,
                        inh.generation,
                        inh.state,
                        inh.program,
                        inh.started_us,
                        inh.counters,
                    )
                }
            };
        let program = match (d.program, deploy_path) {
            (Some(p), _) if p.is_absolute() => p,
            (Some(p), _) => std::env::current_dir()
                .map_err(|e| Error::io("cannot make the program path absolute", e))?
                .join(p),
            (None, Some(p)) => p,
            (None, None) => crate::program::started_as()
                .map_err(|e| Error::io("cannot find the running binary", e))?,
        };
        let args = d
            .args
            .unwrap_or_else(|| std::env::args_os().skip(1).collect());
        // The crate's own secrets are not the application's fds: read and
        // closed here, before the application builds anything from them.
        let secrets = crate::secrets::Secrets::take_from(&mut fds);
        let from_predecessor = channel.is_some();
        tracing::debug!(
            generation,
            inherited = fds.len(),
            from_predecessor,
            names = ?fds.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            "handover started"
        );
        Ok(Handover::from_generation(Generation::new(Birth {
            config: Config {
                ready_timeout: self.ready_timeout,
                drain_timeout: self.drain_timeout,
                pid_file: self.pid_file,
                program,
                args,
                preflight: d.preflight,
                probation,
                canary,
                fd_store: self.fd_store,
                listen: self.listen,
            },
            generation,
            notifier,
            registry: Registry::new(fds),
            predecessor: channel,
            state_expected,
            started_usec,
            took_over,
            predecessor_protocol: protocol,
            secrets,
            counters: counters
                .map(|(succeeded, failed)| crate::stats::Counters {
                    succeeded,
                    failed,
                    ..Default::default()
                })
                .unwrap_or_default(),
        })))
    }
}

fn adopt_channel(raw: RawFd) -> Result<OwnedFd, Error> {
    let name = env::CHANNEL_FD;
    if let Err(e) = sys::mark_cloexec_raw(raw) {
        return Err(Error::InvalidFd {
            fd: raw,
            name: name.into(),
            reason: format!("not open ({e})"),
        });
    }
    // SAFETY: the fd is open (F_SETFD succeeded), and the protocol
    // (LISTEN_PID names this process) hands it to us; `TAKEN` makes this run
    // once per process, so nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
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
