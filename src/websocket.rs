//! WebSocket connections that survive an upgrade (feature `websocket`):
//! between two messages a connection moves to the successor, with the
//! application's state for it, and the client sees nothing — no close, no
//! reconnect, no message lost or repeated.
//!
//! The application gets a tokio-tungstenite
//! [`WebSocketStream`](tokio_tungstenite::WebSocketStream) ([`WebSocket`])
//! over this crate's [`Socket`], and uses it as usual. When its generation
//! leaves ([`Socket::leaving`]), it calls [`hand_over`] with its state for
//! the connection (a user id, the rooms, a sequence number: the
//! *payload*); the successor gets a ready `WebSocket` and that payload.
//!
//! # Served by [`serve::Server`](crate::serve::Server)
//!
//! An axum handler (or any hyper service) answers the upgrade with
//! [`upgrade`] instead of axum's `WebSocketUpgrade`, and tells the
//! [`Server`](crate::serve::Server) what serves a connection handed over
//! ([`Server::websocket`](crate::serve::Server::websocket)):
//!
//! ```no_run
//! use axum::{Router, extract::Request, routing::get};
//! use futures_util::{SinkExt, StreamExt};
//! use handover::websocket::{self, WebSocket};
//!
//! /// One connection, in whichever generation it is: `count` is its state.
//! async fn echo(mut ws: WebSocket, mut count: u64) {
//!     let leaving = ws.get_ref().leaving();
//!     tokio::pin!(leaving);
//!     loop {
//!         tokio::select! {
//!             msg = ws.next() => match msg {
//!                 Some(Ok(msg)) if msg.is_text() || msg.is_binary() => {
//!                     count += 1;
//!                     if ws.send(msg).await.is_err() { return }
//!                 }
//!                 Some(Ok(_)) => {}
//!                 _ => return,
//!             },
//!             // This generation drains: move between two messages (or,
//!             // if it cannot, close with 1012 so the client reconnects).
//!             () = &mut leaving => {
//!                 let _ = websocket::hand_over(ws, count.to_le_bytes()).await;
//!                 return;
//!             }
//!         }
//!     }
//! }
//!
//! # async fn serve(handover: handover::Handover, listener: std::net::TcpListener) -> std::io::Result<()> {
//! let app = Router::new().route(
//!     "/ws",
//!     get(|req: Request| async { websocket::upgrade(req, |ws| echo(ws, 0)) }),
//! );
//! // Made before `handover.ready()`: it says what this generation takes.
//! let server = handover::serve::Server::new(&handover)
//!     .listener(listener)
//!     .websocket(|ws, payload: Vec<u8>| {
//!         let count = payload.try_into().map_or(0, u64::from_le_bytes);
//!         echo(ws, count)
//!     });
//! handover.ready()?;
//! server.serve(app).await?;
//! # Ok(()) }
//! # fn main() { let _ = serve; }
//! ```
//!
//! examples/chat.rs is a chat with rooms whose members stay through
//! upgrades.
//!
//! # Your own server
//!
//! A server that does not use the serving layer wraps each accepted TCP
//! connection in [`Socket::new`] before tokio-tungstenite's handshake
//! (`accept_async`), follows the generation's drain through
//! [`Socket::leaving`], hands over with [`hand_over`], and in the successor
//! takes the connections from
//! [`Handover::incoming_connections`](crate::Handover::incoming_connections)
//! (called before `ready()`) and resumes each with [`resume`].
//!
//! # What moves, and what does not
//!
//! A connection moves between two messages: every message the old
//! generation returned was read whole, and nothing of the next one. The
//! frames the application queued are flushed first (and a pong owed to a
//! ping); the bytes of later messages that were read already travel with
//! the connection, and those still in the kernel travel with the socket.
//! A ping that arrives meanwhile is answered by the successor.
//!
//! What cannot move is closed with close code 1012 (Service Restart: the
//! client reconnects) after at most a second of waiting for a boundary —
//! never reset, never left hanging:
//!
//! - a message that does not end within that second (a fragmented one the
//!   client stopped sending);
//! - a connection with an extension's state (permessage-deflate keeps its
//!   compression context in this process). [`upgrade`] negotiates no
//!   extension; a handshake of your own might;
//! - any connection when the successor does not take WebSocket connections
//!   (an older build, migration off: known at the commit, so there is no
//!   wait), or gives it back;
//! - a WebSocket over TLS, or one another server upgraded: its stream is
//!   not a socket of this process alone; and one over a Unix socket (as
//!   for HTTP/1.1, only TCP connections move).
//!
//! At a stop ([`Handover::stop`](crate::Handover::stop)) there is no
//! successor: [`hand_over`] closes with 1001 (Going Away).
//!
//! State the connections share (a room's members) lives in each process:
//! while the connections move (milliseconds), a message reaches the
//! members in its sender's generation.
//!
//! # Why a stream wrapper, and what it costs
//!
//! tungstenite reads its socket in chunks of up to 128 KiB into a buffer of
//! its own, and there is no way to get that buffer back out of a
//! `WebSocketStream`: bytes it read past the message it returned would be
//! lost with it. Working on tungstenite's frame layer instead would hand
//! the application something other than the `WebSocketStream` its code
//! already uses. So [`Socket`] sits under tungstenite and never lets it
//! read past the frame it reads: it parses each frame header (2–14 bytes)
//! of what the socket gives, and hands over only whole frames — as many as
//! fit — or a frame longer than 16 KiB as it arrives, never past its end.
//! When tungstenite asks for more and gets nothing, it holds nothing, and
//! the connection is the socket plus
//! [`Socket`]'s read-ahead (at most 32 KiB: a partial frame, and what was
//! read past the message being finished when the generation began to
//! leave).
//!
//! Reads go straight from the socket into tungstenite's buffer, as they
//! would without [`Socket`]; only the partial frame at the end of a read is
//! taken back (copied) and handed again, whole, with the next. So the cost
//! is a frame-header parse per frame and that copy, measured against
//! tokio-tungstenite on a bare `TcpStream` (`cargo run --release --features
//! websocket --example bench -- ws-throughput --secs 3 --rounds 5`: one
//! client sending flat out, the server echoing, rounds interleaved,
//! medians; 2 shared cores, so ±7% is the machine's noise):
//!
//! | message | plain tokio-tungstenite | over [`Socket`] | ratio |
//! | --- | --- | --- | --- |
//! | 16 B | 2,466,445 msg/s | 2,566,827 msg/s | 1.05 |
//! | 1 KiB | 903,252 msg/s | 881,086 msg/s | 0.97 |
//! | 16 KiB | 74,809 msg/s | 69,940 msg/s | 0.93 |
//! | 64 KiB | 16,528 msg/s | 17,652 msg/s | 1.00 |
//!
//! Moving: 10,000 idle connections (`bench -- websocket`) leave the old
//! generation 0.4 s after the commit, where closing them with 1012 (and
//! every client reconnecting) takes 1.7 s.
//!
//! # Bounds
//!
//! - The payload is at most 16 KiB; with the read-ahead
//!   it travels in one migration record.
//! - Waiting for a message boundary: at most 1 s after the drain started;
//!   flushing before the move: at most 1 s; a close: at most 1 s for the
//!   client's answer. All within the drain deadline.
//! - A connection served by the serving layer counts in its drain until it
//!   moved or ended.

