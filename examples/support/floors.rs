//! The figures of issue 22 held against their floors, each interleaved
//! with its floor in one run: `bench fds` (named fds against `fds_floor`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use handover::{Handover, UpgradeOptions};

use super::{eventfd, median, procs, raise_nofile};

/// `CLOCK_MONOTONIC` in ns (what `Instant` reads on Linux, as a number
/// that another process can compare).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where the floors are: `--floors DIR`, else `target/bench-floor/release`
/// (built with `CARGO_TARGET_DIR=target/bench-floor cargo build --release
/// --manifest-path ../shared/bench/floor/Cargo.toml`).
pub fn floor_bin(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the floors with `CARGO_TARGET_DIR=target/bench-floor cargo build --release --manifest-path ../shared/bench/floor/Cargo.toml` (or give --floors DIR)",
        p.display()
    );
    p
}

/// The sizes of the `fds` figure.
pub const FD_COUNTS: [usize; 4] = [4, 400, 4000, 10000];

/// The successor of the `fds` figure: claims every fd by name, writes when
/// it entered `main`, had built its `Handover` and had claimed every fd
/// (`CLOCK_MONOTONIC` ns) to `report`, reports ready, then waits to be
/// killed. Runs before the bench's own set-up (no tracing subscriber).
pub fn fds_child(n: usize, report: Option<&str>) -> ExitCode {
    let entered = mono_ns();
    let h = Handover::builder().build().expect("build");
    let built = mono_ns();
    let mut name = String::with_capacity(8);
    for i in 0..n {
        name.clear();
        let _ = std::fmt::Write::write_fmt(&mut name, format_args!("f{i}"));
        // The registry keeps its copy for the next generation; ours goes.
        drop(
            h.fd(&name, || Err(std::io::Error::other("not inherited")))
                .expect("claim"),
        );
    }
    let claimed = mono_ns();
    if let Some(path) = report {
        let line = format!("{entered} {built} {claimed}\n");
        std::fs::write(path, line).expect("report");
    }
    h.ready().expect("ready");
    loop {
        std::thread::park();
    }
}

/// One handoff of `n` named fds as the crate makes it, timed in parts.
#[derive(Clone, Copy, Debug, Default)]
pub struct FdsRun {
    /// Trigger → successor ready (the upgrade's `ready_after`), ms.
    pub total: f64,
    /// Trigger → the successor's `main` (the old generation's preparation,
    /// the start, the fd moves, the exec, the loader), ms.
    pub to_main: f64,
    /// `Builder::build` (decode, adopt, registry), ms.
    pub build: f64,
    /// The `n` claims, ms.
    pub claims: f64,
    /// The claims done → the old generation has the ready message, ms.
    pub ready: f64,
}

pub fn fds_once(n: usize, report: &Path) -> FdsRun {
    let me = std::env::current_exe().unwrap();
    let h = Handover::builder().build().expect("build");
    for i in 0..n {
        drop(h.fd(&format!("f{i}"), eventfd).expect("register"));
    }
    h.ready().unwrap();
    let _ = std::fs::remove_file(report);
    let opts = UpgradeOptions::new().program(&me).args([
        "fds-child".to_owned(),
        n.to_string(),
        report.display().to_string(),
    ]);
    let begun = mono_ns();
    let done = h.upgrade_blocking_with(opts).expect("upgrade");
    let ms = |ns: u64| ns as f64 / 1e6;
    // `ready_after` runs from the upgrade's start (microseconds after
    // `begun`) to the ready message; the commit after it is not part of
    // the figure.
    let ready_seen = begun + done.ready_after.as_nanos() as u64;
    let text = std::fs::read_to_string(report).expect("the successor's report");
    let t: Vec<u64> = text
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    procs::signal(done.pid, libc::SIGKILL).unwrap();
    procs::reap(done.pid, Duration::from_secs(30)).expect("reap");
    FdsRun {
        total: done.ready_after.as_secs_f64() * 1e3,
        to_main: ms(t[0].saturating_sub(begun)),
        build: ms(t[1] - t[0]),
        claims: ms(t[2] - t[1]),
        ready: ms(ready_seen.saturating_sub(t[2])),
    }
}

