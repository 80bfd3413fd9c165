//! Connection migration: after the commit, the old generation hands its
//! established connections — any socket fd, each with a byte payload — and
//! later state to its successor, which owns the very same connections from
//! then on. The client sees nothing.
//!
//! # Example
//!
//! The old generation, after `upgrade()` returned `Ok`, hands each idle
//! connection over with the bytes it read but did not process; the
//! successor takes its incoming connections before `ready()` (the ready
//! message says that it takes them) and serves what arrives:
//!
//! ```no_run
//! use handover::{Handover, IncomingConnections, Migrated};
//! use handover::migrate::SendError;
//!
//! # async fn serve(_: tokio::net::TcpStream, _: Vec<u8>) {}
//! // Old generation: in each connection's task, once the drain started and
//! // the connection is between requests.
//! async fn hand_over(
//!     handover: &Handover,
//!     stream: tokio::net::TcpStream,
//!     unread: Vec<u8>,
//! ) -> std::io::Result<()> {
//!     match handover.send_connection(stream.into_std()?, unread).await {
//!         Ok(()) => Ok(()), // the successor owns it now
//!         Err(e) => {
//!             // Not taken: still ours when given back; close it or serve on.
//!             let _given_back = e.into_connection();
//!             Ok(())
//!         }
//!     }
//! }
//!
//! // Successor: `let incoming = handover.incoming_connections()?;` before
//! // `handover.ready()?`, then, in a task of its own:
//! async fn take_over(mut incoming: IncomingConnections) -> Result<(), Box<dyn std::error::Error>> {
//!     while let Some(item) = incoming.recv().await {
//!         match item {
//!             Ok(Migrated::Connection(c)) => {
//!                 let (stream, unread) = c.into_tcp()?;
//!                 tokio::spawn(serve(tokio::net::TcpStream::from_std(stream)?, unread));
//!             }
//!             Ok(Migrated::State(_delta)) => { /* apply it */ }
//!             Ok(_) => {}
//!             Err(e) => eprintln!("a migrated item was lost: {e}"),
//!         }
//!     }
//!     Ok(()) // the old generation finished, or is gone
//! }
//! # fn main() { let _ = (hand_over, take_over); let _: Option<SendError> = None; }
//! ```
//!
//! # Specification
//!
//! ## Transport
//!
//! A second socket between the two generations, the *migration socket*: an
//! `AF_UNIX` `SOCK_SEQPACKET` pair that the **successor** creates
//! (close-on-exec, non-blocking) when it starts taking connections, once
//! its handover is committed. It sends one end to the old generation over
//! the channel, attached with `SCM_RIGHTS` to the *offer* line. Why this
//! way:
//!
//! - Never before the commit: a successor on probation may be taken back,
//!   and it offers only after it has read the commit.
//! - Only a successor that wants connections offers one, so an old
//!   generation never hands a connection to a build that cannot take it
//!   (an older successor, or one that does not call
//!   [`Handover::incoming_connections`](crate::Handover::incoming_connections)): its sends fail with
//!   [`MigrateError::NotTaken`] (or [`MigrateError::NotOffered`]) and the
//!   connection comes back.
//! - Whether an offer will come is known at the commit: right before its
//!   ready message the successor says which connections it takes (the
//!   channel's `T` line; see `channel`), and one that takes none, or says
//!   nothing (an older build), is not waited for.
//! - After the commit the successor sends nothing else on the channel and
//!   the old generation reads it nowhere else, so the offer changes neither
//!   the upgrade's readers (ready, probation) nor the successor's, and needs
//!   no new fd or variable at spawn time.
//! - `SOCK_SEQPACKET` keeps record boundaries and ties each record's fds to
//!   it: no framing state can get out of step, and a record is sent whole
//!   or not at all.
//!
//! ## The offer (channel, successor → old generation)
//!
//! One of the channel's messages (its decoder and table live with the
//! others'):
//!
//! | message | direction | when | the receiver |
//! | --- | --- | --- | --- |
//! | `M<version>\n` + 1 fd | successor → old | after the commit, once, when the successor starts taking connections | checks the fd is an `AF_UNIX` `SOCK_SEQPACKET` socket and uses it as the migration socket; lines before it (an unhealthy report that crossed the commit) are skipped |
//!
//! `<version>` is the highest record version the successor reads (now 1);
//! the old generation writes records of that version or lower. An old
//! generation whose successor said it takes connections waits for the
//! offer at most 5 s (and never past its deadline); one whose successor
//! takes none waits for nothing; a successor whose predecessor is gone
//! offers nothing.
//!
//! ## Records (migration socket)
//!
//! Each record is one `SOCK_SEQPACKET` message of at most 128 KiB: a
//! 12-byte header, little-endian, then a body.
//!
//! ```text
//! 0      1        2..4      4..8     8..12
//! tag    version  flags     seq      count
//! ```
//!
//! | tag | record | direction | fds | body | the receiver |
//! | --- | --- | --- | --- | --- | --- |
//! | `C` | connections | old → new | `count` (1 to 253) | `count` payload lengths (u32), then the payloads back to back (each ≤ 64 KiB) | checks each fd (`fstat`: a socket; `SO_TYPE`), queues (fd, payload) for the application, answers `K` |
//! | `S` | state chunk | old → new | none | the chunk; flag 1: more chunks of this message follow | appends (≤ 16 MiB per message); the last chunk completes a state message for the application; answers `K` |
//! | `E` | end | old → new | none | none | no more records: the stream ends |
//! | `K` | taken | new → old | none | none | record `seq` is the successor's now: closes its own copies of its fds |
//! | `N` | refused | new → old | none | the reason (≤ 256 bytes) | the successor closed its copies of record `seq`'s fds: gives the connections back to the application with the reason |
//!
//! `seq` counts the old generation's records from 1; answers name the
//! record they answer, in order. `count` is zero in every record but `C`.
//! A record that cannot be decoded is refused (`N`) when its header can be
//! read, and its fds are closed; nothing from the other process is trusted.
//!
//! ## Bounds
//!
//! - **Time.** The old generation's sender has a deadline (its drain
//!   timeout from the first call to [`Handover::connection_sender`](crate::Handover::connection_sender)). A
//!   connection sent but not taken by then is shut down (`shutdown(2)`,
//!   which ends it for every holder, even a copy waiting in the
//!   successor's queue) and closed; one not sent yet is given back. State
//!   and the end record may still go for 5 s after the deadline, so that a
//!   final delta sent after a drain that ran to its deadline arrives; then
//!   the sender stops. If the successor closes the migration socket or
//!   dies, every connection not taken is given back at once: the old
//!   generation still holds its own copy of each until the successor takes
//!   it, and the successor's copies died with its queue.
//! - **Memory and fds.** At most 2 connection records (506 fds) wait for an
//!   answer at a time, a record is at most 128 KiB, the queue of the sender
//!   holds at most 1,024 requests, and the successor reads one record at a
//!   time and reads the next only when the application has taken the
//!   connections of the last.
//! - **Hygiene.** Every fd received is close-on-exec (`MSG_CMSG_CLOEXEC`)
//!   and owned at once; a connection the successor yields has been
//!   answered `K` first, so no connection is ever owned by both.
//!
//! ## Where the code is
//!
//! `wire` encodes and decodes the records (pure; fuzzed), `sock` makes the
//! socket calls (nix), `send` is the old generation's side
//! ([`ConnectionSender`]), `receive` the successor's
//! ([`IncomingConnections`]); this file holds the errors and the
//! [`Handover`](crate::Handover) methods.

