//! The HTTP server with the lossless drain.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

use super::backoff::AcceptBackoff;
use super::conn::{self, Shared};
use crate::drain::{Drain, DrainGuard, DrainReport};
use crate::handover::Handover;
use crate::migrate::Migrated;

/// A listening socket for [`Server::listener`]: TCP or Unix, std or tokio.
#[derive(Debug)]
pub struct Listener(Inner);

#[derive(Debug)]
enum Inner {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
    TokioTcp(tokio::net::TcpListener),
    TokioUnix(tokio::net::UnixListener),
}

impl From<std::net::TcpListener> for Listener {
    fn from(l: std::net::TcpListener) -> Self {
        Listener(Inner::Tcp(l))
    }
}

impl From<std::os::unix::net::UnixListener> for Listener {
    fn from(l: std::os::unix::net::UnixListener) -> Self {
        Listener(Inner::Unix(l))
    }
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(l: tokio::net::TcpListener) -> Self {
        Listener(Inner::TokioTcp(l))
    }
}

impl From<tokio::net::UnixListener> for Listener {
    fn from(l: tokio::net::UnixListener) -> Self {
        Listener(Inner::TokioUnix(l))
    }
}

enum Accepting {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    fn into_tokio(self) -> io::Result<Accepting> {
        Ok(match self.0 {
            Inner::Tcp(l) => {
                l.set_nonblocking(true)?;
                Accepting::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            Inner::Unix(l) => {
                l.set_nonblocking(true)?;
                Accepting::Unix(tokio::net::UnixListener::from_std(l)?)
            }
            Inner::TokioTcp(l) => Accepting::Tcp(l),
            Inner::TokioUnix(l) => Accepting::Unix(l),
        })
    }
}

/// Serves HTTP/1.1 and HTTP/2 on the handover's listeners with any hyper
/// or tower service, and drains without losing a request.
///
/// Every connection is counted in the generation's [`Drain`]
/// ([`Handover::drain`]). When the drain starts — an upgrade succeeded or a
/// stop was asked for, typically by [`Triggers`](super::Triggers) — the
/// server:
///
/// - stops accepting at once and drops its listeners. After an upgrade the
///   socket lives on in the successor, which accepts every new connection,
///   queued ones included. At a stop ([`Handover::stop`],
///   [`Drain::start_stop`]) there is no successor: the server first takes
///   the connections already queued (accepting without waiting until none
///   is left) and serves them; the socket then closes (unless the service
///   manager holds it too), and new connections are refused;
/// - **HTTP/1.1**: finishes the requests in flight and answers the next
///   request on each keep-alive connection with `Connection: close` (lame
///   duck), after which hyper closes it. An idle keep-alive connection is
///   *not* closed: a request may be on the wire already, and closing would
///   fail it. It stays until its next request or the drain deadline;
/// - serves a connection that was accepted but not read yet (its request
///   may be on the way) — hyper's `graceful_shutdown()` would close it;
/// - **HTTP/2**: sends a graceful GOAWAY (two-phase: streams the client sent
///   before it saw the GOAWAY are still served), finishes the streams in
///   flight and closes the connection once the client has acknowledged the
///   GOAWAY's PING; the client moves to a new connection — the successor;
/// - returns as soon as no connection is left, or at the drain deadline
///   ([`Builder::drain_timeout`](crate::Builder::drain_timeout), default
///   30 s), closing what is still open, with the [`DrainReport`].
///
/// So what keeps an old generation alive after an upgrade is its slowest
/// request in flight and every idle keep-alive client that sends nothing
/// more: one such client holds it until the deadline. At a stop there is
/// nobody to leave such a client to: an HTTP/1.1 connection with no request
/// in flight and nothing read ahead is closed once it has been quiet for
/// 100 ms (a client in a run of requests gets its next one answered, with
/// `Connection: close`), and so is a connection that sent nothing; what
/// keeps a stopping process alive is its requests in flight.
///
/// By default ([`migrate`](Self::migrate)) HTTP/1.1 keep-alive connections
/// are handed to a successor that takes them after a committed upgrade
/// instead: the old generation waits only for its responses in flight.
/// Make the server before [`Handover::ready`]: the ready message tells
/// the predecessor what this generation takes.
///
/// HTTP/1 upgrades are served. A WebSocket answered with
/// [`websocket::upgrade`](crate::websocket::upgrade) (feature `websocket`)
/// counts in the drain until it moved to the successor or ended;
/// one upgraded any other way (axum's `WebSocketUpgrade`) leaves the
/// drain's count when hyper hands it to the service. TLS: `Server::tls`
/// (feature `tls`), with the same drain; a TLS connection is never handed
/// over.
///
/// During a probation window it counts every response (its status, its
/// latency to the response head), every failure and every accepted
/// connection for the canary judgement, and a canary with a share of the
/// traffic paces its accepts (see [`canary`](crate::canary)); outside a
/// window that costs one atomic load per request.
///
/// Accept errors back off ([`AcceptBackoff`]): `EMFILE` at the fd limit
/// neither spins nor floods the log.
///
/// ```no_run
/// # async fn example(handover: handover::Handover) -> std::io::Result<()> {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
/// let listener = handover.tcp_listener("http", "127.0.0.1:8080")?;
/// let report = handover::serve::Server::new(&handover)
///     .listener(listener)
///     .serve(app) // an axum Router, or any tower service
///     .await?;
/// # let _ = report; Ok(()) }
/// # fn main() { let _ = example; }
/// ```
#[must_use = "nothing is served until serve() is awaited"]
pub struct Server {
    drain: Drain,
    handover: Option<Handover>,
    migrate: bool,
    drain_timeout: Duration,
    listeners: Vec<Listener>,
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// TLS on every listener (`Server::tls`, in `tls`).
    #[cfg(feature = "tls")]
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
    /// What serves the WebSocket connections handed over.
    #[cfg(feature = "websocket")]
    websocket: Option<crate::websocket::Resume>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("drain_timeout", &self.drain_timeout)
            .field("listeners", &self.listeners)
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `handover`'s generation: its [`Drain`] and its drain
    /// timeout. Make it before [`Handover::ready`]: with
    /// [`migrate`](Self::migrate) on (the default) it takes the connections
    /// the predecessor hands over, and the ready message says so.
    pub fn new(handover: &Handover) -> Self {
        let mut server = Self::with_drain(handover.drain(), handover.drain_timeout());
        server.handover = Some(handover.clone());
        server.declare();
        server
    }

