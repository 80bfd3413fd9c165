//! [`Socket`]: the stream under tungstenite that never gives it a byte past
//! the frame it reads, so that between two messages tungstenite holds
//! nothing and the socket can leave with the bytes read ahead.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::Ctx;
use super::frames::{self, HeadEnd, Messages};

/// How much one read from the socket asks for.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// Frames up to this length are handed whole (read ahead until complete);
/// longer ones are passed through as they arrive, straight into
/// tungstenite's buffer.
pub(super) const WHOLE_MAX: usize = 16 * 1024;
/// The most bytes read ahead a connection can hold when it leaves: a
/// partial frame shorter than [`WHOLE_MAX`] and one read.
pub(super) const MAX_READ_AHEAD: usize = WHOLE_MAX + READ_CHUNK;

/// What the connection runs on.
pub(super) enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A stream the serving layer does not know (another server's
    /// upgrade): served, never moved.
    Other(TokioIo<hyper::upgrade::Upgraded>),
}

macro_rules! each {
    ($io:expr, $s:ident => $e:expr) => {
        match $io {
            Io::Tcp($s) => $e,
            Io::Unix($s) => $e,
            Io::Other($s) => $e,
        }
    };
}

/// Shared by a [`Socket`] and the futures of its
/// [`leaving`](Socket::leaving).
#[derive(Debug, Default)]
pub(super) struct Flags {
    /// The generation is leaving: hand tungstenite no new message.
    pub(super) pause: AtomicBool,
    /// Tungstenite holds nothing: it asked for bytes and got none, and no
    /// message it was given is incomplete.
    pub(super) at_boundary: AtomicBool,
    /// Woken when `at_boundary` becomes true while paused.
    pub(super) changed: tokio::sync::Notify,
}

/// A WebSocket connection's stream, under tokio-tungstenite's
/// `WebSocketStream`: the TCP (or Unix) connection, with the bookkeeping
/// that lets it move to the successor between two messages.
///
/// It reads the socket ahead in chunks, but hands tungstenite only whole
/// frames (and a frame longer than 16 KiB as it arrives, never past its
/// end), so tungstenite never holds a byte that belongs to a message it
/// has not returned yet. Between two messages the connection is just the
/// socket and the bytes read ahead here: that is what goes to the
/// successor ([`hand_over`](super::hand_over)), whose tungstenite resumes
/// there.
///
/// Made by [`upgrade`](super::upgrade) (served by
/// [`serve::Server`](crate::serve::Server)), by [`Socket::new`] (a server
/// of your own), or by [`resume`](super::resume) in the successor.
pub struct Socket {
    io: Io,
    /// Read from the socket, not handed to tungstenite yet.
    buf: BytesMut,
    /// Bytes of the frame being passed through still to hand (0: the
    /// handed bytes end at a frame boundary).
    pass: u64,
    messages: Messages,
    /// Until the HTTP request head is handed (a handshake of the
    /// application's): the scan for its end.
    head: Option<HeadEnd>,
    pub(super) flags: Arc<Flags>,
    pub(super) ctx: Option<Arc<Ctx>>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let io = match &self.io {
            Io::Tcp(_) => "tcp",
            Io::Unix(_) => "unix",
            Io::Other(_) => "other",
        };
        f.debug_struct("Socket")
            .field("io", &io)
            .field("read_ahead", &self.buf.len())
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

impl Socket {
    /// A connection whose handshake was made (by the serving layer), with
    /// the bytes read past it.
    pub(super) fn after_handshake(io: Io, read_ahead: &[u8], ctx: Option<Arc<Ctx>>) -> Socket {
        let mut buf = BytesMut::with_capacity(read_ahead.len().max(READ_CHUNK));
        buf.extend_from_slice(read_ahead);
        Socket {
            io,
            buf,
            pass: 0,
            messages: Messages::default(),
            head: None,
            flags: Arc::default(),
            ctx,
        }
    }

    /// A connection before its handshake: the request head is handed
    /// first, and not a byte past it.
    pub(super) fn before_handshake(io: Io, ctx: Option<Arc<Ctx>>) -> Socket {
        let mut s = Socket::after_handshake(io, &[], ctx);
        s.head = Some(HeadEnd::default());
        s
    }