/// One run of `fds_floor 1`: its time for each of [`FD_COUNTS`], ms.
pub fn fds_floor_once(bin: &Path) -> Vec<f64> {
    let out = Command::new(bin)
        .arg("1")
        .stderr(Stdio::inherit())
        .output()
        .expect("run fds_floor");
    assert!(out.status.success(), "fds_floor failed: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = Vec::new();
    for n in FD_COUNTS {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {n} |")))
            .unwrap_or_else(|| panic!("no row for {n} in fds_floor's output:\n{text}"));
        let v: f64 = row
            .split('|')
            .nth(2)
            .unwrap()
            .trim()
            .trim_end_matches(" ms")
            .parse()
            .unwrap();
        times.push(v);
    }
    times
}

/// Median, min and max of `v`.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    let m = median(&mut s);
    (m, s[0], s[s.len() - 1])
}

/// `bench fds`: the crate's named-fd handoff and `fds_floor`, runs
/// interleaved; returns `(crate, floor)` medians at 10,000 fds and the
/// slopes (µs per fd, from 4 to 10,000).
pub fn fds(runs: usize, floors: &Path) -> [(f64, f64); 2] {
    raise_nofile();
    procs::become_subreaper();
    let floor = floor_bin(floors, "fds_floor");
    let report = std::env::temp_dir().join(format!("handover-bench-fds-{}", std::process::id()));
    let mut ours: Vec<Vec<FdsRun>> = vec![Vec::new(); FD_COUNTS.len()];
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); FD_COUNTS.len()];
    // One warm-up round of each, not counted.
    fds_floor_once(&floor);
    for &n in &FD_COUNTS {
        fds_once(n, &report);
    }
    for _ in 0..runs {
        for (i, t) in fds_floor_once(&floor).into_iter().enumerate() {
            theirs[i].push(t);
        }
        for (i, &n) in FD_COUNTS.iter().enumerate() {
            ours[i].push(fds_once(n, &report));
        }
        let _ = std::io::stdout().flush();
    }
    let _ = std::fs::remove_file(&report);
    println!(
        "named fds, spawn → successor ready, {runs} runs each, interleaved with fds_floor (release)"
    );
    println!();
    println!("| named fds | handover median (min–max) | fds_floor median (min–max) | ratio |");
    println!("| --- | --- | --- | --- |");
    let mut med = Vec::new();
    for (i, n) in FD_COUNTS.iter().enumerate() {
        let c = spread(&ours[i].iter().map(|r| r.total).collect::<Vec<_>>());
        let f = spread(&theirs[i]);
        med.push((c.0, f.0));
        println!(
            "| {n} | {:.2} ms ({:.2}–{:.2}) | {:.2} ms ({:.2}–{:.2}) | {:.2}x |",
            c.0,
            c.1,
            c.2,
            f.0,
            f.1,
            f.2,
            c.0 / f.0
        );
    }
    let last = FD_COUNTS.len() - 1;
    let span = (FD_COUNTS[last] - FD_COUNTS[0]) as f64;
    let slope = |a: f64, b: f64| (b - a) * 1e3 / span;
    let (sc, sf) = (slope(med[0].0, med[last].0), slope(med[0].1, med[last].1));
    println!(
        "per fd (slope 4 → 10,000): handover {sc:.3} µs, fds_floor {sf:.3} µs, ratio {:.2}x",
        sc / sf
    );
    println!();
    println!("where the crate's time goes (medians, ms):");
    println!();
    println!("| named fds | trigger → successor's main | build() | claims | claims → ready seen |");
    println!("| --- | --- | --- | --- | --- |");
    for (i, n) in FD_COUNTS.iter().enumerate() {
        let col = |f: fn(&FdsRun) -> f64| median(&mut ours[i].iter().map(f).collect::<Vec<_>>());
        println!(
            "| {n} | {:.3} | {:.3} | {:.3} | {:.3} |",
            col(|r| r.to_main),
            col(|r| r.build),
            col(|r| r.claims),
            col(|r| r.ready)
        );
    }
    [med[last], (sc, sf)]
}

