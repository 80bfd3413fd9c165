//! The sd_notify protocol ([sd_notify(3)]), without touching the environment.
//!
//! [`Notifier`] sends datagrams to the socket named by `NOTIFY_SOCKET` (a
//! path, or `@name` for the abstract namespace). With no `NOTIFY_SOCKET` it
//! is disabled and every call is a silent no-op, so the same code runs under
//! systemd and outside it.
//!
//! A notification is never worth an outage. A `NOTIFY_SOCKET` left over in
//! the environment (a shell started inside a unit, a container image) may
//! name a path nobody listens on, a regular file, an unbound abstract name,
//! or something that is no address at all: the messages `handover` sends
//! itself (`READY=1`, `RELOADING=1`, `MAINPID=`, `STOPPING=1`, the fd store,
//! `BARRIER=1`) are sent best effort. The first failure is logged as a
//! warning, later ones at debug level; a value that cannot be parsed is
//! warned about once at [`Builder::build`](crate::Builder::build) and
//! disables the notifier. A manager that accepts messages but never answers
//! `BARRIER=1` costs each upgrade the barrier's timeout (5 s), warned about
//! once.
//!
//! [sd_notify(3)]: https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr};
use socket2::{Domain, Socket, Type};

use crate::error::Error;
use crate::sys;

/// The variable naming the notification socket.
pub(crate) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog interval in microseconds.
pub(crate) const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The pid the watchdog interval is meant for.
pub(crate) const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// The most fds one notification may carry (systemd's `SCM_MAX_FD` is 253).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// A client of the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixAddr, Socket)>,
    watchdog: Option<Duration>,
    /// A message of the crate's own failed to go out, and was warned about:
    /// later failures are logged at debug level.
    send_warned: AtomicBool,
    /// A barrier timed out, and was warned about.
    barrier_warned: AtomicBool,
}

