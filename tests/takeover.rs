//! Takeover (issue 18): a process started by the test — not by the serving
//! generation — takes the service over through its control socket, with the
//! same guarantees as an upgrade by fork+exec: nothing lost under load, the
//! old generation exits 0, a refused, crashed or late taker leaves it serving.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Server, TempDir, load, procs, wait_until};

/// The fixture's arguments for a service with its control socket (which
/// allows takeovers) and pid file in `dir`, plus `extra`.
fn args<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--control",
        dir.join("ctl").to_str().unwrap(),
        "--pid-file",
        dir.join("pid").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Starts a process that takes over the service in `dir` (an independent
/// process: the test's child, not the old generation's), listening on the
/// same address.
fn taker(dir: &Path, addr: std::net::SocketAddr, extra: &[&str]) -> Server {
    spawn_taker(dir, addr, extra, true)
}

fn spawn_taker(dir: &Path, addr: std::net::SocketAddr, extra: &[&str], ready: bool) -> Server {
    let mut a = args(dir, extra);
    a[1] = addr.to_string();
    a.push("--take-over".into());
    a.push(ctl(dir).to_str().unwrap().into());
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    if ready {
        Server::start(&refs)
    } else {
        Server::launch(&refs)
    }
}

fn ctl(dir: &Path) -> PathBuf {
    dir.join("ctl")
}

fn start(dir: &Path, extra: &[&str]) -> Server {
    let a = args(dir, extra);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    Server::start(&refs)
}

/// The old generation reports the takeover and exits 0 once drained.
fn retire(old: &mut Server, new: u32) {
    let pid = old.pid();
    let ok = old.wait_line("upgrade-ok", Some(pid));
    assert_eq!(common::field_u32(&ok, "successor"), new, "{ok}");
    let status = old.wait_exit();
    assert!(
        status.success(),
        "old generation {pid} exited with {status}"
    );
}

#[test]
fn twenty_takeovers_under_load_lose_nothing() {
    let dir = TempDir::new("takeover-20");
    let mut old = start(dir.path(), &[]);
    let addr = old.addr();
    let load = load::Load::start_warm(addr, 4, 4, 51);
    let stats = load.stats.clone();
    let mut fds = Vec::new();
    for i in 0..20 {
        let mut new = taker(dir.path(), addr, &[]);
        let pid = new.pid();
        assert_eq!(new.addr(), addr);
        retire(&mut old, pid);
        new.wait_line("predecessor-exited", Some(pid));
        assert_eq!(common::read_pid_file(&dir.path().join("pid")).unwrap(), pid);
        wait_until("the new process to answer", Duration::from_secs(30), || {
            stats.by_pid.lock().unwrap().get(&pid).copied().unwrap_or(0) > 10
        });
        let st = common::stats(addr);
        assert_eq!(common::json(&st, "generation"), (i + 2).to_string(), "{st}");
        assert_eq!(
            common::json(&st, "upgrades_succeeded"),
            (i + 1).to_string(),
            "{st}"
        );
        fds.push(procs::fd_count(pid));
        assert!(procs::zombies(pid).is_empty(), "zombies under {pid}");
        old = new;
    }
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    // Flat: no fd of an earlier generation piles up (± a connection the
    // load holds at the moment of counting).
    let (lo, hi) = (fds.iter().min().unwrap(), fds.iter().max().unwrap());
    assert!(hi - lo <= 8, "fd counts drift: {fds:?}");
    println!(
        "20 takeovers: {} requests, 0 failed; fds {fds:?}",
        stats.ok()
    );
    assert!(old.stop().success());
}

#[test]
fn a_taker_of_another_uid_is_refused_before_any_fd_is_sent() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("takeover-uid");
    let mut old = start(dir.path(), &[]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(ctl(dir.path()), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = common::output_bounded(
        std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(common::server_bin())
            .args(["--listen", &old.addr().to_string(), "--take-over"])
            .arg(ctl(dir.path())),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot take over from") && err.contains("permission denied: uid 65534"),
        "{err}"
    );
    let st = handover::control::status(ctl(dir.path()), Duration::from_secs(10)).unwrap();
    assert_eq!(
        common::json(&st, "upgrades_failed"),
        "0",
        "nothing began: {st}"
    );
    assert_eq!(common::json(&st, "pid"), old.pid().to_string());
    assert!(old.stop().success());
}

#[test]
fn a_taker_that_crashes_or_is_late_leaves_the_old_generation_serving() {
    let dir = TempDir::new("takeover-fail");
    let mut old = start(dir.path(), &["--ready-timeout", "2"]);
    let addr = old.addr();
    let serving = old.pid();
    let load = load::Load::start_warm(addr, 2, 2, 21);

    // Crashes before ready.
    let mut crash = spawn_taker(dir.path(), addr, &["--abort-before-ready"], false);
    let failed = old.wait_line("upgrade-failed", Some(serving));
    assert!(failed.contains("exited before it was ready"), "{failed}");
    let status = crash.wait_child();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGABRT)
    );

    // Misses the deadline: called off; when it reports ready at last, its
    // ready() fails with the reason and it exits 1, serving nothing.
    let mut late = spawn_taker(dir.path(), addr, &["--delay-ready", "4"], false);
    let failed = old.wait_line("upgrade-failed", Some(serving));
    assert!(failed.contains("was not ready within 2s"), "{failed}");
    let fatal = late.wait_line("fatal", None);
    assert!(fatal.contains("was not ready within 2s"), "{fatal}");
    assert_eq!(late.wait_child().code(), Some(1));

    let st = common::stats(addr);
    assert_eq!(common::json(&st, "pid"), serving.to_string(), "{st}");
    assert_eq!(common::json(&st, "upgrades_failed"), "2", "{st}");
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert_eq!(
        stats.pids(),
        vec![serving],
        "only the old generation served"
    );
    assert!(old.stop().success());
}

