//! The sd_notify protocol ([sd_notify(3)]), without touching the environment.
//!
//! [`Notifier`] sends datagrams to the socket named by `NOTIFY_SOCKET` (a
//! path, or `@name` for the abstract namespace). With no `NOTIFY_SOCKET` it
//! is disabled and every call is a silent no-op, so the same code runs under
//! systemd and outside it.
//!
//! [sd_notify(3)]: https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// A client of the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixAddr, Socket)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` of this
    /// process. An unset `NOTIFY_SOCKET` gives a disabled notifier; a value
    /// that is neither an absolute path nor `@name` is an error.
    pub fn from_env() -> Result<Notifier, Error> {
        Notifier::from_getter(|k| std::env::var_os(k), std::process::id())
    }

    pub(crate) fn from_getter(
        get: impl Fn(&str) -> Option<OsString>,
        own_pid: u32,
    ) -> Result<Notifier, Error> {
        let watchdog = watchdog_interval(&get, own_pid)?;
        let Some(value) = get(NOTIFY_SOCKET) else {
            return Ok(Notifier {
                target: None,
                watchdog,
            });
        };
        let bytes = value.as_bytes();
        let bad = |reason: &str| Error::Env {
            var: "NOTIFY_SOCKET",
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
        Ok(Notifier {
            target: Some((addr, sock)),
            watchdog,
        })
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

    /// `STOPPING=1`: the whole service is stopping. Never send it from a
    /// generation that drains after handing over: systemd would stop the unit.
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// `STATUS=`: a one-line status for `systemctl status`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", status.replace('\n', " ")))
    }

    /// `EXTEND_TIMEOUT_USEC=`: the current start, reload or stop may take
    /// `by` longer than configured.
    pub fn extend_timeout(&self, by: Duration) -> io::Result<()> {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()))
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

    /// Removes the fds stored under `name` (`FDSTOREREMOVE=1`).
    pub fn fd_store_remove(&self, name: &str) -> io::Result<()> {
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"))
    }

    /// `BARRIER=1`: returns once the manager has processed every message sent
    /// before it (it closes the pipe end sent along), or fails after `timeout`.
    pub fn barrier(&self, timeout: Duration) -> io::Result<()> {
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