    /// Why it cannot leave now, if it cannot: `None` between two messages
    /// of a plain connection.
    pub(super) fn cannot_move(&self) -> Option<&'static str> {
        if matches!(self.io, Io::Other(_)) {
            Some("a stream the serving layer does not know (TLS, or another server)")
        } else if matches!(self.io, Io::Unix(_)) {
            Some("a Unix-socket connection (only TCP connections move, as for HTTP/1.1)")
        } else if self.head.is_some() {
            Some("the handshake is not over")
        } else if self.messages.extension {
            Some("an extension (compression) whose context lives in this process")
        } else if self.messages.closing {
            Some("the connection is closing")
        } else if self.pass > 0
            || self.messages.fragmented
            || !self.flags.at_boundary.load(Ordering::Acquire)
        {
            Some("in the middle of a message")
        } else {
            None
        }
    }

    /// Hands tungstenite everything again (after a leave that did not
    /// happen: to close).
    pub(super) fn resume_reading(&self) {
        self.flags.pause.store(false, Ordering::Release);
    }

    /// The socket, off this process's reactor, and the bytes read ahead.
    pub(super) fn into_fd(self) -> io::Result<(OwnedFd, BytesMut)> {
        let fd = match self.io {
            Io::Tcp(s) => OwnedFd::from(s.into_std()?),
            Io::Unix(s) => OwnedFd::from(s.into_std()?),
            Io::Other(_) => return Err(io::Error::other("not a socket of this process")),
        };
        Ok((fd, self.buf))
    }

    /// Notes that tungstenite asked for bytes and got none.
    fn wait_here(&self) {
        let boundary = self.pass == 0 && !self.messages.fragmented && self.head.is_none();
        self.flags.at_boundary.store(boundary, Ordering::Release);
        if boundary && self.flags.pause.load(Ordering::Acquire) {
            self.flags.changed.notify_waiters();
        }
    }

    /// How many bytes of `data` (which starts a frame) to hand tungstenite:
    /// whole frames — after leaving began, none past the end of the message
    /// being finished — or, first in line, a frame longer than
    /// [`WHOLE_MAX`] or than `room` (what tungstenite takes in one read)
    /// as far as it goes (passed through). Takes note of every frame
    /// handed.
    fn whole_frames(&mut self, data: &[u8], room: usize) -> usize {
        let paused = self.flags.pause.load(Ordering::Acquire);
        let mut end = 0usize;
        while let Some(h) = frames::header(&data[end..]) {
            let left = (data.len() - end) as u64;
            if h.len <= left {
                self.messages.handed(&h);
                end += h.len as usize; // at most `data.len()`
                if paused && !self.messages.fragmented {
                    break; // the message ended: nothing after it
                }
                continue;
            }
            if h.len > WHOLE_MAX as u64 || (end == 0 && h.len > room as u64) {
                // Too long to hand whole: through, as it arrives.
                self.messages.handed(&h);
                self.pass = h.len - left;
                end = data.len();
            }
            break;
        }
        end
    }

    /// Reads from the socket into `buf`: `Ok(0)` at its end.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        let spare = self.buf.spare_capacity_mut();
        let len = spare.len().min(READ_CHUNK);
        let mut rb = ReadBuf::uninit(&mut spare[..len]);
        ready!(each!(&mut self.io, s => Pin::new(s).poll_read(cx, &mut rb)))?;
        let n = rb.filled().len();
        // SAFETY: `ReadBuf` vouches that its first `n` bytes, which are the
        // first `n` of `buf`'s spare capacity, were written.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// Hands `n` bytes of `buf` to `out`.
    fn hand(&mut self, out: &mut ReadBuf<'_>, n: usize) {
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        self.flags.at_boundary.store(false, Ordering::Release);
    }

    /// The request head, up to its end and not past it.
    fn read_head(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() && ready!(self.fill(cx))? == 0 {
            return Poll::Ready(Ok(()));
        }
        let room = self.buf.len().min(out.remaining());
        let Some(head) = self.head.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let (n, ended) = head.scan(&self.buf[..room]);
        if ended {
            self.head = None;
        }
        self.hand(out, n);
        Poll::Ready(Ok(()))
    }

