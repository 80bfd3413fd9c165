//! The README's first command: a server upgrading itself under load.
//!
//! ```text
//! cargo run --example demo [-- --upgrades N --clients N --interval-ms MS --probation SECS]
//! ```
//!
//! Starts the HTTP server of `examples/http_server.rs` (this same binary,
//! re-executed with `serve`), drives load over loopback from threads that
//! open a new connection per request and threads that keep connections
//! alive, upgrades the server N times with SIGHUP, and ends with a table of
//! requests, failures and upgrade timings — the phases as the library
//! measured them (`handover::Stats`, read from the server's `/stats`).

#[path = "support/load.rs"]
mod load;
#[path = "support/procs.rs"]
mod procs;
#[path = "http_server.rs"]
#[allow(dead_code)]
mod server;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Row {
    old: u32,
    new: u32,
    trigger_to_ready: Duration,
    server_ready: f64,
    old_exit: Duration,
    old_status: String,
    fds_before: usize,
    fds_after: usize,
    /// The new generation's `/stats` after the old one exited.
    stats: String,
}

/// The value of `"key":` in the server's flat `/stats` JSON.
fn json<'a>(body: &'a str, key: &str) -> &'a str {
    let Some(rest) = body.split(&format!("\"{key}\":")).nth(1) else {
        return "?";
    };
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().trim_matches('"')
}

/// A phase from `/stats`, in ms, or `-` when it did not happen.
fn phase(stats: &str, name: &str) -> String {
    match json(stats, &format!("{name}_ms")).parse::<f64>() {
        Ok(ms) => format!("{ms:.2}"),
        Err(_) => "-".to_owned(),
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Waits for the next stdout line of the server chain that starts with
/// `prefix` and has `pid=<pid>` (any pid when `None`).
fn wait_line(
    rx: &mpsc::Receiver<String>,
    prefix: &str,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| format!("no `{prefix}` line within {timeout:?}"))?;
        if line.starts_with(prefix)
            && pid.is_none_or(|p| field(&line, "pid") == Some(&p.to_string()))
        {
            return Ok(line);
        }
        if line.starts_with("fatal") || line.starts_with("upgrade-failed") {
            return Err(format!("server: {line}"));
        }
    }
}

