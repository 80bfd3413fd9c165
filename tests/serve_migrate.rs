//! HTTP/1.1 keep-alive connections migrate to the successor
//! (`Server::migrate`, issue 13 item 2): under load through 20 upgrades,
//! 1,000 idle ones at once, and pipelined requests the old generation had
//! read. Real processes (tests/fixture/axum_migrate.rs), loopback,
//! kernel-chosen ports.
//!
//! `cargo test --test serve_migrate` does not build the fixture: run
//! `cargo build --all-targets --all-features` first.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, procs, wait_until};

/// One test at a time: each runs a chain of servers with many connections,
/// and they should not compete with each other for the 2 cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixture() -> PathBuf {
    let bin = common::server_bin().with_file_name("fixture_axum_migrate");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --all-targets --all-features`",
        bin.display()
    );
    bin
}

/// The generations of one fixture service.
struct Chain {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
    /// Every generation's pid, and whether it was reaped.
    pids: Vec<(u32, bool)>,
}

impl Chain {
    fn start(args: &[&str]) -> Chain {
        procs::become_subreaper();
        let mut child = Command::new(fixture())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the fixture");
        let lines = procs::line_channel(child.stdout.take().expect("piped"));
        let mut c = Chain {
            child,
            lines,
            addr: "0.0.0.0:0".parse().unwrap(),
            pids: Vec::new(),
        };
        let (addr, pid) = c.wait_listening();
        c.addr = addr;
        c.pids.push((pid, false));
        c
    }

    /// The next line that starts with `prefix`, within EVENT_TIMEOUT.
    fn wait_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{prefix}` line in time"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    fn wait_listening(&self) -> (SocketAddr, u32) {
        let line = self.wait_line("listening on ");
        let words: Vec<&str> = line.split_whitespace().collect();
        (words[2].parse().unwrap(), words[4].parse().unwrap())
    }

    fn pid(&self) -> u32 {
        self.pids.last().unwrap().0
    }

    /// SIGHUP; waits for the successor and the old generation's exit line
    /// and status (0). Returns (successor, the old one's drain in ms, when
    /// the successor was seen serving, when the old one was reaped).
    fn upgrade(&mut self) -> (u32, u64, Instant, Instant) {
        let old = self.pid();
        procs::signal(old, libc::SIGHUP).unwrap();
        let (addr, new) = self.wait_listening();
        let serving = Instant::now();
        assert_eq!(addr, self.addr);
        self.pids.push((new, false));
        let exit = self.wait_line(&format!("exit pid={old} "));
        let status = procs::reap(old, EVENT_TIMEOUT).expect("reap the old generation");
        let reaped = Instant::now();
        assert!(status.success(), "old generation {old}: {status}");
        self.pids.iter_mut().for_each(|p| p.1 |= p.0 == old);
        assert!(exit.ends_with(" remaining=0"), "{exit}");
        let drain_ms = field(&exit, "drain_ms");
        (new, drain_ms, serving, reaped)
    }

    fn stop(&mut self) {
        let pid = self.pid();
        procs::signal(pid, libc::SIGTERM).unwrap();
        let status = procs::reap(pid, EVENT_TIMEOUT).expect("reap the last generation");
        assert!(status.success(), "last generation {pid}: {status}");
        self.pids.iter_mut().for_each(|p| p.1 |= p.0 == pid);
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for (pid, reaped) in self.pids.clone() {
            if !reaped {
                let _ = procs::signal(pid, libc::SIGKILL);
                let _ = procs::reap(pid, Duration::from_secs(5));
            }
        }
        let _ = self.child.try_wait();
    }
}

