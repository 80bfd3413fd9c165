//! An HTTP server that upgrades itself in place.
//!
//! ```text
//! cargo run --example http_server -- --listen 127.0.0.1:8080 --pid-file /tmp/http.pid
//! kill -HUP $(cat /tmp/http.pid)      # upgrade: a new process takes over, nothing is lost
//! kill -TERM $(cat /tmp/http.pid)     # drain and exit
//! ```
//!
//! Flags:
//! - `--listen ADDR` (repeatable; default 127.0.0.1:8080): TCP listeners named
//!   `http`, `http.1`, `http.2`, …
//! - `--unix PATH`: also serve HTTP on a Unix socket named `unix` (`@name`: abstract)
//! - `--udp ADDR`: a UDP socket named `udp` that answers each datagram with
//!   `pid=<pid> generation=<g> <payload>`
//! - `--pid-file PATH`, `--ready-timeout SECS`, `--drain-timeout SECS`
//! - `--report-fds PATH`: first thing at start, append this process's open fds
//!   to PATH (a test aid: proves what a successor inherits)
//! - `--fd-store`: under systemd, keep the listeners in the fd store too, so
//!   that `systemctl restart` refuses no connection (`FileDescriptorStoreMax=`)
//! - `--control PATH`: a control socket (mode 0600) for `reload` and `status`
//! - `--preflight`: before each upgrade, run the new binary with these
//!   arguments plus `--check`, and upgrade only if that exits 0
//! - `--state-version N` (default 1): the state format this build reads. The
//!   server hands `served_total` to its successor as state version N (8
//!   bytes); a successor reading another version rejects it, and the upgrade
//!   fails. Version 2 is read as an opaque blob and only counted (a test and
//!   benchmark aid).
//! - `--probation SECS`: canary upgrades; this process keeps accepting
//!   alongside its successor for SECS after the successor is ready, and
//!   takes the service back if the successor dies or reports itself
//!   unhealthy meanwhile
//! - `--crash-after SECS`: abort SECS after becoming ready (a test aid: a
//!   successor that passes its readiness check and then crashes)
//! - `--unhealthy-after SECS`: SECS after becoming ready, report itself
//!   unhealthy to a predecessor still watching it, and if that one takes the
//!   service back, drain and exit (a test aid)
//! - `--supervise`: run as the supervisor of the server, which runs as its
//!   child (see [`handover::supervisor`]); automatic when this process is
//!   PID 1, as in a container
//! - `--spawn-helpers`: keep spawning `ls -l /proc/self/fd` from a thread and
//!   report any helper that inherited a socket (a test aid)
//!
//! `http_server reload --control PATH [--binary PATH]` asks a running server
//! to upgrade (to another binary, e.g. to roll back) and exits 0 only if the
//! upgrade succeeded, else 1 with the reason on stderr.
//!
//! GET /stats answers JSON: this process, `served_total`, and the
//! library's upgrade metrics ([`handover::Stats`]); GET /metrics the same
//! metrics in Prometheus' text format.
//!
//! SIGHUP or SIGUSR2 upgrades; SIGTERM or SIGINT drains and exits. Every
//! response carries `X-Pid` and `X-Generation`; while draining, responses
//! carry `Connection: close` (lame duck), so keep-alive clients move to the
//! successor after their next request and none is cut mid-request.
//!
//! One line per event goes to stdout for scripts and tests: `ready …`,
//! `upgrade-ok …`, `upgrade-failed …`, `exit …`.

use std::convert::Infallible;
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use handover::{Drain, Handover};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Default)]
struct Config {
    listen: Vec<SocketAddr>,
    unix: Option<PathBuf>,
    udp: Option<SocketAddr>,
    pid_file: Option<PathBuf>,
    ready_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    report_fds: Option<PathBuf>,
    spawn_helpers: bool,
    fd_store: bool,
    control: Option<PathBuf>,
    preflight: bool,
    check: bool,
    state_version: u32,
    probation: Option<Duration>,
    crash_after: Option<Duration>,
    unhealthy_after: Option<Duration>,
    supervise: bool,
}

