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
        assert_eq!(
            handover::read_pid_file(&dir.path().join("pid")).unwrap(),
            pid
        );
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
    let st =
        handover::control::request(ctl(dir.path()), "status", Duration::from_secs(10)).unwrap();
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
