//! Starting the successor in applications that do what applications do:
//! ignore `SIGCHLD` (the kernel then reaps their children), fork a child
//! that never execs after `ready()` (it holds a copy of every fd open then),
//! never wait for their predecessor's exit. Each still upgrades, reports a
//! successor that crashes with its real wait status, and ends up holding
//! the fds its first generation held.

mod common;

use std::time::{Duration, Instant};

use common::{Server, TempDir, deploy, field, field_u32, install, load, procs, server_bin};

/// A successor program that dies of SIGUSR1 at once (no core dump; a
/// signal the old generation never sends).
const CRASH: &[u8] = b"#!/bin/sh\nkill -USR1 $$\n";

/// A healthy upgrade, a successor that crashes (reported as crashed, the old
/// generation serving on), and a healthy upgrade again — in a chain of the
/// fixture started with `envs`, every generation of which inherits them.
fn upgrade_and_report_a_crash(tag: &str, envs: &[(&str, &str)]) {
    let dir = TempDir::new(tag);
    let (bin, good) = deploy(dir.path(), "server");
    let mut srv = Server::start_env(
        &bin,
        &["--listen", "127.0.0.1:0", "--ready-timeout", "5"],
        envs,
    );
    let addr = srv.addr();
    let forks = envs.contains(&("HANDOVER_TEST_FORK_AFTER_READY", "1"));
    if forks {
        srv.wait_line("forked", Some(srv.pid()));
    }

    let (_, second) = srv.upgrade();
    assert_eq!(load::get(addr, "/").expect("request").pid, second);
    if forks {
        srv.wait_line("forked", Some(second));
    }

    install(&bin, CRASH, 0o755);
    let t = Instant::now();
    let failed = srv.failed_upgrade();
    assert!(
        failed.contains("exited before it was ready: signal: 10 (SIGUSR1)"),
        "a crashed successor must be reported with its wait status: {failed}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the crash was seen at once, not at the 5 s deadline: {:?}",
        t.elapsed()
    );
    assert_eq!(
        load::get(addr, "/")
            .expect("request after the failed upgrade")
            .pid,
        second,
        "the old generation serves on"
    );

    install(&bin, &good, 0o755);
    let (_, third) = srv.upgrade();
    assert_eq!(load::get(addr, "/").expect("request").pid, third);
    assert!(
        procs::zombies(third).is_empty(),
        "zombies under the serving generation"
    );
    assert!(srv.stop().success());
}

#[test]
fn sigchld_ignored() {
    upgrade_and_report_a_crash("sigign", &[("HANDOVER_TEST_IGNORE_SIGCHLD", "ign")]);
}

#[test]
fn sigchld_nocldwait() {
    upgrade_and_report_a_crash(
        "nocldwait",
        &[("HANDOVER_TEST_IGNORE_SIGCHLD", "nocldwait")],
    );
}

#[test]
fn fork_without_exec_after_ready() {
    upgrade_and_report_a_crash("forked", &[("HANDOVER_TEST_FORK_AFTER_READY", "1")]);
}

/// Both at once: SIGCHLD ignored takes the start through the intermediate
/// process, whose pipes a child forked after `ready()` must not hold either.
#[test]
fn fork_without_exec_after_ready_with_sigchld_ignored() {
    upgrade_and_report_a_crash(
        "forkedign",
        &[
            ("HANDOVER_TEST_FORK_AFTER_READY", "1"),
            ("HANDOVER_TEST_IGNORE_SIGCHLD", "ign"),
        ],
    );
}

/// A program that is not one (ENOEXEC) is an exec failure, reported as
/// such, on both ways of starting the successor.
#[test]
fn an_exec_failure_is_reported_on_both_paths() {
    for (tag, envs) in [
        ("direct", &[][..]),
        (
            "intermediate",
            &[("HANDOVER_TEST_IGNORE_SIGCHLD", "ign")][..],
        ),
    ] {
        let dir = TempDir::new(tag);
        let (bin, good) = deploy(dir.path(), "server");
        let mut srv = Server::start_env(&bin, &["--listen", "127.0.0.1:0"], envs);
        install(&bin, b"\x7fELF garbage", 0o755);
        let failed = srv.failed_upgrade();
        assert!(
            failed.contains("could not exec") && failed.contains("Exec format error"),
            "{tag}: {failed}"
        );
        install(&bin, &good, 0o755);
        let (_, new) = srv.upgrade();
        assert_eq!(load::get(srv.addr(), "/").expect("request").pid, new);
        assert!(srv.stop().success(), "{tag}");
    }
}

