//! Against a real systemd user manager: reloads under load keep MainPID on
//! the serving generation and the unit active; the watchdog follows the main
//! process; a dead new main is restarted; socket activation and the fd store
//! carry the sockets.
//!
//! Each test runs `systemd --user` in a private mount namespace with a tmpfs
//! on /run/systemd holding the marker /run/systemd/system, in cgroups of its
//! own, and talks to it with `systemctl --user` through `nsenter`. Where that
//! cannot run (not root, no systemd, no writable cgroup hierarchy) the tests
//! say so and skip.
//!
//! The units are those of examples/systemd/. `HANDOVER_SYSTEMD_ROOT` names an
//! unpacked systemd package (`dpkg -x`) to use instead of the system's, e.g.
//! 254 from bookworm-backports for `Type=notify-reload`; .ci/run runs these
//! tests with both.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{TempDir, field, load, procs, wait_until};

/// The systemd to run: the system's, or an unpacked package's.
struct Systemd {
    manager: PathBuf,
    systemctl: PathBuf,
    libs: Option<PathBuf>,
}

fn systemd() -> Systemd {
    match std::env::var_os("HANDOVER_SYSTEMD_ROOT") {
        Some(root) => {
            let root = PathBuf::from(root);
            Systemd {
                manager: root.join("lib/systemd/systemd"),
                systemctl: root.join("bin/systemctl"),
                libs: Some(root.join("usr/lib/x86_64-linux-gnu/systemd")),
            }
        }
        None => Systemd {
            manager: "/lib/systemd/systemd".into(),
            systemctl: "systemctl".into(),
            libs: None,
        },
    }
}

/// The major version of the systemd in use.
fn systemd_version() -> u32 {
    let sd = systemd();
    let mut cmd = Command::new(&sd.systemctl);
    cmd.arg("--version");
    if let Some(l) = &sd.libs {
        cmd.env("LD_LIBRARY_PATH", l);
    }
    let out = common::output_bounded(&mut cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A unit of examples/systemd/ with its placeholders filled in and `extra`
/// lines appended to its last section ([Service] or [Socket]).
fn example_unit(name: &str, out: &Path, port: u16, extra: &str) -> String {
    example_unit_with(name, &common::server_bin(), out, port, extra)
}

/// [`example_unit`] with `bin` as the service's binary (@BIN@).
fn example_unit_with(name: &str, bin: &Path, out: &Path, port: u16, extra: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/systemd")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text
        .replace("@BIN@", &bin.display().to_string())
        .replace("@OUT@", &out.display().to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@CLIENT@", &common::server_bin().display().to_string())
        .replace(
            "@CTL@",
            &out.with_file_name("control").display().to_string(),
        );
    format!("{text}{extra}\n")
}

/// One manager at a time: they are heavy for a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

struct Manager {
    child: Child,
    dir: TempDir,
    cgroup: String,
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: cannot unshare a mount namespace".into());
    }
    let sd = systemd();
    if !sd.manager.exists() {
        return Some(format!("{} is missing", sd.manager.display()));
    }
    for h in ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"] {
        if !Path::new(h).join("cgroup.procs").exists() {
            return Some(format!("no cgroup hierarchy at {h}"));
        }
    }
    for tool in ["unshare", "nsenter"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is missing"));
        }
    }
    None
}

macro_rules! manager_or_skip {
    () => {
        match Manager::start() {
            Ok(m) => m,
            Err(why) => {
                common::skip(
                    "systemd",
                    &format!("a systemd user manager cannot run here: {why}"),
                );
                return;
            }
        }
    };
}