fn field(line: &str, name: &str) -> u64 {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// One keep-alive HTTP/1.1 client connection, read by hand: every
/// response is checked for `Connection: close` (the server asking the
/// client to leave counts as a close).
struct Conn {
    reader: BufReader<TcpStream>,
}

/// A response: status, X-Pid, body.
type Answer = (u16, u32, String);

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, paths: &[&str]) -> Result<(), String> {
        let mut out = String::new();
        for path in paths {
            out.push_str(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        }
        self.reader
            .get_mut()
            .write_all(out.as_bytes())
            .map_err(|e| format!("write: {e}"))
    }

    fn read(&mut self) -> Result<Answer, String> {
        match self.read_any()? {
            (answer, false) => Ok(answer),
            (answer, true) => Err(format!("{answer:?} answered `Connection: close`")),
        }
    }

    /// A response, and whether it said `Connection: close`.
    fn read_any(&mut self) -> Result<(Answer, bool), String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err("closed by the server".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let (mut len, mut pid, mut close) = (0usize, 0u32, false);
        loop {
            let mut h = String::new();
            match self.reader.read_line(&mut h) {
                Ok(0) => return Err("closed by the server mid-response".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').ok_or("bad header")?;
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => len = value.parse().map_err(|_| "bad length")?,
                "x-pid" => pid = value.parse().map_err(|_| "bad x-pid")?,
                "connection" => close |= value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("body: {e}"))?;
        let body = String::from_utf8_lossy(&body).into_owned();
        Ok(((status, pid, body), close))
    }

    fn get(&mut self, path: &str) -> Result<Answer, String> {
        self.send(&[path])?;
        self.read()
    }
}

fn raise_nofile() {
    // SAFETY: a plain C struct, filled in by getrlimit.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
    }
}

#[test]
fn keep_alive_connections_under_load_move_through_20_upgrades() {
    let _serial = serial();
    const CLIENTS: usize = 64;
    let mut chain = Chain::start(&["--migrate"]);
    let stop = Arc::new(AtomicBool::new(false));
    let by_pid = Arc::new(Mutex::new(BTreeMap::<u32, u64>::new()));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (stop, by_pid, addr) = (stop.clone(), by_pid.clone(), chain.addr);
        clients.push(std::thread::spawn(move || {
            let mut conn = Conn::open(addr);
            let (mut ok, mut pids) = (0u64, BTreeSet::new());
            while !stop.load(Ordering::Relaxed) {
                match conn.get("/") {
                    Ok((200, pid, body)) if body == "hello\n" => {
                        ok += 1;
                        pids.insert(pid);
                        *by_pid.lock().unwrap().entry(pid).or_default() += 1;
                    }
                    Ok(other) => return Err(format!("after {ok} ok: unexpected {other:?}")),
                    Err(e) => return Err(format!("after {ok} ok: {e}")),
                }
            }
            Ok((ok, pids))
        }));
    }
    let answered = |pid: u32| by_pid.lock().unwrap().get(&pid).copied().unwrap_or(0);
    let first = chain.pid();
    wait_until("the load to start", EVENT_TIMEOUT, || answered(first) > 500);
    let mut drains = Vec::new();
    for _ in 0..20 {
        let (new, drain_ms, _, _) = chain.upgrade();
        drains.push(drain_ms);
        wait_until("the new generation to answer", EVENT_TIMEOUT, || {
            answered(new) > 2 * CLIENTS as u64
        });
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (i, c) in clients.into_iter().enumerate() {
        let (ok, pids) = c
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        total += ok;
        assert!(
            pids.len() >= 2,
            "client {i}: one connection, answered by {pids:?} only"
        );
    }
    let generations: Vec<u32> = chain.pids.iter().map(|p| p.0).collect();
    let by_pid = by_pid.lock().unwrap().clone();
    for pid in &generations {
        assert!(by_pid.contains_key(pid), "generation {pid} never answered");
    }
    eprintln!(
        "{CLIENTS} keep-alive connections, 20 upgrades: {total} requests, 0 failed, \
         0 closed by the server; old generations' drains (ms): {drains:?}"
    );
    chain.stop();
}

#[test]
fn a_thousand_idle_connections_move_and_the_old_generation_exits_at_once() {
    let _serial = serial();
    const IDLE: usize = 1000;
    raise_nofile();
    // A drain timeout far beyond the bound: exiting at it would fail.
    let mut chain = Chain::start(&["--migrate", "--drain-timeout", "30"]);
    let old = chain.pid();
    let mut conns: Vec<Conn> = (0..IDLE).map(|_| Conn::open(chain.addr)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let (status, pid, _) = c.get("/").unwrap_or_else(|e| panic!("conn {i}: {e}"));
        assert_eq!((status, pid), (200, old));
    }
    let (new, drain_ms, serving, reaped) = chain.upgrade();
    let exit_after = reaped.duration_since(serving);
    eprintln!(
        "{IDLE} idle connections: the old generation's drain took {drain_ms} ms; \
         reaped {} ms after its successor served",
        exit_after.as_millis()
    );
    // What this test proves is that the old generation does not wait for
    // its idle connections (lame duck would hold it for the 30 s deadline).
    // How fast it lets go is a speed goal, measured in the benchmark
    // (`bench migrate`, BENCHMARKS.md: 79 ms for 1,000 in a release build,
    // the bound being 100 ms), not bounded in a debug-build test on a
    // shared machine.
    assert!(
        drain_ms < 3_000,
        "the old generation drained for {drain_ms} ms: it waited for its idle connections"
    );
    // (Not bounded here: it also holds the commit itself, and the exit of
    // a process that held 1,000 sockets.)
    let mut moved = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        let (status, pid, _) = c.get("/").unwrap_or_else(|e| panic!("conn {i}: {e}"));
        assert_eq!((status, pid), (200, new), "conn {i}");
        moved += 1;
    }
    assert_eq!(moved, IDLE);
    drop(conns); // a stop is the lame-duck drain: it waits for idle clients
    chain.stop();
}