#[test]
fn of_two_takers_at_once_one_wins_and_the_other_is_refused() {
    let dir = TempDir::new("takeover-two");
    // A probation window keeps the first takeover in progress.
    let mut old = start(dir.path(), &["--probation", "2"]);
    let addr = old.addr();
    let mut first = taker(dir.path(), addr, &[]);
    let out = common::output_bounded(
        std::process::Command::new(common::server_bin())
            .args(["--listen", &addr.to_string(), "--take-over"])
            .arg(ctl(dir.path())),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refused") && err.contains("in progress"),
        "{err}"
    );
    retire(&mut old, first.pid());
    assert!(first.stop().success());
}

#[test]
fn takers_in_their_own_pid_and_mount_namespaces_lose_nothing_or_skip() {
    if !common::can_unshare_pid() {
        return common::skip(
            "takeover-unshare",
            "unshare --pid --fork --mount-proc is not permitted here",
        );
    }
    let dir = TempDir::new("takeover-ns");
    let mut first = start(dir.path(), &[]);
    let addr = first.addr();
    let load = load::Load::start_warm(addr, 2, 2, 21);
    // As a container would start it: its own pid namespace (where the
    // server is not PID 1: a shell is), its own /proc; only the directory
    // of the control socket is shared.
    let contained = |extra: &[&str]| {
        let mut a = vec![
            "--pid".to_string(),
            "--fork".into(),
            "--mount-proc".into(),
            "sh".into(),
            "-c".into(),
            "\"$0\" \"$@\"; exit $?".into(),
            common::server_bin().to_str().unwrap().into(),
        ];
        a.extend(args(dir.path(), extra));
        a[8] = addr.to_string();
        a.push("--take-over".into());
        a.push(ctl(dir.path()).to_str().unwrap().into());
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        Server::launch_program(Path::new("unshare"), &refs)
    };
    let mut prev: Option<Server> = None;
    for i in 0..5 {
        let mut next = contained(&[]);
        let ready = next.wait_line("ready", None);
        let inner = common::field_u32(&ready, "pid");
        assert!(inner < 10, "not in a pid namespace of its own: {ready}");
        let old = prev.as_mut().unwrap_or(&mut first);
        let ok = old.wait_line("upgrade-ok", None);
        let outer = common::field_u32(&ok, "successor");
        let status = match &mut prev {
            Some(p) => {
                p.wait_line("exit", None);
                p.wait_child()
            }
            None => first.wait_exit(),
        };
        assert!(status.success(), "an old generation exited with {status}");
        // The pid file names it as the old generation saw it — or, from a
        // sibling namespace (another container) that could not see it at
        // all (pid 0), as it sees itself.
        let named = if i == 0 { outer } else { inner };
        assert_eq!(i == 0, outer != 0, "{ok}");
        wait_until("the pid file to name it", Duration::from_secs(10), || {
            common::read_pid_file(&dir.path().join("pid")).ok() == Some(named)
        });
        // Alone now: every answer comes from it.
        let st = common::stats(addr);
        assert_eq!(common::json(&st, "generation"), (i + 2).to_string(), "{st}");
        assert_eq!(common::json(&st, "pid"), inner.to_string(), "{st}");
        prev = Some(next);
    }
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    // The last one: unshare → sh (its namespace's init) → the server.
    let mut last = prev.unwrap();
    let sh = procs::children(last.pid())[0].0;
    let server = procs::children(sh)[0].0;
    procs::signal(server, libc::SIGTERM).unwrap();
    last.wait_line("exit", None);
    assert!(last.wait_child().success());
}

