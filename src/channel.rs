//! The channel between two generations, and every message that crosses it.
//!
//! This module is the protocol's specification and its only encoder and
//! decoder. It is pure: bytes in, messages out. Reading and writing the
//! socket, deadlines and what to do about a message belong to `ready`
//! (the old generation waiting for its successor), `state` (the state
//! stream) and `handover` (the successor's side).
//!
//! # The channel
//!
//! An `AF_UNIX` stream socketpair, close-on-exec, created by the old
//! generation for each upgrade. The successor finds its end at fd
//! `HANDOVER_CHANNEL_FD` (always `3 + LISTEN_FDS`). The old generation keeps
//! its end open until it exits, so the successor reads EOF exactly when its
//! predecessor is gone. Writers use `send(MSG_NOSIGNAL)`: a vanished peer is
//! an error, never a `SIGPIPE`.
//!
//! # Messages (version 1)
//!
//! Every message but `R` and the state stream is one line: a kind byte, a
//! UTF-8 text, `\n`. Reasons have their line breaks replaced by spaces and
//! are cut at [`MAX_REASON`] bytes; no line may exceed [`MAX_LINE`].
//!
//! | message | direction | when | the receiver |
//! | --- | --- | --- | --- |
//! | state stream: `HOST`, version (u32 LE), chunks `[u32 LE length][bytes]`, a chunk of length 0 | old → new | from just before the spawn (what fits in the socket buffer waits there), only with `HANDOVER_STATE=1` | reads it through `take_state` (checks the magic, chunks of at most [`MAX_CHUNK`]); `ready()` discards what is left |
//! | `T<kinds>\n` | new → old | once, right before `R`, only to a predecessor of version 2 or later | what connections the successor takes (see below); kept for the commit |
//! | `R` (one byte, no newline) | new → old | once, at `ready()` | starts the probation window, or commits |
//! | `F<reason>\n` | new → old | before `R`, when the successor cannot start | fails the upgrade with the reason (`UpgradeError::Failed`), reaps the successor |
//! | `E<reason>\n` | new → old | before `R`, the state's version is refused | fails the upgrade (`UpgradeError::StateRejected`), kills and reaps the successor |
//! | `U<reason>\n` | new → old | after `R`, during probation | answers `A`, lets the successor drain, fails the upgrade (`UpgradeError::Probation`) |
//! | `A\n` | old → new | the answer to `U` | the successor's state becomes `RolledBack`: it drains and exits |
//! | `C<fields>\n` | old → new | once, at the commit (after the window) | the handover is final: the successor takes the counters over and may serve the control socket and upgrade |
//! | `D<fields>\n` | old → new | after the old generation's drain | records the drain phase |
//! | `X<reason>\n` | old → new | to a process that took over (not one the old generation started), instead of `C`, when the takeover failed (it missed the ready deadline, say): the channel closes next | the successor must not serve: `ready()` fails with the reason, or, already ready, it is taken back (drains and exits) |
//! | `M<version>\n` + one fd (`SCM_RIGHTS`) | new → old | after `C`, once, when the successor starts taking migrated connections | the old generation's connection sender takes the fd as the migration socket and sends records of at most `<version>` over it (see [`migrate`](crate::migrate)) |
//! | `P<fields>\n` | new → old | after `R`, every 100 ms until the commit (or a taking back), only to a predecessor of version 2 or later | during probation: the canary's counts, judged against the old generation's own (see [`canary`](crate::canary)); a judged rollback is answered `A`, as `U` is |
//! | `S<fields>\n` | old → new | during probation with a share of the traffic ([`canary::Policy::share`](crate::canary::Policy::share)): at the start and every 100 ms | the canary paces its accepts to its share |
//! | EOF | old → new | the old generation exited | the successor serves alone (committed, unless it was taken back) |
//!
//! `<kinds>` are space-separated words: `connections` (the application
//! reads them itself, through `Handover::incoming_connections`), `http1`
//! (`serve::Server` takes HTTP/1.1 keep-alive connections), `websocket`
//! (`serve::Server` takes WebSocket connections); an empty list takes
//! nothing. Words the old generation does not know are kept and ignored.
//! A successor that sends no `T` (an older build) takes nothing: the old
//! generation then knows at the commit that no migration offer (`M`) will
//! come, and does not wait for one.
//!
//! The fields of `C` and `D` are space-separated `key=value` pairs:
//! `succeeded=N failed=N <phase>_us=N …`, and last, running to the end of the
//! line, `error=<text>`. `D` carries `drain_us=N`. A commit after a judged
//! probation window adds the judgement: `canary=passed|few|none`,
//! `canary_min=N`, and per generation (`c_` the canary, `b_` the old one)
//! `requests=`, `errors=`, `connections=`, `p50_us=`, `p99_us=`.
//!
//! `P` carries ` n=REQUESTS e=ERRORS c=CONNECTIONS h=BUCKET:COUNT,…` (the
//! latency histogram's non-empty buckets, ascending; see `canary`), counted
//! since `ready()`. `S` carries ` share=PPM accepted=N`: the canary's share
//! in millionths, and the connections the old generation accepted in the
//! window.
//!
//! # Compatibility
//!
//! Two versions of the program meet here, so the protocol only grows: a
//! successor skips a line of a kind it does not know and fields of `C` and
//! `D` it does not know, so a newer old generation may add both. The old
//! generation announces its protocol version to its successor
//! (`HANDOVER_PROTOCOL=2`, or `protocol=2` in a takeover offer; absent means
//! 1). Version 1 accepts from a successor only `R`, `F` and `E` before `R`
//! and `U` after it: anything else fails the upgrade. From version 2 on, the
//! old generation skips a line of a kind it does not know, at any time, and
//! still refuses a known kind out of its place and bytes that are no kind at
//! all. So a successor sends a kind version 1 does not know only to a
//! predecessor of version 2 or later.

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::stats::Counters;
#[cfg(test)]
use crate::stats::Phases;

