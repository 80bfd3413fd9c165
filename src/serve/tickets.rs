//! The session-ticket keys of a service, which travel from generation to
//! generation so that TLS clients resume their sessions across upgrades.
//!
//! rustls' own ticketer makes random keys that never leave the process:
//! after every upgrade each client would pay a full handshake, all at once.
//! [`Tickets`] is a ticketer of the same design — ChaCha20-Poly1305 (from
//! ring), a 16-byte key name in front of each ticket, a new key every
//! [`LIFETIME`], the previous one still accepted for one more period, so a
//! ticket is good for at least `LIFETIME` — whose keys and schedule are
//! exported at each upgrade (see `crate::secrets`) and imported by the
//! successor, which then rotates them on the same schedule.
//!
//! It also keeps the *next* key, made in advance: a rotation that falls
//! between an upgrade's export and its commit happens in both generations
//! at the same moment with the same key, so tickets issued by either one
//! meanwhile are good in the other.
//!
//! A ticket: key name (16 bytes), nonce (12, random), the sealed session
//! (with its 16-byte tag); the key name is the additional authenticated
//! data.

use std::sync::{RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::secrets::{Secret, wipe};

/// The kind of secret under which the keys travel.
pub(crate) const KIND: &str = "tls.tickets";

/// How long a key makes tickets before the next one takes over (as
/// rustls' ticketer: 6 hours). Tickets are good for at least this long,
/// and at most twice.
pub(crate) const LIFETIME: u32 = 6 * 60 * 60;

const NAME_LEN: usize = 16;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// The exported form, version 1: version, lifetime (u32), when the next
/// key takes over (u64, Unix seconds), then the keys (name and key each):
/// current, next, and a flag byte with the previous one.
const FORMAT: u8 = 1;
const KEY_BYTES: usize = NAME_LEN + KEY_LEN;
const EXPORTED_LEN: usize = 1 + 4 + 8 + 2 * KEY_BYTES + 1 + KEY_BYTES;

/// One ticket key.
struct Key {
    name: [u8; NAME_LEN],
    /// Kept to hand on: ring's key cannot be read back.
    raw: [u8; KEY_LEN],
    aead: LessSafeKey,
}

impl Drop for Key {
    fn drop(&mut self) {
        wipe(&mut self.raw);
    }
}

impl Key {
    fn from_parts(name: [u8; NAME_LEN], raw: [u8; KEY_LEN]) -> Option<Key> {
        let aead = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &raw).ok()?);
        Some(Key { name, raw, aead })
    }

    fn random(rng: &SystemRandom) -> Option<Key> {
        let mut name = [0u8; NAME_LEN];
        let mut raw = [0u8; KEY_LEN];
        rng.fill(&mut name).ok()?;
        rng.fill(&mut raw).ok()?;
        let key = Key::from_parts(name, raw);
        wipe(&mut raw);
        key
    }

    fn export(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.raw);
    }

    fn import(bytes: &[u8]) -> Option<Key> {
        let mut name = [0u8; NAME_LEN];
        let mut raw = [0u8; KEY_LEN];
        name.copy_from_slice(bytes.get(..NAME_LEN)?);
        raw.copy_from_slice(bytes.get(NAME_LEN..KEY_BYTES)?);
        let key = Key::from_parts(name, raw);
        wipe(&mut raw);
        key
    }
}

struct Keys {
    current: Key,
    previous: Option<Key>,
    next: Key,
    /// When `next` takes over (Unix seconds).
    switch_at: u64,
}

/// The service's ticketer: see the module documentation.
pub(crate) struct Tickets {
    lifetime: u32,
    keys: RwLock<Keys>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Tickets")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Tickets {
    /// New keys, the first rotation one lifetime from `now`. `None` if the
    /// system's random source fails.
    pub(crate) fn new(lifetime: u32, now: u64) -> Option<Tickets> {
        let rng = SystemRandom::new();
        let keys = Keys {
            current: Key::random(&rng)?,
            previous: None,
            next: Key::random(&rng)?,
            switch_at: now.saturating_add(u64::from(lifetime)),
        };
        Some(Tickets {
            lifetime,
            keys: RwLock::new(keys),
            rng,
        })
    }