/// One keep-alive request on `s`: the `x-pid` of the answer.
fn get_pid(s: &mut std::net::TcpStream) -> std::io::Result<u32> {
    use std::io::{BufRead, Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut r = std::io::BufReader::new(s.try_clone()?);
    let (mut pid, mut len) = (None, 0usize);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status {status:?}")));
    }
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("x-pid: ") {
            pid = v.parse().ok();
        }
        if let Some(v) = line.strip_prefix("content-length: ") {
            len = v.parse().unwrap_or(0);
        }
        assert_ne!(line, "connection: close", "the lame duck, not a move");
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    pid.ok_or_else(|| std::io::Error::other("no x-pid"))
}

#[test]
fn with_migration_keep_alive_connections_move_to_the_process_that_took_over() {
    let dir = TempDir::new("takeover-migrate");
    let axum = common::server_bin().with_file_name("axum");
    let ctl_s = ctl(dir.path()).to_str().unwrap().to_owned();
    let mut old = Server::launch_program(
        &axum,
        &["--listen", "127.0.0.1:0", "--control", &ctl_s, "--migrate"],
    );
    let line = old.wait_line("listening", None);
    let addr: std::net::SocketAddr = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    let first: u32 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    let mut clients: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(load::IO_TIMEOUT)).unwrap();
            s
        })
        .collect();
    let ports: Vec<u16> = clients
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    for c in &mut clients {
        assert_eq!(get_pid(c).unwrap(), first);
    }
    let addr_s = addr.to_string();
    let mut new = Server::launch_program(
        &axum,
        &[
            "--listen",
            &addr_s,
            "--control",
            &ctl_s,
            "--migrate",
            "--take-over",
            &ctl_s,
        ],
    );
    let line = new.wait_line("listening", None);
    let second: u32 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    // The old process hands its connections over and exits 0 (well before
    // its 30 s drain timeout: no idle connection holds it).
    let t = std::time::Instant::now();
    assert!(old.wait_child().success());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Same TCP connections (no reconnect), now answered by the new process.
    for (c, port) in clients.iter_mut().zip(&ports) {
        assert_eq!(c.local_addr().unwrap().port(), *port);
        assert_eq!(get_pid(c).unwrap(), second);
    }
    procs::signal(second, libc::SIGTERM).unwrap();
    drop(clients);
    assert!(new.wait_child().success());
}
