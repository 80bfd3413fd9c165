//! The records of the migration socket: pure encode and decode, no I/O.
//! (The offer that opens it is a channel message, `channel::Message::MigrationOffer`.) The layout is specified in the docs of
//! [`migrate`](super).
//!
//! Everything decoded here came from the other generation: a malformed
//! record is a [`FrameError`], never a panic.

use std::fmt;

/// The version of the records this build writes and reads.
pub(crate) const VERSION: u8 = 1;
/// Bytes in a record header.
pub(crate) const HEADER_LEN: usize = 12;
/// The most fds one record carries: the kernel's `SCM_MAX_FD`.
pub(crate) const MAX_FDS: usize = 253;
/// The largest record either side writes or accepts.
pub(crate) const MAX_RECORD: usize = 128 * 1024;
/// The largest payload one connection carries.
pub(crate) const MAX_PAYLOAD: usize = 64 * 1024;
/// The largest state message (the sum of its chunks).
pub(crate) const MAX_STATE: usize = 16 << 20;
/// The longest reason a refusal carries.
pub(crate) const MAX_REASON: usize = 256;
/// The bytes of one state chunk at most.
pub(crate) const MAX_CHUNK: usize = MAX_RECORD - HEADER_LEN;

const TAG_CONNECTIONS: u8 = b'C';
const TAG_STATE: u8 = b'S';
const TAG_END: u8 = b'E';
const TAG_TAKEN: u8 = b'K';
const TAG_REFUSED: u8 = b'N';

/// `flags` of a state chunk: more chunks of the same state follow.
const FLAG_MORE: u16 = 1;

/// One record of the migration socket, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// Old → new: connections, one payload per attached fd, in fd order.
    Connections {
        /// The record's number.
        seq: u32,
        /// One payload per fd.
        payloads: Vec<&'a [u8]>,
    },
    /// Old → new: a chunk of a state message.
    State {
        /// The record's number.
        seq: u32,
        /// The chunk's bytes.
        chunk: &'a [u8],
        /// Whether more chunks of this message follow.
        more: bool,
    },
    /// Old → new: nothing more follows.
    End,
    /// New → old: record `seq` was taken; its fds are the successor's now.
    Taken {
        /// The record taken.
        seq: u32,
    },
    /// New → old: record `seq` was refused; the successor closed its fds.
    Refused {
        /// The record refused.
        seq: u32,
        /// Why, as the successor says.
        reason: String,
    },
}

/// Why a record from the other generation cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Shorter than a header.
    Short {
        /// Its length.
        len: usize,
    },
    /// Longer than the largest record.
    TooLong,
    /// A version this build does not read.
    Version {
        /// The version in the header.
        version: u8,
    },
    /// An unknown record type.
    Kind {
        /// The tag byte.
        tag: u8,
    },
    /// The number of attached fds differs from what the header says.
    FdCount {
        /// What the header says.
        expected: usize,
        /// How many fds arrived.
        received: usize,
    },
    /// The lengths in the header and the body disagree.
    Length {
        /// What is wrong.
        reason: &'static str,
    },
    /// Flags this build does not know.
    Flags {
        /// The flags.
        flags: u16,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Short { len } => {
                write!(f, "a record of {len} bytes is shorter than its header")
            }
            FrameError::TooLong => write!(f, "a record is longer than {MAX_RECORD} bytes"),
            FrameError::Version { version } => {
                write!(f, "record version {version} (this build reads {VERSION})")
            }
            FrameError::Kind { tag } => write!(f, "unknown record type {tag:#04x}"),
            FrameError::FdCount { expected, received } => write!(
                f,
                "the record announces {expected} fds but {received} arrived"
            ),
            FrameError::Length { reason } => write!(f, "bad lengths: {reason}"),
            FrameError::Flags { flags } => write!(f, "unknown flags {flags:#06x}"),
        }
    }
}

impl std::error::Error for FrameError {}

fn header(tag: u8, flags: u16, seq: u32, count: u32, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body);
    out.push(tag);
    out.push(VERSION);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out
}

/// The size of a connections record holding payloads of these lengths.
pub(crate) fn connections_len(count: usize, payload_bytes: usize) -> usize {
    HEADER_LEN + 4 * count + payload_bytes
}

