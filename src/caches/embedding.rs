//! The embedding cache (`embedding_cache`): query text + embedding model -> vector.
//!
//! # Key rule
//! An entry is found by the SHA-256 digest of: the crate's key-format version, the
//! domain tag `embedding`, the query text, the model name (both length-prefixed, so
//! `("ab", "c")` and `("a", "bc")` differ) and the optional owner (absent differs from
//! any user). The text is hashed byte for byte: `"What is AI?"` and `"what is ai?"`
//! are different keys; normalise before calling if you want them to meet.
//!
//! Vectors are stored as little-endian `f32` bytes with their dimension (4 bytes per
//! component), not as JSON text.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::common::{check_name, delete_owned};
use crate::cache::{Cache, Storage};
use crate::error::{Error, Result};
use crate::key::{KeyDigest, KeyHasher};
use crate::kind::CacheKind;
use crate::schema::embedding_cache;
use crate::table::{
    column, Packing, Row, TableEntry, TypedCache, TypedTable, UpsertColumns, Written,
};
use crate::validation::{check_embedding, check_text};

/// The embedding cache; get it with [`CacheManager::embedding`](crate::CacheManager::embedding).
///
/// Default TTL: the medium preset (`CACHE_TTL_MEDIUM`, 1 hour).
///
/// ```no_run
/// use pgcache::{Cache, CacheManager, EmbeddingKey};
///
/// let cache = CacheManager::from_env()?;
/// let key = EmbeddingKey::new("What is AI?", "text-embedding-3-small");
/// let vector = cache.embedding().get_or_compute(&key, || {
///     Ok::<_, pgcache::Error>(vec![0.1, 0.2, 0.3]) // call the embedding API here
/// })?;
/// # Ok::<(), pgcache::Error>(())
/// ```
pub type EmbeddingCache<'a> = TypedCache<'a, EmbeddingTable>;

/// The embedding cache's table: the parameter of [`EmbeddingCache`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbeddingTable;

impl EmbeddingCache<'_> {
    /// Embeddings of many `texts` under one `model` (shared, unowned entries): one
    /// read for all of them, `compute` called once with only the missing texts (each
    /// once, in first-seen order), and one write for what it returns. The result is
    /// in `texts` order.
    ///
    /// # Errors
    /// `compute`'s error (nothing cached); [`Error::InvalidInput`](crate::Error::InvalidInput) when it returns a
    /// different number of vectors than texts it was given, or a bad vector; a cache
    /// error converted into `E`.
    pub fn get_or_compute_many<E, F>(
        &self,
        texts: &[&str],
        model: &str,
        compute: F,
    ) -> Result<Vec<Vec<f32>>, E>
    where
        F: FnOnce(&[&str]) -> Result<Vec<Vec<f32>>, E>,
        E: From<Error>,
    {
        let keys: Vec<EmbeddingKey> = texts.iter().map(|t| EmbeddingKey::new(*t, model)).collect();
        let found = self.get_many(&keys.iter().collect::<Vec<_>>())?;
        // Each missing text once, at its first position.
        let mut seen = HashSet::new();
        let missing: Vec<usize> = (0..texts.len())
            .filter(|&i| found[i].is_none() && seen.insert(texts[i]))
            .collect();
        let mut computed: HashMap<&str, Vec<f32>> = HashMap::new();
        if !missing.is_empty() {
            let missing_texts: Vec<&str> = missing.iter().map(|&i| texts[i]).collect();
            let vectors = compute(&missing_texts)?;
            if vectors.len() != missing.len() {
                return Err(Error::invalid(
                    "embedding",
                    format!(
                        "compute returned {} vectors for {} texts",
                        vectors.len(),
                        missing.len()
                    ),
                )
                .into());
            }
            let entries: Vec<(&EmbeddingKey, &Vec<f32>)> =
                missing.iter().map(|&i| &keys[i]).zip(&vectors).collect();
            self.set_many(&entries, self.default_ttl())?;
            computed = missing_texts.into_iter().zip(vectors).collect();
        }
        Ok(texts
            .iter()
            .zip(found)
            .map(|(text, entry)| match entry {
                Some(entry) => entry.embedding,
                None => computed[text].clone(),
            })
            .collect())
    }
}

/// What identifies a cached embedding: the query text and the model that embeds it,
/// optionally owned by a user (see [`owned_by`](Self::owned_by)).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingKey {
    /// The query text, exactly as embedded.
    pub text: String,
    /// The embedding model, e.g. `text-embedding-3-small`.
    pub model: String,
    /// The user the entry belongs to; part of the key, so an owned entry is only
    /// found with the same owner, and removed by
    /// [`CacheManager::invalidate_user`](crate::CacheManager::invalidate_user). Default: none (shared).
    #[serde(default, rename = "owner_id", skip_serializing_if = "Option::is_none")]
    pub owner: Option<Uuid>,
}

impl EmbeddingKey {
    /// A shared (unowned) key.
    pub fn new(text: impl Into<String>, model: impl Into<String>) -> Self {
        EmbeddingKey {
            text: text.into(),
            model: model.into(),
            owner: None,
        }
    }

