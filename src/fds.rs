//! The named fd registry: inherit-or-bind, validation of inherited fds, and
//! the list of fds handed to a successor.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use crate::env;
use crate::error::Error;
use crate::sys;

/// Options for sockets that `handover` binds itself (an inherited socket
/// keeps the options it was created with).
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub(crate) backlog: i32,
    pub(crate) reuse_port: bool,
    pub(crate) only_v6: Option<bool>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            backlog: 1024,
            reuse_port: false,
            only_v6: None,
        }
    }
}

impl ListenOptions {
    /// The defaults: backlog 1024, no `SO_REUSEPORT`, the system's
    /// `IPV6_V6ONLY` default.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `listen(2)` backlog. Default: 1024 (the kernel caps it at
    /// `net.core.somaxconn`).
    #[must_use]
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Sets `SO_REUSEPORT`, so that several sockets (under different names)
    /// can bind the same address. Default: off.
    ///
    /// Handoff never needs it: old and new generation share one socket.
    #[must_use]
    pub fn reuse_port(mut self, on: bool) -> Self {
        self.reuse_port = on;
        self
    }

    /// Sets `IPV6_V6ONLY` on IPv6 sockets. Default: the system's
    /// (`net.ipv6.bindv6only`, usually off: `[::]` also accepts IPv4).
    #[must_use]
    pub fn only_v6(mut self, on: bool) -> Self {
        self.only_v6 = Some(on);
        self
    }
}

/// What a name stands for, and so how an inherited fd is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Want {
    TcpListener(SocketAddr),
    Udp(SocketAddr),
    UnixListener(PathBuf),
    UnixDatagram(PathBuf),
    /// A Unix stream listener whose bound name may differ from its path
    /// (bound elsewhere, then renamed into place).
    UnixListenerAt(PathBuf),
    Any,
}

impl Want {
    fn describe(&self) -> String {
        match self {
            Want::TcpListener(a) => format!("a TCP listener on {a}"),
            Want::Udp(a) => format!("a UDP socket on {a}"),
            Want::UnixListener(p) => format!("a Unix stream listener on {}", p.display()),
            Want::UnixDatagram(p) => format!("a Unix datagram socket on {}", p.display()),
            Want::UnixListenerAt(p) => format!("a Unix stream listener for {}", p.display()),
            Want::Any => "an open fd".to_owned(),
        }
    }
}

/// The end of a chain of indices (see [`Registry`]).
const NONE: u32 = u32::MAX;

/// A registered fd: claimed from the inherited ones, or made by this
/// generation.
struct Entry {
    /// Its name: an index into [`Names::named`].
    name: u32,
    want: Want,
    fd: OwnedFd,
    /// The next registered fd of the same name, or [`NONE`].
    next: u32,
}

/// An inherited fd, until it is claimed.
struct Slot {
    /// Its name: an index into [`Names::named`].
    name: u32,
    /// `None` once claimed.
    fd: Option<OwnedFd>,
    /// The next inherited fd of the same name, in the order they came, or
    /// [`NONE`].
    next: u32,
}

/// One name, and the chains of the fds under it (indices into
/// `Registry::inherited` and `Registry::registered`).
struct Named {
    /// Where the name is in [`Names::buf`].
    start: u32,
    len: u32,
    /// The next name with the same hash, or [`NONE`].
    same_hash: u32,
    /// The first inherited fd of this name that may still be unclaimed,
    /// and the last one (while the registry is built).
    inherited: u32,
    inherited_last: u32,
    /// The first and last registered fds of this name.
    registered: u32,
    registered_last: u32,
}

/// Every name the registry knows, each stored once in one buffer: no
/// allocation (and no reference count) per name.
struct Names {
    buf: String,
    named: Vec<Named>,
    /// The first name of each hash (SipHash with a random key, as a
    /// `HashMap` of strings would use), the others chained by `same_hash`.
    index: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    hasher: RandomState,
}