    /// Tells the handover which connections this server takes from the
    /// predecessor.
    fn declare(&self) {
        let Some(handover) = &self.handover else {
            return;
        };
        let mut kinds = Vec::new();
        if self.migrate {
            kinds.push(crate::migrate::HTTP1);
            #[cfg(feature = "websocket")]
            if self.websocket.is_some() {
                kinds.push(crate::migrate::WEBSOCKET);
            }
        }
        handover.declare_server(kinds);
    }

    /// A server that follows `drain`, with `timeout` as its deadline
    /// (no [`migrate`](Self::migrate): it needs the [`Handover`]).
    pub fn with_drain(drain: Drain, timeout: Duration) -> Self {
        // No timer for HTTP/1, as in axum::serve: with one, hyper arms a
        // header_read_timeout sleep per request, which measurably raised
        // the p99 under wrk (BENCHMARKS.md). `http1().timer(..)` turns it on.
        let http1 = hyper::server::conn::http1::Builder::new();
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        Server {
            drain,
            handover: None,
            migrate: true,
            drain_timeout: timeout,
            listeners: Vec::new(),
            http1,
            http2,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "websocket")]
            websocket: None,
        }
    }

    /// Serves on `listener` too (TCP or Unix, std or tokio; std listeners
    /// are made non-blocking, as the handover hands them out anyway).
    pub fn listener(mut self, listener: impl Into<Listener>) -> Self {
        self.listeners.push(listener.into());
        self
    }

    /// Hands HTTP/1.1 keep-alive connections (and WebSocket connections,
    /// feature `websocket`) to the successor when the drain starts after a
    /// committed upgrade, instead of the lame-duck drain; and takes the
    /// connections the predecessor hands over. Default: on. Needs
    /// [`Server::new`] (a server made [`with_drain`](Self::with_drain)
    /// never migrates), made before [`Handover::ready`].
    ///
    /// Each HTTP/1.1 connection over TCP finishes its response in flight
    /// (without `Connection: close`) and then moves, with the bytes hyper
    /// had read but not parsed (pipelined requests): the successor answers
    /// them, in order, and serves the connection on. The client sees only
    /// the `X-Pid` change. The old generation no longer waits for idle
    /// keep-alive clients: it exits as soon as its connections are handed
    /// over. What does not move:
    ///
    /// - **HTTP/2** keeps the graceful GOAWAY: its connection state (HPACK
    ///   tables, stream ids, flow control) lives in this process's h2.
    /// - **TLS** (`Server::tls`, or your own loop) keeps the lame-duck drain: the
    ///   session's keys and sequence numbers live in this process's TLS
    ///   library; the successor could not continue the session from the
    ///   socket alone.
    /// - **Unix-socket** connections keep the lame-duck drain.
    /// - A connection the successor does not take comes back and gets the
    ///   lame-duck drain. A successor says at its ready message what it
    ///   takes: when it takes no HTTP/1.1 connections (an older build, one
    ///   with migration off, a server made after `ready()`), every
    ///   connection gets the lame-duck drain at once, with no wait for an
    ///   offer. One that said it takes them but offers nothing is waited
    ///   for at most 5 s.
    /// - An HTTP/1 upgrade (WebSocket) is served as usual; its connection
    ///   no longer moves as HTTP. A WebSocket made with
    ///   [`websocket::upgrade`](crate::websocket::upgrade) moves by its
    ///   own means ([`websocket`](Self::websocket)).
    ///
    /// Off, this generation neither hands nor takes connections: every
    /// connection gets the lame-duck drain, and a WebSocket is closed with
    /// 1012 (Service Restart) when the drain starts.
    pub fn migrate(mut self, on: bool) -> Self {
        self.migrate = on;
        self.declare();
        self
    }

    /// Serves the WebSocket connections the predecessor hands over
    /// ([`websocket::hand_over`](crate::websocket::hand_over)) with
    /// `handler`, given the connection and its payload; and says, at the
    /// ready message, that this generation takes them. Without it, the
    /// predecessor closes its WebSocket connections with 1012 (Service
    /// Restart) and their clients reconnect.
    ///
    /// The handler serves the connection as the one that accepted it does
    /// (typically the same function, with the state the payload carries).
    #[cfg(feature = "websocket")]
    #[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
    pub fn websocket<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(crate::websocket::WebSocket, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.websocket = Some(Arc::new(move |ws, payload| Box::pin(handler(ws, payload))));
        self.declare();
        self
    }

    /// The HTTP/1 settings (hyper's builder). No timer is set, so hyper's
    /// `header_read_timeout` does not apply; set one
    /// (`hyper_util::rt::TokioTimer`) to bound slow clients, at some cost in
    /// tail latency. A connection must still send its first bytes within
    /// 30 s.
    pub fn http1(&mut self) -> &mut hyper::server::conn::http1::Builder {
        &mut self.http1
    }

    /// The HTTP/2 settings (hyper's builder).
    pub fn http2(&mut self) -> &mut hyper::server::conn::http2::Builder<TokioExecutor> {
        &mut self.http2
    }

    /// Serves `service` — a tower service such as an axum `Router` — until
    /// the drain has ended; returns how it ended. Accepting stops as soon as
    /// an upgrade commits (the successor accepts from then on), or when the
    /// drain starts.
    ///
    /// Errors only if a listener cannot be registered with tokio.
    pub async fn serve<S, B>(self, service: S) -> io::Result<DrainReport>
    where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.serve_hyper(TowerToHyperService::new(service)).await
    }

    /// [`serve`](Self::serve) for a hyper service (`hyper::service::service_fn`).
    pub async fn serve_hyper<S, B>(self, service: S) -> io::Result<DrainReport>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listeners = self
            .listeners
            .into_iter()
            .map(Listener::into_tokio)
            .collect::<io::Result<Vec<_>>>()?;
        let (passed, deadline) = watch::channel(false);
        let migrate = self.handover.clone().filter(|_| self.migrate);
        #[cfg(feature = "websocket")]
        let ws = Some(crate::websocket::Served::new(
            self.drain.clone(),
            migrate.clone(),
            deadline.clone(),
            self.websocket.clone(),
        ));
        #[cfg(not(feature = "websocket"))]
        let ws = conn::WsContext;
        let shared = Arc::new(Shared {
            drain: self.drain.clone(),
            deadline,
            http1: self.http1,
            http2: self.http2,
            migrate,
            canary: self.handover.as_ref().map(Handover::canary),
            handover: self.handover.clone(),
            #[cfg(feature = "tls")]
            tls: self.tls,
            ws,
            moving: std::sync::atomic::AtomicBool::new(false),
        });
        let mut loops = tokio::task::JoinSet::new();
        if let Some(handover) = &shared.migrate {
            // Counted until the predecessor is done handing over: a drain
            // here meanwhile hands the late ones on rather than losing them.
            let guard = shared.drain.guard();
            tokio::spawn(take_over(
                handover.clone(),
                service.clone(),
                shared.clone(),
                guard,
            ));
        }
        for listener in listeners {
            loops.spawn(accept_loop(listener, service.clone(), shared.clone()));
        }
        // Each loop returns (dropping its listener) at the commit or when the
        // drain starts; the drain is timed from its start.
        while loops.join_next().await.is_some() {}
        self.drain.draining().await;
        let report = self.drain.wait(self.drain_timeout).await;
        let _ = passed.send(true);
        Ok(report)
    }
}