/// Successor to old generation: ready.
pub(crate) const READY: u8 = b'R';
/// Successor to old generation, before ready: cannot start, and why.
pub(crate) const FAILED: u8 = b'F';
/// Successor to old generation, before ready: the state is refused.
pub(crate) const STATE_REJECTED: u8 = b'E';
/// Successor to old generation, during probation: unhealthy, take it back.
pub(crate) const UNHEALTHY: u8 = b'U';
/// Old generation to successor: the unhealthy report was taken.
pub(crate) const TAKEN_BACK: u8 = b'A';
/// Old generation to successor: the handover is final.
pub(crate) const COMMIT: u8 = b'C';
/// Old generation to successor: its drain ended.
pub(crate) const DRAINED: u8 = b'D';
/// Old generation to a successor that took over (not one it started):
/// the takeover is called off, and why; the old generation serves on.
pub(crate) const CALLED_OFF: u8 = b'X';
/// Successor to old generation, after the commit: the migration socket
/// (attached) and the highest record version the successor reads.
pub(crate) const MIGRATION_OFFER: u8 = b'M';
/// Successor to old generation, right before ready (version 2 or later):
/// the kinds of connections it takes.
pub(crate) const TAKES: u8 = b'T';

/// Successor to old generation, during probation: the canary's counts.
pub(crate) const CANARY_COUNTS: u8 = b'P';
/// Old generation to successor, during probation with a share: the pacing.
pub(crate) const PACING: u8 = b'S';

/// Every kind this version knows, in either direction.
pub(crate) const KNOWN: &[u8] = &[
    READY,
    FAILED,
    STATE_REJECTED,
    UNHEALTHY,
    TAKEN_BACK,
    COMMIT,
    DRAINED,
    MIGRATION_OFFER,
    CALLED_OFF,
    CANARY_COUNTS,
    PACING,
    TAKES,
];

