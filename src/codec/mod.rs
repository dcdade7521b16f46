//! The value codec: what happens to a payload between the caller and its column,
//! and back, for every cache: compression over a threshold ([`compress`]) of
//! key/value values (JSON text, bytes) and LLM responses, then, with encryption keys
//! configured, sealing with the primary key ([`seal`]) of those and of embeddings,
//! vector-search results and inline audio ([`Codec::seal`]: sealed, never only
//! compressed). Compress, then seal: a sealed value no longer compresses. And the
//! keyed hash of key/value keys.
//!
//! # The envelope
//! A payload the codec changed is stored as an envelope, in a binary column of its
//! own (`packed`, or the kv table's `bytes` marked by `bytes_packed`), so entries
//! written before,
//! plain, are told apart by their column and still read:
//! - byte 0: flags, [`COMPRESSED`] (a zstd frame follows) and [`SEALED`];
//! - sealed: the key id's length (one byte) and the key id, then the nonce, the
//!   ciphertext and the tag of the (compressed) payload. The associated data is
//!   the header (flags and key id) followed by the entry's [`Context`] (its cache,
//!   column and key), so a sealed value copied to another entry, or with its
//!   flags changed, does not open;
//! - not sealed: the zstd frame.
//!
//! A payload the codec leaves alone (not over the threshold, no keys) is stored as
//! it always was.
//!
//! # Failures
//! [`Codec::open`] never returns what it cannot vouch for: an envelope sealed with
//! a key the ring lacks, one the key of its id does not open (other material under
//! that id, altered bytes, a value moved from another entry), a malformed one: each
//! is `None`, which the caches read as a miss, with a warning naming the cache and
//! the key id, never a key's material.

mod compress;
mod seal;

use std::borrow::Cow;
use std::fmt;

use crate::error::{Error, Result};
use crate::kind::CacheKind;

pub(crate) use seal::parse_keys;
use seal::{KeyHashing, KeyRing, Unsealed};

/// Payloads of more than this many bytes are compressed unless configured
/// otherwise (`compression_threshold`, `PGCACHE_COMPRESSION_THRESHOLD_BYTES`).
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 1024;

/// Envelope flag: the payload is a zstd frame.
const COMPRESSED: u8 = 0b01;

/// Envelope flag: the (compressed) payload is sealed; the key id follows.
const SEALED: u8 = 0b10;

/// Where a payload belongs, bound into the associated data of its seal.
#[derive(Clone, Copy)]
pub(crate) struct Context<'a> {
    /// The cache.
    pub(crate) cache: CacheKind,
    /// What the payload is within the entry (`json`, `bytes`, `response`), so one
    /// kind of payload cannot pass for another.
    pub(crate) part: &'static str,
    /// The entry's key as the caller gave it (a key/value key) or its digest.
    pub(crate) key: &'a [u8],
}

impl<'a> Context<'a> {
    /// The context of `key`'s `part` in `cache`.
    pub(crate) fn new(cache: CacheKind, part: &'static str, key: &'a [u8]) -> Self {
        Context { cache, part, key }
    }

    /// The associated data of a seal: `header`, then each part of the context
    /// length-prefixed, so no two contexts give the same bytes.
    fn associated_data(&self, header: &[u8]) -> Vec<u8> {
        let parts: [&[u8]; 3] = [self.cache.name().as_bytes(), self.part.as_bytes(), self.key];
        let mut aad =
            Vec::with_capacity(header.len() + 12 + parts.iter().map(|p| p.len()).sum::<usize>());
        aad.extend_from_slice(header);
        for part in parts {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad
    }
}

/// The settings the builder gathers, checked into a [`Codec`] by [`Codec::new`].
/// Its `Debug` shows the key ids only.
#[derive(Clone)]
pub(crate) struct CodecSettings {
    /// Compress payloads of more than this many bytes; `None`: never.
    pub(crate) compress_above: Option<usize>,
    /// The encryption keys (id, material), the first primary.
    pub(crate) keys: Vec<(String, Vec<u8>)>,
    /// Store key/value keys hashed under this ring key.
    pub(crate) hash_kv_keys: Option<String>,
}

impl Default for CodecSettings {
    fn default() -> Self {
        CodecSettings {
            compress_above: Some(DEFAULT_COMPRESSION_THRESHOLD),
            keys: Vec::new(),
            hash_kv_keys: None,
        }
    }
}

impl fmt::Debug for CodecSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("CodecSettings")
            .field("compress_above", &self.compress_above)
            .field("key_ids", &ids)
            .field("hash_kv_keys", &self.hash_kv_keys)
            .finish()
    }
}

