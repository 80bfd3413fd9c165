//! Takeover: a process started by anyone — a container runtime, the other
//! unit of a blue/green pair, an operator — takes the service over from its
//! running generation through the control socket, as a successor the old
//! generation started would.
//!
//! Only the meeting differs from an upgrade by fork+exec: the new process
//! connects to the control socket and sends `takeover`; the old generation
//! checks it (takeover allowed, the peer's uid allowed — see
//! [`control`](crate::control)), begins an upgrade, and answers with an
//! offer: one line naming what follows, then the named fds and the new
//! process's end of a fresh channel, passed with `SCM_RIGHTS` in batches of
//! at most 253. From there on it is the channel protocol of every upgrade
//! (state, ready, probation, commit, migrated connections).
//!
//! ```text
//! new → old   takeover\n
//! old → new   ok takeover generation=N fds=K state=0|1 started_us=T counters=S:F pid=P protocol=V names=a:b:…\n
//! old → new   ⌈(K+1)/253⌉ × (one byte 'F' + up to 253 fds): the K named fds, then the channel
//! ```
//! or `error <reason>\n` (refused; nothing was sent).
//!
//! The old generation cannot kill a process it did not start, nor reap it:
//! it watches the channel, whose only other copy the new process holds, and
//! when the takeover fails (the new process missed the ready deadline, say)
//! it sends `X<reason>` and closes it. The new process must then not serve:
//! its `ready()` fails with the reason.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::Error;
use crate::sys;

/// The most fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
const BATCH: usize = 253;

/// The longest offer line accepted: the names of many fds fit.
const MAX_OFFER_LINE: usize = 8 << 20;

/// How long the new process waits for the offer and its fds.
const OFFER_TIMEOUT: Duration = Duration::from_secs(30);

/// The request line.
pub(crate) const REQUEST: &str = "takeover";

/// What the old generation tells the new process in its offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) generation: u64,
    pub(crate) names: Vec<String>,
    pub(crate) state: bool,
    pub(crate) started_us: u128,
    pub(crate) counters: (u64, u64),
    /// The new process's pid as the old generation sees it (0: not at
    /// all, from a sibling pid namespace): the pid file's, written by the
    /// old generation at the commit unless 0.
    pub(crate) pid: u32,
    /// The old generation's channel protocol version (1 if absent).
    pub(crate) protocol: u32,
}

impl Header {
    fn encode(&self) -> String {
        format!(
            "ok takeover generation={} fds={} state={} started_us={} counters={}:{} pid={} protocol={} names={}\n",
            self.generation,
            self.names.len(),
            u8::from(self.state),
            self.started_us,
            self.counters.0,
            self.counters.1,
            self.pid,
            self.protocol,
            self.names.join(":")
        )
    }

    /// Parses an offer line (without its newline). Untrusted: every field
    /// is checked.
    fn decode(line: &str) -> Result<Header, String> {
        let rest = line
            .strip_prefix("ok takeover ")
            .ok_or_else(|| format!("not an offer: {:?}", cut(line)))?;
        let (mut generation, mut count, mut state, mut started_us, mut counters, mut names) =
            (None, None, None, None, None, None);
        let mut pid = 0;
        let mut protocol = 1;
        for field in rest.split(' ') {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| format!("field {:?} is not key=value", cut(field)))?;
            let num = |v: &str| -> Result<u128, String> {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{k}={:?} is not a number", cut(v)));
                }
                v.parse()
                    .map_err(|_| format!("{k}={:?} is out of range", cut(v)))
            };
            match k {
                "generation" => generation = Some(num(v)?),
                "fds" => count = Some(num(v)?),
                "state" => state = Some(num(v)?),
                "started_us" => started_us = Some(num(v)?),
                "counters" => {
                    let (a, b) = v
                        .split_once(':')
                        .ok_or_else(|| format!("counters={:?}", cut(v)))?;
                    counters = Some((num(a)?, num(b)?));
                }
                "names" => names = Some(v),
                "pid" => pid = u32::try_from(num(v)?).map_err(|_| "pid out of range")?,
                "protocol" => {
                    protocol = u32::try_from(num(v)?)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or("protocol out of range")?
                }
                _ => {} // a newer old generation may say more
            }
        }
        let missing = |what| format!("the offer has no {what}");
        let count = count.ok_or_else(|| missing("fds"))?;
        if count > crate::env::MAX_FDS as u128 {
            return Err(format!("{count} fds is more than the limit"));
        }
        let names: Vec<String> = match names.ok_or_else(|| missing("names"))? {
            "" => Vec::new(),
            n => n.split(':').map(str::to_owned).collect(),
        };
        if names.len() as u128 != count {
            return Err(format!("{} names for {count} fds", names.len()));
        }
        for n in &names {
            crate::env::validate_name(n).map_err(|e| e.to_string())?;
        }
        let generation = generation.ok_or_else(|| missing("generation"))?;
        if generation == 0 || generation > u64::MAX as u128 {
            return Err(format!("generation {generation}"));
        }
        let (s, f) = counters.ok_or_else(|| missing("counters"))?;
        Ok(Header {
            generation: generation as u64,
            names,
            state: match state.ok_or_else(|| missing("state"))? {
                0 => false,
                1 => true,
                s => return Err(format!("state={s}")),
            },
            started_us: started_us.ok_or_else(|| missing("started_us"))?,
            counters: (
                u64::try_from(s).map_err(|_| "counters out of range")?,
                u64::try_from(f).map_err(|_| "counters out of range")?,
            ),
            pid,
            protocol,
        })
    }
}

