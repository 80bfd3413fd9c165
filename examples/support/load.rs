//! A small blocking HTTP/1.1 client and load generator, shared by the demo
//! and the tests. Every socket operation has a timeout; every failure is
//! counted with its reason.
#![allow(dead_code)] // each includer uses a different part

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bound on every connect, read and write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub pid: u32,
    pub close: bool,
    pub body: String,
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Writes a GET for `path` on `stream`.
pub fn send_get(stream: &mut impl Write, path: &str, keep_alive: bool) -> io::Result<()> {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {conn}\r\n\r\n"
    )?;
    stream.flush()
}

/// Reads one response from `r`.
pub fn read_response(r: &mut impl BufRead) -> io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the status line",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let (mut len, mut pid, mut close) = (0usize, 0u32, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.parse().unwrap_or(0),
                "x-pid" => pid = v.parse().unwrap_or(0),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Response {
        status,
        pid,
        close,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a new connection.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut s = connect(addr)?;
    send_get(&mut s, path, false)?;
    read_response(&mut BufReader::new(s))
}

/// One request on a new Unix socket connection.
pub fn get_unix(path: &std::path::Path) -> io::Result<Response> {
    let mut s = if let Some(name) = path.to_str().and_then(|p| p.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        std::os::unix::net::UnixStream::connect_addr(&addr)?
    } else {
        std::os::unix::net::UnixStream::connect(path)?
    };
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    send_get(&mut s, "/", false)?;
    read_response(&mut BufReader::new(s))
}

/// A keep-alive client: reuses its connection until the server says
/// `Connection: close`, then reconnects.
pub struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr) -> Self {
        KeepAlive { addr, conn: None }
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(connect(self.addr)?));
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = send_get(conn.get_mut(), path, true).and_then(|()| read_response(conn));
        match &result {
            Ok(r) if !r.close => {}
            _ => self.conn = None,
        }
        result
    }
}

/// Counts of a load run, shared by its threads.
#[derive(Default)]
pub struct Stats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Requests sent again after their connection closed before any byte of
    /// a response (only with [`Load::start_retrying`]).
    pub retried: AtomicU64,
    pub by_pid: Mutex<BTreeMap<u32, u64>>,
    /// Responses with another status than 200, by the pid that answered.
    pub failed_by_pid: Mutex<BTreeMap<u32, u64>>,
    pub errors: Mutex<Vec<String>>,
}

impl Stats {
    fn record(&self, r: io::Result<Response>) {
        match r {
            Ok(resp) if resp.status == 200 => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                *self.by_pid.lock().unwrap().entry(resp.pid).or_default() += 1;
            }
            Ok(resp) => {
                *self
                    .failed_by_pid
                    .lock()
                    .unwrap()
                    .entry(resp.pid)
                    .or_default() += 1;
                self.fail(format!("status {} from pid {}", resp.status, resp.pid))
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn fail(&self, reason: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(reason);
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.by_pid.lock().unwrap().keys().copied().collect()
    }
}

/// Whether a request failed because its connection ended before any byte
/// of the response: the server never answered it.
fn no_response(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    ) || (e.kind() == io::ErrorKind::UnexpectedEof
        && e.to_string().contains("before the status line"))
}

/// Load against `addr` until `stop` is set: `fresh` threads open a new
/// connection per request, `keep_alive` threads reuse theirs.
pub struct Load {
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, fresh: usize, keep_alive: usize) -> Load {
        Load::start_with(addr, fresh, keep_alive, false)
    }

    /// Like [`Load::start`], but a GET whose connection closed or reset
    /// before any byte of its response arrived is sent once more on a new
    /// connection, as HTTP clients and proxies do for idempotent requests
    /// (RFC 9110, 9.2.2). Counted in `Stats::retried`; a second failure
    /// counts as failed. For servers that may crash (a canary on probation),
    /// where requests in flight in the crashed process have no other way
    /// to complete.
    pub fn start_retrying(addr: SocketAddr, fresh: usize, keep_alive: usize) -> Load {
        Load::start_with(addr, fresh, keep_alive, true)
    }

    fn start_with(addr: SocketAddr, fresh: usize, keep_alive: usize, retry: bool) -> Load {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..fresh + keep_alive {
            let (stats, stop) = (stats.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut ka = (i >= fresh).then(|| KeepAlive::new(addr));
                while !stop.load(Ordering::Relaxed) {
                    let mut once = || match &mut ka {
                        Some(c) => c.get("/"),
                        None => get(addr, "/"),
                    };
                    let mut r = once();
                    if retry && r.as_ref().is_err_and(no_response) {
                        stats.retried.fetch_add(1, Ordering::Relaxed);
                        r = once();
                    }
                    stats.record(r);
                }
            }));
        }
        Load {
            stats,
            stop,
            threads,
        }
    }

    /// Waits (probing every 5 ms) until `n` requests have succeeded, at
    /// most `timeout`; whether they did.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.stats.ok() < n {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// [`Load::start`], then waits for `n` successful requests (30 s at
    /// most; panics without them).
    pub fn start_warm(addr: SocketAddr, fresh: usize, keep_alive: usize, n: u64) -> Load {
        let load = Load::start(addr, fresh, keep_alive);
        let ok = load.wait_for_ok(n, Duration::from_secs(30));
        assert!(
            ok,
            "no {n} successful requests within 30 s: {:?}",
            load.stats.errors.lock().unwrap()
        );
        load
    }

    /// Stops the threads and waits for them (each ends within one request,
    /// which is bounded by `IO_TIMEOUT`).
    pub fn stop(self) -> Arc<Stats> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.stats
    }
}