    /// The keys and schedule handed over by the predecessor, or why they
    /// cannot be used. Untrusted input: checked, never a panic; a rotation
    /// said to be more than one lifetime after `now` is moved to one
    /// lifetime after it (keys are never kept longer than their schedule).
    pub(crate) fn import(bytes: &[u8], now: u64) -> Result<Tickets, String> {
        if bytes.len() != EXPORTED_LEN {
            return Err(format!(
                "{} bytes of ticket keys, not the {EXPORTED_LEN} of format {FORMAT}",
                bytes.len()
            ));
        }
        if bytes[0] != FORMAT {
            return Err(format!("ticket key format {}, not {FORMAT}", bytes[0]));
        }
        let lifetime = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes"));
        if lifetime == 0 || lifetime > 7 * 24 * 60 * 60 {
            return Err(format!("a ticket key lifetime of {lifetime} s"));
        }
        let switch_at = u64::from_le_bytes(bytes[5..13].try_into().expect("8 bytes"))
            .min(now.saturating_add(u64::from(lifetime)));
        let at = |i: usize| &bytes[13 + i * KEY_BYTES..13 + (i + 1) * KEY_BYTES];
        let bad = || "a ticket key that ring refuses".to_owned();
        let current = Key::import(at(0)).ok_or_else(bad)?;
        let next = Key::import(at(1)).ok_or_else(bad)?;
        let previous = match bytes[13 + 2 * KEY_BYTES] {
            0 => None,
            1 => Some(Key::import(&bytes[14 + 2 * KEY_BYTES..]).ok_or_else(bad)?),
            f => return Err(format!("a previous-key flag of {f}")),
        };
        Ok(Tickets {
            lifetime,
            keys: RwLock::new(Keys {
                current,
                previous,
                next,
                switch_at,
            }),
            rng: SystemRandom::new(),
        })
    }

    /// The keys and schedule as they stand, for the successor (which
    /// rotates them when it is time).
    pub(crate) fn export(&self) -> Secret {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(EXPORTED_LEN);
        out.push(FORMAT);
        out.extend_from_slice(&self.lifetime.to_le_bytes());
        out.extend_from_slice(&keys.switch_at.to_le_bytes());
        keys.current.export(&mut out);
        keys.next.export(&mut out);
        match &keys.previous {
            Some(k) => {
                out.push(1);
                k.export(&mut out);
            }
            None => {
                out.push(0);
                out.extend_from_slice(&[0u8; KEY_BYTES]);
            }
        }
        Secret::new(out)
    }

