//! The crate's own secrets that travel to a successor: today the
//! session-ticket keys of [`serve::tls_config`](crate::serve::tls_config)
//! (feature `tls`), so that clients resume their TLS sessions across an
//! upgrade.
//!
//! # How they travel
//!
//! At each upgrade, if this generation has secrets to hand on, it writes
//! them into a memory file (`memfd_create(2)`, close-on-exec), seals it
//! read-only (no write, no resize, no further seal) and hands it as one more
//! named fd, [`FD_NAME`], after the registered ones: in `LISTEN_FDNAMES` to
//! a successor it starts, in the offer to a takeover peer (which
//! authenticated over the control socket first). That file is made for this
//! upgrade only and closed by this generation once the successor has it. A
//! successor reads it in `build()` — before the application can build its
//! TLS configuration — and closes it there: it is never registered, never
//! handed further, never reported as unclaimed. What the application did
//! not take by `ready()` (a build without TLS) is wiped then.
//!
//! Why a sealed memory file and not the channel or the state stream:
//!
//! - the state stream is the application's ([`Handover::set_state_source`](crate::Handover::set_state_source));
//! - the channel before `ready()` carries that stream, and a successor
//!   that never takes its state would discard the secrets with it;
//! - an **older build** (a rollback to a version without TLS, or without
//!   this module) knows nothing of the file: it closes an inherited fd
//!   nobody claimed at `ready()`, with a warning naming
//!   `handover.secrets`, and starts as before. A message on the channel
//!   that it does not know would fail its protocol instead.
//!
//! The file never touches a file system: it lives in memory (like the
//! process's own heap, it may be swapped out). While the successor holds it
//! (from its exec to the end of `build()`), a process that may open
//! `/proc/PID/fd` of the successor could read it — which is a process that
//! may also read the successor's memory (same user or root, `ptrace`
//! rules): nobody new.
//!
//! # Format (version 1)
//!
//! `HOSECRT1`, then records until the end: the length of the kind (one
//! byte), the kind (ASCII), the length of the value (four bytes,
//! little-endian), the value. A successor skips kinds it does not know, so
//! a later version can add kinds; a file that does not parse is ignored
//! with a warning (the successor makes new secrets: TLS clients do a full
//! handshake, nothing fails). At most [`MAX_SIZE`] bytes are read.
//!
//! At the fd limit: once a secret is registered, the reserve of fds for
//! upgrades ([`Reserve`](crate::spawn::Reserve)) holds an empty memory
//! file, so an upgrade does not need a free fd slot for it.

use std::any::Any;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::lifecycle::{Generation, lock};
use crate::sys;

/// The name of the secrets file among the handed fds. An application may
/// not register an fd under it.
pub(crate) const FD_NAME: &str = "handover.secrets";

/// The first bytes of the file: "handover secrets, format 1".
const MAGIC: &[u8; 8] = b"HOSECRT1";

/// The most bytes a successor reads of the file.
pub(crate) const MAX_SIZE: usize = 64 * 1024;

/// Bytes that are wiped when dropped.
#[derive(Default, PartialEq, Eq)]
pub(crate) struct Secret(Vec<u8>);