    /// The rest of the frame being passed through: from `buf`, else from
    /// the socket straight into `out`.
    fn read_through(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let limit = usize::try_from(self.pass)
            .unwrap_or(usize::MAX)
            .min(out.remaining());
        if !self.buf.is_empty() {
            let n = limit.min(self.buf.len());
            self.hand(out, n);
            self.pass -= n as u64;
            return Poll::Ready(Ok(()));
        }
        let before = out.filled().len();
        let dst = out.initialize_unfilled_to(limit);
        let mut rb = ReadBuf::new(dst);
        let polled = each!(&mut self.io, s => Pin::new(s).poll_read(cx, &mut rb));
        if polled.is_pending() {
            self.wait_here();
        }
        ready!(polled)?;
        let n = rb.filled().len();
        out.set_filled(before + n);
        self.pass -= n as u64;
        self.flags.at_boundary.store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.head.is_some() {
            return this.read_head(cx, out);
        }
        loop {
            if this.pass > 0 {
                return this.read_through(cx, out);
            }
            // At a frame boundary of what tungstenite was given, so it
            // holds no partial frame. Leaving: no new message.
            let paused = this.flags.pause.load(Ordering::Acquire);
            if paused && !this.messages.fragmented {
                this.wait_here();
                return Poll::Pending; // woken by nothing: the socket leaves
            }
            // The bytes read ahead (they start a frame), then what the
            // socket has, straight into tungstenite's buffer; what does not
            // end a whole frame is taken back.
            let (start, room) = (out.filled().len(), out.remaining());
            let prefix = this.buf.len().min(room);
            out.put_slice(&this.buf[..prefix]);
            let mut read = Poll::Ready(Ok(false)); // (whether the socket ended)
            if prefix == this.buf.len() && out.remaining() > 0 {
                // Leaving (the message is finished first): a small read, so
                // that what is read past the message stays small.
                let limit = if paused { READ_CHUNK } else { usize::MAX };
                let before = out.filled().len();
                let dst = out.initialize_unfilled_to(out.remaining().min(limit));
                let mut rb = ReadBuf::new(dst);
                read = match each!(&mut this.io, s => Pin::new(s).poll_read(cx, &mut rb)) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        out.set_filled(before + n);
                        Poll::Ready(Ok(n == 0))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                };
            }
            let handed = this.whole_frames(&out.filled()[start..], room);
            if prefix < this.buf.len() {
                this.buf.advance(handed); // nothing read: `buf` holds the rest
            } else {
                this.buf.clear();
                this.buf.extend_from_slice(&out.filled()[start + handed..]);
            }
            out.set_filled(start + handed);
            if handed > 0 {
                this.flags.at_boundary.store(false, Ordering::Release);
                return Poll::Ready(Ok(()));
            }
            if prefix < this.buf.len() {
                // Not even a frame header fits: tungstenite always has room
                // for one (14 bytes); another reader must give it.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a WebSocket socket read with room for less than a frame header",
                )));
            }
            match read {
                Poll::Pending => {
                    this.wait_here();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The end: tungstenite sees it; a partial frame is lost
                // with the connection.
                Poll::Ready(Ok(true)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(false)) => {}
            }
            debug_assert!(this.buf.len() <= MAX_READ_AHEAD + frames::MAX_HEADER);
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(&mut self.io, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(&mut self.io, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(&self.io, s => s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.io, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.io, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A masked client frame of `payload` bytes.
    fn frame(b0: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![b0];
        match payload {
            0..=125 => f.push(0x80 | payload as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0; 4]);
        f.resize(f.len() + payload, b'x');
        f
    }

    async fn pair() -> (Socket, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (Socket::after_handshake(Io::Tcp(server), &[], None), client)
    }

    /// Reads what the socket hands in one call, with room for `room`.
    async fn one_read(s: &mut Socket, room: usize) -> Vec<u8> {
        let mut v = vec![0; room];
        let n = s.read(&mut v).await.unwrap();
        v.truncate(n);
        v
    }

    #[test]
    fn hands_whole_frames_and_never_past_the_one_it_passes_through() {
        rt().block_on(async {
            let (mut s, mut c) = pair().await;
            let (a, b, big) = (frame(0x81, 5), frame(0x82, 300), frame(0x82, 40_000));
            let mut wire = [a.clone(), b.clone(), big.clone(), a.clone()].concat();
            // The first half of a small frame at the end: held back.
            let tail = frame(0x81, 100);
            wire.extend_from_slice(&tail[..50]);
            c.write_all(&wire).await.unwrap();
            // Whole frames (the big one as it comes, if it comes in parts),
            // and not a byte of the partial one behind them.
            let upto_big = [a.clone(), b, big, a].concat();
            let mut through = Vec::new();
            while through.len() < upto_big.len() {
                let got = one_read(&mut s, 128 * 1024).await;
                assert!(!got.is_empty());
                through.extend(got);
            }
            let diff = through.iter().zip(&upto_big).position(|(x, y)| x != y);
            assert!(
                through == upto_big,
                "not a byte past the big frame: {} bytes for {}, first difference at {diff:?}",
                through.len(),
                upto_big.len()
            );
            // Only the partial frame is left, read ahead; its rest comes.
            c.write_all(&tail[50..]).await.unwrap();
            assert_eq!(one_read(&mut s, 128 * 1024).await, tail);
        });
    }

    #[test]
    fn a_long_frame_in_parts_is_passed_through_up_to_its_end() {
        rt().block_on(async {
            let (mut s, mut c) = pair().await;
            let (a, big) = (frame(0x81, 5), frame(0x82, 100_000));
            c.write_all(&[&a[..], &big[..30_000]].concat())
                .await
                .unwrap();
            let mut got = Vec::new();
            while got.len() < a.len() + 30_000 {
                got.extend(one_read(&mut s, 128 * 1024).await);
            }
            assert!(got == [&a[..], &big[..30_000]].concat());
            let mut v = [0u8; 64];
            assert!(futures_poll(&mut s, &mut v).is_pending());
            assert_eq!(s.cannot_move(), Some("in the middle of a message"));
            // The rest, and a frame behind it: each read stops at the end
            // of the long frame.
            c.write_all(&[&big[30_000..], &a[..]].concat())
                .await
                .unwrap();
            let mut rest = Vec::new();
            while rest.len() < big.len() - 30_000 {
                rest.extend(one_read(&mut s, 128 * 1024).await);
            }
            assert!(rest == big[30_000..], "{} bytes", rest.len());
            assert_eq!(one_read(&mut s, 128 * 1024).await, a);
            assert!(futures_poll(&mut s, &mut v).is_pending());
            assert_eq!(s.cannot_move(), None);
        });
    }

    #[test]
    fn at_a_boundary_only_between_messages() {
        rt().block_on(async {
            let (mut s, mut c) = pair().await;
            let first = frame(0x01, 3); // text, not FIN
            let last = frame(0x80, 3); // its last fragment
            c.write_all(&first).await.unwrap();
            assert_eq!(one_read(&mut s, 1024).await, first);
            // Asks again, gets nothing: mid-message.
            let mut v = [0u8; 16];
            let polled = futures_poll(&mut s, &mut v);
            assert!(polled.is_pending());
            assert_eq!(s.cannot_move(), Some("in the middle of a message"));
            c.write_all(&last).await.unwrap();
            assert_eq!(one_read(&mut s, 1024).await, last);
            assert!(futures_poll(&mut s, &mut v).is_pending());
            assert_eq!(s.cannot_move(), None);
        });
    }

    #[test]
    fn paused_it_finishes_the_message_and_hands_nothing_after_it() {
        rt().block_on(async {
            let (mut s, mut c) = pair().await;
            let (first, ping, last, next) = (
                frame(0x02, 3),
                frame(0x89, 1),
                frame(0x80, 3),
                frame(0x82, 9),
            );
            c.write_all(&first).await.unwrap();
            assert_eq!(one_read(&mut s, 1024).await, first);
            // Leaving in the middle of a message.
            s.flags.pause.store(true, Ordering::Release);
            let wire = [ping.clone(), last.clone(), next.clone()].concat();
            c.write_all(&wire).await.unwrap();
            // The open message is finished (a ping inside it too)…
            let mut got = Vec::new();
            while got.len() < ping.len() + last.len() {
                got.extend(one_read(&mut s, 1024).await);
            }
            assert_eq!(got, [ping, last].concat());
            // …and the next one stays, read ahead, to travel.
            let mut v = [0u8; 64];
            for _ in 0..3 {
                assert!(futures_poll(&mut s, &mut v).is_pending());
            }
            assert_eq!(s.cannot_move(), None);
            let (_, ahead) = s.into_fd().unwrap();
            assert_eq!(&ahead[..], &next[..]);
        });
    }

    #[test]
    fn the_head_of_a_handshake_and_nothing_past_it() {
        rt().block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (server, _) = l.accept().await.unwrap();
            let mut s = Socket::before_handshake(Io::Tcp(server), None);
            let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            let f = frame(0x81, 2);
            c.write_all(&[head.clone(), f.clone()].concat())
                .await
                .unwrap();
            let mut got = Vec::new();
            while got.len() < head.len() {
                got.extend(one_read(&mut s, 4096).await);
            }
            assert_eq!(got, head);
            assert_eq!(one_read(&mut s, 4096).await, f);
        });
    }

    /// One poll of a read, without waiting.
    fn futures_poll(s: &mut Socket, v: &mut [u8]) -> Poll<io::Result<()>> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut rb = ReadBuf::new(v);
        Pin::new(s).poll_read(&mut cx, &mut rb)
    }
}