/// What made a [`CodecSettings`] invalid: the setting (`encryption_keys`,
/// `hash_kv_keys`), the value to show (never a key's material) and why.
pub(crate) type SettingError = (&'static str, String, String);

/// The codec of one configuration: compression, the key ring, the hashing of
/// key/value keys. Its `Debug` shows the key ids only.
///
/// Public only so the typed tables' trait (`TypedTable`) may name it in its
/// methods; it lives in a private module and is not reachable outside the crate.
pub struct Codec {
    compress_above: Option<usize>,
    ring: Option<KeyRing>,
    key_hashing: Option<KeyHashing>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("compress_above", &self.compress_above)
            .field("keys", &self.ring)
            .field("key_hashing", &self.key_hashing)
            .finish()
    }
}

impl Default for Codec {
    fn default() -> Self {
        Codec {
            compress_above: Some(DEFAULT_COMPRESSION_THRESHOLD),
            ring: None,
            key_hashing: None,
        }
    }
}

impl Codec {
    /// Checks `settings` into a codec.
    ///
    /// # Errors
    /// A bad key (see [`KeyRing::new`]), or key hashing under an id the ring lacks.
    pub(crate) fn new(settings: &CodecSettings) -> Result<Self, SettingError> {
        let ring = match settings.keys.as_slice() {
            [] => None,
            keys => Some(
                KeyRing::new(keys.iter().map(|(id, k)| (id.as_str(), k.as_slice()))).map_err(
                    |(key, reason)| ("encryption_keys", key.clone(), format!("{key}: {reason}")),
                )?,
            ),
        };
        let key_hashing = match &settings.hash_kv_keys {
            None => None,
            Some(id) => Some(
                ring.as_ref()
                    .and_then(|ring| ring.key_hashing(id))
                    .ok_or_else(|| {
                        (
                            "hash_kv_keys",
                            id.clone(),
                            "names no encryption key: key/value keys are hashed under a key \
                             of the ring (PGCACHE_ENCRYPTION_KEYS, `encryption_key`)"
                                .to_owned(),
                        )
                    })?,
            ),
        };
        Ok(Codec {
            compress_above: settings.compress_above,
            ring,
            key_hashing,
        })
    }

    /// Payloads of more than this many bytes are compressed; `None`: none is.
    pub(crate) fn compression_threshold(&self) -> Option<usize> {
        self.compress_above
    }

    /// The encryption keys' ids, primary first; empty without encryption.
    pub(crate) fn key_ids(&self) -> Vec<&str> {
        self.ring.as_ref().map(KeyRing::ids).unwrap_or_default()
    }

    /// Whether values are sealed.
    pub(crate) fn seals(&self) -> bool {
        self.ring.is_some()
    }

    /// The id of the key key/value keys are hashed under, if they are.
    pub(crate) fn kv_key_hashing(&self) -> Option<&str> {
        self.key_hashing.as_ref().map(KeyHashing::key_id)
    }