/// The fuzz target's check: a line that parses encodes back to a line that
/// parses to the same header.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_offer(line: &str) {
    if let Ok(h) = Header::decode(line) {
        let again = Header::decode(h.encode().trim_end()).expect("an encoded offer parses");
        assert_eq!(again, h);
    }
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A takeover request the control socket accepted: the connection to
/// answer on, and the peer's pid (`SO_PEERCRED`; 0 if it is not visible
/// from this pid namespace).
#[derive(Debug)]
pub(crate) struct PeerRequest {
    pub(crate) conn: OwnedFd,
    pub(crate) pid: u32,
}

/// Waits until `fd` (perhaps non-blocking, shared with tokio) can take
/// more bytes, at most until `deadline`.
fn writable(fd: BorrowedFd<'_>, deadline: Instant) -> io::Result<()> {
    if sys::poll_until(&[(fd, libc::POLLOUT)], deadline)?[0] == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer does not read its offer",
        ));
    }
    Ok(())
}

/// The old generation's side: sends the offer — `header`, then `fds` and
/// `channel` — over `conn`, the takeover request's connection, by
/// `deadline`.
pub(crate) fn send_offer(
    conn: BorrowedFd<'_>,
    header: &Header,
    fds: &[BorrowedFd<'_>],
    channel: BorrowedFd<'_>,
    deadline: Instant,
) -> io::Result<()> {
    let line = header.encode();
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        match sys::send(conn, rest, true) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(conn, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let all: Vec<RawFd> = fds
        .iter()
        .map(|f| f.as_raw_fd())
        .chain(std::iter::once(channel.as_raw_fd()))
        .collect();
    for batch in all.chunks(BATCH) {
        let cmsg = [ControlMessage::ScmRights(batch)];
        let iov = [io::IoSlice::new(b"F")];
        loop {
            match nix::sys::socket::sendmsg::<()>(
                conn.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(1) => break,
                Ok(_) => return Err(io::Error::other("short send of an fd batch")),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => writable(conn, deadline)?,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// What the new process received: its fds by name, its end of the channel,
/// and what the header said.
#[derive(Debug)]
pub(crate) struct Offer {
    pub(crate) header: Header,
    pub(crate) fds: Vec<(String, OwnedFd)>,
    pub(crate) channel: OwnedFd,
}

/// The new process's side: asks the service behind the control socket at
/// `path` to be taken over. `Ok(None)`: nobody serves there (no socket, or
/// nobody accepting) — the caller starts as a first generation.
pub(crate) fn request(path: &Path) -> Result<Option<Offer>, Error> {
    let fail = |reason: String| Error::TakeOver {
        path: path.to_owned(),
        reason,
    };
    let mut conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(path = %path.display(), "nothing to take over; starting as the first generation");
            return Ok(None);
        }
        Err(e) => return Err(fail(format!("cannot connect: {e}"))),
    };
    let deadline = crate::clock::after(OFFER_TIMEOUT);
    conn.set_read_timeout(Some(OFFER_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(OFFER_TIMEOUT)))
        .map_err(|e| fail(format!("cannot set a timeout: {e}")))?;
    // A refusal may come before the request is read (another uid): read
    // the answer even if sending failed.
    let sent = conn.write_all(format!("{REQUEST}\n").as_bytes());
    let line = match (read_line(&mut conn, deadline), sent) {
        (Ok(line), _) => line,
        (Err(e), Ok(())) => return Err(fail(format!("no offer: {e}"))),
        (Err(_), Err(e)) => return Err(fail(format!("cannot send the request: {e}"))),
    };
    if let Some(reason) = line.strip_prefix("error ") {
        return Err(fail(format!("refused: {reason}")));
    }
    let header = Header::decode(&line).map_err(|e| fail(format!("a bad offer: {e}")))?;
    let mut fds = receive_fds(conn.as_fd(), header.names.len() + 1, deadline)
        .map_err(|e| fail(format!("receiving the fds: {e}")))?;
    let channel = fds.pop().expect("count + 1 received");
    check_channel(&channel).map_err(fail)?;
    let fds = header.names.iter().cloned().zip(fds).collect();
    Ok(Some(Offer {
        header,
        fds,
        channel,
    }))
}

/// Reads the offer line byte by byte (the fds follow it on the same
/// stream, attached to later bytes), at most [`MAX_OFFER_LINE`] bytes.
fn read_line(conn: &mut UnixStream, deadline: Instant) -> io::Result<String> {
    let mut line = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    loop {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        match conn.read(&mut byte)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
        if line.len() > MAX_OFFER_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "an overlong line",
            ));
        }
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Receives exactly `count` fds, each batch attached to one byte `F`.
/// Every fd the kernel installs is owned at once (close-on-exec), so none
/// leaks on any path, a truncated batch included.
fn receive_fds(conn: BorrowedFd<'_>, count: usize, deadline: Instant) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::with_capacity(count);
    let mut space = nix::cmsg_space!([RawFd; BATCH]);
    while fds.len() < count {
        if sys::poll_until(&[(conn, libc::POLLIN)], deadline)?[0] == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let mut byte = [0u8; 1];
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        // Zeroed: a truncated message is parsed by hand from this buffer,
        // which must not still hold an earlier batch's fds.
        space.fill(0);
        let msg = match nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let bytes = msg.bytes;
        // nix refuses to walk truncated control messages; walk them by
        // hand then, so that what did arrive is closed, not leaked.
        let got: Vec<RawFd> = if truncated {
            installed_fds(&space)
        } else {
            msg.cmsgs()?
                .filter_map(|c| match c {
                    ControlMessageOwned::ScmRights(raw) => Some(raw),
                    _ => None,
                })
                .flatten()
                .collect()
        };
        for raw in got {
            // SAFETY: the kernel installed this fd in our table for this
            // recvmsg (SCM_RIGHTS, close-on-exec); nothing else refers to
            // it, so it is ours to own and close.
            fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        if bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {} of {count} fds", fds.len()),
            ));
        }
        if truncated {
            return Err(io::Error::other(
                "the kernel dropped fds of a batch (MSG_CTRUNC): the fd limit (RLIMIT_NOFILE) is too low",
            ));
        }
        if fds.len() > count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} fds sent for {count}", fds.len()),
            ));
        }
    }
    Ok(fds)
}