    /// The keys as they stand at `now`, rotated first if it is time: the
    /// next key takes over, the current one becomes the previous one, the
    /// previous one is erased. Keys not used for two lifetimes or more are
    /// all replaced.
    fn keys_at(&self, now: u64) -> RwLockReadGuard<'_, Keys> {
        {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            if now < keys.switch_at {
                return keys;
            }
        }
        {
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let lifetime = u64::from(self.lifetime);
            while now >= keys.switch_at {
                let Some(fresh) = Key::random(&self.rng) else {
                    // No randomness now: keep the keys, try again later.
                    tracing::warn!("cannot make a new session-ticket key");
                    break;
                };
                let next = std::mem::replace(&mut keys.next, fresh);
                let old = std::mem::replace(&mut keys.current, next);
                keys.previous = Some(old);
                keys.switch_at = if now >= keys.switch_at.saturating_add(lifetime) {
                    // Idle for a whole lifetime or more: what would have
                    // been the previous key is too old to keep.
                    keys.previous = None;
                    now.saturating_add(lifetime)
                } else {
                    keys.switch_at.saturating_add(lifetime)
                };
            }
        }
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn encrypt_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let keys = self.keys_at(now);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&keys.current.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut sealed = out.split_off(NAME_LEN + NONCE_LEN);
        keys.current
            .aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&keys.current.name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt_at(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        if cipher.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys_at(now);
        // `next` too: a generation that rotated a moment earlier (an
        // upgrade in progress) issues tickets with it.
        let key = [
            Some(&keys.current),
            keys.previous.as_ref(),
            Some(&keys.next),
        ]
        .into_iter()
        .flatten()
        .find(|k| same_name(&k.name, name))?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key
            .aead
            .open_in_place(nonce, Aad::from(&key.name), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

/// Compares key names in constant time (as rustls' own ticketer does).
fn same_name(a: &[u8; NAME_LEN], b: &[u8]) -> bool {
    b.len() == NAME_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(plain, unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, unix_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: u64 = LIFETIME as u64;

    fn moved(t: &Tickets, now: u64) -> Tickets {
        Tickets::import(t.export().bytes(), now).unwrap()
    }

    #[test]
    fn tickets_open_in_the_successor_and_rotate_on_the_same_schedule() {
        let t0 = 1_000_000;
        let old = Tickets::new(LIFETIME, t0).unwrap();
        let ticket = old.encrypt_at(b"session", t0 + 10).unwrap();
        assert_eq!(old.decrypt_at(&ticket, t0 + 11).unwrap(), b"session");
        // The successor opens what the old generation sealed, and the
        // other way round.
        let new = moved(&old, t0 + 15);
        assert_eq!(new.decrypt_at(&ticket, t0 + 20).unwrap(), b"session");
        let from_new = new.encrypt_at(b"other", t0 + 21).unwrap();
        assert_eq!(old.decrypt_at(&from_new, t0 + 22).unwrap(), b"other");
        // Both rotate at the same moment, to the same key: a ticket made
        // by one after the rotation opens in the other.
        let after = t0 + L + 1;
        let rotated_old = old.encrypt_at(b"r", after).unwrap();
        let rotated_new = new.encrypt_at(b"r", after + 2).unwrap();
        assert_eq!(rotated_old[..NAME_LEN], rotated_new[..NAME_LEN]);
        assert_ne!(rotated_old[..NAME_LEN], ticket[..NAME_LEN]);
        assert_eq!(new.decrypt_at(&rotated_old, after + 3).unwrap(), b"r");
        // The ticket from before the rotation is good for one more
        // lifetime (the previous key), and not after.
        assert!(new.decrypt_at(&ticket, t0 + 2 * L - 1).is_some());
        assert!(new.decrypt_at(&ticket, t0 + 2 * L + 1).is_none());
        // A successor of the successor still has the schedule.
        let third = moved(&new, t0 + 2 * L + 2);
        assert_eq!(
            third.decrypt_at(&rotated_new, t0 + 2 * L + 2).unwrap(),
            b"r"
        );
    }

    #[test]
    fn idle_for_two_lifetimes_replaces_every_key() {
        let t0 = 5_000;
        let t = Tickets::new(LIFETIME, t0).unwrap();
        let ticket = t.encrypt_at(b"s", t0).unwrap();
        assert!(t.decrypt_at(&ticket, t0 + 3 * L).is_none());
        let fresh = t.encrypt_at(b"s", t0 + 3 * L).unwrap();
        assert!(t.decrypt_at(&fresh, t0 + 3 * L + 1).is_some());
    }

    #[test]
    fn forged_cut_and_foreign_tickets_are_refused() {
        let t = Tickets::new(LIFETIME, 100).unwrap();
        let other = Tickets::new(LIFETIME, 100).unwrap();
        let ticket = t.encrypt_at(b"secret session", 101).unwrap();
        assert!(other.decrypt_at(&ticket, 101).is_none());
        for cut in 0..ticket.len() {
            assert!(t.decrypt_at(&ticket[..cut], 101).is_none());
        }
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert!(t.decrypt_at(&bad, 101).is_none(), "byte {i} flipped");
        }
        assert!(Tickets::import(&[], 101).is_err());
        let mut e = t.export().bytes().to_vec();
        e[0] = 2;
        assert!(Tickets::import(&e, 101).is_err());
        let mut e = t.export().bytes().to_vec();
        e[1..5].copy_from_slice(&0u32.to_le_bytes());
        assert!(Tickets::import(&e, 101).is_err());
        let mut e = t.export().bytes().to_vec();
        e[13 + 2 * KEY_BYTES] = 7;
        assert!(Tickets::import(&e, 101).is_err());
        e.pop();
        assert!(Tickets::import(&e, 101).is_err());
        // A rotation far in the future is brought back to one lifetime.
        let mut e = t.export().bytes().to_vec();
        e[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        let far = Tickets::import(&e, 101).unwrap();
        let before = far.encrypt_at(b"s", 102).unwrap();
        let after = far.encrypt_at(b"s", 101 + L).unwrap();
        assert_ne!(before[..NAME_LEN], after[..NAME_LEN], "rotated on time");
    }
}