/// A `Hasher` for keys that are already hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a `u64`); fold anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Names {
    fn with_capacity(n: usize) -> Names {
        Names {
            buf: String::with_capacity(n * 8),
            named: Vec::with_capacity(n),
            index: HashMap::with_capacity_and_hasher(n, Default::default()),
            hasher: RandomState::new(),
        }
    }

    fn str(&self, i: u32) -> &str {
        let n = &self.named[i as usize];
        &self.buf[n.start as usize..(n.start + n.len) as usize]
    }

    /// The index of `name` under `hash`, or the head of that hash's chain
    /// ([`NONE`] if none) where a new name would go.
    fn walk(&self, hash: u64, name: &str) -> Result<u32, u32> {
        let head = self.index.get(&hash).copied().unwrap_or(NONE);
        let mut i = head;
        while i != NONE {
            if self.str(i) == name {
                return Ok(i);
            }
            i = self.named[i as usize].same_hash;
        }
        Err(head)
    }

    /// The index of `name`, if the registry knows it.
    fn find(&self, name: &str) -> Option<u32> {
        self.walk(self.hasher.hash_one(name), name).ok()
    }

    /// The index of `name`, added if new.
    fn find_or_add(&mut self, name: &str) -> u32 {
        let hash = self.hasher.hash_one(name);
        let head = match self.walk(hash, name) {
            Ok(i) => return i,
            Err(head) => head,
        };
        let i = self.named.len() as u32;
        self.named.push(Named {
            start: self.buf.len() as u32,
            len: name.len() as u32,
            same_hash: head,
            inherited: NONE,
            inherited_last: NONE,
            registered: NONE,
            registered_last: NONE,
        });
        self.buf.push_str(name);
        self.index.insert(hash, i);
        i
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.named.clear();
        self.index.clear();
    }
}

/// The fds of this generation: those inherited and not yet claimed, and
/// those registered (claimed or bound) that a successor will get.
///
/// Built for thousands of fds: one hashed look-up of the name per claim
/// (every name is kept once, the fds of a name are chained by index), no
/// allocation per fd but the vectors' growth, and the fds of a generation
/// closed a range at a time (`close_range`).
pub(crate) struct Registry {
    /// Inherited fds, in the order they came.
    inherited: Vec<Slot>,
    registered: Vec<Entry>,
    names: Names,
}

impl Registry {
    pub(crate) fn new(inherited: Vec<(String, OwnedFd)>) -> Self {
        let mut names = Names::with_capacity(inherited.len());
        let mut slots: Vec<Slot> = Vec::with_capacity(inherited.len());
        for (name, fd) in inherited {
            let i = slots.len() as u32;
            let n = names.find_or_add(&name);
            let named = &mut names.named[n as usize];
            if named.inherited_last == NONE {
                named.inherited = i;
            } else {
                slots[named.inherited_last as usize].next = i;
            }
            named.inherited_last = i;
            slots.push(Slot {
                name: n,
                fd: Some(fd),
                next: NONE,
            });
        }
        Registry {
            inherited: slots,
            registered: Vec::new(),
            names,
        }
    }

