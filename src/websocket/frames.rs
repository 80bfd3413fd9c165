//! What [`Socket`](super::Socket) needs to know of the bytes it hands to
//! tungstenite: where each frame ends (RFC 6455, section 5.2), and whether
//! the frames handed so far end a message. Pure: bytes in, positions out.

/// The header of one frame: enough to know where it ends and what it does
/// to the message it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// FIN: the last frame of its message.
    pub(super) fin: bool,
    /// RSV1–3: set only by an extension (permessage-deflate sets RSV1).
    pub(super) rsv: bool,
    /// The opcode (0 continuation, 1 text, 2 binary, 8 close, 9 ping,
    /// 10 pong).
    pub(super) opcode: u8,
    /// Header and payload: the frame's length on the wire.
    pub(super) len: u64,
}

impl Header {
    /// A control frame (close, ping, pong): never part of a fragmented
    /// message, may come between its frames.
    pub(super) fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// The longest header: 2 bytes, an 8-byte length, a 4-byte mask.
pub(super) const MAX_HEADER: usize = 14;

/// The header at the start of `buf`; `None` while it is not complete.
pub(super) fn header(buf: &[u8]) -> Option<Header> {
    let (&b0, rest) = buf.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    let masked = b1 & 0x80 != 0;
    let (payload, ext) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes(*rest.first_chunk::<2>()?)), 2),
        127 => (u64::from_be_bytes(*rest.first_chunk::<8>()?), 8),
        n => (u64::from(n), 0),
    };
    let head = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < head {
        return None;
    }
    Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70 != 0,
        opcode: b0 & 0x0f,
        // A length past u64 is a protocol error tungstenite reports itself.
        len: (head as u64).saturating_add(payload),
    })
}

/// What the frames handed so far did to the message stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Messages {
    /// A data frame without FIN was handed, and the frame that ends its
    /// message was not: tungstenite holds the first fragments.
    pub(super) fragmented: bool,
    /// A frame with RSV bits was handed: an extension's frame (compressed).
    pub(super) extension: bool,
    /// A close frame was handed: the connection is closing.
    pub(super) closing: bool,
}

impl Messages {
    /// Takes in a frame handed to tungstenite.
    pub(super) fn handed(&mut self, h: &Header) {
        self.extension |= h.rsv;
        if h.is_control() {
            self.closing |= h.opcode == 8;
        } else {
            self.fragmented = !h.fin;
        }
    }
}

/// Where the end of the HTTP request head is: the bytes up to and including
/// the first `\r\n\r\n`, found across calls.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct HeadEnd {
    /// How many bytes of `\r\n\r\n` ended the bytes seen so far.
    matched: u8,
}

impl HeadEnd {
    /// How many bytes of `buf` belong to the head (all of them if its end
    /// is not there), and whether the head ends there.
    pub(super) fn scan(&mut self, buf: &[u8]) -> (usize, bool) {
        const END: &[u8; 4] = b"\r\n\r\n";
        for (i, &b) in buf.iter().enumerate() {
            self.matched = if b == END[usize::from(self.matched)] {
                self.matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == 4 {
                return (i + 1, true);
            }
        }
        (buf.len(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
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
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.resize(f.len() + payload, b'x');
        f
    }

    #[test]
    fn headers_of_every_length_and_none_before_they_are_whole() {
        for (payload, head) in [(0, 6), (125, 6), (126, 8), (65535, 8), (65536, 14)] {
            let f = frame(0x82, payload);
            let h = header(&f).unwrap();
            assert_eq!(h.len, (head + payload) as u64, "payload {payload}");
            assert_eq!((h.fin, h.rsv, h.opcode), (true, false, 2));
            for cut in 0..head {
                assert_eq!(header(&f[..cut]), None, "payload {payload}, {cut} bytes");
            }
        }
        // An unmasked frame (server to client), a huge length.
        assert_eq!(header(&[0x81, 0x03]).unwrap().len, 5);
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(header(&huge).unwrap().len, u64::MAX);
    }

    #[test]
    fn fragmented_messages_and_control_frames_between_them() {
        let mut m = Messages::default();
        let h = |b: &[u8]| header(&frame(b[0], 1)).unwrap();
        m.handed(&h(&[0x01])); // text, not FIN
        assert!(m.fragmented);
        m.handed(&h(&[0x89])); // a ping between the fragments
        assert!(m.fragmented);
        m.handed(&h(&[0x00])); // continuation
        assert!(m.fragmented);
        m.handed(&h(&[0x80])); // the last continuation
        assert!(!m.fragmented && !m.extension && !m.closing);
        m.handed(&h(&[0xc1])); // RSV1: compressed
        assert!(m.extension);
        m.handed(&h(&[0x88]));
        assert!(m.closing);
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line_across_calls() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x81\x80";
        for cut in 0..req.len() {
            let mut end = HeadEnd::default();
            let (n, done) = end.scan(&req[..cut]);
            let total = if done {
                n
            } else {
                let (m, done) = end.scan(&req[cut..]);
                assert!(done, "cut at {cut}");
                cut + m
            };
            assert_eq!(total, req.len() - 2, "cut at {cut}");
        }
        let mut end = HeadEnd::default();
        assert_eq!(end.scan(b"a\r\r\n\r\n"), (6, true));
    }
}
