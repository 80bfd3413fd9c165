//! A line protocol whose connections live through any number of upgrades.
//!
//! ```text
//! cargo run --example line_server -- --listen 127.0.0.1:7070 --pid-file /tmp/lines.pid
//! nc 127.0.0.1 7070                   # type lines: each answer is `<seq> <pid> <line>`
//! kill -HUP "$(cat /tmp/lines.pid)"   # upgrade: nc stays connected, seq goes on
//! kill -TERM "$(cat /tmp/lines.pid)"  # answer what was read, close, exit
//! ```
//!
//! Each connection has state: `seq`, the number of lines it has answered.
//! On an upgrade the old generation hands every established connection to
//! its successor (`Handover::send_connection`) with that state and the bytes
//! it read but did not answer yet (a partial line); the successor goes on
//! where it stopped. The client sees only the pid in the answers change.
//! A connection the successor does not take comes back and is served here
//! until the drain deadline.
//!
//! Flags: `--listen ADDR` (default 127.0.0.1:7070), `--pid-file PATH`,
//! `--drain-timeout SECS` (default 30). One line per event goes to stdout:
//! `ready …`, `upgrade-ok …`, `upgrade-failed …`, `exit …`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use handover::{Drain, DrainGuard, Handover, IncomingConnections, Migrated};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};

/// A longer line closes the connection.
const MAX_LINE: usize = 16 * 1024;

/// What a connection carries from one generation to the next.
struct Session {
    /// Lines answered on this connection.
    seq: u64,
    /// Bytes read but not answered yet: the start of the next line.
    unread: Vec<u8>,
}

impl Session {
    /// The payload it travels in: a version byte (1), `seq` (8 bytes,
    /// little-endian), then the unread bytes. Versioned: on a rollback, the
    /// successor is an older build.
    fn into_payload(self) -> Vec<u8> {
        let mut payload = vec![1];
        payload.extend_from_slice(&self.seq.to_le_bytes());
        payload.extend_from_slice(&self.unread);
        payload
    }

    fn from_payload(payload: &[u8]) -> Option<Session> {
        let (seq, unread) = payload.strip_prefix(&[1])?.split_first_chunk::<8>()?;
        Some(Session {
            seq: u64::from_le_bytes(*seq),
            unread: unread.to_vec(),
        })
    }
}

/// Serves `stream` in a task of its own, counted by the drain from now on.
fn spawn_serve(h: &Handover, drain: &Drain, stream: TcpStream, s: Session) {
    let guard = drain.guard();
    tokio::spawn(serve(h.clone(), drain.clone(), guard, stream, s));
}

/// Answers each line with `<seq> <pid> <line>` until the client closes or
/// the drain starts; then hands the connection to the successor, or (on a
/// stop) closes it. A connection the successor does not take is served on
/// until this process exits at its drain deadline.
async fn serve(
    h: Handover,
    drain: Drain,
    _guard: DrainGuard,
    mut stream: TcpStream,
    mut s: Session,
) {
    let pid = std::process::id();
    let mut may_hand_over = true;
    loop {
        while let Some(end) = s.unread.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = s.unread.drain(..=end).collect();
            s.seq += 1;
            let mut answer = format!("{} {pid} ", s.seq).into_bytes();
            answer.extend_from_slice(&line);
            if stream.write_all(&answer).await.is_err() {
                return;
            }
        }
        if s.unread.len() > MAX_LINE {
            return;
        }
        s.unread.reserve(4096);
        tokio::select! {
            // Cancel-safe: when the drain wins, nothing was read.
            read = stream.read_buf(&mut s.unread) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = drain.draining(), if may_hand_over => {
                if h.state() != handover::State::HandedOver {
                    return; // a stop: everything read is answered
                }
                let Ok(std_stream) = stream.into_std() else { return };
                match h.send_connection(std_stream, s.into_payload()).await {
                    Ok(()) => return, // the successor serves it now
                    Err(e) => {
                        // Not taken: still ours when it comes back.
                        eprintln!("line_server: kept a connection: {e}");
                        let Some((fd, payload)) = e.into_connection() else { return };
                        let Ok(back) = TcpStream::from_std(fd.into()) else { return };
                        let Some(session) = Session::from_payload(&payload) else { return };
                        (stream, s, may_hand_over) = (back, session, false);
                    }
                }
            }
        }
    }
}

