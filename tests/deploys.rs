//! The truth under every deploy: each `reload` runs the binary the operator
//! deployed and says so; what a failed successor says reaches the operator;
//! bad durations and an unwritable pid file fail clearly, not silently.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Server, TempDir, install, load};

/// `reload --control <ctl> [--binary B]` through the library's client:
/// `Ok(json)` or the reason.
fn reload(ctl: &Path, binary: Option<&Path>) -> Result<String, String> {
    handover::control::reload(ctl, binary, Duration::from_secs(60)).map_err(|e| e.to_string())
}

/// (device, inode) of the binary `pid` runs.
fn exe_of(pid: u32) -> (u64, u64) {
    let m = std::fs::metadata(format!("/proc/{pid}/exe")).expect("stat /proc/PID/exe");
    (m.dev(), m.ino())
}

fn id_of(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("stat");
    (m.dev(), m.ino())
}

fn pid_of(reply: &str) -> u32 {
    common::json(reply, "pid").parse().expect("pid in reply")
}

/// A server started from `program` with a control socket: (ctl, server).
fn start(dir: &Path, program: &Path, extra: &[&str]) -> (PathBuf, Server) {
    let ctl = dir.join("ctl");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--control",
        ctl.to_str().unwrap(),
        "--ready-timeout",
        "10",
        // Rollbacks (`--binary`) to the programs of this test's directory.
        "--allow-program",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let srv = Server::start_program(program, &args);
    (ctl, srv)
}

/// Waits until the serving generation's log says "upgrade failed" with `what`.
fn logged(srv: &Server, what: &str) {
    common::wait_until(
        &format!("the log to say why the upgrade failed ({what})"),
        Duration::from_secs(30),
        || {
            srv.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("upgrade failed") && l.contains(what))
        },
    );
}

/// Waits until `pid`'s successor chain has moved past it, reaping it.
fn follow(srv: &mut Server, old: u32, new: u32) {
    srv.finish_upgrade(old, new);
}

#[test]
fn a_second_reload_tells_the_truth_about_the_second_build_at_any_distance() {
    let dir = TempDir::new("deploy-truth");
    let (bin, good) = common::deploy(dir.path(), "server");
    let broken = b"#!/bin/sh\nexit 3\n";
    let (ctl, mut srv) = start(dir.path(), &bin, &[]);
    for gap_ms in [0u64, 100, 300, 1000] {
        // A good build, then a broken one `gap_ms` later: the second reply
        // must fail, whatever the first did.
        install(&bin, &good, 0o755);
        let first = std::thread::spawn({
            let ctl = ctl.clone();
            move || reload(&ctl, None)
        });
        std::thread::sleep(Duration::from_millis(gap_ms)); // the scenario's gap, not a sync
        install(&bin, broken, 0o755);
        let second = reload(&ctl, None);
        let first = first.join().unwrap();
        let err = second.expect_err(&format!("gap {gap_ms} ms: the broken build cannot serve"));
        assert!(err.contains("exit status: 3"), "gap {gap_ms} ms: {err}");
        if let Ok(reply) = &first {
            let old = srv.pid();
            follow(&mut srv, old, pid_of(reply));
        }

        // A good build, then another good build (a new inode) `gap_ms` later:
        // the second reply names a process running the second build.
        install(&bin, &good, 0o755);
        let first = std::thread::spawn({
            let ctl = ctl.clone();
            move || reload(&ctl, None)
        });
        std::thread::sleep(Duration::from_millis(gap_ms)); // the scenario's gap, not a sync
        install(&bin, &good, 0o755);
        let second_build = id_of(&bin);
        let second = reload(&ctl, None).expect("the second good build serves");
        let first = first.join().unwrap().expect("the first good build serves");
        let new = pid_of(&second);
        assert_eq!(
            exe_of(new),
            second_build,
            "gap {gap_ms} ms: {second} runs an older build"
        );
        let mid = pid_of(&first);
        let old = srv.pid();
        if mid != new {
            follow(&mut srv, old, mid);
            follow(&mut srv, mid, new);
        } else {
            follow(&mut srv, old, new);
        }
    }
    assert!(srv.stop().success());
}

