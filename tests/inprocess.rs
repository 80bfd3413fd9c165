//! The test process itself is the old generation: the library's API and its
//! typed errors, the accept backlog and queued datagrams handed to a real
//! successor (examples/http_server).

mod common;

use std::io::{BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::Mutex;
use std::time::Duration;

use common::{load, procs, wait_until};
use handover::{Handover, State, UpgradeError, UpgradeOptions};

/// Tests here fork from this process and count its children: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A released successor is reparented to the nearest subreaper: us.
    procs::become_subreaper();
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn sh(script: &str) -> UpgradeOptions {
    UpgradeOptions::new()
        .program("/bin/sh")
        .args(["-c", script])
}

fn child_count() -> usize {
    procs::children(std::process::id()).len()
}

/// Stops a successor we started (our child) and reaps it.
fn stop_successor(pid: u32) {
    procs::signal(pid, libc::SIGTERM).unwrap();
    let status = procs::reap(pid, common::EVENT_TIMEOUT).expect("reap successor");
    assert!(status.success(), "successor exited with {status}");
}

#[test]
fn upgrade_before_ready_is_refused_without_spawning() {
    let _g = serial();
    let h = Handover::builder().build().unwrap();
    assert_eq!(h.generation(), 1);
    assert_eq!(h.state(), State::Starting);
    let before = child_count();
    let e = h.upgrade_blocking_with(sh("exit 0")).unwrap_err();
    assert!(matches!(e, UpgradeError::NotReady), "{e}");
    assert!(!e.spawned());
    assert_eq!(child_count(), before);
}

#[test]
fn concurrent_upgrade_is_refused_without_spawning() {
    let _g = serial();
    let h = Handover::builder()
        .ready_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    h.ready().unwrap();
    let before = child_count();
    let first = std::thread::spawn({
        let h = h.clone();
        move || h.upgrade_blocking_with(sh("exec sleep 30"))
    });
    wait_until(
        "the first upgrade to spawn",
        Duration::from_secs(10),
        || h.state() == State::Upgrading && child_count() == before + 1,
    );
    let e = h.upgrade_blocking_with(sh("exit 0")).unwrap_err();
    assert!(matches!(e, UpgradeError::InProgress), "{e}");
    assert_eq!(
        child_count(),
        before + 1,
        "the refused call spawned a process"
    );
    let e = first.join().unwrap().unwrap_err();
    assert!(
        matches!(e, UpgradeError::Timeout { after, .. } if after == Duration::from_secs(3)),
        "{e}"
    );
    assert_eq!(h.state(), State::Serving);
    assert_eq!(child_count(), before, "the hung successor was not reaped");
}

#[test]
fn failures_are_typed_and_reaped() {
    let _g = serial();
    let h = Handover::builder()
        .ready_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    h.ready().unwrap();
    let before = child_count();

    let e = h.upgrade_blocking_with(sh("exit 7")).unwrap_err();
    match &e {
        UpgradeError::Exited {
            status: Some(s), ..
        } => assert_eq!(s.code(), Some(7)),
        other => panic!("expected Exited(7), got {other}"),
    }
    assert!(e.spawned());
    let e = h.upgrade_blocking_with(sh("exit 0")).unwrap_err();
    assert!(
        matches!(&e, UpgradeError::Exited { status: Some(s), .. } if s.success()),
        "{e}"
    );
    // No fds registered: the channel is fd 3.
    let e = h
        .upgrade_blocking_with(sh("exec 3>&-; exec sleep 30"))
        .unwrap_err();
    assert!(matches!(e, UpgradeError::ClosedWithoutReady { .. }), "{e}");
    let e = h
        .upgrade_blocking_with(sh("printf z >&3; exec sleep 30"))
        .unwrap_err();
    assert!(matches!(e, UpgradeError::Protocol { .. }), "{e}");
    let e = h
        .upgrade_blocking_with(UpgradeOptions::new().program("/nonexistent/server"))
        .unwrap_err();
    assert!(
        matches!(&e, UpgradeError::Program { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{e}"
    );
    assert!(!e.spawned());
    let e = h
        .upgrade_blocking_with(UpgradeOptions::new().program("relative/server"))
        .unwrap_err();
    assert!(matches!(e, UpgradeError::Program { .. }), "{e}");
    let e = h
        .upgrade_blocking_with(UpgradeOptions::new().program("/etc"))
        .unwrap_err();
    assert!(matches!(e, UpgradeError::Program { .. }), "{e}");

    assert_eq!(h.state(), State::Serving);
    assert_eq!(child_count(), before, "a failed successor was left behind");
}

#[test]
fn fifty_connections_in_the_backlog_are_answered_by_the_successor() {
    let _g = serial();
    let h = Handover::builder().build().unwrap();
    // Bound here and never accepted from: connections queue in the kernel.
    let listener = h.tcp_listener("http", "127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    h.ready().unwrap();
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(load::IO_TIMEOUT)).unwrap();
        load::send_get(&mut s, "/", false).unwrap();
        s.flush().unwrap();
        clients.push(s);
    }
    let bin = common::server_bin();
    let done = h
        .upgrade_blocking_with(
            UpgradeOptions::new()
                .program(&bin)
                .args(["--listen", &addr.to_string()]),
        )
        .expect("upgrade");
    assert_eq!(done.generation, 2);
    assert_eq!(h.state(), State::HandedOver);
    // Outside a service manager the successor is this process's own child,
    // started without an intermediate process.
    let kids: Vec<u32> = procs::children(std::process::id())
        .iter()
        .map(|k| k.0)
        .collect();
    assert_eq!(kids, vec![done.pid]);
    drop(listener);
    for s in clients {
        let r = load::read_response(&mut BufReader::new(s)).expect("queued connection answered");
        assert_eq!(r.status, 200);
        assert_eq!(r.pid, done.pid);
    }
    // After a handover, no second one.
    let e = h.upgrade_blocking_with(UpgradeOptions::new()).unwrap_err();
    assert!(matches!(e, UpgradeError::HandedOver), "{e}");
    stop_successor(done.pid);
}

#[test]
fn datagrams_queued_before_the_handoff_are_read_by_the_successor() {
    let _g = serial();
    let h = Handover::builder().build().unwrap();
    let udp = h.udp_socket("udp", "127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    h.ready().unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(load::IO_TIMEOUT)).unwrap();
    for i in 0..10 {
        client
            .send_to(format!("datagram {i}").as_bytes(), addr)
            .unwrap();
    }
    let bin = common::server_bin();
    let done = h
        .upgrade_blocking_with(UpgradeOptions::new().program(&bin).args([
            "--listen",
            "127.0.0.1:0",
            "--udp",
            &addr.to_string(),
        ]))
        .expect("upgrade");
    drop(udp);
    for i in 0..10 {
        let mut buf = [0u8; 256];
        let (n, from) = client
            .recv_from(&mut buf)
            .expect("reply from the successor");
        assert_eq!(from, addr);
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert_eq!(reply, format!("pid={} generation=2 datagram {i}", done.pid));
    }
    stop_successor(done.pid);
}

#[test]
fn names_are_validated_and_unique() {
    let h = Handover::builder().build().unwrap();
    let e = h.tcp_listener("a:b", "127.0.0.1:0").unwrap_err();
    assert!(e.to_string().contains("invalid fd name"), "{e}");
    let _a = h.tcp_listener("one", "127.0.0.1:0").unwrap();
    let e = h.udp_socket("one", "127.0.0.1:0").unwrap_err();
    assert!(e.to_string().contains("already registered"), "{e}");
    // Two listeners on one address under different names (SO_REUSEPORT).
    let h = Handover::builder()
        .listen_options(handover::ListenOptions::new().reuse_port(true))
        .build()
        .unwrap();
    let x = h.tcp_listener("x", "127.0.0.1:0").unwrap();
    let y = h.tcp_listener("y", x.local_addr().unwrap()).unwrap();
    assert_eq!(x.local_addr().unwrap(), y.local_addr().unwrap());
}

#[test]
fn every_fd_handed_out_is_close_on_exec_and_non_blocking() {
    use std::os::fd::AsRawFd;
    let h = Handover::builder().build().unwrap();
    let t = h.tcp_listener("t", "127.0.0.1:0").unwrap();
    let u = h
        .udp_socket("u", "[::1]:0")
        .or_else(|_| h.udp_socket("u", "127.0.0.1:0"))
        .unwrap();
    let dir = common::TempDir::new("cloexec");
    let s = h.unix_listener("s", dir.path().join("s.sock")).unwrap();
    let d = h.unix_datagram("d", dir.path().join("d.sock")).unwrap();
    for fd in [t.as_raw_fd(), u.as_raw_fd(), s.as_raw_fd(), d.as_raw_fd()] {
        // SAFETY: fcntl reads flags of fds we own.
        let (fdfl, fl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        };
        assert!(fdfl & libc::FD_CLOEXEC != 0, "fd {fd} not close-on-exec");
        assert!(fl & libc::O_NONBLOCK != 0, "fd {fd} blocking");
    }
}
