//! The syscall seam: the one place where `RawFd`s and libc calls meet.
//!
//! Every call goes through [`syscall!`], which turns a `-1` return into
//! `io::Error::last_os_error()`. Helpers here return `OwnedFd`s created
//! close-on-exec from birth.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Calls a libc function and turns `-1` into the thread's last OS error.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each caller states why the arguments are valid for this call.
        #[allow(clippy::macro_metavars_in_unsafe)]
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Wraps a freshly returned, owned file descriptor.
///
/// # Safety
/// `fd` must be open and owned by nobody else.
unsafe fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A connected `AF_UNIX` stream pair, both ends close-on-exec.
pub(crate) fn socketpair_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // socketpair writes two fds into the two-element array it is given.
    syscall!(socketpair(
        libc::AF_UNIX,
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
        0,
        fds.as_mut_ptr()
    ))?;
    // SAFETY: socketpair succeeded, so both entries are new fds owned by us alone.
    Ok(unsafe { (own(fds[0]), own(fds[1])) })
}

/// A pipe `(read, write)`, both ends close-on-exec.
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // pipe2 writes two fds into the two-element array it is given.
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
    // SAFETY: pipe2 succeeded, so both entries are new fds owned by us alone.
    Ok(unsafe { (own(fds[0]), own(fds[1])) })
}

/// `fcntl(F_GETFD)`: whether the fd is open, and its close-on-exec flag.
pub(crate) fn fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // F_GETFD reads a flag word; any fd number is a valid argument.
    syscall!(fcntl(fd, libc::F_GETFD))
}

/// Sets `FD_CLOEXEC` on the fd number `fd`, which need not be owned yet (an
/// inherited fd about to be adopted): one `fcntl(F_SETFD)`, which also
/// tells whether it is open (`EBADF`). `FD_CLOEXEC` is the only fd flag.
pub(crate) fn mark_cloexec_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(F_SETFD) takes an fd number and an int; the kernel
    // checks the number, and no memory is passed.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` has `FD_CLOEXEC` set.
#[cfg(test)]
pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fd_flags(fd.as_raw_fd())? & libc::FD_CLOEXEC != 0)
}

/// Sets `FD_CLOEXEC` on `fd` (with `F_SETFD`, the only call that sets it).
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = fd_flags(fd.as_raw_fd())?;
    if flags & libc::FD_CLOEXEC == 0 {
        // F_SETFD with a flag word on a borrowed, open fd.
        syscall!(fcntl(
            fd.as_raw_fd(),
            libc::F_SETFD,
            flags | libc::FD_CLOEXEC
        ))?;
    }
    Ok(())
}

/// Sets or clears `O_NONBLOCK`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // F_GETFL/F_SETFL on a borrowed, open fd.
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        syscall!(fcntl(fd.as_raw_fd(), libc::F_SETFL, new))?;
    }
    Ok(())
}

/// `fstat(fd).st_mode`.
pub(crate) fn file_mode(fd: BorrowedFd<'_>) -> io::Result<libc::mode_t> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // fstat writes into the struct it is given.
    syscall!(fstat(fd.as_raw_fd(), &mut st))?;
    Ok(st.st_mode)
}

/// A human name for the file type in `mode`, for error messages.
pub(crate) fn describe_mode(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFSOCK => "a socket",
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a pipe",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link",
        _ => "an unknown kind of file",
    }
}

