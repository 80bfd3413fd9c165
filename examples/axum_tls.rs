//! A zero-downtime axum service over TLS (feature `tls`):
//! `axum_tls --listen ADDR --tls-cert PATH --tls-key PATH [--pid-file PATH] [--control PATH]
//! [--take-over PATH] [--tickets-per-process]` (PEM files; `--take-over`: take the service over
//! from the one at that control socket, its ticket keys included). SIGHUP or `axum_tls reload --control PATH` upgrades it in
//! place: the successor reads the certificate and key anew (a renewed certificate is deployed by
//! an upgrade; one that cannot be used fails the upgrade, with the reason in the `reload` reply),
//! and clients resume their TLS sessions with it. `--tickets-per-process`: session-ticket keys
//! of this process only, as most servers have them (for comparison: clients then do a full
//! handshake after each upgrade). SIGTERM stops.
use axum::{Router, http::HeaderValue, middleware::map_response, response::Response, routing::get};
use handover::{Handover, control, serve::Server, serve::Triggers, serve::tls_config};
use tokio::signal::unix::SignalKind;

fn main() -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    if let Some(code) = control::command(std::env::args_os().skip(1)) {
        return Ok(code); // `axum_tls reload …` and `axum_tls status …`
    }
    let flag = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let mut builder = Handover::builder();
    if let Some(path) = flag("--pid-file") {
        builder = builder.pid_file(path);
    }
    if let Some(path) = flag("--take-over") {
        builder = builder.take_over(path); // a new container or unit takes the service over
    }
    let handover = builder.build()?; // first, before any other fd is opened
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or("info".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    log.with_writer(std::io::stderr).init(); // RUST_LOG (else info) to stderr
    let (cert, key) = (flag("--tls-cert"), flag("--tls-key"));
    let (cert, key) = cert
        .zip(key)
        .ok_or("--tls-cert PATH and --tls-key PATH are needed")?;
    // Read now, before ready(): an error reaches the old generation's `reload` reply.
    let mut tls = tls_config(&handover, cert, key)?;
    if std::env::args().any(|a| a == "--tickets-per-process") {
        tls.ticketer = rustls::crypto::ring::Ticketer::new()?; // rustls' own: random keys
    }
    tokio::runtime::Runtime::new()?.block_on(async {
        let (pid, addr) = (std::process::id(), flag("--listen"));
        let listener = handover.tcp_listener("https", addr.unwrap_or("127.0.0.1:8443".into()))?;
        let mut triggers = Triggers::new(&handover).upgrade_on(SignalKind::hangup());
        if let Some(path) = flag("--control") {
            let socket = control::bind(&handover, path)?.allow_takeover(true); // same uid only
            triggers = triggers.control(socket);
        }
        triggers.stop_on(SignalKind::terminate()).spawn()?; // own task: accepting never waits
        handover.ready()?;
        println!("listening on {} pid {pid}", listener.local_addr()?); // inherited, or bound now
        let app = Router::new().route("/", get(|| async { "hello over TLS\n" }));
        let app = app.layer(map_response(move |mut r: Response| async move {
            (r.headers_mut().insert("x-pid", HeaderValue::from(pid)), r).1
        }));
        let server = Server::new(&handover).listener(listener).tls(tls);
        eprintln!("drained: {:?}", server.serve(app).await?); // all done, or the drain timeout passed
        Ok(std::process::ExitCode::SUCCESS)
    })
}