/// `GET /` on a fresh connection (`Connection: close`): the `x-pid` of the
/// process that answered.
pub fn probe_pid(addr: std::net::SocketAddr) -> std::io::Result<u32> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    text.lines()
        .find_map(|l| l.strip_prefix("x-pid:")?.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no x-pid in the response"))
}

/// Probes `addr` until a process other than `old` answers (at most 30 s):
/// when it did, and its pid.
pub fn until_answered_by_other(addr: std::net::SocketAddr, old: u32) -> (std::time::Instant, u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(pid) = probe_pid(addr) {
            if pid != old {
                return (std::time::Instant::now(), pid);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no process but {old} answered within 30 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The figures of `bench takeover`, ms, one entry per round.
#[derive(Debug, Default)]
pub struct TakeoverRuns {
    /// SIGHUP → a fresh connection answered by the successor.
    pub upgrade: Vec<f64>,
    /// The bench starts the new process (`--take-over`) → a fresh
    /// connection answered by it.
    pub takeover: Vec<f64>,
    /// The start of a process of the same binary that does nothing (`axum
    /// status` without arguments: a usage error): spawn → exit.
    pub own_start: Vec<f64>,
}

/// `bench takeover`: examples/axum upgraded by fork+exec (SIGHUP) and taken
/// over by a process the bench starts (`--take-over`), `rounds` of each,
/// interleaved, each new process serving alone before the next round.
pub fn takeover(rounds: usize) -> TakeoverRuns {
    use std::time::Instant;
    procs::become_subreaper();
    let axum = super::sibling("axum");
    let dir = std::env::temp_dir().join(format!("handover-bench-takeover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ctl = dir.join("ctl");
    let ctl_s = ctl.to_str().unwrap().to_owned();
    let mut first = Command::new(&axum)
        .args(["--listen", "127.0.0.1:0", "--control", &ctl_s])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn examples/axum");
    let lines = procs::line_channel(first.stdout.take().unwrap());
    let listening = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("listening line");
    let words: Vec<&str> = listening.split_whitespace().collect();
    let addr: std::net::SocketAddr = words[2].parse().unwrap();
    let mut current: u32 = words[4].parse().unwrap();
    let retire = |old: u32| {
        procs::reap(old, Duration::from_secs(60)).expect("the old generation exits");
    };
    let mut runs = TakeoverRuns::default();
    let mut takers = Vec::new();
    for round in 0..rounds + 1 {
        // 1. An upgrade by fork+exec.
        let t = Instant::now();
        procs::signal(current, libc::SIGHUP).unwrap();
        let (answered, new) = until_answered_by_other(addr, current);
        let upgrade = answered - t;
        retire(current);
        current = new;
        // 2. A takeover by a process started from outside.
        let t = Instant::now();
        let taker = Command::new(&axum)
            .args([
                "--listen",
                &addr.to_string(),
                "--control",
                &ctl_s,
                "--take-over",
                &ctl_s,
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the taker");
        let (answered, new) = until_answered_by_other(addr, current);
        let takeover = answered - t;
        assert_eq!(
            new,
            taker.id(),
            "answered by another process than the taker"
        );
        takers.push(taker);
        retire(current);
        current = new;
        // 3. A process of the same binary that only starts.
        let t = Instant::now();
        let status = Command::new(&axum)
            .arg("status")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run axum status");
        let own = t.elapsed();
        assert!(
            !status.success(),
            "`axum status` without a socket should fail"
        );
        if round > 0 {
            // The first round warms the page cache and the allocator.
            runs.upgrade.push(super::ms(upgrade));
            runs.takeover.push(super::ms(takeover));
            runs.own_start.push(super::ms(own));
        }
    }
    procs::signal(current, libc::SIGTERM).unwrap();
    let _ = procs::reap(current, Duration::from_secs(30));
    let _ = first.wait();
    drop(takers);
    let _ = std::fs::remove_dir_all(&dir);
    runs
}

/// Prints the `takeover` figure; returns `(takeover − upgrade, own start)`
/// medians, ms.
pub fn print_takeover(runs: &TakeoverRuns) -> (f64, f64) {
    let n = runs.upgrade.len();
    println!(
        "examples/axum (release), {n} upgrades and {n} takeovers, interleaved; a fresh connection probed every 0.2 ms"
    );
    println!();
    println!("| | median | min | max |");
    println!("| --- | --- | --- | --- |");
    let rows = [
        (
            "upgrade by fork+exec: SIGHUP → the successor answers",
            &runs.upgrade,
        ),
        (
            "takeover: the bench starts the new process → it answers",
            &runs.takeover,
        ),
        (
            "the new process's own start: spawn → exit of `axum status` (does nothing)",
            &runs.own_start,
        ),
    ];
    for (label, v) in rows {
        let (m, lo, hi) = spread(v);
        println!("| {label} | {m:.2} ms | {lo:.2} ms | {hi:.2} ms |");
    }
    let mut diff: Vec<f64> = runs
        .takeover
        .iter()
        .zip(&runs.upgrade)
        .map(|(t, u)| t - u)
        .collect();
    let d = median(&mut diff);
    let own = median(&mut runs.own_start.clone());
    println!("| takeover − upgrade (median of each round's difference) | {d:.2} ms | | |");
    println!();
    println!(
        "goal: takeover − upgrade ≤ the new process's own start: {d:.2} ms against {own:.2} ms"
    );
    (d, own)
}

/// A free loopback port (bound and released: the server binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One run of the outside harness (`zdd_bench.py`, wrk): what the figures
/// take from its JSON.
#[derive(Clone, Debug, Default)]
pub struct Zdd {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub requests: u64,
    /// Failed requests: socket errors + non-2xx.
    pub failed: u64,
    pub upgrades_done: u64,
}

/// A number after `"key":` in `json` (the harness's flat fields).
fn json_num(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The harness, loading `server` (a command line with `{port}` in it) with
/// wrk: `mode` `keepalive` or `close`, `upgrades` SIGHUPs 0.5 s apart,
/// c=64, 14 s.
pub fn zdd(shared: &Path, server: &str, mode: &str, upgrades: usize) -> Zdd {
    let port = free_port();
    let dir =
        std::env::temp_dir().join(format!("handover-bench-zdd-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pid_file = dir.join("pid");
    let json = dir.join("out.json");
    let cmd = server
        .replace("{port}", &port.to_string())
        .replace("{pid_file}", pid_file.to_str().unwrap());
    let out = Command::new("python3")
        .arg(shared.join("zdd_bench.py"))
        .args(["--cmd", &cmd, "--port", &port.to_string()])
        .args([
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--pid-header",
            "X-Pid",
        ])
        .args(["--client", "wrk", "--mode", mode, "--upgrade", "signal:HUP"])
        .args(["--upgrades", &upgrades.to_string(), "--interval", "0.5"])
        .args(["--duration", "14", "--concurrency", "64"])
        .arg("--json-out")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("python3 zdd_bench.py");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|_| {
        panic!(
            "zdd_bench.py wrote no result ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    let load = &text[text.find("\"load\":").expect("a load section")..];
    let num = |k: &str| json_num(load, k).unwrap_or(f64::NAN);
    let failed = ["connect", "read", "write", "timeout", "bad_status"]
        .iter()
        .map(|k| num(k).max(0.0) as u64)
        .sum();
    Zdd {
        p50: num("p50"),
        p90: num("p90"),
        p99: num("p99"),
        p999: num("p99.9"),
        requests: num("requests") as u64,
        failed,
        upgrades_done: json_num(&text, "upgrades_done").unwrap_or(0.0) as u64,
    }
}

/// p99 under wrk with and without upgrades: one load mode's runs.
#[derive(Debug, Default)]
pub struct LatencyRuns {
    pub mode: &'static str,
    /// examples/axum, no upgrade.
    pub quiet: Vec<Zdd>,
    /// examples/axum, 20 upgrades, migration on (the default).
    pub migrating: Vec<Zdd>,
    /// examples/axum `--no-migrate`, 20 upgrades.
    pub lame_duck: Vec<Zdd>,
    /// The floor server (`shared/bench/floor`), 20 upgrades: context.
    pub floor: Vec<Zdd>,
}

/// `bench latency`: examples/axum under wrk (c=64, 14 s) through the outside
/// harness, without upgrades and with 20 upgrades 0.5 s apart (migration on
/// and off), and the floor server with 20 upgrades; keep-alive and close
/// mode; `rounds` of each, interleaved.
pub fn latency(rounds: usize, floors: &Path, shared: &Path) -> Vec<LatencyRuns> {
    let axum = super::sibling("axum");
    let floor = floor_bin(floors, "floor");
    let axum_cmd = format!(
        "{} --listen 127.0.0.1:{{port}} --pid-file {{pid_file}}",
        axum.display()
    );
    let floor_cmd = format!(
        "{} --port {{port}} --signal hup --pid-file {{pid_file}}",
        floor.display()
    );
    let mut out: Vec<LatencyRuns> = ["keepalive", "close"]
        .into_iter()
        .map(|mode| LatencyRuns {
            mode,
            ..LatencyRuns::default()
        })
        .collect();
    for _ in 0..rounds {
        for runs in &mut out {
            let mode = runs.mode;
            runs.quiet.push(zdd(shared, &axum_cmd, mode, 0));
            runs.migrating.push(zdd(shared, &axum_cmd, mode, 20));
            let no_migrate = format!("{axum_cmd} --no-migrate");
            runs.lame_duck.push(zdd(shared, &no_migrate, mode, 20));
            runs.floor.push(zdd(shared, &floor_cmd, mode, 20));
        }
    }
    out
}

/// The median of `f` over `v`.
fn med(v: &[Zdd], f: impl Fn(&Zdd) -> f64) -> f64 {
    median(&mut v.iter().map(f).collect::<Vec<_>>())
}

/// Prints the `latency` figure; returns, per mode, the p99 ratios (with
/// migration, without) to the same load without upgrades.
pub fn print_latency(all: &[LatencyRuns]) -> Vec<(&'static str, f64, f64, f64, f64)> {
    let rounds = all.first().map_or(0, |r| r.quiet.len());
    println!(
        "wrk -t2 -c64 -d14s through zdd_bench.py, examples/axum (release), 20 upgrades 0.5 s apart, {rounds} round(s), interleaved; ms"
    );
    println!();
    println!(
        "| load | server | upgrades | p50 | p90 | p99 | p99.9 | requests | failed | p99 / no upgrades |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut ratios = Vec::new();
    for runs in all {
        let base = med(&runs.quiet, |z| z.p99);
        let rows: [(&str, &Vec<Zdd>); 4] = [
            ("examples/axum", &runs.quiet),
            ("examples/axum (migration)", &runs.migrating),
            ("examples/axum `--no-migrate`", &runs.lame_duck),
            ("floor server", &runs.floor),
        ];
        for (label, v) in rows {
            let done = med(v, |z| z.upgrades_done as f64);
            let p99 = med(v, |z| z.p99);
            println!(
                "| {} | {label} | {done:.0} | {:.2} | {:.2} | {p99:.2} | {:.2} | {:.0} | {:.0} | {:.2}x |",
                runs.mode,
                med(v, |z| z.p50),
                med(v, |z| z.p90),
                med(v, |z| z.p999),
                med(v, |z| z.requests as f64),
                med(v, |z| z.failed as f64),
                p99 / base
            );
        }
        let (m, l) = (
            med(&runs.migrating, |z| z.p99),
            med(&runs.lame_duck, |z| z.p99),
        );
        ratios.push((runs.mode, base, m, l, med(&runs.floor, |z| z.p99)));
    }
    ratios
}

/// Runs `cmd` and returns its stdout (stderr passed through); panics with
/// its output if it fails.
fn capture(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The first number followed by ` ms` in `line`.
fn first_ms(line: &str) -> Option<f64> {
    let at = line.find(" ms")?;
    let head = &line[..at];
    let start = head
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    head[start..].parse().ok()
}

/// `bench migrate --conns N` (its first row: with migration, old generation
/// gone after the commit) against `migrate_floor N 1`, `rounds` of each,
/// interleaved: `(crate, floor)` ms per round.
pub fn migrate_against_floor(conns: usize, rounds: usize, floors: &Path) -> Vec<(f64, f64)> {
    let floor = floor_bin(floors, "migrate_floor");
    let me = std::env::current_exe().unwrap();
    let mut out = Vec::new();
    for _ in 0..rounds {
        let f = capture(Command::new(&floor).args([conns.to_string(), "1".into()]));
        let f = f
            .lines()
            .find_map(|l| first_ms(l.split("median").nth(1)?))
            .unwrap_or_else(|| panic!("no median in migrate_floor's output:\n{f}"));
        let c = capture(Command::new(&me).args(["migrate", "--conns", &conns.to_string()]));
        let c = c
            .lines()
            .find(|l| l.starts_with('|') && l.to_ascii_lowercase().contains("migrat"))
            .and_then(first_ms)
            .unwrap_or_else(|| panic!("no migration row in `bench migrate`'s output:\n{c}"));
        out.push((c, f));
    }
    out
}

/// The e2e ratios: `shared/bench/e2e.sh ROUNDS N` (examples/http_server
/// beside the floor server, interleaved), run from the project root:
/// `[handover ready, handover old gone, floor ready, floor old gone]`, ms.
pub fn e2e(shared: &Path, rounds: usize, upgrades: usize) -> [f64; 4] {
    let text = capture(
        Command::new("bash")
            .arg(shared.join("e2e.sh"))
            .args([rounds.to_string(), upgrades.to_string()]),
    );
    print!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("median of rounds:"))
        .unwrap_or_else(|| panic!("no medians in e2e.sh's output:\n{text}"));
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(nums.len() >= 4, "cannot read e2e.sh's medians: {line}");
    [nums[0], nums[1], nums[2], nums[3]]
}

/// What `bench all` needs, checked before anything runs.
fn check_needs(floors: &Path, shared: &Path) {
    let mut missing = Vec::new();
    for tool in ["wrk", "python3", "bash"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    for floor in ["fds_floor", "migrate_floor", "floor"] {
        if !floors.join(floor).is_file() {
            missing.push(format!(
                "{} (build the floors)",
                floors.join(floor).display()
            ));
        }
    }
    for script in ["zdd_bench.py", "e2e.sh"] {
        if !shared.join(script).is_file() {
            missing.push(format!(
                "{} (give --shared DIR)",
                shared.join(script).display()
            ));
        }
    }
    let exe = std::env::current_exe().unwrap();
    for example in ["axum", "http_server", "fixture_axum_migrate"] {
        if !exe.with_file_name(example).is_file() {
            missing.push(format!(
                "examples/{example} (cargo build --release --examples)"
            ));
        }
    }
    if !missing.is_empty() {
        eprintln!("bench all needs:");
        for m in missing {
            eprintln!("  - {m}");
        }
        std::process::exit(2);
    }
}

/// `bench all`: every figure of issue 22 beside its floor, interleaved, and
/// one table at the end. About 6 minutes with the defaults (`--rounds 1`:
/// the p99 runs, 14 s each, take most of it).
pub fn all(rounds: usize, floors: &Path, shared: &Path) {
    use std::time::Instant;
    check_needs(floors, shared);
    let t = Instant::now();
    let section = |name: &str| {
        println!();
        println!("## {name} ({:.0} s in)", t.elapsed().as_secs_f64());
        println!();
        let _ = std::io::stdout().flush();
    };
    section("named fds: `bench fds --runs 7`");
    let [fds10k, slope] = fds(7, floors);
    section("moved connections: `bench migrate --conns 10000` against `migrate_floor 10000`");
    let moved = migrate_against_floor(10_000, 2 * rounds, floors);
    for (i, (c, f)) in moved.iter().enumerate() {
        println!(
            "round {}: handover {c:.1} ms, migrate_floor {f:.1} ms",
            i + 1
        );
    }
    let moved_c = median(&mut moved.iter().map(|m| m.0).collect::<Vec<_>>());
    let moved_f = median(&mut moved.iter().map(|m| m.1).collect::<Vec<_>>());
    section("takeover: `bench takeover --rounds 10`");
    let taken = takeover(10);
    let (diff, own) = print_takeover(&taken);
    let up = median(&mut taken.upgrade.clone());
    let tk = median(&mut taken.takeover.clone());
    section("e2e: `../shared/bench/e2e.sh 3 10`");
    let e = e2e(shared, 3, 10);
    section("tail latency: `bench latency --rounds 1`");
    let lat = latency(rounds, floors, shared);
    let ratios = print_latency(&lat);
    section("all figures");
    println!(
        "{}; the whole run took {:.0} s",
        machine(),
        t.elapsed().as_secs_f64()
    );
    println!();
    println!("| figure | the crate | its floor | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    let row = |figure: &str, c: f64, f: f64, unit: &str, goal: &str| {
        println!(
            "| {figure} | {c:.2} {unit} | {f:.2} {unit} | {:.2}x | {goal} |",
            c / f
        );
    };
    row(
        "10,000 named fds: spawn → ready (`fds_floor`)",
        fds10k.0,
        fds10k.1,
        "ms",
        "≤ 1.25x",
    );
    row(
        "per named fd, slope 4 → 10,000 (`fds_floor`)",
        slope.0,
        slope.1,
        "µs",
        "≤ 1.25x",
    );
    row(
        "10,000 keep-alive connections moved: old generation gone after the commit (`migrate_floor`)",
        moved_c,
        moved_f,
        "ms",
        "≤ 3x",
    );
    for (mode, quiet, mig, lame, floor) in &ratios {
        let m = if *mode == "close" {
            "`Connection: close`"
        } else {
            "keep-alive"
        };
        row(
            &format!(
                "p99, wrk c=64 {m}, 20 upgrades, migration (floor: the same load without upgrades)"
            ),
            *mig,
            *quiet,
            "ms",
            "≤ 1.25x",
        );
        row(
            &format!("p99, wrk c=64 {m}, 20 upgrades, `--no-migrate` (floor: without upgrades)"),
            *lame,
            *quiet,
            "ms",
            "≤ 1.25x",
        );
        row(
            &format!(
                "p99, wrk c=64 {m}, 20 upgrades: examples/axum (migration) against the floor server (context)"
            ),
            *mig,
            *floor,
            "ms",
            "—",
        );
    }
    row(
        "takeover: start of the new process → it answers (floor: upgrade by fork+exec + the process's own start)",
        tk,
        up + own,
        "ms",
        "≤ 1x",
    );
    println!("| (takeover − upgrade: {diff:.2} ms; own start {own:.2} ms) | | | | |");
    row(
        "e2e: trigger → the new process answers (examples/http_server, floor server)",
        e[0],
        e[2],
        "ms",
        "—",
    );
    row("e2e: trigger → the old process gone", e[1], e[3], "ms", "—");
}

/// The date and the machine, for the table's heading.
fn machine() -> String {
    let date = Command::new("date")
        .args(["-u", "+%F %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{date}, {cores} cores ({model}), Linux {}", kernel.trim())
}

/// One request of `bench tail`: when it started (since the load began),
/// how long `connect` took, and how long until the whole response.
#[derive(Clone, Copy)]
struct Req {
    start: Duration,
    connect: Duration,
    total: Duration,
}

/// `bench tail`: where the `Connection: close` tail comes from. `conns`
/// blocking clients each open a connection per request against
/// examples/axum for `secs` seconds, with `upgrades` SIGHUPs 0.5 s apart
/// (none when 0); every request is kept with its start time, so the slow
/// ones can be placed against the upgrades. Prints the percentiles, then
/// for the requests slower than the p99 of the run: how far after the last
/// SIGHUP they started, and whether `connect` or the server took the time.
pub fn tail(conns: usize, secs: u64, upgrades: usize, no_migrate: bool) {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    procs::become_subreaper();
    let axum = super::sibling("axum");
    let dir = std::env::temp_dir().join(format!("handover-bench-tail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pid_file = dir.join("pid");
    let mut cmd = Command::new(&axum);
    cmd.args(["--listen", "127.0.0.1:0", "--pid-file"])
        .arg(&pid_file)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if no_migrate {
        cmd.arg("--no-migrate");
    }
    let mut first = cmd.spawn().expect("spawn examples/axum");
    let lines = procs::line_channel(first.stdout.take().unwrap());
    let listening = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("listening line");
    let addr: std::net::SocketAddr = listening
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let all = Arc::new(Mutex::new(Vec::<Req>::new()));
    let begun = Instant::now();
    let clients: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, all) = (stop.clone(), all.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let mut buf = Vec::with_capacity(1024);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                        continue;
                    };
                    let connect = t.elapsed();
                    buf.clear();
                    let ok = s
                        .write_all(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                        .and_then(|_| s.read_to_end(&mut buf))
                        .is_ok();
                    if ok && buf.starts_with(b"HTTP/1.1 200") {
                        mine.push(Req {
                            start: t - begun,
                            connect,
                            total: t.elapsed(),
                        });
                    }
                }
                all.lock().unwrap().extend(mine);
            })
        })
        .collect();
    // Warm-up of 1 s, then the upgrades, then the rest of the run.
    let mut sighups = Vec::new();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..upgrades {
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("the pid file");
        sighups.push(begun.elapsed());
        procs::signal(pid as u32, libc::SIGHUP).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let rest = Duration::from_secs(secs).saturating_sub(begun.elapsed());
    std::thread::sleep(rest);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    procs::signal(pid, libc::SIGTERM).unwrap();
    let _ = procs::reap(pid, Duration::from_secs(30));
    let _ = first.wait();
    let _ = std::fs::remove_dir_all(&dir);
    // Only what ran after the warm-up.
    let reqs: Vec<Req> = all
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|r| r.start >= Duration::from_secs(1))
        .collect();
    let mut totals: Vec<f64> = reqs.iter().map(|r| super::ms(r.total)).collect();
    totals.sort_by(f64::total_cmp);
    let q = |p: f64| totals[((totals.len() as f64 * p) as usize).min(totals.len() - 1)];
    let p99 = q(0.99);
    println!(
        "{conns} clients, a connection per request, {secs} s, {upgrades} upgrades 0.5 s apart{}: {} requests, p50 {:.2} ms, p90 {:.2} ms, p99 {p99:.2} ms, p99.9 {:.2} ms",
        if no_migrate { ", --no-migrate" } else { "" },
        totals.len(),
        q(0.5),
        q(0.9),
        q(0.999)
    );
    let slow: Vec<&Req> = reqs.iter().filter(|r| super::ms(r.total) > p99).collect();
    if sighups.is_empty() || slow.is_empty() {
        return;
    }
    // Where the slow requests started, against the last SIGHUP before them.
    let buckets = [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0];
    let mut counts = [0usize; 8];
    let mut in_connect = 0;
    for r in &slow {
        let since = sighups
            .iter()
            .rev()
            .find(|&&s| s <= r.start)
            .map_or(f64::INFINITY, |s| super::ms(r.start - *s));
        let b = buckets.iter().position(|&b| since < b).unwrap_or(7);
        counts[b] += 1;
        if r.connect * 2 > r.total {
            in_connect += 1;
        }
    }
    println!(
        "{} requests slower than the p99: started after the last SIGHUP by",
        slow.len()
    );
    let mut lo = 0.0;
    for (i, c) in counts.iter().enumerate() {
        let label = match buckets.get(i) {
            Some(hi) => format!("{lo:.0}–{hi:.0} ms"),
            None => format!("≥ {lo:.0} ms (or before the first)"),
        };
        println!(
            "  {label}: {c} ({:.0} %)",
            100.0 * *c as f64 / slow.len() as f64
        );
        lo = buckets.get(i).copied().unwrap_or(lo);
    }
    println!(
        "  of them, {in_connect} ({:.0} %) spent most of their time in connect (the accept queue), the rest waiting for the response",
        100.0 * in_connect as f64 / slow.len() as f64
    );
}