    /// A key/value key as stored: itself, or its keyed hash.
    pub(crate) fn kv_key<'k>(&self, key: &'k str) -> Cow<'k, str> {
        match &self.key_hashing {
            Some(hashing) => Cow::Owned(hashing.hash(key)),
            None => Cow::Borrowed(key),
        }
    }

    /// `payload` as stored: an envelope (compressed over the threshold, sealed when
    /// there are keys), or `None` when it is stored as it is.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the cipher refuses the payload (over 256 GiB).
    pub(crate) fn pack(&self, payload: &[u8], context: Context<'_>) -> Result<Option<Vec<u8>>> {
        let compressed = match self.compress_above {
            Some(threshold) if payload.len() > threshold => compress::compress(payload),
            _ => None,
        };
        let flags = if compressed.is_some() { COMPRESSED } else { 0 };
        let Some(ring) = &self.ring else {
            return Ok(compressed.map(|frame| [&[flags][..], &frame[..]].concat()));
        };
        let id = ring.primary_id().unwrap_or_default();
        let mut envelope = Vec::with_capacity(payload.len() + 64);
        envelope.extend_from_slice(&[flags | SEALED, id.len() as u8]);
        envelope.extend_from_slice(id.as_bytes());
        let body = compressed.as_deref().unwrap_or(payload);
        let sealed = ring
            .seal(body, &context.associated_data(&envelope))
            .ok_or_else(|| Error::invalid("value", "too large to encrypt"))?;
        envelope.extend_from_slice(&sealed);
        Ok(Some(envelope))
    }

    /// [`pack`](Self::pack) when values are sealed; `None` (stored as it is)
    /// otherwise: for payloads that are only ever sealed, never compressed alone
    /// (embeddings, vector-search results).
    ///
    /// # Errors
    /// As [`pack`](Self::pack).
    pub(crate) fn seal(&self, payload: &[u8], context: Context<'_>) -> Result<Option<Vec<u8>>> {
        if self.ring.is_none() {
            return Ok(None);
        }
        self.pack(payload, context)
    }

    /// The payload of an envelope [`pack`](Self::pack) made for `context`; `None`,
    /// with a warning, when it cannot be vouched for (see the module docs).
    pub(crate) fn open(&self, envelope: &[u8], context: Context<'_>) -> Option<Vec<u8>> {
        match self.try_open(envelope, context) {
            Ok(payload) => Some(payload),
            Err(Unreadable { key_id, why }) => {
                tracing::warn!(
                    cache = context.cache.name(),
                    key_id = key_id.as_deref().unwrap_or("(none)"),
                    "pgcache: an entry could not be read and counts as a miss: {why}"
                );
                None
            }
        }
    }

    fn try_open(&self, envelope: &[u8], context: Context<'_>) -> Result<Vec<u8>, Unreadable> {
        let malformed = |key_id: Option<&str>| Unreadable {
            key_id: key_id.map(str::to_owned),
            why: "its stored envelope is malformed (written by a newer pgcache, or altered)"
                .to_owned(),
        };
        let Some((&flags, rest)) = envelope.split_first() else {
            return Err(malformed(None));
        };
        if flags & !(COMPRESSED | SEALED) != 0 {
            return Err(malformed(None));
        }
        let body = if flags & SEALED == 0 {
            Cow::Borrowed(rest)
        } else {
            let (&len, rest) = rest.split_first().ok_or_else(|| malformed(None))?;
            let len = usize::from(len);
            if rest.len() < len {
                return Err(malformed(None));
            }
            let (id, sealed) = rest.split_at(len);
            let id = std::str::from_utf8(id).map_err(|_| malformed(None))?;
            let unreadable = |why: String| Unreadable {
                key_id: Some(id.to_owned()),
                why,
            };
            let ring = self.ring.as_ref().ok_or_else(|| {
                unreadable(format!(
                    "it is sealed with encryption key `{id}` and no encryption keys are \
                     configured (PGCACHE_ENCRYPTION_KEYS)"
                ))
            })?;
            let aad = context.associated_data(&envelope[..2 + len]);
            Cow::Owned(ring.open(id, sealed, &aad).map_err(|error| {
                unreadable(match error {
                    Unsealed::UnknownKey => format!(
                        "it is sealed with encryption key `{id}`, which is not among the \
                         configured keys ({}): add it back to PGCACHE_ENCRYPTION_KEYS until \
                         such entries have expired",
                        ring.ids().join(", ")
                    ),
                    Unsealed::Forged => format!(
                        "encryption key `{id}` does not open it: the key configured under \
                         that id is not the one it was sealed with, or the stored value was \
                         altered or copied from another entry"
                    ),
                })
            })?)
        };
        if flags & COMPRESSED == 0 {
            return Ok(body.into_owned());
        }
        let key_id = (flags & SEALED != 0).then(|| {
            let len = usize::from(envelope[1]);
            String::from_utf8_lossy(&envelope[2..2 + len]).into_owned()
        });
        compress::decompress(&body).ok_or_else(|| malformed(key_id.as_deref()))
    }
}

/// Why an envelope did not open: the key id it names, if any, and what to do.
struct Unreadable {
    key_id: Option<String>,
    why: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [0x5A; 32];

    fn codec(threshold: Option<usize>, keys: &[(&str, [u8; 32])]) -> Codec {
        Codec::new(&CodecSettings {
            compress_above: threshold,
            keys: keys
                .iter()
                .map(|(id, k)| ((*id).to_owned(), k.to_vec()))
                .collect(),
            hash_kv_keys: None,
        })
        .unwrap()
    }