/// A reload made after an upgrade started — its successor forked, not yet
/// built — is not answered by that successor ("already"): the successor's
/// start is its upgrade's start, before the request. It gets an upgrade of
/// its own. (A successor once took its start from its own `build()`, and
/// answered such a request while running the binary read before it.)
#[test]
fn a_reload_made_while_a_successor_starts_gets_an_upgrade_of_its_own() {
    let dir = TempDir::new("deploy-midway");
    let (bin, good) = common::deploy(dir.path(), "server");
    let (ctl, mut srv) = start(dir.path(), &bin, &[]);
    // The next builds take 300 ms to start: a wrapper that sleeps, then
    // execs the server (same pid, so the handed fds stay its own).
    let real = dir.path().join("server.real");
    install(&real, &good, 0o755);
    let wrapper = format!("#!/bin/sh\nsleep 0.3\nexec '{}' \"$@\"\n", real.display());
    install(&bin, wrapper.as_bytes(), 0o755);
    let old = srv.pid();
    let first = std::thread::spawn({
        let ctl = ctl.clone();
        move || reload(&ctl, None)
    });
    common::wait_until(
        "the first reload's successor to be started",
        Duration::from_secs(30),
        || !common::procs::children(old).is_empty(),
    );
    let second = reload(&ctl, None).expect("the second reload succeeds");
    let first = first.join().unwrap().expect("the first reload succeeds");
    let (mid, new) = (pid_of(&first), pid_of(&second));
    assert_ne!(
        mid, new,
        "the second reply names the first reload's successor: {second}"
    );
    assert!(!second.contains("\"already\""), "{second}");
    assert_eq!(
        common::json(&second, "generation"),
        (common::json(&first, "generation").parse::<u64>().unwrap() + 1).to_string()
    );
    follow(&mut srv, old, mid);
    follow(&mut srv, mid, new);
    assert!(srv.stop().success());
}

#[test]
fn served_total_carries_over_an_upgrade_through_the_control_socket() {
    let dir = TempDir::new("deploy-state");
    let (ctl, mut srv) = start(dir.path(), &common::server_bin(), &[]);
    for _ in 0..25 {
        load::get(srv.addr(), "/").expect("GET /");
    }
    let before: u64 = common::json(&common::stats(srv.addr()), "served_total")
        .parse()
        .unwrap();
    assert!(before >= 25, "{before}");
    let reply = reload(&ctl, None).expect("reload");
    let old = srv.pid();
    let new = pid_of(&reply);
    follow(&mut srv, old, new);
    let stats = common::stats(srv.addr());
    assert_eq!(common::json(&stats, "pid"), new.to_string(), "{stats}");
    let after: u64 = common::json(&stats, "served_total").parse().unwrap();
    assert!(after > before, "served_total {before} -> {after}: {stats}");
    assert!(srv.stop().success());
}

