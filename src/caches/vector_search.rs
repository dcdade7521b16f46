//! The vector-search cache (`vector_search_cache`): a user's query embedding, `top_k`
//! and filters -> the search results, as JSONB.
//!
//! # Key rule
//! An entry is found by the SHA-256 digest of: the key-format version, the domain tag
//! `vector_search`, the query embedding (its dimension, then each component's
//! IEEE-754 bits, `-0.0` taken as `0.0`), `top_k`, the filters as canonical JSON
//! (object keys sorted at every depth, so `{"a":1,"b":2}` and `{"b":2,"a":1}` meet)
//! and the user id. NaN and infinite components are rejected, never stored. Reads
//! filter on the user id as well as the digest, so one user can never read another's
//! results even through a digest collision.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::common::delete_owned;
use crate::error::{Error, Result};
use crate::jsonb::JsonbOut;
use crate::key::{canonical_json, KeyDigest, KeyHasher};
use crate::kind::CacheKind;
use crate::schema::vector_search_cache;
use crate::table::{
    column, Packing, Row, TableEntry, TypedCache, TypedTable, UpsertColumns, Written,
};
use crate::validation::{check_embedding, check_json};

/// The vector-search results cache; get it with [`CacheManager::vector_search`](crate::CacheManager::vector_search).
///
/// Default TTL: the short preset (`CACHE_TTL_SHORT`, 5 minutes).
///
/// ```no_run
/// use pgcache::{Cache, CacheManager, VectorSearchQuery};
///
/// let cache = CacheManager::from_env()?;
/// let user = uuid::Uuid::new_v4();
/// let query = VectorSearchQuery::new(user, vec![0.1, 0.2, 0.3], 5)
///     .with_filters(serde_json::json!({"lang": "en"}));
/// let results = cache.vector_search().get_or_compute(&query, || {
///     Ok::<_, pgcache::Error>(serde_json::json!([{"id": 7, "score": 0.93}]))
/// })?;
/// # Ok::<(), pgcache::Error>(())
/// ```
pub type VectorSearchCache<'a> = TypedCache<'a, VectorSearchTable>;

/// The vector-search cache's table: the parameter of [`VectorSearchCache`].
#[derive(Debug, Clone, Copy, Default)]
pub struct VectorSearchTable;

impl VectorSearchCache<'_> {}

/// A vector search of one user: what identifies its cached results. `PartialEq` but
/// not `Eq`/`Hash`: the embedding is floats (the cache itself keys it by digest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorSearchQuery {
    /// The query embedding.
    pub embedding: Vec<f32>,
    /// How many results the search asks for (at least 1).
    pub top_k: u32,
    /// Search filters, any JSON; key order does not matter. Default: `{}`.
    #[serde(default = "no_filters")]
    pub filters: Value,
    /// The user searching; results are cached per user.
    pub user_id: Uuid,
}

fn no_filters() -> Value {
    Value::Object(serde_json::Map::new())
}

impl VectorSearchQuery {
    /// A query without filters.
    pub fn new(user_id: Uuid, embedding: Vec<f32>, top_k: u32) -> Self {
        VectorSearchQuery {
            embedding,
            top_k,
            filters: no_filters(),
            user_id,
        }
    }

    /// The same query with `filters`.
    #[must_use]
    pub fn with_filters(mut self, filters: Value) -> Self {
        self.filters = filters;
        self
    }

    /// The digest that identifies this query's entry (see the module docs).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for an empty, over-long or non-finite embedding, a
    /// zero or over-large `top_k`, or a NUL character in the filters.
    pub fn digest(&self) -> Result<KeyDigest> {
        check_embedding(&self.embedding)?;
        top_k(self)?;
        check_json("filters", &self.filters)?;
        Ok(KeyHasher::new("vector_search")
            .embedding(&self.embedding)
            .int(i64::from(self.top_k))
            .json(&self.filters)
            .opt_uuid(Some(self.user_id))
            .finish())
    }
}

fn top_k(query: &VectorSearchQuery) -> Result<i32> {
    match i32::try_from(query.top_k) {
        Ok(k) if k > 0 => Ok(k),
        _ => Err(Error::invalid(
            "top_k",
            format!("must be 1 to {}, got {}", i32::MAX, query.top_k),
        )),
    }
}