impl Secret {
    pub(crate) fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Overwrites `bytes` with zeros, in writes the compiler may not drop.
pub(crate) fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to one byte.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// Makes the bytes of one kind of secret as it stands now.
type Export = Arc<dyn Fn() -> Secret + Send + Sync>;

/// One kind of secret this generation hands on.
struct Source {
    kind: &'static str,
    value: Arc<dyn Any + Send + Sync>,
    export: Export,
}

/// A generation's secrets: those its predecessor handed it, until taken,
/// and those it hands on.
#[derive(Default)]
pub(crate) struct Secrets {
    inherited: HashMap<String, Secret>,
    sources: Vec<Source>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("inherited", &self.inherited.keys().collect::<Vec<_>>())
            .field(
                "sources",
                &self.sources.iter().map(|s| s.kind).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Secrets {
    /// Takes the secrets file out of the fds handed to this process (every
    /// fd named [`FD_NAME`]: they are closed here) and reads it. A file
    /// that cannot be read or parsed is ignored with a warning.
    pub(crate) fn take_from(fds: &mut Vec<(String, OwnedFd)>) -> Secrets {
        let (files, kept): (Vec<_>, Vec<_>) = std::mem::take(fds)
            .into_iter()
            .partition(|(name, _)| name == FD_NAME);
        *fds = kept;
        let mut secrets = Secrets::default();
        for (_, file) in files {
            let read = sys::read_sealed(file.as_fd(), MAX_SIZE)
                .map(Secret::new)
                .map_err(|e| e.to_string())
                .and_then(|bytes| decode(bytes.bytes()));
            match read {
                Ok(records) => {
                    tracing::debug!(kinds = ?records.keys().collect::<Vec<_>>(), "secrets handed over");
                    secrets.inherited.extend(records);
                }
                Err(reason) => {
                    tracing::warn!(%reason, "ignoring the handed-over secrets; new ones are made")
                }
            }
        }
        secrets
    }

    /// The secret of `kind` this generation hands on, made once: from what
    /// the predecessor handed over (`make` gets its bytes) or anew (`make`
    /// gets `None`). Every later call returns the same value; `export` makes
    /// its bytes at each upgrade. `None` if `kind` is registered with
    /// another type.
    pub(crate) fn shared<T: Send + Sync + 'static>(
        &mut self,
        kind: &'static str,
        make: impl FnOnce(Option<Secret>) -> T,
        export: fn(&T) -> Secret,
    ) -> Option<Arc<T>> {
        if let Some(s) = self.sources.iter().find(|s| s.kind == kind) {
            return s.value.clone().downcast::<T>().ok();
        }
        let value = Arc::new(make(self.inherited.remove(kind)));
        let held = value.clone();
        self.sources.push(Source {
            kind,
            value: value.clone(),
            export: Arc::new(move || export(&held)),
        });
        Some(value)
    }

    /// Wipes the handed-over secrets nobody took (at `ready()`).
    pub(crate) fn drop_unclaimed(&mut self) {
        if !self.inherited.is_empty() {
            let kinds: Vec<_> = self.inherited.drain().map(|(k, _)| k).collect();
            tracing::debug!(?kinds, "handed-over secrets not used by this build; wiped");
        }
    }

    /// What this generation hands on, encoded; `None` if nothing.
    fn export(&self) -> Option<Secret> {
        if self.sources.is_empty() {
            return None;
        }
        let records: Vec<(&str, Secret)> = self
            .sources
            .iter()
            .map(|s| (s.kind, (s.export)()))
            .collect();
        Some(encode(&records))
    }
}

/// Encodes `records` (kind, value) in the file's format.
pub(crate) fn encode(records: &[(&str, Secret)]) -> Secret {
    let mut out = Vec::with_capacity(
        MAGIC.len()
            + records
                .iter()
                .map(|(k, v)| 5 + k.len() + v.bytes().len())
                .sum::<usize>(),
    );
    out.extend_from_slice(MAGIC);
    for (kind, value) in records {
        let len = u8::try_from(kind.len()).expect("a kind is a short constant");
        out.push(len);
        out.extend_from_slice(kind.as_bytes());
        let vlen = u32::try_from(value.bytes().len()).expect("a secret is small");
        out.extend_from_slice(&vlen.to_le_bytes());
        out.extend_from_slice(value.bytes());
    }
    Secret(out)
}

/// Decodes the file's bytes into its records, or says what is wrong.
/// Pure; untrusted input.
pub(crate) fn decode(bytes: &[u8]) -> Result<HashMap<String, Secret>, String> {
    let mut rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a secrets file of a known version")?;
    let mut records = HashMap::new();
    while let Some((&klen, after)) = rest.split_first() {
        let klen = usize::from(klen);
        if after.len() < klen + 4 {
            return Err("a record is cut short".to_owned());
        }
        let (kind, after) = after.split_at(klen);
        let kind = std::str::from_utf8(kind)
            .ok()
            .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or("a record's kind is not printable ASCII")?;
        let (vlen, after) = after.split_at(4);
        let vlen = u32::from_le_bytes(vlen.try_into().expect("four bytes")) as usize;
        if after.len() < vlen {
            return Err(format!("the value of {kind:?} is cut short"));
        }
        let (value, after) = after.split_at(vlen);
        if records
            .insert(kind.to_owned(), Secret(value.to_vec()))
            .is_some()
        {
            return Err(format!("{kind:?} appears twice"));
        }
        rest = after;
    }
    Ok(records)
}

impl Generation {
    /// The secret of `kind` (see [`Secrets::shared`]); the reserve keeps a
    /// memory file ready for the upgrades that will hand it on.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn shared_secret<T: Send + Sync + 'static>(
        &self,
        kind: &'static str,
        make: impl FnOnce(Option<Secret>) -> T,
        export: fn(&T) -> Secret,
    ) -> Option<Arc<T>> {
        let value = lock(&self.secrets).shared(kind, make, export);
        lock(&self.reserve).want_secrets_file();
        value
    }

