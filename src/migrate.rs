//! Connection migration: after the commit, the old generation hands its
//! established connections — any socket fd, each with a byte payload — and
//! later state to its successor, which owns the very same connections from
//! then on. The client sees nothing.
//!
//! # Example
//!
//! The old generation, after `upgrade()` returned `Ok`, hands each idle
//! connection over with the bytes it read but did not process; the
//! successor, right after `ready()`, serves what arrives:
//!
//! ```no_run
//! use handover::{Handover, Migrated};
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
//! // Successor: after `ready()`.
//! async fn take_over(handover: Handover) -> Result<(), Box<dyn std::error::Error>> {
//!     let mut incoming = handover.incoming_connections()?;
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
//!   [`Handover::incoming_connections`]): its sends fail with
//!   [`MigrateError::NotOffered`] and the connection comes back.
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
//! generation waits for the offer at most 5 s (and never past its
//! deadline); a successor whose predecessor is gone offers nothing.
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
//!   timeout from the first call to [`Handover::connection_sender`]). A
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

mod sock;
mod wire;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use wire::FrameError;

use crate::channel::{Inbox, Message, Next};
use crate::handover::Handover;
use crate::lifecycle::{State, lock};

/// The largest payload one connection carries: 64 KiB.
pub const MAX_PAYLOAD: usize = wire::MAX_PAYLOAD;
/// The largest state message: 16 MiB.
pub const MAX_STATE: usize = wire::MAX_STATE;