/// The fds of the one `SCM_RIGHTS` control message at the start of `space`
/// (what the kernel installed before it ran out of room, when it set
/// `MSG_CTRUNC`): read by hand, since nix does not walk a truncated buffer.
fn installed_fds(space: &[u8]) -> Vec<RawFd> {
    let header = std::mem::size_of::<libc::cmsghdr>();
    if space.len() < header {
        return Vec::new();
    }
    // SAFETY: `space` holds at least one cmsghdr's bytes; read_unaligned
    // copes with any alignment of the Vec's buffer.
    let hdr: libc::cmsghdr = unsafe { std::ptr::read_unaligned(space.as_ptr().cast()) };
    if hdr.cmsg_level != libc::SOL_SOCKET || hdr.cmsg_type != libc::SCM_RIGHTS {
        return Vec::new();
    }
    // SAFETY: CMSG_LEN only computes a length.
    let data_at = unsafe { libc::CMSG_LEN(0) } as usize;
    let len = (hdr.cmsg_len as usize).min(space.len());
    if len < data_at {
        return Vec::new();
    }
    space[data_at..len]
        .chunks_exact(std::mem::size_of::<RawFd>())
        .take(BATCH)
        .map(|b| RawFd::from_ne_bytes(b.try_into().expect("an int's bytes")))
        .collect()
}

/// The channel must be a Unix stream socket.
fn check_channel(fd: &OwnedFd) -> Result<(), String> {
    let sock = socket2::SockRef::from(fd);
    let ok = sock.domain().ok() == Some(socket2::Domain::UNIX)
        && sock.r#type().ok() == Some(socket2::Type::STREAM);
    if ok {
        Ok(())
    } else {
        Err("the channel is not a Unix stream socket".to_owned())
    }
}

/// The process that took over, as the old generation watches it: through
/// its copy of the channel, whose other end only the new process holds.
#[derive(Debug)]
pub(crate) struct Peer {
    /// Its pid as `SO_PEERCRED` gave it (0 if it lives in a pid namespace
    /// this process cannot see).
    pub(crate) pid: u32,
    /// The old generation's end of the channel (a copy): hung up once the
    /// new process is gone.
    channel: OwnedFd,
    /// The takeover was called off (or the peer is gone): nothing left to do.
    done: bool,
}

