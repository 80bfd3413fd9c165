//! A zero-downtime axum service: `axum --listen ADDR [--pid-file PATH] [--control PATH] [--migrate]`,
//! SIGHUP or `axum reload --control PATH` upgrades it in place, SIGTERM drains and stops.
use axum::{Router, http::HeaderValue, middleware::map_response, response::Response, routing::get};
use handover::{Handover, serve::Server, serve::Triggers};
use tokio::signal::unix::SignalKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flag = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    if std::env::args().nth(1).is_some_and(|a| a == "reload") {
        let control = flag("--control").ok_or("reload needs --control PATH")?;
        let reply = handover::control::reload(control, None, std::time::Duration::from_secs(120))?;
        println!("upgraded: {reply}");
        return Ok(());
    }
    let mut builder = Handover::builder();
    if let Some(path) = flag("--pid-file") {
        builder = builder.pid_file(path);
    }
    let handover = builder.build()?; // inherits the listener; first, before any other fd is opened
    tracing_subscriber::fmt().init(); // a failed upgrade is logged; the service goes on
    tokio::runtime::Runtime::new()?.block_on(async {
        let (pid, addr) = (std::process::id(), flag("--listen"));
        let listener = handover.tcp_listener("http", addr.unwrap_or("127.0.0.1:8080".into()))?;
        let mut triggers = Triggers::new(&handover).upgrade_on(SignalKind::hangup());
        if let Some(path) = flag("--control") {
            triggers = triggers.control(handover::control::bind(&handover, path)?);
        }
        triggers.stop_on(SignalKind::terminate()).spawn()?; // own task: accepting never waits
        handover.ready()?;
        println!("listening on {} pid {pid}", listener.local_addr()?); // inherited, or bound now
        let app = Router::new().route("/", get(|| async { "hello\n" }));
        let app = app.layer(map_response(move |mut r: Response| async move {
            (r.headers_mut().insert("x-pid", HeaderValue::from(pid)), r).1
        }));
        let server = Server::new(&handover).listener(listener); // --migrate: keep-alive moves on
        let server = server.migrate(std::env::args().any(|a| a == "--migrate"));
        eprintln!("drained: {:?}", server.serve(app).await?); // all done, or the drain timeout passed
        Ok(())
    })
}
