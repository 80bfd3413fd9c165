//! The control socket at its edges (issue 17): a neighbour of the same uid
//! cannot make the service run its program, another uid is refused before
//! anything is read, connections are capped, a reload that times out says
//! "unknown" (never "failed") while `status` shows the upgrade in progress,
//! a client gone before its upgrade starts nothing, and every upgrade —
//! whatever triggered it — is reported and counted, even when the old
//! generation dies before its commit.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, TempDir, install, load, procs, wait_until};

/// `<fixture> <args>` (the crate's `control::command`): (exit code, stdout,
/// stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = common::output_bounded(
        Command::new(common::server_bin()).args(args),
        Duration::from_secs(90),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn start(dir: &Path, program: &Path, extra: &[&str]) -> (PathBuf, Server) {
    let ctl = dir.join("ctl");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--control",
        ctl.to_str().unwrap(),
        "--ready-timeout",
        "20",
    ];
    args.extend_from_slice(extra);
    let srv = Server::start_program(program, &args);
    (ctl, srv)
}

fn status(ctl: &Path) -> String {
    handover::control::status(ctl, Duration::from_secs(10)).expect("status")
}

#[test]
fn a_program_named_in_a_request_runs_only_if_the_service_allows_it() {
    let dir = TempDir::new("ctl-evil");
    let (ctl, mut srv) = start(dir.path(), &common::server_bin(), &[]);
    let marker = dir.path().join("ran");
    let evil = dir.path().join("evil.sh");
    install(
        &evil,
        format!("#!/bin/sh\nenv > {}\n", marker.display()).as_bytes(),
        0o755,
    );
    // Through the CLI, and as a raw request line.
    let (code, _, err) = cli(&[
        "reload",
        "--control",
        ctl.to_str().unwrap(),
        "--binary",
        evil.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refused") && err.contains("allow_program"),
        "{err}"
    );
    let mut s = UnixStream::connect(&ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "upgrade {}", evil.display()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("error refused"), "{reply}");
    assert!(!marker.exists(), "the named program ran");
    let st = status(&ctl);
    assert_eq!(common::json(&st, "upgrades_failed"), "0", "{st}");
    assert_eq!(common::json(&st, "pid"), srv.pid().to_string());

    // Allowed by the service (`--allow-program DIR`): the rollback runs.
    assert!(srv.stop().success());
    let kept = dir.path().join("kept").join("server");
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    install(&kept, &std::fs::read(common::server_bin()).unwrap(), 0o755);
    let allowed = dir.path().join("kept");
    let (ctl, mut srv) = start(
        dir.path(),
        &common::server_bin(),
        &["--allow-program", allowed.to_str().unwrap()],
    );
    let (code, out, err) = cli(&[
        "reload",
        "--control",
        ctl.to_str().unwrap(),
        "--binary",
        kept.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(common::json(&out, "program"), kept.to_str().unwrap());
    let (old, new) = (srv.pid(), common::json(&out, "pid").parse().unwrap());
    srv.finish_upgrade(old, new);
    // Still nothing outside the allowed directory.
    let (code, _, err) = cli(&[
        "reload",
        "--control",
        ctl.to_str().unwrap(),
        "--binary",
        evil.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(!marker.exists(), "the named program ran");
    assert!(srv.stop().success());
}

#[test]
fn another_uid_is_refused_before_it_sends_anything_and_connections_are_capped() {
    let dir = TempDir::new("ctl-peer");
    let (ctl, mut srv) = start(dir.path(), &common::server_bin(), &[]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    // uid 65534 connects and sends nothing: the refusal comes at once.
    let t = Instant::now();
    let out = common::output_bounded(
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(common::server_bin())
            .arg("peer-read")
            .arg(&ctl),
        Duration::from_secs(30),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("permission denied: uid 65534"), "{said}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the refusal waited for a request line"
    );

    // 16 connections that send nothing hold every slot: the 17th is busy,
    // and nothing was done.
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&ctl).unwrap())
        .collect();
    wait_until(
        "the 17th connection to be told busy",
        Duration::from_secs(10),
        || {
            matches!(
                handover::control::status(&ctl, Duration::from_secs(5)),
                Err(handover::control::ControlError::Failed(r)) if r.starts_with("busy")
            )
        },
    );
    drop(idle);
    wait_until("the slots to free", Duration::from_secs(10), || {
        handover::control::status(&ctl, Duration::from_secs(5)).is_ok()
    });
    assert_eq!(common::json(&status(&ctl), "upgrades_failed"), "0");
    assert!(srv.stop().success());
}

#[test]
fn a_reload_that_times_out_is_unknown_and_status_follows_it_to_the_end() {
    let dir = TempDir::new("ctl-unknown");
    let (bin, good) = common::deploy(dir.path(), "server");
    let (ctl, mut srv) = start(dir.path(), &bin, &[]);
    let load = load::Load::start(srv.addr(), 1, 2);
    let old = srv.pid();
    // The next build needs 3 s to get ready.
    let slow = dir.path().join("slow");
    install(&slow, &good, 0o755);
    install(
        &bin,
        format!("#!/bin/sh\nsleep 3\nexec {} \"$@\"\n", slow.display()).as_bytes(),
        0o755,
    );
    let ctl_s = ctl.to_str().unwrap();
    let (code, out, err) = cli(&["reload", "--control", ctl_s, "--timeout", "1"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("unknown") && err.contains("status"), "{err}");
    assert!(!err.contains("failed"), "{err}");
    // In progress: since when, which program, the successor's pid.
    let st = status(&ctl);
    assert!(st.contains("\"upgrade\":{\"since_us\":"), "{st}");
    assert_eq!(common::json(&st, "program"), bin.to_str().unwrap(), "{st}");
    let succ: u32 = st
        .split("\"successor\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no successor in {st}"));
    // `status --wait` follows it to its end: the successor serves.
    let (code, out, err) = cli(&["status", "--control", ctl_s, "--wait", "60"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"upgrade\":null"), "{out}");
    srv.finish_upgrade(old, succ);
    let st = status(&ctl);
    assert_eq!(common::json(&st, "pid"), succ.to_string(), "{st}");
    assert_eq!(common::json(&st, "generation"), "2", "{st}");
    // Its last upgrade is the one that made it.
    assert!(st.contains("\"last_upgrade\":{\"ok\":true"), "{st}");
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert!(srv.stop().success());
}

#[test]
fn a_request_whose_client_is_gone_starts_no_upgrade() {
    let dir = TempDir::new("ctl-gone");
    let (bin, _) = common::deploy(dir.path(), "server");
    let (ctl, mut srv) = start(dir.path(), &bin, &[]);
    // A build that fails after 2 s: the first reload holds the upgrade
    // while a second request queues behind it.
    install(&bin, b"#!/bin/sh\nsleep 2\nexit 1\n", 0o755);
    let ctl2 = ctl.clone();
    let first =
        std::thread::spawn(move || handover::control::reload(&ctl2, None, Duration::from_secs(60)));
    wait_until(
        "the first upgrade to start",
        Duration::from_secs(10),
        || !status(&ctl).contains("\"upgrade\":null"),
    );
    let mut gone = UnixStream::connect(&ctl).unwrap();
    writeln!(gone, "upgrade since={}", common::monotonic_us()).unwrap();
    drop(gone);
    let err = first.join().unwrap().expect_err("the first build fails");
    assert!(!err.is_unknown(), "{err}");
    wait_until(
        "the queued request to be dropped",
        Duration::from_secs(10),
        || {
            srv.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("its client is gone"))
        },
    );
    let st = status(&ctl);
    assert!(st.contains("\"upgrade\":null"), "{st}");
    assert_eq!(common::json(&st, "upgrades_failed"), "1", "{st}");
    // One failure reported, by the crate's on_upgrade.
    let pid = srv.pid();
    srv.wait_line("upgrade-failed", Some(pid));
    assert!(srv.stop().success());
}

#[test]
fn the_counters_survive_an_old_generation_killed_before_its_commit() {
    let dir = TempDir::new("ctl-counters");
    let (bin, good) = common::deploy(dir.path(), "server");
    let (_ctl, mut srv) = start(dir.path(), &bin, &["--probation", "30"]);
    let old = srv.pid();
    // A failed upgrade first, so both counters are non-zero.
    install(&bin, b"#!/bin/sh\nexit 1\n", 0o755);
    srv.failed_upgrade();
    install(&bin, &good, 0o755);
    procs::signal(old, libc::SIGHUP).unwrap();
    // The successor is ready and on probation: kill the old generation.
    let ready = srv.wait_line("ready", None);
    let new = common::field_u32(&ready, "pid");
    assert_ne!(new, old);
    srv.generations.push((new, false));
    srv.ready_line = ready;
    procs::signal(old, libc::SIGKILL).unwrap();
    procs::reap(old, Duration::from_secs(10)).unwrap();
    wait_until(
        "the successor to serve alone",
        Duration::from_secs(30),
        || {
            let s = common::stats(srv.addr());
            common::json(&s, "committed") == "true" && common::json(&s, "pid") == new.to_string()
        },
    );
    let s = common::stats(srv.addr());
    assert_eq!(common::json(&s, "upgrades_succeeded"), "1", "{s}");
    assert_eq!(common::json(&s, "upgrades_failed"), "1", "{s}");
    assert!(srv.stop().success());
}