/// Connection records waiting for an answer at a time.
const WINDOW: usize = 2;
/// Requests queued in a sender.
const QUEUE: usize = 1024;
/// How long state and the end record may still go after the deadline for
/// connections (a final delta after a drain that ran to its deadline).
const STATE_GRACE: Duration = Duration::from_secs(5);
/// How long an old generation waits for its successor's offer, at most.
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection or a state was not handed over, or what was wrong with
/// what the other generation sent.
#[derive(Debug)]
#[non_exhaustive]
pub enum MigrateError {
    /// This process is not an old generation whose upgrade committed
    /// ([`Handover::connection_sender`] before `upgrade()` returned `Ok`).
    NotHandedOver,
    /// [`Handover::incoming_connections`] was already called in this process.
    AlreadyTaken,
    /// No tokio runtime to run the sender on.
    NoRuntime,
    /// The successor did not offer to take connections in time: it does
    /// not call [`Handover::incoming_connections`], or is a build without
    /// migration.
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
    /// A payload larger than [`MAX_PAYLOAD`].
    PayloadTooLarge {
        /// Its length.
        len: usize,
    },
    /// A state larger than [`MAX_STATE`].
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
    pub fn into_parts(self) -> (MigrateError, Option<(OwnedFd, Vec<u8>)>) {
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

/// How a sender's writer ended; every later request fails with it.
#[derive(Debug, Clone)]
enum Ended {
    NotOffered(Duration),
    Gone,
    TimedOut,
    Finished,
    Protocol(String),
    Failed(&'static str, io::ErrorKind, String),
}

impl Ended {
    fn error(&self) -> MigrateError {
        match self {
            Ended::NotOffered(waited) => MigrateError::NotOffered { waited: *waited },
            Ended::Gone => MigrateError::SuccessorGone,
            Ended::TimedOut => MigrateError::TimedOut,
            Ended::Finished => MigrateError::Finished,
            Ended::Protocol(reason) => MigrateError::Protocol {
                reason: reason.clone(),
            },
            Ended::Failed(context, kind, msg) => {
                MigrateError::io(context, io::Error::new(*kind, msg.clone()))
            }
        }
    }

    fn from_io(context: &'static str, e: &io::Error) -> Self {
        if is_gone(e) {
            Ended::Gone
        } else {
            Ended::Failed(context, e.kind(), e.to_string())
        }
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    )
}

enum What {
    Connection(OwnedFd, Vec<u8>),
    State(Vec<u8>),
    Finish,
}

struct Job {
    what: What,
    done: oneshot::Sender<Result<(), SendError>>,
}

impl Job {
    /// Answers the request with `error`, giving the connection back.
    fn fail(self, error: MigrateError) {
        let connection = match self.what {
            What::Connection(fd, payload) => Some((fd, payload)),
            What::State(_) | What::Finish => None,
        };
        let _ = self.done.send(Err(SendError { error, connection }));
    }

    fn succeed(self) {
        let _ = self.done.send(Ok(()));
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.what {
            What::Connection(fd, _) => Some(fd.as_fd()),
            _ => None,
        }
    }
}

/// Counters of a sender, for tests and logs.
#[derive(Debug, Default)]
struct Counts {
    records: AtomicU64,
    connections: AtomicU64,
    largest_batch: AtomicUsize,
}

/// Hands established connections and state to the successor, from any
/// task of the old generation, after its upgrade committed. Cheap to clone;
/// clones share one migration socket and one deadline.
///
/// Get it from [`Handover::connection_sender`]. Requests from all clones
/// are batched: whatever is queued when the socket can take a record goes
/// in one record, up to 253 connections or 128 KiB.
#[derive(Debug, Clone)]
pub struct ConnectionSender {
    tx: mpsc::Sender<Job>,
    ended: Arc<Mutex<Option<Ended>>>,
    deadline: Instant,
    #[cfg_attr(not(test), allow(dead_code))]
    counts: Arc<Counts>,
}

/// Where a sender gets its migration socket.
enum Source {
    /// The channel to the successor: wait for its offer.
    Channel(OwnedFd),
    /// An already connected migration socket (tests).
    #[cfg(test)]
    Socket(OwnedFd),
}

impl ConnectionSender {
    fn spawn(source: Source, deadline: Instant) -> Result<Self, MigrateError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| MigrateError::NoRuntime)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let ended = Arc::new(Mutex::new(None));
        let counts = Arc::new(Counts::default());
        rt.spawn(run_writer(
            source,
            rx,
            deadline,
            ended.clone(),
            counts.clone(),
        ));
        Ok(ConnectionSender {
            tx,
            ended,
            deadline,
            counts,
        })
    }

    /// When connections not taken by the successor are closed.
    pub fn deadline(&self) -> std::time::Instant {
        self.deadline.into_std()
    }

    /// Hands `connection` with `payload` (bytes read but not processed, the
    /// application's per-connection state) to the successor, and resolves
    /// once the successor has taken it: this generation's copy is closed
    /// then, and the connection lives on in the successor.
    ///
    /// `connection` is any socket: a `std::net::TcpStream`, an
    /// [`OwnedFd`], or a tokio stream after `into_std()`. It must be off
    /// every reactor of this process first (tokio's `into_std()` does
    /// that): epoll keeps watching a socket that is still open elsewhere,
    /// even after this process closed its fd. On error the connection is given back when
    /// this generation is its only holder
    /// ([`SendError::into_connection`]): before the successor offered, when
    /// it is gone, when it refused it. One sent but not taken by the
    /// deadline is shut down and closed.
    ///
    /// Dropping the future does not take the connection back: it is handed
    /// over, or closed if it cannot be.
    pub async fn send(
        &self,
        connection: impl Into<OwnedFd>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), SendError> {
        let fd = connection.into();
        let payload = payload.into();
        let refused = if payload.len() > MAX_PAYLOAD {
            Some(MigrateError::PayloadTooLarge { len: payload.len() })
        } else {
            sock::not_a_socket(fd.as_fd()).map(|found| MigrateError::NotASocket { found })
        };
        if let Some(error) = refused {
            return Err(SendError {
                error,
                connection: Some((fd, payload)),
            });
        }
        self.request(What::Connection(fd, payload)).await
    }

    /// Sends `state` (at most [`MAX_STATE`] bytes) to the successor, in
    /// order with the connections sent before and after it, and resolves
    /// once the successor has taken all of it. For state that changed while
    /// this generation drained: send a final delta after the drain, then
    /// [`finish`](Self::finish). State may go until 5 s after the
    /// [`deadline`](Self::deadline).
    pub async fn send_state(&self, state: impl Into<Vec<u8>>) -> Result<(), SendError> {
        let state = state.into();
        if state.len() > MAX_STATE {
            return Err(SendError {
                error: MigrateError::StateTooLarge { len: state.len() },
                connection: None,
            });
        }
        self.request(What::State(state)).await
    }

    /// Tells the successor that nothing more follows, once everything
    /// requested before has been taken (or has failed); its
    /// [`IncomingConnections::recv`] then returns `None`. Later requests
    /// fail with [`MigrateError::Finished`].
    pub async fn finish(&self) -> Result<(), MigrateError> {
        self.request(What::Finish).await.map_err(|e| e.error)
    }

    async fn request(&self, what: What) -> Result<(), SendError> {
        let (done, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.tx.send(Job { what, done }).await {
            job.fail(self.ended_error());
            return Err(match answer.await {
                Ok(Err(e)) => e,
                _ => SendError {
                    error: self.ended_error(),
                    connection: None,
                },
            });
        }
        match answer.await {
            Ok(result) => result,
            // The writer was dropped with its runtime.
            Err(_) => Err(SendError {
                error: self.ended_error(),
                connection: None,
            }),
        }
    }

    fn ended_error(&self) -> MigrateError {
        match &*lock(&self.ended) {
            Some(ended) => ended.error(),
            None => MigrateError::io("the sender stopped", io::ErrorKind::BrokenPipe.into()),
        }
    }
}

/// The old generation's writer: waits for the offer, then sends records
/// and reads answers until finished, gone, or the deadline.
async fn run_writer(
    source: Source,
    mut rx: mpsc::Receiver<Job>,
    deadline: Instant,
    ended_slot: Arc<Mutex<Option<Ended>>>,
    counts: Arc<Counts>,
) {
    let socket = match source {
        Source::Channel(channel) => await_offer(channel, deadline).await,
        #[cfg(test)]
        Source::Socket(fd) => Ok(fd),
    };
    let mut writer = Writer {
        seq: 0,
        outbox: VecDeque::new(),
        inflight: VecDeque::new(),
        carry: None,
        finish: None,
        counts,
        ended: ended_slot.clone(),
        connections_closed: false,
    };
    let ended = match socket {
        Ok(fd) => match sock::register(fd) {
            Ok(fd) => writer.run(&fd, &mut rx, deadline).await,
            Err(e) => Ended::from_io("registering the migration socket", &e),
        },
        Err(e) => e,
    };
    let records = writer.counts.records.load(Ordering::Relaxed);
    let connections = writer.counts.connections.load(Ordering::Relaxed);
    match &ended {
        Ended::Finished => {
            tracing::debug!(records, connections, "connection migration finished")
        }
        other => {
            tracing::info!(records, connections, error = %other.error(), "connection migration ended")
        }
    }
    // Every request not answered yet gets the reason; connections that
    // never reached the successor go back to their senders.
    *lock(&ended_slot) = Some(ended.clone());
    rx.close();
    writer.fail_all(&ended);
    while let Ok(job) = rx.try_recv() {
        job.fail(ended.error());
    }
}

/// Reads the channel until the successor's offer; returns the migration
/// socket it carries.
async fn await_offer(channel: OwnedFd, deadline: Instant) -> Result<OwnedFd, Ended> {
    let start = Instant::now();
    let until = deadline.min(start + OFFER_TIMEOUT);
    let channel =
        sock::register(channel).map_err(|e| Ended::from_io("registering the channel", &e))?;
    let mut inbox = Inbox::default();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 512];
    let mut cmsg = sock::cmsg_buffer();
    loop {
        let mut guard = match tokio::time::timeout_at(until, channel.readable()).await {
            Err(_) => return Err(Ended::NotOffered(start.elapsed())),
            Ok(Err(e)) => return Err(Ended::from_io("waiting on the channel", &e)),
            Ok(Ok(g)) => g,
        };
        let got = match guard.try_io(|fd| sock::recv_with_fds(fd.as_fd(), &mut buf, &mut cmsg)) {
            Err(_would_block) => continue,
            Ok(Err(e)) => return Err(Ended::from_io("reading the channel", &e)),
            Ok(Ok(got)) => got,
        };
        if got.len == 0 && got.fds.is_empty() {
            return Err(Ended::Gone);
        }
        inbox.push(&buf[..got.len]);
        fds.extend(got.fds);
        loop {
            let version = match inbox.next() {
                Next::Incomplete => break,
                Next::Message(Message::MigrationOffer(version)) => version,
                // A message sent before the commit was read (an unhealthy
                // report that crossed it): not for us.
                other => {
                    tracing::debug!(message = ?other, "skipped on the channel before the offer");
                    continue;
                }
            };
            if version < wire::VERSION {
                return Err(Ended::Protocol(format!(
                    "the successor reads record version {version}; this build writes {}",
                    wire::VERSION
                )));
            }
            let fd = match (fds.pop(), fds.is_empty()) {
                (Some(fd), true) => fd,
                (fd, _) => {
                    return Err(Ended::Protocol(format!(
                        "the offer came with {} fds instead of 1",
                        fds.len() + usize::from(fd.is_some())
                    )));
                }
            };
            if !sock::is_seqpacket(fd.as_fd()) {
                return Err(Ended::Protocol(
                    "the offered fd is not an AF_UNIX SOCK_SEQPACKET socket".into(),
                ));
            }
            tracing::debug!(
                ms = start.elapsed().as_secs_f64() * 1e3,
                "the successor offered to take connections"
            );
            return Ok(fd);
        }
    }
}

/// How reading the answers ended.
enum Drained {
    /// Nothing more to read now.
    WouldBlock,
    /// The writer is done.
    Ended(Ended),
}

/// A record built but not sent yet.
struct Out {
    seq: u32,
    record: Vec<u8>,
    /// The connection requests in it, or the state request on its last chunk.
    jobs: Vec<Job>,
    has_fds: bool,
}

/// A record sent, waiting for the successor's answer.
struct Sent {
    seq: u32,
    jobs: Vec<Job>,
    has_fds: bool,
}

struct Writer {
    seq: u32,
    outbox: VecDeque<Out>,
    inflight: VecDeque<Sent>,
    /// A request taken from the queue that did not fit the last record.
    carry: Option<Job>,
    /// The finish request, once taken.
    finish: Option<Job>,
    counts: Arc<Counts>,
    /// How the writer ended, for requests that come too late.
    ended: Arc<Mutex<Option<Ended>>>,
    /// Past the deadline for connections: only state and the end may go.
    connections_closed: bool,
}

impl Writer {
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn fd_records_waiting(&self) -> usize {
        self.inflight.iter().filter(|s| s.has_fds).count()
            + self.outbox.iter().filter(|o| o.has_fds).count()
    }