impl Manager {
    fn start() -> Result<Manager, String> {
        if let Some(why) = skip_reason() {
            return Err(why);
        }
        let dir = TempDir::new("systemd");
        let runtime = dir.path().join("runtime");
        let config = dir.path().join("config");
        std::fs::create_dir_all(config.join("systemd/user")).unwrap();
        std::fs::create_dir_all(&runtime).unwrap();
        std::fs::set_permissions(
            &runtime,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let cgroup = format!(
            "handover-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let script = format!(
            "set -e
             mount -t tmpfs tmpfs /run/systemd
             mkdir -p /run/systemd/system
             for h in systemd unified; do
               mkdir -p /sys/fs/cgroup/$h/{cgroup}
               echo $$ > /sys/fs/cgroup/$h/{cgroup}/cgroup.procs
             done
             exec {manager} --user --log-target=kmsg",
            manager = systemd().manager.display()
        );
        let mut cmd = Command::new("unshare");
        if let Some(l) = systemd().libs {
            cmd.env("LD_LIBRARY_PATH", l);
        }
        let child = cmd
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("manager.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("manager.err")).unwrap())
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let m = Manager { child, dir, cgroup };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = m.systemctl(&["is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                let err =
                    std::fs::read_to_string(m.dir.path().join("manager.err")).unwrap_or_default();
                return Err(format!(
                    "the manager did not start (state {state:?}): {err}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn systemctl(&self, args: &[&str]) -> std::process::Output {
        let pid = self.child.id().to_string();
        let sd = systemd();
        let mut cmd = Command::new("nsenter");
        if let Some(l) = &sd.libs {
            cmd.env("LD_LIBRARY_PATH", l);
        }
        cmd.args(["-t", &pid, "-m", "--"])
            .arg(&sd.systemctl)
            .args(["--user", "--no-pager"])
            .args(args)
            .env("XDG_RUNTIME_DIR", self.path().join("runtime"));
        common::output_bounded(&mut cmd, Duration::from_secs(60))
    }

    fn ok(&self, args: &[&str]) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn unit(&self, name: &str, text: &str) {
        std::fs::write(self.path().join("config/systemd/user").join(name), text).unwrap();
    }

    /// Installs the service `name` with `text` and starts it.
    fn start_unit(&self, name: &str, text: &str) {
        self.unit(name, text);
        self.ok(&["daemon-reload"]);
        self.ok(&["start", name]);
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        let out = self.systemctl(&["show", "-P", prop, unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.prop(unit, "MainPID").parse().unwrap_or(0)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.systemctl(&["stop", "handover-test.service", "handover-test.socket"]);
        let _ = procs::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for h in ["systemd", "unified"] {
            let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{h}/{}", self.cgroup));
        }
    }
}

/// A free loopback port, from the kernel.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The address in the newest `ready` line of the unit's stdout file.
fn wait_ready_addr(out: &Path, pid: u32) -> SocketAddr {
    let mut addr = None;
    wait_until(
        &format!("ready line of {pid}"),
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(out).unwrap_or_default();
            addr = text
                .lines()
                .filter(|l| l.starts_with("ready") && field(l, "pid") == Some(&pid.to_string()))
                .find_map(|l| field(l, "addr").and_then(|a| a.split(',').next()?.parse().ok()));
            addr.is_some()
        },
    );
    addr.unwrap()
}

/// Reloads `n` times under load; asserts MainPID follows and nothing fails.
fn reloads_under_load(m: &Manager, unit: &str, n: usize, reload: &[&str]) -> Vec<u32> {
    let out = m.path().join("out");
    let first = m.main_pid(unit);
    assert_ne!(first, 0, "no main pid");
    let addr = wait_ready_addr(&out, first);
    let load = load::Load::start_warm(addr, 2, 2, 21);
    let stats = load.stats.clone();
    let mut pids = vec![first];
    for _ in 0..n {
        let old = *pids.last().unwrap();
        m.ok(reload);
        wait_until(
            "MainPID to move to the successor",
            Duration::from_secs(30),
            || {
                let p = m.main_pid(unit);
                p != 0 && p != old
            },
        );
        let new = m.main_pid(unit);
        wait_until("the successor to answer", Duration::from_secs(30), || {
            stats.by_pid.lock().unwrap().contains_key(&new)
        });
        wait_until(
            "the old generation to exit",
            Duration::from_secs(30),
            || !procs::exists(old),
        );
        assert_eq!(m.prop(unit, "ActiveState"), "active");
        pids.push(new);
    }
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert_eq!(m.prop(unit, "NRestarts"), "0");
    pids
}

#[test]
fn type_notify_reloads_under_load_follow_the_main_pid_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    m.start_unit(
        "handover-test.service",
        &example_unit("handover-notify.service", &out, 0, ""),
    );
    let pids = reloads_under_load(
        &m,
        "handover-test.service",
        3,
        &["reload", "handover-test.service"],
    );
    assert_eq!(pids.len(), 4);
    m.ok(&["stop", "handover-test.service"]);
    assert_eq!(m.prop("handover-test.service", "ActiveState"), "inactive");
    // The last generation drained and exited 0: systemd waited for it, as for
    // its own child (the successor was reparented to the manager before it
    // was named main, so it is never an "alien" main process).
    assert_eq!(m.prop("handover-test.service", "Result"), "success");
    let last = pids.last().unwrap().to_string();
    let text = std::fs::read_to_string(&out).unwrap();
    let exit = text
        .lines()
        .find(|l| l.starts_with("exit") && field(l, "pid") == Some(last.as_str()));
    assert!(exit.is_some_and(|l| l.contains("reason=stop")), "{text}");
}

#[test]
fn the_watchdog_follows_the_main_process_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    m.start_unit(
        "handover-test.service",
        &example_unit("handover-notify.service", &out, 0, "WatchdogSec=2"),
    );
    let pids = reloads_under_load(
        &m,
        "handover-test.service",
        3,
        &["reload", "handover-test.service"],
    );
    // Two full watchdog periods with the last generation as main: a missed
    // ping would restart the unit.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(
            m.main_pid("handover-test.service"),
            *pids.last().unwrap(),
            "watchdog restart"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(m.prop("handover-test.service", "NRestarts"), "0");
    assert_eq!(m.prop("handover-test.service", "ActiveState"), "active");
}

#[test]
fn killing_the_new_main_after_a_reload_triggers_restart_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    m.start_unit(
        "handover-test.service",
        &example_unit("handover-notify.service", &out, 0, "RestartSec=100ms"),
    );
    let pids = reloads_under_load(
        &m,
        "handover-test.service",
        1,
        &["reload", "handover-test.service"],
    );
    let new = pids[1];
    procs::signal(new, libc::SIGKILL).unwrap();
    wait_until("Restart=on-failure", Duration::from_secs(30), || {
        m.prop("handover-test.service", "NRestarts") == "1"
            && m.prop("handover-test.service", "ActiveState") == "active"
            && m.main_pid("handover-test.service") != new
    });
}

#[test]
fn socket_activation_is_carried_through_reloads_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    let port = free_port();
    m.unit(
        "handover-test.socket",
        &example_unit("handover-socket.socket", &out, port, ""),
    );
    m.unit(
        "handover-test.service",
        &example_unit("handover-socket.service", &out, port, ""),
    );
    m.ok(&["daemon-reload"]);
    m.ok(&["start", "handover-test.socket"]);
    // The first request starts the service.
    let r = load::get(format!("127.0.0.1:{port}").parse().unwrap(), "/")
        .expect("socket-activated request");
    assert_eq!(r.status, 200);
    assert_eq!(m.main_pid("handover-test.service"), r.pid);
    reloads_under_load(
        &m,
        "handover-test.service",
        3,
        &["reload", "handover-test.service"],
    );
}

#[test]
fn fd_store_keeps_the_socket_across_restart_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    m.start_unit(
        "handover-test.service",
        &example_unit("handover-fdstore.service", &out, 0, ""),
    );
    let first = m.main_pid("handover-test.service");
    let addr = wait_ready_addr(&out, first);
    let load = load::Load::start_warm(addr, 2, 2, 21);
    let stats = load.stats.clone();
    let mut pid = first;
    for _ in 0..2 {
        m.ok(&["restart", "handover-test.service"]);
        let new = m.main_pid("handover-test.service");
        assert_ne!(new, pid);
        // Same socket, same address, taken from the fd store.
        assert_eq!(wait_ready_addr(&out, new), addr);
        wait_until(
            "the restarted service to answer",
            Duration::from_secs(30),
            || stats.by_pid.lock().unwrap().contains_key(&new),
        );
        pid = new;
    }
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
}

#[test]
fn type_notify_reload_returns_only_after_the_handoff_on_systemd_253_or_later_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let version = systemd_version();
    if version < 253 {
        common::skip(
            "notify-reload",
            &format!(
                "Type=notify-reload needs systemd 253+, this is {version}; \
                 set HANDOVER_SYSTEMD_ROOT to an unpacked newer systemd (see .ci/run)"
            ),
        );
        return;
    }
    let m = manager_or_skip!();
    let out = m.path().join("out");
    let unit = "handover-test.service";
    m.start_unit(
        unit,
        &example_unit("handover-notify-reload.service", &out, 0, ""),
    );
    let first = m.main_pid(unit);
    let addr = wait_ready_addr(&out, first);
    let load = load::Load::start_warm(addr, 2, 2, 21);
    let stats = load.stats.clone();
    let mut pid = first;
    for _ in 0..3 {
        m.ok(&["reload", unit]);
        // No waiting: when reload returns, the successor is already main.
        let new = m.main_pid(unit);
        assert_ne!(new, pid, "reload returned before the handoff");
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("upgrade-ok")
                    && field(l, "successor") == Some(&new.to_string())),
            "{text}"
        );
        assert_eq!(m.prop(unit, "ActiveState"), "active");
        pid = new;
    }
    wait_until(
        "the last generation to answer",
        Duration::from_secs(30),
        || stats.by_pid.lock().unwrap().contains_key(&pid),
    );
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    m.ok(&["stop", unit]);
    assert_eq!(m.prop(unit, "Result"), "success");
}