mod receive;
mod send;
mod sock;
mod wire;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use receive::Phase;
pub use receive::{IncomingConnections, Migrated, MigratedConnection};
pub use send::ConnectionSender;
use send::Source;
pub use wire::FrameError;

use crate::lifecycle::{Generation, State, lock};

/// The largest payload one connection carries: 64 KiB.
pub(crate) const MAX_PAYLOAD: usize = wire::MAX_PAYLOAD;
/// The largest state message: 16 MiB.
pub(crate) const MAX_STATE: usize = wire::MAX_STATE;

/// Why a connection or a state was not handed over, or what was wrong with
/// what the other generation sent.
#[derive(Debug)]
#[non_exhaustive]
pub enum MigrateError {
    /// This process is not an old generation whose upgrade committed
    /// ([`Handover::connection_sender`](crate::Handover::connection_sender) before `upgrade()` returned `Ok`).
    NotHandedOver,
    /// [`Handover::incoming_connections`](crate::Handover::incoming_connections) was already called in this process.
    AlreadyTaken,
    /// No tokio runtime to run the sender on.
    NoRuntime,
    /// The successor takes no connections of this kind: it said so at its
    /// ready message, or is a build that says nothing (an older one). Known
    /// at the commit: nothing is waited for.
    NotTaken,
    /// The successor said it takes connections but did not offer to take
    /// them in time (5 s): it did not read its [`IncomingConnections`].
    NotOffered {
        /// How long the old generation waited.
        waited: Duration,
    },
    /// The successor closed the migration socket or exited before it took
    /// the connection.
    SuccessorGone,
    /// The sender's deadline passed before the successor took it.
    TimedOut,
    /// The successor refused the record the connection travelled in.
    Refused {
        /// Its reason.
        reason: String,
    },
    /// [`ConnectionSender::finish`] was called: nothing more is sent.
    Finished,
    /// The fd is not a socket.
    NotASocket {
        /// What it is instead.
        found: &'static str,
    },
    /// A payload larger than 64 KiB.
    PayloadTooLarge {
        /// Its length.
        len: usize,
    },
    /// A state larger than 16 MiB.
    StateTooLarge {
        /// Its length (or how much had arrived when it went over).
        len: usize,
    },
    /// A record from the other generation could not be used.
    BadRecord(FrameError),
    /// The other generation broke the protocol otherwise.
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// A system call failed.
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::NotHandedOver => {
                f.write_str("no committed successor to hand connections to")
            }
            MigrateError::AlreadyTaken => {
                f.write_str("the incoming connections were already taken")
            }
            MigrateError::NoRuntime => f.write_str("connection migration needs a tokio runtime"),
            MigrateError::NotTaken => {
                f.write_str("the successor takes no connections of this kind")
            }
            MigrateError::NotOffered { waited } => write!(
                f,
                "the successor did not offer to take connections within {} ms",
                waited.as_millis()
            ),
            MigrateError::SuccessorGone => f.write_str("the successor is gone"),
            MigrateError::TimedOut => {
                f.write_str("the successor did not take it before the deadline")
            }
            MigrateError::Refused { reason } => write!(f, "the successor refused it: {reason}"),
            MigrateError::Finished => f.write_str("the sender has finished"),
            MigrateError::NotASocket { found } => write!(f, "expected a socket, found {found}"),
            MigrateError::PayloadTooLarge { len } => {
                write!(f, "a payload of {len} bytes (at most {MAX_PAYLOAD})")
            }
            MigrateError::StateTooLarge { len } => {
                write!(f, "a state of {len} bytes or more (at most {MAX_STATE})")
            }
            MigrateError::BadRecord(e) => write!(f, "bad record: {e}"),
            MigrateError::Protocol { reason } => write!(f, "protocol error: {reason}"),
            MigrateError::Io { context, .. } => f.write_str(context),
        }
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrateError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl MigrateError {
    fn io(context: &'static str, source: io::Error) -> Self {
        MigrateError::Io { context, source }
    }
}