fn run(
    upgrades: usize,
    clients: usize,
    interval: Duration,
    probation: Option<u64>,
) -> Result<bool, String> {
    procs::become_subreaper();
    let dir = std::env::temp_dir().join(format!("handover-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let log = dir.join("server.log");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--drain-timeout", "10"]);
    if let Some(secs) = probation {
        cmd.args(["--probation", &secs.to_string()]);
    }
    let mut child = cmd
        .arg("--pid-file")
        .arg(dir.join("server.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let rx = procs::line_channel(child.stdout.take().expect("piped"));
    let ready = wait_line(&rx, "ready", None, Duration::from_secs(30))?;
    let addr: SocketAddr = field(&ready, "addr")
        .and_then(|a| a.parse().ok())
        .ok_or("no addr in ready line")?;
    let mut current: u32 = field(&ready, "pid")
        .and_then(|p| p.parse().ok())
        .ok_or("no pid")?;
    println!(
        "server pid {current} listening on {addr}; server log: {}",
        log.display()
    );
    println!(
        "load: {clients} clients opening a connection per request + {clients} keep-alive clients"
    );

    let load = load::Load::start(addr, clients, clients);
    load.wait_for_ok(200, Duration::from_secs(10));
    let started = Instant::now();
    let mut rows = Vec::new();
    for i in 1..=upgrades {
        std::thread::sleep(interval); // pacing between upgrades, not synchronisation
        let fds_before = procs::fd_count(current);
        let t0 = Instant::now();
        procs::signal(current, libc::SIGHUP).map_err(|e| e.to_string())?;
        let ok = wait_line(&rx, "upgrade-ok", Some(current), Duration::from_secs(60))?;
        let trigger_to_ready = t0.elapsed();
        let new: u32 = field(&ok, "successor")
            .and_then(|p| p.parse().ok())
            .ok_or("no successor")?;
        let server_ready: f64 = field(&ok, "ready_ms")
            .and_then(|p| p.parse().ok())
            .unwrap_or(f64::NAN);
        wait_line(&rx, "exit", Some(current), Duration::from_secs(60))?;
        let status = procs::reap(current, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let old_exit = t0.elapsed();
        let fds_after = procs::fd_count(new);
        let stats = load::get(addr, "/stats")
            .map(|r| r.body)
            .unwrap_or_default();
        println!(
            "[{:6.2} s] upgrade {i:>2}/{upgrades}: pid {current} -> {new}  ready {:7.2} ms  old exited {:7.2} ms  \
             requests {:>7} ok {:>3} failed",
            started.elapsed().as_secs_f64(),
            trigger_to_ready.as_secs_f64() * 1e3,
            old_exit.as_secs_f64() * 1e3,
            load.stats.ok(),
            load.stats.failed()
        );
        rows.push(Row {
            old: current,
            new,
            trigger_to_ready,
            server_ready,
            old_exit,
            old_status: status.to_string(),
            fds_before,
            fds_after,
            stats,
        });
        current = new;
    }
    std::thread::sleep(interval);
    let stats = load.stop();
    let elapsed = started.elapsed();
    procs::signal(current, libc::SIGTERM).map_err(|e| e.to_string())?;
    wait_line(&rx, "exit", Some(current), Duration::from_secs(30))?;
    let last = procs::reap(current, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let zombies = procs::zombies(std::process::id());

    println!();
    println!(
        "{:>3}  {:>8} {:>8}  {:>16} {:>14} {:>15}  {:>9} {:>9}  old exit status",
        "#",
        "old pid",
        "new pid",
        "trigger->ready",
        "(server-side)",
        "trigger->old-exit",
        "fds old",
        "fds new"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:>3}  {:>8} {:>8}  {:>13.2} ms {:>11.2} ms {:>15.2} ms  {:>9} {:>9}  {}",
            i + 1,
            r.old,
            r.new,
            r.trigger_to_ready.as_secs_f64() * 1e3,
            r.server_ready,
            r.old_exit.as_secs_f64() * 1e3,
            r.fds_before,
            r.fds_after,
            r.old_status
        );
    }
    println!();
    println!(
        "phases of each upgrade in ms, as handover::Stats reports them in the new generation:"
    );
    println!(
        "{:>3}  {:>10} {:>8} {:>8} {:>8} {:>10} {:>8} {:>8}  {:>11} {:>8}",
        "#",
        "generation",
        "spawn",
        "state",
        "ready",
        "probation",
        "drain",
        "exit",
        "upgrades ok",
        "failed"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:>3}  {:>10} {:>8} {:>8} {:>8} {:>10} {:>8} {:>8}  {:>11} {:>8}",
            i + 1,
            json(&r.stats, "generation"),
            phase(&r.stats, "spawn"),
            phase(&r.stats, "state"),
            phase(&r.stats, "ready"),
            phase(&r.stats, "probation"),
            phase(&r.stats, "drain"),
            phase(&r.stats, "exit"),
            json(&r.stats, "upgrades_succeeded"),
            json(&r.stats, "upgrades_failed"),
        );
    }
    let mut ready: Vec<f64> = rows
        .iter()
        .map(|r| r.trigger_to_ready.as_secs_f64() * 1e3)
        .collect();
    ready.sort_by(f64::total_cmp);
    let median = ready.get(ready.len() / 2).copied().unwrap_or(f64::NAN);
    println!();
    println!("requests        {:>10}", stats.ok() + stats.failed());
    println!("failed          {:>10}", stats.failed());
    println!(
        "requests/s      {:>10.0}",
        (stats.ok() + stats.failed()) as f64 / elapsed.as_secs_f64()
    );
    println!("upgrades        {:>10}", rows.len());
    println!("median ready    {median:>10.2} ms");
    println!("generations seen{:>10}", stats.pids().len());
    println!("last exit       {:>10}", last.to_string());
    println!("zombies         {:>10}", zombies.len());
    for e in stats.errors.lock().unwrap().iter() {
        println!("  error: {e}");
    }
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(stats.failed() == 0 && zombies.is_empty())
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "serve") {
        return server::main_with(&args[1..]);
    }
    let (mut upgrades, mut clients, mut interval) = (10usize, 4usize, 300u64);
    let mut probation = None;
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--upgrades", Some(v)) => upgrades = v as usize,
            ("--clients", Some(v)) => clients = v.max(1) as usize,
            ("--interval-ms", Some(v)) => interval = v,
            ("--probation", Some(v)) => probation = Some(v),
            _ => {
                eprintln!(
                    "usage: demo [--upgrades N] [--clients N] [--interval-ms MS] [--probation SECS]"
                );
                return ExitCode::from(2);
            }
        }
    }
    match run(
        upgrades,
        clients,
        Duration::from_millis(interval),
        probation,
    ) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
