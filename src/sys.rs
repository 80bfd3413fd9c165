//! The syscall seam: fds and system calls outside the fork/exec path.
//!
//! nix makes the calls (typed flags, `OwnedFd`/`BorrowedFd`, `Errno` turned
//! into `io::Error`); this module only adds what every caller needs — fds
//! created close-on-exec from birth, `EINTR` retried, `SIGPIPE` never raised,
//! waits bounded by a deadline. Raw libc lives in `spawn` (between fork and
//! exec, where nothing may allocate) and in the two places that take
//! ownership of an fd number that was inherited or received.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::socket::MsgFlags;

/// A connected `AF_UNIX` stream pair, both ends close-on-exec.
pub(crate) fn socketpair_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    // std creates both ends with SOCK_CLOEXEC.
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    Ok((a.into(), b.into()))
}

/// A pipe `(read, write)`, both ends close-on-exec.
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
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

/// Runs of consecutive numbers in `fds` (sorted, no duplicates), as
/// `(first, last)`.
fn runs(fds: &[RawFd]) -> impl Iterator<Item = (RawFd, RawFd)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *fds.get(i)?;
        let mut last = first;
        i += 1;
        while fds.get(i) == Some(&(last + 1)) {
            last += 1;
            i += 1;
        }
        Some((first, last))
    })
}

/// `close_range(first, last, flags)`.
fn close_range(first: RawFd, last: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: close_range takes plain integers and touches no memory of
    // ours; which fds it may close or mark is the caller's business.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            flags as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `FD_CLOEXEC` on each fd number in `fds` (sorted, no duplicates),
/// which need not be owned yet (inherited fds about to be adopted; numbers
/// that are not open are left alone): one `close_range(CLOSE_RANGE_CLOEXEC)`
/// per run of consecutive numbers — one for the usual `3 .. 3 + n` — where
/// the kernel has it (Linux 5.11), else one `fcntl(F_SETFD)` each.
pub(crate) fn mark_cloexec_all(fds: &[RawFd]) {
    for (first, last) in runs(fds) {
        if first == last || close_range(first, last, libc::CLOSE_RANGE_CLOEXEC as _).is_err() {
            for fd in first..=last {
                let _ = mark_cloexec_raw(fd);
            }
        }
    }
}

/// The first of the fd numbers `fds` that is not open in this process, if
/// any: one `poll(2)` (timeout 0, no events asked: it only reports
/// `POLLNVAL` for a number that is not open) per 1,024 fds, instead of a
/// system call per fd.
pub(crate) fn first_not_open(fds: &[RawFd]) -> io::Result<Option<RawFd>> {
    const CHUNK: usize = 1024;
    let mut set: Vec<libc::pollfd> = Vec::with_capacity(fds.len().min(CHUNK));
    for chunk in fds.chunks(CHUNK) {
        set.clear();
        set.extend(chunk.iter().map(|&fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        }));
        loop {
            // SAFETY: poll reads and writes `set.len()` pollfd structs of a
            // live buffer; it does not look at the fds beyond their numbers.
            let r = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, 0) };
            if r >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if let Some(p) = set.iter().find(|p| p.revents & libc::POLLNVAL != 0) {
            return Ok(Some(p.fd));
        }
    }
    Ok(None)
}

/// Closes every fd of `fds`: one `close_range` per run of consecutive
/// numbers (the registry's fds of a generation that inherited them sit at
/// `3 .. 3 + n`), else one `close` each. Errors are ignored, as when an
/// `OwnedFd` is dropped.
pub(crate) fn close_all(fds: impl IntoIterator<Item = OwnedFd>) {
    use std::os::fd::IntoRawFd;
    let mut raw: Vec<RawFd> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    raw.sort_unstable();
    for (first, last) in runs(&raw) {
        // Every number of the run is one of ours, given up by
        // `into_raw_fd` above: closing them closes nothing else.
        if first == last || close_range(first, last, 0).is_err() {
            for fd in first..=last {
                // SAFETY: an fd we owned (see above), closed once.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
}

/// Whether `fd` has `FD_CLOEXEC` set.
#[cfg(test)]
pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    Ok(flags.contains(FdFlag::FD_CLOEXEC))
}

/// Sets `FD_CLOEXEC` on `fd` (with `F_SETFD`, the only call that sets it;
/// `O_CLOEXEC` in `F_SETFL` would be a silent no-op).
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    if !flags.contains(FdFlag::FD_CLOEXEC) {
        fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC))?;
    }
    Ok(())
}