/// Cached search results with their metadata.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CachedVectorSearch {
    /// The results, as stored.
    pub results: Value,
    /// The user they belong to.
    pub user_id: Uuid,
    /// The `top_k` of the search.
    pub top_k: u32,
    /// The filters of the search, in canonical form.
    pub filters: Value,
    /// When they were written.
    pub created_at: DateTime<Utc>,
    /// When they expire (database time).
    pub expires_at: DateTime<Utc>,
}

impl TableEntry for CachedVectorSearch {
    type Value = Value;

    fn into_value(self) -> Value {
        self.results
    }

    fn weight(&self) -> usize {
        self.results.to_string().len()
    }
}

/// A search's columns as bound: `top_k`, the canonical filters and the results,
/// or, when values are sealed, the envelope of both (`[filters, results]`).
#[derive(Debug, Clone)]
pub struct Encoded {
    top_k: i32,
    filters: JsonbOut,
    results: JsonbOut,
    packed: Option<Vec<u8>>,
}

/// A live row as read back.
#[derive(Debug, QueryableByName)]
#[diesel(table_name = vector_search_cache, check_for_backend(diesel::pg::Pg))]
pub struct Stored {
    user_id: Uuid,
    top_k: i32,
    filters: Option<Value>,
    results: Option<Value>,
    packed: Option<Vec<u8>>,
}

impl TypedTable for VectorSearchTable {
    const CACHE: CacheKind = CacheKind::VectorSearch;
    const PAYLOAD: &'static str = "results";
    type Key = VectorSearchQuery;
    type Value = Value;
    type Entry = CachedVectorSearch;
    type Encoded = Encoded;
    type Stored = Stored;

    /// Sealed when values are: filters and results may both hold what the user
    /// searched for.
    fn encode(query: &VectorSearchQuery, results: &Value, packing: Packing<'_>) -> Result<Encoded> {
        let filters = JsonbOut::new("filters", &canonical_json(&query.filters))?;
        let results = JsonbOut::new("results", results)?;
        let packed = if packing.seals() {
            let both: [&[u8]; 5] = [b"[", filters.text(), b",", results.text(), b"]"];
            packing.seal(&both.concat())?
        } else {
            None
        };
        Ok(Encoded {
            top_k: top_k(query)?,
            packed,
            filters,
            results,
        })
    }

    fn row_bytes(row: &Row<'_, Self>) -> usize {
        match &row.encoded.packed {
            Some(packed) => packed.len(),
            None => row.encoded.filters.byte_len() + row.encoded.results.byte_len(),
        }
    }

    fn columns<'r>(rows: &'r [Row<'_, Self>]) -> impl UpsertColumns + 'r {
        (
            column(vector_search_cache::user_id, rows, |r| r.key.user_id),
            column(vector_search_cache::top_k, rows, |r| r.encoded.top_k),
            column(vector_search_cache::filters, rows, |r| {
                r.encoded.packed.is_none().then_some(&r.encoded.filters)
            }),
            column(vector_search_cache::results, rows, |r| {
                r.encoded.packed.is_none().then_some(&r.encoded.results)
            }),
            column(vector_search_cache::packed, rows, |r| {
                r.encoded.packed.as_deref()
            }),
        )
    }

    fn decode(row: Stored, written: &Written, packing: Packing<'_>) -> Option<CachedVectorSearch> {
        // The table's CHECK keeps filters and results, or packed.
        let (filters, results) = match (row.filters, row.results, row.packed) {
            (Some(filters), Some(results), _) => (filters, results),
            (_, _, packed) => {
                let both = packing.open(&packed?)?;
                serde_json::from_slice(&both).ok()?
            }
        };
        Some(CachedVectorSearch {
            results,
            user_id: row.user_id,
            // The column's CHECK keeps it positive.
            top_k: row.top_k.unsigned_abs(),
            filters,
            created_at: written.created_at,
            expires_at: written.expires_at,
        })
    }

    /// A row only answers a query of its own user (the digest covers the user too).
    fn answers(query: &VectorSearchQuery, entry: &CachedVectorSearch) -> bool {
        entry.user_id == query.user_id
    }

    fn digest(query: &VectorSearchQuery) -> Result<KeyDigest> {
        query.digest()
    }
}

/// Deletes every cached search of `user` from `table` (schema-qualified); returns
/// the rows removed.
pub(crate) fn delete_owner(conn: &mut PgConnection, table: &str, user: Uuid) -> QueryResult<usize> {
    delete_owned(conn, table, vector_search_cache::user_id::NAME, user)
}
