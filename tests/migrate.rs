//! Connection migration through the real upgrade path: this test process is
//! the old generation, and the successor is this same test binary, re-exec'd
//! to run one of the `successor_*` functions below (which do nothing in a
//! normal test run: they act only when started by a predecessor).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::Duration;

use common::procs;
use handover::migrate::MigrateError;
use handover::{Handover, Migrated, UpgradeOptions};

/// Bounds every wait here.
const BOUND: Duration = Duration::from_secs(20);

/// Tests here start successors and reap them: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Whether this process was started by a predecessor (as a successor).
fn started_by_predecessor() -> bool {
    std::env::var_os("HANDOVER_GENERATION").is_some()
}

/// The successor's part: take the listener and report ready, then answer
/// each migrated connection with what it knows, and stop after `limit`
/// connections by exiting with status 3 (dying mid-stream), or when the
/// old generation is done.
fn successor(limit: Option<usize>) {
    if !started_by_predecessor() {
        return;
    }
    let h = Handover::builder().build().unwrap();
    let _listener = h.tcp_listener("http", "127.0.0.1:0").unwrap();
    // Before ready(): the ready message says that it takes connections.
    let mut incoming = h.incoming_connections().unwrap();
    h.ready().unwrap();
    runtime().block_on(async {
        let mut state = String::new();
        let mut taken = 0;
        while let Some(item) = tokio::time::timeout(BOUND, incoming.recv()).await.unwrap() {
            match item.unwrap() {
                Migrated::State(s) => state = String::from_utf8(s).unwrap(),
                Migrated::Connection(c) => {
                    let flags =
                        nix::fcntl::fcntl(c.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
                    let (mut stream, payload) = c.into_tcp().unwrap();
                    stream.set_nonblocking(false).unwrap();
                    let answer = format!(
                        "gen{} pid={} cloexec={} state={state} payload={}",
                        h.generation(),
                        std::process::id(),
                        flags & libc::FD_CLOEXEC,
                        String::from_utf8_lossy(&payload).replace('\n', "|"),
                    );
                    stream.write_all(answer.as_bytes()).unwrap();
                    taken += 1;
                    if Some(taken) == limit {
                        std::process::exit(3);
                    }
                }
                _ => {}
            }
        }
    });
}

#[test]
fn successor_takes_connections() {
    successor(None);
}

#[test]
fn successor_dies_after_one() {
    successor(Some(1));
}

/// Connections accepted and read by this (old) generation: each client sent
/// `req <i>\n`, and the last also a pipelined second request.
fn clients(listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream, Vec<u8>)> {
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|i| {
            let mut client = TcpStream::connect(addr).unwrap();
            client.set_read_timeout(Some(BOUND)).unwrap();
            let mut req = format!("req {i}\n");
            if i == n - 1 {
                req.push_str("req pipelined\n");
            }
            client.write_all(req.as_bytes()).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            let mut got = vec![0u8; req.len()];
            server.read_exact(&mut got).unwrap();
            (client, server, got)
        })
        .collect()
}

/// Waits (bounded) until this process has `before` fds again: the last
/// handle of a generation lets it go on the generation's upgrade thread.
fn fds_back_to(before: usize) {
    let me = std::process::id();
    let back = || procs::fd_count(me) == before;
    let deadline = std::time::Instant::now() + BOUND;
    while !back() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(procs::fd_count(me), before, "{:?}", procs::fds(me));
}

fn upgrade_to(h: &Handover, role: &str, probation: Duration) -> handover::Upgraded {
    let exe = std::env::current_exe().unwrap();
    // The successor is this test binary, running one role: its own test
    // harness lines go to /dev/null (one summary per binary), its stderr
    // stays (a panic there is seen).
    let script = "exec \"$0\" \"$@\" >/dev/null";
    let exe = exe.to_str().unwrap();
    let args = [
        "-c",
        script,
        exe,
        role,
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ];
    let opts = UpgradeOptions::new()
        .program("/bin/sh")
        .args(args)
        .probation(probation);
    h.upgrade_blocking_with(opts).unwrap()
}

#[test]
fn connections_and_state_move_to_a_real_successor() {
    if started_by_predecessor() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    procs::become_subreaper();
    let me = std::process::id();
    // The first runtime of a process opens tokio's signal pipe for good.
    drop(runtime());
    let before = procs::fd_count(me);
    let h = Handover::builder().ready_timeout(BOUND).build().unwrap();
    let listener = h.tcp_listener("http", "127.0.0.1:0").unwrap();
    listener.set_nonblocking(false).unwrap();
    h.ready().unwrap();
    let conns = clients(&listener, 3);

    let rt = runtime();
    // Before the upgrade there is nobody to hand connections to.
    rt.block_on(async {
        let e = h.connection_sender().unwrap_err();
        assert!(matches!(e, MigrateError::NotHandedOver), "{e}");
    });
    // With a probation window: the successor offers only once committed.
    let up = upgrade_to(
        &h,
        "successor_takes_connections",
        Duration::from_millis(200),
    );
    let mut kept = Vec::new();
    rt.block_on(async {
        let sender = h.connection_sender().unwrap();
        sender.send_state(b"served=3".to_vec()).await.unwrap();
        for (client, server, payload) in conns {
            h.send_connection(server, payload).await.unwrap();
            kept.push(client);
        }
        sender.finish().await.unwrap();
    });
    for (i, mut client) in kept.into_iter().enumerate() {
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        let mut payload = format!("req {i}|");
        if i == 2 {
            payload.push_str("req pipelined|");
        }
        assert_eq!(
            answer,
            format!(
                "gen2 pid={} cloexec=1 state=served=3 payload={payload}",
                up.pid
            )
        );
    }
    let status = procs::reap(up.pid, BOUND).unwrap();
    assert!(status.success(), "successor: {status}");
    drop((listener, h, rt));
    fds_back_to(before);
}