/// A connection (or state) that was not handed over: why, and the
/// connection itself when this generation is its only holder again, to
/// keep serving or to close.
pub struct SendError {
    error: MigrateError,
    connection: Option<(OwnedFd, Vec<u8>)>,
}

impl SendError {
    /// A connection that was not sent at all, given back with its payload.
    pub(crate) fn not_sent(error: MigrateError, connection: OwnedFd, payload: Vec<u8>) -> Self {
        SendError {
            error,
            connection: Some((connection, payload)),
        }
    }

    /// Why it was not handed over.
    pub fn error(&self) -> &MigrateError {
        &self.error
    }

    /// The connection and its payload, given back: `None` for a state, or
    /// when the connection was shut down at the deadline (a copy of it may
    /// have reached the successor).
    pub fn into_connection(self) -> Option<(OwnedFd, Vec<u8>)> {
        self.connection
    }

    /// Splits into the error and the connection given back.
    #[cfg_attr(not(feature = "websocket"), allow(dead_code))]
    pub(crate) fn into_parts(self) -> (MigrateError, Option<(OwnedFd, Vec<u8>)>) {
        (self.error, self.connection)
    }
}

impl fmt::Debug for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .field("given_back", &self.connection.is_some())
            .finish()
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    )
}

/// The record decoder, for the fuzz target: whatever it accepts keeps to
/// the limits.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_decode(record: &[u8], fds: usize) -> Result<(), FrameError> {
    if let wire::Record::Connections { payloads, .. } = wire::decode(record, fds)? {
        assert!(!payloads.is_empty() && payloads.len() == fds && fds <= wire::MAX_FDS);
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
    }
    Ok(())
}

