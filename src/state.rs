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

/// Streams `source` with `version` over `fd` (the old generation's side).
/// Returns the number of payload bytes sent.
pub(crate) fn write(fd: BorrowedFd<'_>, version: u32, source: &mut dyn Read) -> io::Result<u64> {
    sys::send_all(fd, &channel::state_header(version))?;
    let mut buf = vec![0u8; CHUNK + 4];
    let mut total = 0u64;
    loop {
        let n = match source.read(&mut buf[4..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        buf[..4].copy_from_slice(&(n as u32).to_le_bytes());
        sys::send_all(fd, &buf[..4 + n])?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
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
