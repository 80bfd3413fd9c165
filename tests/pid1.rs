//! A container's PID 1: the example server run as PID 1 of a new PID
//! namespace (`unshare --pid --fork --mount-proc`) supervises itself
//! (`handover::supervisor`), so that upgrades replace the serving process
//! while PID 1 — whose exit would kill the whole namespace — stays. The same
//! with the supervisor asked for by `--supervise`, as under tini.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{EVENT_TIMEOUT, field, field_u32, json, load, procs, stats, wait_until};

/// Every process below `root` (host pids), with its state.
fn descendants(root: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for (child, state) in procs::children(p) {
            out.push((child, state));
            todo.push(child);
        }
    }
    out
}

/// Whether `pid` is alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_owned()))
        .is_some_and(|r| !r.starts_with('Z'))
}

fn unshare_works() -> bool {
    let out = common::output_bounded(
        Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "true"]),
        Duration::from_secs(10),
    );
    if !out.status.success() {
        common::skip(
            "pid1",
            &format!(
                "`unshare --pid --fork --mount-proc` does not work here (needs root or user namespaces): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
    }
    out.status.success()
}

struct Lines {
    rx: mpsc::Receiver<String>,
    /// Lines read but not waited for yet.
    pending: Vec<String>,
    seen: Vec<String>,
}

impl Lines {
    /// The next line starting with `prefix` (and `key=value`, if given).
    fn wait(&mut self, prefix: &str, with: Option<(&str, String)>) -> String {
        let fits = |line: &str| {
            line.split_whitespace().next() == Some(prefix)
                && with
                    .as_ref()
                    .is_none_or(|(k, v)| field(line, k) == Some(v.as_str()))
        };
        if let Some(i) = self.pending.iter().position(|l| fits(l)) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no `{prefix}` line {with:?} within {EVENT_TIMEOUT:?}; seen {:#?}",
                    self.seen
                )
            });
            self.seen.push(line.clone());
            if fits(&line) {
                return line;
            }
            self.pending.push(line);
        }
    }
}

/// How the supervisor runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// As PID 1 of a new PID namespace: it supervises on its own.
    Pid1,
    /// The same without a /proc of the namespace's own (`unshare` without
    /// `--mount-proc`): /proc still shows the parent namespace's pids.
    Pid1HostProc,
    /// As a child of the test (as under tini), asked with `--supervise`.
    Flag,
}

