//! A successor that crashes, exits, hangs, closes the channel, is missing,
//! is not executable or cannot be exec'd: the upgrade fails with the
//! matching error, the old generation serves throughout with 0 failed
//! requests, no zombie is left, the pid file keeps naming the server — and a
//! later upgrade to a good binary works.

mod common;

use std::time::Duration;

use common::{Server, TempDir, install, load, procs, wait_until};

#[test]
fn broken_successors_leave_the_old_generation_serving() {
    let dir = TempDir::new("faults");
    let (bin, good) = common::deploy(dir.path(), "server");
    let pid_file = dir.path().join("server.pid");
    let mut srv = Server::start_program(
        &bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--ready-timeout",
            "2",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    );
    let serving = srv.pid();
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), serving);
    let load = load::Load::start_warm(srv.addr(), 2, 2, 21);
    let stats = load.stats.clone();

    // (successor program, file mode, what the error must say)
    let cases: &[(&[u8], u32, &str)] = &[
        (
            b"#!/bin/sh\nexit 3\n",
            0o755,
            "exited before it was ready: exit status: 3",
        ),
        (
            b"#!/bin/sh\nexit 0\n",
            0o755,
            "exited before it was ready: exit status: 0",
        ),
        (
            b"#!/bin/sh\nkill -SEGV $$\n",
            0o755,
            "exited before it was ready: signal: 11 (SIGSEGV)",
        ),
        // fd 4 is the channel (LISTEN_FDS=1): close it and live on.
        (
            b"#!/bin/sh\nexec 4>&-\nexec sleep 30\n",
            0o755,
            "closed the readiness channel without reporting ready",
        ),
        (
            b"#!/bin/sh\nexec sleep 30\n",
            0o755,
            "was not ready within 2s; killed",
        ),
        (
            b"#!/bin/sh\nprintf X >&4\nexec sleep 30\n",
            0o755,
            "unexpected byte 0x58",
        ),
        (b"\x7fELF but not really", 0o755, "could not exec"),
        (b"#!/bin/sh\nexit 0\n", 0o644, "not executable"),
    ];
    for (program, mode, expect) in cases {
        install(&bin, program, *mode);
        let line = srv.failed_upgrade();
        assert!(line.contains(expect), "expected {expect:?} in {line:?}");
        assert!(
            procs::zombies(serving).is_empty(),
            "zombie left by {expect:?}"
        );
        assert_eq!(common::read_pid_file(&pid_file).unwrap(), serving);
        let r = load::get(srv.addr(), "/").expect("still serving");
        assert_eq!(r.pid, serving);
    }
    std::fs::remove_file(&bin).unwrap();
    let line = srv.failed_upgrade();
    assert!(line.contains("No such file or directory"), "{line}");

    // Another process holds the upgrade lock: refused, nothing spawned.
    {
        let lock = std::fs::File::create(dir.path().join("server.pid.lock")).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: flock on an fd we own.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(locked, 0);
        install(&bin, &good, 0o755);
        let line = srv.failed_upgrade();
        assert!(line.contains("holds the upgrade lock"), "{line}");
        assert!(procs::children(serving).iter().all(|(_, s)| *s != 'Z'));
    }

    // Nothing was lost meanwhile, and only the old generation answered.
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert_eq!(stats.pids(), vec![serving]);

    // A good binary renamed over the path: the next upgrade runs it.
    let (_, new) = srv.upgrade();
    wait_until(
        "the new generation to answer",
        Duration::from_secs(30),
        || stats.by_pid.lock().unwrap().contains_key(&new),
    );
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), new);
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert!(srv.stop().success());
}
