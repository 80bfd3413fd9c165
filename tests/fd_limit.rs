//! An upgrade works at the fd limit: under `RLIMIT_NOFILE` 64 with 150
//! clients holding connections, the server has no free fd slot, and an
//! upgrade (with a pid file, its lock and a state stream) still succeeds —
//! twice while saturated, and once more after the connections are freed.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::{Server, TempDir, load, procs, server_bin, wait_until};

const LIMIT: usize = 64;

/// Opens `n` keep-alive connections, each with a request sent (answered
/// only by a server that had room to accept it).
fn clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, load::IO_TIMEOUT).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("send");
            s
        })
        .collect()
}

fn saturated(pid: u32) {
    wait_until(
        &format!("generation {pid} to use all {LIMIT} fds"),
        Duration::from_secs(30),
        || procs::fd_count(pid) >= LIMIT,
    );
}

#[test]
fn upgrades_at_the_fd_limit() {
    let dir = TempDir::new("fdlimit");
    let pid_file = dir.path().join("server.pid");
    let limit = format!("--nofile={LIMIT}:{LIMIT}");
    let server = server_bin();
    let mut srv = Server::start_env(
        Path::new("prlimit"),
        &[
            &limit,
            server.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--drain-timeout",
            "1",
        ],
        &[],
    );
    let addr = srv.addr();
    let held = clients(addr, 150);
    saturated(srv.pid());

    // Saturated: every fd slot is taken by a connection.
    let (_, second) = srv.upgrade();
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), second);
    // The successor takes in the waiting connections until it is full too.
    saturated(second);
    let (_, third) = srv.upgrade();
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), third);
    saturated(third);

    // Freed: the connections close, and the next upgrade works as usual.
    drop(held);
    wait_until(
        "the connections to be freed",
        Duration::from_secs(30),
        || procs::fd_count(third) < LIMIT / 2,
    );
    let (_, fourth) = srv.upgrade();
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), fourth);
    let r = load::get(addr, "/").expect("served after the upgrades");
    assert_eq!(r.pid, fourth);
    // Accept errors back off (5 ms doubling to 1 s) and log at most one line
    // a second: four generations saturated for a few seconds log a handful,
    // not a flood.
    let lines = srv.stderr.lock().unwrap().len();
    assert!(lines < 200, "{lines} log lines at the fd limit");
    assert!(srv.stop().success());
}

/// CPU time (user + system) `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5), counted from the state (field 3).
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn the_control_socket_answers_at_the_fd_limit_without_spinning() {
    use std::os::unix::net::UnixStream;
    let dir = TempDir::new("fdlimit-ctl");
    let pid_file = dir.path().join("server.pid");
    let ctl = dir.path().join("ctl");
    let limit = format!("--nofile={LIMIT}:{LIMIT}");
    let server = server_bin();
    let mut srv = Server::start_env(
        Path::new("prlimit"),
        &[
            &limit,
            server.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
            "--drain-timeout",
            "1",
        ],
        &[],
    );
    let held = clients(srv.addr(), 150);
    saturated(srv.pid());

    // A control connection that sends nothing takes the reserved slot; a
    // second one waits in the accept queue while the server is full.
    let silent = UnixStream::connect(&ctl).expect("connect");
    let ctl2 = ctl.clone();
    let waiting =
        std::thread::spawn(move || handover::control::status(&ctl2, Duration::from_secs(60)));
    // Meanwhile the server backs off instead of spinning on EMFILE.
    let (cpu0, t0) = (cpu_time(srv.pid()), std::time::Instant::now());
    wait_until("two seconds to pass", Duration::from_secs(10), || {
        t0.elapsed() >= Duration::from_secs(2)
    });
    let used = cpu_time(srv.pid()) - cpu0;
    let share = used.as_secs_f64() / t0.elapsed().as_secs_f64();
    assert!(
        share < 0.25,
        "{:.0} % of a core while saturated",
        share * 100.0
    );
    // The silent peer leaves: its slot answers the waiting request.
    drop(silent);
    let status = waiting
        .join()
        .unwrap()
        .expect("status answered at the fd limit");
    assert!(
        status.contains(&format!("\"pid\":{}", srv.pid())),
        "{status}"
    );

    // A reload at the limit is answered: the upgrade is done, twice.
    for _ in 0..2 {
        let old = srv.pid();
        let reply = handover::control::reload(&ctl, None, Duration::from_secs(60))
            .expect("reload at the fd limit");
        let new: u32 = common::json(&reply, "pid").parse().unwrap();
        srv.finish_upgrade(old, new);
        assert_eq!(common::read_pid_file(&pid_file).unwrap(), new);
        saturated(new);
    }
    drop(held);
    assert!(srv.stop().success());
}