/// The fds of `pid` once the same count was seen 20 times in a row (100 ms):
/// a connection closing just then is not counted.
fn settled_fds(pid: u32) -> Vec<(i32, String)> {
    let (mut same, mut last) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while same < 20 {
        assert!(Instant::now() < deadline, "the fds of {pid} never settled");
        let now = procs::fds(pid).expect("/proc/<pid>/fd");
        same = if now.len() == last.len() { same + 1 } else { 0 };
        last = now;
        std::thread::sleep(Duration::from_millis(5));
    }
    last
}

/// The application never awaits `predecessor_exited` (examples/axum does
/// not): its predecessor's exit still closes the channel to it and every
/// copy of it, and each later generation holds what the first held.
#[test]
fn a_generation_that_never_watches_its_predecessor_holds_what_the_first_held() {
    let dir = TempDir::new("copies");
    let report = dir.path().join("fds.txt");
    let mut srv = Server::start_env(
        &server_bin(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--report-fds",
            report.to_str().unwrap(),
        ],
        &[("HANDOVER_TEST_NO_PREDECESSOR_WATCH", "1")],
    );
    // What the first generation holds of its own: not what it inherited
    // from this test's process (a jobserver pipe, say) and reported at
    // start. A successor inherits nothing but its layout.
    let reports = std::fs::read_to_string(&report).unwrap();
    let inherited: Vec<i32> = reports
        .lines()
        .find(|l| field(l, "pid") == Some(srv.pid().to_string().as_str()))
        .and_then(|l| field(l, "fds"))
        .expect("the first generation reported its fds")
        .split(',')
        .map(|fd| fd.parse().expect("an fd number"))
        .filter(|fd| *fd > 2)
        .collect();
    let first: Vec<(i32, String)> = settled_fds(srv.pid())
        .into_iter()
        .filter(|(fd, _)| !inherited.contains(fd))
        .collect();
    let mut counts = vec![first.len()];
    for _ in 0..2 {
        let old = srv.pid();
        procs::signal(old, libc::SIGHUP).expect("SIGHUP");
        let ok = srv.wait_line("upgrade-ok", Some(old));
        let new = field_u32(&ok, "successor");
        srv.ready_line = srv.wait_line("ready", Some(new));
        srv.generations.push((new, false));
        srv.wait_line("exit", Some(old));
        let status = procs::reap(old, common::EVENT_TIMEOUT).expect("reap");
        assert!(status.success(), "{old}: {status}");
        for g in &mut srv.generations {
            if g.0 == old {
                g.1 = true;
            }
        }
        assert!(
            srv.try_wait_line("predecessor-exited", Some(new), Duration::ZERO)
                .is_none(),
            "the switch is on: nothing awaits the predecessor's exit"
        );
        let reports = std::fs::read_to_string(&report).unwrap();
        let channel = reports
            .lines()
            .find(|l| field(l, "pid") == Some(new.to_string().as_str()))
            .and_then(|l| field(l, "channel"))
            .expect("the successor reported its channel")
            .to_owned();
        assert!(channel.starts_with("socket:"), "{channel}");
        // Bounded probe: the predecessor has exited; its channel closes a
        // moment later, and the count settles to the first generation's.
        let deadline = Instant::now() + Duration::from_secs(10);
        let now = loop {
            let now = settled_fds(new);
            let holds_channel = now.iter().any(|(_, t)| *t == channel);
            if (!holds_channel && now.len() == first.len()) || Instant::now() >= deadline {
                break now;
            }
        };
        assert!(
            !now.iter().any(|(_, t)| *t == channel),
            "generation {new} still holds its dead predecessor's channel ({channel}): {now:?}"
        );
        counts.push(now.len());
        assert_eq!(
            now.len(),
            first.len(),
            "generation {} holds {now:?}; the first held {first:?}",
            counts.len()
        );
    }
    assert!(srv.stop().success());
}