impl Peer {
    pub(crate) fn new(pid: u32, channel: OwnedFd) -> Peer {
        Peer {
            pid,
            channel,
            done: false,
        }
    }

    /// Whether the new process is gone (its end of the channel closed),
    /// waiting until `until` at most.
    pub(crate) fn wait_gone(&mut self, until: Instant) -> bool {
        if self.done {
            return true;
        }
        let hung_up = sys::poll_until(&[(self.channel.as_fd(), libc::POLLRDHUP)], until)
            .is_ok_and(|r| r[0] & (libc::POLLRDHUP | libc::POLLHUP) != 0);
        if hung_up {
            self.done = true;
        }
        hung_up
    }

    /// Readable when the new process is gone (or sends).
    pub(crate) fn exit_fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Calls the takeover off: tells the new process why and closes the
    /// channel, so that it does not serve.
    pub(crate) fn call_off(&mut self, reason: &str) {
        if self.done {
            return;
        }
        self.done = true;
        let msg = crate::channel::Message::CalledOff(reason.to_owned()).encode();
        let _ = sys::send(self.channel.as_fd(), &msg, true);
        let _ = socket2::SockRef::from(&self.channel).shutdown(std::net::Shutdown::Both);
    }

    /// The takeover is final: nothing more to watch.
    pub(crate) fn release(mut self) {
        self.done = true;
    }
}

/// The program a peer runs, as far as this process can see.
pub(crate) fn peer_program(pid: u32) -> PathBuf {
    if pid == 0 {
        return PathBuf::new();
    }
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_round_trip_and_bad_ones_are_refused() {
        let h = Header {
            generation: 4,
            names: vec!["http".into(), "handover.control".into()],
            state: true,
            started_us: 99,
            counters: (3, 1),
            pid: 1234,
            protocol: 2,
        };
        let line = h.encode();
        assert_eq!(Header::decode(line.trim_end()).unwrap(), h);
        let none = Header {
            names: Vec::new(),
            ..h.clone()
        };
        assert_eq!(Header::decode(none.encode().trim_end()).unwrap(), none);
        for bad in [
            "nonsense",
            "ok takeover generation=0 fds=0 state=0 started_us=1 counters=0:0 names=",
            "ok takeover generation=1 fds=2 state=0 started_us=1 counters=0:0 names=a",
            "ok takeover generation=1 fds=1 state=2 started_us=1 counters=0:0 names=a",
            "ok takeover generation=1 fds=1 state=0 started_us=1 counters=0 names=a",
            "ok takeover generation=1 fds=1 state=0 started_us=x counters=0:0 names=a",
            "ok takeover generation=1 fds=1 state=0 started_us=1 counters=0:0 names=a b",
            "ok takeover generation=1 fds=99999999999 state=0 started_us=1 counters=0:0 names=",
            "ok takeover fds=0 state=0 started_us=1 counters=0:0 names=",
        ] {
            assert!(Header::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fds_arrive_in_batches_and_a_short_sender_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<OwnedFd> = (0..600)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        let h = Header {
            generation: 2,
            names: (0..599).map(|i| format!("f{i}")).collect(),
            state: false,
            started_us: 1,
            counters: (0, 0),
            pid: 0,
            protocol: 1,
        };
        let deadline = crate::clock::after(Duration::from_secs(10));
        let sender = std::thread::spawn({
            let a = a.try_clone().unwrap();
            let h = h.clone();
            move || {
                let borrowed: Vec<BorrowedFd<'_>> =
                    files[..599].iter().map(|f| f.as_fd()).collect();
                send_offer(a.as_fd(), &h, &borrowed, files[599].as_fd(), deadline).unwrap();
                files
            }
        });
        let mut b2 = b.try_clone().unwrap();
        let line = read_line(&mut b2, deadline).unwrap();
        assert_eq!(Header::decode(&line).unwrap(), h);
        let got = receive_fds(b.as_fd(), 600, deadline).unwrap();
        let files = sender.join().unwrap();
        assert_eq!(got.len(), 600);
        for fd in &got {
            assert!(sys::is_cloexec(fd.as_fd()).unwrap());
        }
        // A sender that stops short: an error, not a hang.
        let borrowed: Vec<BorrowedFd<'_>> = files[..10].iter().map(|f| f.as_fd()).collect();
        send_offer(a.as_fd(), &h, &borrowed, files[599].as_fd(), deadline).unwrap();
        drop(a);
        let _ = read_line(&mut b2, deadline).unwrap();
        let e = receive_fds(b.as_fd(), 600, deadline).unwrap_err();
        assert!(e.to_string().contains("closed after 11 of 600"), "{e}");
    }
}
