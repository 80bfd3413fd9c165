//! An HTTP server that upgrades itself in place: the full-featured example
//! (examples/axum.rs is the short one).
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
//! - `--fd-store`: under systemd, keep the listeners in the fd store too, so
//!   that `systemctl restart` refuses no connection (`FileDescriptorStoreMax=`)
//! - `--control PATH`: a control socket (mode 0600) for `reload` and `status`
//! - `--take-over PATH`: take the service over from the generation serving
//!   the control socket PATH (a new container, the other unit of a
//!   blue/green pair, a build started by hand), with its listeners, its
//!   control socket and its state; with nobody there, start as the first
//!   generation. The control socket allows takeovers (by the same uid).
//! - `--allow-program PATH` (repeatable): a program, or a directory of
//!   programs, that `reload --binary` may run (a rollback); by default only
//!   the deploy path runs
//! - `--preflight`: before each upgrade, run the new binary with these
//!   arguments plus `--check`, and upgrade only if that exits 0
//! - `--probation SECS`: canary upgrades; this process keeps accepting
//!   alongside its successor for SECS after the successor is ready, and
//!   takes the service back if the successor dies or reports itself
//!   unhealthy meanwhile, or answers worse than this process (more 5xx, a
//!   slower p99: the canary judgement, [`handover::canary`]); the reply to
//!   `reload`, the `upgrade-…` lines and /metrics carry the judgement
//! - `--canary-share FRACTION`: during the window the successor takes only
//!   this share of new connections (0.1: one in ten)
//! - `--supervise`: run as the supervisor of the server, which runs as its
//!   child (see [`handover::supervisor`]); automatic when this process is
//!   PID 1, as in a container
//!
//! `http_server reload --control PATH [--binary PATH] [--timeout SECS]` asks a
//! running server to upgrade (to another binary, e.g. to roll back) and exits
//! 0 if the upgrade succeeded, 1 if it failed (the reason on stderr; the old
//! generation serves), 3 if no answer came in time (the outcome is unknown:
//! `http_server status --control PATH --wait SECS` tells). Both are
//! [`handover::control::command`].
//!
//! The server hands its `served_total` counter to its successor (state
//! version 1, 8 bytes). GET /stats answers JSON: this process,
//! `served_total`, and the library's upgrade metrics ([`handover::Stats`]);
//! GET /metrics the same metrics in Prometheus' text format; GET
//! /slow?ms=N answers after N ms.
//!
//! SIGHUP or SIGUSR2 upgrades; SIGTERM or SIGINT drains and exits; the
//! crate's serving layer ([`handover::serve`]) does the lossless drain.
//! Every response carries `X-Pid` and `X-Generation`.
//!
//! One line per event goes to stdout for scripts: `ready …`, `upgrade-ok …`,
//! `upgrade-failed …`, `exit …`.

use std::convert::Infallible;
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use handover::serve::{Server, Triggers};
use handover::{Drain, Handover};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use tokio::signal::unix::SignalKind;

#[derive(Debug, Default)]
struct Config {
    listen: Vec<SocketAddr>,
    unix: Option<PathBuf>,
    udp: Option<SocketAddr>,
    pid_file: Option<PathBuf>,
    ready_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    fd_store: bool,
    control: Option<PathBuf>,
    allow_program: Vec<PathBuf>,
    take_over: Option<PathBuf>,
    preflight: bool,
    check: bool,
    probation: Option<Duration>,
    canary_share: Option<f64>,
    supervise: bool,
}

