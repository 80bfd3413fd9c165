//! Benchmarks, each measured side by side in one run, medians of repeated
//! runs. Results go to BENCHMARKS.md with the command that made them.
//!
//! ```text
//! cargo build --release --examples
//! cargo run --release --example bench -- ready [--runs 30]
//! cargo run --release --example bench -- fds [--runs 5]
//! cargo run --release --example bench -- upgrades [--count 1000]
//! cargo run --release --example bench -- load [--secs 10]
//! cargo run --release --example bench -- state [--runs 5]
//! cargo run --release --example bench -- supervised [--runs 30]
//! cargo run --release --example bench -- axum [--secs 10] [--rounds 3] [--upgrades 20]
//! cargo run --release --example bench -- migrate [--conns 10000] [--drain-timeout 5]
//! cargo run --release --features tls --example bench -- tls [--clients 1000] [--runs 5]
//! cargo build --release --examples --features websocket
//! cargo run --release --features websocket --example bench -- websocket [--conns 10000] [--drain-timeout 5]
//! cargo run --release --features websocket --example bench -- ws-throughput [--secs 3] [--rounds 5]
//! ```
//!
//! - `ready`: trigger → successor ready for examples/http_server, against the
//!   floor: a bare fork+exec of the same binary that writes one byte to a
//!   pipe as soon as it starts.
//! - `fds`: handoff time for 4, 400, 4,000 and 10,000 named fds.
//! - `upgrades`: RSS and fd count of the serving process over N upgrades.
//! - `state`: state handoff of 1 MiB, 100 MiB and 1 GiB (whole upgrade).
//! - `supervised`: SIGHUP → `upgrade-ok` of examples/http_server run
//!   directly and under its supervisor (`--supervise`, the PID 1 mode),
//!   interleaved: what the supervisor adds to an upgrade.
//! - `load`: examples/http_server under wrk (Debian's `wrk`) without upgrades
//!   and with an upgrade every 200 ms, one after the other in one run.
//! - `axum`: examples/axum (the crate's serving layer) against the same
//!   service on plain `axum::serve` + `with_graceful_shutdown`
//!   (tests/fixture/axum_plain.rs): req/s and latency under wrk without
//!   upgrades (rounds interleaved, medians), then failed requests under wrk
//!   through N upgrades 500 ms apart, keep-alive and close mode.
//! - `migrate`: N idle keep-alive HTTP/1.1 connections to
//!   tests/fixture/axum_migrate.rs, one upgrade, with `Server::migrate` and
//!   with the lame-duck drain: how long the old generation lives after the
//!   commit, and how many of the N connections fail their next request
//!   (sent once the old generation is gone: a client must reconnect).
//! - `tls` (feature `tls`): N TLS clients holding tickets from the old
//!   generation reconnect at once after an upgrade: CPU time of the new
//!   generation in the first second, with the session-ticket key handoff
//!   and with keys per process (examples/support/tls_bench.rs).
//! - `websocket`: N idle WebSocket clients of tests/fixture/websocket.rs (the
//!   chat of examples/chat.rs), one upgrade: moved to the successor, against
//!   the lame duck of WebSocket (a successor that takes none: each closed
//!   with 1012, and the client reconnects): how long the old generation
//!   lives after the commit, and until every client is served by the
//!   successor again.
//! - `ws-throughput`: messages per second through tokio-tungstenite over a
//!   bare `TcpStream` and over `handover::websocket::Socket` (one client
//!   sending flat out, the server echoing), 16 B to 64 KiB, rounds
//!   interleaved, medians.

