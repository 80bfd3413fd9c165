//! The sd_notify choreography, seen from a fake service manager: a datagram
//! socket with SO_PASSCRED, so the sender of every message is known, and
//! systemd's NotifyAccess=main rule applied to it.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::Duration;

use common::{Server, TempDir, install, load, procs, wait_until};

/// A received notification and its sender's pid.
#[derive(Debug, Clone)]
struct Msg {
    pid: u32,
    text: String,
}

/// Receives on `sock` until it is shut down; closes every passed fd at once
/// (which releases a BARRIER=1, as systemd does).
fn receive(sock: UnixDatagram, tx: mpsc::Sender<Msg>) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int from a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(r, 0);
    std::thread::spawn(move || {
        loop {
            let mut buf = [0u8; 4096];
            let mut control = [0u64; 128];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: an all-zero msghdr is a valid value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: msg points at live buffers.
            let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n <= 0 {
                return;
            }
            let mut pid = 0;
            // SAFETY: walking the control messages recvmsg filled in.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_type == libc::SCM_CREDENTIALS {
                        pid = (*(libc::CMSG_DATA(c) as *const libc::ucred)).pid as u32;
                    } else if (*c).cmsg_type == libc::SCM_RIGHTS {
                        let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                        for i in 0..count {
                            drop(OwnedFd::from_raw_fd(
                                *(libc::CMSG_DATA(c) as *const libc::c_int).add(i),
                            ));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
            if tx.send(Msg { pid, text }).is_err() {
                return;
            }
        }
    });
}

/// Applies NotifyAccess=main: every message must come from the main pid of
/// its moment; MAINPID= from the main process moves it. A lone BARRIER=1 is
/// answered by the manager itself, before any access check.
fn check_main_only(msgs: &[Msg], first_main: u32) -> u32 {
    let mut main = first_main;
    for m in msgs.iter().filter(|m| m.text != "BARRIER=1") {
        assert_eq!(
            m.pid, main,
            "refused under NotifyAccess=main: {m:?} (main is {main}); all: {msgs:#?}"
        );
        for kv in m.text.lines() {
            if let Some(p) = kv.strip_prefix("MAINPID=") {
                main = p.parse().unwrap();
            }
        }
    }
    main
}

fn drain(rx: &mpsc::Receiver<Msg>, until: &str) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        let m = rx
            .recv_timeout(common::EVENT_TIMEOUT)
            .unwrap_or_else(|_| panic!("no {until:?}; got {out:#?}"));
        let done = m.text.lines().any(|l| l == until);
        out.push(m);
        if done {
            return out;
        }
    }
}

fn texts(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .map(|m| m.text.lines().next().unwrap_or("").to_owned())
        .collect()
}

fn choreography(notify_socket: &str, sock: UnixDatagram) {
    let (tx, rx) = mpsc::channel();
    receive(sock, tx);
    let dir = TempDir::new("notify");
    let (bin, good) = common::deploy(dir.path(), "server");
    let mut srv = Server::start_env(
        &bin,
        &["--listen", "127.0.0.1:0"],
        &[
            ("NOTIFY_SOCKET", notify_socket),
            ("WATCHDOG_USEC", "60000000"),
        ],
    );
    let gen1 = srv.pid();
    let start = drain(&rx, "READY=1");
    assert_eq!(start.last().unwrap().pid, gen1);

    // A failed upgrade: RELOADING=1, then READY=1 again from the same main.
    install(&bin, b"#!/bin/sh\nexit 3\n", 0o755);
    srv.failed_upgrade();
    let failed = drain(&rx, "READY=1");
    let failed: Vec<Msg> = failed
        .into_iter()
        .filter(|m| m.text != "WATCHDOG=1")
        .collect();
    assert_eq!(texts(&failed), ["RELOADING=1", "READY=1"], "{failed:#?}");
    assert!(failed[0].text.contains("MONOTONIC_USEC="));
    assert!(failed[1].text.contains("upgrade failed"));

    // A good upgrade: RELOADING=1, MAINPID=<new> + READY=1, BARRIER=1 — all
    // from the old main, none from the successor before it is main.
    install(&bin, &good, 0o755);
    let (_, gen2) = srv.upgrade();
    let mut up = drain(&rx, "BARRIER=1");
    up.retain(|m| m.text != "WATCHDOG=1");
    assert_eq!(
        texts(&up),
        [
            "RELOADING=1".to_owned(),
            format!("MAINPID={gen2}"),
            "BARRIER=1".to_owned()
        ]
    );
    assert!(up[1].text.contains("\nREADY=1"));
    let main = check_main_only(&up, gen1);
    assert_eq!(main, gen2);

    // A real stop: STOPPING=1 from the new main.
    srv.stop();
    let mut stop = drain(&rx, "STOPPING=1");
    stop.retain(|m| m.text != "WATCHDOG=1" || m.pid == gen2);
    check_main_only(&stop, gen2);
    let all: Vec<Msg> = start.iter().chain(&stop).cloned().collect();
    assert!(
        !all.iter()
            .any(|m| m.pid == gen1 && m.text.contains("STOPPING=1")),
        "the draining old main stopped the unit"
    );
}

#[test]
fn choreography_over_a_path_socket() {
    let dir = TempDir::new("notify-sock");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    choreography(path.to_str().unwrap(), sock);
}

#[test]
fn choreography_over_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("handover-notify-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    choreography(&format!("@{name}"), sock);
}