mod frames;
mod socket;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

pub use socket::Socket;
pub use tokio_tungstenite;

use crate::drain::Drain;
use crate::handover::Handover;
use crate::migrate::{self, MigrateError, MigratedConnection};
use socket::Io;

/// A WebSocket connection that can move: tokio-tungstenite's stream over
/// a [`Socket`].
pub type WebSocket = tokio_tungstenite::WebSocketStream<Socket>;

/// The largest payload (the application's state for one connection) that
/// [`hand_over`] takes: 16 KiB.
pub(crate) const MAX_PAYLOAD: usize = 16 * 1024;

/// tungstenite's read buffer, per connection: 8 KiB, grown for a larger
/// frame. Its default, 128 KiB zero-filled at the first read, would cost
/// every idle connection 128 KiB of memory (1.3 GB for 10,000) and a
/// successor that resumes 10,000 at once 320,000 page faults.
const READ_BUFFER: usize = 8 * 1024;

/// The server side of a WebSocket over `socket`, with the crate's
/// [`READ_BUFFER`].
async fn server_stream(socket: Socket) -> WebSocket {
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    tokio_tungstenite::WebSocketStream::from_raw_socket(socket, Role::Server, Some(config)).await
}

/// How long a leaving connection may take to reach a message boundary.
const BOUNDARY_WAIT: Duration = Duration::from_secs(1);
/// How long flushing before a move may take.
const FLUSH_WAIT: Duration = Duration::from_secs(1);
/// How long a close waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What a [`Socket`] knows of the generation it serves in.
pub(crate) struct Ctx {
    drain: Drain,
    /// The handover to move through; `None`: never moves (a server made
    /// without one, or migration off).
    handover: Option<Handover>,
    /// The kinds of connections a successor must take for this one to go
    /// (`websocket` for the serving layer's).
    kinds: &'static [&'static str],
    /// The serving layer's drain deadline.
    deadline: Option<watch::Receiver<bool>>,
}

