//! A real stop (SIGTERM, no successor), with the fixture server: the port
//! closes at once (new connections refused, a restart binds it while the
//! old process drains), what is queued and in flight is answered, idle
//! keep-alive connections do not hold the process, and the files the
//! generation owns are removed — only those. Under socket activation the
//! socket the manager holds stays open, and connections queue in it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, Server, TempDir, field, field_u32, json, load, procs, wait_until};

/// `/stats`' `served_total`: requests whose handler has started.
fn served(addr: SocketAddr) -> u64 {
    json(&common::stats(addr), "served_total").parse().unwrap()
}

/// Sends `GET /slow?ms=<ms>` on a keep-alive connection and waits until its
/// handler runs: the request is in flight.
fn slow_request(addr: SocketAddr, ms: u64) -> BufReader<TcpStream> {
    let before = served(addr); // counts itself
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    load::send_get(&mut s, &format!("/slow?ms={ms}"), true).unwrap();
    // Each probe counts itself: in flight once the count passes them.
    let mut probes = 0;
    wait_until("the slow request to be in flight", EVENT_TIMEOUT, || {
        probes += 1;
        served(addr) > before + probes
    });
    BufReader::new(s)
}

/// Connects until the connection is refused (probing every 5 ms, at most
/// `bound`); returns how long that took. Connections that still get
/// through are closed at once.
fn wait_refused(addr: SocketAddr, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return start.elapsed();
            }
            Err(e) => panic!("connect to {addr}: {e}"),
            Ok(s) => drop(s),
        }
        assert!(
            start.elapsed() < bound,
            "{addr} still accepts connections {bound:?} after the stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asserts that nothing of a response has arrived on `conn` yet.
fn no_response_yet(conn: &BufReader<TcpStream>) {
    let s = conn.get_ref();
    s.set_nonblocking(true).unwrap();
    let peeked = s.peek(&mut [0u8; 1]);
    s.set_nonblocking(false).unwrap();
    match peeked {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the slow request was answered already: {other:?}"),
    }
}

#[test]
fn a_stop_refuses_new_connections_at_once_and_finishes_the_request_in_flight() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--drain-timeout", "30"]);
    let (addr, pid) = (srv.addr(), srv.pid());
    let mut slow = slow_request(addr, 3000);
    procs::signal(pid, libc::SIGTERM).unwrap();
    // Refused (a proxy fails over at once), not left to hang in a backlog
    // nobody accepts from, while the slow request is still being served.
    let took = wait_refused(addr, Duration::from_secs(5));
    no_response_yet(&slow);
    assert!(procs::exists(pid));
    let r = load::read_response(&mut slow).expect("the request in flight is answered");
    assert_eq!((r.status, r.pid), (200, pid));
    assert!(
        r.close,
        "a response made while stopping says Connection: close"
    );
    assert!(srv.wait_stopped().success());
    eprintln!("refused {:.1} ms after SIGTERM", took.as_secs_f64() * 1e3);
}

#[test]
fn a_restart_binds_the_port_while_the_stopping_process_drains() {
    let mut old = Server::start(&["--listen", "127.0.0.1:0", "--drain-timeout", "30"]);
    let (addr, old_pid) = (old.addr(), old.pid());
    let mut slow = slow_request(addr, 5000);
    procs::signal(old_pid, libc::SIGTERM).unwrap();
    wait_refused(addr, Duration::from_secs(5));
    // A fresh start on the same port: Server::start waits for its ready
    // line (an EADDRINUSE would end it with status 1 instead).
    let mut new = Server::start(&["--listen", &addr.to_string()]);
    assert_eq!(new.addr(), addr);
    assert!(procs::exists(old_pid), "the old process still drains");
    no_response_yet(&slow);
    let r = load::get(addr, "/").expect("the new process serves");
    assert_eq!(r.pid, new.pid());
    let r = load::read_response(&mut slow).expect("the old process finishes its request");
    assert_eq!((r.status, r.pid), (200, old_pid));
    assert!(old.wait_stopped().success());
    assert!(new.stop().success());
}