    async fn run(
        &mut self,
        sock: &AsyncFd<OwnedFd>,
        rx: &mut mpsc::Receiver<Job>,
        deadline: Instant,
    ) -> Ended {
        let mut queue_closed = false;
        let mut answer = vec![0u8; wire::HEADER_LEN + wire::MAX_REASON + 1];
        let mut cmsg = sock::cmsg_buffer();
        let hard = deadline + STATE_GRACE;
        loop {
            let may_take = self.finish.is_none()
                && self.outbox.is_empty()
                && self.fd_records_waiting() < WINDOW;
            if may_take {
                if let Some(job) = self.carry.take() {
                    self.take(job, rx);
                    continue;
                }
            }
            let ending = (self.finish.is_some() || queue_closed)
                && self.carry.is_none()
                && self.outbox.is_empty()
                && self.inflight.is_empty();
            if ending {
                return self.send_end(sock, hard).await;
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(hard) => {
                    self.time_out();
                    return Ended::TimedOut;
                }
                _ = tokio::time::sleep_until(deadline), if !self.connections_closed => {
                    self.close_connections();
                }
                ready = sock.readable() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => return Ended::from_io("waiting on the migration socket", &e),
                    };
                    match self.read_answers(sock.get_ref().as_fd(), &mut answer, &mut cmsg) {
                        Drained::WouldBlock => guard.clear_ready(),
                        Drained::Ended(ended) => return ended,
                    }
                }
                ready = sock.writable(), if !self.outbox.is_empty() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => return Ended::from_io("waiting on the migration socket", &e),
                    };
                    while let Some(out) = self.outbox.front() {
                        let fds: Vec<BorrowedFd<'_>> = out.jobs.iter().filter_map(Job::fd).collect();
                        let sent = guard.try_io(|s| sock::send_record(s.as_fd(), &out.record, &fds));
                        drop(fds);
                        match sent {
                            Err(_would_block) => break,
                            Ok(Ok(())) => {
                                let Some(out) = self.outbox.pop_front() else { break };
                                self.sent(out);
                            }
                            Ok(Err(e)) if is_gone(&e) => {
                                // Answers it sent before it went still count.
                                let _ = self.read_answers(sock.get_ref().as_fd(), &mut answer, &mut cmsg);
                                return Ended::Gone;
                            }
                            Ok(Err(e)) => {
                                // This record only (ETOOMANYREFS, say): its
                                // connections go back; the next may pass.
                                tracing::warn!(error = %e, "cannot send a record to the successor");
                                if let Some(out) = self.outbox.pop_front() {
                                    for job in out.jobs {
                                        job.fail(MigrateError::io("sending a record", io::Error::new(e.kind(), e.to_string())));
                                    }
                                }
                            }
                        }
                    }
                }
                job = rx.recv(), if may_take && !queue_closed => match job {
                    Some(job) => self.take(job, rx),
                    None => queue_closed = true,
                },
            }
        }
    }

    /// Reads every answer queued on the migration socket.
    fn read_answers(&mut self, fd: BorrowedFd<'_>, answer: &mut [u8], cmsg: &mut [u8]) -> Drained {
        let mut reset = false;
        loop {
            match sock::recv_with_fds(fd, answer, cmsg) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return match reset {
                        true => Drained::Ended(Ended::Gone),
                        false => Drained::WouldBlock,
                    };
                }
                // The successor closed with records unread: the kernel
                // reports ECONNRESET once, before the answers it sent
                // earlier. Read those first.
                Err(e) if is_gone(&e) && !reset => reset = true,
                Err(e) => {
                    return Drained::Ended(Ended::from_io("reading the migration socket", &e));
                }
                Ok(got) if got.len == 0 && got.fds.is_empty() => {
                    return Drained::Ended(Ended::Gone);
                }
                Ok(got) => self.answered(&answer[..got.len], got.fds.len(), got.truncated),
            }
        }
    }

    /// Turns `first`, and whatever else is queued and fits, into records.
    fn take(&mut self, first: Job, rx: &mut mpsc::Receiver<Job>) {
        if self.connections_closed && matches!(first.what, What::Connection(..)) {
            first.fail(MigrateError::TimedOut);
            return;
        }
        match first.what {
            What::Finish => {
                self.finish = Some(first);
                // Nothing after the finish is sent.
                *lock(&self.ended) = Some(Ended::Finished);
                rx.close();
                while let Ok(job) = rx.try_recv() {
                    job.fail(MigrateError::Finished);
                }
            }
            What::State(_) => self.take_state(first),
            What::Connection(..) => {
                let mut jobs = vec![first];
                let mut bytes = payload_len(&jobs[0]);
                while jobs.len() < wire::MAX_FDS {
                    let Ok(job) = rx.try_recv() else { break };
                    let len = payload_len(&job);
                    let fits = matches!(job.what, What::Connection(..))
                        && wire::connections_len(jobs.len() + 1, bytes + len) <= wire::MAX_RECORD;
                    if !fits {
                        self.carry = Some(job);
                        break;
                    }
                    bytes += len;
                    jobs.push(job);
                }
                let payloads: Vec<&[u8]> = jobs
                    .iter()
                    .map(|j| match &j.what {
                        What::Connection(_, p) => p.as_slice(),
                        _ => &[],
                    })
                    .collect();
                let seq = self.seq.wrapping_add(1);
                let record = wire::encode_connections(seq, &payloads);
                drop(payloads);
                self.seq = seq;
                self.outbox.push_back(Out {
                    seq,
                    record,
                    jobs,
                    has_fds: true,
                });
            }
        }
    }

    fn take_state(&mut self, job: Job) {
        let What::State(data) = &job.what else {
            return;
        };
        let chunks: Vec<Vec<u8>> = if data.is_empty() {
            vec![Vec::new()]
        } else {
            data.chunks(wire::MAX_CHUNK).map(<[u8]>::to_vec).collect()
        };
        let last = chunks.len() - 1;
        let mut job = Some(job);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let seq = self.next_seq();
            let jobs = if i == last {
                job.take().into_iter().collect()
            } else {
                Vec::new()
            };
            self.outbox.push_back(Out {
                seq,
                record: wire::encode_state(seq, &chunk, i != last),
                jobs,
                has_fds: false,
            });
        }
    }

    fn sent(&mut self, out: Out) {
        if out.has_fds {
            let n = out.jobs.len();
            self.counts.records.fetch_add(1, Ordering::Relaxed);
            self.counts
                .connections
                .fetch_add(n as u64, Ordering::Relaxed);
            self.counts.largest_batch.fetch_max(n, Ordering::Relaxed);
        }
        self.inflight.push_back(Sent {
            seq: out.seq,
            jobs: out.jobs,
            has_fds: out.has_fds,
        });
    }

    /// An answer from the successor.
    fn answered(&mut self, record: &[u8], fds: usize, truncated: bool) {
        let decoded = if truncated {
            Err(FrameError::TooLong)
        } else {
            wire::decode(record, fds)
        };
        let (seq, refused) = match decoded {
            Ok(wire::Record::Taken { seq }) => (seq, None),
            Ok(wire::Record::Refused { seq, reason }) => (seq, Some(reason)),
            Ok(other) => {
                tracing::warn!(record = ?other, "unexpected record from the successor; ignored");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "unreadable record from the successor; ignored");
                return;
            }
        };
        let Some(at) = self.inflight.iter().position(|s| s.seq == seq) else {
            // (Or for a record whose connections were closed at the deadline.)
            tracing::debug!(seq, "an answer for no record in flight; ignored");
            return;
        };
        let Some(sent) = self.inflight.remove(at) else {
            return;
        };
        match refused {
            // Ours are closed: the successor holds the connections now.
            None => sent.jobs.into_iter().for_each(Job::succeed),
            Some(reason) => {
                tracing::warn!(seq, %reason, "the successor refused a record");
                for job in sent.jobs {
                    job.fail(MigrateError::Refused {
                        reason: reason.clone(),
                    });
                }
            }
        }
    }

    /// The deadline for connections: those the successor may hold a copy
    /// of are shut down for every holder, the others go back; state and
    /// the end may still go until the grace ends.
    fn close_connections(&mut self) {
        self.connections_closed = true;
        let (sent, kept): (VecDeque<Sent>, VecDeque<Sent>) =
            self.inflight.drain(..).partition(|s| s.has_fds);
        self.inflight = kept;
        for job in sent.into_iter().flat_map(|s| s.jobs) {
            if let Some(fd) = job.fd() {
                sock::shutdown(fd);
            }
            let _ = job.done.send(Err(SendError {
                error: MigrateError::TimedOut,
                connection: None,
            }));
        }
        let (unsent, kept): (VecDeque<Out>, VecDeque<Out>) =
            self.outbox.drain(..).partition(|o| o.has_fds);
        self.outbox = kept;
        let carried = self
            .carry
            .take_if(|j| matches!(j.what, What::Connection(..)));
        for job in unsent.into_iter().flat_map(|o| o.jobs).chain(carried) {
            job.fail(MigrateError::TimedOut);
        }
        tracing::info!(
            "deadline for connection migration: what was not taken is closed or given back"
        );
    }

    /// The end of the grace: what the successor may hold a copy of is shut
    /// down for every holder; the rest goes back.
    fn time_out(&mut self) {
        for sent in self.inflight.drain(..) {
            for job in sent.jobs {
                if let Some(fd) = job.fd() {
                    sock::shutdown(fd);
                }
                let _ = job.done.send(Err(SendError {
                    error: MigrateError::TimedOut,
                    connection: None,
                }));
            }
        }
        self.fail_all(&Ended::TimedOut);
    }

    /// Answers every request still held with `ended`.
    fn fail_all(&mut self, ended: &Ended) {
        let jobs = self
            .inflight
            .drain(..)
            .flat_map(|s| s.jobs)
            .chain(self.outbox.drain(..).flat_map(|o| o.jobs))
            .chain(self.carry.take());
        for job in jobs {
            job.fail(ended.error());
        }
        if let Some(job) = self.finish.take() {
            match ended {
                Ended::Finished => job.succeed(),
                other => job.fail(other.error()),
            }
        }
    }

    async fn send_end(&mut self, sock: &AsyncFd<OwnedFd>, deadline: Instant) -> Ended {
        let record = wire::encode_end(self.next_seq());
        loop {
            let ready = tokio::time::timeout_at(deadline, sock.writable()).await;
            let mut guard = match ready {
                Err(_) => return Ended::TimedOut,
                Ok(Err(e)) => return Ended::from_io("waiting on the migration socket", &e),
                Ok(Ok(g)) => g,
            };
            match guard.try_io(|s| sock::send_record(s.as_fd(), &record, &[])) {
                Err(_would_block) => continue,
                Ok(Ok(())) => return Ended::Finished,
                Ok(Err(e)) => return Ended::from_io("sending the end record", &e),
            }
        }
    }
}

