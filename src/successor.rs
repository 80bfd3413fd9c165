//! The successor's side of the channel: the state it receives, the reasons
//! it sends (failure, unhealthy), and what it takes in from its predecessor
//! after `ready()` (the commit, a taking back, the drain report, EOF).
//!
//! Before `ready()` the channel carries the state stream, read with blocking
//! calls; nothing here reads messages until then.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::channel::{self, Message, Next};
use crate::error::Error;
use crate::lifecycle::{Generation, Life, State, lock};
use crate::pidfile;
use crate::sys;

/// The reason of an `X` (called off) waiting on the channel, if the
/// predecessor sent one before it closed it.
fn called_off(channel: BorrowedFd<'_>) -> Option<String> {
    let mut inbox = crate::channel::Inbox::default();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = sys::recv(channel, &mut buf, libc::MSG_DONTWAIT) {
        inbox.push(&buf[..n]);
    }
    loop {
        match inbox.next() {
            Next::Message(Message::CalledOff(reason)) => return Some(reason),
            Next::Incomplete => return None,
            _ => {}
        }
    }
}

/// The thread of [`Generation::watch_predecessor`]: it ends once the
/// predecessor is gone (its hang-up taken in here, or elsewhere), or the
/// generation is. Until the commit (a probation window), with `report`, it
/// first sends the canary's counts every 100 ms and takes in what the
/// predecessor sends (the pacing, a taking back: see `canary`).
fn watch(g: Weak<Generation>, ch: OwnedFd, report: bool) {
    if report && !report_counts(&g, ch.as_fd()) {
        return;
    }
    loop {
        let until = Instant::now() + WATCH_SLICE;
        // No event asked for: poll still reports POLLHUP, which a Unix
        // stream socket gets once the other end is closed, and POLLERR.
        let hung_up = match sys::poll_until(&[(ch.as_fd(), 0)], until) {
            Ok(rev) => rev[0] != 0,
            Err(_) => return,
        };
        let Some(g) = g.upgrade() else {
            return;
        };
        if g.life().predecessor.is_none() {
            // Taken in elsewhere, or this generation handed over: the
            // copies are of no further use either.
            lock(&g.reserve).drop_channel_copies();
            return;
        }
        if hung_up {
            // What it sent last (its commit, its drain report), then its end
            // of file, which closes the channel and its copies; 1 MiB a
            // call, bounded.
            for _ in 0..1024 {
                if !matches!(g.pump(), Ok(false)) {
                    break;
                }
            }
            return;
        }
    }
}

/// The canary's side of a probation window: every [`REPORT_EVERY`] its
/// counts go to the predecessor, and what the predecessor sends is taken in
/// as it comes (a pacing report, the commit, a taking back, which starts
/// this generation's drain). Returns once the window is over: `false` if
/// the predecessor or this generation is gone.
///
/// [`REPORT_EVERY`]: crate::canary::REPORT_EVERY
fn report_counts(g: &Weak<Generation>, ch: BorrowedFd<'_>) -> bool {
    let every = crate::canary::REPORT_EVERY;
    let mut next = Instant::now() + every;
    let mut reporting = true;
    loop {
        if sys::poll_until(&[(ch, libc::POLLIN)], next).is_err() {
            return true;
        }
        let Some(g) = g.upgrade() else {
            return false;
        };
        let closed = g.pump().unwrap_or(true);
        {
            let life = g.life();
            if closed || life.predecessor.is_none() {
                return false;
            }
            if life.committed || life.rolled_back {
                return true;
            }
        }
        if reporting && Instant::now() >= next {
            let msg = Message::CanaryCounts(g.canary.snapshot()).encode();
            // The predecessor reads them as they come: room is a matter of
            // moments, else it is not listening, and reports stop.
            let until = Instant::now() + Duration::from_secs(1);
            if let Err(e) = crate::ready::send_bounded(ch, &msg, until) {
                tracing::debug!(error = %e, "canary counts not sent; reports stop");
                reporting = false;
            }
            next = Instant::now() + every;
        } else if !reporting {
            next = Instant::now() + every;
        }
    }
}