fn parse(args: &[OsString]) -> Result<Config, String> {
    let mut c = Config::default();
    let mut it = args.iter();
    let secs = |v: &str, flag: &str| {
        v.parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| format!("{flag}: {v:?} is not a number of seconds"))
    };
    while let Some(flag) = it.next() {
        let flag = flag.to_str().ok_or("arguments must be UTF-8")?;
        if flag == "--spawn-helpers" {
            c.spawn_helpers = true;
            continue;
        }
        if flag == "--fd-store" {
            c.fd_store = true;
            continue;
        }
        if flag == "--preflight" {
            c.preflight = true;
            continue;
        }
        if flag == "--check" {
            c.check = true;
            continue;
        }
        if flag == "--supervise" {
            c.supervise = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let v = value.to_str().ok_or("arguments must be UTF-8")?;
        match flag {
            "--listen" => c
                .listen
                .push(v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?),
            "--unix" => c.unix = Some(v.into()),
            "--udp" => c.udp = Some(v.parse().map_err(|e| format!("--udp {v:?}: {e}"))?),
            "--pid-file" => c.pid_file = Some(v.into()),
            "--ready-timeout" => c.ready_timeout = Some(secs(v, flag)?),
            "--drain-timeout" => c.drain_timeout = Some(secs(v, flag)?),
            "--report-fds" => c.report_fds = Some(v.into()),
            "--control" => c.control = Some(v.into()),
            "--probation" => c.probation = Some(secs(v, flag)?),
            "--crash-after" => c.crash_after = Some(secs(v, flag)?),
            "--unhealthy-after" => c.unhealthy_after = Some(secs(v, flag)?),
            "--state-version" => {
                c.state_version = v.parse().map_err(|_| format!("--state-version {v:?}"))?
            }
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    if c.state_version == 0 {
        c.state_version = 1;
    }
    if c.listen.is_empty() {
        c.listen
            .push("127.0.0.1:8080".parse().expect("valid address"));
    }
    Ok(c)
}

/// One line to stdout, flushed at once: the machine-readable event log.
fn event(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn report_fds(path: &PathBuf) -> std::io::Result<()> {
    // Read the fd list before anything else opens one; the directory
    // handle itself shows up in the listing and is left out.
    let dir = std::fs::read_dir("/proc/self/fd")?;
    let mut fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let live: Vec<String> = fds
        .into_iter()
        .filter(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok())
        .map(|fd| fd.to_string())
        .collect();
    let listen_fds = std::env::var("LISTEN_FDS").unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(
        f,
        "pid={} listen_fds={listen_fds} fds={}",
        std::process::id(),
        live.join(",")
    )
}

/// Spawns `ls -l /proc/self/fd` in a loop and reports every helper that
/// holds a socket: none should, whatever upgrades happen meanwhile.
static HELPERS: AtomicU64 = AtomicU64::new(0);

fn spawn_helpers() {
    std::thread::spawn(|| {
        loop {
            let out = std::process::Command::new("/bin/sh")
                .args(["-c", "exec ls -l /proc/self/fd"])
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output();
            let spawned = HELPERS.fetch_add(1, Ordering::Relaxed) + 1;
            if let Ok(out) = out {
                let text = String::from_utf8_lossy(&out.stdout);
                for line in text.lines().filter(|l| l.contains("socket:")) {
                    event(format_args!(
                        "helper-leak pid={} helper={spawned} {line}",
                        std::process::id()
                    ));
                }
            }
        }
    });
}

struct App {
    pid: u32,
    generation: u64,
    served: AtomicU64,
    /// Bytes of an opaque (version 2) state received at start.
    state_bytes: u64,
    drain: Drain,
    handover: Handover,
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let served = app.served.fetch_add(1, Ordering::Relaxed) + 1;
    let body = match path {
        "/slow" => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000u64);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            format!(
                "generation {} pid {} slept {ms} ms\n",
                app.generation, app.pid
            )
        }
        "/stats" => stats_json(&app, served),
        "/metrics" => metrics(&app.handover.stats()),
        _ => format!("generation {} pid {}\n", app.generation, app.pid),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    let h = resp.headers_mut();
    h.insert("x-pid", HeaderValue::from(app.pid));
    h.insert("x-generation", HeaderValue::from(app.generation));
    let ct = match path {
        "/stats" => "application/json",
        "/metrics" => "text/plain; version=0.0.4",
        _ => "text/plain",
    };
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    if app.drain.is_draining() {
        // Lame duck: answer, then close. Closing an idle keep-alive connection
        // instead would fail a request the client may already have sent.
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// `/stats`: this process and the library's upgrade metrics, as JSON.
fn stats_json(app: &App, served: u64) -> String {
    let s = app.handover.stats();
    let ms = |d: Option<Duration>| match d {
        Some(d) => format!("{:.3}", d.as_secs_f64() * 1e3),
        None => "null".to_owned(),
    };
    let phases = match &s.last_phases {
        Some(p) => {
            let fields: Vec<String> = p
                .iter()
                .map(|(name, d)| format!("\"{name}_ms\":{}", ms(d)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        None => "null".to_owned(),
    };
    let last_error = match &s.last_error {
        Some(e) => {
            // A JSON string: quotes, backslashes and control characters escaped.
            let mut out = String::from('"');
            for c in e.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        None => "null".to_owned(),
    };
    format!(
        "{{\"pid\":{},\"generation\":{},\"served_total\":{served},\"state_bytes\":{},\
         \"committed\":{},\"upgrades_succeeded\":{},\"upgrades_failed\":{},\"draining\":{},\
         \"last_error\":{last_error},\"last_phases\":{phases}}}\n",
        app.pid,
        app.generation,
        app.state_bytes,
        s.committed,
        s.upgrades_succeeded,
        s.upgrades_failed,
        s.draining
    )
}

/// `/metrics`: [`handover::Stats`] in Prometheus' text format (the example
/// of the `Stats` documentation).
fn metrics(stats: &handover::Stats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE handover_generation gauge");
    let _ = writeln!(out, "handover_generation {}", stats.generation);
    let _ = writeln!(out, "# TYPE handover_upgrades_total counter");
    let _ = writeln!(
        out,
        "handover_upgrades_total{{result=\"ok\"}} {}",
        stats.upgrades_succeeded
    );
    let _ = writeln!(
        out,
        "handover_upgrades_total{{result=\"failed\"}} {}",
        stats.upgrades_failed
    );
    let _ = writeln!(out, "# TYPE handover_draining_connections gauge");
    let _ = writeln!(out, "handover_draining_connections {}", stats.draining);
    let _ = writeln!(out, "# TYPE handover_last_upgrade_phase_seconds gauge");
    if let Some(phases) = &stats.last_phases {
        for (phase, took) in phases.iter() {
            if let Some(took) = took {
                let _ = writeln!(
                    out,
                    "handover_last_upgrade_phase_seconds{{phase=\"{phase}\"}} {}",
                    took.as_secs_f64()
                );
            }
        }
    }
    out
}

fn serve_conn<S>(app: &Arc<App>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let guard = app.drain.guard();
    let app = app.clone();
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| handle(app.clone(), req));
        // A connection accepted before the drain began is served as usual:
        // no graceful_shutdown(), which would drop a request not yet read.
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc)
            .await;
        drop(guard);
    });
}

/// Reads what was handed over. Runs before the tokio runtime exists: like
/// `sd_listen_fds`, it must see fds 3.. before anything else opens an fd.
fn build(config: &Config) -> Result<Handover, handover::Error> {
    let mut builder = Handover::builder();
    if let Some(p) = &config.pid_file {
        builder = builder.pid_file(p);
    }
    if let Some(t) = config.ready_timeout {
        builder = builder.ready_timeout(t);
    }
    if let Some(t) = config.drain_timeout {
        builder = builder.drain_timeout(t);
    }
    let mut defaults = handover::UpgradeOptions::new();
    if let Some(t) = config.probation {
        defaults = defaults.probation(t);
    }
    if config.preflight {
        // Like `nginx -t`: the new binary must accept this process's
        // arguments before it is started for real.
        let mut check: Vec<OsString> = std::env::args_os().skip(1).collect();
        check.push("--check".into());
        defaults = defaults.preflight(check);
    }
    builder
        .fd_store(config.fd_store)
        .upgrade_options(defaults)
        .build()
}

/// The state from the old generation: `served_total` (version 1, 8 bytes),
/// or an opaque blob that is only counted (version 2). Another version than
/// this build reads is rejected, which fails the old generation's upgrade.
fn receive_state(
    handover: &Handover,
    expect: u32,
) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    use std::io::Read;
    let Some(mut state) = handover.take_state()? else {
        return Ok((0, 0));
    };
    let pid = std::process::id();
    if state.version() != expect {
        let reason = format!(
            "state version {}, but this build reads version {expect}",
            state.version()
        );
        handover.reject_state(&reason)?;
        return Err(reason.into());
    }
    let t = Instant::now();
    if expect == 2 {
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            match state.read(&mut buf)? {
                0 => break,
                n => bytes += n as u64,
            }
        }
        let secs = t.elapsed().as_secs_f64();
        event(format_args!(
            "state pid={pid} version=2 bytes={bytes} ms={:.3}",
            secs * 1e3
        ));
        return Ok((0, bytes));
    }
    let mut v = [0u8; 8];
    state.read_exact(&mut v)?;
    let served = u64::from_le_bytes(v);
    event(format_args!(
        "state pid={pid} version={expect} served_total={served}"
    ));
    Ok((served, 0))
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Accepts until the drain starts, then drops the listener: that stops
/// accepting, while the socket lives on in the successor. Never shutdown()
/// a shared socket: it would break it for the successor too.
async fn accept_loop(app: Arc<App>, listener: Listener) {
    loop {
        let accepted = async {
            match &listener {
                Listener::Tcp(l) => l.accept().await.map(|(s, _)| serve_conn(&app, s)),
                Listener::Unix(l) => l.accept().await.map(|(s, _)| serve_conn(&app, s)),
            }
        };
        tokio::select! {
            result = accepted => if let Err(e) = result {
                tracing::warn!(error = %e, "accept failed");
            },
            _ = app.drain.draining() => break,
        }
    }
}

async fn run(config: Config, handover: Handover) -> Result<(), Box<dyn std::error::Error>> {
    let pid = std::process::id();
    let generation = handover.generation();

    let mut tcp = Vec::new();
    for (i, addr) in config.listen.iter().enumerate() {
        let name = if i == 0 {
            "http".to_owned()
        } else {
            format!("http.{i}")
        };
        tcp.push(tokio::net::TcpListener::from_std(
            handover.tcp_listener(&name, addr)?,
        )?);
    }
    let unix = match &config.unix {
        Some(p) => Some(tokio::net::UnixListener::from_std(
            handover.unix_listener("unix", p)?,
        )?),
        None => None,
    };
    let udp = match config.udp {
        Some(a) => Some(tokio::net::UdpSocket::from_std(
            handover.udp_socket("udp", a)?,
        )?),
        None => None,
    };
    let udp_s = match &udp {
        Some(u) => u.local_addr()?.to_string(),
        None => String::new(),
    };
    if handover.from_predecessor() {
        // Spawned before ready() on purpose: it waits for ready() itself,
        // and leaves the state stream alone meanwhile.
        let h = handover.clone();
        tokio::spawn(async move {
            if h.predecessor_exited().await.is_ok() {
                event(format_args!("predecessor-exited pid={pid}"));
            }
        });
    }
    let (served, state_bytes) = receive_state(&handover, config.state_version)?;
    let app = Arc::new(App {
        pid,
        generation,
        served: AtomicU64::new(served),
        state_bytes,
        drain: handover.drain(),
        handover: handover.clone(),
    });

    // Every upgrade, whatever triggers it, hands `served_total` on.
    let weak = Arc::downgrade(&app);
    handover.set_state_source(config.state_version, move || {
        let served = weak
            .upgrade()
            .map_or(0, |a| a.served.load(Ordering::Relaxed));
        std::io::Cursor::new(served.to_le_bytes())
    });

    let mut tasks = tokio::task::JoinSet::new();
    let mut addrs = Vec::new();
    for listener in tcp {
        addrs.push(listener.local_addr()?.to_string());
        tasks.spawn(accept_loop(app.clone(), Listener::Tcp(listener)));
    }
    if let Some(listener) = unix {
        tasks.spawn(accept_loop(app.clone(), Listener::Unix(listener)));
    }
    if let Some(sock) = udp {
        let app = app.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    got = sock.recv_from(&mut buf) => if let Ok((n, from)) = got {
                        let mut reply = format!("pid={} generation={} ", app.pid, app.generation).into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = sock.send_to(&reply, from).await;
                    },
                    _ = app.drain.draining() => break,
                }
            }
        });
    }

    let control = match &config.control {
        Some(p) => Some(tokio::net::UnixListener::from_std(
            handover::control::bind(&handover, p)?,
        )?),
        None => None,
    };

    // The application owns its signals: SIGHUP/SIGUSR2 upgrade, SIGTERM/SIGINT
    // stop. Install the handlers before ready(): from then on an operator may
    // signal this process, and SIGHUP's default action would kill it.
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    handover.ready()?;
    if config.spawn_helpers {
        spawn_helpers();
    }
    let unix_s = config
        .unix
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    event(format_args!(
        "ready pid={pid} generation={generation} addr={} unix={unix_s} udp={udp_s}",
        addrs.join(",")
    ));
    if let Some(interval) = handover.notifier().watchdog_interval() {
        // Ping while this generation is (or is about to become) the main
        // process; after handing over, the successor pings.
        let h = handover.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 3);
            while h.state() != handover::State::HandedOver {
                tick.tick().await;
                let _ = h.notifier().watchdog();
            }
        });
    }
    if let Some(after) = config.crash_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            event(format_args!("crash pid={pid}"));
            std::process::abort();
        });
    }
    let (rolled_back_tx, mut rolled_back) = tokio::sync::mpsc::channel::<()>(1);
    if let Some(after) = config.unhealthy_after {
        let h = handover.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let reported = tokio::task::spawn_blocking(move || {
                h.report_unhealthy("health check failed (--unhealthy-after)")
            })
            .await;
            match reported {
                Ok(Ok(true)) => {
                    let _ = rolled_back_tx.send(()).await;
                }
                Ok(Ok(false)) => event(format_args!("unhealthy-ignored pid={pid}")),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot report unhealthy"),
                Err(e) => tracing::warn!(error = %e, "unhealthy report task failed"),
            }
        });
    }

    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel(1);
    let control_task = control.map(|listener| {
        let h = handover.clone();
        tokio::spawn(async move {
            let _ = ctl_tx
                .send(handover::control::serve(h, listener).await)
                .await;
        })
    });
    let reason = loop {
        let trigger = Instant::now();
        let result = tokio::select! {
            _ = hup.recv() => handover.upgrade().await,
            _ = usr2.recv() => handover.upgrade().await,
            Some(done) = ctl_rx.recv() => Ok(done),
            Some(()) = rolled_back.recv() => break "rolled-back",
            _ = term.recv() => break "stop",
            _ = int.recv() => break "stop",
        };
        match result {
            Ok(done) => {
                event(format_args!(
                    "upgrade-ok pid={pid} successor={} generation={} ready_ms={:.3} probation_ms={:.3} trigger_ms={:.3} program={}",
                    done.pid,
                    done.generation,
                    done.ready_after.as_secs_f64() * 1e3,
                    done.phases.probation.unwrap_or_default().as_secs_f64() * 1e3,
                    trigger.elapsed().as_secs_f64() * 1e3,
                    done.program.display()
                ));
                break "upgrade";
            }
            Err(e) => {
                let e = handover::error_chain(&e);
                event(format_args!("upgrade-failed pid={pid} error={e}"));
                tracing::warn!(error = %e, "upgrade failed; still serving");
            }
        }
    };

    if let Some(t) = control_task {
        t.abort(); // stop answering control requests: the successor does
    }
    if reason == "stop" {
        // A real stop: the whole service stops. A generation that drains
        // after a handover never says so.
        let _ = handover.stopping();
    }
    let drain_start = Instant::now();
    app.drain.start();
    while tasks.join_next().await.is_some() {}
    let report = app.drain.wait(handover.drain_timeout()).await;
    event(format_args!(
        "exit pid={pid} generation={generation} reason={reason} served={} remaining={} drain_ms={:.3} helpers={}",
        app.served.load(Ordering::Relaxed),
        report.remaining,
        drain_start.elapsed().as_secs_f64() * 1e3,
        HELPERS.load(Ordering::Relaxed)
    ));
    Ok(())
}