/// Serves the connections the old generation hands over, as they come,
/// until it is done. Holds `_guard` meanwhile: should this generation drain
/// before that, the late ones are handed on, not dropped.
async fn take_over(
    h: Handover,
    mut incoming: IncomingConnections,
    drain: Drain,
    _guard: DrainGuard,
) {
    while let Some(item) = incoming.recv().await {
        let Ok(Migrated::Connection(c)) = item else {
            continue;
        }; // (no state sent)
        let usable = c.into_tcp().ok().and_then(|(stream, payload)| {
            Some((
                TcpStream::from_std(stream).ok()?,
                Session::from_payload(&payload)?,
            ))
        });
        match usable {
            Some((stream, s)) => spawn_serve(&h, &drain, stream, s),
            None => eprintln!("line_server: a handed-over connection could not be used"),
        }
    }
}

async fn run(h: Handover, listen: SocketAddr) -> io::Result<()> {
    let (pid, generation) = (std::process::id(), h.generation());
    let listener = tokio::net::TcpListener::from_std(h.tcp_listener("lines", listen)?)?;
    // Handlers before ready(): from then on SIGHUP is an upgrade, not death.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    // Before ready(): the ready message tells the old generation that this
    // one takes its connections.
    let incoming = h.incoming_connections().map_err(io::Error::other)?;
    h.ready()?;
    println!(
        "ready pid={pid} generation={generation} addr={}",
        listener.local_addr()?
    );
    let drain = h.drain();
    // Read from ready() on: the old generation waits for the offer at most 5 s.
    tokio::spawn(take_over(h.clone(), incoming, drain.clone(), drain.guard()));
    // Upgrades in a task of their own: accepting goes on meanwhile.
    let (upgraded_tx, mut upgraded) = tokio::sync::oneshot::channel();
    tokio::spawn({
        let h = h.clone();
        async move {
            while hup.recv().await.is_some() {
                match h.upgrade().await {
                    Ok(up) => {
                        println!("upgrade-ok pid={pid} successor={}", up.pid);
                        let _ = upgraded_tx.send(());
                        return;
                    }
                    Err(e) => println!("upgrade-failed pid={pid} error={e:#}"),
                }
            }
        }
    });
    let reason = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    spawn_serve(&h, &drain, stream, Session { seq: 0, unread: Vec::new() })
                }
                Err(e) => eprintln!("line_server: accept: {e}"),
            },
            _ = &mut upgraded => break "upgrade",
            _ = term.recv() => break "stop",
        }
    };
    drop(listener); // stop accepting; the successor accepts on the same socket
    let started = std::time::Instant::now();
    drain.start(); // each connection is handed over (or closed on a stop)
    let report = drain.wait(h.drain_timeout()).await;
    println!(
        "exit pid={pid} generation={generation} reason={reason} remaining={} drain_ms={}",
        report.remaining,
        started.elapsed().as_millis()
    );
    Ok(())
}

fn main() -> ExitCode {
    let (mut listen, mut pid_file, mut drain) = ("127.0.0.1:7070".to_owned(), None, 30);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--listen", Some(v)) => listen = v,
            ("--pid-file", Some(v)) => pid_file = Some(PathBuf::from(v)),
            ("--drain-timeout", Some(v)) if v.parse::<u64>().is_ok() => drain = v.parse().unwrap(),
            _ => {
                eprintln!(
                    "usage: line_server [--listen ADDR] [--pid-file PATH] [--drain-timeout SECS]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        eprintln!("line_server: --listen {listen:?} is not an address");
        return ExitCode::from(2);
    };
    // First, before the runtime opens fds: read what the old generation handed over.
    let mut builder = Handover::builder().drain_timeout(Duration::from_secs(drain));
    if let Some(path) = pid_file {
        builder = builder.pid_file(path);
    }
    let h = match builder.build() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("line_server: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = rt.block_on(run(h.clone(), listen));
    // Connections still here at the deadline are closed now.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            h.report_failure(&e.to_string()); // a successor says why it cannot start
            eprintln!("line_server: {e}");
            ExitCode::FAILURE
        }
    }
}