#[test]
fn exec_reload_through_the_control_socket_fails_for_a_broken_binary_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    let unit = "handover-test.service";
    // The deployed binary is a copy that the test breaks and repairs.
    let (bin, good) = common::deploy(m.path(), "deployed");
    let text = example_unit_with("handover-control.service", &bin, &out, 0, "");
    m.start_unit(unit, &text);
    let first = m.main_pid(unit);
    let addr = wait_ready_addr(&out, first);
    let load = load::Load::start_warm(addr, 2, 2, 21);
    let stats = load.stats.clone();

    common::install(&bin, b"#!/bin/sh\nexit 3\n", 0o755);
    let r = m.systemctl(&["reload", unit]);
    assert!(!r.status.success(), "reload of a broken binary succeeded");
    assert_eq!(m.prop(unit, "ActiveState"), "active");
    assert_eq!(
        m.main_pid(unit),
        first,
        "the old generation must still be main"
    );

    common::install(&bin, &good, 0o755);
    m.ok(&["reload", unit]);
    let new = m.main_pid(unit);
    assert_ne!(
        new, first,
        "MainPID must name the successor when reload returns"
    );
    wait_until("the successor to answer", Duration::from_secs(30), || {
        stats.by_pid.lock().unwrap().contains_key(&new)
    });
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
}

