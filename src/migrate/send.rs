//! The old generation's side: [`ConnectionSender`] queues requests from any
//! task; one writer task per generation waits for the successor's offer,
//! batches the requests into records, and settles each request when the
//! successor answers the record it went in, or at the deadline.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{FrameError, MAX_PAYLOAD, MAX_STATE, MigrateError, SendError, is_gone, sock, wire};
use crate::channel::{Inbox, Message, Next};
use crate::lifecycle::lock;

/// Connection records waiting for an answer at a time, at most (the
/// kernel queues 11 records on a migration socket by default,
/// `net.unix.max_dgram_qlen` + 1).
pub(super) const WINDOW: usize = 8;
/// Connections in the records waiting for an answer, at most (two full
/// records): every fd in flight counts against the user's `RLIMIT_NOFILE`
/// in the kernel (`ETOOMANYREFS` past it). Small records, sent while the
/// queue is short, leave room for more records, not for more fds.
pub(super) const WINDOW_FDS: usize = 2 * wire::MAX_FDS;
/// Requests queued in a sender.
const QUEUE: usize = 1024;
/// How long state and the end record may still go after the deadline for
/// connections (a final delta after a drain that ran to its deadline).
const STATE_GRACE: Duration = Duration::from_secs(5);
/// How long an old generation waits for its successor's offer, at most.
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);

/// How a sender's writer ended; every later request fails with it.
#[derive(Debug, Clone)]
enum Ended {
    NotTaken,
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
            Ended::NotTaken => MigrateError::NotTaken,
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

enum What {
    Connection(OwnedFd, Vec<u8>),
    State(Vec<u8>),
    Finish,
}

/// What is done with a request's outcome.
pub(crate) enum Done {
    /// Sent to the task that awaits it ([`ConnectionSender::send`]).
    Reply(oneshot::Sender<Result<(), SendError>>),
    /// Called in the writer task, which must not block: the serving layer's
    /// connections, whose tasks end once they are queued
    /// ([`ConnectionSender::send_then`]).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Then(Box<dyn FnOnce(Result<(), SendError>) + Send>),
}

impl Done {
    fn send(self, result: Result<(), SendError>) {
        match self {
            Done::Reply(tx) => {
                let _ = tx.send(result);
            }
            Done::Then(then) => then(result),
        }
    }
}

struct Job {
    what: What,
    done: Done,
}

impl Job {
    /// Answers the request with `error`, giving the connection back.
    fn fail(self, error: MigrateError) {
        let connection = match self.what {
            What::Connection(fd, payload) => Some((fd, payload)),
            What::State(_) | What::Finish => None,
        };
        self.done.send(Err(SendError { error, connection }));
    }

    /// Answers the request with `error`, the connection shut down for
    /// every holder (a copy may be in the successor's queue) and closed.
    fn shut_down(self, error: MigrateError) {
        if let Some(fd) = self.fd() {
            sock::shutdown(fd);
        }
        self.done.send(Err(SendError {
            error,
            connection: None,
        }));
    }

    fn succeed(self) {
        // The successor holds the connection: ours is closed first.
        drop(self.what);
        self.done.send(Ok(()));
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
pub(super) struct Counts {
    pub(super) records: AtomicU64,
    pub(super) connections: AtomicU64,
    pub(super) largest_batch: AtomicUsize,
}

/// Hands established connections and state to the successor, from any
/// task of the old generation, after its upgrade committed. Cheap to clone;
/// clones share one migration socket and one deadline.
///
/// Get it from [`Handover::connection_sender`](crate::Handover::connection_sender). Requests from all clones
/// are batched: whatever is queued when the socket can take a record goes
/// in one record, up to 253 connections or 128 KiB.
#[derive(Debug, Clone)]
pub struct ConnectionSender {
    tx: mpsc::Sender<Job>,
    ended: Arc<Mutex<Option<Ended>>>,
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) counts: Arc<Counts>,
}

/// Where a sender gets its migration socket.
pub(super) enum Source {
    /// The channel to the successor: wait for its offer.
    Channel(OwnedFd),
    /// A successor that takes no connections: nothing to wait for.
    NotTaken,
    /// An already connected migration socket (tests).
    #[cfg(test)]
    Socket(OwnedFd),
}

impl ConnectionSender {
    pub(super) fn spawn(source: Source, deadline: Instant) -> Result<Self, MigrateError> {
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
        Ok(ConnectionSender { tx, ended, counts })
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

    /// Queues `connection` — a TCP socket of this process's serving layer,
    /// off its reactor — with `payload` for the successor, and returns once
    /// it is queued (waiting only while the queue is full); `then` gets the
    /// outcome, as [`send`](Self::send) would return it, in the writer task:
    /// it must not block. So a connection's task ends as soon as its
    /// connection is on its way, and the writer settles a whole record at
    /// once: no task is woken per connection when the successor took it.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) async fn send_then(
        &self,
        connection: OwnedFd,
        payload: Vec<u8>,
        then: Box<dyn FnOnce(Result<(), SendError>) + Send>,
    ) {
        let job = Job {
            what: What::Connection(connection, payload),
            done: Done::Then(then),
        };
        if payload_len(&job) > MAX_PAYLOAD {
            let len = payload_len(&job);
            return job.fail(MigrateError::PayloadTooLarge { len });
        }
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job).await {
            job.fail(self.ended_error());
        }
    }

    /// Sends `state` (at most 16 MiB) to the successor, in
    /// order with the connections sent before and after it, and resolves
    /// once the successor has taken all of it. For state that changed while
    /// this generation drained: send a final delta after the drain, then
    /// [`finish`](Self::finish). State may go until 5 s after the drain's
    /// deadline.
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
    /// [`IncomingConnections::recv`](super::IncomingConnections::recv) then returns `None`. Later requests
    /// fail with [`MigrateError::Finished`].
    pub async fn finish(&self) -> Result<(), MigrateError> {
        self.request(What::Finish).await.map_err(|e| e.error)
    }

    async fn request(&self, what: What) -> Result<(), SendError> {
        let (done, answer) = oneshot::channel();
        let done = Done::Reply(done);
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
        Source::NotTaken => Err(Ended::NotTaken),
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
        Ended::Finished | Ended::NotTaken => {
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

    /// Connection records and their connections sent or built but not
    /// answered yet.
    fn waiting(&self) -> (usize, usize) {
        let sent = self
            .inflight
            .iter()
            .filter(|s| s.has_fds)
            .map(|s| s.jobs.len());
        let built = self
            .outbox
            .iter()
            .filter(|o| o.has_fds)
            .map(|o| o.jobs.len());
        sent.chain(built)
            .fold((0, 0), |(records, fds), n| (records + 1, fds + n))
    }

    /// How many connections the next record may carry: none while the
    /// window is full.
    fn room(&self) -> usize {
        let (records, fds) = self.waiting();
        match records < WINDOW {
            true => WINDOW_FDS.saturating_sub(fds).min(wire::MAX_FDS),
            false => 0,
        }
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
            let may_take = self.finish.is_none() && self.outbox.is_empty() && self.room() > 0;
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
                let room = self.room().max(1);
                let mut jobs = Vec::with_capacity(room.min(rx.len() + 1));
                jobs.push(first);
                let mut bytes = payload_len(&jobs[0]);
                while jobs.len() < room {
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
            job.shut_down(MigrateError::TimedOut);
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
        for job in self.inflight.drain(..).flat_map(|s| s.jobs) {
            job.shut_down(MigrateError::TimedOut);
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