    owned_by_builder!("key");

    /// The digest that identifies this key's entry (see the module docs).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a NUL character in the text or an empty model.
    pub fn digest(&self) -> Result<KeyDigest> {
        check_text("text", &self.text)?;
        check_name("model", &self.model)?;
        Ok(KeyHasher::new("embedding")
            .text(&self.text)
            .text(&self.model)
            .opt_uuid(self.owner)
            .finish())
    }
}

/// A cached embedding with its metadata.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CachedEmbedding {
    /// The vector.
    pub embedding: Vec<f32>,
    /// The model that produced it.
    pub model: String,
    /// Its number of components.
    pub dimensions: usize,
    /// The user it belongs to, if any.
    pub owner: Option<Uuid>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// When it expires (database time).
    pub expires_at: DateTime<Utc>,
}

impl TableEntry for CachedEmbedding {
    type Value = Vec<f32>;

    fn into_value(self) -> Vec<f32> {
        self.embedding
    }

    fn weight(&self) -> usize {
        self.embedding.len() * 4
    }
}

/// A vector as stored: little-endian `f32` bytes and their count, or, when values
/// are sealed, their envelope.
#[derive(Debug, Clone)]
pub struct Encoded {
    bytes: Vec<u8>,
    dimensions: i32,
    packed: Option<Vec<u8>>,
}

/// A live row as read back.
#[derive(Debug, QueryableByName)]
#[diesel(table_name = embedding_cache, check_for_backend(diesel::pg::Pg))]
pub struct Stored {
    model: String,
    embedding: Option<Vec<u8>>,
    packed: Option<Vec<u8>>,
    owner_id: Option<Uuid>,
}

impl TypedTable for EmbeddingTable {
    const CACHE: CacheKind = CacheKind::Embedding;
    const PAYLOAD: &'static str = "embedding";
    type Key = EmbeddingKey;
    type Value = Vec<f32>;
    type Entry = CachedEmbedding;
    type Encoded = Encoded;
    type Stored = Stored;

    /// Validates the vector and encodes it as little-endian `f32` bytes (sealed
    /// when values are: a vector gives away much of the text it embeds).
    fn encode(_key: &EmbeddingKey, embedding: &Vec<f32>, packing: Packing<'_>) -> Result<Encoded> {
        check_embedding(embedding)?;
        let bytes: Vec<u8> = embedding.iter().flat_map(|c| c.to_le_bytes()).collect();
        Ok(Encoded {
            packed: packing.seal(&bytes)?,
            bytes,
            // check_embedding caps the length far below i32::MAX.
            dimensions: embedding.len() as i32,
        })
    }

    fn row_bytes(row: &Row<'_, Self>) -> usize {
        row.encoded
            .packed
            .as_ref()
            .unwrap_or(&row.encoded.bytes)
            .len()
    }

    fn columns<'r>(rows: &'r [Row<'_, Self>]) -> impl UpsertColumns + 'r {
        (
            column(embedding_cache::model, rows, |r| r.key.model.as_str()),
            column(embedding_cache::dimensions, rows, |r| r.encoded.dimensions),
            column(embedding_cache::embedding, rows, |r| {
                r.encoded
                    .packed
                    .is_none()
                    .then_some(r.encoded.bytes.as_slice())
            }),
            column(embedding_cache::packed, rows, |r| {
                r.encoded.packed.as_deref()
            }),
            column(embedding_cache::owner_id, rows, |r| r.key.owner),
        )
    }

    fn decode(row: Stored, written: &Written, packing: Packing<'_>) -> Option<CachedEmbedding> {
        // The table's CHECK keeps exactly one of embedding and packed.
        let bytes = match (row.embedding, row.packed) {
            (Some(bytes), _) => bytes,
            (None, packed) => packing.open(&packed?)?,
        };
        let embedding: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Some(CachedEmbedding {
            dimensions: embedding.len(),
            embedding,
            model: row.model,
            owner: row.owner_id,
            created_at: written.created_at,
            expires_at: written.expires_at,
        })
    }

    fn digest(key: &EmbeddingKey) -> Result<KeyDigest> {
        key.digest()
    }
}

/// Deletes every embedding of `model` from `table` (schema-qualified); returns the
/// rows removed.
pub(crate) fn delete_model(
    conn: &mut PgConnection,
    table: &str,
    model: &str,
) -> QueryResult<usize> {
    diesel::sql_query(crate::relaxed::marked(format!(
        "DELETE FROM {table} WHERE {} = $1",
        embedding_cache::model::NAME
    )))
    .bind::<diesel::sql_types::Text, _>(model)
    .execute(conn)
}

/// Deletes every embedding owned by `user` from `table` (schema-qualified);
/// returns the rows removed.
pub(crate) fn delete_owner(conn: &mut PgConnection, table: &str, user: Uuid) -> QueryResult<usize> {
    delete_owned(conn, table, embedding_cache::owner_id::NAME, user)
}
