//! A zero-downtime axum service:
//! `axum --listen ADDR [--pid-file PATH] [--control PATH [--allow-program PATH]] [--no-migrate]
//! [--take-over PATH] [--probation SECS [--canary-share FRACTION]]`.
//! SIGHUP or `axum reload --control PATH [--binary PATH]` upgrades it in place (`--binary`: a
//! rollback, allowed from `--allow-program`), `axum status --control PATH` tells, SIGTERM stops.
//! `--take-over`: take the service over from the one at that control socket (a new container or
//! unit). `--probation`: a canary window, in which the new build is judged against this one on
//! live traffic and rolled back if it does worse. `--no-migrate`: keep-alive connections get the
//! lame duck instead of moving on.
use axum::{Router, http::HeaderValue, middleware::map_response, response::Response, routing::get};
use handover::{Builder, Handover, UpgradeOptions, canary::Policy, control, serve::*};
use tokio::signal::unix::SignalKind;

fn main() -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    if let Some(code) = control::command(std::env::args_os().skip(1)) {
        return Ok(code); // `axum reload …` and `axum status …`, exit codes documented
    }
    let flag = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let mut options = UpgradeOptions::new(); // canary: judged on 5xx rate and p99 vs this process
    if let Some(secs) = flag("--probation") {
        options = options.probation(std::time::Duration::from_secs_f64(secs.parse()?));
    }
    if let Some(share) = flag("--canary-share") {
        options = options.canary(Policy::new().share(share.parse()?)); // of new connections
    }
    let builder = flag("--pid-file")
        .into_iter()
        .fold(Handover::builder(), Builder::pid_file);
    let builder = flag("--take-over")
        .into_iter()
        .fold(builder, Builder::take_over);
    let handover = builder.upgrade_options(options).build()?; // first, before any other fd
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or("info".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    log.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init(); // RUST_LOG
    tokio::runtime::Runtime::new()?.block_on(async {
        let (pid, addr) = (std::process::id(), flag("--listen"));
        let listener = handover.tcp_listener("http", addr.unwrap_or("127.0.0.1:8080".into()))?;
        let addr = listener.local_addr()?; // inherited, or bound now
        let mut triggers = Triggers::new(&handover).upgrade_on(SignalKind::hangup());
        if let Some(path) = flag("--control") {
            let socket = control::bind(&handover, path)?.allow_takeover(true); // same uid only
            let allowed = flag("--allow-program").into_iter(); // programs `reload --binary` may run
            triggers = triggers.control(allowed.fold(socket, |s, p| s.allow_program(p)));
        }
        triggers.stop_on(SignalKind::terminate()).spawn()?; // own task: accepting never waits
        let server = Server::new(&handover).listener(listener); // before ready(): it takes connections
        let server = server.migrate(!std::env::args().any(|a| a == "--no-migrate"));
        handover.ready()?;
        println!("listening on {addr} pid {pid}");
        let app = Router::new().route("/", get(|| async { "hello\n" }));
        let app = app.layer(map_response(move |mut r: Response| async move {
            (r.headers_mut().insert("x-pid", HeaderValue::from(pid)), r).1
        }));
        eprintln!("drained: {:?}", server.serve(app).await?); // all done, or the drain timeout passed
        Ok(std::process::ExitCode::SUCCESS)
    })
}