    /// For one upgrade: this generation's secrets in a sealed memory file,
    /// to hand over as [`FD_NAME`]; `None` if it has none, or if the file
    /// cannot be made (warned: the successor makes its own secrets).
    pub(crate) fn secrets_file(&self) -> Option<OwnedFd> {
        let data = lock(&self.secrets).export()?;
        let file = lock(&self.reserve).secrets_file();
        let sealed = file.and_then(|f| sys::write_and_seal(f.as_fd(), data.bytes()).map(|()| f));
        match sealed {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand the secrets over; the successor makes new ones (TLS clients do a full handshake)");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_unknown_bytes_are_refused() {
        let file = encode(&[
            ("tls.tickets", Secret(vec![1, 2, 3])),
            ("x", Secret(Vec::new())),
        ]);
        let records = decode(file.bytes()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records["tls.tickets"].bytes(), &[1, 2, 3]);
        assert!(records["x"].bytes().is_empty());
        assert!(decode(MAGIC).unwrap().is_empty());
        assert!(decode(b"HOSECRT2").is_err(), "another version");
        assert!(decode(b"").is_err());
        // Cut anywhere inside a record: an error, never a panic.
        for cut in MAGIC.len() + 1..file.bytes().len() {
            if cut == MAGIC.len() + 1 + 11 + 4 + 3 {
                continue; // the first record ends here: a valid file
            }
            assert!(decode(&file.bytes()[..cut]).is_err(), "cut at {cut}");
        }
        let mut twice = encode(&[("a", Secret(vec![1]))]).bytes().to_vec();
        let record = twice[MAGIC.len()..].to_vec();
        twice.extend_from_slice(&record);
        assert!(decode(&twice).is_err());
        let mut bad_kind = MAGIC.to_vec();
        bad_kind.extend_from_slice(&[1, b' ', 0, 0, 0, 0]);
        assert!(decode(&bad_kind).is_err());
    }

    #[test]
    fn a_sealed_file_is_read_back_and_the_secret_is_made_once() {
        let file = sys::memfd_sealable(c"test").unwrap();
        assert!(sys::is_cloexec(file.as_fd()).unwrap());
        assert!(
            sys::read_sealed(file.as_fd(), MAX_SIZE).is_err(),
            "not sealed yet"
        );
        let mut secrets = Secrets::default();
        let made = secrets
            .shared(
                "k",
                |old| old.map_or(7u32, |_| 0),
                |v| Secret(vec![*v as u8]),
            )
            .unwrap();
        let again = secrets
            .shared("k", |_| 9u32, |v| Secret(vec![*v as u8]))
            .unwrap();
        assert!(Arc::ptr_eq(&made, &again));
        assert!(
            secrets
                .shared("k", |_| "other", |_| Secret(vec![]))
                .is_none()
        );
        let data = secrets.export().unwrap();
        sys::write_and_seal(file.as_fd(), data.bytes()).unwrap();
        // Read-only for good.
        assert!(nix::unistd::write(&file, b"x").is_err());
        let mut fds = vec![
            ("http".to_owned(), sys::pipe_cloexec().unwrap().0),
            (FD_NAME.to_owned(), file),
        ];
        let mut taken = Secrets::take_from(&mut fds);
        assert_eq!(fds.len(), 1, "the secrets file is taken out");
        let value = taken
            .shared(
                "k",
                |old| old.unwrap().bytes()[0] as u32,
                |_| Secret(vec![]),
            )
            .unwrap();
        assert_eq!(*value, 7);
        // A file that is not sealed, or not a memory file, is ignored.
        let mut fds = vec![(FD_NAME.to_owned(), sys::pipe_cloexec().unwrap().0)];
        assert!(Secrets::take_from(&mut fds).inherited.is_empty());
        assert!(fds.is_empty());
    }
}