fn parse(args: &[OsString]) -> Result<Config, String> {
    let mut c = Config::default();
    let mut it = args.iter();
    // A number of seconds; one too large for a Duration is the maximum,
    // which the handover refuses with the same words as any value over its
    // bound ("longer than the maximum").
    let secs = |v: &str, flag: &str| {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
            .ok_or_else(|| format!("{flag}: {v:?} is not a number of seconds"))
    };
    while let Some(flag) = it.next() {
        let flag = flag.to_str().ok_or("arguments must be UTF-8")?;
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
            "--control" => c.control = Some(v.into()),
            "--allow-program" => c.allow_program.push(v.into()),
            "--take-over" => c.take_over = Some(v.into()),
            "--probation" => c.probation = Some(secs(v, flag)?),
            "--canary-share" => {
                c.canary_share = Some(
                    v.parse()
                        .map_err(|_| format!("--canary-share {v:?} is not a number"))?,
                )
            }
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    if c.listen.is_empty() {
        c.listen
            .push("127.0.0.1:8080".parse().expect("valid address"));
    }
    Ok(c)
}

/// One line to stdout, flushed at once: the machine-readable event log.
pub fn event(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct App {
    pid: u32,
    generation: u64,
    served: AtomicU64,
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
    // While draining, the serving layer adds `Connection: close` (lame duck).
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
                .into_iter()
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
        "{{\"pid\":{},\"generation\":{},\"served_total\":{served},\
         \"committed\":{},\"upgrades_succeeded\":{},\"upgrades_failed\":{},\"draining\":{},\
         \"last_error\":{last_error},\"last_phases\":{phases}}}\n",
        app.pid, app.generation, s.committed, s.upgrades_succeeded, s.upgrades_failed, s.draining
    )
}

/// `/metrics`: [`handover::Stats`] in Prometheus' text format (the example
/// of the `Stats` documentation).
pub fn metrics(stats: &handover::Stats) -> String {
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
    if let Some(j) = &stats.last_judgement {
        // The last upgrade's canary judgement: its verdict, and both
        // generations' numbers over the probation window.
        let _ = writeln!(out, "# TYPE handover_last_canary_verdict gauge");
        let _ = writeln!(
            out,
            "handover_last_canary_verdict{{verdict=\"{}\",rolled_back=\"{}\"}} 1",
            j.verdict,
            j.rolled_back()
        );
        for (name, kind) in [
            ("requests", "counter"),
            ("errors", "counter"),
            ("connections", "counter"),
            ("p99_seconds", "gauge"),
        ] {
            let _ = writeln!(out, "# TYPE handover_last_canary_{name} {kind}");
            for (side, s) in [("canary", &j.canary), ("baseline", &j.baseline)] {
                let value = match name {
                    "requests" => s.requests as f64,
                    "errors" => s.errors as f64,
                    "connections" => s.connections as f64,
                    _ => s.p99.map_or(f64::NAN, |d| d.as_secs_f64()),
                };
                let _ = writeln!(
                    out,
                    "handover_last_canary_{name}{{generation=\"{side}\"}} {value}"
                );
            }
        }
    }
    let _ = writeln!(out, "# TYPE handover_last_upgrade_phase_seconds gauge");
    if let Some(phases) = &stats.last_phases {
        for (phase, took) in phases {
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
    if let Some(share) = config.canary_share {
        // The canary's share of new connections during the window; the
        // judgement runs with its defaults either way.
        defaults = defaults.canary(handover::canary::Policy::new().share(share));
    }
    if config.preflight {
        // Like `nginx -t`: the new binary must accept this process's
        // arguments before it is started for real.
        let mut check: Vec<OsString> = std::env::args_os().skip(1).collect();
        check.push("--check".into());
        defaults = defaults.preflight(check);
    }
    if let Some(path) = &config.take_over {
        // Take the service over from whoever serves this control socket.
        builder = builder.take_over(path);
    }
    builder
        .fd_store(config.fd_store)
        .upgrade_options(defaults)
        .build()
}

/// The state from the old generation: `served_total` (version 1, 8 bytes).
/// Another version is rejected, which fails the old generation's upgrade.
fn receive_state(handover: &Handover) -> Result<u64, Box<dyn std::error::Error>> {
    use std::io::Read;
    let Some(mut state) = handover.take_state()? else {
        return Ok(0);
    };
    if state.version() != 1 {
        let reason = format!(
            "state version {}, but this build reads version 1",
            state.version()
        );
        handover.reject_state(&reason)?;
        return Err(reason.into());
    }
    let mut v = [0u8; 8];
    state.read_exact(&mut v)?;
    Ok(u64::from_le_bytes(v))
}

async fn run(config: Config, handover: Handover) -> Result<(), Box<dyn std::error::Error>> {
    let pid = std::process::id();
    let generation = handover.generation();

    let mut server = Server::new(&handover);
    let mut addrs = Vec::new();
    for (i, addr) in config.listen.iter().enumerate() {
        let name = if i == 0 {
            "http".to_owned()
        } else {
            format!("http.{i}")
        };
        let listener = handover.tcp_listener(&name, addr)?;
        addrs.push(listener.local_addr()?.to_string());
        server = server.listener(listener);
    }
    if let Some(p) = &config.unix {
        server = server.listener(handover.unix_listener("unix", p)?);
    }
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
    if handover.generation() > 1 {
        // Spawned before ready() on purpose: it waits for ready() itself,
        // and leaves the state stream alone meanwhile.
        let h = handover.clone();
        tokio::spawn(async move {
            if h.predecessor_exited().await.is_ok() {
                event(format_args!("predecessor-exited pid={pid}"));
            }
        });
    }
    let served = receive_state(&handover)?;
    let app = Arc::new(App {
        pid,
        generation,
        served: AtomicU64::new(served),
        drain: handover.drain(),
        handover: handover.clone(),
    });

    // Every upgrade, whatever triggers it, hands `served_total` on.
    let weak = Arc::downgrade(&app);
    handover.set_state_source(1, move || {
        let served = weak
            .upgrade()
            .map_or(0, |a| a.served.load(Ordering::Relaxed));
        std::io::Cursor::new(served.to_le_bytes())
    });

    let udp_task = udp.map(|sock| {
        let app = app.clone();
        tokio::spawn(async move {
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
        })
    });

    // The application owns its signals: SIGHUP/SIGUSR2 upgrade, SIGTERM/SIGINT
    // stop, in a task of their own so that accepting never waits for an
    // upgrade. Installed before ready(): from then on an operator may signal
    // this process, and SIGHUP's default action would kill it.
    let mut triggers = Triggers::new(&handover)
        .upgrade_on(SignalKind::hangup())
        .upgrade_on(SignalKind::user_defined2())
        .stop_on(SignalKind::terminate())
        .stop_on(SignalKind::interrupt());
    if let Some(p) = &config.control {
        let socket = handover::control::bind(&handover, p)?.allow_takeover(true);
        let socket = config
            .allow_program
            .iter()
            .fold(socket, |s, p| s.allow_program(p));
        triggers = triggers.control(socket);
    }
    let triggered = triggers
        .on_upgrade(move |result| match result {
            Ok(done) => event(format_args!(
                "upgrade-ok pid={pid} successor={} generation={} ready_ms={:.3} probation_ms={:.3} program={}{}",
                done.pid,
                done.generation,
                done.ready_after.as_secs_f64() * 1e3,
                done.phases.probation.unwrap_or_default().as_secs_f64() * 1e3,
                done.program.display(),
                // Last: the judgement's line has spaces.
                done.judgement
                    .as_ref()
                    .map_or(String::new(), |j| format!(" judgement={j}")),
            )),
            Err(e) => event(format_args!("upgrade-failed pid={pid} error={e:#}")),
        })
        .spawn()?;

    handover.ready()?;
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
    let service = {
        let app = app.clone();
        hyper::service::service_fn(move |req| handle(app.clone(), req))
    };
    let report = server.serve_hyper(service).await?;
    let _ = triggered.await;
    let reason = match handover.state() {
        handover::State::HandedOver => "upgrade",
        handover::State::Stopping => "stop",
        _ => "drained",
    };
    if let Some(t) = udp_task {
        let _ = t.await;
    }
    event(format_args!(
        "exit pid={pid} generation={generation} reason={reason} served={} remaining={} drain_ms={:.3}",
        app.served.load(Ordering::Relaxed),
        report.remaining,
        report.elapsed.as_secs_f64() * 1e3,
    ));
    Ok(())
}

/// Runs the server with `args` (without the program name).
pub fn main_with(args: &[OsString]) -> ExitCode {
    // `reload` and `status`: the crate's control client.
    if let Some(code) = handover::control::command(args) {
        return code;
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
            let e = format!("{e:#}");
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
            let e = format!("{e:#}");
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