async fn accept_loop<S, B>(listener: Accepting, service: S, shared: Arc<Shared>)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut backoff = AcceptBackoff::new();
    let drain = shared.drain.clone();
    // Accepting ends when the drain starts, or already at the commit: the
    // successor accepts from then on, and the drain follows once the caller
    // of `upgrade` has run.
    let handover = shared.handover.clone();
    let draining = async {
        match &handover {
            Some(h) => tokio::select! {
                _ = drain.draining() => {}
                _ = h.handed_over() => {}
            },
            None => drain.draining().await,
        }
    };
    tokio::pin!(draining);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut draining => break,
            accepted = super::canary::paced(shared.canary.as_ref(), accept(&listener)) => accepted,
        };
        match accepted {
            Ok(stream) => {
                backoff.reset();
                match stream {
                    Stream::Tcp(s) => {
                        no_delay(&s);
                        spawn(s, &service, &shared)
                    }
                    Stream::Unix(s) => spawn(s, &service, &shared),
                }
            }
            Err(e) => tokio::select! {
                _ = &mut draining => break,
                _ = backoff.wait(&e) => {}
            },
        }
    }
    if drain.is_stop() {
        // No successor: what is queued now would be reset when the socket
        // closes with this listener. Take it, and serve it.
        take_queued(&listener, &service, &shared);
    }
}

