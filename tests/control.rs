//! The control socket and the `reload` command: 0600 and same-uid only, an
//! exit code that tells the truth, one upgrade for a burst of requests,
//! preflight, and rollback to a kept binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{Server, TempDir, install, load, wait_until};

/// Runs `<client> reload --control <ctl> [--binary B]`: (exit code, stdout, stderr).
fn reload(ctl: &Path, binary: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(common::server_bin());
    cmd.arg("reload")
        .arg("--control")
        .arg(ctl)
        .args(["--timeout", "60"]);
    if let Some(b) = binary {
        cmd.arg("--binary").arg(b);
    }
    let out = common::output_bounded(&mut cmd, Duration::from_secs(90));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A server with a control socket in a new temporary directory, and
/// `extra` flags: (directory, control socket path, server).
fn with_control(tag: &str, extra: &[&str]) -> (TempDir, std::path::PathBuf, Server) {
    let dir = TempDir::new(tag);
    let ctl = dir.path().join("ctl");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--control",
        ctl.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let srv = Server::start(&args);
    (dir, ctl, srv)
}

#[test]
fn the_control_socket_is_0600_and_refuses_other_users() {
    let (dir, ctl, mut srv) = with_control("ctl-perm", &[]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let status = handover::control::status(&ctl, Duration::from_secs(10)).expect("status");
    assert!(
        status.contains(&format!("\"pid\":{}", srv.pid())),
        "{status}"
    );
    assert!(status.contains("\"state\":\"serving\""), "{status}");

    // Open the file up, so that only the peer-credential check stands in
    // the way of another uid.
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = common::output_bounded(
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(common::server_bin())
            .arg("reload")
            .arg("--control")
            .arg(&ctl),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied: uid 65534"), "{err}");
    assert_eq!(
        srv.history
            .iter()
            .filter(|l| l.starts_with("upgrade"))
            .count(),
        0
    );
    assert!(srv.stop().success());
}

#[test]
fn reload_exits_non_zero_with_the_reason_and_the_old_generation_serves() {
    let dir = TempDir::new("ctl-reload");
    let (bin, good) = common::deploy(dir.path(), "server");
    let kept = dir.path().join("server.previous");
    install(&kept, &good, 0o755);
    let ctl = dir.path().join("ctl");
    let mut srv = Server::start_program(
        &bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--control",
            ctl.to_str().unwrap(),
            "--preflight",
            "--ready-timeout",
            "2",
            "--allow-program",
            kept.to_str().unwrap(),
        ],
    );
    let load = load::Load::start_warm(srv.addr(), 2, 2, 21);
    let stats = load.stats.clone();
    let serving = srv.pid();

    let check_ok = "case \"$*\" in *--check*) exit 0;; esac\n";
    let cases: Vec<(String, &str)> = vec![
        (
            "#!/bin/sh\necho 'config broken: line 3' >&2\nexit 1\n".into(),
            "preflight check failed (exit status: 1): config broken: line 3",
        ),
        (
            format!("#!/bin/sh\n{check_ok}exit 3\n"),
            "exited before it was ready: exit status: 3",
        ),
        (
            format!("#!/bin/sh\n{check_ok}exec sleep 30\n"),
            "was not ready within 2s",
        ),
    ];
    for (script, expect) in &cases {
        install(&bin, script.as_bytes(), 0o755);
        let (code, _, err) = reload(&ctl, None);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    }
    std::fs::remove_file(&bin).unwrap();
    let (code, _, err) = reload(&ctl, None);
    assert_eq!(code, 1);
    assert!(err.contains("No such file or directory"), "{err}");
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert_eq!(
        stats.pids(),
        vec![serving],
        "only the old generation may have answered"
    );
    let status = handover::control::status(&ctl, Duration::from_secs(10)).unwrap();
    assert!(
        status.contains("\"ok\":false") && status.contains("No such file"),
        "{status}"
    );

    // A good binary: exit 0, and the successor serves.
    install(&bin, &good, 0o755);
    let (code, out, err) = reload(&ctl, None);
    assert_eq!(code, 0, "{err}");
    let new: u32 = common::json(&out, "pid").parse().unwrap();
    wait_until(
        "the new generation to answer",
        Duration::from_secs(30),
        || stats.by_pid.lock().unwrap().contains_key(&new),
    );
    // Roll back to the kept binary, the blue/green flip back.
    let (code, out, err) = reload(&ctl, Some(&kept));
    assert_eq!(code, 0, "{err}");
    let third: u32 = common::json(&out, "pid").parse().unwrap();
    wait_until(
        "the rolled-back generation to answer",
        Duration::from_secs(30),
        || stats.by_pid.lock().unwrap().contains_key(&third),
    );
    let cmdline = std::fs::read(format!("/proc/{third}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).starts_with(kept.to_str().unwrap()));
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    srv.generations.push((new, false));
    srv.generations.push((third, false));
    srv.wait_line("ready", Some(third));
    assert!(srv.stop().success());
}

/// One request line over the control socket, as `control::reload` sends
/// it: the reply line, or `None` if the socket closed without one.
fn exchange(
    ctl: &std::path::Path,
    line: &str,
    timeout: Duration,
) -> std::io::Result<Option<String>> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(ctl)?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    writeln!(s, "{line}")?;
    let mut reply = String::new();
    match std::io::BufReader::new(s).read_line(&mut reply) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(reply.trim_end().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e),
    }
}

/// `control::reload` with the request made at `since` (CLOCK_MONOTONIC
/// µs): asks again after `retry` or a close without a reply, as `reload`
/// does, for at most 60 s (a probe loop with a deadline).
fn reload_since(ctl: &std::path::Path, since: u128) -> Result<String, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let reply =
            exchange(ctl, &format!("upgrade since={since}"), left).map_err(|e| e.to_string())?;
        match reply {
            Some(r) if r.starts_with("ok ") => return Ok(r[3..].to_owned()),
            // `retry`, or closed by a generation that handed over.
            Some(r) if r.starts_with("retry ") && !left.is_zero() => {}
            None if !left.is_zero() => {}
            other => return Err(format!("{other:?}")),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_burst_of_ten_reloads_makes_at_most_two_upgrades_each_newer_than_its_request() {
    let (_dir, ctl, mut srv) = with_control("ctl-burst", &[]);
    let old = srv.pid();
    // Ten operators decide to reload at one instant (one `since=`, as
    // `control::reload` sends it): their requests are a burst whatever the
    // scheduling of ten threads on two cores, which may spread their
    // arrivals over longer than an upgrade takes.
    let asked = common::monotonic_us();
    let barrier = Arc::new(Barrier::new(10));
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let (b, ctl) = (barrier.clone(), ctl.clone());
            std::thread::spawn(move || {
                b.wait();
                (asked, reload_since(&ctl, asked))
            })
        })
        .collect();
    let replies: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut pids = std::collections::BTreeSet::new();
    for (asked, r) in &replies {
        let body = r.as_ref().unwrap_or_else(|e| panic!("{e:?}: {replies:?}"));
        // The truth about a generation that started after the request.
        let started: u128 = common::json(body, "started_us").parse().unwrap();
        assert!(started > *asked, "{body} answers a request made at {asked}");
        pids.insert(common::json(body, "pid").parse::<u32>().unwrap());
    }
    assert!(
        (1..=2).contains(&pids.len()),
        "one or two upgrades: {replies:?}"
    );
    // Follow the chain of generations to the last one.
    let ok = srv.wait_line("upgrade-ok", Some(old));
    let mut prev = old;
    let mut new = common::field_u32(&ok, "successor");
    srv.finish_upgrade(prev, new);
    if pids.len() == 2 {
        let ok = srv.wait_line("upgrade-ok", Some(new));
        prev = new;
        new = common::field_u32(&ok, "successor");
        srv.finish_upgrade(prev, new);
    }
    assert!(pids.contains(&new), "{pids:?} {new}");
    assert!(srv.stop().success());
}

#[test]
fn during_probation_a_second_reload_waits_and_gets_an_upgrade_of_its_own() {
    let (_dir, ctl, mut srv) = with_control("ctl-probation", &["--probation", "2"]);
    let old = srv.pid();
    let first = std::thread::spawn({
        let ctl = ctl.clone();
        move || reload(&ctl, None)
    });
    // The successor is on probation: both generations accept on the control
    // socket, but only the old one serves it. A second reload made now must
    // not share the running upgrade (it started before the request): it
    // waits, is told to ask the successor once that one is final, and gets
    // an upgrade of its own.
    let new = srv.peek_ready_pid();
    let (code, out, err) = reload(&ctl, None);
    assert_eq!(code, 0, "{out}{err}");
    let (code1, out1, err1) = first.join().unwrap();
    assert_eq!(code1, 0, "{out1}{err1}");
    assert!(out1.contains(&format!("\"pid\":{new}")), "{out1}");
    let ok = srv.wait_line("upgrade-ok", Some(old));
    assert!(
        common::field(&ok, "probation_ms")
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= 2000.0
    );
    srv.finish_upgrade(old, new);
    let ok = srv.wait_line("upgrade-ok", Some(new));
    let third = common::field_u32(&ok, "successor");
    assert!(out.contains(&format!("\"pid\":{third}")), "{out}");
    srv.finish_upgrade(new, third);
    let status = handover::control::status(&ctl, Duration::from_secs(10)).expect("status");
    assert!(status.contains(&format!("\"pid\":{third}")), "{status}");
    assert!(status.contains("\"committed\":true"), "{status}");
    assert!(status.contains("\"upgrades_succeeded\":2"), "{status}");
    assert!(srv.stop().success());
}
