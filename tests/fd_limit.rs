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
    assert_eq!(handover::read_pid_file(&pid_file).unwrap(), second);
    // The successor takes in the waiting connections until it is full too.
    saturated(second);
    let (_, third) = srv.upgrade();
    assert_eq!(handover::read_pid_file(&pid_file).unwrap(), third);
    saturated(third);

    // Freed: the connections close, and the next upgrade works as usual.
    drop(held);
    wait_until(
        "the connections to be freed",
        Duration::from_secs(30),
        || procs::fd_count(third) < LIMIT / 2,
    );
    let (_, fourth) = srv.upgrade();
    assert_eq!(handover::read_pid_file(&pid_file).unwrap(), fourth);
    let r = load::get(addr, "/").expect("served after the upgrades");
    assert_eq!(r.pid, fourth);
    // Accept errors back off (5 ms doubling to 1 s) and log at most one line
    // a second: four generations saturated for a few seconds log a handful,
    // not a flood.
    let lines = srv.stderr.lock().unwrap().len();
    assert!(lines < 200, "{lines} log lines at the fd limit");
    assert!(srv.stop().success());
}