    fn context(key: &[u8]) -> Context<'_> {
        Context {
            cache: CacheKind::Kv,
            part: "json",
            key,
        }
    }

    fn prose(len: usize) -> Vec<u8> {
        let words = [
            "cache", "postgres", "entry", "value", "the", "of", "sealed", "row",
        ];
        let mut text = String::new();
        let mut i = 7usize;
        while text.len() < len {
            i = i.wrapping_mul(31).wrapping_add(17) % 1009;
            text.push_str(words[i % words.len()]);
            text.push(' ');
        }
        text.into_bytes()
    }

    #[test]
    fn small_payloads_stay_plain_and_large_ones_are_compressed() {
        let codec = codec(Some(1024), &[]);
        assert_eq!(codec.pack(&prose(1000), context(b"k")).unwrap(), None);
        let large = prose(10_000);
        let packed = codec.pack(&large, context(b"k")).unwrap().unwrap();
        assert_eq!(packed[0], COMPRESSED);
        assert!(packed.len() < large.len() / 2);
        assert_eq!(codec.open(&packed, context(b"k")).unwrap(), large);
        assert_eq!(
            self::codec(None, &[]).pack(&large, context(b"k")).unwrap(),
            None
        );
    }

    #[test]
    fn sealed_payloads_open_only_for_their_own_entry() {
        let codec = codec(Some(1024), &[("k1", KEY)]);
        for payload in [b"small".to_vec(), prose(5000)] {
            let packed = codec.pack(&payload, context(b"user:1")).unwrap().unwrap();
            assert_eq!(packed[0] & SEALED, SEALED);
            assert_eq!(codec.open(&packed, context(b"user:1")).unwrap(), payload);
            assert_eq!(codec.open(&packed, context(b"user:2")), None);
            let other_part = Context {
                part: "bytes",
                ..context(b"user:1")
            };
            assert_eq!(codec.open(&packed, other_part), None);
        }
    }

    #[test]
    fn flipping_a_flag_or_a_byte_is_never_read_as_a_value() {
        let codec = codec(Some(16), &[("k1", KEY)]);
        let packed = codec.pack(&prose(500), context(b"k")).unwrap().unwrap();
        for i in 0..packed.len() {
            let mut altered = packed.clone();
            altered[i] ^= 0x01;
            assert_eq!(codec.open(&altered, context(b"k")), None, "byte {i}");
        }
        assert_eq!(codec.open(&[], context(b"k")), None);
        assert_eq!(codec.open(&[0xFF, 1, 2], context(b"k")), None);
    }

    #[test]
    fn without_the_key_a_sealed_value_is_unreadable() {
        let sealed = codec(None, &[("k1", KEY)])
            .pack(b"v", context(b"k"))
            .unwrap()
            .unwrap();
        assert_eq!(codec(None, &[]).open(&sealed, context(b"k")), None);
        assert_eq!(
            codec(None, &[("k2", KEY)]).open(&sealed, context(b"k")),
            None
        );
        assert_eq!(
            codec(None, &[("k1", [1; 32])]).open(&sealed, context(b"k")),
            None
        );
    }

    #[test]
    fn key_hashing_needs_a_key_of_the_ring() {
        let settings = CodecSettings {
            hash_kv_keys: Some("k9".to_owned()),
            keys: vec![("k1".to_owned(), KEY.to_vec())],
            ..CodecSettings::default()
        };
        let (setting, value, _) = Codec::new(&settings).unwrap_err();
        assert_eq!((setting, value.as_str()), ("hash_kv_keys", "k9"));
    }

    #[test]
    fn debug_never_shows_key_material() {
        let settings = CodecSettings {
            keys: vec![("k1".to_owned(), KEY.to_vec())],
            hash_kv_keys: Some("k1".to_owned()),
            ..CodecSettings::default()
        };
        let codec = Codec::new(&settings).unwrap();
        for shown in [format!("{settings:?}"), format!("{codec:?}")] {
            assert!(shown.contains("k1"), "{shown}");
            assert!(!shown.contains("90"), "{shown}");
            assert!(!shown.to_lowercase().contains("5a"), "{shown}");
        }
    }
}
