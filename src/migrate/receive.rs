//! The successor's side: [`IncomingConnections`] offers the migration
//! socket once this generation's handover is committed, then reads the
//! records, answers each as soon as it is read, and yields what they
//! carried.
//!
//! How far it reads ahead of the application is set when it is made: the
//! application's own reads one record at a time — the next only once every
//! connection of the last was taken — so that one it drops (it stops taking
//! connections) holds at most one record that was answered and not taken;
//! the serving layer's reads whatever has arrived, up to [`READ_AHEAD`]
//! records not yet taken, so that the old generation hears that its
//! connections were taken, and can exit, without waiting for each to be set
//! up here (the serving layer takes them all, until the stream ends).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::task::Poll;

use tokio::io::unix::AsyncFd;

use super::{FrameError, MAX_STATE, MigrateError, is_gone, sock, wire};
use crate::channel::Message;
use crate::lifecycle::Generation;
use crate::lifecycle::State;
use std::sync::Arc;

/// Records the serving layer's [`IncomingConnections`] reads ahead at
/// most: those read whose items were not all taken yet (at most 16,192
/// connections and 8 MiB).
pub(super) const READ_AHEAD: usize = 64;

/// A connection handed over by the old generation: the very same socket,
/// and the payload it was sent with.
#[derive(Debug)]
pub struct MigratedConnection {
    fd: OwnedFd,
    payload: Vec<u8>,
    /// Its socket type, read when it arrived.
    ty: socket2::Type,
}

impl MigratedConnection {
    /// The payload: bytes the old generation had read but not processed,
    /// and whatever per-connection state the application sent with it.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The socket and the payload. The socket is close-on-exec; its
    /// `O_NONBLOCK` is as the old generation left it (a property of the
    /// socket, shared by every holder).
    pub fn into_parts(self) -> (OwnedFd, Vec<u8>) {
        (self.fd, self.payload)
    }

    /// The socket as a non-blocking [`std::net::TcpStream`] (ready for
    /// `tokio::net::TcpStream::from_std`), with the payload. An error when
    /// it is not a TCP stream socket; the socket is closed then.
    pub fn into_tcp(self) -> Result<(std::net::TcpStream, Vec<u8>), MigrateError> {
        let sock = socket2::SockRef::from(&self.fd);
        let tcp = self.ty == socket2::Type::STREAM
            && matches!(
                sock.domain(),
                Ok(socket2::Domain::IPV4 | socket2::Domain::IPV6)
            );
        if !tcp {
            return Err(MigrateError::NotASocket {
                found: "a socket that is not a TCP stream",
            });
        }
        sock.set_nonblocking(true)
            .map_err(|e| MigrateError::io("making the connection non-blocking", e))?;
        Ok((self.fd.into(), self.payload))
    }
}

impl AsFd for MigratedConnection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What the old generation hands over, in the order it sent it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Migrated {
    /// An established connection.
    Connection(MigratedConnection),
    /// A state message ([`ConnectionSender::send_state`](super::ConnectionSender::send_state)).
    State(Vec<u8>),
}

pub(super) enum Phase {
    /// Wait for the commit, then offer over the channel.
    Commit(Arc<Generation>),
    /// Offer over this channel (tests: no handover).
    #[cfg(test)]
    Offer(OwnedFd),
    Open(AsyncFd<OwnedFd>),
    Done,
}

/// The successor's side: connections and state from the old generation,
/// from [`Handover::incoming_connections`](crate::Handover::incoming_connections).
///
/// Read it with [`recv`](Self::recv) from one task; the old generation's
/// sends resolve as the records are read, so a successor that stops reading
/// holds back (and, at the old generation's deadline, loses) the
/// connections not read yet.
pub struct IncomingConnections {
    phase: Phase,
    pending: VecDeque<Result<Migrated, MigrateError>>,
    /// For each record read whose items are not all yielded yet, oldest
    /// first: how many of its items are still in `pending`.
    ahead: VecDeque<usize>,
    /// How many such records there may be (1: the next record is read once
    /// the last is all taken).
    read_ahead: usize,
    /// Answers owed to the old generation, sent before anything of their
    /// records is yielded.
    owed: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    cmsg: Vec<u8>,
    state: Vec<u8>,
    state_too_large: bool,
    /// The old generation's close was reported (`ECONNRESET`).
    reset: bool,
    /// Records read (for the tests).
    pub(super) records: u64,
}

impl fmt::Debug for IncomingConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.phase {
            Phase::Commit(_) => "waiting for the commit",
            #[cfg(test)]
            Phase::Offer(_) => "offering",
            Phase::Open(_) => "open",
            Phase::Done => "done",
        };
        f.debug_struct("IncomingConnections")
            .field("phase", &phase)
            .field("pending", &self.pending.len())
            .field("records", &self.records)
            .finish()
    }
}