/// A connections record. The caller keeps to the limits: 1 to
/// [`MAX_FDS`] payloads of at most [`MAX_PAYLOAD`] bytes, the whole at most
/// [`MAX_RECORD`] (see [`connections_len`]).
pub(crate) fn encode_connections(seq: u32, payloads: &[&[u8]]) -> Vec<u8> {
    let bytes: usize = payloads.iter().map(|p| p.len()).sum();
    debug_assert!((1..=MAX_FDS).contains(&payloads.len()));
    debug_assert!(connections_len(payloads.len(), bytes) <= MAX_RECORD);
    let mut out = header(
        TAG_CONNECTIONS,
        0,
        seq,
        payloads.len() as u32,
        4 * payloads.len() + bytes,
    );
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    }
    for p in payloads {
        out.extend_from_slice(p);
    }
    out
}

/// A state chunk of at most [`MAX_CHUNK`] bytes.
pub(crate) fn encode_state(seq: u32, chunk: &[u8], more: bool) -> Vec<u8> {
    debug_assert!(chunk.len() <= MAX_CHUNK);
    let flags = if more { FLAG_MORE } else { 0 };
    let mut out = header(TAG_STATE, flags, seq, 0, chunk.len());
    out.extend_from_slice(chunk);
    out
}

/// The end record.
pub(crate) fn encode_end(seq: u32) -> Vec<u8> {
    header(TAG_END, 0, seq, 0, 0)
}

