//! Test harness: runs the test fixture (examples/http_server plus test
//! switches, tests/fixture/server.rs) for real, reads its event lines,
//! upgrades it with signals, and reaps every generation it started.
#![allow(dead_code)] // each test file uses a different part

#[path = "../../examples/support/load.rs"]
pub mod load;
#[path = "../../examples/support/procs.rs"]
pub mod procs;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// Bound on waiting for any one event of the server.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The test fixture (tests/fixture/server.rs: examples/http_server plus
/// test-only switches), built by `cargo test` as the example `fixture_server`.
pub fn server_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/examples/fixture_server
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples")
        .join("fixture_server");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test` (which builds the examples) \
         or `cargo build --examples` first",
        bin.display()
    );
    bin
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "handover-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("HANDOVER_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of `key=` in an event line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

pub fn field_u32(line: &str, key: &str) -> u32 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

static SUBREAPER: Once = Once::new();

/// A chain of server generations started by this test.
pub struct Server {
    child: Child,
    rx: mpsc::Receiver<String>,
    /// Lines read but not consumed by a `wait_line`.
    pending: Vec<String>,
    /// Every stdout line seen.
    pub history: Vec<String>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Set once stderr reached its end: every process of the chain closed it.
    pub stderr_done: Arc<std::sync::atomic::AtomicBool>,
    /// Every generation's pid, in order, and whether it has been reaped.
    pub generations: Vec<(u32, bool)>,
    pub ready_line: String,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::start_program(&server_bin(), args)
    }

    pub fn start_program(program: &Path, args: &[&str]) -> Server {
        Server::start_env(program, args, &[])
    }

    pub fn start_env(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::spawn_env(program, args, envs, true)
    }

    fn spawn_env(program: &Path, args: &[&str], envs: &[(&str, &str)], wait_ready: bool) -> Server {
        SUBREAPER.call_once(procs::become_subreaper);
        let mut child = spawn(
            Command::new(program)
                .args(args)
                .env("RUST_LOG", "info")
                .envs(envs.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("spawn http_server");
        let rx = procs::line_channel(child.stdout.take().expect("piped"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err_pipe = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        let stderr_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stderr_done.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err_pipe)
                .lines()
                .map_while(Result::ok)
            {
                if std::env::var_os("HANDOVER_TEST_VERBOSE").is_some() {
                    eprintln!("[server] {line}");
                }
                sink.lock().unwrap().push(line);
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut s = Server {
            child,
            rx,
            pending: Vec::new(),
            history: Vec::new(),
            stderr,
            stderr_done,
            generations: Vec::new(),
            ready_line: String::new(),
        };
        if !wait_ready {
            let pid = s.child.id();
            s.generations.push((pid, false));
            return s;
        }
        let ready = s.wait_line("ready", None);
        s.generations.push((field_u32(&ready, "pid"), false));
        s.ready_line = ready;
        s
    }

    /// Starts the fixture with `args` without waiting for it to be ready
    /// (one that is expected to fail).
    pub fn launch(args: &[&str]) -> Server {
        Server::spawn_env(&server_bin(), args, &[], false)
    }

    /// Starts `program` (which runs the fixture somehow: a wrapper, a
    /// namespace) without waiting for a ready line.
    pub fn launch_program(program: &Path, args: &[&str]) -> Server {
        Server::spawn_env(program, args, &[], false)
    }

    /// Waits until the process this chain started exits, and reaps it.
    pub fn wait_child(&mut self) -> ExitStatus {
        let pid = self.child.id();
        let status = procs::reap(pid, EVENT_TIMEOUT).expect("reap");
        self.mark_reaped(pid);
        let _ = self.child.try_wait();
        status
    }

    /// The first TCP address of the serving generation.
    pub fn addr(&self) -> SocketAddr {
        self.addrs()[0]
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        field(&self.ready_line, "addr")
            .expect("addr")
            .split(',')
            .map(|a| a.parse().expect("socket address"))
            .collect()
    }

    /// The serving generation's pid.
    pub fn pid(&self) -> u32 {
        self.generations.last().expect("started").0
    }

    /// Waits for an event line starting with `prefix` (and `pid=<pid>`).
    pub fn wait_line(&mut self, prefix: &str, pid: Option<u32>) -> String {
        self.try_wait_line(prefix, pid, EVENT_TIMEOUT)
            .unwrap_or_else(|| panic!("no `{prefix}` line for {pid:?} within {EVENT_TIMEOUT:?}; seen: {:#?}\nstderr: {:#?}",
                self.history, self.stderr_tail()))
    }

    pub fn try_wait_line(
        &mut self,
        prefix: &str,
        pid: Option<u32>,
        timeout: Duration,
    ) -> Option<String> {
        let matches = |l: &str| {
            l.split_whitespace().next() == Some(prefix)
                && pid.is_none_or(|p| field(l, "pid") == Some(p.to_string().as_str()))
        };
        if let Some(i) = self.pending.iter().position(|l| matches(l)) {
            return Some(self.pending.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.rx.recv_timeout(left) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the server chain closed stdout (every generation exited) while waiting for `{prefix}`; \
                            seen: {:#?}\nstderr: {:#?}",
                        self.history,
                        self.stderr_tail()
                    )
                }
            };
            self.history.push(line.clone());
            if matches(&line) {
                return Some(line);
            }
            self.pending.push(line);
        }
    }

    /// The pid of the next generation to report ready, leaving its ready
    /// line to a later `wait_line` (or `finish_upgrade`).
    pub fn peek_ready_pid(&mut self) -> u32 {
        let ready = self.wait_line("ready", None);
        let pid = field_u32(&ready, "pid");
        self.pending.insert(0, ready);
        pid
    }

    /// Every stderr line of the chain containing `needle`, once every
    /// process of it has closed stderr (waited for, bounded).
    pub fn stderr_lines_with(&self, needle: &str) -> Vec<String> {
        wait_until("stderr to reach its end", EVENT_TIMEOUT, || {
            self.stderr_done.load(Ordering::SeqCst)
        });
        let e = self.stderr.lock().unwrap();
        e.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    pub fn stderr_tail(&self) -> Vec<String> {
        let e = self.stderr.lock().unwrap();
        e.iter().rev().take(30).rev().cloned().collect()
    }

    /// SIGHUP to the serving generation; waits for its successor, its exit
    /// and reaps it (asserting exit status 0). Returns (old, new) pids.
    pub fn upgrade(&mut self) -> (u32, u32) {
        let old = self.pid();
        procs::signal(old, libc::SIGHUP).expect("SIGHUP");
        let ok = self.wait_line("upgrade-ok", Some(old));
        let new = field_u32(&ok, "successor");
        self.finish_upgrade(old, new);
        (old, new)
    }

    /// After `old` reported `upgrade-ok` naming `new`: waits for the new
    /// generation's ready line, the old one's exit (reaped, status 0), and
    /// the new one noticing it.
    pub fn finish_upgrade(&mut self, old: u32, new: u32) {
        let ready = self.wait_line("ready", Some(new));
        self.ready_line = ready;
        self.generations.push((new, false));
        self.wait_line("exit", Some(old));
        let status = procs::reap(old, EVENT_TIMEOUT).expect("reap old generation");
        assert!(
            status.success(),
            "old generation {old} exited with {status}"
        );
        self.mark_reaped(old);
        // The successor learns of it from EOF on the channel.
        self.wait_line("predecessor-exited", Some(new));
    }

    /// SIGHUP that must fail; returns the `upgrade-failed` line.
    pub fn failed_upgrade(&mut self) -> String {
        let pid = self.pid();
        procs::signal(pid, libc::SIGHUP).expect("SIGHUP");
        self.wait_line("upgrade-failed", Some(pid))
    }

    fn mark_reaped(&mut self, pid: u32) {
        for g in &mut self.generations {
            if g.0 == pid {
                g.1 = true;
            }
        }
    }

    /// Waits for the serving generation (of this chain) to exit on its own
    /// (after a takeover, say) and reaps it.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let pid = self.pid();
        self.wait_line("exit", Some(pid));
        let status = procs::reap(pid, EVENT_TIMEOUT).expect("reap the generation");
        self.mark_reaped(pid);
        status
    }

    /// SIGTERM to the serving generation; waits for it to drain and exit.
    pub fn stop(&mut self) -> ExitStatus {
        let pid = self.pid();
        procs::signal(pid, libc::SIGTERM).expect("SIGTERM");
        self.wait_stopped()
    }

    /// After a SIGTERM sent by the test: waits for the serving generation's
    /// `exit` line and reaps it.
    pub fn wait_stopped(&mut self) -> ExitStatus {
        let pid = self.pid();
        self.wait_line("exit", Some(pid));
        let status = procs::reap(pid, EVENT_TIMEOUT).expect("reap last generation");
        self.mark_reaped(pid);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Kill only what this test started and has not reaped (so the pid
        // cannot have been reused): every generation is our child or was
        // reparented to us, the subreaper.
        for (pid, reaped) in self.generations.clone() {
            if !reaped {
                let _ = procs::signal(pid, libc::SIGKILL);
                let _ = procs::reap(pid, Duration::from_secs(5));
            }
        }
        let _ = self.child.try_wait();
    }
}

/// Waits until `f` returns true, probing every 5 ms; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Replaces `path` atomically (write beside it, rename over it), as a deploy does.
pub fn install(path: &Path, contents: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    // No fork of this process while the file is open for writing: a child
    // forked meanwhile would hold the write fd until its exec, and an exec of
    // the file in that window fails with ETXTBSY ("Text file busy").
    let _no_fork = FORK.write().unwrap_or_else(|e| e.into_inner());
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Held for writing while `install` has a file open, for reading around a
/// spawn (see `install`).
static FORK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// `cmd.spawn()`, never while `install` writes a file; a file another
/// process still holds open for writing (ETXTBSY) is tried again, bounded.
pub fn spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let spawned = {
            let _fork = FORK.read().unwrap_or_else(|e| e.into_inner());
            cmd.spawn()
        };
        match spawned {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Installs a copy of the server binary as `dir/name`, as a deploy would,
/// so a test can break and repair it; returns its path and the good bytes.
pub fn deploy(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let bin = dir.join(name);
    let good = std::fs::read(server_bin()).expect("read the server binary");
    install(&bin, &good, 0o755);
    (bin, good)
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it if
/// it is still running after `timeout`.
pub fn output_bounded(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("spawn");
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("wait")
}

/// The raw value of `"key":` in a flat JSON object (the server's /stats):
/// a number, `true`, `null`, or a quoted string without its quotes.
pub fn json<'a>(body: &'a str, key: &str) -> &'a str {
    let rest = body
        .split(&format!("\"{key}\":"))
        .nth(1)
        .unwrap_or_else(|| panic!("no {key:?} in {body}"));
    if let Some(s) = rest.strip_prefix('"') {
        return &s[..s.find('"').unwrap_or(s.len())];
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim()
}

/// GET /stats from the serving generation.
pub fn stats(addr: SocketAddr) -> String {
    load::get(addr, "/stats").expect("GET /stats").body
}

/// A successor program: a shell script that runs the server binary with the
/// arguments it is given plus `extra` (how a test makes only the successor
/// crash or report itself unhealthy).
pub fn wrapper(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\nexec {} \"$@\" {extra}\n",
        server_bin().display()
    );
    install(&path, script.as_bytes(), 0o755);
    path
}

/// `CLOCK_MONOTONIC` in µs, the clock of the control protocol's `since=`.
pub fn monotonic_us() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid struct given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u128 * 1_000_000 + ts.tv_nsec as u128 / 1000
}

/// Skips a test that cannot run on this machine (`name` says which
/// requirement is missing): says so on stderr. In CI (`CI` set), whose
/// `.ci/run` installs what every test needs, a skip fails instead, unless
/// `HANDOVER_ALLOW_SKIP` (comma-separated) names it.
pub fn skip(name: &str, reason: &str) {
    let allowed =
        std::env::var("HANDOVER_ALLOW_SKIP").is_ok_and(|v| v.split(',').any(|n| n.trim() == name));
    if std::env::var_os("CI").is_some() && !allowed {
        panic!("{name}: this test cannot run here, and CI must run it: {reason}");
    }
    eprintln!("SKIPPED ({name}): {reason}");
}

/// Whether this process may start others in pid and mount namespaces of
/// their own (`unshare --pid --fork --mount-proc`, as a container runtime
/// does): root, with the util-linux tool.
pub fn can_unshare_pid() -> bool {
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The pid a pid file names (the crate writes it as decimal digits and a
/// newline).
pub fn read_pid_file(path: &Path) -> std::io::Result<u32> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
