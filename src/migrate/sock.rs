//! The socket calls of connection migration, on nix: `SCM_RIGHTS` over the
//! migration socket and the channel, and the checks of what arrives. Every
//! call is non-blocking (`MSG_DONTWAIT`); the callers wait with tokio.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::stat::{SFlag, fstat};

use super::wire::{MAX_FDS, MAX_RECORD};

/// `MSG_DONTWAIT | MSG_NOSIGNAL`: never block, and a closed peer is `EPIPE`,
/// never `SIGPIPE`.
fn send_flags() -> MsgFlags {
    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL
}

/// A connected `AF_UNIX` `SOCK_SEQPACKET` pair, both ends close-on-exec and
/// non-blocking: the migration socket.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let pair = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // Room for two records in flight besides the one being written, so a
    // record of the largest size never fails with EMSGSIZE.
    for fd in [&pair.0, &pair.1] {
        socket2::SockRef::from(fd).set_send_buffer_size(4 * MAX_RECORD)?;
    }
    Ok(pair)
}

/// Sends one whole record with `fds` attached (at most [`MAX_FDS`]).
/// `WouldBlock` when the socket's buffer is full.
pub(crate) fn send_record(
    sock: BorrowedFd<'_>,
    record: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} fds in one message; the kernel takes {MAX_FDS}",
                fds.len()
            ),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(&raw)]
    };
    let iov = [IoSlice::new(record)];
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, send_flags(), None) {
            // A seqpacket record goes whole or not at all.
            Ok(n) if n == record.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "sent {n} of a {}-byte record",
                    record.len()
                )));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// What one `recvmsg` brought.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes in the buffer (0 with no fds: end of stream).
    pub(crate) len: usize,
    /// The fds that came with them, owned and close-on-exec.
    pub(crate) fds: Vec<OwnedFd>,
    /// The record was longer than the buffer (`MSG_TRUNC`).
    pub(crate) truncated: bool,
    /// Some fds were dropped by the kernel for lack of room (`MSG_CTRUNC`).
    pub(crate) fds_truncated: bool,
}

/// Control space for [`MAX_FDS`] fds and then some: with it the kernel
/// never truncates the fds of a message the sending kernel accepted.
pub(crate) fn cmsg_buffer() -> Vec<u8> {
    nix::cmsg_space!([RawFd; MAX_FDS], libc::ucred, [u64; 8])
}

/// One `recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC)` into `buf`. Every fd that
/// arrives is owned at once, so none leaks on any path.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> io::Result<Received> {
    let mut iov = [IoSliceMut::new(buf)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = loop {
        match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut *cmsg), flags) {
            Ok(m) => break m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    let fds_truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    // With MSG_CTRUNC nix refuses to walk the control messages; the buffer
    // is sized so that the kernel never truncates SCM_RIGHTS (see
    // `cmsg_buffer`), so only a foreign control message could cause it.
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel installed this fd in our table for
                    // this recvmsg call (SCM_RIGHTS); nothing else refers to
                    // it, so it is ours to own and close.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated,
    })
}

/// Sends the bytes of a short line on a stream socket with `fd` attached to
/// them. `WouldBlock` when nothing could be sent; a partial send is
/// finished with plain sends (the fd travels with the first byte).
pub(crate) fn send_line_with_fd(
    channel: BorrowedFd<'_>,
    line: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<()> {
    let raw = [fd.as_raw_fd()];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let iov = [IoSlice::new(line)];
    let sent = loop {
        match socket::sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsgs, send_flags(), None) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // Rarely more than nothing is left; the rest is a byte or two.
    crate::sys::send_all(channel, &line[sent..])
}

/// The kind of file `fd` is, when it is not a socket.
pub(crate) fn not_a_socket(fd: BorrowedFd<'_>) -> Option<&'static str> {
    match fstat(fd) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK => {
            // A socket whose type cannot be read is no socket to use.
            match socket::getsockopt(&fd, socket::sockopt::SockType) {
                Ok(_) => None,
                Err(_) => Some("a socket of unknown type"),
            }
        }
        Ok(st) => Some(crate::sys::describe_mode(st.st_mode)),
        Err(_) => Some("not an open fd"),
    }
}

/// Whether `fd` is an `AF_UNIX` `SOCK_SEQPACKET` socket (the migration
/// socket the successor offers).
pub(crate) fn is_seqpacket(fd: BorrowedFd<'_>) -> bool {
    let sock = socket2::SockRef::from(&fd);
    not_a_socket(fd).is_none()
        && sock.domain().ok() == Some(socket2::Domain::UNIX)
        && sock.r#type().ok() == Some(socket2::Type::SEQPACKET)
}

/// Ends a connection for every holder of it (`shutdown(SHUT_RDWR)`), even
/// while a copy of it waits in the successor's queue.
pub(crate) fn shutdown(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
}

/// Registers `fd` with the tokio reactor of the current runtime.
pub(crate) fn register(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open from its creation to its drop and always
    // returns the same fd from `as_raw_fd`; the `AsyncFd` owns it, so it
    // stays open and the same for the registration's whole life.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}