/// The successor's answer to record `seq`: taken, or refused with a reason
/// (cut to [`MAX_REASON`] bytes).
pub(crate) fn encode_answer(seq: u32, refused: Option<&str>) -> Vec<u8> {
    match refused {
        None => header(TAG_TAKEN, 0, seq, 0, 0),
        Some(reason) => {
            let mut cut = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut out = header(TAG_REFUSED, 0, seq, 0, cut);
            out.extend_from_slice(&reason.as_bytes()[..cut]);
            out
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The sequence number of a record whose header is readable, even when the
/// rest is not: the successor answers such a record with a refusal.
pub(crate) fn seq_of(record: &[u8]) -> Option<u32> {
    (record.len() >= HEADER_LEN && record[1] == VERSION).then(|| u32_at(record, 4))
}

/// Decodes one record that arrived with `fds` fds attached.
pub(crate) fn decode(record: &[u8], fds: usize) -> Result<Record<'_>, FrameError> {
    if record.len() < HEADER_LEN {
        return Err(FrameError::Short { len: record.len() });
    }
    if record.len() > MAX_RECORD {
        return Err(FrameError::TooLong);
    }
    let (tag, version) = (record[0], record[1]);
    if version != VERSION {
        return Err(FrameError::Version { version });
    }
    let flags = u16_at(record, 2);
    let seq = u32_at(record, 4);
    let count = u32_at(record, 8) as usize;
    let body = &record[HEADER_LEN..];
    let known_flags = if tag == TAG_STATE { FLAG_MORE } else { 0 };
    if flags & !known_flags != 0 {
        return Err(FrameError::Flags { flags });
    }
    let expected_fds = if tag == TAG_CONNECTIONS { count } else { 0 };
    if fds != expected_fds {
        return Err(FrameError::FdCount {
            expected: expected_fds,
            received: fds,
        });
    }
    if tag != TAG_CONNECTIONS && count != 0 {
        return Err(FrameError::Length {
            reason: "a count in a record that carries no fds",
        });
    }
    match tag {
        TAG_CONNECTIONS => {
            if count == 0 || count > MAX_FDS {
                return Err(FrameError::Length {
                    reason: "connections count out of 1..=253",
                });
            }
            let Some(lens) = body.get(..4 * count) else {
                return Err(FrameError::Length {
                    reason: "the payload lengths run past the record",
                });
            };
            let mut rest = &body[4 * count..];
            let mut payloads = Vec::with_capacity(count);
            for i in 0..count {
                let len = u32_at(lens, 4 * i) as usize;
                if len > MAX_PAYLOAD {
                    return Err(FrameError::Length {
                        reason: "a payload longer than 64 KiB",
                    });
                }
                if len > rest.len() {
                    return Err(FrameError::Length {
                        reason: "a payload runs past the record",
                    });
                }
                let (p, r) = rest.split_at(len);
                payloads.push(p);
                rest = r;
            }
            if !rest.is_empty() {
                return Err(FrameError::Length {
                    reason: "bytes after the last payload",
                });
            }
            Ok(Record::Connections { seq, payloads })
        }
        TAG_STATE => Ok(Record::State {
            seq,
            chunk: body,
            more: flags & FLAG_MORE != 0,
        }),
        TAG_END if body.is_empty() => Ok(Record::End),
        TAG_TAKEN if body.is_empty() => Ok(Record::Taken { seq }),
        TAG_REFUSED if body.len() <= MAX_REASON => Ok(Record::Refused {
            seq,
            reason: String::from_utf8_lossy(body).into_owned(),
        }),
        TAG_END | TAG_TAKEN | TAG_REFUSED => Err(FrameError::Length {
            reason: "a body where none or a short one belongs",
        }),
        tag => Err(FrameError::Kind { tag }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_round_trip() {
        let payloads: Vec<&[u8]> = vec![b"GET / HTTP/1.1\r\n", b"", b"xyz"];
        let rec = encode_connections(7, &payloads);
        assert_eq!(rec.len(), connections_len(3, 19));
        assert_eq!(
            decode(&rec, 3).unwrap(),
            Record::Connections { seq: 7, payloads }
        );
        assert_eq!(seq_of(&rec), Some(7));
    }

    #[test]
    fn state_end_and_answers_round_trip() {
        let rec = encode_state(1, b"abc", true);
        assert_eq!(
            decode(&rec, 0).unwrap(),
            Record::State {
                seq: 1,
                chunk: b"abc",
                more: true
            }
        );
        let rec = encode_state(2, b"", false);
        assert!(matches!(
            decode(&rec, 0),
            Ok(Record::State { more: false, .. })
        ));
        assert_eq!(decode(&encode_end(3), 0).unwrap(), Record::End);
        assert_eq!(
            decode(&encode_answer(4, None), 0).unwrap(),
            Record::Taken { seq: 4 }
        );
        let long = "é".repeat(300);
        let Record::Refused { seq, reason } = decode(&encode_answer(5, Some(&long)), 0).unwrap()
        else {
            panic!("not a refusal");
        };
        assert_eq!(seq, 5);
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn malformed_records_are_typed_errors() {
        assert_eq!(decode(b"C\x01", 0), Err(FrameError::Short { len: 2 }));
        let mut rec = encode_connections(1, &[b"ab", b"c"]);
        assert_eq!(
            decode(&rec, 3),
            Err(FrameError::FdCount {
                expected: 2,
                received: 3
            })
        );
        assert_eq!(
            decode(&encode_end(1), 1),
            Err(FrameError::FdCount {
                expected: 0,
                received: 1
            })
        );
        rec[1] = 9;
        assert_eq!(decode(&rec, 2), Err(FrameError::Version { version: 9 }));
        assert_eq!(seq_of(&rec), None);
        rec[1] = VERSION;
        rec[0] = b'Z';
        assert_eq!(
            decode(&rec, 0),
            Err(FrameError::Length {
                reason: "a count in a record that carries no fds"
            })
        );
        // A payload length that runs past the end.
        let mut rec = encode_connections(1, &[b"ab"]);
        rec[HEADER_LEN] = 200;
        assert!(matches!(decode(&rec, 1), Err(FrameError::Length { .. })));
        // Trailing bytes.
        let mut rec = encode_connections(1, &[b"ab"]);
        rec.push(0);
        assert!(matches!(decode(&rec, 1), Err(FrameError::Length { .. })));
        // Too many connections for one record.
        let mut rec = encode_connections(1, &[b""]);
        rec[8..12].copy_from_slice(&254u32.to_le_bytes());
        assert!(matches!(decode(&rec, 254), Err(FrameError::Length { .. })));
        // Unknown flags, unknown tag.
        let mut rec = encode_end(1);
        rec[2] = 1;
        assert_eq!(decode(&rec, 0), Err(FrameError::Flags { flags: 1 }));
        let mut rec = encode_end(1);
        rec[0] = b'Z';
        assert_eq!(decode(&rec, 0), Err(FrameError::Kind { tag: b'Z' }));
        assert_eq!(
            decode(&vec![0; MAX_RECORD + 1], 0),
            Err(FrameError::TooLong)
        );
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A cheap deterministic sweep; the fuzz target goes further.
        let mut x: u32 = 1;
        for len in 0..200 {
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            if len >= 2 {
                buf[0] = [TAG_CONNECTIONS, TAG_STATE, TAG_END, TAG_TAKEN][len % 4];
                buf[1] = VERSION;
            }
            for fds in 0..3 {
                let _ = decode(&buf, fds);
            }
        }
    }
}
