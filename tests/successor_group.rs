//! A failed successor's children die with it: a successor that is a shell
//! wrapper starting a child that inherits the listener and the channel
//! (never ready, exits, rejects the state, crashes during probation) leaves
//! no process outside the live generation holding the listener; a
//! successor joins its predecessor's process group (at `ready()`); after a
//! stop the port is free again.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use common::{Server, TempDir, install, load, procs, wait_until};

/// The inode of the TCP socket listening on `port` (from /proc/net/tcp).
fn listener_inode(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = f[1]
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        // st 0A: LISTEN
        if local_port == Some(port) && f[3] == "0A" {
            return f[9].parse().expect("inode");
        }
    }
    panic!("no listener on port {port}");
}

/// Every process (of those we may read) with an fd on socket `inode`.
fn holders(inode: u64) -> Vec<u32> {
    let target = format!("socket:[{inode}]");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == target.as_str()))
        {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn pgid(pid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(')').expect("comm").1;
    rest.split_whitespace()
        .nth(2)
        .expect("pgrp")
        .parse()
        .expect("pgrp")
}

/// The pid a wrapper wrote for the child it started.
fn read_pid(path: &Path) -> u32 {
    let mut pid = None;
    wait_until("the wrapper's child pid", Duration::from_secs(10), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.expect("checked")
}

#[test]
fn what_a_failed_successor_started_dies_with_it() {
    let dir = TempDir::new("group");
    let (bin, _) = common::deploy(dir.path(), "server");
    let pid_file = dir.path().join("server.pid");
    let mut srv = Server::start_program(
        &bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--ready-timeout",
            "2",
            "--probation",
            "1",
            "--drain-timeout",
            "5",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    );
    let addr: SocketAddr = srv.addr();
    let serving = srv.pid();
    let inode = listener_inode(addr.port());
    assert_eq!(holders(inode), vec![serving]);
    let service_group = pgid(serving);
    // A crashing canary loses the requests it had accepted; clients retry
    // those (see tests/probation.rs).
    let load = load::Load::start_retrying(addr, 1, 2);
    assert!(load.wait_for_ok(21, Duration::from_secs(30)));

    let child_pid = dir.path().join("child.pid");
    // The child inherits fd 3 (the listener) and 4 (the channel).
    let start_child = format!("sleep 300 &\necho $! > {}\n", child_pid.display());
    let server = common::server_bin();
    let server = server.display();
    let cases: Vec<(String, &[&str])> = vec![
        (format!("{start_child}wait\n"), &["was not ready within 2s"]),
        (
            format!("{start_child}exit 3\n"),
            &["exited before it was ready: exit status: 3"],
        ),
        (
            format!("{start_child}exec {server} \"$@\" --state-version 9\n"),
            &["rejected the state", "exited before it was ready"],
        ),
        (
            format!("{start_child}exec {server} \"$@\" --crash-after 0.1\n"),
            &["failed its probation"],
        ),
    ];
    for (script, expect) in &cases {
        let _ = std::fs::remove_file(&child_pid);
        install(&bin, format!("#!/bin/sh\n{script}").as_bytes(), 0o755);
        let line = srv.failed_upgrade();
        assert!(
            expect.iter().any(|e| line.contains(e)),
            "expected one of {expect:?} in {line:?}"
        );
        let child = read_pid(&child_pid);
        // The child was killed with the wrapper; orphaned, it came to us
        // (the subreaper) and is reaped here.
        let status = procs::reap(child, Duration::from_secs(10)).unwrap_or_else(|e| {
            let _ = procs::signal(child, libc::SIGKILL);
            panic!("the wrapper's child {child} outlived the failed upgrade ({line}): {e}")
        });
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{line}");
        wait_until(
            "only the serving generation to hold the listener",
            Duration::from_secs(10),
            || holders(inode) == vec![serving],
        );
        assert!(procs::zombies(serving).is_empty(), "zombie after {line}");
        assert_eq!(common::read_pid_file(&pid_file).unwrap(), serving);
    }

    // A successor is a normal member of the service from `ready()` on: it
    // joins the process group its predecessor is in. What it started
    // before stays in its start group.
    let _ = std::fs::remove_file(&child_pid);
    install(
        &bin,
        format!("#!/bin/sh\n{start_child}exec {server} \"$@\"\n").as_bytes(),
        0o755,
    );
    let (_, new) = srv.upgrade();
    let child = read_pid(&child_pid);
    wait_until(
        "the successor to join the service's process group",
        Duration::from_secs(10),
        || pgid(new) == service_group,
    );
    assert_eq!(pgid(child), new as i32);
    // It is the successor's child (the wrapper exec'd the server): killed
    // here, it stays a zombie of the successor until that one exits.
    procs::signal(child, libc::SIGKILL).unwrap();
    wait_until("the child to die", Duration::from_secs(10), || {
        !procs::children(new)
            .iter()
            .any(|(p, s)| *p == child && *s != 'Z')
    });

    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert!(srv.stop().success());
    // Nobody holds the port: a new server binds it.
    let mut again = Server::start(&["--listen", &addr.to_string()]);
    assert_eq!(again.addr(), addr);
    assert!(again.stop().success());
}