    /// Returns a copy of the fd named `name`: the inherited one if there is
    /// one that passes the checks for `want`, else a new one from `create`.
    /// The registry keeps its own copy, for the successor.
    ///
    /// Returns the fd and whether it was inherited.
    pub(crate) fn claim(
        &mut self,
        name: &str,
        want: Want,
        create: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> Result<(OwnedFd, bool), Error> {
        env::validate_name(name)?;
        if name == crate::secrets::FD_NAME {
            return Err(Error::InvalidName {
                name: name.to_owned(),
                reason: "reserved for the handover's own secrets",
            });
        }
        // One name may stand for several sockets of one kind on different
        // addresses (a systemd .socket unit with several Listen lines gives
        // them all the unit's name), never for two kinds or one address twice.
        let conflict = |e: &Entry| {
            e.want == want
                || std::mem::discriminant(&e.want) != std::mem::discriminant(&want)
                || want == Want::Any
        };
        let n = self.names.find_or_add(name);
        let named = &mut self.names.named[n as usize];
        let mut i = named.registered;
        while i != NONE {
            let e = &self.registered[i as usize];
            if conflict(e) {
                return Err(Error::AlreadyRegistered {
                    name: name.to_owned(),
                });
            }
            i = e.next;
        }
        // The first inherited fd of this name, in the order they came, that
        // passes the checks.
        let mut first_err = None;
        let mut found = None;
        let mut i = named.inherited;
        while i != NONE {
            let slot = &self.inherited[i as usize];
            if let Some(fd) = &slot.fd {
                match check(fd.as_fd(), name, &want) {
                    Ok(()) => {
                        found = Some(i);
                        break;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            } else if i == named.inherited {
                // Claimed: the chain starts after it from now on.
                named.inherited = slot.next;
            }
            i = slot.next;
        }
        let (fd, inherited) = match (found, first_err) {
            (Some(i), _) => {
                let slot = &mut self.inherited[i as usize];
                if i == named.inherited {
                    named.inherited = slot.next;
                }
                (slot.fd.take().expect("found unclaimed"), true)
            }
            (None, Some(e)) => return Err(e),
            (None, None) => {
                let fd = create()
                    .map_err(|e| Error::io(format!("cannot create {}", want.describe()), e))?;
                (fd, false)
            }
        };
        if want != Want::Any {
            sys::set_nonblocking(fd.as_fd(), true)
                .map_err(|e| Error::io(format!("cannot make fd {name:?} non-blocking"), e))?;
        }
        let copy = fd
            .try_clone()
            .map_err(|e| Error::io(format!("cannot duplicate fd {name:?}"), e))?;
        let idx = self.registered.len() as u32;
        if named.registered_last == NONE {
            named.registered = idx;
        } else {
            self.registered[named.registered_last as usize].next = idx;
        }
        named.registered_last = idx;
        self.registered.push(Entry {
            name: n,
            want,
            fd,
            next: NONE,
        });
        Ok((copy, inherited))
    }

    /// Closes the inherited fds nobody claimed; returns their names.
    pub(crate) fn close_unclaimed(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        let mut fds = Vec::new();
        for slot in self.inherited.drain(..) {
            if let Some(fd) = slot.fd {
                names.push(self.names.str(slot.name).to_owned());
                fds.push(fd);
            }
        }
        sys::close_all(fds);
        for named in &mut self.names.named {
            named.inherited = NONE;
            named.inherited_last = NONE;
        }
        names.sort();
        names
    }

    /// The fds for a successor, in order, with their names.
    pub(crate) fn handed(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.registered
            .iter()
            .map(|e| (self.names.str(e.name), e.fd.as_fd()))
            .collect()
    }

    /// The registered fds named `name`, with what each stands for.
    pub(crate) fn find(&self, name: &str) -> Vec<(&Want, BorrowedFd<'_>)> {
        let mut out = Vec::new();
        let n = self.names.find(name);
        let mut i = n.map_or(NONE, |n| self.names.named[n as usize].registered);
        while i != NONE {
            let e = &self.registered[i as usize];
            out.push((&e.want, e.fd.as_fd()));
            i = e.next;
        }
        out
    }

    /// Drops this generation's copies of every fd (after a handover, and at
    /// a stop): a range at a time.
    pub(crate) fn clear(&mut self) {
        let inherited = self.inherited.drain(..).filter_map(|s| s.fd);
        let registered = self.registered.drain(..).map(|e| e.fd);
        sys::close_all(inherited.chain(registered));
        self.names.clear();
    }
}

fn invalid(fd: BorrowedFd<'_>, name: &str, reason: String) -> Error {
    Error::InvalidFd {
        fd: fd.as_raw_fd(),
        name: name.to_owned(),
        reason,
    }
}

fn family_name(d: Domain) -> String {
    if d == Domain::IPV4 {
        "IPv4 (AF_INET)".into()
    } else if d == Domain::IPV6 {
        "IPv6 (AF_INET6)".into()
    } else if d == Domain::UNIX {
        "Unix (AF_UNIX)".into()
    } else {
        format!("{d:?}")
    }
}

fn type_name(t: Type) -> String {
    if t == Type::STREAM {
        "stream (SOCK_STREAM)".into()
    } else if t == Type::DGRAM {
        "datagram (SOCK_DGRAM)".into()
    } else {
        format!("{t:?}")
    }
}

/// Checks that an inherited fd is what `want` describes: a socket of the
/// right type and family, listening if it should, bound to the address asked
/// for (any port where port 0 was asked for).
pub(crate) fn check(fd: BorrowedFd<'_>, name: &str, want: &Want) -> Result<(), Error> {
    let io_err = |what: &str, e: io::Error| invalid(fd, name, format!("{what} failed: {e}"));
    if *want == Want::Any {
        // Adopting it proved it open; what it is, is the application's
        // business.
        return Ok(());
    }
    // Three calls per socket: its type, whether it listens, its address
    // (which carries the family). A file that is not a socket fails the
    // first with ENOTSOCK, and only then is it looked at closer.
    let not_a_socket = |e: io::Error| {
        if e.raw_os_error() != Some(libc::ENOTSOCK) {
            return io_err("getsockopt(SO_TYPE)", e);
        }
        let found = match sys::file_mode(fd) {
            Ok(mode) => sys::describe_mode(mode),
            Err(_) => "a file that is not a socket",
        };
        invalid(
            fd,
            name,
            format!("expected {}, found {found}", want.describe()),
        )
    };
    let sock = SockRef::from(&fd);
    let (want_type, want_domain, listening) = match want {
        Want::TcpListener(a) => (Type::STREAM, Domain::for_address(*a), true),
        Want::Udp(a) => (Type::DGRAM, Domain::for_address(*a), false),
        Want::UnixListener(_) | Want::UnixListenerAt(_) => (Type::STREAM, Domain::UNIX, true),
        Want::UnixDatagram(_) => (Type::DGRAM, Domain::UNIX, false),
        Want::Any => unreachable!("handled above"),
    };
    let ty = sock.r#type().map_err(not_a_socket)?;
    let local = sock.local_addr().map_err(|e| io_err("getsockname", e))?;
    let domain = Domain::from(i32::from(local.family()));
    if domain != want_domain {
        return Err(invalid(
            fd,
            name,
            format!(
                "expected {}: family {}, found family {}",
                want.describe(),
                family_name(want_domain),
                family_name(domain)
            ),
        ));
    }
    if ty != want_type {
        return Err(invalid(
            fd,
            name,
            format!(
                "expected {}: type {}, found type {}",
                want.describe(),
                type_name(want_type),
                type_name(ty)
            ),
        ));
    }
    if listening
        && !sock
            .is_listener()
            .map_err(|e| io_err("getsockopt(SO_ACCEPTCONN)", e))?
    {
        let peer = sock.peer_addr().ok().map(|p| describe_sockaddr(&p));
        let state = match peer {
            Some(p) => format!("a connected socket (peer {p})"),
            None => "a socket that is not listening".to_owned(),
        };
        return Err(invalid(
            fd,
            name,
            format!("expected {}, found {state}", want.describe()),
        ));
    }
    let matches = match want {
        Want::TcpListener(a) | Want::Udp(a) => match local.as_socket() {
            Some(l) => l.ip() == a.ip() && (a.port() == 0 || l.port() == a.port()),
            None => false,
        },
        Want::UnixListener(p) | Want::UnixDatagram(p) => unix_addr_matches(&local, p),
        Want::UnixListenerAt(_) | Want::Any => true,
    };
    if !matches {
        return Err(invalid(
            fd,
            name,
            format!(
                "expected {}, found one bound to {} (an inherited socket is never \
                 replaced under its name: to serve a new address without a restart, \
                 give it a new name; the old one is closed at ready() and the old \
                 generation drains it)",
                want.describe(),
                describe_sockaddr(&local)
            ),
        ));
    }
    Ok(())
}

fn describe_sockaddr(a: &SockAddr) -> String {
    if let Some(s) = a.as_socket() {
        return s.to_string();
    }
    if let Some(p) = a.as_pathname() {
        return p.display().to_string();
    }
    if let Some(n) = a.as_abstract_namespace() {
        return format!("@{}", String::from_utf8_lossy(n));
    }
    if a.is_unnamed() {
        return "an unnamed Unix address".to_owned();
    }
    "an unknown address".to_owned()
}

/// Unix socket paths follow systemd's convention: a leading `@` names an
/// abstract socket.
fn abstract_name(path: &Path) -> Option<&[u8]> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().strip_prefix(b"@")
}

fn unix_addr_matches(local: &SockAddr, want: &Path) -> bool {
    match abstract_name(want) {
        Some(name) => local.as_abstract_namespace() == Some(name),
        None => local.as_pathname() == Some(want),
    }
}

fn unix_sockaddr(path: &Path) -> io::Result<SockAddr> {
    use std::os::unix::ffi::OsStrExt;
    match abstract_name(path) {
        Some(name) => {
            let mut bytes = Vec::with_capacity(name.len() + 1);
            bytes.push(0);
            bytes.extend_from_slice(name);
            SockAddr::unix(std::ffi::OsStr::from_bytes(&bytes))
        }
        None => SockAddr::unix(path),
    }
}

/// Binds (and listens on) a new close-on-exec socket.
fn bind(
    domain: Domain,
    ty: Type,
    addr: &SockAddr,
    opts: &ListenOptions,
    listen: bool,
) -> io::Result<OwnedFd> {
    // socket2 creates sockets with SOCK_CLOEXEC on Linux.
    let s = Socket::new(domain, ty, None)?;
    if domain != Domain::UNIX {
        s.set_reuse_address(true)?;
        if opts.reuse_port {
            s.set_reuse_port(true)?;
        }
        if domain == Domain::IPV6 {
            if let Some(v6) = opts.only_v6 {
                s.set_only_v6(v6)?;
            }
        }
    }
    s.bind(addr)?;
    if listen {
        s.listen(opts.backlog)?;
    }
    Ok(s.into())
}

pub(crate) fn bind_tcp(addr: SocketAddr, opts: &ListenOptions) -> io::Result<OwnedFd> {
    bind(
        Domain::for_address(addr),
        Type::STREAM,
        &addr.into(),
        opts,
        true,
    )
}

pub(crate) fn bind_udp(addr: SocketAddr, opts: &ListenOptions) -> io::Result<OwnedFd> {
    bind(
        Domain::for_address(addr),
        Type::DGRAM,
        &addr.into(),
        opts,
        false,
    )
}

pub(crate) fn bind_unix(path: &Path, ty: Type, opts: &ListenOptions) -> io::Result<OwnedFd> {
    let addr = unix_sockaddr(path)?;
    if abstract_name(path).is_none() {
        remove_stale_socket(path, ty)?;
    }
    bind(Domain::UNIX, ty, &addr, opts, ty == Type::STREAM)
}

/// A socket file left behind by a process that is gone is removed; a live
/// one, or a file that is not a socket, is left alone and reported.
fn remove_stale_socket(path: &Path, ty: Type) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    let probe = Socket::new(Domain::UNIX, ty, None)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::debug!(path = %path.display(), "removing stale Unix socket");
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// Takes ownership of the fds listed in the environment, making each
/// close-on-exec so that no other child inherits it, and checking that each
/// is open. For thousands of fds this is two system calls, not one per fd:
/// `close_range(CLOSE_RANGE_CLOEXEC)` over the listed range (`3 .. 3 + n`),
/// then a `poll` that reports a number that is not open (see
/// [`sys::mark_cloexec_all`], [`sys::first_not_open`]). On an error nothing
/// is adopted: the fds stay open, close-on-exec, and the process is not
/// going to serve.
pub(crate) fn adopt(list: Vec<(String, RawFd)>) -> Result<Vec<(String, OwnedFd)>, Error> {
    use std::os::fd::FromRawFd;
    let mut raw: Vec<RawFd> = list.iter().map(|(_, fd)| *fd).collect();
    raw.sort_unstable();
    raw.dedup();
    sys::mark_cloexec_all(&raw);
    let not_open = match sys::first_not_open(&raw) {
        Ok(found) => found.map(|fd| (fd, io::Error::from_raw_os_error(libc::EBADF))),
        // poll itself failed (out of memory): one fcntl per fd, which also
        // tells whether it is open.
        Err(_) => raw
            .iter()
            .find_map(|&fd| sys::mark_cloexec_raw(fd).err().map(|e| (fd, e))),
    };
    if let Some((fd, e)) = not_open {
        let name = list.iter().find(|(_, f)| *f == fd).map(|(n, _)| n.clone());
        return Err(Error::InvalidFd {
            fd,
            name: name.unwrap_or_default(),
            reason: format!("LISTEN_FDS lists it, but it is not open ({e})"),
        });
    }
    if raw.len() != list.len() {
        // `env::decode` lists each fd once; anything else would be two
        // owners of one fd.
        return Err(Error::InvalidFd {
            fd: raw.first().copied().unwrap_or(-1),
            name: String::new(),
            reason: "listed twice".to_owned(),
        });
    }
    Ok(list
        .into_iter()
        .map(|(name, raw)| {
            // SAFETY: the fd is open (checked above), listed once, and the
            // LISTEN_* protocol, whose LISTEN_PID names this process, hands
            // its ownership to us. The caller guarantees this runs once per
            // process (see `TAKEN` in builder.rs), so no other owner exists.
            (name, unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .collect())
}