/// The bytes the kernel holds unread for the TCP connection from `local`
/// to `peer` (ports on 127.0.0.1), from /proc/net/tcp.
fn unread_in_kernel(local: u16, peer: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    let (a, b) = (format!(":{local:04X} "), format!(":{peer:04X} "));
    table
        .lines()
        .skip(1)
        .filter(|l| l.contains(&a) && l.contains(&b))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if port(f.get(1)?)? != local || port(f.get(2)?)? != peer {
                return None;
            }
            u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()
        })
}

#[test]
fn pipelined_requests_read_by_the_old_generation_are_answered_by_the_successor_in_order() {
    let _serial = serial();
    let mut chain = Chain::start(&["--migrate"]);
    let old = chain.pid();
    let mut conn = Conn::open(chain.addr);
    assert_eq!(conn.get("/").unwrap().1, old);
    // A request that is answered only when the drain starts, and three
    // behind it, in one write: the old generation reads all of them.
    conn.send(&["/until-drain", "/n/1", "/n/2", "/n/3"])
        .unwrap();
    let peer = conn.reader.get_ref().local_addr().unwrap().port();
    wait_until(
        "the old generation to read the pipelined requests",
        EVENT_TIMEOUT,
        || unread_in_kernel(chain.addr.port(), peer) == Some(0),
    );
    let (new, _, _, _) = chain.upgrade();
    let first = conn.read().unwrap();
    assert_eq!(first, (200, old, "drained\n".to_owned()));
    for n in 1..=3 {
        let answer = conn.read().unwrap();
        assert_eq!(answer, (200, new, format!("{n}\n")), "request {n}");
    }
    assert_eq!(conn.get("/n/4").unwrap(), (200, new, "4\n".to_owned()));
    drop(conn); // a stop is the lame-duck drain: it waits for idle clients
    chain.stop();
}

#[test]
fn a_connection_the_successor_does_not_take_gets_the_lame_duck_drain() {
    let _serial = serial();
    // Generation 2 does not take connections (an older build, say).
    let mut chain = Chain::start(&["--migrate", "--migrate-below", "2"]);
    let old = chain.pid();
    let mut conn = Conn::open(chain.addr);
    assert_eq!(conn.get("/").unwrap().1, old);
    procs::signal(old, libc::SIGHUP).unwrap();
    let (_, new) = chain.wait_listening();
    chain.pids.push((new, false));
    // Until its drain starts (after the commit) the old generation answers
    // as usual; then, told at the successor's ready message that it takes
    // no connections, it answers the next request as a lame duck at once.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        conn.send(&["/"]).unwrap();
        let (answer, close) = conn.read_any().unwrap();
        assert_eq!((answer.0, answer.1), (200, old));
        if close {
            break;
        }
        assert!(Instant::now() < deadline, "never answered as a lame duck");
    }
    assert_eq!(conn.read().unwrap_err(), "closed by the server");
    let exit = chain.wait_line(&format!("exit pid={old} "));
    let status = procs::reap(old, EVENT_TIMEOUT).expect("reap the old generation");
    assert!(status.success(), "{status}");
    chain.pids.iter_mut().for_each(|p| p.1 |= p.0 == old);
    assert!(exit.ends_with(" remaining=0"), "{exit}");
    let drain_ms = field(&exit, "drain_ms");
    // Neither the drain deadline nor an offer (waited for 5 s) held it.
    assert!(drain_ms < 4_000, "waited: {exit}");
    // The successor serves new connections.
    assert_eq!(Conn::open(chain.addr).get("/").unwrap().1, new);
    chain.stop();
}