#[test]
fn an_idle_keep_alive_client_does_not_hold_a_stop() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--drain-timeout", "20"]);
    let (addr, pid) = (srv.addr(), srv.pid());
    // A proxy's pool: a keep-alive connection, idle after one request...
    let mut idle = BufReader::new(TcpStream::connect(addr).unwrap());
    idle.get_ref()
        .set_read_timeout(Some(EVENT_TIMEOUT))
        .unwrap();
    load::send_get(idle.get_mut(), "/", true).unwrap();
    let r = load::read_response(&mut idle).unwrap();
    assert!(!r.close);
    // ...and a connection that never sent anything.
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    let t = Instant::now();
    procs::signal(pid, libc::SIGTERM).unwrap();
    // Both are closed by the server (EOF, not a timeout).
    let mut buf = [0u8; 64];
    assert_eq!(idle.read(&mut buf).expect("closed, not timed out"), 0);
    assert_eq!(silent.read(&mut buf).expect("closed, not timed out"), 0);
    let closed = t.elapsed();
    let status = srv.wait_stopped();
    let exited = t.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        exited < Duration::from_secs(5),
        "exited {exited:?} after SIGTERM, drain timeout 20 s"
    );
    let exit = srv
        .history
        .iter()
        .find(|l| l.starts_with("exit"))
        .unwrap()
        .clone();
    assert_eq!(field(&exit, "reason"), Some("stop"), "{exit}");
    assert_eq!(field(&exit, "remaining"), Some("0"), "{exit}");
    eprintln!(
        "idle connections closed {:.1} ms, process exited {:.1} ms after SIGTERM",
        closed.as_secs_f64() * 1e3,
        exited.as_secs_f64() * 1e3
    );
}

#[test]
fn keep_alive_clients_in_a_run_of_requests_lose_nothing_at_a_stop() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--drain-timeout", "20"]);
    let (addr, pid) = (srv.addr(), srv.pid());
    let ok = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let ok = ok.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let mut c = BufReader::new(TcpStream::connect(addr).map_err(|e| e.to_string())?);
                c.get_ref().set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
                c.get_ref().set_nodelay(true).unwrap();
                // Each request answered, until one says Connection: close.
                loop {
                    load::send_get(c.get_mut(), "/", true).map_err(|e| e.to_string())?;
                    let r = load::read_response(&mut c).map_err(|e| e.to_string())?;
                    if r.status != 200 {
                        return Err(format!("status {}", r.status));
                    }
                    let n = ok.fetch_add(1, Ordering::Relaxed) + 1;
                    if r.close {
                        return Ok(n);
                    }
                }
            })
        })
        .collect();
    wait_until("requests from every client", EVENT_TIMEOUT, || {
        ok.load(Ordering::Relaxed) >= 200
    });
    procs::signal(pid, libc::SIGTERM).unwrap();
    for c in clients {
        c.join()
            .unwrap()
            .expect("every request answered, the last with Connection: close");
    }
    assert!(srv.wait_stopped().success());
}

#[test]
fn connections_queued_at_the_stop_are_answered() {
    let mut srv = Server::start(&["--listen", "127.0.0.1:0", "--drain-timeout", "20"]);
    let (addr, pid) = (srv.addr(), srv.pid());
    // Stopped, the server accepts nothing: these connections complete their
    // handshake in the kernel and wait in the backlog, requests sent.
    procs::signal(pid, libc::SIGSTOP).unwrap();
    wait_until("the server to be stopped", EVENT_TIMEOUT, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
        state == Some("T")
    });
    let queued: Vec<BufReader<TcpStream>> = (0..20)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
            load::send_get(&mut s, &format!("/?queued={i}"), false).unwrap();
            BufReader::new(s)
        })
        .collect();
    // The stop comes first when it runs again.
    procs::signal(pid, libc::SIGTERM).unwrap();
    procs::signal(pid, libc::SIGCONT).unwrap();
    for (i, mut q) in queued.into_iter().enumerate() {
        let r = load::read_response(&mut q)
            .unwrap_or_else(|e| panic!("queued connection {i} got no answer: {e}"));
        assert_eq!((r.status, r.pid), (200, pid));
    }
    assert!(srv.wait_stopped().success());
    wait_refused(addr, Duration::from_secs(5));
}

