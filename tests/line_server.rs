//! examples/line_server through real upgrades: established connections,
//! with their sequence numbers and unread bytes, move to each successor.
//!
//! The successor that dies is a fixture: this test binary, installed where
//! the server's binary was (as a bad deploy would be), re-exec'd to run
//! `fixture_successor_that_exits` (a no-op in a normal test run).
//!
//! Plain `cargo test` builds the example; `cargo test --test line_server`
//! alone does not: build it first (`cargo build --example line_server`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, Server, TempDir, field, field_u32, procs, wait_until};
use handover::{Handover, Migrated};

/// The tests here start server chains and load the machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// examples/line_server, built by `cargo test`.
fn line_server() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples")
        .join("line_server");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test` (which builds the examples) or \
         `cargo build --example line_server` first",
        bin.display()
    );
    bin
}

/// One answer: `<seq> <pid> <line>`.
fn parse(answer: &str) -> Option<(u64, u32, &str)> {
    let mut it = answer.trim_end_matches('\n').splitn(3, ' ');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?,
    ))
}

/// A client on one connection for its whole life.
struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    id: usize,
    /// Lines sent, and so the sequence number of the next answer.
    sent: u64,
}

impl Client {
    fn connect(addr: SocketAddr, id: usize) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        // Each half of a line goes out at once (no Nagle wait for an ACK).
        stream.set_nodelay(true).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client {
            stream,
            reader,
            id,
            sent: 0,
        }
    }

    /// Sends the next line in two writes (so that a generation sometimes
    /// hands the connection over holding half of it) and reads its answer:
    /// its pid, or why it was wrong.
    fn exchange(&mut self) -> Result<u32, String> {
        self.sent += 1;
        let line = format!("c{} m{}", self.id, self.sent);
        let (a, b) = line.split_at(line.len() / 2);
        self.stream
            .write_all(a.as_bytes())
            .map_err(|e| e.to_string())?;
        std::thread::yield_now();
        self.stream
            .write_all(format!("{b}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let answer = self.read_answer()?;
        match parse(&answer) {
            Some((seq, pid, echo)) if seq == self.sent && echo == line => Ok(pid),
            _ => Err(format!(
                "client {}: sent {line:?} as line {}, answered {answer:?}",
                self.id, self.sent
            )),
        }
    }

    /// Sends the first half of the next line and waits until the server
    /// has read it (the kernel holds no unread byte of this connection).
    fn send_half(&mut self) -> String {
        self.sent += 1;
        let line = format!("c{} m{}", self.id, self.sent);
        let (a, _) = line.split_at(line.len() / 2);
        self.stream.write_all(a.as_bytes()).unwrap();
        let (local, peer) = (
            self.stream.peer_addr().unwrap(),
            self.stream.local_addr().unwrap(),
        );
        wait_until("the server read half a line", EVENT_TIMEOUT, || {
            unread_in_kernel(local.port(), peer.port()) == Some(0)
        });
        line
    }

    /// Sends the rest of `line` and checks its answer; returns its pid.
    fn send_rest(&mut self, line: &str) -> u32 {
        let (_, b) = line.split_at(line.len() / 2);
        self.stream.write_all(format!("{b}\n").as_bytes()).unwrap();
        let answer = self.read_answer().unwrap();
        match parse(&answer) {
            Some((seq, pid, echo)) if seq == self.sent && echo == line => pid,
            _ => panic!("sent {line:?} as line {}, answered {answer:?}", self.sent),
        }
    }

    fn read_answer(&mut self) -> Result<String, String> {
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => Err(format!(
                "client {}: closed by the server after {} lines",
                self.id, self.sent
            )),
            Ok(_) => Ok(answer),
            Err(e) => Err(format!("client {}: {e}", self.id)),
        }
    }

    /// Whether the server closed the connection cleanly (EOF, no reset)
    /// within the read timeout.
    fn closed_cleanly(&mut self) -> Result<(), String> {
        let mut rest = String::new();
        match self.reader.read_line(&mut rest) {
            Ok(0) => Ok(()),
            Ok(_) => Err(format!("client {}: unexpected {rest:?}", self.id)),
            Err(e) => Err(format!("client {}: {e}", self.id)),
        }
    }
}

/// The bytes the kernel holds unread for the TCP connection from
/// `local` to `peer` (ports on 127.0.0.1), from /proc/net/tcp.
fn unread_in_kernel(local: u16, peer: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    // (The table holds every socket of the machine: look closer only at
    // lines that name both ports.)
    let (a, b) = (format!(":{local:04X} "), format!(":{peer:04X} "));
    let lines = table.lines().skip(1);
    lines
        .filter(|l| l.contains(&a) && l.contains(&b))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if port(f.get(1)?)? != local || port(f.get(2)?)? != peer {
                return None;
            }
            u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()
        })
}

/// SIGHUP to the serving generation; waits for its successor, its exit
/// (reaped, status 0). Returns (old, new, the old one's exit line, when
/// it was reaped).
fn upgrade(server: &mut Server) -> (u32, u32, String, Instant) {
    let old = server.pid();
    procs::signal(old, libc::SIGHUP).expect("SIGHUP");
    let ok = server.wait_line("upgrade-ok", Some(old));
    let new = field_u32(&ok, "successor");
    server.ready_line = server.wait_line("ready", Some(new));
    server.generations.push((new, false));
    let exit = server.wait_line("exit", Some(old));
    let status = procs::reap(old, EVENT_TIMEOUT).expect("reap the old generation");
    assert!(status.success(), "old generation {old}: {status}");
    reaped(server, old);
    (old, new, exit, Instant::now())
}

fn reaped(server: &mut Server, pid: u32) {
    for g in &mut server.generations {
        if g.0 == pid {
            g.1 = true;
        }
    }
}

#[test]
fn thirty_two_clients_stay_connected_through_ten_upgrades() {
    const CLIENTS: usize = 32;
    const UPGRADES: usize = 10;
    if started_by_predecessor() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut server = Server::start_program(
        &line_server(),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "30"],
    );
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Vec<AtomicUsize>> = Arc::new((0..CLIENTS).map(|_| 0.into()).collect());
    let failed = Arc::new(Mutex::new(None::<String>));
    // Each client: lines in lockstep, as fast as the server answers; every
    // answer with the time its line was sent and the pid that answered.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let mut client = Client::connect(addr, id);
            let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut log = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match client.exchange() {
                        Ok(pid) => log.push((sent, pid)),
                        Err(e) => {
                            failed.lock().unwrap().get_or_insert(e);
                            break;
                        }
                    }
                    answered[id].fetch_add(1, Ordering::Relaxed);
                }
                log
            })
        })
        .collect();
    // Each client has been answered `more` times since `since` (bounded).
    let progressed = |since: &[usize], more: usize| {
        wait_until("every client answered", EVENT_TIMEOUT, || {
            if let Some(e) = &*failed.lock().unwrap() {
                panic!("{e}");
            }
            (0..CLIENTS).all(|i| answered[i].load(Ordering::Relaxed) >= since[i] + more)
        })
    };
    let snapshot =
        || -> Vec<usize> { answered.iter().map(|a| a.load(Ordering::Relaxed)).collect() };
    progressed(&vec![0; CLIENTS], 2);
    // One more connection holds half a line, read by the old generation,
    // at every upgrade: the successor gets it in the payload.
    let mut holder = Client::connect(addr, CLIENTS);
    assert_eq!(holder.exchange(), Ok(server.pid()));

    let mut pids = vec![server.pid()];
    let mut slowest = Duration::ZERO;
    let mut last_exit = Instant::now();
    for _ in 0..UPGRADES {
        let half = holder.send_half();
        let (_, new, exit, at) = upgrade(&mut server);
        assert_eq!(holder.send_rest(&half), new, "the line held half-read");
        // Every connection was handed over at once: the old generation
        // left long before its 30 s deadline.
        assert_eq!(field(&exit, "reason"), Some("upgrade"), "{exit}");
        assert_eq!(field(&exit, "remaining"), Some("0"), "{exit}");
        let drain = Duration::from_millis(field_u32(&exit, "drain_ms").into());
        assert!(drain < Duration::from_secs(5), "{exit}");
        slowest = slowest.max(drain);
        pids.push(new);
        last_exit = at;
        // Every connection is answered by the new generation before the next upgrade.
        progressed(&snapshot(), 2);
    }
    stop.store(true, Ordering::Relaxed);
    // A line lost, duplicated or reordered, or a connection closed.
    assert_eq!(*failed.lock().unwrap(), None);
    let mut lines = 0;
    for (id, client) in clients.into_iter().enumerate() {
        let log = client.join().expect("client thread");
        lines += log.len();
        let mut seen: Vec<u32> = log.iter().map(|(_, pid)| *pid).collect();
        seen.dedup();
        // Answered by every generation, in order, on one connection.
        assert_eq!(seen, pids, "client {id}");
        let late = log.iter().filter(|(sent, _)| *sent > last_exit);
        assert!(late.clone().count() >= 1, "client {id}");
        assert!(
            late.clone().all(|(_, pid)| pid == pids.last().unwrap()),
            "client {id}"
        );
    }
    let status = server.stop();
    assert!(status.success(), "last generation: {status}");
    let zombies = procs::zombies(std::process::id());
    assert!(
        zombies.is_empty(),
        "zombies {zombies:?}, generations {:?}",
        server.generations
    );
    eprintln!(
        "{CLIENTS} clients, {UPGRADES} upgrades: {lines} lines answered, 0 reconnects, \
         slowest old generation exit {} ms after its upgrade",
        slowest.as_millis()
    );
}

/// Whether this process was started by a predecessor (as a successor).
fn started_by_predecessor() -> bool {
    std::env::var_os("HANDOVER_GENERATION").is_some()
}

/// The fixture successor: takes the listener and reports ready; then, with
/// `LINE_FIXTURE=after-one`, takes one connection and exits 3 while more
/// are on the way; with `before-any`, exits 3 without offering to take any.
#[test]
fn fixture_successor_that_exits() {
    if !started_by_predecessor() {
        return;
    }
    let h = Handover::builder().build().unwrap();
    let _listener = h.tcp_listener("lines", "127.0.0.1:0").unwrap();
    // `after-one` takes connections: said in the ready message.
    let incoming = match std::env::var("LINE_FIXTURE").as_deref() {
        Ok("after-one") => Some(h.incoming_connections().unwrap()),
        _ => None,
    };
    h.ready().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(EVENT_TIMEOUT, h.committed())
            .await
            .unwrap()
            .unwrap();
        if let Some(mut incoming) = incoming {
            let item = tokio::time::timeout(EVENT_TIMEOUT, incoming.recv()).await;
            assert!(matches!(item, Ok(Some(Ok(Migrated::Connection(_))))));
        }
    });
    std::process::exit(3);
}

/// The fds of `pid`: the peer ports of its TCP connections (sorted), how
/// many listening TCP sockets, and every other fd's target.
fn sockets(pid: u32) -> (Vec<u16>, usize, Vec<String>) {
    // inode -> (state, peer port), from the process's network namespace.
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let tcp: std::collections::HashMap<String, (String, u16)> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
            Some((f.get(9)?.to_string(), (f.get(3)?.to_string(), port)))
        })
        .collect();
    let (mut peers, mut listening, mut other) = (Vec::new(), 0, Vec::new());
    for (_, target) in procs::fds(pid).unwrap() {
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'));
        match inode.and_then(|i| tcp.get(i)) {
            Some((state, _)) if state == "0A" => listening += 1,
            Some((_, port)) => peers.push(*port),
            None => other.push(target),
        }
    }
    peers.sort_unstable();
    (peers, listening, other)
}

/// One run: `clients` connections, each with a partial line of 12 KiB
/// read by the old generation (so that at most 10 fit in one record), then an upgrade to the fixture in `mode`.
/// Returns how many connections the fixture took (and lost).
fn successor_exits(mode: &str, clients: usize) -> usize {
    const DEADLINE: Duration = Duration::from_secs(3);
    let dir = TempDir::new("line-fixture");
    let bin = dir.path().join("line_server");
    let good = std::fs::read(line_server()).unwrap();
    common::install(&bin, &good, 0o755);
    let mut server = Server::start_env(
        &bin,
        &["--listen", "127.0.0.1:0", "--drain-timeout", "3"],
        &[("LINE_FIXTURE", mode)],
    );
    let old = server.pid();
    let partial = "p".repeat(12 * 1024);
    let mut conns: Vec<Client> = (0..clients)
        .map(|id| {
            let mut c = Client::connect(server.addr(), id);
            assert_eq!(c.exchange(), Ok(old));
            c.stream.write_all(partial.as_bytes()).unwrap();
            let (server_port, port) = (server.addr().port(), c.stream.local_addr().unwrap().port());
            wait_until("the server read the partial line", EVENT_TIMEOUT, || {
                unread_in_kernel(server_port, port) == Some(0)
            });
            c
        })
        .collect();
    let fds_before = sockets(old);

    // A bad deploy: the next binary is the fixture.
    let script = format!(
        "#!/bin/sh\nexec '{}' fixture_successor_that_exits --exact --test-threads=1 >/dev/null\n",
        std::env::current_exe().unwrap().display()
    );
    common::install(&bin, script.as_bytes(), 0o755);
    procs::signal(old, libc::SIGHUP).expect("SIGHUP");
    let ok = server.wait_line("upgrade-ok", Some(old));
    let committed = Instant::now();
    let fixture = field_u32(&ok, "successor");
    server.generations.push((fixture, false));
    // It stays its predecessor's child (a zombie) until that exits.
    let status = procs::exit_status(fixture, EVENT_TIMEOUT).expect("the fixture exits");
    assert_eq!(status.code(), Some(3), "fixture: {status}");

    // Each connection is lost with the fixture (EOF), or still served by
    // the old generation, which answers the line it holds half of.
    let (mut lost, mut kept) = (Vec::new(), Vec::new());
    for mut c in conns.drain(..) {
        c.sent += 1;
        c.stream.write_all(b"end\n").unwrap();
        match c.read_answer() {
            Err(_) => lost.push(c.id),
            Ok(answer) => {
                let want = format!("{} {old} {partial}end\n", c.sent);
                assert!(answer == want, "client {}: {:.40}…", c.id, answer);
                kept.push(c);
            }
        }
    }
    // No fd leaked: the old generation holds the connections it kept and
    // nothing of the others, no listener (its successor had it), and no
    // other fd but the channel to the fixture.
    let (peers, listening, other) = sockets(old);
    let mut want: Vec<u16> = kept
        .iter()
        .map(|c| c.stream.local_addr().unwrap().port())
        .collect();
    want.sort_unstable();
    assert_eq!(peers, want, "TCP connections of the old generation");
    assert_eq!(listening, 0);
    let (_, _, other_before) = fds_before;
    let gained: Vec<_> = other.iter().filter(|f| !other_before.contains(f)).collect();
    assert!(
        other.len() <= other_before.len() + 1 && gained.len() <= 1,
        "before: {other_before:?}\nafter: {other:?}"
    );
    // Not hung: it exits at its drain deadline, closing what it kept cleanly.
    let exit = server.wait_line("exit", Some(old));
    let status = procs::reap(old, EVENT_TIMEOUT).expect("reap the old generation");
    assert!(status.success(), "old generation: {status}");
    reaped(&mut server, old);
    // Reparented to us now.
    procs::reap(fixture, EVENT_TIMEOUT).expect("reap the fixture");
    reaped(&mut server, fixture);
    let waited = committed.elapsed();
    assert!(waited < DEADLINE + Duration::from_secs(5), "{waited:?}");
    assert_eq!(
        field(&exit, "remaining"),
        Some(kept.len().to_string().as_str())
    );
    for c in &mut kept {
        c.closed_cleanly().unwrap();
    }
    assert!(procs::zombies(std::process::id()).is_empty());
    eprintln!(
        "{mode}: {} connections lost with the fixture, {} kept and closed at the deadline ({} ms after the commit)",
        lost.len(),
        kept.len(),
        waited.as_millis()
    );
    assert_eq!(lost.len() + kept.len(), clients);
    lost.len()
}

#[test]
fn a_successor_that_exits_while_connections_are_in_flight_hangs_and_leaks_nothing() {
    if started_by_predecessor() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Before taking any: every connection stays with the old generation.
    assert_eq!(successor_exits("before-any", 16), 0);
    // After taking one record: its connections are lost like in any crash;
    // the next record, sent but not answered, and those queued come back.
    let lost = successor_exits("after-one", 32);
    assert!((1..32).contains(&lost), "lost {lost}");
}