/// What the serving layer puts in the extensions of an upgrade request, so
/// that [`upgrade`] knows the generation that serves it; and what serves
/// the connections handed over to it.
#[derive(Clone)]
pub(crate) struct Served {
    ctx: Arc<Ctx>,
    resume: Option<Resume>,
}

impl Served {
    /// The context of a [`serve::Server`](crate::serve::Server): its drain,
    /// its handover when it migrates, its deadline, its handler of
    /// connections handed over.
    pub(crate) fn new(
        drain: Drain,
        handover: Option<Handover>,
        deadline: watch::Receiver<bool>,
        resume: Option<Resume>,
    ) -> Served {
        let ctx = Arc::new(Ctx {
            drain,
            handover,
            kinds: &[migrate::WEBSOCKET],
            deadline: Some(deadline),
        });
        Served { ctx, resume }
    }
}

/// What serves the WebSocket connections handed over to a
/// [`serve::Server`](crate::serve::Server).
pub(crate) type Resume =
    Arc<dyn Fn(WebSocket, Vec<u8>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

impl Socket {
    /// A TCP connection accepted by a server of your own, before its
    /// WebSocket handshake (tokio-tungstenite's `accept_async` reads the
    /// request and answers it through this): it follows `handover`'s
    /// generation, and moves with [`hand_over`].
    pub fn new(stream: tokio::net::TcpStream, handover: &Handover) -> Socket {
        Socket::before_handshake(Io::Tcp(stream), Some(plain(handover)))
    }

    /// Resolves once this connection's generation is leaving — its drain
    /// started, after an upgrade or at a stop — and the connection is
    /// between two messages (or has not got there within a second): the
    /// moment for [`hand_over`]. From the drain on, the socket gives
    /// tungstenite no new message (the one it is in is finished); those
    /// that come wait for the successor. Never resolves for a connection
    /// not served in a generation (another server's).
    ///
    /// Owns what it needs: take it before the loop that reads the
    /// connection, and `select!` on it beside the reads.
    pub fn leaving(&self) -> impl Future<Output = ()> + Send + 'static {
        let flags = self.flags.clone();
        let drain = self.ctx.as_ref().map(|c| c.drain.clone());
        async move {
            match drain {
                Some(drain) => drain.draining().await,
                None => std::future::pending().await,
            }
            flags.pause.store(true, Ordering::Release);
            let bound = tokio::time::sleep(BOUNDARY_WAIT);
            tokio::pin!(bound);
            loop {
                let changed = flags.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if flags.at_boundary.load(Ordering::Acquire) {
                    return;
                }
                tokio::select! {
                    () = &mut changed => {}
                    () = &mut bound => return,
                }
            }
        }
    }
}