/// Starts the example server under its supervisor; returns what to clean
/// up (with the host pid of the supervisor) and the stdout lines.
fn start_supervised(mode: Mode) -> (Namespace, Lines) {
    let mut cmd = match mode {
        Mode::Pid1 | Mode::Pid1HostProc => {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork"]);
            if mode == Mode::Pid1 {
                c.arg("--mount-proc");
            }
            c.arg(common::server_bin());
            c
        }
        Mode::Flag => {
            let mut c = Command::new(common::server_bin());
            c.arg("--supervise");
            c
        }
    };
    let mut unshare = cmd
        .args(["--listen", "127.0.0.1:0", "--drain-timeout", "10"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the supervisor");
    let stdout = unshare.stdout.take().unwrap();
    let mut guard = Namespace { unshare, pid1: 0 };
    let rx = procs::line_channel(stdout);
    match mode {
        // unshare forks PID 1 of the namespace, which becomes the supervisor.
        Mode::Pid1 | Mode::Pid1HostProc => {
            wait_until("PID 1 of the namespace", EVENT_TIMEOUT, || {
                let c = procs::children(guard.unshare.id());
                guard.pid1 = c.first().map(|(p, _)| *p).unwrap_or(0);
                c.len() == 1
            })
        }
        Mode::Flag => guard.pid1 = guard.unshare.id(),
    }
    let lines = Lines {
        rx,
        pending: Vec::new(),
        seen: Vec::new(),
    };
    (guard, lines)
}

/// Waits (bounded) for `unshare` to exit: its status is PID 1's.
fn wait_exit(guard: &mut Namespace) -> std::process::ExitStatus {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Some(s) = guard.unshare.try_wait().unwrap() {
            guard.pid1 = 0;
            return s;
        }
        assert!(Instant::now() < deadline, "PID 1 did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pid1_stays_while_five_upgrades_replace_the_server_under_load_or_skip() {
    if !unshare_works() {
        return;
    }
    five_upgrades_under_load(Mode::Pid1);
}

#[test]
fn pid1_without_its_own_proc_follows_the_handover_too_or_skip() {
    if !unshare_works() {
        return;
    }
    five_upgrades_under_load(Mode::Pid1HostProc);
}

#[test]
fn an_explicit_supervisor_stays_while_five_upgrades_replace_the_server_under_load() {
    five_upgrades_under_load(Mode::Flag);
}

/// 5 upgrades under load, asked of the supervisor ("PID 1" below, whatever
/// its pid), then a stop.
fn five_upgrades_under_load(mode: Mode) {
    let (mut guard, mut lines) = start_supervised(mode);
    let pid1 = guard.pid1;
    let ready = lines.wait("ready", None);
    let addr: std::net::SocketAddr = field(&ready, "addr").unwrap().parse().unwrap();
    let mut serving = field_u32(&ready, "pid");
    // The server's pid as it sees it: in the namespace, PID 1 is the supervisor.
    let supervisor = if mode == Mode::Flag { pid1 } else { 1 };
    assert_ne!(
        serving, supervisor,
        "the server itself must not be the supervisor"
    );
    assert_eq!(json(&stats(addr), "generation"), "1");

    let load = load::Load::start_warm(addr, 2, 2, 21);
    for generation in 2..=6u64 {
        // Upgrades are asked of PID 1, as an orchestrator would: it passes
        // the signal to the serving process.
        procs::signal(pid1, libc::SIGHUP).unwrap();
        let ok = lines.wait("upgrade-ok", Some(("pid", serving.to_string())));
        let new = field_u32(&ok, "successor");
        lines.wait("ready", Some(("pid", new.to_string())));
        lines.wait("exit", Some(("pid", serving.to_string())));
        lines.wait("predecessor-exited", Some(("pid", new.to_string())));
        serving = new;
        wait_until(
            "the new generation to serve the load",
            EVENT_TIMEOUT,
            || {
                load.stats
                    .by_pid
                    .lock()
                    .unwrap()
                    .get(&new)
                    .copied()
                    .unwrap_or(0)
                    > 100
            },
        );

        let s = stats(addr);
        assert_eq!(json(&s, "pid"), new.to_string(), "{s}");
        assert_eq!(json(&s, "generation"), generation.to_string(), "{s}");
        assert_eq!(
            json(&s, "upgrades_succeeded"),
            (generation - 1).to_string(),
            "{s}"
        );
        assert!(alive(pid1), "PID 1 died at generation {generation}");
        // The old generation is reaped by PID 1: the namespace holds PID 1
        // and the serving process, and no zombie.
        wait_until(
            "the namespace to hold PID 1 and one server",
            EVENT_TIMEOUT,
            || {
                let d = descendants(pid1);
                d.len() == 1 && d.iter().all(|(_, state)| *state != 'Z')
            },
        );
    }
    let stats = load.stop();
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:?}");
    assert!(
        stats.pids().len() >= 6,
        "not every generation answered: {:?}",
        stats.pids()
    );

    // SIGTERM to PID 1 (docker stop) stops the server, then PID 1 exits
    // with its status.
    procs::signal(pid1, libc::SIGTERM).unwrap();
    let exit = lines.wait("exit", Some(("pid", serving.to_string())));
    assert!(exit.contains("reason=stop"), "{exit}");
    let status = wait_exit(&mut guard);
    assert!(status.success(), "unshare (PID 1) exited with {status}");
    assert!(!Path::new(&format!("/proc/{pid1}")).exists() || !alive(pid1));
}

#[test]
fn pid1_exits_with_the_status_of_a_server_that_dies_or_skip() {
    if !unshare_works() {
        return;
    }
    let (mut guard, mut lines) = start_supervised(Mode::Pid1);
    let pid1 = guard.pid1;
    lines.wait("ready", None);
    let server = procs::children(pid1);
    assert_eq!(server.len(), 1, "{server:?}");
    // The server dies without a successor: the service is over, and PID 1
    // says how it ended (128 + SIGKILL), as a container runtime expects.
    procs::signal(server[0].0, libc::SIGKILL).unwrap();
    let status = wait_exit(&mut guard);
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status}");
}

/// What this test started: on a failure, PID 1 is killed, which takes the
/// whole namespace with it, and `unshare` is reaped.
struct Namespace {
    unshare: std::process::Child,
    pid1: u32,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if self.pid1 != 0 {
            let _ = procs::signal(self.pid1, libc::SIGKILL);
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}
