//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not a
//! stable API). Each feeds untrusted bytes to one decoder of data that comes
//! from another process or the environment; none may panic.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;

/// `KEY=VALUE` lines as an environment getter.
fn env_map(data: &[u8]) -> HashMap<String, OsString> {
    data.split(|b| *b == b'\n')
        .filter_map(|line| {
            let eq = line.iter().position(|b| *b == b'=')?;
            let key = String::from_utf8(line[..eq].to_vec()).ok()?;
            Some((key, OsString::from_vec(line[eq + 1..].to_vec())))
        })
        .collect()
}

/// The LISTEN_* / HANDOVER_* decoder, for pid 7.
pub fn env_decode(data: &[u8]) {
    let map = env_map(data);
    if let Ok(Some(inh)) = crate::env::decode(|k| map.get(k).cloned(), 7) {
        assert_eq!(
            inh.fds.len(),
            inh.fds.iter().filter(|(n, _)| !n.is_empty()).count()
        );
        if let Some(ch) = inh.channel {
            assert_eq!(ch as usize, crate::env::FDS_START as usize + inh.fds.len());
        }
    }
}

/// NOTIFY_SOCKET / WATCHDOG_* of the sd_notify client, for pid 7.
pub fn notify_env(data: &[u8]) {
    let map = env_map(data);
    let _ = crate::systemd::Notifier::from_getter(|k| map.get(k).cloned(), 7);
}

/// A control socket request line.
pub fn control_request(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::control::Request::parse(s);
    }
}

/// A takeover offer's line, as the process taking over reads it: when it
/// parses, it encodes back to what decodes the same.
pub fn takeover_offer(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        crate::takeover::fuzz_offer(s);
    }
}

/// The state stream as a successor reads it (at most 64 KiB of input).
pub fn state_stream(data: &[u8]) {
    let data = &data[..data.len().min(64 * 1024)];
    let Ok((a, b)) = crate::sys::socketpair_cloexec() else {
        return;
    };
    if crate::sys::send_all(std::os::fd::AsFd::as_fd(&a), data).is_err() {
        return;
    }
    drop(a);
    let progress = std::sync::Arc::default();
    let Ok(mut reader) = crate::state::StateReader::open(b, progress) else {
        return;
    };
    let mut sink = Vec::new();
    let _ = reader.read_to_end(&mut sink);
    assert!(sink.len() <= data.len());
}

/// Bytes on the channel between two generations, as either side decodes
/// them: the decoder always makes progress, and every message decoded
/// re-encodes canonically (encode, decode, encode gives the same bytes).
pub fn channel_message(data: &[u8]) {
    use crate::channel::{Inbox, Next};
    let mut inbox = Inbox::default();
    inbox.push(data);
    for _ in 0..=data.len() {
        match inbox.next() {
            Next::Incomplete => return,
            Next::Message(m) => {
                let wire = m.encode();
                let mut again = Inbox::default();
                again.push(&wire);
                let Next::Message(back) = again.next() else {
                    panic!("{m:?} does not decode from its own encoding");
                };
                assert_eq!(back.encode(), wire);
            }
            Next::Unknown(_) | Next::Bad(_) => {}
        }
    }
    panic!("the decoder did not make progress");
}

/// A record of the migration socket as the successor decodes it (feature
/// `tokio`, which connection migration needs), with 0 to 3 fds announced.
#[cfg(feature = "tokio")]
pub fn migrate_record(data: &[u8]) {
    let Some((&fds, record)) = data.split_first() else {
        return;
    };
    let _ = crate::migrate::fuzz_decode(record, usize::from(fds % 4));
}