/// Sets or clears `O_NONBLOCK`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let mut new = flags;
    new.set(OFlag::O_NONBLOCK, on);
    if new != flags {
        fcntl(fd, FcntlArg::F_SETFL(new))?;
    }
    Ok(())
}

/// A new, empty memory file (`memfd_create(2)`) named `name` (shown in
/// `/proc/PID/fd`), close-on-exec, that can be sealed: it lives in memory
/// only, never on a file system.
pub(crate) fn memfd_sealable(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    Ok(memfd_create(
        name,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?)
}

/// The seals that make a memory file read-only for good: no write, no
/// change of size, no further seal (`fcntl(2)`, "File Sealing").
fn final_seals() -> nix::fcntl::SealFlag {
    use nix::fcntl::SealFlag;
    SealFlag::F_SEAL_SEAL | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE
}

/// Writes `data` at the start of the empty memory file `fd` and seals it
/// read-only (see [`final_seals`]).
pub(crate) fn write_and_seal(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    let mut at: libc::off_t = 0;
    while !data.is_empty() {
        match nix::sys::uio::pwrite(fd, data, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                at += n as libc::off_t;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    fcntl(fd, FcntlArg::F_ADD_SEALS(final_seals()))?;
    Ok(())
}

/// Reads a memory file sealed read-only (see [`write_and_seal`]) whole,
/// from its start, if it is at most `max` bytes. Anything else (not a
/// memory file, not sealed, larger) is an error that says so.
pub(crate) fn read_sealed(fd: BorrowedFd<'_>, max: usize) -> io::Result<Vec<u8>> {
    let seals = match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => nix::fcntl::SealFlag::from_bits_truncate(bits),
        Err(Errno::EINVAL) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a sealable memory file (memfd)",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if !seals.contains(final_seals()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the memory file is not sealed read-only",
        ));
    }
    let size = nix::sys::stat::fstat(fd)?.st_size;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= max)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{size} bytes, more than {max}"),
            )
        })?;
    let mut buf = vec![0u8; size];
    let mut done = 0;
    while done < size {
        match nix::sys::uio::pread(fd, &mut buf[done..], done as libc::off_t) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// `fstat(fd).st_mode`.
pub(crate) fn file_mode(fd: BorrowedFd<'_>) -> io::Result<libc::mode_t> {
    Ok(nix::sys::stat::fstat(fd)?.st_mode)
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

/// Waits until one of `fds` is ready for `events` (`libc::POLLIN`, …), or
/// `deadline` passes.
///
/// Returns the `revents` of each fd (all zero on timeout). Retries on `EINTR`.
pub(crate) fn poll_until(
    fds: &[(BorrowedFd<'_>, libc::c_short)],
    deadline: Instant,
) -> io::Result<Vec<libc::c_short>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, events)| PollFd::new(*fd, PollFlags::from_bits_truncate(*events)))
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(timeout_ms(left)).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut pfds, timeout) {
            Ok(_) => {
                return Ok(pfds
                    .iter()
                    .map(|p| p.revents().map_or(0, |r| r.bits()))
                    .collect());
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A poll(2) timeout in whole milliseconds, rounded up so a wait never ends early.
fn timeout_ms(d: Duration) -> i32 {
    let ms = d.as_micros().div_ceil(1000);
    ms.min(i32::MAX as u128) as i32
}

/// `send(2)` with `MSG_NOSIGNAL`: a closed peer is `EPIPE`, never `SIGPIPE`.
pub(crate) fn send_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::sys::socket::send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One `send(2)` with `MSG_NOSIGNAL` (and `MSG_DONTWAIT` if `nonblocking`),
/// retrying on `EINTR`: the number of bytes sent.
pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8], nonblocking: bool) -> io::Result<usize> {
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        match nix::sys::socket::send(fd.as_raw_fd(), buf, flags) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `recv(2)` into `buf`, retrying on `EINTR`. `Ok(0)` is end of stream.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        match nix::sys::socket::recv(fd.as_raw_fd(), buf, MsgFlags::from_bits_truncate(flags)) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `read(2)` into `buf`, retrying on `EINTR`. `Ok(0)` is end of file.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
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

/// What one [`recvmsg`] brought.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes in the buffer.
    pub(crate) bytes: usize,
    /// The message's flags (`MSG_TRUNC`, `MSG_CTRUNC`, ...).
    pub(crate) flags: libc::c_int,
    /// The fds that came with it (`SCM_RIGHTS`), owned and close-on-exec.
    pub(crate) fds: Vec<OwnedFd>,
    /// The sender's credentials (`SCM_CREDENTIALS`, with `SO_PASSCRED`).
    pub(crate) creds: Option<libc::ucred>,
}

/// `CMSG_ALIGN`: control messages are aligned to the size of a `long`.
const fn cmsg_align(len: usize) -> usize {
    let a = std::mem::size_of::<libc::c_long>();
    (len + a - 1) & !(a - 1)
}

/// `recvmsg(2)` into `buf`, with `control` for control messages, `flags`
/// plus `MSG_CMSG_CLOEXEC`, retrying on `EINTR`. Every fd the kernel
/// installed is owned at once, so none leaks on any path — also when
/// `control` was too small (`MSG_CTRUNC`): the kernel then installs the fds
/// that fit (and closes the others), and those are ours to close. (nix
/// refuses to walk the control messages of a truncated message.)
pub(crate) fn recvmsg(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    control: &mut [u8],
    flags: libc::c_int,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid value (no name, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    let bytes = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and at `control`, both
        // valid for their lengths for the whole call.
        let n =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Walk what the kernel wrote (msg_controllen is now its length), read
    // unaligned: `control` is a byte buffer. A truncated message's last
    // header still gives the length of what it holds.
    let used = (msg.msg_controllen as usize).min(control.len());
    let header = std::mem::size_of::<libc::cmsghdr>();
    let data_at = cmsg_align(header);
    let (mut fds, mut creds) = (Vec::new(), None);
    let mut at = 0;
    while at + header <= used {
        // SAFETY: `at + header <= used <= control.len()`: a whole header
        // lies in the buffer.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(control[at..].as_ptr().cast()) };
        let len = h.cmsg_len as usize;
        if len < data_at || at + len > used {
            break;
        }
        let data = &control[at + data_at..at + len];
        match (h.cmsg_level, h.cmsg_type) {
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                for raw in data.chunks_exact(std::mem::size_of::<RawFd>()) {
                    let fd = RawFd::from_ne_bytes(raw.try_into().expect("an int"));
                    // SAFETY: SCM_RIGHTS installed this fd in our table for
                    // this call alone (close-on-exec): we own it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                if data.len() >= std::mem::size_of::<libc::ucred>() =>
            {
                // SAFETY: `data` holds a whole ucred.
                creds = Some(unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) });
            }
            _ => {}
        }
        at += cmsg_align(len);
    }
    Ok(Received {
        bytes,
        flags: msg.msg_flags,
        fds,
        creds,
    })
}

/// Receives one `sd_notify` datagram; `Ok(None)` when `flags` has
/// `MSG_DONTWAIT` and nothing is pending.
pub(crate) fn recv_notification(
    sock: BorrowedFd<'_>,
    flags: libc::c_int,
) -> io::Result<Option<Notification>> {
    use nix::sys::socket::UnixCredentials;
    let mut buf = vec![0u8; 4096];
    // Room for 253 fds and the credentials.
    let mut control = nix::cmsg_space!([RawFd; 253], UnixCredentials);
    let got = match recvmsg(sock, &mut buf, &mut control, flags) {
        Ok(got) => got,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    if got.flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        tracing::warn!(
            fds = got.fds.len(),
            "a notification was cut short (text past 4 KiB, or control data past the room for 253 fds and credentials); taking what came"
        );
    }
    buf.truncate(got.bytes);
    Ok(Some(Notification {
        text: String::from_utf8_lossy(&buf).into_owned(),
        sender: got.creds.map(|c| c.pid),
        fds: got.fds,
    }))
}

/// Whether the kernel reaps this process's children as they exit
/// (`SIGCHLD` ignored, or `SA_NOCLDWAIT`): their wait status is then lost.
pub(crate) fn children_reaped_by_kernel() -> bool {
    // SAFETY: a zeroed sigaction is a valid value to be written into.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: with a null new action, sigaction only writes the current one
    // into a valid local; nothing changes.
    let r = unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) };
    r == 0 && (old.sa_sigaction == libc::SIG_IGN || old.sa_flags & libc::SA_NOCLDWAIT != 0)
}