#[test]
fn symlink_switch_and_rollback_then_deploy_run_the_intended_binary() {
    let dir = TempDir::new("deploy-symlink");
    let good = std::fs::read(common::server_bin()).unwrap();
    for v in ["v1", "v2", "v3"] {
        std::fs::create_dir_all(dir.path().join("releases").join(v)).unwrap();
        install(
            &dir.path().join("releases").join(v).join("server"),
            &good,
            0o755,
        );
    }
    let link = |v: &str| {
        // Switch `current` atomically, as Capistrano does.
        let tmp = dir.path().join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("releases/{v}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("current")).unwrap();
    };
    link("v1");
    let deploy_path = dir.path().join("current").join("server");
    let (ctl, mut srv) = start(dir.path(), &deploy_path, &[]);
    let release = |v: &str| {
        std::fs::canonicalize(dir.path().join("releases").join(v).join("server")).unwrap()
    };

    // Switch the link: the reload runs v2, and says so.
    link("v2");
    let reply = reload(&ctl, None).expect("reload to v2");
    assert_eq!(
        common::json(&reply, "program"),
        release("v2").to_str().unwrap()
    );
    let (old, v2) = (srv.pid(), pid_of(&reply));
    assert_eq!(exe_of(v2), id_of(&release("v2")));
    follow(&mut srv, old, v2);

    // Roll back to a kept binary: a one-off.
    let kept = dir.path().join("server.previous");
    install(&kept, &good, 0o755);
    let reply = reload(&ctl, Some(&kept)).expect("rollback");
    let rolled = pid_of(&reply);
    assert_eq!(exe_of(rolled), id_of(&kept));
    follow(&mut srv, v2, rolled);

    // The next deploy goes to the deploy path again, not to .previous.
    link("v3");
    let reply = reload(&ctl, None).expect("deploy after the rollback");
    let v3 = pid_of(&reply);
    assert_eq!(
        common::json(&reply, "program"),
        release("v3").to_str().unwrap()
    );
    assert_eq!(exe_of(v3), id_of(&release("v3")));
    follow(&mut srv, rolled, v3);
    assert!(srv.stop().success());
}

#[test]
fn a_successor_that_refuses_a_changed_address_says_why_to_reload_and_the_log() {
    let dir = TempDir::new("deploy-addr");
    let (ctl, mut srv) = start(dir.path(), &common::server_bin(), &[]);
    let addr = srv.addr();
    // The new build's configuration moved the listener to another port.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let moved = other.local_addr().unwrap();
    drop(other);
    let bin = dir.path().join("moved");
    install(
        &bin,
        format!(
            "#!/bin/sh\nexec {} --listen {moved} --control {}\n",
            common::server_bin().display(),
            ctl.display()
        )
        .as_bytes(),
        0o755,
    );
    let err = reload(&ctl, Some(&bin)).expect_err("the successor refuses the socket");
    let want = format!("expected a TCP listener on {moved}, found one bound to {addr}");
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("failed to start"), "{err}");
    logged(&srv, &want);
    // Still serving, on the old address.
    assert_eq!(
        common::json(&common::stats(addr), "pid"),
        srv.pid().to_string()
    );
    assert!(srv.stop().success());
}

#[test]
fn absurd_ready_timeouts_are_configuration_errors_not_panics() {
    for (value, expect) in [
        ("0", "ready_timeout: must be greater than zero"),
        ("1e-9", "shorter than the minimum of 1 ms"),
        ("1e19", "longer than the maximum"),
        ("2e19", "longer than the maximum"),
        ("1e300", "longer than the maximum"),
        ("-1", "is not a number of seconds"),
    ] {
        let out = common::output_bounded(
            Command::new(common::server_bin()).args([
                "--listen",
                "127.0.0.1:0",
                "--ready-timeout",
                value,
            ]),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: started anyway");
        assert!(err.contains(expect), "{value}: {err}");
        assert!(!err.contains("panicked"), "{value}: {err}");
    }
}

#[test]
fn an_unwritable_pid_file_fails_the_upgrade_before_the_commit() {
    let dir = TempDir::new("deploy-pidfile");
    let pid_file = dir.path().join("run").join("server.pid");
    std::fs::create_dir_all(pid_file.parent().unwrap()).unwrap();
    let (ctl, mut srv) = start(
        dir.path(),
        &common::server_bin(),
        &["--pid-file", pid_file.to_str().unwrap()],
    );
    let reply = reload(&ctl, None).expect("first upgrade");
    let (old, new) = (srv.pid(), pid_of(&reply));
    follow(&mut srv, old, new);
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), new);

    // The pid file cannot be replaced now (a non-empty directory took its
    // place: even root cannot rename a file over it).
    std::fs::remove_file(&pid_file).unwrap();
    std::fs::create_dir_all(pid_file.join("x")).unwrap();
    let load = load::Load::start_warm(srv.addr(), 2, 2, 31);
    let err = reload(&ctl, None).expect_err("the pid file cannot name the successor");
    assert!(err.contains("pid file"), "{err}");
    logged(&srv, "cannot write the pid file");
    let stats = common::stats(srv.addr());
    assert_eq!(common::json(&stats, "pid"), new.to_string(), "{stats}");
    assert!(stats.contains("pid file"), "{stats}");

    // Repaired: the next upgrade succeeds and the pid file names a live server.
    std::fs::remove_dir_all(&pid_file).unwrap();
    let reply = reload(&ctl, None).expect("upgrade after the repair");
    let third = pid_of(&reply);
    follow(&mut srv, new, third);
    assert_eq!(common::read_pid_file(&pid_file).unwrap(), third);
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert!(srv.stop().success());
}