/// The protocol version this build speaks, announced to a successor
/// (`HANDOVER_PROTOCOL`, or the takeover offer's `protocol=`): from version
/// 2 on, the old generation skips a line of a kind it does not know from
/// its successor, at any time, as the successor always did. A successor
/// sends a kind that version 1 does not know only to a predecessor that
/// announced version 2 or later.
pub(crate) const VERSION: u32 = 2;

/// The most kinds a `T` line names (more are dropped), and the longest
/// kind (a longer word is dropped).
pub(crate) const MAX_KINDS: usize = 16;
const MAX_KIND_LEN: usize = 32;

/// The longest reason a message carries; longer ones are cut.
pub(crate) const MAX_REASON: usize = 4000;
/// The longest line a receiver accepts.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// The state stream's magic.
pub(crate) const STATE_MAGIC: [u8; 4] = *b"HOST";
/// The largest state chunk.
pub(crate) const MAX_CHUNK: usize = 256 * 1024;

/// One message between two generations (the state stream aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// `R`
    Ready,
    /// `F<reason>`
    Failed(String),
    /// `E<reason>`
    StateRejected(String),
    /// `U<reason>`
    Unhealthy(String),
    /// `A`
    TakenBack,
    /// `C<fields>`
    Commit(Counters),
    /// `D<fields>`
    Drained(Duration),
    /// `M<version>`, with the migration socket attached.
    MigrationOffer(u8),
    /// `X<reason>`
    CalledOff(String),
    /// `P<fields>`
    CanaryCounts(crate::canary::Counts),
    /// `S<fields>`: the canary's share (ppm) and the connections the old
    /// generation accepted.
    Pacing(u32, u64),
    /// `T<kinds>`
    Takes(Vec<String>),
}

impl Message {
    /// The bytes of this message on the channel.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let line = |kind: u8, text: &str| {
            let mut v = Vec::with_capacity(text.len() + 2);
            v.push(kind);
            v.extend_from_slice(text.as_bytes());
            v.push(b'\n');
            v
        };
        match self {
            Message::Ready => vec![READY],
            Message::Failed(r) => line(FAILED, &one_line(r)),
            Message::StateRejected(r) => line(STATE_REJECTED, &one_line(r)),
            Message::Unhealthy(r) => line(UNHEALTHY, &one_line(r)),
            Message::TakenBack => line(TAKEN_BACK, ""),
            Message::Commit(c) => line(COMMIT, &encode_fields(c)),
            Message::Drained(d) => line(DRAINED, &format!(" drain_us={}", d.as_micros())),
            Message::MigrationOffer(v) => line(MIGRATION_OFFER, &v.to_string()),
            Message::CalledOff(r) => line(CALLED_OFF, &one_line(r)),
            Message::CanaryCounts(c) => line(CANARY_COUNTS, &crate::canary::encode_counts(c)),
            Message::Pacing(share, accepted) => {
                line(PACING, &crate::canary::encode_pacing(*share, *accepted))
            }
            Message::Takes(kinds) => line(TAKES, &kinds.join(" ")),
        }
    }
}

