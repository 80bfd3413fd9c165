//! A zero-downtime axum service:
//! `axum --listen ADDR [--pid-file PATH] [--control PATH [--allow-program PATH]] [--no-migrate]
//! [--take-over PATH]` (`--take-over`: take the service over from the one at that control socket;
//! `--no-migrate`: keep-alive connections get the lame-duck drain instead of moving on).
//! SIGHUP or `axum reload --control PATH [--binary PATH]` upgrades it in place (`--binary`: a
//! rollback, allowed from `--allow-program`), `axum status --control PATH` tells, SIGTERM stops.
use axum::{Router, http::HeaderValue, middleware::map_response, response::Response, routing::get};
use handover::{Handover, control, serve::Server, serve::Triggers};
use tokio::signal::unix::SignalKind;

fn main() -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    if let Some(code) = control::command(std::env::args_os().skip(1)) {
        return Ok(code); // `axum reload …` and `axum status …`, exit codes documented
    }
    let flag = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let mut builder = Handover::builder();
    if let Some(path) = flag("--pid-file") {
        builder = builder.pid_file(path);
    }
    if let Some(path) = flag("--take-over") {
        builder = builder.take_over(path); // a new container or unit takes the service over
    }
    let handover = builder.build()?; // inherits the listener; first, before any other fd is opened
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or("info".into());
    let colors = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colors);
    log.with_writer(std::io::stderr).init(); // RUST_LOG (else info) to stderr
    tokio::runtime::Runtime::new()?.block_on(async {
        let (pid, addr) = (std::process::id(), flag("--listen"));
        let listener = handover.tcp_listener("http", addr.unwrap_or("127.0.0.1:8080".into()))?;
        let addr = listener.local_addr()?;
        let mut triggers = Triggers::new(&handover).upgrade_on(SignalKind::hangup());
        if let Some(path) = flag("--control") {
            let allowed = flag("--allow-program").into_iter(); // programs `reload --binary` may run
            let options = control::ControlOptions::new().allow_takeover(true); // same uid only
            let options = allowed.fold(options, |o, p| o.allow_program(p));
            triggers = triggers.control(control::bind_with(&handover, path, options)?);
        }
        triggers.stop_on(SignalKind::terminate()).spawn()?; // own task: accepting never waits
        let server = Server::new(&handover).listener(listener); // before ready(): it takes connections
        let server = server.migrate(!std::env::args().any(|a| a == "--no-migrate")); // on by default
        handover.ready()?;
        println!("listening on {addr} pid {pid}"); // inherited, or bound now
        let app = Router::new().route("/", get(|| async { "hello\n" }));
        let app = app.layer(map_response(move |mut r: Response| async move {
            (r.headers_mut().insert("x-pid", HeaderValue::from(pid)), r).1
        }));
        eprintln!("drained: {:?}", server.serve(app).await?); // all done, or the drain timeout passed
        Ok(std::process::ExitCode::SUCCESS)
    })
}