#[test]
fn a_successor_that_dies_mid_stream_hangs_nothing_and_leaks_nothing() {
    if started_by_predecessor() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    procs::become_subreaper();
    let me = std::process::id();
    // The first runtime of a process opens tokio's signal pipe for good.
    drop(runtime());
    let before = procs::fd_count(me);
    let h = Handover::builder().ready_timeout(BOUND).build().unwrap();
    let listener = h.tcp_listener("http", "127.0.0.1:0").unwrap();
    listener.set_nonblocking(false).unwrap();
    h.ready().unwrap();
    const N: usize = 8;
    let conns = clients(&listener, N);
    let up = upgrade_to(&h, "successor_dies_after_one", Duration::ZERO);
    let rt = runtime();
    let start = std::time::Instant::now();
    let mut clients = Vec::new();
    let (mut moved, mut back) = (0, 0);
    rt.block_on(async {
        let mut sends = tokio::task::JoinSet::new();
        for (i, (client, server, payload)) in conns.into_iter().enumerate() {
            clients.push(client);
            let h = h.clone();
            // 64 KiB payloads: one connection per record, so some are
            // still queued when the successor dies.
            let mut payload = payload;
            payload.resize(64 * 1024, b' '); // the largest payload
            sends.spawn(async move { (i, h.send_connection(server, payload).await) });
        }
        while let Some(sent) = sends.join_next().await {
            match sent.unwrap() {
                (_, Ok(())) => moved += 1,
                (i, Err(e)) => {
                    assert!(matches!(e.error(), MigrateError::SuccessorGone), "{e}");
                    // Still ours: this generation answers it.
                    let (fd, _) = e.into_connection().expect("given back");
                    let mut s = TcpStream::from(fd);
                    s.set_nonblocking(false).unwrap();
                    s.write_all(format!("old {i}").as_bytes()).unwrap();
                    back += 1;
                }
            }
        }
    });
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        start.elapsed()
    );
    assert_eq!(moved, 1);
    assert_eq!(back, N - 1);
    let status = procs::reap(up.pid, BOUND).unwrap();
    assert_eq!(status.code(), Some(3), "successor: {status}");
    for (i, mut client) in clients.into_iter().enumerate() {
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(
            answer == format!("old {i}") || answer.starts_with(&format!("gen2 pid={}", up.pid)),
            "{i}: {answer:?}"
        );
    }
    drop((listener, h, rt));
    fds_back_to(before);
    assert!(procs::zombies(me).is_empty());
}

#[test]
fn a_thousand_idle_connections_move_right_after_the_commit() {
    if started_by_predecessor() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    procs::become_subreaper();
    drop(runtime());
    let before = procs::fd_count(std::process::id());
    let h = Handover::builder().ready_timeout(BOUND).build().unwrap();
    let listener = h.tcp_listener("http", "127.0.0.1:0").unwrap();
    listener.set_nonblocking(false).unwrap();
    h.ready().unwrap();
    const N: usize = 1000;
    let conns = clients(&listener, N);
    let rt = runtime();
    let up = upgrade_to(&h, "successor_takes_connections", Duration::ZERO);
    let start = std::time::Instant::now();
    let mut kept = Vec::new();
    rt.block_on(async {
        let mut sends = tokio::task::JoinSet::new();
        for (client, server, payload) in conns {
            kept.push(client);
            let h = h.clone();
            sends.spawn(async move { h.send_connection(server, payload).await });
        }
        while let Some(sent) = sends.join_next().await {
            sent.unwrap().unwrap();
        }
        let took = start.elapsed();
        eprintln!(
            "{N} connections taken by the successor {:.1} ms after the commit",
            took.as_secs_f64() * 1e3
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
        h.connection_sender().unwrap().finish().await.unwrap();
    });
    for (i, mut client) in kept.into_iter().enumerate() {
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        let want = format!("gen2 pid={} cloexec=1 state= payload=req {i}|", up.pid);
        let last = format!("{want}req pipelined|");
        assert!(answer == want || (i == N - 1 && answer == last), "{answer}");
    }
    let status = procs::reap(up.pid, BOUND).unwrap();
    assert!(status.success(), "successor: {status}");
    // Each test leaves the process as it found it, for the next to count.
    drop((listener, h, rt));
    fds_back_to(before);
}
