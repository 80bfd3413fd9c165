//! The state stream from the old generation to its successor: its I/O. The
//! framing (magic, version, chunks) is specified in `channel`.
//!
//! Chunking lets any [`Read`] stream through without knowing its size or
//! being held whole in memory on either side. The successor accepts the
//! version or rejects it
//! ([`Handover::reject_state`](crate::Handover::reject_state)), which fails
//! the upgrade with the old generation serving.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sys;

use crate::channel::{self, MAX_CHUNK as CHUNK};

/// A state for the successor: its format version and its bytes.
pub(crate) type StateStream = (u32, Box<dyn Read + Send>);

/// Which way a socket timeout applies.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    /// `SO_RCVTIMEO`
    Receive,
    /// `SO_SNDTIMEO`
    Send,
}

/// Sets a receive or send timeout on a socket (at least 1 ms: zero would
/// mean none).
pub(crate) fn set_timeout(fd: BorrowedFd<'_>, dir: Direction, d: Duration) -> io::Result<()> {
    let d = Some(d.max(Duration::from_millis(1)));
    let sock = socket2::SockRef::from(&fd);
    match dir {
        Direction::Receive => sock.set_read_timeout(d),
        Direction::Send => sock.set_write_timeout(d),
    }
}

/// A state stream on its way from the old generation: the frame read from
/// the source and not yet sent. It is started before the successor exists:
/// what fits in the channel's socket buffer waits there, so the successor
/// reads it at once instead of waiting for the old generation to be
/// scheduled again.
pub(crate) struct Writer {
    source: Box<dyn Read + Send>,
    /// `[u32 LE length][bytes]` of the current chunk (the header at first).
    frame: Vec<u8>,
    /// Bytes of `frame` that are valid.
    len: usize,
    /// Bytes of `frame` already sent.
    sent: usize,
    /// The end chunk (length 0) is in `frame`.
    finished: bool,
    /// Payload bytes read from the source.
    total: u64,
}

impl Writer {
    pub(crate) fn new((version, source): StateStream) -> Writer {
        let header = channel::state_header(version);
        let mut frame = vec![0u8; CHUNK + 4];
        frame[..header.len()].copy_from_slice(&header);
        Writer {
            source,
            frame,
            len: header.len(),
            sent: 0,
            finished: false,
            total: 0,
        }
    }

    /// Sends the stream over `fd` until it is all sent (`Ok(true)`) or, with
    /// `nonblocking`, until the socket is full (`Ok(false)`). Blocking sends
    /// end at the socket's send timeout.
    pub(crate) fn send(&mut self, fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<bool> {
        loop {
            if self.sent == self.len {
                if self.finished {
                    return Ok(true);
                }
                self.next_chunk()?;
            }
            match sys::send(fd, &self.frame[self.sent..self.len], nonblocking) {
                Ok(n) => self.sent += n,
                Err(e) if nonblocking && e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Payload bytes read from the source so far.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let n = loop {
            match self.source.read(&mut self.frame[4..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        self.frame[..4].copy_from_slice(&(n as u32).to_le_bytes());
        (self.len, self.sent) = (4 + n, 0);
        self.finished = n == 0;
        self.total += n as u64;
        Ok(())
    }
}

/// Where the successor is in the stream; shared between the
/// [`StateReader`] and `ready()`, which drains what the application left.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Bytes left in the current chunk.
    in_chunk: u32,
    /// The end chunk has been read.
    pub(crate) done: bool,
}

/// The state handed over by the old generation: its format version, and
/// its bytes through [`Read`]. Reads block until data arrives, at most the
/// ready timeout each.
#[derive(Debug)]
pub struct StateReader {
    version: u32,
    fd: OwnedFd,
    progress: Arc<Mutex<Progress>>,
}

impl StateReader {
    /// The format version the old generation announced.
    pub fn version(&self) -> u32 {
        self.version
    }

    pub(crate) fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub(crate) fn open(fd: OwnedFd, progress: Arc<Mutex<Progress>>) -> io::Result<StateReader> {
        let mut header = [0u8; 8];
        read_exact(fd.as_fd(), &mut header)?;
        let version = channel::parse_state_header(&header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.0))?;
        Ok(StateReader {
            version,
            fd,
            progress,
        })
    }
}

fn read_exact(fd: BorrowedFd<'_>, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match sys::recv(fd, buf, 0)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the state stream ended early",
                ));
            }
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// Reads from the stream at `progress` into `buf`; 0 at the end.
pub(crate) fn read_chunked(
    fd: BorrowedFd<'_>,
    progress: &mut Progress,
    buf: &mut [u8],
) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    while progress.in_chunk == 0 {
        if progress.done {
            return Ok(0);
        }
        let mut len = [0u8; 4];
        read_exact(fd, &mut len)?;
        let len = channel::parse_chunk_len(len)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.0))? as u32;
        progress.in_chunk = len;
        progress.done = len == 0;
    }
    let want = buf.len().min(progress.in_chunk as usize);
    let n = sys::recv(fd, &mut buf[..want], 0)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the state stream ended early",
        ));
    }
    progress.in_chunk -= n as u32;
    Ok(n)
}

impl Read for StateReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        read_chunked(self.fd.as_fd(), &mut p, buf)
    }
}