/// A reason on one line, at most [`MAX_REASON`] bytes (cut at a character
/// boundary).
fn one_line(reason: &str) -> String {
    let mut s = reason.replace(['\n', '\r'], " ");
    if s.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Why bytes on the channel are not a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadMessage(pub String);

impl fmt::Display for BadMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What [`Inbox::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// A complete message (consumed).
    Message(Message),
    /// Not enough bytes yet.
    Incomplete,
    /// A line of a kind this version does not know (consumed); a successor
    /// skips it.
    Unknown(u8),
    /// Bytes that break the protocol (consumed up to the end of the line,
    /// or all of them for an overlong line).
    Bad(BadMessage),
}

/// The bytes received and not yet decoded.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    buf: Vec<u8>,
}

impl Inbox {
    /// Takes in bytes received from the channel.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The kind byte of the next message, if any byte is here.
    pub(crate) fn peek_kind(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// Decodes the next message, if its bytes are all here.
    pub(crate) fn next(&mut self) -> Next {
        let Some(&kind) = self.buf.first() else {
            return Next::Incomplete;
        };
        if kind == READY {
            self.buf.remove(0);
            return Next::Message(Message::Ready);
        }
        let Some(end) = self.buf.iter().position(|b| *b == b'\n') else {
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                return Next::Bad(BadMessage(format!("a line longer than {MAX_LINE} bytes")));
            }
            return Next::Incomplete;
        };
        let line: Vec<u8> = self.buf.drain(..=end).collect();
        match decode_line(&line[..line.len() - 1]) {
            Ok(Some(m)) => Next::Message(m),
            Ok(None) => Next::Unknown(kind),
            Err(e) => Next::Bad(e),
        }
    }
}

/// Decodes one line (without its `\n`): `Ok(None)` for a kind this version
/// does not know.
pub(crate) fn decode_line(line: &[u8]) -> Result<Option<Message>, BadMessage> {
    let Some((&kind, rest)) = line.split_first() else {
        return Err(BadMessage("empty message".into()));
    };
    let text = std::str::from_utf8(rest)
        .map_err(|_| BadMessage(format!("message {:?} is not UTF-8", kind as char)))?;
    let message = match kind {
        FAILED => Message::Failed(text.to_owned()),
        STATE_REJECTED => Message::StateRejected(text.to_owned()),
        UNHEALTHY => Message::Unhealthy(text.to_owned()),
        CALLED_OFF => Message::CalledOff(text.to_owned()),
        TAKEN_BACK if text.is_empty() => Message::TakenBack,
        TAKEN_BACK => return Err(BadMessage("A carries no text".into())),
        COMMIT => {
            let mut c = Counters::default();
            decode_fields(text, &mut c)?;
            Message::Commit(c)
        }
        DRAINED => {
            let mut c = Counters::default();
            decode_fields(text, &mut c)?;
            match c.last.and_then(|p| p.drain) {
                Some(d) => Message::Drained(d),
                None => return Err(BadMessage("drain report without drain_us".into())),
            }
        }
        MIGRATION_OFFER => match text.parse::<u8>() {
            Ok(v) if text.bytes().all(|b| b.is_ascii_digit()) => Message::MigrationOffer(v),
            _ => return Err(BadMessage(format!("M: record version {text:?}"))),
        },
        CANARY_COUNTS => Message::CanaryCounts(
            crate::canary::decode_counts(text).map_err(|e| BadMessage(format!("P: {e}")))?,
        ),
        PACING => {
            let (share, accepted) =
                crate::canary::decode_pacing(text).map_err(|e| BadMessage(format!("S: {e}")))?;
            Message::Pacing(share, accepted)
        }
        TAKES => Message::Takes(
            text.split_ascii_whitespace()
                .filter(|w| w.len() <= MAX_KIND_LEN)
                .take(MAX_KINDS)
                .map(str::to_owned)
                .collect(),
        ),
        k if k.is_ascii_uppercase() => return Ok(None),
        other => return Err(BadMessage(format!("unknown message {other:#04x}"))),
    };
    Ok(Some(message))
}

/// The fields of a commit: ` succeeded=N failed=N <phase>_us=N … [error=…]`.
fn encode_fields(c: &Counters) -> String {
    let mut s = format!(" succeeded={} failed={}", c.succeeded, c.failed);
    if let Some(p) = &c.last {
        for (name, d) in p {
            if let Some(d) = d {
                let _ = write!(s, " {name}_us={}", d.as_micros());
            }
        }
    }
    if let Some(j) = &c.judgement {
        crate::canary::encode_judgement(j, &mut s);
    }
    if let Some(e) = &c.last_error {
        // Last, and on one line: it runs to the end of the line.
        let _ = write!(s, " error={}", e.replace(['\n', '\r'], " "));
    }
    s
}

/// Parses the fields of a `C` or `D` line into `c`. Unknown keys are
/// skipped (a newer sender may add some); malformed ones are refused.
fn decode_fields(line: &str, c: &mut Counters) -> Result<(), BadMessage> {
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        if let Some(err) = rest.strip_prefix("error=") {
            c.last_error = Some(err.to_owned());
            return Ok(());
        }
        let (field, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        rest = tail.trim_start();
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| BadMessage(format!("field {field:?} has no '='")))?;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(BadMessage(format!("field name {key:?} is malformed")));
        }
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| BadMessage(format!("field {key:?}: {value:?} is not a number")))
        };
        if crate::canary::decode_judgement_field(key, value, &mut c.judgement)
            .map_err(BadMessage)?
        {
            continue;
        }
        match key {
            "succeeded" => c.succeeded = number()?,
            "failed" => c.failed = number()?,
            _ => {
                let Some(phase) = key.strip_suffix("_us") else {
                    continue; // a field of a newer version
                };
                let d = Duration::from_micros(number()?);
                let mut phases = c.last.unwrap_or_default();
                if phases.set(phase, d) {
                    c.last = Some(phases);
                }
            }
        }
    }
    Ok(())
}

/// The state stream's header: the magic and the format version.
pub(crate) fn state_header(version: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&STATE_MAGIC);
    h[4..].copy_from_slice(&version.to_le_bytes());
    h
}

/// The format version in a state stream's header.
pub(crate) fn parse_state_header(h: &[u8; 8]) -> Result<u32, BadMessage> {
    if h[..4] != STATE_MAGIC {
        return Err(BadMessage(format!(
            "the state stream starts with {:02x?}, not the magic \"HOST\"",
            &h[..4]
        )));
    }
    Ok(u32::from_le_bytes([h[4], h[5], h[6], h[7]]))
}

/// The length in a state chunk's header.
pub(crate) fn parse_chunk_len(h: [u8; 4]) -> Result<usize, BadMessage> {
    let len = u32::from_le_bytes(h) as usize;
    if len > MAX_CHUNK {
        return Err(BadMessage(format!("state chunk of {len} bytes")));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Next> {
        let mut inbox = Inbox::default();
        inbox.push(bytes);
        let mut out = Vec::new();
        loop {
            match inbox.next() {
                Next::Incomplete => return out,
                n => out.push(n),
            }
        }
    }

    #[test]
    fn every_message_round_trips() {
        let c = Counters {
            succeeded: 7,
            failed: 2,
            last_error: Some("successor (pid 9) exited:\nsignal 6".into()),
            last: Some(Phases {
                spawn: Some(Duration::from_micros(1500)),
                ready: Some(Duration::from_micros(4000)),
                probation: Some(Duration::from_secs(3)),
                ..Phases::default()
            }),
            judgement: Some(Box::new(crate::canary::Judgement {
                verdict: crate::canary::Verdict::TooFewRequests { min: 100 },
                canary: crate::canary::Summary {
                    requests: 12,
                    errors: 1,
                    connections: 3,
                    p50: Some(Duration::from_micros(900)),
                    p99: Some(Duration::from_micros(4000)),
                },
                baseline: crate::canary::Summary {
                    requests: 2377,
                    ..Default::default()
                },
            })),
        };
        let counts = crate::canary::decode_counts(" n=30 e=3 c=4 h=3:20,90:7").unwrap();
        let all = [
            Message::Ready,
            Message::Failed("inherited fd 3\nrefused".into()),
            Message::StateRejected("version 9".into()),
            Message::Unhealthy("db down".into()),
            Message::TakenBack,
            Message::Commit(c.clone()),
            Message::Drained(Duration::from_micros(1500)),
            Message::MigrationOffer(1),
            Message::CalledOff("not ready within 60s".into()),
            Message::CanaryCounts(counts),
            Message::Pacing(100_000, 42),
            Message::Takes(vec!["http1".into(), "websocket".into()]),
            Message::Takes(Vec::new()),
        ];
        let mut wire = Vec::new();
        for m in &all {
            wire.extend(m.encode());
        }
        let got = decode_all(&wire);
        assert_eq!(got.len(), all.len(), "{got:?}");
        for (g, m) in got.iter().zip(&all) {
            let want = match m {
                Message::Failed(r) => Message::Failed(r.replace('\n', " ")),
                Message::Commit(c) => Message::Commit(Counters {
                    last_error: c.last_error.as_ref().map(|e| e.replace('\n', " ")),
                    ..c.clone()
                }),
                m => m.clone(),
            };
            assert_eq!(g, &Next::Message(want));
        }
    }

    #[test]
    fn a_message_split_anywhere_waits_for_its_end() {
        let wire = Message::Failed("port moved".into()).encode();
        let mut inbox = Inbox::default();
        for b in &wire[..wire.len() - 1] {
            inbox.push(&[*b]);
            assert_eq!(inbox.next(), Next::Incomplete);
        }
        inbox.push(&wire[wire.len() - 1..]);
        assert_eq!(
            inbox.next(),
            Next::Message(Message::Failed("port moved".into()))
        );
    }

    #[test]
    fn unknown_kinds_and_fields_are_skipped_bad_ones_refused() {
        let got = decode_all(b"Ysomething new\nC succeeded=2 failed=0 wire_us=5 colour=blue\n");
        assert_eq!(got[0], Next::Unknown(b'Y'));
        let Next::Message(Message::Commit(c)) = &got[1] else {
            panic!("{got:?}");
        };
        assert_eq!((c.succeeded, c.failed, c.last), (2, 0, None));
        for bad in [
            &b"\n"[..],
            b"\xff\n",
            b"Ax\n",
            b"D\n",
            b"Dspawn_us=3\n",
            b"C\xff\n",
            b"Csucceeded=x\n",
            b"M\n",
            b"M+1\n",
            b"M256\n",
            b"Pn=1 e=2\n",
            b"P h=999:1\n",
            b"S share=0 accepted=1\n",
            b"S\n",
            b"C canary=passed c_requests=x\n",
            b"C nonsense\n",
            b"C =3\n",
            b"x\n",
        ] {
            assert!(
                matches!(decode_all(bad).first(), Some(Next::Bad(_))),
                "{bad:?}: {:?}",
                decode_all(bad)
            );
        }
        let mut inbox = Inbox::default();
        inbox.push(&vec![b'C'; MAX_LINE + 1]);
        assert!(matches!(inbox.next(), Next::Bad(_)));
        assert_eq!(inbox.next(), Next::Incomplete);
    }

    #[test]
    fn takes_keeps_at_most_16_short_words() {
        let mut line = b"T".to_vec();
        line.extend_from_slice(&b" w".repeat(40));
        line.extend_from_slice(b" ");
        line.extend_from_slice(&[b'x'; 40]);
        line.push(b'\n');
        let Next::Message(Message::Takes(kinds)) = &decode_all(&line)[0] else {
            panic!("{:?}", decode_all(&line));
        };
        assert_eq!(kinds.len(), MAX_KINDS);
        assert!(kinds.iter().all(|k| k == "w"));
        assert_eq!(
            decode_all(b"T  http1\t websocket \n")[0],
            Next::Message(Message::Takes(vec!["http1".into(), "websocket".into()]))
        );
    }

    #[test]
    fn long_reasons_are_cut_at_a_character() {
        let m = Message::Unhealthy("é".repeat(MAX_REASON));
        let wire = m.encode();
        assert!(wire.len() <= MAX_REASON + 2);
        assert!(matches!(
            decode_all(&wire)[0],
            Next::Message(Message::Unhealthy(_))
        ));
    }

    #[test]
    fn state_framing() {
        assert_eq!(parse_state_header(&state_header(3)), Ok(3));
        assert!(parse_state_header(b"NOPE\0\0\0\0").is_err());
        assert_eq!(parse_chunk_len(5u32.to_le_bytes()), Ok(5));
        assert!(parse_chunk_len(u32::MAX.to_le_bytes()).is_err());
    }
}