/// The fixture's files, for a server started with them.
struct Files {
    _dir: TempDir,
    pid: std::path::PathBuf,
    lock: std::path::PathBuf,
    control: std::path::PathBuf,
}

fn files(tag: &str) -> Files {
    let dir = TempDir::new(tag);
    Files {
        pid: dir.path().join("server.pid"),
        lock: dir.path().join("server.pid.lock"),
        control: dir.path().join("control"),
        _dir: dir,
    }
}

fn start_with_files(f: &Files) -> Server {
    Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--pid-file",
        f.pid.to_str().unwrap(),
        "--control",
        f.control.to_str().unwrap(),
    ])
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_clean_stop_removes_the_pid_file_its_lock_and_the_control_socket() {
    let f = files("stop-files");
    let mut srv = start_with_files(&f);
    // The second generation inherited the control socket, and stops.
    let (_, new) = srv.upgrade();
    let read_pid = || {
        std::fs::read_to_string(&f.pid)
            .unwrap()
            .trim()
            .parse::<u32>()
    };
    wait_until("the pid file to name the successor", EVENT_TIMEOUT, || {
        read_pid() == Ok(new)
    });
    assert!(f.lock.exists() && f.control.exists());
    assert!(srv.stop().success());
    let dir = f.pid.parent().unwrap();
    assert_eq!(entries(dir), Vec::<String>::new(), "left behind");
}

#[test]
fn a_stop_leaves_the_files_of_another_process_alone() {
    let f = files("stop-others");
    let mut srv = start_with_files(&f);
    let dir = f.pid.parent().unwrap();
    // Someone else's pid file, written the way a pid file is (rename).
    let tmp = dir.join("other.pid");
    std::fs::write(&tmp, "1\n").unwrap();
    std::fs::rename(&tmp, &f.pid).unwrap();
    // Someone else's control socket at the path.
    let other_sock = dir.join("other.sock");
    let other = std::os::unix::net::UnixListener::bind(&other_sock).unwrap();
    std::fs::rename(&other_sock, &f.control).unwrap();
    // Someone upgrading: the lock held.
    let lock = std::fs::File::open(&f.lock).unwrap();
    // SAFETY: flock on an fd we own; no memory is touched.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    assert!(srv.stop().success());
    assert_eq!(std::fs::read_to_string(&f.pid).unwrap(), "1\n");
    assert!(f.lock.exists());
    let _client =
        std::os::unix::net::UnixStream::connect(&f.control).expect("still the other socket");
    other.set_nonblocking(true).unwrap();
    other
        .accept()
        .expect("the connection reached the other socket");
    assert_eq!(entries(dir), ["control", "server.pid", "server.pid.lock"]);
}

/// Puts `fd` at 3 in the child, inheritable, and closes every fd above 3
/// (cargo's jobserver pipes), as tests/validation.rs does.
fn place_at_3(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs between fork and exec and only calls dup2
    // and close_range, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2(3, 3) would keep FD_CLOEXEC.
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
            Ok(())
        });
    }
}