#[test]
fn a_canary_that_crashes_under_systemd_leaves_the_unit_on_the_old_main_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    let unit = "handover-test.service";
    let (bin, good) = common::deploy(m.path(), "deployed");
    let text = example_unit_with("handover-canary.service", &bin, &out, 0, "");
    m.start_unit(unit, &text);
    let first = m.main_pid(unit);
    let addr = wait_ready_addr(&out, first);
    let load = load::Load::start_retrying(addr, 2, 2);
    assert!(load.wait_for_ok(21, Duration::from_secs(30)));
    let stats = load.stats.clone();

    // The new build passes its readiness check, then crashes 1 s into its
    // 3 s window.
    let crashing = format!(
        "#!/bin/sh\nexec {} \"$@\" --crash-after 1\n",
        common::server_bin().display()
    );
    common::install(&bin, crashing.as_bytes(), 0o755);
    let r = m.systemctl(&["reload", unit]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success(),
        "the reload of a crashing canary succeeded"
    );
    assert_eq!(m.prop(unit, "ActiveState"), "active");
    assert_eq!(m.main_pid(unit), first, "MainPID moved to the canary");
    assert_eq!(m.prop(unit, "NRestarts"), "0");
    // The reason, as the old generation logged it (stderr goes to the same
    // file; the reload client's goes to the journal).
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("failed its probation") && l.contains("SIGABRT")),
        "{text}\n{err}"
    );

    // The fixed build: `systemctl reload` returns once the window has passed,
    // with MainPID on the successor.
    common::install(&bin, &good, 0o755);
    m.ok(&["reload", unit]);
    let new = m.main_pid(unit);
    assert_ne!(new, first, "reload returned before the commit");
    let text = std::fs::read_to_string(&out).unwrap();
    let ok = text
        .lines()
        .find(|l| l.starts_with("upgrade-ok") && field(l, "successor") == Some(&new.to_string()))
        .unwrap_or_else(|| panic!("{text}"));
    let probation_ms: f64 = field(ok, "probation_ms").unwrap().parse().unwrap();
    assert!(probation_ms >= 3000.0, "{ok}");
    wait_until("the successor to answer", Duration::from_secs(30), || {
        stats.by_pid.lock().unwrap().contains_key(&new)
    });
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    m.ok(&["stop", unit]);
    assert_eq!(m.prop(unit, "Result"), "success");
}