/// The most connections a stop takes from one listener's queue
/// (`net.core.somaxconn` is at most 65535).
const MAX_TAKEN: usize = 65_536;

/// Accepts, without waiting, every connection queued on `listener` (until
/// `EAGAIN`), and serves each.
///
/// The accepts are made directly on the socket, not through tokio, whose
/// readiness may not have seen the latest arrivals yet. Bounded: at most
/// [`MAX_TAKEN`] (the largest backlog Linux allows), and an error
/// (`EMFILE`) ends it.
fn take_queued<S, B>(listener: &Accepting, service: &S, shared: &Arc<Shared>)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use std::os::fd::AsFd;
    let fd = match listener {
        Accepting::Tcp(l) => l.as_fd(),
        Accepting::Unix(l) => l.as_fd(),
    };
    let mut taken = 0usize;
    for _ in 0..MAX_TAKEN {
        // socket2 accepts with SOCK_CLOEXEC; the connection is made
        // non-blocking for tokio (accept4 does not pass O_NONBLOCK on).
        let accepted = socket2::SockRef::from(&fd).accept().and_then(|(s, _)| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let socket = match accepted {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, taken, "cannot take the queued connections; the rest are reset");
                break;
            }
        };
        let served = match listener {
            Accepting::Tcp(_) => tokio::net::TcpStream::from_std(socket.into()).map(|s| {
                no_delay(&s);
                spawn(s, service, shared)
            }),
            Accepting::Unix(_) => {
                tokio::net::UnixStream::from_std(socket.into()).map(|s| spawn(s, service, shared))
            }
        };
        match served {
            Ok(()) => taken += 1,
            Err(e) => tracing::warn!(error = %e, "a queued connection could not be served"),
        }
    }
    if taken > 0 {
        tracing::debug!(taken, "took the connections queued at the stop");
    }
}