impl IncomingConnections {
    /// Reads up to `read_ahead` records ahead of the application (at least
    /// one).
    pub(super) fn new(phase: Phase, read_ahead: usize) -> Self {
        IncomingConnections {
            phase,
            pending: VecDeque::new(),
            ahead: VecDeque::new(),
            read_ahead: read_ahead.max(1),
            owed: VecDeque::new(),
            buf: vec![0; wire::MAX_RECORD],
            cmsg: sock::cmsg_buffer(),
            state: Vec::new(),
            state_too_large: false,
            reset: false,
            records: 0,
        }
    }

    /// The next connection or state from the old generation; `None` once
    /// it sent its end, or is gone (its drain is over), or for a process
    /// that has no predecessor. Errors are per item (a record that could
    /// not be read, a received fd that is not a socket); reading goes on
    /// after them.
    ///
    /// The first call offers to take connections, once this generation's
    /// handover is committed (see [`Handover::committed`](crate::Handover::committed)). Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Migrated, MigrateError>> {
        loop {
            self.read_ahead().await;
            if let Err(e) = self.pay_answers().await {
                self.pending.push_back(Err(e));
            }
            if let Some(item) = self.pending.pop_front() {
                self.yielded();
                return Some(item);
            }
            match &self.phase {
                Phase::Done => return None,
                Phase::Commit(g) => {
                    let g = g.clone();
                    if let Err(e) = g
                        .wait_channel(|g, closed| closed || g.life().committed)
                        .await
                    {
                        self.phase = Phase::Done;
                        return Some(Err(MigrateError::io(
                            "waiting for the commit",
                            io::Error::other(e),
                        )));
                    }
                    // A generation its predecessor took back gets nothing.
                    let channel = {
                        let life = g.life();
                        match life.state {
                            State::RolledBack => None,
                            _ => life.predecessor.as_ref().map(|c| c.try_clone()),
                        }
                    };
                    self.phase = match channel {
                        // No predecessor, or it is gone: nothing comes.
                        None => Phase::Done,
                        Some(Err(e)) => {
                            self.phase = Phase::Done;
                            return Some(Err(MigrateError::io("duplicating the channel", e)));
                        }
                        Some(Ok(ch)) => match offer(ch).await {
                            Ok(phase) => phase,
                            Err(e) => {
                                self.phase = Phase::Done;
                                return Some(Err(e));
                            }
                        },
                    };
                }
                #[cfg(test)]
                Phase::Offer(ch) => {
                    let ch = ch.try_clone().ok()?;
                    self.phase = match offer(ch).await {
                        Ok(phase) => phase,
                        Err(e) => {
                            self.phase = Phase::Done;
                            return Some(Err(e));
                        }
                    };
                }
                Phase::Open(sock) => {
                    let mut guard = match sock.readable().await {
                        Ok(g) => g,
                        Err(e) => {
                            self.phase = Phase::Done;
                            return Some(Err(MigrateError::io(
                                "waiting on the migration socket",
                                e,
                            )));
                        }
                    };
                    let (buf, cmsg) = (&mut self.buf, &mut self.cmsg);
                    if let Ok(read) = guard.try_io(|fd| sock::recv_with_fds(fd.as_fd(), buf, cmsg))
                    {
                        if let Some(e) = self.took(read) {
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
    }

    /// Reads the records that have arrived, without waiting, while fewer
    /// than `read_ahead` records read are not all yielded yet: tokio's
    /// readiness says whether anything arrived, so this costs no system
    /// call when nothing did.
    async fn read_ahead(&mut self) {
        while self.ahead.len() < self.read_ahead {
            let Phase::Open(sock) = &self.phase else {
                return;
            };
            let ready = std::future::poll_fn(|cx| match sock.poll_read_ready(cx) {
                Poll::Ready(ready) => Poll::Ready(Some(ready)),
                Poll::Pending => Poll::Ready(None),
            })
            .await;
            let mut guard = match ready {
                None => return,
                Some(Ok(g)) => g,
                Some(Err(e)) => {
                    self.phase = Phase::Done;
                    let e = MigrateError::io("waiting on the migration socket", e);
                    return self.pending.push_back(Err(e));
                }
            };
            let (buf, cmsg) = (&mut self.buf, &mut self.cmsg);
            match guard.try_io(|fd| sock::recv_with_fds(fd.as_fd(), buf, cmsg)) {
                Err(_would_block) => return,
                Ok(read) => {
                    if let Some(e) = self.took(read) {
                        self.pending.push_back(Err(e));
                    }
                }
            }
        }
    }

    /// Handles what one read of the migration socket brought; an error that
    /// ends the reading.
    fn took(&mut self, read: io::Result<sock::Received>) -> Option<MigrateError> {
        match read {
            // The old generation closed with answers unread: the kernel
            // reports ECONNRESET once, before the records still queued here,
            // which are ours alone now.
            Err(e) if is_gone(&e) && !self.reset => self.reset = true,
            Err(e) if is_gone(&e) => self.phase = Phase::Done,
            Err(e) => {
                self.phase = Phase::Done;
                return Some(MigrateError::io("reading the migration socket", e));
            }
            Ok(got) => {
                let before = self.pending.len();
                self.take_record(got);
                let items = self.pending.len() - before;
                if items > 0 {
                    self.ahead.push_back(items);
                }
            }
        }
        None
    }

    /// One item of `pending` was yielded: counts it off its record.
    fn yielded(&mut self) {
        if let Some(left) = self.ahead.front_mut() {
            *left -= 1;
            if *left == 0 {
                self.ahead.pop_front();
            }
        }
    }

    /// Sends the answers owed, waiting while the socket is full.
    async fn pay_answers(&mut self) -> Result<(), MigrateError> {
        let Phase::Open(sock) = &self.phase else {
            self.owed.clear();
            return Ok(());
        };
        while let Some(answer) = self.owed.front() {
            let mut guard = sock
                .writable()
                .await
                .map_err(|e| MigrateError::io("waiting on the migration socket", e))?;
            match guard.try_io(|s| sock::send_record(s.as_fd(), answer, &[])) {
                Err(_would_block) => continue,
                Ok(Ok(())) => {
                    self.owed.pop_front();
                }
                // The old generation is gone: what arrived is ours alone.
                Ok(Err(e)) if is_gone(&e) => self.owed.clear(),
                Ok(Err(e)) => {
                    self.owed.clear();
                    return Err(MigrateError::io("answering the old generation", e));
                }
            }
        }
        Ok(())
    }

    /// Handles one record: queues its items and the answer it is owed.
    fn take_record(&mut self, got: sock::Received) {
        if got.len == 0 && got.fds.is_empty() {
            self.phase = Phase::Done;
            return;
        }
        self.records += 1;
        let record = &self.buf[..got.len];
        let decoded = if got.truncated {
            Err(FrameError::TooLong)
        } else if got.fds_truncated {
            Err(FrameError::FdCount {
                expected: wire::MAX_FDS,
                received: got.fds.len(),
            })
        } else {
            wire::decode(record, got.fds.len())
        };
        match decoded {
            Ok(wire::Record::Connections { seq, payloads }) => {
                for (fd, payload) in got.fds.into_iter().zip(payloads) {
                    self.pending.push_back(match sock::socket_type(fd.as_fd()) {
                        Ok(ty) => Ok(Migrated::Connection(MigratedConnection {
                            fd,
                            payload: payload.to_vec(),
                            ty,
                        })),
                        Err(found) => Err(MigrateError::NotASocket { found }),
                    });
                }
                self.owed.push_back(wire::encode_answer(seq, None));
            }
            Ok(wire::Record::State { seq, chunk, more }) => {
                if !self.state_too_large {
                    if self.state.len() + chunk.len() > MAX_STATE {
                        self.state_too_large = true;
                        let len = self.state.len() + chunk.len();
                        self.state = Vec::new();
                        self.pending
                            .push_back(Err(MigrateError::StateTooLarge { len }));
                    } else {
                        self.state.extend_from_slice(chunk);
                    }
                }
                if !more {
                    if !self.state_too_large {
                        let state = std::mem::take(&mut self.state);
                        self.pending.push_back(Ok(Migrated::State(state)));
                    }
                    self.state_too_large = false;
                }
                self.owed.push_back(wire::encode_answer(seq, None));
            }
            Ok(wire::Record::End) => self.phase = Phase::Done,
            Ok(wire::Record::Taken { .. } | wire::Record::Refused { .. }) => {
                self.pending.push_back(Err(MigrateError::Protocol {
                    reason: "an answer record from the old generation".into(),
                }));
            }
            Err(e) => {
                // Its fds (dropped with `got`) are closed; the old
                // generation gets its connections back.
                if let Some(seq) = wire::seq_of(record) {
                    self.owed
                        .push_back(wire::encode_answer(seq, Some(&e.to_string())));
                }
                tracing::warn!(error = %e, "unreadable record from the old generation");
                self.pending.push_back(Err(MigrateError::BadRecord(e)));
            }
        }
    }
}

/// Creates the migration socket and offers one end over `channel`.
async fn offer(channel: OwnedFd) -> Result<Phase, MigrateError> {
    let (ours, theirs) =
        sock::seqpacket_pair().map_err(|e| MigrateError::io("creating the migration socket", e))?;
    let channel =
        sock::register(channel).map_err(|e| MigrateError::io("registering the channel", e))?;
    let line = Message::MigrationOffer(wire::VERSION).encode();
    loop {
        let mut guard = channel
            .writable()
            .await
            .map_err(|e| MigrateError::io("waiting on the channel", e))?;
        match guard.try_io(|ch| sock::send_line_with_fd(ch.as_fd(), &line, theirs.as_fd())) {
            Err(_would_block) => continue,
            Ok(Ok(())) => break,
            // The predecessor is gone: nothing will come.
            Ok(Err(e)) if is_gone(&e) => return Ok(Phase::Done),
            Ok(Err(e)) => return Err(MigrateError::io("sending the offer", e)),
        }
    }
    drop(theirs);
    let ours = sock::register(ours)
        .map_err(|e| MigrateError::io("registering the migration socket", e))?;
    Ok(Phase::Open(ours))
}