#[test]
fn under_socket_activation_the_socket_stays_open_and_connections_queue() {
    // The test is the manager: it holds the listening socket throughout.
    let manager = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = manager.local_addr().unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(common::server_bin())
        .args(["--listen", &addr.to_string(), "--drain-timeout", "30"])
        .envs([
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "http"),
            ("RUST_LOG", "info"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    place_at_3(&mut cmd, manager.as_raw_fd());
    let mut child = common::spawn(&mut cmd).unwrap();
    let lines = procs::line_channel(child.stdout.take().unwrap());
    let wait_line = |prefix: &str, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Some(l),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    };
    let ready = wait_line("ready", EVENT_TIMEOUT).expect("ready");
    let pid = field_u32(&ready, "pid");
    assert_eq!(pid, child.id());
    let mut slow = slow_request(addr, 2000);
    procs::signal(pid, libc::SIGTERM).unwrap();
    // Connections made while it drains: never refused. The first ones may
    // still be taken and answered by the stopping server; the others wait
    // in the socket the manager holds.
    let mut probes = Vec::new();
    let exit = loop {
        let mut s = TcpStream::connect(addr).expect("never refused: the manager holds the socket");
        load::send_get(&mut s, &format!("/?probe={}", probes.len()), false).unwrap();
        probes.push(s);
        if let Some(exit) = wait_line("exit", Duration::from_millis(100)) {
            break exit;
        }
        assert!(probes.len() < 300, "no exit within 30 s");
    };
    assert_eq!(field(&exit, "reason"), Some("stop"), "{exit}");
    let r = load::read_response(&mut slow).unwrap();
    assert_eq!((r.status, r.pid), (200, pid));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    // Each probe was answered by the server, or is still queued, request
    // and all: the manager (the test) accepts and answers it now.
    manager.set_nonblocking(true).unwrap();
    let (mut answered, mut queued) = (0, 0);
    for (i, s) in probes.into_iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        let got = s.peek(&mut [0u8; 1]);
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        if got.is_ok() {
            let r = load::read_response(&mut BufReader::new(s)).unwrap();
            assert_eq!((r.status, r.pid), (200, pid), "probe {i}");
            answered += 1;
            continue;
        }
        let (mut conn, _) = manager
            .accept()
            .unwrap_or_else(|e| panic!("probe {i} is neither answered nor queued: {e}"));
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        let mut request = String::new();
        BufReader::new(&conn).read_line(&mut request).unwrap();
        assert!(
            request.starts_with(&format!("GET /?probe={i} ")),
            "{request:?}"
        );
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
        let r = load::read_response(&mut BufReader::new(s)).unwrap();
        assert_eq!(r.status, 200);
        queued += 1;
    }
    assert!(
        queued >= 1,
        "no connection made during the drain was left queued"
    );
    eprintln!("probes: {answered} answered by the stopping server, {queued} queued");
}

/// The serving layer with connection migration on
/// (tests/fixture/axum_migrate.rs `--migrate`): at a stop there is no
/// successor to hand connections to; an idle keep-alive connection is
/// closed all the same, and a client in a run of requests gets each one
/// answered, the last with `Connection: close`.
#[test]
fn with_migration_on_a_stop_closes_idle_connections_and_answers_busy_ones() {
    let bin = common::server_bin().with_file_name("fixture_axum_migrate");
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--migrate",
        "--drain-timeout",
        "20",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = common::spawn(&mut cmd).expect("spawn fixture_axum_migrate");
    let lines = procs::line_channel(child.stdout.take().unwrap());
    let listening = lines.recv_timeout(EVENT_TIMEOUT).expect("listening line");
    let words: Vec<&str> = listening.split_whitespace().collect();
    let (addr, pid): (SocketAddr, u32) = (words[2].parse().unwrap(), words[4].parse().unwrap());
    let mut idle = BufReader::new(TcpStream::connect(addr).unwrap());
    idle.get_ref()
        .set_read_timeout(Some(EVENT_TIMEOUT))
        .unwrap();
    load::send_get(idle.get_mut(), "/", true).unwrap();
    assert!(!load::read_response(&mut idle).unwrap().close);
    let busy = std::thread::spawn(move || -> Result<u64, String> {
        let mut c = BufReader::new(TcpStream::connect(addr).map_err(|e| e.to_string())?);
        c.get_ref().set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        c.get_ref().set_nodelay(true).unwrap();
        for n in 0.. {
            load::send_get(c.get_mut(), &format!("/n/{n}"), true).map_err(|e| e.to_string())?;
            let r = load::read_response(&mut c).map_err(|e| format!("request {n}: {e}"))?;
            if r.status != 200 || r.body != format!("{n}\n") {
                return Err(format!("request {n}: {} {:?}", r.status, r.body));
            }
            if n == 100 {
                // Enough of a run: the test stops the server now.
                procs::signal(pid, libc::SIGTERM).map_err(|e| e.to_string())?;
            }
            if r.close {
                return Ok(n);
            }
        }
        unreachable!()
    });
    let t = Instant::now();
    let last = busy.join().unwrap().expect("every request answered");
    assert!(last >= 100);
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).expect("closed, not timed out"), 0);
    let exit = loop {
        let l = lines.recv_timeout(EVENT_TIMEOUT).expect("exit line");
        if l.starts_with("exit") {
            break l;
        }
    };
    assert!(exit.ends_with(" remaining=0"), "{exit}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    wait_refused(addr, Duration::from_secs(5));
}