/// docs/systemd.md's unit for the axum service, as written (the binary's path and
/// the port substituted): `systemctl reload` through the control socket
/// under load, MainPID follows, the control socket lives in the
/// RuntimeDirectory=, and a clean stop (the drain within TimeoutStopSec=).
#[cfg(feature = "http")]
#[test]
fn readme_unit_for_the_axum_service_reloads_under_load_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/systemd.md")).unwrap();
    let start = readme
        .find("```ini\n# myservice.service")
        .expect("the unit in docs/systemd.md");
    let body = &readme[start + "```ini\n".len()..];
    let unit_text = &body[..body.find("```").unwrap()];
    let m = manager_or_skip!();
    let axum = common::server_bin().with_file_name("axum");
    let port = free_port();
    let text = unit_text
        .replace("/usr/local/bin/myservice", axum.to_str().unwrap())
        .replace("0.0.0.0:8080", &format!("127.0.0.1:{port}"))
        .replace("multi-user.target", "default.target");
    let unit = "myservice.service";
    m.start_unit(unit, &text);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let first = m.main_pid(unit);
    assert_ne!(first, 0, "no main pid");
    assert!(
        m.path().join("runtime/myservice/control").exists(),
        "the control socket is in the RuntimeDirectory="
    );
    let load = load::Load::start_warm(addr, 2, 2, 21);
    let stats = load.stats.clone();
    let mut old = first;
    for _ in 0..3 {
        let r = m.systemctl(&["reload", unit]);
        let new = m.main_pid(unit);
        let said = m.systemctl(&["status", unit]);
        assert!(
            r.status.success() && new != 0 && new != old,
            "MainPID names the successor when reload returns: {r:?} {}",
            String::from_utf8_lossy(&said.stdout)
        );
        wait_until("the successor to answer", Duration::from_secs(30), || {
            stats.by_pid.lock().unwrap().contains_key(&new)
        });
        wait_until(
            "the old generation to exit",
            Duration::from_secs(30),
            || !procs::exists(old),
        );
        assert_eq!(m.prop(unit, "ActiveState"), "active");
        old = new;
    }
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    assert_eq!(m.prop(unit, "NRestarts"), "0");
    m.ok(&["stop", unit]);
    assert_eq!(m.prop(unit, "Result"), "success");
}

/// Blue/green units (examples/systemd/handover-bluegreen@.service): each
/// deploy starts the other unit, which takes the service over through the
/// shared control socket; under load nothing fails, the old unit goes
/// inactive with its main process exited 0, and the new one is active.
#[test]
fn blue_green_units_take_over_from_each_other_under_load_or_skip() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let m = manager_or_skip!();
    let out = m.path().join("out");
    let port = free_port();
    m.unit(
        "handover-bluegreen@.service",
        &example_unit("handover-bluegreen@.service", &out, port, ""),
    );
    m.ok(&["daemon-reload"]);
    m.ok(&["start", "handover-bluegreen@blue.service"]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let blue = m.main_pid("handover-bluegreen@blue.service");
    wait_ready_addr(&out, blue);
    let load = load::Load::start_warm(addr, 2, 2, 21);
    let stats = load.stats.clone();
    let mut serving = "blue";
    for _ in 0..3 {
        let next = if serving == "blue" { "green" } else { "blue" };
        let (old_unit, new_unit) = (
            format!("handover-bluegreen@{serving}.service"),
            format!("handover-bluegreen@{next}.service"),
        );
        let old = m.main_pid(&old_unit);
        // `start` returns once the new unit is active (READY=1).
        m.ok(&["start", &new_unit]);
        let new = m.main_pid(&new_unit);
        assert_ne!(new, 0);
        assert_eq!(m.prop(&new_unit, "ActiveState"), "active");
        wait_until("the new unit to answer", Duration::from_secs(30), || {
            stats.by_pid.lock().unwrap().contains_key(&new)
        });
        wait_until("the old unit to stop", Duration::from_secs(30), || {
            m.prop(&old_unit, "ActiveState") == "inactive"
        });
        assert!(!procs::exists(old), "the old main process is still there");
        assert_eq!(m.prop(&old_unit, "Result"), "success");
        assert_eq!(m.prop(&old_unit, "ExecMainStatus"), "0");
        serving = next;
    }
    let stats = load.stop();
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    m.ok(&["stop", &format!("handover-bluegreen@{serving}.service")]);
}