fn plain(handover: &Handover) -> Arc<Ctx> {
    Arc::new(Ctx {
        drain: handover.drain(),
        handover: Some(handover.clone()),
        kinds: &[migrate::CONNECTIONS, migrate::WEBSOCKET],
        deadline: None,
    })
}

/// Why a connection did not move (it was closed, unless the connection
/// broke first or the successor may hold it).
#[derive(Debug)]
pub struct NotMoved {
    why: Why,
    closed_with: Option<u16>,
}

#[derive(Debug)]
enum Why {
    Stop,
    Cannot(&'static str),
    PayloadTooLarge(usize),
    Migrate(MigrateError),
    Io(io::Error),
}

impl NotMoved {
    /// The close code sent to the client (1012, Service Restart; 1001,
    /// Going Away, at a stop), or `None` when no close could be sent: the
    /// connection broke, or was shut down at the migration deadline (a copy
    /// may have reached the successor).
    pub fn close_code(&self) -> Option<u16> {
        self.closed_with
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Stop => f.write_str("a stop: no successor"),
            Why::Cannot(why) => write!(f, "cannot move: {why}"),
            Why::PayloadTooLarge(len) => {
                write!(f, "a payload of {len} bytes (at most {MAX_PAYLOAD})")
            }
            Why::Migrate(e) => write!(f, "not handed over: {e}"),
            Why::Io(e) => write!(f, "the connection failed: {e}"),
        }
    }
}

