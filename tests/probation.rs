//! Canary upgrades (`--probation`): both generations accept during the
//! window; a successor that crashes or reports itself unhealthy within it is
//! reaped and the old generation carries on alone; a healthy one is
//! committed only when the window has passed.

mod common;

use std::time::Duration;

use common::{Server, TempDir, field_u32, json, load, procs, stats, wait_until, wrapper};

/// Requests answered by `pid` so far.
fn served_by(stats: &load::Stats, pid: u32) -> u64 {
    stats.by_pid.lock().unwrap().get(&pid).copied().unwrap_or(0)
}

#[test]
fn a_successor_that_crashes_on_probation_is_rolled_back_and_no_request_fails() {
    let dir = TempDir::new("probation-crash");
    let (bin, good) = common::deploy(dir.path(), "server");
    let mut srv = Server::start_program(&bin, &["--listen", "127.0.0.1:0", "--probation", "3"]);
    let old = srv.pid();
    let addr = srv.addr();
    // Requests the crashed process had accepted but not answered are sent
    // again, as clients and proxies do for a GET; counted apart.
    let load = load::Load::start_retrying(addr, 2, 2);
    assert!(load.wait_for_ok(21, Duration::from_secs(30)));

    // The successor passes its readiness check, then aborts after 1 s.
    wrapper(dir.path(), "server", "--crash-after 1");
    procs::signal(old, libc::SIGHUP).unwrap();
    let ready = srv.wait_line("ready", None);
    let canary = field_u32(&ready, "pid");
    assert_ne!(canary, old);
    // Both accept during the window: the canary answers too.
    wait_until("the canary to answer", Duration::from_secs(10), || {
        served_by(&load.stats, canary) > 0
    });
    srv.wait_line("crash", Some(canary));
    let failed = srv.wait_line("upgrade-failed", Some(old));
    assert!(
        failed.contains(&format!("successor (pid {canary}) failed its probation"))
            && failed.contains("SIGABRT")
            && failed.contains("rolled back"),
        "{failed}"
    );
    // The canary is gone and reaped; the old generation serves alone.
    assert!(!procs::exists(canary), "the canary is still there");
    assert!(procs::zombies(old).is_empty(), "zombies under {old}");
    let s = stats(addr);
    assert_eq!(json(&s, "pid"), old.to_string(), "{s}");
    assert_eq!(json(&s, "generation"), "1");
    assert_eq!(json(&s, "upgrades_failed"), "1");
    assert_eq!(json(&s, "upgrades_succeeded"), "0");
    assert!(
        json(&s, "last_error").contains("failed its probation"),
        "{s}"
    );
    let before = served_by(&load.stats, old);
    wait_until(
        "the old generation to keep serving",
        Duration::from_secs(10),
        || served_by(&load.stats, old) > before + 50,
    );

    // The fixed build goes through, after its own window, and inherits the
    // counters.
    common::install(&bin, &good, 0o755);
    let (_, new) = srv.upgrade();
    let s = stats(addr);
    assert_eq!(json(&s, "pid"), new.to_string());
    assert_eq!(json(&s, "generation"), "2");
    assert_eq!(json(&s, "upgrades_succeeded"), "1");
    assert_eq!(json(&s, "upgrades_failed"), "1");
    assert_eq!(json(&s, "committed"), "true");
    let probation_ms: f64 = json(&s, "probation_ms").parse().unwrap();
    assert!(probation_ms >= 3000.0, "{s}");

    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    println!(
        "{} requests, 0 failed, {} sent again after the canary crashed",
        stats.ok(),
        stats.retried()
    );
    assert!(srv.stop().success());
}

#[test]
fn a_healthy_successor_is_committed_only_after_the_window() {
    let dir = TempDir::new("probation-ok");
    let pid_file = dir.path().join("server.pid");
    let mut srv = Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--probation",
        "3",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ]);
    let old = srv.pid();
    let addr = srv.addr();
    let load = load::Load::start_warm(addr, 2, 2, 21);

    procs::signal(old, libc::SIGHUP).unwrap();
    // Seen, not consumed: finish_upgrade() waits for it again.
    let new = srv.peek_ready_pid();
    let old_at_ready = served_by(&load.stats, old);
    // On probation the successor is not final: it refuses to upgrade
    // itself, and the pid file still names the old generation.
    procs::signal(new, libc::SIGHUP).unwrap();
    let refused = srv.wait_line("upgrade-failed", Some(new));
    assert!(
        refused.contains("has not committed the handover"),
        "{refused}"
    );
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), old);
    wait_until("the successor to answer", Duration::from_secs(10), || {
        served_by(&load.stats, new) > 0
    });

    let ok = srv.wait_line("upgrade-ok", Some(old));
    let probation_ms: f64 = common::field(&ok, "probation_ms").unwrap().parse().unwrap();
    assert!(probation_ms >= 3000.0, "{ok}");
    // The old generation accepted throughout the window.
    assert!(
        served_by(&load.stats, old) > old_at_ready + 50,
        "the old generation stopped serving during the window"
    );
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), new);
    srv.finish_upgrade(old, new);

    let s = stats(addr);
    assert_eq!(json(&s, "pid"), new.to_string());
    assert_eq!(json(&s, "committed"), "true");
    assert_eq!(json(&s, "upgrades_succeeded"), "1");
    // The refused attempt counts as a failure of the service.
    assert_eq!(json(&s, "upgrades_failed"), "1");
    for phase in ["spawn_ms", "ready_ms", "probation_ms", "exit_ms"] {
        assert_ne!(json(&s, phase), "null", "{phase} in {s}");
    }
    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    assert!(srv.stop().success());
}

#[test]
fn a_successor_that_reports_itself_unhealthy_drains_and_the_old_one_stays() {
    let dir = TempDir::new("probation-unhealthy");
    let (bin, _) = common::deploy(dir.path(), "server");
    let mut srv = Server::start_program(&bin, &["--listen", "127.0.0.1:0", "--probation", "5"]);
    let old = srv.pid();
    let addr = srv.addr();
    let load = load::Load::start_warm(addr, 2, 2, 21);

    wrapper(dir.path(), "server", "--unhealthy-after 0.5");
    procs::signal(old, libc::SIGHUP).unwrap();
    let canary = field_u32(&srv.wait_line("ready", None), "pid");
    let failed = srv.wait_line("upgrade-failed", Some(old));
    assert!(
        failed.contains("reported itself unhealthy: health check failed"),
        "{failed}"
    );
    // The canary drained on its own, like a generation that handed over.
    let exit = srv.wait_line("exit", Some(canary));
    assert!(exit.contains("reason=rolled-back"), "{exit}");
    assert!(exit.contains("remaining=0"), "{exit}");
    wait_until("the canary to be reaped", Duration::from_secs(10), || {
        !procs::exists(canary)
    });
    let s = stats(addr);
    assert_eq!(json(&s, "pid"), old.to_string());
    assert_eq!(json(&s, "upgrades_failed"), "1");

    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    assert!(srv.stop().success());
}