/// Waits until one of `fds` is ready for `events`, or `deadline` passes.
///
/// Returns the `revents` of each fd (all zero on timeout). Retries on `EINTR`.
pub(crate) fn poll_until(
    fds: &[(BorrowedFd<'_>, libc::c_short)],
    deadline: Instant,
) -> io::Result<Vec<libc::c_short>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, events)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: *events,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = timeout_ms(left);
        // pfds is a valid array of `pfds.len()` pollfd structs.
        match syscall!(poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms)) {
            Ok(_) => return Ok(pfds.iter().map(|p| p.revents).collect()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A poll(2) timeout in whole milliseconds, rounded up so a wait never ends early.
fn timeout_ms(d: Duration) -> libc::c_int {
    let ms = d.as_micros().div_ceil(1000);
    ms.min(libc::c_int::MAX as u128) as libc::c_int
}

/// `send(2)` with `MSG_NOSIGNAL`: a closed peer is `EPIPE`, never `SIGPIPE`.
pub(crate) fn send_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // buf is a valid slice of buf.len() bytes.
        match syscall!(send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL
        )) {
            Ok(n) => buf = &buf[n as usize..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `recv(2)` into `buf`, retrying on `EINTR`. `Ok(0)` is end of stream.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // buf is a valid, writable slice of buf.len() bytes.
        match syscall!(recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags
        )) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `read(2)` into `buf`, retrying on `EINTR`. `Ok(0)` is end of file.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // buf is a valid, writable slice of buf.len() bytes.
        match syscall!(read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One `sd_notify` datagram as a service manager receives it.
#[derive(Debug)]
pub(crate) struct Notification {
    pub(crate) text: String,
    /// The sender's pid, from `SCM_CREDENTIALS` (the socket needs
    /// `SO_PASSCRED`).
    pub(crate) sender: Option<libc::pid_t>,
    /// The fds passed with it (`FDSTORE=1`, `BARRIER=1`), close-on-exec.
    pub(crate) fds: Vec<OwnedFd>,
}

/// Receives one `sd_notify` datagram; `Ok(None)` when `flags` has
/// `MSG_DONTWAIT` and nothing is pending.
pub(crate) fn recv_notification(
    sock: BorrowedFd<'_>,
    flags: libc::c_int,
) -> io::Result<Option<Notification>> {
    let mut buf = vec![0u8; 4096];
    // Room for 253 fds and the credentials, 8-byte aligned.
    let mut control = [0u64; 160];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // recvmsg writes into the buffers msg points to, within their lengths.
    let n = match syscall!(recvmsg(
        sock.as_raw_fd(),
        &mut msg,
        flags | libc::MSG_CMSG_CLOEXEC
    )) {
        Ok(n) => n as usize,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut sender = None;
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in, within
    // msg_controllen; each SCM_RIGHTS entry is an fd now owned by us, and
    // each SCM_CREDENTIALS payload is a ucred.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            } else if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS
            {
                let cred = libc::CMSG_DATA(c).cast::<libc::ucred>().read_unaligned();
                sender = Some(cred.pid);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    buf.truncate(n);
    Ok(Some(Notification {
        text: String::from_utf8_lossy(&buf).into_owned(),
        sender,
        fds,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fds_are_born_close_on_exec() {
        let (a, b) = socketpair_cloexec().unwrap();
        let (r, w) = pipe_cloexec().unwrap();
        for fd in [a.as_fd(), b.as_fd(), r.as_fd(), w.as_fd()] {
            assert!(is_cloexec(fd).unwrap());
        }
    }

    #[test]
    fn set_cloexec_sets_the_flag() {
        let (r, _w) = pipe_cloexec().unwrap();
        // F_SETFD to clear the flag, as an inherited fd would arrive.
        syscall!(fcntl(r.as_raw_fd(), libc::F_SETFD, 0)).unwrap();
        assert!(!is_cloexec(r.as_fd()).unwrap());
        set_cloexec(r.as_fd()).unwrap();
        assert!(is_cloexec(r.as_fd()).unwrap());
    }

    #[test]
    fn poll_times_out_and_sees_data() {
        let (a, b) = socketpair_cloexec().unwrap();
        let t = Instant::now();
        let r = poll_until(&[(a.as_fd(), libc::POLLIN)], t + Duration::from_millis(20)).unwrap();
        assert_eq!(r, vec![0]);
        assert!(t.elapsed() >= Duration::from_millis(20));
        send_all(b.as_fd(), b"x").unwrap();
        let r = poll_until(
            &[(a.as_fd(), libc::POLLIN)],
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert_ne!(r[0] & libc::POLLIN, 0);
        drop(a);
        let e = send_all(b.as_fd(), b"y").unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPIPE),
            "a closed peer is EPIPE, not SIGPIPE"
        );
    }
}