/// A file as `stat(2)` tells files apart: `(st_dev, st_ino)`.
pub(crate) type FileId = (u64, u64);

/// `SOCK_DIAG_BY_FAMILY`, the request of [sock_diag(7)].
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `UDIAG_SHOW_VFS`: answer with the file a Unix socket is bound to.
const UDIAG_SHOW_VFS: u32 = 0x2;
/// `UNIX_DIAG_VFS`, the attribute that carries it.
const UNIX_DIAG_VFS: u16 = 1;
/// `struct nlmsghdr`, `struct unix_diag_req`, `struct unix_diag_msg`.
const NLMSG_HEADER: usize = 16;
const UNIX_DIAG_REQ: usize = 24;
const UNIX_DIAG_MSG: usize = 16;

/// The file a Unix socket is bound to, wherever it was renamed since;
/// `None` for a socket not bound to a file (abstract, unnamed).
///
/// `getsockname` only gives the path the socket was bound at, which may have
/// been renamed or replaced since; the kernel's socket diagnostics
/// ([sock_diag(7)], `UDIAG_SHOW_VFS`) give the inode itself. Fails where
/// the kernel has no `unix_diag`: callers leave the file alone then.
///
/// [sock_diag(7)]: https://man7.org/linux/man-pages/man7/sock_diag.7.html
pub(crate) fn unix_socket_file(fd: BorrowedFd<'_>) -> io::Result<Option<FileId>> {
    // The sockfs inode of this socket names it to the kernel.
    let ino = nix::sys::stat::fstat(fd)?.st_ino;
    let ino = u32::try_from(ino)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "socket inode above 32 bits"))?;
    let mut req = Vec::with_capacity(NLMSG_HEADER + UNIX_DIAG_REQ);
    req.extend_from_slice(&((NLMSG_HEADER + UNIX_DIAG_REQ) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&ino.to_ne_bytes());
    req.extend_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie
    // socket2 creates it close-on-exec.
    let sock = socket2::Socket::new(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    let nl = std::os::fd::AsFd::as_fd(&sock);
    send(nl, &req, true)?;
    // The kernel answers before send() returns: nothing to wait for.
    let mut buf = [0u8; 1024];
    let n = recv(nl, &mut buf, libc::MSG_DONTWAIT)?;
    parse_unix_diag_vfs(&buf[..n])
}

/// Reads the answer to a `UDIAG_SHOW_VFS` request, every length checked.
fn parse_unix_diag_vfs(msg: &[u8]) -> io::Result<Option<FileId>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag answer");
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(bad)?;
    let msg = msg.get(..len).ok_or_else(bad)?;
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = u32_at(msg, NLMSG_HEADER).ok_or_else(bad)? as i32;
        return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
    }
    let mut at = NLMSG_HEADER + UNIX_DIAG_MSG;
    while at + 4 <= msg.len() {
        let attr_len = u16_at(msg, at).ok_or_else(bad)? as usize;
        let attr_kind = u16_at(msg, at + 2).ok_or_else(bad)?;
        if attr_len < 4 {
            return Err(bad());
        }
        if attr_kind == UNIX_DIAG_VFS {
            let ino = u32_at(msg, at + 4).ok_or_else(bad)?;
            let dev = u32_at(msg, at + 8).ok_or_else(bad)?;
            // The kernel's dev_t: major in the top 12 bits, minor below.
            let dev = libc::makedev(dev >> 20, dev & 0xf_ffff);
            return Ok(Some((dev, u64::from(ino))));
        }
        at += attr_len.div_ceil(4) * 4;
    }
    Ok(None)
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
        fcntl(r.as_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        assert!(!is_cloexec(r.as_fd()).unwrap());
        set_cloexec(r.as_fd()).unwrap();
        assert!(is_cloexec(r.as_fd()).unwrap());
    }

    /// `n` fds sent over a socket pair, received with control room for
    /// `room` (`MSG_CTRUNC` when fewer): what the kernel installed is ours.
    fn send_fds_receive_room(n: usize, room: usize) -> Received {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let (a, b) = socketpair_cloexec().unwrap();
        let (r, _w) = pipe_cloexec().unwrap();
        let raw = vec![r.as_raw_fd(); n];
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let iov = [io::IoSlice::new(b"x")];
        sendmsg::<()>(a.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).unwrap();
        let mut buf = [0u8; 8];
        let mut control = vec![0u8; cmsg_align(std::mem::size_of::<libc::cmsghdr>()) + 4 * room];
        recvmsg(b.as_fd(), &mut buf, &mut control, 0).unwrap()
    }

    #[test]
    fn a_truncated_control_message_leaks_no_fd() {
        let whole = send_fds_receive_room(3, 3);
        assert_eq!(whole.fds.len(), 3);
        assert_eq!(whole.flags & libc::MSG_CTRUNC, 0);
        // Room for one of three: the kernel installs one and says so; that
        // one is owned (closed on drop), not lost.
        let cut = send_fds_receive_room(3, 1);
        assert_ne!(cut.flags & libc::MSG_CTRUNC, 0);
        assert_eq!(cut.bytes, 1);
        assert_eq!(cut.fds.len(), 1, "the fd the kernel installed");
        for fd in &cut.fds {
            assert!(is_cloexec(fd.as_fd()).unwrap());
            assert!(file_mode(fd.as_fd()).unwrap() & libc::S_IFMT == libc::S_IFIFO);
        }
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

    #[test]
    fn a_sock_diag_answer_is_read_with_every_length_checked() {
        // Every prefix of a good answer, and garbage: errors, no panic.
        let mut good = Vec::new();
        good.extend_from_slice(&44u32.to_ne_bytes());
        good.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        good.extend_from_slice(&[0; 10]);
        good.extend_from_slice(&[0; UNIX_DIAG_MSG]);
        good.extend_from_slice(&12u16.to_ne_bytes());
        good.extend_from_slice(&UNIX_DIAG_VFS.to_ne_bytes());
        good.extend_from_slice(&7u32.to_ne_bytes());
        good.extend_from_slice(&((8u32 << 20) | 3).to_ne_bytes());
        assert_eq!(
            parse_unix_diag_vfs(&good).unwrap(),
            Some((libc::makedev(8, 3), 7))
        );
        for n in 0..good.len() {
            assert!(parse_unix_diag_vfs(&good[..n]).is_err(), "{n} bytes");
        }
        let mut zero_attr = good.clone();
        zero_attr[32..34].copy_from_slice(&0u16.to_ne_bytes());
        assert!(parse_unix_diag_vfs(&zero_attr).is_err());
        let mut error = good.clone();
        error[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        error[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        let e = parse_unix_diag_vfs(&error).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn a_unix_socket_knows_its_file_wherever_it_was_renamed() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("handover-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bound = dir.join("bound");
        let l = std::os::unix::net::UnixListener::bind(&bound).unwrap();
        let moved = dir.join("moved");
        std::fs::rename(&bound, &moved).unwrap();
        let meta = std::fs::metadata(&moved).unwrap();
        match unix_socket_file(l.as_fd()) {
            Ok(found) => assert_eq!(found, Some((meta.dev(), meta.ino()))),
            // A kernel without unix_diag: callers leave the file alone.
            Err(e) => eprintln!("sock_diag unavailable here: {e}"),
        }
        use std::os::linux::net::SocketAddrExt;
        let name = format!("handover-sys-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let abs = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        if let Ok(found) = unix_socket_file(abs.as_fd()) {
            assert_eq!(found, None, "an abstract socket has no file");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