#[test]
fn watchdog_is_pinged_by_the_main_process() {
    let dir = TempDir::new("watchdog");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    receive(sock, tx);
    // 300 ms: pings every 100 ms.
    let mut srv = Server::start_env(
        &common::server_bin(),
        &["--listen", "127.0.0.1:0"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    // WATCHDOG_PID names another process: no pings from the first generation.
    let (_, gen2) = srv.upgrade();
    // The successor got WATCHDOG_USEC without the stale WATCHDOG_PID: it pings.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut pings = 0;
    while pings < 3 {
        let m = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("pings");
        if m.text == "WATCHDOG=1" {
            assert_eq!(m.pid, gen2);
            pings += 1;
        }
    }
    srv.stop();
}

#[test]
fn probation_names_the_successor_main_only_after_the_window() {
    let dir = TempDir::new("notify-probation");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    receive(sock, tx);
    let (bin, good) = common::deploy(dir.path(), "server");
    let mut srv = Server::start_env(
        &bin,
        &["--listen", "127.0.0.1:0", "--probation", "2"],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let gen1 = srv.pid();
    drain(&rx, "READY=1");

    // A canary that crashes within the window: the manager only ever hears
    // of gen1 — reloading, then ready again.
    common::wrapper(dir.path(), "server", "--crash-after 0.3");
    let failed = srv.failed_upgrade();
    assert!(failed.contains("failed its probation"), "{failed}");
    srv.wait_line("ready", None); // the canary's
    let msgs = drain(&rx, "READY=1");
    assert_eq!(texts(&msgs), ["RELOADING=1", "READY=1"], "{msgs:#?}");
    // The start timeout covers the ready timeout, the window and 5 s.
    assert!(
        msgs[0].text.contains("EXTEND_TIMEOUT_USEC=67000000"),
        "{msgs:#?}"
    );
    assert_eq!(check_main_only(&msgs, gen1), gen1);

    // A healthy one: MAINPID= only once the window has passed.
    install(&bin, &good, 0o755);
    procs::signal(gen1, libc::SIGHUP).unwrap();
    let gen2 = srv.peek_ready_pid();
    let early: Vec<Msg> = rx.try_iter().collect();
    assert!(
        !early.iter().any(|m| m.text.contains("MAINPID=")),
        "the successor was named main during its probation: {early:#?}"
    );
    let ok = srv.wait_line("upgrade-ok", Some(gen1));
    let up: Vec<Msg> = early.into_iter().chain(drain(&rx, "BARRIER=1")).collect();
    assert!(
        up.iter()
            .any(|m| m.text.starts_with(&format!("MAINPID={gen2}")))
    );
    assert_eq!(check_main_only(&up, gen1), gen2, "{ok}");
    srv.finish_upgrade(gen1, gen2);
    srv.stop();
}

/// A `NOTIFY_SOCKET` left over in the environment (`value`) is no outage:
/// the server starts, serves, upgrades under load with 0 failed requests,
/// and stops with status 0. Returns every stderr line of the chain, once
/// all of it has exited.
fn stale_notify_socket(value: &str) -> Vec<String> {
    let mut srv = Server::start_env(
        &common::server_bin(),
        &["--listen", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", value)],
    );
    let gen1 = srv.pid();
    let first = load::get(srv.addr(), "/").expect("the first generation serves");
    assert_eq!(first.pid, gen1);
    let load = load::Load::start_warm(srv.addr(), 2, 2, 21);
    let (_, gen2) = srv.upgrade();
    wait_until(
        "the successor to answer under load",
        Duration::from_secs(30),
        || load.stats.by_pid.lock().unwrap().contains_key(&gen2),
    );
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert!(srv.stop().success());
    srv.stderr_lines_with("")
}

/// What a generation says when a message of its own cannot go out.
const SEND_FAILED: &str = "cannot notify the service manager (NOTIFY_SOCKET)";

/// Each process that sent something warns once: the first generation at
/// `READY=1` (not again for its `RELOADING=1` and `MAINPID=`, nor a barrier
/// wait), the second at `STOPPING=1`.
fn warned_once_per_process(all: &[String]) {
    let lines: Vec<&String> = all.iter().filter(|l| l.contains(SEND_FAILED)).collect();
    assert_eq!(lines.len(), 2, "{all:#?}");
    assert!(lines.iter().all(|l| l.contains("WARN")), "{lines:#?}");
    if std::env::var_os("HANDOVER_TEST_VERBOSE").is_some() {
        eprintln!("{lines:#?}");
    }
}

#[test]
fn a_notify_socket_path_nobody_listens_on_is_a_warning() {
    let dir = TempDir::new("stale-notify");
    let path = dir.path().join("gone");
    let lines = stale_notify_socket(path.to_str().unwrap());
    warned_once_per_process(&lines);
}

#[test]
fn a_notify_socket_naming_a_regular_file_is_a_warning() {
    let dir = TempDir::new("stale-notify-file");
    let path = dir.path().join("notify");
    std::fs::write(&path, b"not a socket").unwrap();
    let lines = stale_notify_socket(path.to_str().unwrap());
    warned_once_per_process(&lines);
}

#[test]
fn an_unbound_abstract_notify_socket_is_a_warning() {
    let name = format!("@handover-test-{}-unbound-notify", std::process::id());
    let lines = stale_notify_socket(&name);
    warned_once_per_process(&lines);
}

#[test]
fn a_notify_socket_that_is_no_address_is_a_warning() {
    let all = stale_notify_socket("not/absolute");
    // Each generation reads its environment once: one warning each, and no
    // send is tried.
    let lines: Vec<&String> = all
        .iter()
        .filter(|l| l.contains("ignoring NOTIFY_SOCKET"))
        .collect();
    assert_eq!(lines.len(), 2, "{all:#?}");
    assert!(lines.iter().all(|l| l.contains("WARN")), "{lines:#?}");
    assert!(!all.iter().any(|l| l.contains(SEND_FAILED)), "{all:#?}");
}
