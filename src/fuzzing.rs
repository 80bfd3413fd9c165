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

/// A message line from the old generation to its successor (commit,
/// rollback, drain report).
pub fn channel_message(data: &[u8]) {
    // One line, as the successor splits them.
    let data = data.split(|b| *b == b'\n').next().unwrap_or_default();
    if let Ok(crate::stats::Message::Commit(c)) = crate::stats::parse_message(data) {
        // What decodes re-encodes to something that decodes the same.
        let line = format!("C{}", crate::stats::encode_commit(&c));
        let again = crate::stats::parse_message(line.as_bytes());
        assert_eq!(again, Ok(crate::stats::Message::Commit(c)));
    }
}