/// Serves the connections the predecessor hands over, until it is done.
async fn take_over<S, B>(handover: Handover, service: S, shared: Arc<Shared>, _guard: DrainGuard)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut incoming = match handover.incoming_for_server() {
        Ok(incoming) => incoming,
        Err(e) => return tracing::warn!(error = %e, "not taking connections"),
    };
    while let Some(item) = incoming.recv().await {
        let connection = match item {
            Ok(Migrated::Connection(c)) => c,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "a handed-over connection was lost");
                continue;
            }
        };
        #[cfg(feature = "websocket")]
        if crate::websocket::is_websocket(connection.payload()) {
            if let Some(ws) = &shared.ws {
                let guard = shared.drain.guard();
                let served = crate::websocket::serve_resumed(connection, ws.clone(), guard);
                tokio::spawn(served);
            }
            continue;
        }
        let stream = connection
            .into_tcp()
            .map_err(io::Error::other)
            .and_then(|(s, unread)| Ok((tokio::net::TcpStream::from_std(s)?, unread)));
        match stream {
            Ok((stream, unread)) => {
                let guard = shared.drain.guard();
                let (service, shared) = (service.clone(), shared.clone());
                let unread = bytes::Bytes::from(unread);
                tokio::spawn(conn::serve_migrated(stream, unread, service, shared, guard));
            }
            Err(e) => tracing::warn!(error = %e, "a handed-over connection could not be used"),
        }
    }
}

/// An accepted connection.
enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Accepting) -> io::Result<Stream> {
    Ok(match listener {
        Accepting::Tcp(l) => Stream::Tcp(l.accept().await?.0),
        Accepting::Unix(l) => Stream::Unix(l.accept().await?.0),
    })
}

/// `TCP_NODELAY` on an accepted connection: a response goes out as soon as
/// hyper writes it, never held for the client's delayed ACK (up to 40 ms)
/// behind an unacknowledged one. Measured under keep-alive load with
/// upgrades (wrk c=64, 20 upgrades): p99.9 14–24 ms without it, 5 ms with
/// it. The option stays with the socket when it moves.
fn no_delay(s: &tokio::net::TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY");
    }
}

fn spawn<T, S, B>(io: T, service: &S, shared: &Arc<Shared>)
where
    T: conn::Socket,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Counted from the accept: a connection whose request is not read yet
    // is in flight too.
    let guard = shared.drain.guard();
    #[cfg(feature = "tls")]
    if let Some(tls) = &shared.tls {
        // The handshake in the connection's task: accepting goes on.
        let (tls, service, shared) = (tls.clone(), service.clone(), shared.clone());
        tokio::spawn(super::tls::serve(tls, io, service, shared, guard));
        return;
    }
    tokio::spawn(conn::serve(io, service.clone(), shared.clone(), guard));
}