impl Notifier {
    fn new(target: Option<(UnixAddr, Socket)>, watchdog: Option<Duration>) -> Notifier {
        Notifier {
            target,
            watchdog,
            send_warned: AtomicBool::new(false),
            barrier_warned: AtomicBool::new(false),
        }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` of this
    /// process for a generation: an unset `NOTIFY_SOCKET` gives a disabled
    /// notifier, and what cannot be used is warned about, not fatal. An unusable `NOTIFY_SOCKET` disables the
    /// notifier; an unusable `WATCHDOG_USEC` disables the watchdog.
    pub(crate) fn from_env_or_warn() -> Notifier {
        Notifier::from_getter_or_warn(|k| std::env::var_os(k), std::process::id())
    }

    pub(crate) fn from_getter_or_warn(
        get: impl Fn(&str) -> Option<OsString>,
        own_pid: u32,
    ) -> Notifier {
        let watchdog = watchdog_interval(&get, own_pid).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring WATCHDOG_USEC: no watchdog pings");
            None
        });
        let target = target(&get).unwrap_or_else(|e| {
            tracing::warn!(
                error = %crate::error::chain(&e),
                "ignoring NOTIFY_SOCKET: the service manager will not be notified"
            );
            None
        });
        Notifier::new(target, watchdog)
    }

    /// Strict: what cannot be used is an error (the fuzz target and the
    /// tests check the parsing with it).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_getter(
        get: impl Fn(&str) -> Option<OsString>,
        own_pid: u32,
    ) -> Result<Notifier, Error> {
        let watchdog = watchdog_interval(&get, own_pid)?;
        Ok(Notifier::new(target(&get)?, watchdog))
    }

    /// Whether a service manager listens (`NOTIFY_SOCKET` was set).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog interval (`WATCHDOG_USEC`) if the watchdog is enabled for
    /// this process; ping at least twice per interval with [`watchdog`](Self::watchdog).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments). Crate
    /// only: the handover's own messages (`MAINPID=`, `READY=`,
    /// `RELOADING=`) are sent by the crate alone, at the right moments.
    pub(crate) fn notify(&self, state: &str) -> io::Result<()> {
        self.notify_with_fds(state, &[])
    }

    /// Sends `state` with `fds` attached (`SCM_RIGHTS`), as `FDSTORE=1` needs.
    pub(crate) fn notify_with_fds(&self, state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let Some((addr, sock)) = &self.target else {
            return Ok(());
        };
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} fds in one notification; at most {MAX_FDS_PER_MESSAGE}",
                    fds.len()
                ),
            ));
        }
        send_with_fds(sock.as_fd(), addr, state.as_bytes(), fds)
    }

    /// Sends `state` best effort, for the crate's own messages: `true` if
    /// it went out. A failure is logged — the first as a warning, later ones
    /// at debug level — and is never an error: a stale `NOTIFY_SOCKET` must
    /// not keep a service from starting, upgrading or stopping.
    pub(crate) fn send(&self, state: &str) -> bool {
        self.sent(self.notify(state), state)
    }

    /// [`send`](Self::send) with `fds` attached.
    pub(crate) fn send_with_fds(&self, state: &str, fds: &[BorrowedFd<'_>]) -> bool {
        self.sent(self.notify_with_fds(state, fds), state)
    }

    /// Logs a failed send of the crate's own (once as a warning).
    fn sent(&self, result: io::Result<()>, state: &str) -> bool {
        let e = match result {
            Ok(()) => return self.is_enabled(),
            Err(e) => e,
        };
        let what = state.lines().next().unwrap_or_default();
        let socket = self.describe_target();
        if !self.send_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %socket,
                sent = what,
                error = %e,
                "cannot notify the service manager (NOTIFY_SOCKET); serving on without it \
                 (further failures are logged at debug level)"
            );
        } else {
            tracing::debug!(%socket, sent = what, error = %e, "cannot notify the service manager");
        }
        false
    }

    /// `BARRIER=1`, best effort, for the crate's own use: `true` if the
    /// manager answered within `timeout`. A failure is logged, the first
    /// timeout as a warning (each upgrade waits that long on such a
    /// manager), later ones and send failures as [`send`](Self::send) does.
    pub(crate) fn send_barrier(&self, timeout: Duration) -> bool {
        match self.barrier(timeout) {
            Ok(()) => self.is_enabled(),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                let socket = self.describe_target();
                let ms = timeout.as_millis() as u64;
                if !self.barrier_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        %socket,
                        timeout_ms = ms,
                        "the service manager did not answer BARRIER=1; every upgrade waits \
                         this long for it (further timeouts are logged at debug level)"
                    );
                } else {
                    tracing::debug!(%socket, timeout_ms = ms, "the service manager did not answer BARRIER=1");
                }
                false
            }
            Err(e) => self.sent(Err(e), "BARRIER=1"),
        }
    }

    /// The socket's address, for log lines.
    fn describe_target(&self) -> String {
        match &self.target {
            None => "none".to_owned(),
            Some((addr, _)) => match (addr.path(), addr.as_abstract()) {
                (Some(p), _) => p.display().to_string(),
                (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
                (None, None) => "unnamed".to_owned(),
            },
        }
    }

    /// `STATUS=`: a one-line status for `systemctl status`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", status.replace('\n', " ")))
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// Stores `fds` under `name` in the service manager's fd store
    /// (`FDSTORE=1`, `FDNAME=`); the unit needs `FileDescriptorStoreMax=`.
    pub fn fd_store(&self, name: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        crate::env::validate_name(name).map_err(io::Error::from)?;
        for chunk in fds.chunks(MAX_FDS_PER_MESSAGE) {
            self.notify_with_fds(&format!("FDSTORE=1\nFDNAME={name}"), chunk)?;
        }
        Ok(())
    }

    /// `BARRIER=1`: returns once the manager has processed every message sent
    /// before it (it closes the pipe end sent along), or fails after `timeout`.
    pub(crate) fn barrier(&self, timeout: Duration) -> io::Result<()> {
        if self.target.is_none() {
            return Ok(());
        }
        let (r, w): (OwnedFd, OwnedFd) = sys::pipe_cloexec()?;
        self.notify_with_fds("BARRIER=1", &[w.as_fd()])?;
        drop(w);
        let deadline = crate::clock::after(timeout);
        let rev = sys::poll_until(&[(r.as_fd(), libc::POLLIN)], deadline)?;
        if rev[0] == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the service manager did not answer the barrier",
            ));
        }
        Ok(())
    }
}

/// The address `NOTIFY_SOCKET` names, and a socket to send to it; `None`
/// when it is unset.
fn target(get: &impl Fn(&str) -> Option<OsString>) -> Result<Option<(UnixAddr, Socket)>, Error> {
    let Some(value) = get(NOTIFY_SOCKET) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let bad = |reason: &str| Error::Env {
        var: NOTIFY_SOCKET,
        value: value.to_string_lossy().into_owned(),
        reason: reason.to_owned(),
    };
    let addr = match bytes.first() {
        Some(b'/') => UnixAddr::new(std::path::Path::new(&value)),
        Some(b'@') if bytes.len() > 1 => UnixAddr::new_abstract(&bytes[1..]),
        _ => return Err(bad("neither an absolute path nor @abstract-name")),
    }
    .map_err(|e| bad(&e.to_string()))?;
    // socket2 creates it close-on-exec.
    let sock = Socket::new(Domain::UNIX, Type::DGRAM, None)
        .map_err(|e| Error::io("cannot create the notification socket", e))?;
    Ok(Some((addr, sock)))
}

fn watchdog_interval(
    get: &impl Fn(&str) -> Option<OsString>,
    own_pid: u32,
) -> Result<Option<Duration>, Error> {
    let Some(usec) = get(WATCHDOG_USEC) else {
        return Ok(None);
    };
    if let Some(pid) = get(WATCHDOG_PID) {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(own_pid) {
            return Ok(None);
        }
    }
    let n: u64 = usec
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::Env {
            var: WATCHDOG_USEC,
            value: usec.to_string_lossy().into_owned(),
            reason: "not a positive number of microseconds".into(),
        })?;
    Ok(Some(Duration::from_micros(n)))
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
pub(crate) fn monotonic_usec() -> u128 {
    use nix::time::{ClockId, clock_gettime};
    // CLOCK_MONOTONIC exists on every Linux; a failure would read as 0.
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    ts.tv_sec() as u128 * 1_000_000 + ts.tv_nsec() as u128 / 1_000
}

/// `sendmsg(2)` of one datagram to `addr`, with `fds` as `SCM_RIGHTS`.
fn send_with_fds(
    sock: BorrowedFd<'_>,
    addr: &UnixAddr,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let iov = [io::IoSlice::new(data)];
    loop {
        match nix::sys::socket::sendmsg(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(addr),
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn getter(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn unset_is_a_silent_no_op() {
        let n = Notifier::from_getter(getter(&[]), 1).unwrap();
        assert!(!n.is_enabled());
        n.notify("READY=1").unwrap();
        n.barrier(Duration::from_millis(1)).unwrap();
    }

    #[test]
    fn bogus_socket_is_refused() {
        let e = Notifier::from_getter(getter(&[("NOTIFY_SOCKET", "relative")]), 1).unwrap_err();
        assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
        assert!(Notifier::from_getter(getter(&[("NOTIFY_SOCKET", "@")]), 1).is_err());
    }

    #[test]
    fn a_stale_or_bogus_socket_is_never_an_error() {
        for bogus in ["relative", "@", ""] {
            let n = Notifier::from_getter_or_warn(getter(&[("NOTIFY_SOCKET", bogus)]), 1);
            assert!(!n.is_enabled(), "{bogus:?} disables the notifier");
            assert!(!n.send("READY=1"));
        }
        let dir = std::env::temp_dir().join(format!("handover-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("regular");
        std::fs::write(&file, b"").unwrap();
        let abstract_name = format!("@handover-unbound-{}", std::process::id());
        let stale = [
            dir.join("nobody").to_str().unwrap().to_owned(),
            file.to_str().unwrap().to_owned(),
            abstract_name,
        ];
        for value in &stale {
            let n = Notifier::from_getter_or_warn(
                getter(&[("NOTIFY_SOCKET", value), ("WATCHDOG_USEC", "soon")]),
                1,
            );
            assert!(n.is_enabled(), "{value}: a parsable address is kept");
            assert_eq!(
                n.watchdog_interval(),
                None,
                "a bogus WATCHDOG_USEC is ignored"
            );
            assert!(!n.send_warned.load(Ordering::Relaxed));
            assert!(!n.send("READY=1"), "{value}");
            assert!(n.send_warned.load(Ordering::Relaxed), "warned once");
            assert!(!n.send("STOPPING=1"));
            assert!(!n.send_barrier(Duration::from_secs(5)), "fails at once");
            assert!(!n.barrier_warned.load(Ordering::Relaxed), "no timeout");
            let (r, _w) = sys::pipe_cloexec().unwrap();
            assert!(!n.send_with_fds("FDSTORE=1\nFDNAME=x", &[r.as_fd()]));
        }
        // A manager that takes messages but never answers BARRIER=1.
        let mute = dir.join("mute");
        let _mute = std::os::unix::net::UnixDatagram::bind(&mute).unwrap();
        let n =
            Notifier::from_getter_or_warn(getter(&[("NOTIFY_SOCKET", mute.to_str().unwrap())]), 1);
        assert!(n.send("READY=1"));
        let t = std::time::Instant::now();
        assert!(!n.send_barrier(Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50) && t.elapsed() < Duration::from_secs(5));
        assert!(n.barrier_warned.load(Ordering::Relaxed));
        assert!(!n.send_warned.load(Ordering::Relaxed));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn watchdog_only_for_its_pid() {
        let n = Notifier::from_getter(
            getter(&[("WATCHDOG_USEC", "2000000"), ("WATCHDOG_PID", "5")]),
            5,
        )
        .unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
        let n = Notifier::from_getter(
            getter(&[("WATCHDOG_USEC", "2000000"), ("WATCHDOG_PID", "6")]),
            5,
        )
        .unwrap();
        assert_eq!(n.watchdog_interval(), None);
        let n = Notifier::from_getter(getter(&[("WATCHDOG_USEC", "2000000")]), 5).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
        assert!(Notifier::from_getter(getter(&[("WATCHDOG_USEC", "x")]), 5).is_err());
    }

    fn recv_with_fds(sock: &std::os::unix::net::UnixDatagram) -> (String, Vec<OwnedFd>) {
        let m = crate::sys::recv_notification(sock.as_fd(), 0)
            .unwrap()
            .expect("a blocking receive returns a message");
        (m.text, m.fds)
    }

    #[test]
    fn path_and_abstract_sockets_receive_messages_and_fds() {
        let dir = std::env::temp_dir().join(format!("handover-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let abstract_name = format!("handover-notify-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let abs = std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
        let servers = [
            (
                std::os::unix::net::UnixDatagram::bind(&path).unwrap(),
                path.to_str().unwrap().to_owned(),
            ),
            (
                std::os::unix::net::UnixDatagram::bind_addr(&abs).unwrap(),
                format!("@{abstract_name}"),
            ),
        ];
        for (server, value) in &servers {
            let n = Notifier::from_getter(getter(&[("NOTIFY_SOCKET", value)]), 1).unwrap();
            assert!(n.is_enabled());
            n.notify("READY=1").unwrap();
            assert_eq!(recv_with_fds(server).0, "READY=1");
            n.status("upgrading").unwrap();
            let (m, _) = recv_with_fds(server);
            assert_eq!(m, "STATUS=upgrading");
            let (r, _w) = sys::pipe_cloexec().unwrap();
            n.fd_store("http", &[r.as_fd()]).unwrap();
            let (m, fds) = recv_with_fds(server);
            assert_eq!(m, "FDSTORE=1\nFDNAME=http");
            assert_eq!(fds.len(), 1);
            // The barrier returns once the receiver closes the pipe end.
            let t = std::thread::scope(|s| {
                let h = s.spawn(|| n.barrier(Duration::from_secs(10)));
                let (m, fds) = recv_with_fds(server);
                assert_eq!(m, "BARRIER=1");
                assert_eq!(fds.len(), 1);
                drop(fds);
                h.join().unwrap()
            });
            t.unwrap();
        }
        let too_many: Vec<OwnedFd> = (0..254).map(|_| sys::pipe_cloexec().unwrap().0).collect();
        let borrowed: Vec<BorrowedFd<'_>> = too_many.iter().map(|f| f.as_fd()).collect();
        let n = Notifier::from_getter(getter(&[("NOTIFY_SOCKET", &servers[1].1)]), 1).unwrap();
        assert!(n.notify_with_fds("FDSTORE=1", &borrowed).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
