//! One HTTP connection: which protocol, served how, and what the drain does
//! to it.
//!
//! The protocol is told from the first bytes, as hyper-util's auto builder
//! does (the HTTP/2 connection preface, else HTTP/1.1), but by this module,
//! so that each protocol keeps its own hyper connection type:
//! - the auto builder's `graceful_shutdown` closes a connection whose first
//!   bytes are not read yet, which drops a request the client already sent;
//! - an HTTP/1.1 connection is a `hyper::server::conn::http1::Connection`,
//!   which can be finished with `without_shutdown()`: that returns the
//!   socket (inside [`Rewind`]) and the bytes hyper read ahead, which is what
//!   handing a connection to the successor needs.
//!
//! # Migration (HTTP/1.1, TCP, on by default)
//!
//! With [`Server::migrate`](super::Server::migrate) on, an HTTP/1.1
//! connection is served by `http1::Connection` driven with
//! `poll_without_shutdown`. When the drain starts after a committed upgrade,
//! the connection is shut down gracefully (`graceful_shutdown`, which makes
//! hyper stop after the response in flight) only once no request is
//! between the service call and its response head: hyper adds
//! `Connection: close` to a head it writes after that call, and the client
//! must never be told to leave. A response made while handing over pauses
//! its body once, right after its head is written, so that this happens
//! before hyper goes on to a pipelined request it already read (it would
//! answer it in the same poll). hyper then stops without closing the socket;
//! the socket and the bytes it had read but not parsed (pipelined requests,
//! a partial head; `Parts::read_buf`, then what [`Rewind`] still held) go
//! to the successor ([`Handover::send_connection`]), which serves them
//! first. A connection the successor does not take comes back and is
//! served as a lame duck; so is every connection, at once, when the
//! successor said at its ready message that it takes no HTTP/1.1
//! connections.
//!
//! An HTTP/1 upgrade request (WebSocket) makes the connection hyper's
//! `UpgradeableConnection` before its response is written (its service
//! future yields once, so that the connection task converts it first):
//! hyper hands the upgraded socket to the service as usual, and the
//! connection no longer migrates as HTTP (a WebSocket moves by its own
//! means, `websocket::hand_over`).
//!
//! # A stop
//!
//! With no successor there is nobody to leave an idle connection to, and
//! one idle keep-alive client (a proxy's pool) would hold the process until
//! the drain deadline. So when the drain is a stop
//! ([`Drain::start_stop`]), an HTTP/1.1 connection that is idle — no request
//! between its first byte and the end of its response body, nothing read
//! ahead — is closed (hyper's `graceful_shutdown`, which also finishes a
//! request that came in just then, with `Connection: close`). Idle means
//! quiet for [`STOP_IDLE_GRACE`] too: a client in the middle of a run of
//! requests sends its next one within that, gets its answer with
//! `Connection: close`, and leaves, instead of having its request — sent as
//! the connection closed — fail. A connection accepted before the stop
//! that sent nothing within the grace is closed alike. HTTP/2 keeps its
//! GOAWAY.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Body;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::canary::Counted;
use crate::drain::{Drain, DrainGuard};
use crate::handover::Handover;
use crate::lifecycle::State;

/// What an upgrade request carries to `websocket::upgrade`: the serving
/// layer's drain, handover and deadline.
#[cfg(feature = "websocket")]
pub(crate) type WsContext = Option<crate::websocket::Served>;
#[cfg(not(feature = "websocket"))]
#[derive(Clone)]
pub(crate) struct WsContext;

/// Puts the serving layer's context into an upgrade request.
#[cfg(feature = "websocket")]
fn tag(req: &mut Request<Incoming>, ws: &WsContext) {
    if let Some(ws) = ws {
        if req.headers().contains_key(hyper::header::UPGRADE) {
            req.extensions_mut().insert(ws.clone());
        }
    }
}
#[cfg(not(feature = "websocket"))]
fn tag(_: &mut Request<Incoming>, _: &WsContext) {}

/// A request that asks to switch protocols (WebSocket, say).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(hyper::header::UPGRADE) || req.method() == hyper::Method::CONNECT
}