/// `reload --control PATH [--binary PATH] [--timeout SECS]`: asks the running
/// server to upgrade and exits 0 once it has, or 1 with the reason on stderr
/// — so `ExecReload=` makes `systemctl reload` fail when the upgrade fails.
fn reload(args: &[OsString]) -> ExitCode {
    let (mut control, mut binary, mut timeout) = (None, None, Duration::from_secs(120));
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(flag) = it.next() {
        let value = it.next();
        match (flag.as_str(), value) {
            ("--control", Some(v)) => control = Some(PathBuf::from(v)),
            ("--binary", Some(v)) => binary = Some(PathBuf::from(v)),
            ("--timeout", Some(v)) if v.parse::<f64>().is_ok_and(|t| t > 0.0) => {
                timeout = Duration::from_secs_f64(v.parse().expect("checked"))
            }
            _ => {
                eprintln!(
                    "usage: http_server reload --control PATH [--binary PATH] [--timeout SECS]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let Some(control) = control else {
        eprintln!("http_server reload: --control PATH is required");
        return ExitCode::from(2);
    };
    match handover::control::reload(&control, binary.as_deref(), timeout) {
        Ok(reply) => {
            println!("upgraded: {reply}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            let reason = handover::error_chain(&reason);
            eprintln!("http_server reload: upgrade failed: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the server with `args` (without the program name).
pub fn main_with(args: &[OsString]) -> ExitCode {
    if args.first().is_some_and(|a| a == "floor-byte") {
        // The benchmark's floor: a bare exec of this binary that writes one
        // byte to fd 3 as soon as it starts.
        // SAFETY: write of one byte from a valid buffer to fd 3.
        unsafe { libc::write(3, b"!".as_ptr().cast(), 1) };
        return ExitCode::SUCCESS;
    }
    if args.first().is_some_and(|a| a == "reload") {
        return reload(&args[1..]);
    }
    let config = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("http_server: {e}");
            return ExitCode::from(2);
        }
    };
    if config.check {
        // Preflight: the arguments parse; a real service would load and
        // validate its configuration here.
        println!("http_server: configuration ok");
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &config.report_fds {
        if let Err(e) = report_fds(path) {
            eprintln!("http_server: --report-fds: {e}");
            return ExitCode::from(2);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if config.supervise || handover::supervisor::should_supervise() {
        // PID 1 (or asked to): stay alive across upgrades as the supervisor
        // of the server, which runs as a child with the same arguments.
        let args = args.iter().filter(|a| *a != "--supervise");
        return match handover::supervisor::Supervisor::current_exe(args).and_then(|s| s.run()) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("http_server: supervisor: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let handover = match build(&config) {
        Ok(h) => h,
        Err(e) => {
            let e = handover::error_chain(&e);
            eprintln!("http_server: {e}");
            event(format_args!("fatal pid={} error={e}", std::process::id()));
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("http_server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let h = handover.clone();
    match rt.block_on(run(config, handover)) {
        Ok(()) => {
            // Do not wait for connection tasks past the drain deadline.
            rt.shutdown_timeout(Duration::from_millis(100));
            ExitCode::SUCCESS
        }
        Err(e) => {
            // A successor says why it cannot start, so that the old
            // generation and `reload` can tell the operator.
            let e = handover::error_chain(&*e);
            h.report_failure(&e);
            eprintln!("http_server: {e}");
            event(format_args!("fatal pid={} error={e}", std::process::id()));
            ExitCode::FAILURE
        }
    }
}

#[allow(dead_code)] // unused when demo.rs includes this file as a module
fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    main_with(&args)
}
