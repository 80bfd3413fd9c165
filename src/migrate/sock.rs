//! The socket calls of connection migration, on nix: `SCM_RIGHTS` over the
//! migration socket and the channel, and the checks of what arrives. Every
//! call is non-blocking (`MSG_DONTWAIT`); the callers wait with tokio.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use nix::sys::stat::fstat;

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
/// arrives is owned at once, so none leaks on any path — also those the
/// kernel installed in a message whose control data it truncated
/// (`MSG_CTRUNC`, see `sys::recvmsg`).
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> io::Result<Received> {
    let got = crate::sys::recvmsg(sock, buf, cmsg, libc::MSG_DONTWAIT)?;
    Ok(Received {
        len: got.bytes,
        fds: got.fds,
        truncated: got.flags & libc::MSG_TRUNC != 0,
        fds_truncated: got.flags & libc::MSG_CTRUNC != 0,
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
    socket_type(fd).err()
}

/// The type of the socket `fd` (`SO_TYPE`), or what `fd` is when it is
/// not a socket whose type can be read. One `getsockopt` for a socket
/// (which fails with `ENOTSOCK` for any other file); `fstat` only to say
/// what a file that is not a socket is.
pub(crate) fn socket_type(fd: BorrowedFd<'_>) -> Result<socket2::Type, &'static str> {
    let e = match socket2::SockRef::from(&fd).r#type() {
        Ok(ty) => return Ok(ty),
        Err(e) => e,
    };
    match e.raw_os_error() {
        Some(libc::ENOTSOCK) => match fstat(fd) {
            Ok(st) => Err(crate::sys::describe_mode(st.st_mode)),
            Err(_) => Err("not an open fd"),
        },
        Some(libc::EBADF) => Err("not an open fd"),
        // A socket whose type cannot be read is no socket to use.
        _ => Err("a socket of unknown type"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A control buffer too small for what came (`MSG_CTRUNC`): the fds the
    /// kernel did install arrive owned, flagged as truncated.
    #[test]
    fn fds_of_a_truncated_message_are_owned() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, _w) = crate::sys::pipe_cloexec().unwrap();
        send_record(a.as_fd(), b"rec", &[r.as_fd(), r.as_fd(), r.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: CMSG_LEN is arithmetic on its argument.
        let one = unsafe { libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) } as usize;
        let mut small = vec![0u8; one];
        let got = recv_with_fds(b.as_fd(), &mut buf, &mut small).unwrap();
        assert!(got.fds_truncated && !got.truncated);
        assert_eq!((got.len, got.fds.len()), (3, 1));
        // A message that fits is whole.
        send_record(a.as_fd(), b"rec", &[r.as_fd(), r.as_fd()]).unwrap();
        let mut room = cmsg_buffer();
        let got = recv_with_fds(b.as_fd(), &mut buf, &mut room).unwrap();
        assert!(!got.fds_truncated);
        assert_eq!(got.fds.len(), 2);
    }
}
