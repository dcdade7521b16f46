//! The encryption keys: a ring of named 256-bit keys, the first of which seals
//! (XChaCha20-Poly1305) and every one of which opens what it sealed; and the
//! keyed hash (HMAC-SHA256) of key/value keys.
//!
//! XChaCha20-Poly1305 rather than AES-256-GCM: every process seals with the same
//! key and no counter can be shared between them, so nonces are random, and
//! XChaCha's 192-bit nonces may be drawn at random for any number of values,
//! where AES-GCM's 96-bit ones must stay under 2^32 values per key.

use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a key.
pub(crate) const KEY_BYTES: usize = 32;

/// Bytes of a nonce.
pub(super) const NONCE_BYTES: usize = 24;

/// The longest key id.
pub(crate) const MAX_ID_BYTES: usize = 32;

/// What the key/value keys' hashing key is derived from its ring key with, so it
/// is never the sealing key itself.
const KEY_HASHING_LABEL: &[u8] = b"pgcache kv key hashing v1";

/// One key of the ring: its id, its cipher, and its material, from which the key
/// hashing key is derived.
struct RingKey {
    id: String,
    cipher: XChaCha20Poly1305,
    material: [u8; KEY_BYTES],
}

/// The encryption keys, the first (primary) sealing, every one opening. Its
/// `Debug` shows the ids only.
pub(crate) struct KeyRing {
    keys: Vec<RingKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}

/// Why a ring could not be made: the offending key's id (or its position, when
/// the id is the problem) and what a valid one looks like. Never the material.
pub(crate) type RingError = (String, String);

impl KeyRing {
    /// A ring of `keys` (id, material), the first primary.
    ///
    /// # Errors
    /// The first bad key: an id that is empty, over [`MAX_ID_BYTES`] or not made of
    /// `A-Z a-z 0-9 . _ -`, an id given twice, material not of [`KEY_BYTES`] bytes.
    pub(crate) fn new<'k>(
        keys: impl IntoIterator<Item = (&'k str, &'k [u8])>,
    ) -> Result<Self, RingError> {
        let mut ring = KeyRing { keys: Vec::new() };
        for (i, (id, material)) in keys.into_iter().enumerate() {
            check_id(id).map_err(|reason| (format!("key {}", i + 1), reason))?;
            if ring.keys.iter().any(|k| k.id == id) {
                return Err((id.to_owned(), "the id is given twice".to_owned()));
            }
            let material: [u8; KEY_BYTES] = material.try_into().map_err(|_| {
                (
                    id.to_owned(),
                    format!(
                        "a key is {KEY_BYTES} bytes ({} given; e.g. `openssl rand -base64 32`)",
                        material.len()
                    ),
                )
            })?;
            ring.keys.push(RingKey {
                id: id.to_owned(),
                cipher: XChaCha20Poly1305::new(&material.into()),
                material,
            });
        }
        Ok(ring)
    }

    /// The ids, primary first.
    pub(crate) fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// The primary key's id: what new values are sealed with.
    pub(crate) fn primary_id(&self) -> Option<&str> {
        self.keys.first().map(|k| k.id.as_str())
    }

    /// `plaintext` sealed with the primary key, bound to `aad`: the nonce, then
    /// the ciphertext and its tag. `None` without keys.
    pub(crate) fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// What [`seal`](Self::seal) sealed with the key `id` (nonce, ciphertext,
    /// tag), checked against `aad`.
    ///
    /// # Errors
    /// [`Unsealed::UnknownKey`] when the ring has no key `id`,
    /// [`Unsealed::Forged`] when the key does not open it (another key's material
    /// under that id, another entry's value, altered bytes).
    pub(crate) fn open(&self, id: &str, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, Unsealed> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(Unsealed::UnknownKey)?;
        if sealed.len() < NONCE_BYTES {
            return Err(Unsealed::Forged);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        key.cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| Unsealed::Forged)
    }

    /// The hashing of key/value keys under the ring's key `id`; `None` when the
    /// ring has no such key.
    pub(crate) fn key_hashing(&self, id: &str) -> Option<KeyHashing> {
        let key = self.keys.iter().find(|k| k.id == id)?;
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(&key.material).ok()?;
        derive.update(KEY_HASHING_LABEL);
        Some(KeyHashing {
            id: key.id.clone(),
            mac: <Hmac<Sha256> as Mac>::new_from_slice(&derive.finalize().into_bytes()).ok()?,
        })
    }
}

/// Why a sealed value did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsealed {
    /// The ring has no key of the id it was sealed with.
    UnknownKey,
    /// The key of that id does not open it.
    Forged,
}

/// Key/value keys as stored when they are hashed: HMAC-SHA256 under a key derived
/// from one ring key, in lowercase hex. Its `Debug` shows the key's id only.
#[derive(Clone)]
pub(crate) struct KeyHashing {
    id: String,
    mac: Hmac<Sha256>,
}