/// Whether a connection of the migrating kind goes to the successor now:
/// the upgrade committed, and the successor takes HTTP/1.1 connections.
fn moves(h: &Handover) -> bool {
    h.state() == State::HandedOver && h.successor_takes(crate::migrate::HTTP1)
}

/// A stream the server serves: whether it can be handed to a successor.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// TCP connections migrate; Unix ones keep the lame-duck drain.
    const MIGRATES: bool;
    /// The socket off this process's reactor, to hand over.
    fn into_fd(self) -> io::Result<OwnedFd>;
    /// A socket given back (not taken by the successor), on the reactor again.
    fn from_fd(fd: OwnedFd) -> io::Result<Self>;
    /// Resolves once the socket may be read (tokio's readiness); at once
    /// where that is not known.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        std::future::ready(Ok(()))
    }
}

impl Socket for tokio::net::TcpStream {
    const MIGRATES: bool = true;
    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        tokio::net::TcpStream::from_std(fd.into())
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        tokio::net::TcpStream::readable(self)
    }
}

impl Socket for tokio::net::UnixStream {
    const MIGRATES: bool = false;
    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        tokio::net::UnixStream::from_std(fd.into())
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        tokio::net::UnixStream::readable(self)
    }
}

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a new connection may take to send its first bytes (hyper's
/// default `header_read_timeout` for HTTP/1).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an idle HTTP/1.1 connection must have been quiet (nothing read,
/// no response ending) before a stop closes it: long enough for a client
/// in a run of requests to send its next one (it is answered, with
/// `Connection: close`), short beside any drain timeout.
pub(crate) const STOP_IDLE_GRACE: Duration = Duration::from_millis(100);

/// The first read: large enough for a whole typical request, so that HTTP/1
/// needs no second read for it.
const FIRST_READ: usize = 2048;

/// What every connection of one [`Server`](super::Server) shares.
pub(crate) struct Shared {
    pub(crate) drain: Drain,
    /// Becomes true at the drain deadline: every connection still open is
    /// closed.
    pub(crate) deadline: watch::Receiver<bool>,
    pub(crate) http1: hyper::server::conn::http1::Builder,
    pub(crate) http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// Migration on: the handover whose successor takes HTTP/1.1
    /// connections.
    pub(crate) migrate: Option<Handover>,
    /// The handover served, if known: accepting stops at its commit.
    pub(crate) handover: Option<Handover>,
    /// Its canary counts (see `serve::canary`).
    pub(crate) canary: Option<crate::canary::Recorder>,
    /// TLS on every connection (see `tls`).
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// What upgrade requests carry (feature `websocket`).
    pub(crate) ws: WsContext,
    /// [`moves`] was once true: it stays so (a generation handed over
    /// stays handed over), and 10,000 connections finishing at once need
    /// not take the generation's lock twice each to learn it.
    pub(crate) moving: AtomicBool,
}

impl Shared {
    /// Counts a failed connection for the canary judgement.
    fn failed(&self, e: &hyper::Error) {
        super::canary::connection_failed(self.canary.as_ref(), e);
    }

    /// [`moves`], remembered once true.
    fn moves(&self, h: &Handover) -> bool {
        if self.moving.load(Ordering::Relaxed) {
            return true;
        }
        let now = moves(h);
        if now {
            self.moving.store(true, Ordering::Relaxed);
        }
        now
    }
}

/// What one connection is doing, as far as a stop needs to know whether
/// it is idle. Touched by its reads ([`Rewind`]) and its requests
/// ([`Activity::open`]), all in the connection's own task.
#[derive(Debug)]
pub(crate) struct Activity {
    born: Instant,
    /// Requests called whose response body has not ended (or been dropped).
    open: AtomicUsize,
    /// Bytes were read while no request was open: a request is arriving
    /// (its head not complete yet, or not parsed yet).
    arriving: AtomicBool,
    /// When a byte was last read or a response last ended, in µs since
    /// `born`.
    last_us: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            born: Instant::now(),
            open: AtomicUsize::new(0),
            arriving: AtomicBool::new(false),
            last_us: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let us = self.born.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.last_us.store(us, Ordering::Relaxed);
    }

    /// Bytes came in.
    fn read(&self) {
        self.touch();
        if self.open.load(Ordering::Relaxed) == 0 {
            self.arriving.store(true, Ordering::Relaxed);
        }
    }

    /// A request was called: open until the guard (moved into its
    /// response body) is dropped.
    fn open(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.arriving.store(false, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// `None` if the connection is idle and has been quiet for `grace`;
    /// else how long to wait before looking again.
    fn idle_after(&self, grace: Duration) -> Option<Duration> {
        if self.open.load(Ordering::Relaxed) > 0 || self.arriving.load(Ordering::Relaxed) {
            return Some(grace);
        }
        let last = Duration::from_micros(self.last_us.load(Ordering::Relaxed));
        let quiet = self.born.elapsed().saturating_sub(last);
        grace.checked_sub(quiet).filter(|left| !left.is_zero())
    }

    /// Resolves once `drain` is a stop and the connection is idle and quiet
    /// (see the module documentation); never otherwise.
    pub(crate) async fn idle_at_stop(&self, drain: &Drain) {
        drain.stopping().await;
        while let Some(wait) = self.idle_after(STOP_IDLE_GRACE) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request in flight, from its call until its response body is done.
#[derive(Debug)]
pub(crate) struct OpenGuard(Arc<Activity>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream with bytes put back in front of it: the bytes read to tell the
/// protocol, read again by hyper. Reads from the stream are reported to
/// its [`Activity`].
#[derive(Debug)]
pub(crate) struct Rewind<T> {
    pre: Bytes,
    inner: T,
    activity: Option<Arc<Activity>>,
}

impl<T> Rewind<T> {
    /// `inner`, with `pre` to be read first; its reads reported to
    /// `activity` (bytes in `pre` count as read now).
    pub(crate) fn new(pre: Bytes, inner: T, activity: Option<Arc<Activity>>) -> Self {
        if let (false, Some(a)) = (pre.is_empty(), &activity) {
            a.read();
        }
        Rewind {
            pre,
            inner,
            activity,
        }
    }

    /// The stream, and the bytes put back that were not read again yet.
    pub(crate) fn into_inner(self) -> (T, Bytes) {
        (self.inner, self.pre)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(a)) = (&polled, &self.activity) {
            if buf.filled().len() > before {
                a.read();
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// Reads until the first bytes tell the protocol: the whole HTTP/2 preface,
/// or a byte that differs from it. `None`: the peer closed first. Reads are
/// reported to `activity`, which the returned stream keeps.
pub(crate) async fn detect<T: AsyncRead + Unpin>(
    mut io: T,
    activity: Option<Arc<Activity>>,
) -> io::Result<Option<(Protocol, Rewind<T>)>> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let protocol = loop {
        let n = io.read_buf(&mut buf).await?;
        if let (true, Some(a)) = (n > 0, &activity) {
            a.read();
        }
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            // Closed after a partial request: let HTTP/1 answer it (400).
            break Protocol::Http1;
        }
        let n = buf.len().min(PREFACE.len());
        if buf[..n] != PREFACE[..n] {
            break Protocol::Http1;
        }
        if n == PREFACE.len() {
            break Protocol::Http2;
        }
    };
    let pre = buf.freeze();
    Ok(Some((
        protocol,
        Rewind {
            pre,
            inner: io,
            activity,
        },
    )))
}

/// Serves one accepted connection, counted in the drain by `guard`, until
/// it ends or the drain deadline passes.
pub(crate) async fn serve<T, S, B>(io: T, service: S, shared: Arc<Shared>, guard: DrainGuard)
where
    T: Socket,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut deadline = shared.deadline.clone();
    let activity = Activity::new();
    let service = Counted::new(service, shared.canary.clone());
    // Taken by a connection handed over: it counts until the successor
    // took it.
    let mut guard = Some(guard);
    let connection = async {
        // A connection accepted before the drain started is served even if
        // nothing has been read from it yet: its request may be on the way.
        // At a stop, one that stays quiet is closed.
        let first = tokio::time::timeout(FIRST_BYTES_TIMEOUT, detect(io, Some(activity.clone())));
        let detected = tokio::select! {
            detected = first => detected,
            _ = activity.idle_at_stop(&shared.drain) => {
                tracing::debug!("connection sent nothing; closed at the stop");
                return;
            }
        };
        let (protocol, io) = match detected {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection failed before its first request");
                return;
            }
            Err(_) => {
                tracing::debug!("connection sent nothing within 30 s");
                return;
            }
        };
        match protocol {
            Protocol::Http1 => http1(io, service, &shared, &activity, &mut guard).await,
            Protocol::Http2 => http2(io, service, &shared).await,
        }
    };
    tokio::select! {
        _ = connection => {}
        _ = deadline.wait_for(|passed| *passed) => {}
    }
    drop(guard);
}

/// Serves a connection the predecessor handed over: HTTP/1.1, with the
/// bytes it had read ahead (`pre`) read first.
pub(crate) async fn serve_migrated<T, S, B>(
    io: T,
    pre: Bytes,
    service: S,
    shared: Arc<Shared>,
    guard: DrainGuard,
) where
    T: Socket,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut deadline = shared.deadline.clone();
    let mut guard = Some(guard);
    let connection = async {
        if pre.is_empty() {
            // Idle: nothing is set up for it (hyper's buffers) until its
            // next request arrives, or this generation drains.
            tokio::select! {
                _ = io.readable() => {}
                _ = shared.drain.draining() => {}
            }
        }
        let activity = Activity::new();
        let service = Counted::new(service, shared.canary.clone());
        let io = Rewind::new(pre, io, Some(activity.clone()));
        // Boxed: the task of an idle connection stays small (10,000 moved
        // at once would otherwise each reserve hyper's whole state).
        Box::pin(http1(io, service, &shared, &activity, &mut guard)).await
    };
    tokio::select! {
        _ = connection => {}
        _ = deadline.wait_for(|passed| *passed) => {}
    }
    drop(guard);
}

/// HTTP/1.1, lame duck: nothing is closed on the client. A response made
/// while draining says `Connection: close`, so hyper closes the connection
/// after writing it; the request in flight finishes, and the next request
/// on a keep-alive connection is answered (and told to go elsewhere). An
/// idle connection stays open until its next request or the drain
/// deadline: closing it could race a request already on the wire — except
/// at a stop, where there is nobody else to answer that request: an idle,
/// quiet connection is closed then (see the module documentation).
async fn http1<T, S, B>(
    io: Rewind<T>,
    service: S,
    shared: &Arc<Shared>,
    activity: &Arc<Activity>,
    guard: &mut Option<DrainGuard>,
) where
    T: Socket,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let (true, Some(handover)) = (T::MIGRATES, &shared.migrate) {
        return http1_migrating(io, service, shared, handover, activity, guard).await;
    }
    let service = LameDuck {
        inner: service,
        drain: shared.drain.clone(),
        activity: activity.clone(),
        ws: shared.ws.clone(),
    };
    // `with_upgrades()` keeps WebSocket and other upgrades working.
    let connection = shared
        .http1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = activity.idle_at_stop(&shared.drain) => {
            // Idle: hyper closes it now; a request that came in just now is
            // finished first, with `Connection: close`.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        shared.failed(&e);
        tracing::debug!(error = %e, "HTTP/1 connection failed");
    }
}

/// HTTP/1.1 with migration: served as [`http1`] does until the drain
/// starts after a committed upgrade, then finished after the response in
/// flight and handed to the successor with the bytes read ahead. Given
/// back (not taken), it is served on as a lame duck. A drain that is a stop
/// is the lame-duck drain, and an idle connection is closed then (see the
/// module documentation): finished as for a handover, it is dropped if
/// nothing was read ahead, and served on as a lame duck if something was.
///
/// An HTTP/1 upgrade request (WebSocket) turns the connection into hyper's
/// `UpgradeableConnection` before its response (see the module
/// documentation): it is served as [`http1`] serves, and no longer moves.
async fn http1_migrating<T, S, B>(
    io: Rewind<T>,
    service: S,
    shared: &Arc<Shared>,
    handover: &Handover,
    activity: &Arc<Activity>,
    guard: &mut Option<DrainGuard>,
) where
    T: Socket,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let busy = Arc::new(AtomicBool::new(false));
    let upgrading = Arc::new(AtomicBool::new(false));
    let service = Handing {
        inner: Box::new(service),
        drain: shared.drain.clone(),
        handover: Some(handover.clone()),
        busy: busy.clone(),
        activity: activity.clone(),
        upgrading: upgrading.clone(),
        ws: shared.ws.clone(),
    };
    let mut connection = shared.http1.serve_connection(TokioIo::new(io), service);
    let draining = shared.drain.draining();
    tokio::pin!(draining);
    let idle_at_stop = activity.idle_at_stop(&shared.drain);
    tokio::pin!(idle_at_stop);
    let (mut drained, mut stopped, mut finishing) = (false, false, false);
    // Whether the connection was polled once since the drain started.
    let mut looked = false;
    // The moment to finish: draining after a commit, and no request
    // between its service call and its response head (the head of a
    // response is written in the same poll that resolves its future); or
    // idle at a stop.
    let ready_to_finish = |drained: bool, stopped: bool| {
        stopped || drained && !busy.load(Ordering::Acquire) && shared.moves(handover)
    };
    let result = std::future::poll_fn(|cx| {
        if !drained && draining.as_mut().poll(cx).is_ready() {
            drained = true;
        }
        if !stopped && idle_at_stop.as_mut().poll(cx).is_ready() {
            stopped = true;
        }
        if drained && !looked && !stopped {
            // A request already in the socket when the drain starts is
            // answered here: moving it would only add the hop to the
            // successor to its time (hyper reads it and calls the service,
            // which makes the connection busy until the response).
            looked = true;
            let polled = connection.poll_without_shutdown(cx);
            if polled.is_ready() {
                return polled.map(Some);
            }
            if upgrading.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
        }
        for _ in 0..2 {
            if !finishing && ready_to_finish(drained, stopped) {
                // Idle: hyper stops now (a partial head stays in its read
                // buffer). A body still being written: after it.
                Pin::new(&mut connection).graceful_shutdown();
                finishing = true;
            }
            let polled = connection.poll_without_shutdown(cx);
            if polled.is_pending() && !finishing && upgrading.load(Ordering::Acquire) {
                // Before the upgrade's response is written (its future
                // yields once): hyper hands the socket over from now on.
                return Poll::Ready(None);
            }
            if polled.is_ready() || finishing || !ready_to_finish(drained, stopped) {
                return polled.map(Some);
            }
        }
        Poll::Pending // unreachable: the second round finished or returned
    })
    .await;
    let Some(result) = result else {
        let connection = connection.with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = activity.idle_at_stop(&shared.drain) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP/1 connection failed");
        }
        return;
    };
    if let Err(e) = result {
        shared.failed(&e);
        tracing::debug!(error = %e, "HTTP/1 connection failed");
        return;
    }
    if !finishing {
        return; // the client closed it, or asked to
    }
    let parts = connection.into_parts();
    let (socket, pre) = parts.io.into_inner().into_inner();
    // What hyper read but did not parse, then what it had not read yet of
    // the bytes put back (nothing, for an idle connection: no allocation).
    let unread = [parts.read_buf, pre].concat();
    if stopped {
        if unread.is_empty() {
            return; // idle at a stop: closed
        }
        // Read ahead just then: answered, with `Connection: close`.
        let io = Rewind::new(unread.into(), socket, Some(activity.clone()));
        return lame_duck(io, parts.service, shared).await;
    }
    let fd = match socket.into_fd() {
        Ok(fd) => fd,
        Err(e) => return tracing::debug!(error = %e, "taking a connection off the reactor"),
    };
    let sender = match handover.connection_sender() {
        Ok(sender) => sender,
        Err(e) => {
            tracing::debug!(error = %e, "an HTTP/1 connection stays (lame duck)");
            return given_back::<T, S, B>(fd, unread, parts.service, shared, activity).await;
        }
    };
    // This task ends once the connection is queued; the writer settles it
    // when the successor answers: the drain counts it until then, and a
    // connection given back is served on in a task of its own.
    let guard = guard.take();
    let (service, shared, activity) = (parts.service, shared.clone(), activity.clone());
    let then = move |result: Result<(), crate::migrate::SendError>| {
        let e = match result {
            Ok(()) => return drop(guard), // the successor serves it now
            Err(e) => e,
        };
        tracing::debug!(error = %e, "an HTTP/1 connection stays (lame duck)");
        let Some((fd, unread)) = e.into_connection() else {
            return drop(guard); // shut down at the deadline
        };
        tokio::spawn(async move {
            let mut deadline = shared.deadline.clone();
            tokio::select! {
                _ = given_back::<T, S, B>(fd, unread, service, &shared, &activity) => {}
                _ = deadline.wait_for(|passed| *passed) => {}
            }
            drop(guard);
        });
    };
    sender.send_then(fd, unread, Box::new(then)).await;
}