/// Sends `F<reason>` to the predecessor (best effort: it may be gone).
pub(crate) fn send_failure(channel: BorrowedFd<'_>, reason: &str) {
    let msg = Message::Failed(reason.to_owned()).encode();
    if let Err(e) = sys::send_all(channel, &msg) {
        tracing::warn!(error = %e, "cannot send the failure reason to the predecessor");
    }
}

/// How often the thread watching the predecessor (see
/// [`Generation::watch_predecessor`]) looks whether it is still wanted.
const WATCH_SLICE: Duration = Duration::from_secs(5);

impl Generation {
    /// `ready()`'s work; `Ok(false)` if it ran before. `takes`: the kinds
    /// of connections this generation takes from its predecessor, said
    /// right before the ready message (`T`) to a predecessor that reads it.
    pub(crate) fn ready(self: &Arc<Self>, takes: &[&str]) -> Result<bool, Error> {
        let g = self;
        if g.state() != State::Starting
            || g.ready_called
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(false);
        }
        let unclaimed = lock(&g.registry).close_unclaimed();
        if !unclaimed.is_empty() {
            tracing::warn!(generation = g.generation, names = ?unclaimed, "closed inherited fds nobody claimed");
        }
        // Handed-over secrets nobody asked for (no TLS in this build) are
        // wiped now, not kept to the end.
        lock(&g.secrets).drop_unclaimed();
        g.drain_state()?;
        if g.from_predecessor {
            // Its predecessor waits for this message: its group exists.
            crate::spawn::join_predecessor_group();
        }
        // A canary until the commit: what it answers is counted from now
        // and reported to a predecessor that reads the reports.
        let reports = g.from_predecessor && g.predecessor_protocol >= 2;
        if reports {
            g.canary.begin_canary();
        }
        let mut alone = false;
        if let Some(ch) = g.channel_copy()? {
            // Version 1 fails an upgrade on a kind it does not know.
            let mut msg = Vec::new();
            if g.predecessor_protocol >= 2 {
                let kinds = takes.iter().map(|k| (*k).to_owned()).collect();
                msg = Message::Takes(kinds).encode();
            }
            msg.extend(Message::Ready.encode());
            match sys::send_all(ch.as_fd(), &msg) {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EPIPE)
                        || e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    if let Some(reason) = called_off(ch.as_fd()) {
                        // Not gone: it gave up on this process (a takeover
                        // past its deadline) and serves on.
                        let path = g.took_over.as_ref().map(|t| t.path.clone());
                        let path = path.unwrap_or_default();
                        return Err(Error::TakeOver { path, reason });
                    }
                    tracing::warn!(
                        generation = g.generation,
                        "predecessor is gone; serving alone"
                    );
                    alone = true;
                }
                Err(e) => return Err(Error::io("cannot report ready to the predecessor", e)),
            }
            if g.took_over.is_some() {
                // Started by someone else, maybe as a unit of its own: its
                // manager waits for this, not for the old generation's word.
                g.notifier.send(&format!(
                    "READY=1\nSTATUS=took over (generation {})",
                    g.generation
                ));
            }
        } else {
            if let Some(path) = &g.config.pid_file {
                pidfile::write(path, std::process::id()).map_err(|e| {
                    Error::io(format!("cannot write pid file {}", path.display()), e)
                })?;
            }
            // A successor is not the main process yet: its old generation
            // tells systemd on its behalf (MAINPID=, READY=1). Best effort:
            // a stale NOTIFY_SOCKET is a warning, not an outage.
            let n = &g.notifier;
            if g.config.fd_store && n.is_enabled() {
                let registry = lock(&g.registry);
                for (name, fd) in registry.handed() {
                    let msg = format!("FDSTORE=1\nFDNAME={name}");
                    if !n.send_with_fds(&msg, &[fd]) {
                        break; // logged; the rest would fail alike
                    }
                }
            }
            let msg = format!("READY=1\nSTATUS=serving (generation {})", g.generation);
            n.send(&msg);
        }
        {
            let mut life = g.life();
            life.state = State::Serving;
            if alone {
                life.predecessor_gone();
                lock(&g.reserve).drop_channel_copies();
            }
        }
        if alone {
            g.canary.end_canary();
        }
        if g.from_predecessor && !alone {
            g.watch_predecessor(reports);
        }
        #[cfg(feature = "tokio")]
        g.readied.notify_waiters();
        if alone {
            g.claim_pid_file();
        }
        tracing::info!(
            generation = g.generation,
            from_predecessor = g.from_predecessor,
            since_start_ms = g.started.elapsed().as_secs_f64() * 1e3,
            takes = ?takes,
            "ready"
        );
        Ok(true)
    }

    /// Watches the channel to the predecessor from a thread of its own until
    /// the predecessor is gone, so that its exit is taken in — the channel
    /// and every copy of it closed, the pid file claimed — also in an
    /// application that never waits for it
    /// ([`predecessor_exited`](crate::Handover::predecessor_exited)). It
    /// waits for the hang-up alone (`POLLHUP`), and leaves the messages
    /// before it to whoever waits on the channel.
    fn watch_predecessor(self: &Arc<Self>, report: bool) {
        let Ok(Some(ch)) = self.channel_copy() else {
            return;
        };
        let g = Arc::downgrade(self);
        let started = std::thread::Builder::new()
            .name("handover-predecessor".into())
            .spawn(move || watch(g, ch, report));
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the thread that watches the predecessor; its channel closes when the application waits for its exit");
        }
    }

    /// A copy of the channel to the predecessor, so that waiting on it holds
    /// no lock.
    pub(crate) fn channel_copy(&self) -> Result<Option<OwnedFd>, Error> {
        let life = self.life();
        match life.predecessor.as_ref() {
            None => Ok(None),
            // One made at build first: this generation may be at its fd limit.
            Some(ch) => match lock(&self.reserve).channel_copy() {
                Some(copy) => Ok(Some(copy)),
                None => ch
                    .try_clone()
                    .map(Some)
                    .map_err(|e| Error::io("duplicating the channel", e)),
            },
        }
    }

    /// Sends the reason this successor cannot start (once, before ready).
    pub(crate) fn report_failure(&self, reason: &str) {
        let life = self.life();
        if life.state != State::Starting || self.failure_sent.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(ch) = life.predecessor.as_ref() {
            send_failure(ch.as_fd(), reason);
        }
    }

    /// Passes `result` through, reporting its error to the predecessor first.
    pub(crate) fn reported<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            self.report_failure(&crate::error::chain(e));
        }
        result
    }

    /// The state stream, once.
    pub(crate) fn take_state(&self) -> Result<Option<crate::state::StateReader>, Error> {
        if !self.state_expected || self.state_taken.swap(true, Ordering::SeqCst) {
            return Ok(None);
        }
        let Some(ch) = self.channel_copy()? else {
            return Ok(None);
        };
        crate::state::set_timeout(
            ch.as_fd(),
            crate::state::Direction::Receive,
            self.config.ready_timeout,
        )
        .map_err(|e| Error::io("setting the state stream timeout", e))?;
        let opened = crate::state::StateReader::open(ch, self.state_progress.clone())
            .map(Some)
            .map_err(|e| Error::io("reading the state stream header", e));
        self.reported(opened)
    }

    pub(crate) fn reject_state(&self, reason: &str) -> Result<(), Error> {
        let life = self.life();
        let Some(ch) = life.predecessor.as_ref() else {
            return Ok(());
        };
        let msg = Message::StateRejected(reason.to_owned()).encode();
        sys::send_all(ch.as_fd(), &msg).map_err(|e| Error::io("cannot send the rejection", e))
    }

    /// Reads and discards what is left of the state stream.
    pub(crate) fn drain_state(&self) -> Result<(), Error> {
        if !self.state_expected {
            return Ok(());
        }
        let reader = self.take_state()?;
        if lock(&self.state_progress).done {
            return Ok(());
        }
        let fd = match reader {
            Some(r) => r.into_fd(),
            None => match self.channel_copy()? {
                Some(fd) => fd,
                None => return Ok(()),
            },
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut progress = lock(&self.state_progress);
        while crate::state::read_chunked(fd.as_fd(), &mut progress, &mut buf)
            .map_err(|e| Error::io("discarding the unread state", e))?
            > 0
        {}
        Ok(())
    }

    /// Takes in what the predecessor sent since this generation reported
    /// ready (its commit, its drain report), without blocking. `Ok(true)`
    /// once the predecessor is gone (or there never was one).
    pub(crate) fn pump(&self) -> io::Result<bool> {
        let mut closed = false;
        {
            let mut guard = self.life();
            let life: &mut Life = &mut guard;
            if life.state == State::Starting {
                // The channel carries the state stream until ready().
                return Ok(life.predecessor.is_none());
            }
            let Some(ch) = life.predecessor.as_ref() else {
                return Ok(true);
            };
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // What is pending now, at most 1 MiB per call.
            while got.len() < 1 << 20 {
                match sys::recv(ch.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                    Ok(0) => closed = true,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => closed = true,
                    Err(e) => return Err(e),
                }
                break;
            }
            life.inbox.push(&got);
            self.take_messages(life);
            #[cfg(feature = "tokio")]
            if !got.is_empty() || closed {
                // Whoever waits on the channel elsewhere may have missed it.
                self.channel_news.notify_waiters();
            }
            if closed {
                if let Some(at) = life.committed_at {
                    let span = crate::stats::upgrade_span(self.generation - 1);
                    let _e = span.enter();
                    let phases = life.counters.last.get_or_insert_with(Default::default);
                    crate::stats::record(phases, "exit", at.elapsed());
                }
                life.predecessor_gone();
                lock(&self.reserve).drop_channel_copies();
            }
            if life.committed || life.rolled_back {
                // The window is over: no more counting, no more pacing.
                self.canary.end_canary();
            }
        }
        if closed {
            self.claim_pid_file();
        }
        #[cfg(feature = "tokio")]
        if self.state() == State::RolledBack {
            // Taken back (judged worse, reported unhealthy) or called off:
            // this process must not serve. Its drain ends the serving layer
            // (and the triggers' task) without the application's doing.
            if let Some(drain) = lock(&self.drain).as_ref() {
                drain.start();
            }
        }
        Ok(closed)
    }

    /// Handles the complete messages in the inbox.
    fn take_messages(&self, life: &mut Life) {
        loop {
            let kind = life.inbox.peek_kind();
            match life.inbox.next() {
                Next::Incomplete => return,
                Next::Message(Message::Commit(c)) => {
                    life.commit_received(c);
                    tracing::debug!(
                        generation = self.generation,
                        "predecessor committed the handover"
                    );
                }
                Next::Message(Message::TakenBack) => {
                    life.taken_back();
                    if life.state == State::Serving {
                        life.state = State::RolledBack;
                        tracing::warn!(
                            generation = self.generation,
                            "the predecessor took the service back during probation; draining"
                        );
                    }
                }
                Next::Message(Message::Pacing(share, accepted)) => {
                    self.canary.pace(share, accepted);
                }
                Next::Message(Message::CalledOff(reason)) => {
                    // The running generation gave up on this takeover after
                    // this process reported ready (just past its deadline,
                    // say): it serves on, and this process must not.
                    tracing::error!(generation = self.generation, %reason, "the running generation called the takeover off; draining");
                    life.taken_back();
                    if life.state == State::Serving {
                        life.state = State::RolledBack;
                    }
                }
                Next::Message(Message::Drained(d)) => {
                    life.counters
                        .last
                        .get_or_insert_with(Default::default)
                        .drain = Some(d);
                }
                Next::Message(other) => {
                    tracing::warn!(message = ?other, "a successor's message from the predecessor; ignored");
                }
                Next::Unknown(kind) => {
                    tracing::debug!(kind = %(kind as char), "a message of a newer version from the predecessor; skipped");
                }
                Next::Bad(e) => {
                    tracing::warn!(error = %e, "unreadable message from the predecessor; ignored");
                    // A commit that cannot be read still commits: the
                    // predecessor only sends one when the handover is final.
                    if kind == Some(channel::COMMIT) {
                        life.mark_committed();
                    }
                }
            }
        }
    }

    /// Once the predecessor is gone, this generation serves: make sure the
    /// pid file says so, even if the predecessor died before writing it.
    pub(crate) fn claim_pid_file(&self) {
        let Some(path) = &self.config.pid_file else {
            return;
        };
        // Held across the write: no upgrade can start (and write the file
        // with its successor's pid) meanwhile.
        let life = self.life();
        if life.state != State::Serving {
            return;
        }
        let named = self.took_over.as_ref().is_some_and(|t| t.seen_as != 0);
        if named && life.committed_at.is_some() {
            // The old generation committed, and named this process in the
            // pid file as it sees it: from another pid namespace (a
            // container) that is not the pid this process knows itself by.
            // (One that could not see it at all named nobody: this process
            // names itself, as it sees itself.)
            return;
        }
        let me = std::process::id();
        if pidfile::read(path).ok() != Some(me) {
            if let Err(e) = pidfile::write(path, me) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the pid file");
            }
        }
    }

    /// Reports unhealthy during probation; see `Handover::report_unhealthy`.
    pub(crate) fn report_unhealthy(&self, reason: &str) -> Result<bool, Error> {
        if self.state() == State::Starting {
            return Err(Error::io(
                "report_unhealthy before ready()",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "exit instead: a successor that never reports ready fails the upgrade",
                ),
            ));
        }
        let _ = self.pump();
        if self.life().committed {
            return Ok(false);
        }
        let Some(ch) = self.channel_copy()? else {
            return Ok(false);
        };
        let msg = Message::Unhealthy(reason.to_owned()).encode();
        if let Err(e) = sys::send_all(ch.as_fd(), &msg) {
            if e.raw_os_error() == Some(libc::EPIPE) {
                return Ok(false); // gone: serving alone
            }
            return Err(Error::io("cannot report unhealthy to the predecessor", e));
        }
        // The answer: taken back, or committed just before (a race), or the
        // predecessor is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let closed = self
                .pump()
                .map_err(|e| Error::io("reading the channel", e))?;
            {
                let mut life = self.life();
                if life.rolled_back {
                    life.state = State::RolledBack;
                    drop(life);
                    tracing::warn!(generation = self.generation, %reason, "reported unhealthy; the predecessor took the service back");
                    return Ok(true);
                }
                if life.committed || closed {
                    return Ok(false);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    "no answer from the predecessor to the unhealthy report",
                    io::ErrorKind::TimedOut.into(),
                ));
            }
            // Another task (awaiting `predecessor_exited`) may take in the
            // answer first: look again at least every 10 ms.
            let slice = deadline.min(Instant::now() + Duration::from_millis(10));
            sys::poll_until(&[(ch.as_fd(), libc::POLLIN)], slice)
                .map_err(|e| Error::io("poll on the channel", e))?;
        }
    }

    /// Takes in the predecessor's messages as they come until `done` (given
    /// whether the channel closed) holds.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_channel(
        &self,
        done: impl Fn(&Self, bool) -> bool,
    ) -> Result<(), Error> {
        // Before ready() the channel carries the state stream, read with
        // blocking calls: leave it alone (and blocking) until then.
        loop {
            let readied = self.readied.notified();
            if self.state() != State::Starting {
                break;
            }
            readied.await;
        }
        let pumped = self
            .pump()
            .map_err(|e| Error::io("reading the channel", e))?;
        if done(self, pumped) {
            return Ok(());
        }
        let Some(ch) = self.channel_copy()? else {
            return Ok(());
        };
        // The channel is a Unix stream socket. tokio needs it non-blocking:
        // the flag is shared with the original fd, whose every read and
        // write here uses MSG_DONTWAIT or polls first, and retries EINTR.
        let stream = std::os::unix::net::UnixStream::from(ch);
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("making the channel non-blocking", e))?;
        let stream = tokio::net::UnixStream::from_std(stream)
            .map_err(|e| Error::io("registering the channel with tokio", e))?;
        loop {
            // Another thread (the one watching the predecessor, a `stats()`)
            // may take in what arrives before this one does, and epoll then
            // reports nothing (an edge whose data is gone when it is read is
            // dropped): every `pump` that takes something in wakes `news`.
            let news = self.channel_news.notified();
            tokio::pin!(news);
            news.as_mut().enable();
            let closed = self
                .pump()
                .map_err(|e| Error::io("reading the channel", e))?;
            if done(self, closed) {
                return Ok(());
            }
            tokio::select! {
                ready = stream.readable() => {
                    ready.map_err(|e| Error::io("waiting on the channel", e))?;
                    // What is pending was read (or is read at the top of
                    // the loop): clear tokio's readiness so that the next
                    // `readable()` waits for new bytes.
                    let _ = stream.try_io(tokio::io::Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                }
                _ = &mut news => {}
            }
        }
    }
}