fn payload_len(job: &Job) -> usize {
    match &job.what {
        What::Connection(_, p) => p.len(),
        _ => 0,
    }
}

/// A connection handed over by the old generation: the very same socket,
/// and the payload it was sent with.
#[derive(Debug)]
pub struct MigratedConnection {
    fd: OwnedFd,
    payload: Vec<u8>,
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
        let tcp = matches!(
            sock.domain(),
            Ok(socket2::Domain::IPV4 | socket2::Domain::IPV6)
        ) && sock.r#type().ok() == Some(socket2::Type::STREAM);
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
    /// A state message ([`ConnectionSender::send_state`]).
    State(Vec<u8>),
}

enum Phase {
    /// Wait for the commit, then offer over the channel.
    Commit(Handover),
    /// Offer over this channel (tests: no handover).
    #[cfg(test)]
    Offer(OwnedFd),
    Open(AsyncFd<OwnedFd>),
    Done,
}

/// The successor's side: connections and state from the old generation,
/// from [`Handover::incoming_connections`].
///
/// Read it with [`recv`](Self::recv) from one task; the old generation's
/// sends resolve as the records are read, so a successor that stops reading
/// holds back (and, at the old generation's deadline, loses) the
/// connections not read yet.
pub struct IncomingConnections {
    phase: Phase,
    pending: VecDeque<Result<Migrated, MigrateError>>,
    /// Answers owed to the old generation, sent before anything of their
    /// records is yielded.
    owed: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    cmsg: Vec<u8>,
    state: Vec<u8>,
    state_too_large: bool,
    /// The old generation's close was reported (`ECONNRESET`).
    reset: bool,
    records: u64,
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
    fn new(phase: Phase) -> Self {
        IncomingConnections {
            phase,
            pending: VecDeque::new(),
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
    /// handover is committed (see [`Handover::committed`]). Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Migrated, MigrateError>> {
        loop {
            if let Err(e) = self.pay_answers().await {
                self.pending.push_back(Err(e));
            }
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            match &self.phase {
                Phase::Done => return None,
                Phase::Commit(h) => {
                    let h = h.clone();
                    if let Err(e) = h.committed().await {
                        self.phase = Phase::Done;
                        return Some(Err(MigrateError::io(
                            "waiting for the commit",
                            io::Error::other(e),
                        )));
                    }
                    // A generation its predecessor took back gets nothing.
                    let channel = {
                        let life = h.g.life();
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
                    match guard.try_io(|fd| sock::recv_with_fds(fd.as_fd(), buf, cmsg)) {
                        Err(_would_block) => {}
                        // The old generation closed with answers unread: the
                        // kernel reports ECONNRESET once, before the records
                        // still queued here, which are ours alone now.
                        Ok(Err(e)) if is_gone(&e) && !self.reset => self.reset = true,
                        Ok(Err(e)) if is_gone(&e) => self.phase = Phase::Done,
                        Ok(Err(e)) => {
                            self.phase = Phase::Done;
                            return Some(Err(MigrateError::io("reading the migration socket", e)));
                        }
                        Ok(Ok(got)) => self.take_record(got),
                    }
                }
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
                    self.pending
                        .push_back(match sock::not_a_socket(fd.as_fd()) {
                            None => Ok(Migrated::Connection(MigratedConnection {
                                fd,
                                payload: payload.to_vec(),
                            })),
                            Some(found) => Err(MigrateError::NotASocket { found }),
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

/// What one process did with connection migration.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    sender: Option<ConnectionSender>,
    incoming_taken: bool,
}

impl Handover {
    /// After an upgrade committed, the sender that hands established
    /// connections (and later state) to the successor; the same one on every
    /// call. Its deadline is the drain timeout from the first call: what
    /// the successor has not taken by then is closed (state may still go
    /// for 5 s more). See
    /// [`ConnectionSender`] and [`MigrateError::NotHandedOver`].
    ///
    /// Needs a tokio runtime, which runs its writer.
    pub fn connection_sender(&self) -> Result<ConnectionSender, MigrateError> {
        // (No lock is taken while another is held: the life, then the slot.)
        if let Some(sender) = &lock(&self.g.migrate).sender {
            return Ok(sender.clone());
        }
        let channel = {
            let life = self.g.life();
            match (life.state, life.successor.as_ref()) {
                (State::HandedOver, Some(ch)) => ch.try_clone(),
                _ => return Err(MigrateError::NotHandedOver),
            }
        };
        let channel = channel.map_err(|e| MigrateError::io("duplicating the channel", e))?;
        let mut slot = lock(&self.g.migrate);
        if let Some(sender) = &slot.sender {
            return Ok(sender.clone()); // another task was first
        }
        let deadline = Instant::now() + self.g.config.drain_timeout;
        let sender = ConnectionSender::spawn(Source::Channel(channel), deadline)?;
        slot.sender = Some(sender.clone());
        Ok(sender)
    }

    /// Hands `connection` with `payload` to the successor through
    /// [`connection_sender`](Self::connection_sender); see
    /// [`ConnectionSender::send`].
    pub async fn send_connection(
        &self,
        connection: impl Into<OwnedFd>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), SendError> {
        match self.connection_sender() {
            Ok(sender) => sender.send(connection, payload).await,
            Err(error) => Err(SendError {
                error,
                connection: Some((connection.into(), payload.into())),
            }),
        }
    }

    /// The connections and state the old generation hands to this one, once
    /// per process. Start reading it right after [`ready`](Self::ready): the
    /// old generation waits for this generation's offer (made by the first
    /// [`IncomingConnections::recv`], after the commit) at most 5 s before
    /// it keeps its connections. For a process without predecessor it
    /// yields nothing.
    pub fn incoming_connections(&self) -> Result<IncomingConnections, MigrateError> {
        let mut slot = lock(&self.g.migrate);
        if std::mem::replace(&mut slot.incoming_taken, true) {
            return Err(MigrateError::AlreadyTaken);
        }
        Ok(IncomingConnections::new(Phase::Commit(self.clone())))
    }
}

#[cfg(test)]
mod tests;