/// Serves on, as a lame duck, a connection given back (not taken by the
/// successor), with the bytes it had read ahead.
async fn given_back<T, S, B>(
    fd: OwnedFd,
    unread: Vec<u8>,
    service: Handing<S>,
    shared: &Shared,
    activity: &Arc<Activity>,
) where
    T: Socket,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = match T::from_fd(fd) {
        Ok(io) => Rewind::new(Bytes::from(unread), io, Some(activity.clone())),
        Err(e) => return tracing::debug!(error = %e, "a connection given back"),
    };
    lame_duck(io, service, shared).await;
}

/// Serves on, as a lame duck, a connection that was not handed over.
async fn lame_duck<T, S, B>(io: Rewind<T>, mut service: Handing<S>, shared: &Shared)
where
    T: Socket,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    service.handover = None; // lame duck from now on
    let connection = shared
        .http1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        shared.failed(&e);
        tracing::debug!(error = %e, "HTTP/1 connection failed");
    }
}

/// The service of a connection that may be handed over.
///
/// - `busy` is true from a request's call until its response is made;
/// - a response made while draining gets `Connection: close`, unless the
///   connection is to be handed over (`handover` set and the upgrade
///   committed): then its body pauses once, right after hyper wrote the
///   head, so that the connection task gets control before hyper could go
///   on to a pipelined request it already read (it would otherwise answer
///   it in the same poll), and makes hyper stop after this response;
/// - hyper writes `Connection: close` on a response whose head it writes
///   after `graceful_shutdown`: so that is called only while no request is
///   busy.
struct Handing<S> {
    inner: Box<S>,
    drain: Drain,
    handover: Option<Handover>,
    busy: Arc<AtomicBool>,
    activity: Arc<Activity>,
    /// An upgrade request was called: the connection becomes hyper's
    /// upgradeable one, and is served as a lame duck from then on.
    upgrading: Arc<AtomicBool>,
    ws: WsContext,
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<PauseOnce<B>>, E>> + Send>>;

impl<S, B> Service<Request<Incoming>> for Handing<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: 'static,
    S::Error: 'static,
{
    type Response = Response<PauseOnce<B>>;
    type Error = S::Error;
    type Future = BoxedResponse<B, S::Error>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.busy.store(true, Ordering::Release);
        let open = self.activity.open();
        let upgrade = is_upgrade(&req);
        if upgrade {
            self.upgrading.store(true, Ordering::Release);
        }
        tag(&mut req, &self.ws);
        let inner = self.inner.call(req);
        let (drain, busy) = (self.drain.clone(), self.busy.clone());
        let handover = self.handover.clone();
        let upgrading = self.upgrading.clone();
        Box::pin(async move {
            if upgrade {
                // The connection task gets control before hyper writes the
                // response, to make the connection an upgradeable one.
                tokio::task::yield_now().await;
            }
            let result = inner.await;
            let hand_over =
                || !upgrading.load(Ordering::Acquire) && handover.as_ref().is_some_and(moves);
            let draining = drain.is_draining();
            let pause = draining && hand_over();
            let result = result.map(|response| {
                let mut response = response.map(|body| PauseOnce {
                    body,
                    pause,
                    _open: Some(open),
                });
                if draining && !pause && !switching(&response) {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response
            });
            busy.store(false, Ordering::Release);
            result
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that, when `pause` is set, answers its first poll
    /// with `Pending` (waking its task at once); and that holds its
    /// request open (see [`Activity`]) until hyper is done with it.
    pub(crate) struct PauseOnce<B> {
        #[pin]
        body: B,
        pause: bool,
        _open: Option<OpenGuard>,
    }
}

impl<B: Body> Body for PauseOnce<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if std::mem::take(this.pause) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        // Never "ended" before the pause: hyper would not poll it.
        !self.pause && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// HTTP/2: when the drain starts, a graceful GOAWAY (two-phase: streams the
/// client sent before it saw the GOAWAY are still served), so the client
/// opens its next streams on a new connection — to the successor. A
/// connection still in its handshake is shut down right after it (hyper
/// keeps the shutdown pending).
async fn http2<T, S, B>(io: Rewind<T>, service: S, shared: &Shared)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = shared.http2.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shared.drain.draining() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        shared.failed(&e);
        tracing::debug!(error = %e, "HTTP/2 connection failed");
    }
}

/// A `101 Switching Protocols`: its `Connection: upgrade` must stay.
fn switching<B>(response: &Response<B>) -> bool {
    response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS
}

/// Adds `Connection: close` to HTTP/1 responses made while draining, and
/// counts each request as open in the connection's [`Activity`] until its
/// response body is done.
#[derive(Clone)]
struct LameDuck<S> {
    inner: S,
    drain: Drain,
    activity: Arc<Activity>,
    ws: WsContext,
}

impl<S, B> Service<Request<Incoming>> for LameDuck<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<PauseOnce<B>>;
    type Error = S::Error;
    type Future = LameDuckFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let open = self.activity.open();
        tag(&mut req, &self.ws);
        LameDuckFuture {
            inner: self.inner.call(req),
            drain: self.drain.clone(),
            open: Some(open),
        }
    }
}