#[path = "support/floors.rs"]
mod floors;
#[path = "support/procs.rs"]
mod procs;
#[cfg(feature = "tls")]
#[path = "support/tls_bench.rs"]
mod tls_bench;

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use handover::{Handover, UpgradeOptions};

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe.with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --examples` first",
        p.display()
    );
    p
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One floor run: fork+exec `server floor-byte`, wait for its byte on fd 3.
fn floor_once(server: &PathBuf) -> Duration {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two new fds that we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wfd = w.as_raw_fd();
    let mut cmd = Command::new(server);
    cmd.arg("floor-byte").stdin(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(wfd, 3) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawn floor");
    drop(w);
    let mut b = [0u8; 1];
    // SAFETY: read into a one-byte buffer from a pipe we own.
    let n = unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
    let took = t.elapsed();
    assert_eq!(n, 1, "no byte from the floor child");
    child.wait().expect("wait");
    took
}

/// One crate run: this process is the old generation of http_server.
fn crate_once(server: &PathBuf) -> Duration {
    let h = Handover::builder().build().expect("build");
    let l = h.tcp_listener("http", "127.0.0.1:0").expect("listener");
    let addr = l.local_addr().unwrap().to_string();
    h.ready().expect("ready");
    let opts = UpgradeOptions::new()
        .program(server)
        .args(["--listen", &addr]);
    let t = Instant::now();
    let done = h.upgrade_blocking_with(opts).expect("upgrade");
    let took = t.elapsed();
    drop(l);
    procs::signal(done.pid, libc::SIGTERM).unwrap();
    procs::reap(done.pid, Duration::from_secs(30)).expect("reap");
    took
}

fn ready(runs: usize) {
    let server = sibling("fixture_server");
    procs::become_subreaper();
    let (mut floor, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        floor_once(&server);
        crate_once(&server);
    }
    for _ in 0..runs {
        floor.push(ms(floor_once(&server)));
        ours.push(ms(crate_once(&server)));
    }
    let (f, c) = (median(&mut floor), median(&mut ours));
    println!("trigger -> ready, {runs} runs each, interleaved");
    println!("| | median | min | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| floor: fork+exec, one byte on a pipe | {f:.3} ms | {:.3} ms | {:.3} ms |",
        floor[0],
        floor[runs - 1]
    );
    println!(
        "| handover: examples/http_server ready | {c:.3} ms | {:.3} ms | {:.3} ms |",
        ours[0],
        ours[runs - 1]
    );
    println!("| difference | {:.3} ms | | |", c - f);
    println!("| ratio | {:.2}x | | |", c / f);
}

/// A server started by the bench, read line by line.
struct Chain {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Where SIGHUP goes: the serving process, or its supervisor.
    target: u32,
    serving: u32,
}

impl Chain {
    fn start(server: &PathBuf, supervised: bool) -> Chain {
        let mut cmd = Command::new(server);
        cmd.args(["--listen", "127.0.0.1:0"]);
        if supervised {
            cmd.arg("--supervise");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn http_server");
        let lines = procs::line_channel(child.stdout.take().expect("piped"));
        let mut c = Chain {
            target: child.id(),
            child,
            lines,
            serving: 0,
        };
        let ready = c.wait("ready");
        c.serving = field(&ready, "pid");
        c
    }

    fn wait(&self, prefix: &str) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no {prefix} line"));
            if l.starts_with(prefix) {
                return l;
            }
        }
    }

    /// One upgrade: SIGHUP to the target until `upgrade-ok`; then waits for
    /// the old generation's exit, so the next upgrade starts clean.
    fn upgrade(&mut self, supervised: bool) -> Duration {
        let t = Instant::now();
        let to = if supervised {
            self.target
        } else {
            self.serving
        };
        procs::signal(to, libc::SIGHUP).unwrap();
        let ok = self.wait("upgrade-ok");
        let took = t.elapsed();
        let old = self.serving;
        self.serving = field(&ok, "successor");
        self.wait("predecessor-exited");
        if !supervised {
            procs::reap(old, Duration::from_secs(30)).expect("reap");
        }
        took
    }
}

fn field(line: &str, key: &str) -> u32 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .expect("field")
}

fn supervised(runs: usize) {
    let server = sibling("http_server");
    procs::become_subreaper();
    let mut direct = Chain::start(&server, false);
    let mut under = Chain::start(&server, true);
    let (mut d, mut u) = (Vec::new(), Vec::new());
    for i in 0..runs + 3 {
        let (a, b) = (direct.upgrade(false), under.upgrade(true));
        if i >= 3 {
            d.push(ms(a));
            u.push(ms(b));
        }
    }
    procs::signal(direct.serving, libc::SIGTERM).unwrap();
    procs::reap(direct.serving, Duration::from_secs(30)).expect("reap");
    procs::signal(under.target, libc::SIGTERM).unwrap();
    let status = under.child.wait().expect("wait supervisor");
    assert!(status.success(), "supervisor exited with {status}");
    let _ = direct.child.try_wait();
    let (dm, um) = (median(&mut d), median(&mut u));
    println!("SIGHUP -> upgrade-ok, {runs} upgrades each, interleaved");
    println!("| | median | min | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| examples/http_server, signalled directly | {dm:.3} ms | {:.3} ms | {:.3} ms |",
        d[0],
        d[runs - 1]
    );
    println!(
        "| under its supervisor, signalled through it | {um:.3} ms | {:.3} ms | {:.3} ms |",
        u[0],
        u[runs - 1]
    );
    println!("| difference | {:.3} ms | | |", um - dm);
}

fn raise_nofile() {
    // SAFETY: plain C struct, filled in by getrlimit.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        // Handing n fds needs fd numbers up to about 2n (see the README's
        // limitations); root may raise the hard limit, others use theirs.
        let want: libc::rlim_t = 65536;
        let raised = libc::rlimit {
            rlim_cur: want.max(rl.rlim_cur),
            rlim_max: want.max(rl.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes an initial value and flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn upgrades(count: usize) {
    procs::become_subreaper();
    let server = sibling("http_server");
    let mut child = Command::new(&server)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = |prefix: &str, pid: u32| -> String {
        for line in lines.by_ref() {
            let line = line.expect("stdout");
            let pid_field = format!("pid={pid}");
            if line.starts_with(prefix) && line.split_whitespace().any(|w| w == pid_field) {
                return line;
            }
        }
        panic!("the server chain ended before `{prefix}` of {pid}");
    };
    let mut pid = child.id();
    next("ready", pid);
    println!("| upgrades done | serving pid | VmRSS | fds |");
    println!("| --- | --- | --- | --- |");
    let t = Instant::now();
    for i in 0..=count {
        if i % (count / 10).max(1) == 0 {
            // Let the predecessor's exit settle before counting.
            println!(
                "| {i} | {pid} | {} kB | {} |",
                status_kb(pid, "VmRSS:"),
                procs::fd_count(pid)
            );
        }
        if i == count {
            break;
        }
        procs::signal(pid, libc::SIGHUP).unwrap();
        let new = field(&next("upgrade-ok", pid), "successor");
        next("exit", pid);
        procs::reap(pid, Duration::from_secs(30)).expect("reap old");
        next("predecessor-exited", new);
        pid = new;
    }
    println!("{count} upgrades in {:.1} s", t.elapsed().as_secs_f64());
    procs::signal(pid, libc::SIGTERM).unwrap();
    let _ = procs::reap(pid, Duration::from_secs(30));
    // The first generation was reaped above; this only settles the handle.
    let _ = child.wait();
}

fn state(runs: usize) {
    use std::io::Read;
    let server = sibling("http_server");
    procs::become_subreaper();
    println!("| state size | whole upgrade, median of {runs} | throughput | min | max |");
    println!("| --- | --- | --- | --- | --- |");
    for size in [1u64 << 20, 100 << 20, 1 << 30] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let h = Handover::builder()
                .ready_timeout(Duration::from_secs(120))
                .build()
                .expect("build");
            let l = h.tcp_listener("http", "127.0.0.1:0").expect("listener");
            let addr = l.local_addr().unwrap().to_string();
            h.ready().expect("ready");
            let opts = UpgradeOptions::new()
                .program(&server)
                .args(["--listen", &addr, "--state-version", "2"])
                .state(2, std::io::repeat(0x5a).take(size));
            let t = Instant::now();
            let done = h.upgrade_blocking_with(opts).expect("upgrade");
            times.push(t.elapsed().as_secs_f64());
            drop(l);
            procs::signal(done.pid, libc::SIGTERM).unwrap();
            procs::reap(done.pid, Duration::from_secs(30)).expect("reap");
        }
        times.sort_by(f64::total_cmp);
        let m = times[runs / 2];
        println!(
            "| {} MiB | {:.1} ms | {:.0} MB/s | {:.1} ms | {:.1} ms |",
            size >> 20,
            m * 1e3,
            size as f64 / m / 1e6,
            times[0] * 1e3,
            times[runs - 1] * 1e3
        );
    }
}

/// One wrk run's figures.
#[derive(Debug, Default)]
struct Wrk {
    rps: f64,
    p50: String,
    p99: String,
    max: String,
    requests: u64,
    errors: u64,
}

fn wrk(addr: &str, secs: u64) -> Wrk {
    wrk_with(addr, secs, 32, false)
}

/// wrk with `conns` connections; `close`: a new connection per request.
fn wrk_with(addr: &str, secs: u64, conns: usize, close: bool) -> Wrk {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .arg(format!("http://{addr}/"))
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut w = Wrk::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Latency", _avg, _stdev, max, ..] => w.max = max.to_string(),
            ["50%", v] => w.p50 = v.to_string(),
            ["99%", v] => w.p99 = v.to_string(),
            ["Requests/sec:", v] => w.rps = v.parse().unwrap_or(0.0),
            [n, "requests", "in", ..] => w.requests = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                w.errors += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.errors += n.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    w
}

fn load(secs: u64) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
    procs::become_subreaper();
    let server = sibling("http_server");
    let mut child = Command::new(&server)
        .args(["--listen", "127.0.0.1:0", "--drain-timeout", "10"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("ready line").expect("stdout");
    let addr = first
        .split("addr=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    let current = Arc::new(AtomicU32::new(child.id()));
    let upgrades = Arc::new(AtomicU64::new(0));
    // Track the serving generation and reap the old ones.
    {
        let (current, upgrades) = (current.clone(), upgrades.clone());
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.starts_with("upgrade-ok ") {
                    current.store(field(&line, "successor"), Ordering::SeqCst);
                    upgrades.fetch_add(1, Ordering::SeqCst);
                } else if let Some(rest) = line.strip_prefix("exit pid=") {
                    let pid: u32 = rest.split(' ').next().unwrap().parse().unwrap();
                    let _ = procs::reap(pid, Duration::from_secs(30));
                }
            }
        });
    }
    let quiet = wrk(&addr, secs);
    let stop = Arc::new(AtomicBool::new(false));
    let signaler = {
        let (current, stop) = (current.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200)); // the upgrade rate under test
                let _ = procs::signal(current.load(Ordering::SeqCst), libc::SIGHUP);
            }
        })
    };
    let busy = wrk(&addr, secs);
    stop.store(true, Ordering::SeqCst);
    signaler.join().unwrap();
    println!("wrk -t2 -c32 -d{secs}s --latency, examples/http_server (release)");
    println!("| | requests/s | p50 | p99 | max | requests | failed (socket errors + non-2xx) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, w) in [("no upgrades", &quiet), ("an upgrade every 200 ms", &busy)] {
        println!(
            "| {name} | {:.0} | {} | {} | {} | {} | {} |",
            w.rps, w.p50, w.p99, w.max, w.requests, w.errors
        );
    }
    println!(
        "upgrades during the second run: {}",
        upgrades.load(Ordering::SeqCst)
    );
    let last = current.load(Ordering::SeqCst);
    let _ = procs::signal(last, libc::SIGTERM);
    let _ = procs::reap(last, Duration::from_secs(30));
    let _ = child.wait();
}

/// A service that prints `listening on ADDR pid PID` for each generation
/// (examples/axum, tests/fixture/axum_plain), its old generations reaped.
struct Service {
    child: std::process::Child,
    addr: String,
    current: std::sync::Arc<std::sync::atomic::AtomicU32>,
    generations: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Service {
    fn start(name: &str) -> Service {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        procs::become_subreaper();
        let mut child = Command::new(sibling(name))
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the service");
        let rx = procs::line_channel(child.stdout.take().unwrap());
        let current = Arc::new(AtomicU32::new(0));
        let generations = Arc::new(AtomicU64::new(0));
        let (tx, first) = std::sync::mpsc::channel();
        {
            let (current, generations) = (current.clone(), generations.clone());
            std::thread::spawn(move || {
                for line in rx {
                    let Some(rest) = line.strip_prefix("listening on ") else {
                        continue;
                    };
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    let pid: u32 = f[2].parse().unwrap();
                    let old = current.swap(pid, Ordering::SeqCst);
                    generations.fetch_add(1, Ordering::SeqCst);
                    if old == 0 {
                        let _ = tx.send(f[0].to_owned());
                    } else {
                        // Reap the old generation once it is done draining.
                        std::thread::spawn(move || procs::reap(old, Duration::from_secs(60)));
                    }
                }
            });
        }
        let addr = first
            .recv_timeout(Duration::from_secs(30))
            .expect("listening line");
        Service {
            child,
            addr,
            current,
            generations,
        }
    }

    /// Upgrades `count` times, `every` apart, while `f` runs; returns what
    /// `f` returned and the upgrades made.
    fn upgrading<T>(&self, count: usize, every: Duration, f: impl FnOnce() -> T) -> (T, u64) {
        use std::sync::atomic::Ordering;
        let before = self.generations.load(Ordering::SeqCst);
        let current = self.current.clone();
        let signaler = std::thread::spawn(move || {
            for _ in 0..count {
                std::thread::sleep(every); // the upgrade rate under test
                let _ = procs::signal(current.load(Ordering::SeqCst), libc::SIGHUP);
            }
        });
        let out = f();
        signaler.join().unwrap();
        (out, self.generations.load(Ordering::SeqCst) - before)
    }

    fn stop(mut self) {
        let last = self.current.load(std::sync::atomic::Ordering::SeqCst);
        let _ = procs::signal(last, libc::SIGTERM);
        let _ = procs::reap(last, Duration::from_secs(30));
        let _ = self.child.wait();
    }
}

/// A wrk latency ("570.00us", "4.14ms", "1.02s") in µs.
fn latency_us(v: &str) -> f64 {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * scale
}

/// The two servers of `bench axum`.
const AXUM: [(&str, &str); 2] = [
    ("examples/axum (handover::serve)", "axum"),
    ("plain axum::serve", "fixture_axum_plain"),
];

/// examples/axum against plain `axum::serve` (tests/fixture/axum_plain.rs):
/// throughput without upgrades (`rounds` of both, interleaved), then
/// failed requests through `upgrades` upgrades.
fn axum(secs: u64, rounds: usize, upgrades: usize) {
    if rounds > 0 {
        axum_throughput(secs, rounds);
    }
    if upgrades > 0 {
        axum_upgrades(secs, upgrades);
    }
}

fn axum_throughput(secs: u64, rounds: usize) {
    println!(
        "wrk -t2 -c32 -d{secs}s --latency, no upgrades, {rounds} rounds interleaved (release)"
    );
    let mut runs: Vec<Vec<Wrk>> = vec![Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, (_, bin)) in AXUM.iter().enumerate() {
            let svc = Service::start(bin);
            runs[i].push(wrk(&svc.addr, secs));
            svc.stop();
        }
    }
    println!(
        "| server | requests/s (median) | p50 (median) | p99 (median) | each round's requests/s |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (i, (label, _)) in AXUM.iter().enumerate() {
        let rps: Vec<f64> = runs[i].iter().map(|w| w.rps).collect();
        let m = median(&mut rps.clone());
        let p50 = median(
            &mut runs[i]
                .iter()
                .map(|w| latency_us(&w.p50))
                .collect::<Vec<_>>(),
        );
        let p99 = median(
            &mut runs[i]
                .iter()
                .map(|w| latency_us(&w.p99))
                .collect::<Vec<_>>(),
        );
        let each: Vec<String> = rps.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "| {label} | {m:.0} | {p50:.0} µs | {p99:.0} µs | {} |",
            each.join(", ")
        );
    }
    // Each round ran the two back to back: their ratio cancels much of the
    // load that other processes put on the machine meanwhile.
    let mut ratio: Vec<f64> = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(a, b)| a.rps / b.rps)
        .collect();
    let shown: Vec<String> = ratio.iter().map(|r| format!("{r:.3}")).collect();
    let mut p99: Vec<f64> = (runs[0].iter().zip(&runs[1]))
        .map(|(a, b)| latency_us(&a.p99) / latency_us(&b.p99))
        .collect();
    println!(
        "requests/s of the layer / plain, each round: {}; median {:.3}; p99 layer / plain, median {:.3}",
        shown.join(", "),
        median(&mut ratio),
        median(&mut p99)
    );
}

/// Failed requests under wrk through `upgrades` upgrades 500 ms apart.
fn axum_upgrades(secs: u64, upgrades: usize) {
    let every = Duration::from_millis(500);
    let up_secs = (upgrades as u64 / 2 + 2).max(secs);
    println!();
    println!(
        "wrk -t2 -d{up_secs}s through {upgrades} upgrades (SIGHUP every {} ms): failed = socket errors + non-2xx",
        every.as_millis()
    );
    println!("| server | mode | requests | failed | upgrades |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, bin) in AXUM {
        for (mode, conns, close) in [
            ("keep-alive, 64 connections", 64, false),
            ("close, 16 connections", 16, true),
        ] {
            let svc = Service::start(bin);
            let (w, made) = svc.upgrading(upgrades, every, || {
                wrk_with(&svc.addr, up_secs, conns, close)
            });
            println!(
                "| {label} | {mode} | {} | {} | {made} |",
                w.requests, w.errors
            );
            svc.stop();
        }
    }
}

/// One keep-alive GET on `s`: the X-Pid, or why it failed (a
/// `Connection: close` answer counts: the client must reconnect).
fn keep_alive_get(s: &mut BufReader<std::net::TcpStream>) -> Result<u32, String> {
    use std::io::{Read, Write};
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let (mut len, mut pid, mut close, mut first) = (0, 0, false, true);
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
        let line = line.trim_end().to_ascii_lowercase();
        if std::mem::take(&mut first) {
            continue; // the status line
        }
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().map_err(|_| "length")?;
        } else if let Some(v) = line.strip_prefix("x-pid:") {
            pid = v.trim().parse().map_err(|_| "x-pid")?;
        } else if line == "connection: close" {
            close = true;
        }
    }
    s.read_exact(&mut vec![0; len]).map_err(|e| e.to_string())?;
    if close {
        return Err("Connection: close".into());
    }
    Ok(pid)
}

/// N idle keep-alive connections, one upgrade: migration against the lame
/// duck.
fn migrate(conns: usize, drain_timeout: u64) {
    raise_nofile();
    procs::become_subreaper();
    let server = sibling("fixture_axum_migrate");
    println!(
        "{conns} idle keep-alive connections (one GET each), one upgrade, drain timeout {drain_timeout} s (release)"
    );
    println!();
    println!(
        "| drain | old generation gone after the commit | next request: answered by the successor | needed a reconnect |"
    );
    println!("| --- | --- | --- | --- |");
    for migrate in [true, false] {
        let dt = drain_timeout.to_string();
        let mut args = vec!["--listen", "127.0.0.1:0", "--drain-timeout", &dt];
        if migrate {
            args.push("--migrate");
        }
        let mut child = Command::new(&server)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let lines = procs::line_channel(child.stdout.take().unwrap());
        let next = |prefix: &str| loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("a line from the server");
            if line.starts_with(prefix) {
                return line;
            }
        };
        let listening = next("listening on ");
        let words: Vec<&str> = listening.split_whitespace().collect();
        let (addr, old): (std::net::SocketAddr, u32) =
            (words[2].parse().unwrap(), words[4].parse().unwrap());
        let mut clients: Vec<_> = (0..conns)
            .map(|_| {
                let s = std::net::TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut s = BufReader::new(s);
                assert_eq!(keep_alive_get(&mut s), Ok(old));
                s
            })
            .collect();
        procs::signal(old, libc::SIGHUP).unwrap();
        let new: u32 = next("listening on ")
            .split_whitespace()
            .nth(4)
            .unwrap()
            .parse()
            .unwrap();
        let exit = next(&format!("exit pid={old} "));
        procs::reap(old, Duration::from_secs(drain_timeout + 30)).expect("reap");
        let drain_ms = field(&exit, "drain_ms");
        let (mut moved, mut reconnect) = (0, 0);
        for c in &mut clients {
            match keep_alive_get(c) {
                Ok(pid) if pid == new => moved += 1,
                _ => reconnect += 1,
            }
        }
        println!(
            "| {} | {drain_ms} ms | {moved} | {reconnect} |",
            if migrate {
                "migration (`--migrate`)"
            } else {
                "lame duck"
            }
        );
        drop(clients);
        procs::signal(new, libc::SIGTERM).unwrap();
        procs::reap(new, Duration::from_secs(drain_timeout + 30)).expect("reap");
        let _ = child.wait();
    }
}

/// The WebSocket figures (feature `websocket`).
#[cfg(feature = "websocket")]
mod ws {
    use super::*;

    /// One client of the `websocket` figure: idle until the server closes it
    /// (then it reconnects, and counts it) or the bench asks its pid.
    async fn idle_ws_client(
        url: String,
        mut ask: tokio::sync::watch::Receiver<u32>,
        answered: std::sync::Arc<std::sync::atomic::AtomicU32>,
        reconnects: std::sync::Arc<std::sync::atomic::AtomicU32>,
    ) {
        use futures_util::{SinkExt, StreamExt};
        use std::sync::atomic::Ordering;
        use tokio_tungstenite::tungstenite::Message;
        let connect = || async {
            loop {
                match tokio_tungstenite::connect_async(url.as_str()).await {
                    Ok((ws, _)) => return ws,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        let mut ws = connect().await;
        answered.fetch_add(1, Ordering::SeqCst); // connected
        loop {
            tokio::select! {
                changed = ask.changed() => {
                    if changed.is_err() { return }
                    if ws.send(Message::text("pid?")).await.is_err() { continue }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) if t.starts_with("pid=") => {
                        answered.store(t[4..].parse().unwrap_or(0), Ordering::SeqCst);
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        // Closed (1012): the client reconnects, to the successor.
                        while ws.next().await.is_some() {}
                        reconnects.fetch_add(1, Ordering::SeqCst);
                        ws = connect().await;
                        if ws.send(Message::text("pid?")).await.is_err() { continue }
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// N idle WebSocket connections, one upgrade: moved, against the lame duck
    /// (closed with 1012, reconnected).
    pub fn websocket(conns: usize, drain_timeout: u64) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        raise_nofile();
        procs::become_subreaper();
        let server = sibling("fixture_websocket");
        println!(
            "{conns} idle WebSocket connections (tests/fixture/websocket.rs, a room each), one upgrade, drain timeout {drain_timeout} s (release)"
        );
        println!();
        println!(
            "| WebSocket connections | old generation gone after the commit | every client served by the successor after the commit | reconnects |"
        );
        println!("| --- | --- | --- | --- |");
        for moved in [true, false] {
            let dt = drain_timeout.to_string();
            let mut args = vec!["--listen", "127.0.0.1:0", "--drain-timeout", &dt];
            if !moved {
                args.extend(["--no-migrate-from", "2"]);
            }
            let mut child = Command::new(&server)
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(if std::env::var_os("RUST_LOG").is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .spawn()
                .expect("spawn");
            let lines = procs::line_channel(child.stdout.take().unwrap());
            let next = |prefix: &str| loop {
                let line = lines
                    .recv_timeout(Duration::from_secs(120))
                    .expect("a line from the server");
                if line.starts_with(prefix) {
                    return line;
                }
            };
            let listening = next("listening on ");
            let words: Vec<&str> = listening.split_whitespace().collect();
            let (addr, old): (std::net::SocketAddr, u32) =
                (words[2].parse().unwrap(), words[4].parse().unwrap());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (ask, ask_rx) = tokio::sync::watch::channel(0u32);
            let reconnects = Arc::new(AtomicU32::new(0));
            let answered: Vec<Arc<AtomicU32>> =
                (0..conns).map(|_| Arc::new(AtomicU32::new(0))).collect();
            for (i, a) in answered.iter().enumerate() {
                let url = format!("ws://{addr}/ws?room=c{i}");
                rt.spawn(idle_ws_client(
                    url,
                    ask_rx.clone(),
                    a.clone(),
                    reconnects.clone(),
                ));
            }
            let all = |pid: u32| answered.iter().all(|a| a.load(Ordering::SeqCst) == pid);
            let deadline = Instant::now() + Duration::from_secs(300);
            while !all(1) {
                assert!(Instant::now() < deadline, "clients did not connect");
                std::thread::sleep(Duration::from_millis(10));
            }
            ask.send(1).unwrap();
            while !all(old) {
                assert!(Instant::now() < deadline, "clients not answered");
                std::thread::sleep(Duration::from_millis(10));
            }
            procs::signal(old, libc::SIGHUP).unwrap();
            let new: u32 = next("listening on ")
                .split_whitespace()
                .nth(4)
                .unwrap()
                .parse()
                .unwrap();
            let committed = Instant::now();
            next(&format!("exit pid={old} "));
            procs::reap(old, Duration::from_secs(drain_timeout + 30)).expect("reap");
            let gone = committed.elapsed();
            // Asked once the old generation is gone: over the moved
            // connections, or the new ones (a reconnected client asks too).
            ask.send(2).unwrap();
            let deadline = Instant::now() + Duration::from_secs(300);
            while !all(new) {
                assert!(
                    Instant::now() < deadline,
                    "clients not served by the successor"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let served = committed.elapsed();
            println!(
                "| {} | {:.0} ms | {:.0} ms | {} |",
                if moved {
                    "moved (`websocket::hand_over`)"
                } else {
                    "closed with 1012, reconnected"
                },
                ms(gone),
                ms(served),
                reconnects.load(Ordering::SeqCst)
            );
            drop(ask);
            rt.shutdown_timeout(Duration::from_secs(5));
            procs::signal(new, libc::SIGTERM).unwrap();
            procs::reap(new, Duration::from_secs(drain_timeout + 30)).expect("reap");
            let _ = child.wait();
        }
    }

    /// An echo server for `ws-throughput`: each connection's messages back.
    async fn ws_echo<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use futures_util::{FutureExt, SinkExt, StreamExt};
        while let Some(Ok(m)) = ws.next().await {
            if ws.feed(m).await.is_err() {
                return;
            }
            // What is read at once is echoed in one write.
            while let Some(Some(Ok(m))) = ws.next().now_or_never() {
                if ws.feed(m).await.is_err() {
                    return;
                }
            }
            if ws.flush().await.is_err() {
                return;
            }
        }
    }

    /// Messages per second of `size` bytes, one client sending flat out and
    /// reading the echoes, for `secs`: plain tokio-tungstenite on the server,
    /// or over `handover::websocket::Socket`.
    fn ws_round(size: usize, secs: f64, wrapped: bool) -> f64 {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let h = Handover::builder().build().expect("build");
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                s.set_nodelay(true).unwrap();
                if wrapped {
                    let sock = handover::websocket::Socket::new(s, &h);
                    if let Ok(ws) = tokio_tungstenite::accept_async(sock).await {
                        ws_echo(ws).await;
                    }
                } else if let Ok(ws) = tokio_tungstenite::accept_async(s).await {
                    ws_echo(ws).await;
                }
            });
            let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
                .await
                .unwrap();
            let (mut tx, mut rx) = ws.split();
            let payload = vec![b'x'; size];
            let until = Instant::now() + Duration::from_secs_f64(secs);
            let sender = tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < until {
                    for _ in 0..100 {
                        if tx.feed(Message::binary(payload.clone())).await.is_err() {
                            return sent;
                        }
                    }
                    if tx.flush().await.is_err() {
                        return sent;
                    }
                    sent += 100;
                    tokio::task::yield_now().await;
                }
                sent
            });
            let t = Instant::now();
            let mut got = 0u64;
            let counting = async {
                while let Some(Ok(_)) = rx.next().await {
                    got += 1;
                    if Instant::now() >= until {
                        break;
                    }
                }
            };
            counting.await;
            let took = t.elapsed().as_secs_f64();
            sender.abort();
            server.abort();
            got as f64 / took
        })
    }

    /// tokio-tungstenite's message rate over a bare `TcpStream` and over
    /// `websocket::Socket`, rounds interleaved, medians.
    pub fn ws_throughput(secs: u64, rounds: usize) {
        println!(
            "echoed messages/s, one client sending flat out, {secs} s rounds, {rounds} rounds interleaved (release)"
        );
        println!();
        println!("| message | plain tokio-tungstenite | over `websocket::Socket` | ratio |");
        println!("| --- | --- | --- | --- |");
        for size in [16, 1024, 16 * 1024, 64 * 1024] {
            let (mut plain, mut ours, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let p = ws_round(size, secs as f64, false);
                let o = ws_round(size, secs as f64, true);
                plain.push(p);
                ours.push(o);
                ratio.push(o / p);
            }
            println!(
                "| {size} B | {:.0} | {:.0} | {:.3} |",
                median(&mut plain),
                median(&mut ours),
                median(&mut ratio)
            );
        }
    }
}

fn main() -> ExitCode {
    // The successor of `bench fds` starts bare, as `fds_floor`'s child does.
    if std::env::args().nth(1).as_deref() == Some("fds-child") {
        let n = std::env::args().nth(2).and_then(|n| n.parse().ok());
        return floors::fds_child(n.expect("count"), std::env::args().nth(3).as_deref());
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let num = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let floors_dir = args
        .iter()
        .position(|a| a == "--floors")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || PathBuf::from("target/bench-floor/release"),
            PathBuf::from,
        );
    let shared_dir = args
        .iter()
        .position(|a| a == "--shared")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from("../shared/bench"), PathBuf::from);
    match args.first().map(String::as_str) {
        Some("ready") => ready(num("--runs", 30)),
        Some("fds") => {
            floors::fds(num("--runs", 5), &floors_dir);
        }
        Some("tail") => floors::tail(
            num("--conns", 64),
            num("--secs", 12) as u64,
            num("--upgrades", 20),
            args.iter().any(|a| a == "--no-migrate"),
        ),
        Some("takeover") => {
            floors::print_takeover(&floors::takeover(num("--rounds", 10)));
        }
        Some("latency") => {
            floors::print_latency(&floors::latency(
                num("--rounds", 1),
                &floors_dir,
                &shared_dir,
            ));
        }
        Some("all") => floors::all(num("--rounds", 1), &floors_dir, &shared_dir),
        Some("upgrades") => upgrades(num("--count", 1000)),
        Some("load") => load(num("--secs", 10) as u64),
        Some("state") => state(num("--runs", 5)),
        Some("supervised") => supervised(num("--runs", 30)),
        Some("axum") => axum(
            num("--secs", 10) as u64,
            num("--rounds", 3),
            num("--upgrades", 20),
        ),
        Some("migrate") => migrate(num("--conns", 10_000), num("--drain-timeout", 5) as u64),
        #[cfg(feature = "tls")]
        Some("tls") => tls_bench::tls(
            &sibling("axum_tls"),
            num("--clients", 1000),
            num("--runs", 5),
        ),
        #[cfg(not(feature = "tls"))]
        Some("tls") => {
            eprintln!(
                "bench tls needs the feature: cargo run --release --features tls --example bench -- tls"
            );
            return ExitCode::from(2);
        }
        #[cfg(feature = "websocket")]
        Some("websocket") => {
            ws::websocket(num("--conns", 10_000), num("--drain-timeout", 5) as u64)
        }
        #[cfg(feature = "websocket")]
        Some("ws-throughput") => ws::ws_throughput(num("--secs", 3) as u64, num("--rounds", 5)),
        #[cfg(not(feature = "websocket"))]
        Some("websocket" | "ws-throughput") => {
            eprintln!("bench: the WebSocket figures need `--features websocket`");
            return ExitCode::from(2);
        }
        _ => {
            eprintln!(
                "usage: bench all [--rounds N] [--floors DIR] [--shared DIR] | fds [--runs N] [--floors DIR] | takeover [--rounds N] | tail [--conns N] [--secs N] [--upgrades N] [--no-migrate] | latency [--rounds N] [--floors DIR] [--shared DIR] | migrate [--conns N] [--drain-timeout S] | websocket [--conns N] [--drain-timeout S] | ws-throughput [--secs N] [--rounds N] | tls [--clients N] [--runs N] | ready [--runs N] | upgrades [--count N] | load [--secs N] | state [--runs N] | supervised [--runs N] | axum [--secs N] [--rounds N] [--upgrades N]"
            );
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