/// The kinds of connections a successor may take (its `T` line, see
/// `channel`): the application's own, through [`IncomingConnections`].
pub(crate) const CONNECTIONS: &str = "connections";
/// `serve::Server`'s HTTP/1.1 keep-alive connections.
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) const HTTP1: &str = "http1";
/// `serve::Server`'s WebSocket connections (`websocket`).
#[cfg_attr(not(feature = "websocket"), allow(dead_code))]
pub(crate) const WEBSOCKET: &str = "websocket";

/// What one process did with connection migration.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    sender: Option<ConnectionSender>,
    incoming_taken: bool,
    /// The application reads its incoming connections itself: it called
    /// [`Handover::incoming_connections`](crate::Handover::incoming_connections) before `ready()`.
    app_takes: bool,
    /// What `serve::Server` takes (declared when it is made).
    server_takes: Vec<&'static str>,
    /// `ready()` said what this generation takes: later declarations come
    /// too late for the predecessor.
    announced: bool,
}

/// What this generation takes, said by `ready()` (once).
pub(crate) fn announce(slot: &Mutex<Slot>) -> Vec<&'static str> {
    let mut slot = lock(slot);
    slot.announced = true;
    let mut kinds = slot.server_takes.clone();
    if slot.app_takes {
        kinds.push(CONNECTIONS);
    }
    kinds
}

/// `serve::Server` takes `kinds` (none: it does not migrate). Declared
/// before `ready()`, the predecessor hears it; later, only a predecessor
/// that does not read what its successor takes (an older build) offers
/// anything.
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) fn declare_server(slot: &Mutex<Slot>, kinds: Vec<&'static str>) {
    let mut slot = lock(slot);
    // Said in every generation, the first too: the next one would be made
    // the same way.
    if slot.announced && slot.server_takes != kinds && !kinds.is_empty() {
        tracing::warn!(
            ?kinds,
            "serve::Server made after ready(): the predecessor was told that this generation \
             takes no such connections (make the Server before ready())"
        );
    }
    slot.server_takes = kinds;
}

/// Whether this generation's committed successor takes connections of
/// `kind` (said right before its ready message).
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) fn successor_takes(g: &Generation, kind: &str) -> bool {
    let life = g.life();
    life.state == State::HandedOver && life.successor_takes.iter().any(|k| k == kind)
}

/// The sender of this generation (see `Handover::connection_sender`).
pub(crate) fn connection_sender(
    g: &Generation,
    slot: &Mutex<Slot>,
) -> Result<ConnectionSender, MigrateError> {
    // (No lock is taken while another is held: the life, then the slot.)
    if let Some(sender) = &lock(slot).sender {
        return Ok(sender.clone());
    }
    let (channel, taken) = {
        let life = g.life();
        match (life.state, life.successor.as_ref()) {
            (State::HandedOver, Some(ch)) => (ch.try_clone(), !life.successor_takes.is_empty()),
            _ => return Err(MigrateError::NotHandedOver),
        }
    };
    let channel = channel.map_err(|e| MigrateError::io("duplicating the channel", e))?;
    // A successor that said it takes nothing makes no offer: fail at once.
    let source = match taken {
        true => Source::Channel(channel),
        false => Source::NotTaken,
    };
    let mut slot = lock(slot);
    if let Some(sender) = &slot.sender {
        return Ok(sender.clone()); // another task was first
    }
    let deadline = Instant::now() + g.config.drain_timeout;
    let sender = ConnectionSender::spawn(source, deadline)?;
    slot.sender = Some(sender.clone());
    Ok(sender)
}

/// The incoming connections of this generation, once (see
/// `Handover::incoming_connections`).
pub(crate) fn incoming(
    g: Arc<Generation>,
    slot: &Mutex<Slot>,
    for_server: bool,
) -> Result<IncomingConnections, MigrateError> {
    let mut slot = lock(slot);
    if std::mem::replace(&mut slot.incoming_taken, true) {
        return Err(MigrateError::AlreadyTaken);
    }
    if !for_server {
        if slot.announced && g.from_predecessor {
            tracing::debug!(
                "incoming_connections() after ready(): the predecessor was told that this \
                 generation takes no connections (an older one offers them all the same)"
            );
        }
        slot.app_takes = true;
    }
    // The serving layer takes every connection as it comes: it may read
    // ahead, so that the old generation is done sooner.
    let read_ahead = match for_server {
        true => receive::READ_AHEAD,
        false => 1,
    };
    Ok(IncomingConnections::new(Phase::Commit(g), read_ahead))
}

#[cfg(test)]
mod tests;