pin_project_lite::pin_project! {
    struct LameDuckFuture<F> {
        #[pin]
        inner: F,
        drain: Drain,
        open: Option<OpenGuard>,
    }
}

impl<F, B, E> Future for LameDuckFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<PauseOnce<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let open = this.open.take();
        Poll::Ready(result.map(|response| {
            let mut response = response.map(|body| PauseOnce {
                body,
                pause: false,
                _open: open,
            });
            if this.drain.is_draining() && !switching(&response) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn detected(input: &[u8]) -> Option<(Protocol, Vec<u8>)> {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(input).await.unwrap();
        drop(client);
        let (p, mut io) = detect(server, None).await.unwrap()?;
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        Some((p, all))
    }

    /// A runtime without an I/O driver: it opens no fd (unit tests in
    /// src/migrate count this process's fds).
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn tells_http2_by_its_preface_and_replays_every_byte() {
        block_on(tells_http2_by_its_preface());
    }

    async fn tells_http2_by_its_preface() {
        let mut h2 = PREFACE.to_vec();
        h2.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        assert_eq!(detected(&h2).await, Some((Protocol::Http2, h2.clone())));
        let h1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(detected(&h1).await, Some((Protocol::Http1, h1.clone())));
        // The first bytes of the preface, then something else.
        let p = b"PRI * HTTP/1.1\r\n".to_vec();
        assert_eq!(detected(&p).await, Some((Protocol::Http1, p.clone())));
        assert_eq!(
            detected(b"PRI").await,
            Some((Protocol::Http1, b"PRI".to_vec()))
        );
        assert_eq!(detected(b"").await, None);
    }
}
