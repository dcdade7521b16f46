//! Cache keys of the AI caches: a SHA-256 digest over an unambiguous encoding.
//!
//! The rule, identical for every typed cache:
//! - The digest starts with `pgcache`, the key-format version ([`KEY_FORMAT_VERSION`])
//!   and the cache's domain tag, so two caches never share a digest and a future
//!   format change cannot read old rows as new ones.
//! - Every field follows as a one-byte type tag and, for variable-length data, its
//!   length as 8 little-endian bytes: `("ab", "c")` and `("a", "bc")` differ.
//! - Optional fields are tagged present or absent, so `None` differs from `Some("")`.
//! - JSON (filters, settings, parameters) is canonical: object keys sorted
//!   recursively, whatever order the caller built them in.
//! - Embeddings are hashed from their IEEE-754 bit patterns with the dimension first,
//!   `-0.0` taken as `0.0`; NaN and infinities are rejected before hashing.

use std::fmt;

use sha2::{Digest, Sha256};

/// Version of the key encoding; part of every digest.
pub const KEY_FORMAT_VERSION: u8 = 1;

/// The SHA-256 digest that identifies an entry of a typed cache.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest(pub(crate) [u8; 32]);

impl KeyDigest {
    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(KeyDigest)
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({})", self.to_hex())
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Builds a [`KeyDigest`] field by field; see the module docs for the encoding.
#[derive(Debug, Clone)]
pub(crate) struct KeyHasher(Sha256);

impl KeyHasher {
    /// Starts a digest for the cache whose domain tag is `domain`.
    pub(crate) fn new(domain: &str) -> Self {
        let mut sha = Sha256::new();
        sha.update(b"pgcache");
        sha.update([KEY_FORMAT_VERSION]);
        let mut hasher = KeyHasher(sha);
        hasher.bytes_field(b'd', domain.as_bytes());
        hasher
    }

    fn bytes_field(&mut self, tag: u8, bytes: &[u8]) {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// A text field.
    pub(crate) fn text(mut self, text: &str) -> Self {
        self.bytes_field(b's', text.as_bytes());
        self
    }

    /// An optional text field; absent and empty differ.
    pub(crate) fn opt_text(mut self, text: Option<&str>) -> Self {
        match text {
            Some(text) => self.text(text),
            None => {
                self.0.update([b'n']);
                self
            }
        }
    }

    /// An integer field.
    pub(crate) fn int(mut self, value: i64) -> Self {
        self.0.update([b'i']);
        self.0.update(value.to_le_bytes());
        self
    }

    /// A JSON field, canonicalised (object keys sorted recursively).
    pub(crate) fn json(mut self, value: &serde_json::Value) -> Self {
        let mut canonical = Vec::new();
        write_canonical_json(value, &mut canonical);
        self.bytes_field(b'j', &canonical);
        self
    }

    /// An optional JSON field, canonicalised; absent differs from `null`.
    pub(crate) fn opt_json(mut self, value: Option<&serde_json::Value>) -> Self {
        match value {
            Some(value) => self.json(value),
            None => {
                self.0.update([b'n']);
                self
            }
        }
    }

    /// An embedding field: dimension, then each component's bits (`-0.0` as `0.0`).
    /// Callers reject non-finite components first.
    pub(crate) fn embedding(mut self, embedding: &[f32]) -> Self {
        self.0.update([b'e']);
        self.0.update((embedding.len() as u64).to_le_bytes());
        // One update for the whole vector, not one per component (cheaper).
        let bytes: Vec<u8> = embedding
            .iter()
            .map(|&c| if c == 0.0 { 0.0f32 } else { c })
            .flat_map(|c| c.to_bits().to_le_bytes())
            .collect();
        self.0.update(bytes);
        self
    }

    /// An optional user id field.
    pub(crate) fn opt_uuid(mut self, id: Option<uuid::Uuid>) -> Self {
        match id {
            Some(id) => self.bytes_field(b'u', id.as_bytes()),
            None => self.0.update([b'n']),
        }
        self
    }

    pub(crate) fn finish(self) -> KeyDigest {
        KeyDigest(self.0.finalize().into())
    }
}

/// Serialises JSON with object keys sorted at every depth, without relying on how
/// serde_json's map happens to be ordered in this build.
pub(crate) fn write_canonical_json(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Serialising a string to a Vec cannot fail.
                serde_json::to_writer(&mut *out, k).expect("string serialises");
                out.push(b':');
                write_canonical_json(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_json(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalar serialises"),
    }
}

/// Rebuilds `value` with object keys in sorted order at every depth, for storing
/// canonical JSON (e.g. vector-search filters) alongside the digest.
pub(crate) fn canonical_json(value: &serde_json::Value) -> serde_json::Value {
    let mut bytes = Vec::new();
    write_canonical_json(value, &mut bytes);
    serde_json::from_slice(&bytes).expect("canonical JSON re-parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefix_separates_fields() {
        let a = KeyHasher::new("t").text("ab").text("c").finish();
        let b = KeyHasher::new("t").text("a").text("bc").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn domains_separate_caches() {
        assert_ne!(
            KeyHasher::new("a").text("x").finish(),
            KeyHasher::new("b").text("x").finish()
        );
    }

    #[test]
    fn absent_differs_from_empty() {
        assert_ne!(
            KeyHasher::new("t").opt_text(None).finish(),
            KeyHasher::new("t").opt_text(Some("")).finish()
        );
    }

    #[test]
    fn absent_json_differs_from_null() {
        assert_ne!(
            KeyHasher::new("t").opt_json(None).finish(),
            KeyHasher::new("t")
                .opt_json(Some(&serde_json::Value::Null))
                .finish()
        );
    }

    #[test]
    fn json_key_order_does_not_matter() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":[1,{"d":0,"c":1}]}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":[1,{"c":1,"d":0}],"y":2},"b":1}"#).unwrap();
        assert_eq!(
            KeyHasher::new("t").json(&a).finish(),
            KeyHasher::new("t").json(&b).finish()
        );
    }

    #[test]
    fn negative_zero_hashes_as_zero() {
        assert_eq!(
            KeyHasher::new("t").embedding(&[-0.0, 1.0]).finish(),
            KeyHasher::new("t").embedding(&[0.0, 1.0]).finish()
        );
    }
}