impl fmt::Debug for KeyHashing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHashing")
            .field("key_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl KeyHashing {
    /// The hash of `key`, as stored in the key column.
    pub(crate) fn hash(&self, key: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(key.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The id of the ring key the hashing key is derived from.
    pub(crate) fn key_id(&self) -> &str {
        &self.id
    }
}

/// Checks a key id: 1 to [`MAX_ID_BYTES`] bytes of `A-Z a-z 0-9 . _ -`.
fn check_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "a key id is 1 to {MAX_ID_BYTES} characters of A-Z a-z 0-9 . _ - (got {} characters)",
            id.chars().count()
        ))
    }
}

/// `PGCACHE_ENCRYPTION_KEYS`'s text: `id:base64key` pairs separated by commas, the
/// first primary. The keys' material as bytes.
///
/// # Errors
/// A pair without `:` or whose key is not base64, by its position: never any of
/// the text.
pub(crate) fn parse_keys(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let pairs = text.split(',').map(str::trim).filter(|p| !p.is_empty());
    let mut keys = Vec::new();
    for (i, pair) in pairs.enumerate() {
        let Some((id, key)) = pair.split_once(':') else {
            return Err(format!(
                "key {} is not `id:base64key` (e.g. `2026-12:` then 44 characters of base64)",
                i + 1
            ));
        };
        let material = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| format!("key {} (`{}`) is not standard base64", i + 1, id.trim()))?;
        keys.push((id.trim().to_owned(), material));
    }
    if keys.is_empty() {
        return Err("at least one `id:base64key` is needed; unset it for no encryption".to_owned());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[(&str, [u8; KEY_BYTES])]) -> KeyRing {
        KeyRing::new(keys.iter().map(|(id, k)| (*id, &k[..]))).unwrap()
    }

    #[test]
    fn what_one_key_seals_another_cannot_open() {
        let a = ring(&[("a", [1; KEY_BYTES])]);
        let sealed = a.seal(b"secret", b"aad").unwrap();
        assert_eq!(a.open("a", &sealed, b"aad").unwrap(), b"secret");
        let impostor = ring(&[("a", [2; KEY_BYTES])]);
        assert_eq!(impostor.open("a", &sealed, b"aad"), Err(Unsealed::Forged));
        assert_eq!(a.open("b", &sealed, b"aad"), Err(Unsealed::UnknownKey));
        assert_eq!(a.open("a", &sealed, b"other"), Err(Unsealed::Forged));
    }

    #[test]
    fn the_primary_seals_and_older_keys_still_open() {
        let old = ring(&[("old", [1; KEY_BYTES])]);
        let sealed = old.seal(b"v", b"").unwrap();
        let rotated = ring(&[("new", [2; KEY_BYTES]), ("old", [1; KEY_BYTES])]);
        assert_eq!(rotated.primary_id(), Some("new"));
        assert_eq!(rotated.open("old", &sealed, b"").unwrap(), b"v");
    }

    #[test]
    fn bad_keys_are_named_without_their_material() {
        let short = KeyRing::new([("k", &[7u8; 16][..])]).unwrap_err();
        assert_eq!(short.0, "k");
        assert!(short.1.contains("16 given"));
        assert!(KeyRing::new([("bad id", &[0u8; KEY_BYTES][..])]).is_err());
        let twice = KeyRing::new([("k", &[0u8; KEY_BYTES][..]), ("k", &[1u8; KEY_BYTES][..])]);
        assert!(twice.is_err());
        let error = parse_keys("k1:c2VjcmV0LW5vdC1iYXNlNjQ$").unwrap_err();
        assert!(!error.contains("c2VjcmV0"), "{error}");
    }

    #[test]
    fn debug_shows_ids_and_never_material() {
        let material = [0xAB; KEY_BYTES];
        let ring = ring(&[("k1", material)]);
        let hashing = ring.key_hashing("k1").unwrap();
        for shown in [format!("{ring:?}"), format!("{hashing:?}")] {
            assert!(shown.contains("k1"), "{shown}");
            assert!(!shown.to_lowercase().contains("abab"), "{shown}");
            assert!(!shown.contains("171"), "{shown}");
        }
    }

    #[test]
    fn hashed_keys_depend_on_the_key_and_the_ring_key() {
        let a = ring(&[("a", [1; KEY_BYTES])]).key_hashing("a").unwrap();
        let b = ring(&[("a", [2; KEY_BYTES])]).key_hashing("a").unwrap();
        assert_eq!(a.hash("user:1"), a.hash("user:1"));
        assert_ne!(a.hash("user:1"), a.hash("user:2"));
        assert_ne!(a.hash("user:1"), b.hash("user:1"));
        assert_eq!(a.hash("user:1").len(), 64);
    }
}