impl std::fmt::Display for NotMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.why.fmt(f)?;
        match self.closed_with {
            Some(code) => write!(f, "; closed with {code}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for NotMoved {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.why {
            Why::Migrate(e) => Some(e),
            Why::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Moves `ws` to the successor with `payload` (at most 16 KiB:
/// the application's state for the connection), or closes it.
///
/// Call it once [`Socket::leaving`] resolved. It flushes what the
/// application queued, then hands the socket, the payload and the bytes
/// read ahead to the successor, and returns `Ok` once the successor owns
/// the connection. The successor's serving layer gives the connection
/// and the payload to [`Server::websocket`](crate::serve::Server::websocket)'s
/// handler; a server of your own gets them from [`resume`].
///
/// When it cannot move — no committed upgrade, the successor does not take
/// WebSocket connections or gives this one back, the connection is in the
/// middle of a message, or has state only this process has (see the module
/// documentation) — it is closed with 1012 (Service Restart), or 1001
/// (Going Away) at a stop, waiting at most a second for the client's
/// answer; the error says why.
pub async fn hand_over(mut ws: WebSocket, payload: impl Into<Vec<u8>>) -> Result<(), NotMoved> {
    let payload = payload.into();
    let ctx = ws.get_ref().ctx.clone();
    let Some((ctx, handover)) = ctx.and_then(|c| c.handover.clone().map(|h| (c, h))) else {
        let why = match ws.get_ref().ctx.as_ref().is_some_and(|c| c.drain.is_stop()) {
            true => Why::Stop,
            false => Why::Cannot("this connection does not migrate (migration off)"),
        };
        return Err(close(ws, why).await);
    };
    let why = if ctx.drain.is_stop() {
        Some(Why::Stop)
    } else if payload.len() > MAX_PAYLOAD {
        Some(Why::PayloadTooLarge(payload.len()))
    } else if handover.state() != crate::State::HandedOver {
        Some(Why::Migrate(MigrateError::NotHandedOver))
    } else if !ctx.kinds.iter().any(|k| handover.successor_takes(k)) {
        Some(Why::Migrate(MigrateError::NotTaken))
    } else {
        ws.get_ref().cannot_move().map(Why::Cannot)
    };
    if let Some(why) = why {
        return Err(close(ws, why).await);
    }
    // What the application queued (and a pong owed) goes first. Flushing
    // writes only: the socket stays between two messages.
    match tokio::time::timeout(FLUSH_WAIT, ws.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(broken(Why::Io(io::Error::other(e)))),
        Err(_) => return Err(close(ws, Why::Cannot("the client does not read")).await),
    }
    let socket = ws.into_inner();
    let (fd, read_ahead) = match socket.into_fd() {
        Ok(parts) => parts,
        Err(e) => return Err(broken(Why::Io(e))),
    };
    let record = encode(&payload, &read_ahead);
    let (error, back) = match handover.send_connection(fd, record).await {
        Ok(()) => return Ok(()),
        Err(e) => e.into_parts(),
    };
    tracing::debug!(error = %error, "a WebSocket connection was not handed over");
    let Some((fd, record)) = back else {
        return Err(broken(Why::Migrate(error))); // shut down at the deadline
    };
    // Given back: ours alone again, and between two messages still.
    let (_, read_ahead) = decode(&record).unwrap_or_default();
    let io = match io_of(fd) {
        Ok(io) => io,
        Err(e) => return Err(broken(Why::Io(e))),
    };
    let socket = Socket::after_handshake(io, read_ahead, Some(ctx));
    let ws = server_stream(socket).await;
    Err(close(ws, Why::Migrate(error)).await)
}

fn broken(why: Why) -> NotMoved {
    NotMoved {
        why,
        closed_with: None,
    }
}

/// Closes `ws` with 1012 (1001 at a stop), then reads until the client's
/// close frame, discarding what comes: at most [`CLOSE_WAIT`] in all.
async fn close(mut ws: WebSocket, why: Why) -> NotMoved {
    let code = match why {
        Why::Stop => CloseCode::Away,
        _ => CloseCode::Restart,
    };
    tracing::debug!(reason = %why, "closing a WebSocket connection");
    ws.get_ref().resume_reading();
    let until = tokio::time::Instant::now() + CLOSE_WAIT;
    let frame = CloseFrame {
        code,
        reason: match code {
            CloseCode::Away => "going away".into(),
            _ => "service restart".into(),
        },
    };
    let closed_with = match tokio::time::timeout_at(until, ws.close(Some(frame))).await {
        Ok(Ok(())) => Some(u16::from(code)),
        _ => None,
    };
    if closed_with.is_some() {
        // The client answers with its close frame; then tungstenite ends
        // the stream, and the socket closes with nothing unread (no reset).
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, ws.next()).await {}
    }
    NotMoved { why, closed_with }
}

/// The payload a WebSocket connection travels with: a tag no HTTP request
/// starts with, a version, the application's payload (length-prefixed),
/// then the bytes read ahead.
const MAGIC: &[u8; 4] = b"\0WS\x01";

fn encode(payload: &[u8], read_ahead: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len() + read_ahead.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v.extend_from_slice(read_ahead);
    v
}

/// The application's payload and the read-ahead; `None` if `record` is not
/// a WebSocket connection's.
fn decode(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = record.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    (len <= MAX_PAYLOAD && len <= rest.len()).then(|| rest.split_at(len))
}

/// Whether a migrated connection's payload is a WebSocket connection's.
pub(crate) fn is_websocket(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC)
}

/// The socket of a connection handed over (or given back), on this
/// process's reactor.
fn io_of(fd: std::os::fd::OwnedFd) -> io::Result<Io> {
    let sock = socket2::SockRef::from(&fd);
    sock.set_nonblocking(true)?;
    match sock.domain()? {
        socket2::Domain::IPV4 | socket2::Domain::IPV6 => Ok(Io::Tcp(
            tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?,
        )),
        socket2::Domain::UNIX => Ok(Io::Unix(tokio::net::UnixStream::from_std(
            std::os::unix::net::UnixStream::from(fd),
        )?)),
        _ => Err(io::Error::other("a socket neither TCP nor Unix")),
    }
}

/// In the successor: the WebSocket connection the old generation handed
/// over with [`hand_over`], ready to serve, and its payload. The stream
/// resumes where the old generation's stopped: its next message is the
/// first one the application there did not get. It follows `handover`'s
/// generation from now on, and moves on at its next upgrade.
///
/// An error when `connection` is not a WebSocket connection handed over by
/// [`hand_over`] (it is closed then).
pub async fn resume(
    handover: &Handover,
    connection: MigratedConnection,
) -> Result<(WebSocket, Vec<u8>), MigrateError> {
    resume_in(connection, plain(handover)).await
}

pub(crate) async fn resume_in(
    connection: MigratedConnection,
    ctx: Arc<Ctx>,
) -> Result<(WebSocket, Vec<u8>), MigrateError> {
    let (fd, record) = connection.into_parts();
    let Some((payload, read_ahead)) = decode(&record) else {
        return Err(MigrateError::Protocol {
            reason: "not a WebSocket connection handed over".into(),
        });
    };
    let io = io_of(fd).map_err(|e| MigrateError::Io {
        context: "taking a WebSocket connection",
        source: e,
    })?;
    let socket = Socket::after_handshake(io, read_ahead, Some(ctx));
    let ws = server_stream(socket).await;
    Ok((ws, payload.to_vec()))
}

/// Serves a WebSocket connection handed over to a `serve::Server`: with
/// its handler, counted in the drain by `guard`, until the drain deadline.
pub(crate) async fn serve_resumed(
    connection: MigratedConnection,
    served: Served,
    guard: crate::drain::DrainGuard,
) {
    let Some(handler) = served.resume else {
        tracing::warn!("a WebSocket connection handed over, and no Server::websocket to serve it");
        return;
    };
    let mut deadline = served.ctx.deadline.clone();
    let (ws, payload) = match resume_in(connection, served.ctx).await {
        Ok(taken) => taken,
        Err(e) => return tracing::warn!(error = %e, "a handed-over WebSocket connection is lost"),
    };
    tokio::select! {
        () = handler(ws, payload) => {}
        () = passed(&mut deadline) => {}
    }
    drop(guard);
}

async fn passed(deadline: &mut Option<watch::Receiver<bool>>) {
    match deadline {
        Some(d) => {
            let _ = d.wait_for(|passed| *passed).await;
        }
        None => std::future::pending().await,
    }
}

/// Answers a WebSocket upgrade request: `101 Switching Protocols`, and once
/// the connection switched, `on_upgrade` runs (in a task of its own) with
/// the [`WebSocket`]. A request that is not a valid WebSocket upgrade (RFC
/// 6455, version 13) gets `400 Bad Request` (or `426` for another version)
/// and `on_upgrade` does not run.
///
/// For an axum handler that takes the `Request` (`axum::extract::Request`)
/// and returns the response, or any hyper service. Served by a
/// [`serve::Server`](crate::serve::Server), the connection counts in its
/// drain until `on_upgrade` returns, and can move to the successor
/// ([`hand_over`]); served by another server it works, but never moves. No
/// subprotocol and no extension (compression) is negotiated.
pub fn upgrade<B, F, Fut>(mut req: Request<B>, on_upgrade: F) -> Response<String>
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let accept = match check(&req) {
        Ok(accept) => accept,
        Err((status, why)) => {
            let mut r = refuse(status, why);
            if status == StatusCode::UPGRADE_REQUIRED {
                let v = HeaderValue::from_static("13");
                r.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, v);
            }
            return r;
        }
    };
    if req
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "this connection cannot switch protocols (HTTP/2?)",
        );
    }
    let served = req.extensions_mut().remove::<Served>();
    let upgraded = hyper::upgrade::on(&mut req);
    // Counted from now, while the request's own connection still is.
    let guard = served.as_ref().map(|s| s.ctx.drain.guard());
    let ctx = served.map(|s| s.ctx);
    tokio::spawn(async move {
        let upgraded = match upgraded.await {
            Ok(u) => u,
            Err(e) => return tracing::debug!(error = %e, "a WebSocket upgrade failed"),
        };
        let socket = match upgraded.downcast::<crate::serve::Upgraded<tokio::net::TcpStream>>() {
            Ok(parts) => served_socket(parts, Io::Tcp, ctx.clone()),
            Err(upgraded) => {
                match upgraded.downcast::<crate::serve::Upgraded<tokio::net::UnixStream>>() {
                    Ok(parts) => served_socket(parts, Io::Unix, ctx.clone()),
                    Err(other) => {
                        let io = Io::Other(hyper_util::rt::TokioIo::new(other));
                        Socket::after_handshake(io, &[], ctx.clone())
                    }
                }
            }
        };
        let mut deadline = ctx.as_ref().and_then(|c| c.deadline.clone());
        let ws = server_stream(socket).await;
        tokio::select! {
            () = on_upgrade(ws) => {}
            () = passed(&mut deadline) => {}
        }
        drop(guard);
    });
    let mut response = Response::new(String::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The socket of a connection the serving layer upgraded: read-ahead is
/// what hyper read past the request, then what it had not read yet.
fn served_socket<T>(
    parts: hyper::upgrade::Parts<crate::serve::Upgraded<T>>,
    io: impl FnOnce(T) -> Io,
    ctx: Option<Arc<Ctx>>,
) -> Socket {
    let (stream, pre) = parts.io.into_inner().into_inner();
    let mut read_ahead = parts.read_buf.to_vec();
    read_ahead.extend_from_slice(&pre);
    Socket::after_handshake(io(stream), &read_ahead, ctx)
}

/// The `Sec-WebSocket-Accept` of a valid upgrade request, or the status and
/// reason of the answer to an invalid one.
fn check<B>(req: &Request<B>) -> Result<HeaderValue, (StatusCode, &'static str)> {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let bad = StatusCode::BAD_REQUEST;
    if req.method() != hyper::Method::GET || req.version() < hyper::Version::HTTP_11 {
        return Err((bad, "a WebSocket upgrade is a GET over HTTP/1.1"));
    }
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err((bad, "not a WebSocket upgrade request"));
    }
    let version = req.headers().get(header::SEC_WEBSOCKET_VERSION);
    if version.map(|v| v.as_bytes()) != Some(b"13") {
        return Err((StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 only"));
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY);
    // The key is 16 bytes in base64: 24 characters.
    let Some(key) = key.filter(|k| k.len() == 24) else {
        return Err((bad, "no valid Sec-WebSocket-Key"));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    HeaderValue::from_str(&accept).map_err(|_| (bad, "bad key"))
}

fn refuse(status: StatusCode, why: &str) -> Response<String> {
    let mut r = Response::new(format!("{why}\n"));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_nothing_else_decodes() {
        let record = encode(b"room=lobby", b"\x81\x85ahead");
        assert!(is_websocket(&record));
        assert_eq!(
            decode(&record),
            Some((&b"room=lobby"[..], &b"\x81\x85ahead"[..]))
        );
        assert_eq!(decode(&encode(b"", b"")), Some((&b""[..], &b""[..])));
        // An HTTP connection's read-ahead, a short or lying record.
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"",
            b"\0WS\x01\x05\0\0",
            b"\0WS\x02\0\0\0\0",
            b"\0WS\x01\xff\xff\xff\xff",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
        assert!(
            encode(&[0; MAX_PAYLOAD], &[0; socket::MAX_READ_AHEAD]).len() <= migrate::MAX_PAYLOAD
        );
    }

    #[test]
    fn an_upgrade_request_is_checked() {
        let req = |f: &dyn Fn(hyper::http::request::Builder) -> hyper::http::request::Builder| {
            let b = Request::builder()
                .uri("/ws")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
            f(b).body(()).unwrap()
        };
        // RFC 6455's example key and answer.
        assert_eq!(check(&req(&|b| b)).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(check(&req(&|b| b.method("POST"))).unwrap_err().0, 400);
        let mut old = req(&|b| b);
        old.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(check(&old).unwrap_err().0, 426);
        let no_upgrade = Request::builder().uri("/ws").body(()).unwrap();
        assert_eq!(check(&no_upgrade).unwrap_err().0, 400);
    }
}
