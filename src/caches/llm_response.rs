//! The LLM response cache (`llm_response_cache`): prompt, context, provider (and
//! model and parameters when given) -> the response text, with hit counting.
//!
//! # Key rule
//! An entry is found by the SHA-256 digest of: the key-format version, the domain tag
//! `llm_response`, the prompt, the optional context, the provider, the optional
//! model, the optional parameters as canonical JSON (object keys sorted at every
//! depth) and the optional owner. Every field is length-prefixed or tagged absent, so
//! no context differs from an empty context and `("ab", "c")` never meets
//! `("a", "bc")`.
//!
//! # Hit counting
//! A hit is one `SELECT`; the hit is counted in memory and written, with the last
//! access time, in a batched `UPDATE` per flush (every `stats_flush_interval`, and
//! before [`LlmResponseCache::top`]). The counter columns carry no index, so those
//! updates stay HOT.
//!
//! # Compression and encryption
//! A response over the compression threshold, or any response when encryption keys
//! are configured, is stored as the codec's envelope in `packed` instead of
//! `response`, sealed to its key's digest; one written plain reads as before.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::common::{check_name, delete_owned};
use crate::error::Result;
use crate::key::{KeyDigest, KeyHasher};
use crate::kind::CacheKind;
use crate::popularity::{flushed_reports, merge_top, top_entries, TopEntry};
use crate::schema::llm_response_cache;
use crate::table::{
    column, Packing, Row, TableEntry, TypedCache, TypedTable, UpsertColumns, Written,
};
use crate::validation::{check_json, check_text};

/// The LLM response cache; get it with [`CacheManager::llm_response`](crate::CacheManager::llm_response).
///
/// Default TTL: the medium preset (`CACHE_TTL_MEDIUM`, 1 hour).
///
/// ```no_run
/// use pgcache::{Cache, CacheManager, LlmPrompt};
///
/// let cache = CacheManager::from_env()?;
/// let prompt = LlmPrompt::new("Explain quantum computing", "gemini-flash")
///     .with_context("User is a beginner");
/// let answer = cache.llm_response().get_or_compute(&prompt, || {
///     Ok::<_, pgcache::Error>("Quantum computers use qubits...".to_owned())
/// })?;
/// for top in cache.llm_response().top(10)? {
///     println!("{}... ({} hits, {})", top.hash_prefix(), top.hits, top.provider);
/// }
/// # Ok::<(), pgcache::Error>(())
/// ```
pub type LlmResponseCache<'a> = TypedCache<'a, LlmResponseTable>;

/// The LLM response cache's table: the parameter of [`LlmResponseCache`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LlmResponseTable;

impl LlmResponseCache<'_> {
    /// The `n` most-hit live responses (hit at least once), most hits first.
    /// Flushes this manager's pending hits first so they are included (other
    /// processes' pending hits are not). A maintenance query: it scans the live rows
    /// (hit counts are not indexed, on purpose).
    ///
    /// # Errors
    /// A connection or database error.
    pub fn top(&self, n: usize) -> Result<Vec<TopEntry>> {
        let lists = flushed_reports(
            self.cluster(),
            LlmResponseTable::CACHE,
            Vec::new(),
            |conn, table| top_entries(conn, LlmResponseTable::CACHE, table, n),
        )?;
        Ok(merge_top(lists, n))
    }
}

/// An LLM request: what identifies a cached response.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmPrompt {
    /// The prompt.
    pub prompt: String,
    /// Extra context given with the prompt. Default: none.
    #[serde(default)]
    pub context: Option<String>,
    /// The provider, e.g. `gemini-flash`.
    pub provider: String,
    /// The model, when the provider serves several. Default: none.
    #[serde(default)]
    pub model: Option<String>,
    /// Generation parameters (temperature, max tokens, ...) as JSON; key order does
    /// not matter. Default: none.
    #[serde(default)]
    pub params: Option<Value>,
    /// The user the entry belongs to; part of the key, so an owned entry is only
    /// found with the same owner, and removed by
    /// [`CacheManager::invalidate_user`](crate::CacheManager::invalidate_user). Default: none (shared).
    #[serde(default, rename = "owner_id", skip_serializing_if = "Option::is_none")]
    pub owner: Option<Uuid>,
}

impl LlmPrompt {
    /// A prompt for `provider`, without context, model, parameters or owner.
    pub fn new(prompt: impl Into<String>, provider: impl Into<String>) -> Self {
        LlmPrompt {
            prompt: prompt.into(),
            context: None,
            provider: provider.into(),
            model: None,
            params: None,
            owner: None,
        }
    }

    /// The same prompt with `context`.
    #[must_use]
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// The same prompt for `model`.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The same prompt with generation parameters.
    #[must_use]
    pub fn with_params(mut self, params: Value) -> Self {
        self.params = Some(params);
        self
    }

    owned_by_builder!("prompt");

    /// The digest that identifies this prompt's entry (see the module docs).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a NUL character in any
    /// text or parameter, or an empty provider or model.
    pub fn digest(&self) -> Result<KeyDigest> {
        check_text("prompt", &self.prompt)?;
        if let Some(context) = &self.context {
            check_text("context", context)?;
        }
        check_name("provider", &self.provider)?;
        if let Some(model) = &self.model {
            check_name("model", model)?;
        }
        if let Some(params) = &self.params {
            check_json("params", params)?;
        }
        Ok(KeyHasher::new("llm_response")
            .text(&self.prompt)
            .opt_text(self.context.as_deref())
            .text(&self.provider)
            .opt_text(self.model.as_deref())
            .opt_json(self.params.as_ref())
            .opt_uuid(self.owner)
            .finish())
    }
}

/// A cached response with its metadata.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CachedLlmResponse {
    /// The response text.
    pub response: String,
    /// The provider that produced it.
    pub provider: String,
    /// The model, when the prompt named one.
    pub model: Option<String>,
    /// Hits counted in the database (hits not yet flushed are not included).
    pub hit_count: u64,
    /// Last hit or write, as of the last flush.
    pub last_accessed_at: DateTime<Utc>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// When it expires (database time).
    pub expires_at: DateTime<Utc>,
}

impl TableEntry for CachedLlmResponse {
    type Value = String;

    fn into_value(self) -> String {
        self.response
    }

    fn weight(&self) -> usize {
        self.response.len()
    }
}

/// A live row as read back.
#[derive(Debug, QueryableByName)]
#[diesel(table_name = llm_response_cache, check_for_backend(diesel::pg::Pg))]
pub struct Stored {
    response: Option<String>,
    packed: Option<Vec<u8>>,
    provider: String,
    model: Option<String>,
    hit_count: i64,
    last_accessed_at: DateTime<Utc>,
}

impl TypedTable for LlmResponseTable {
    const CACHE: CacheKind = CacheKind::LlmResponse;
    const PAYLOAD: &'static str = "response";
    type Key = LlmPrompt;
    type Value = String;
    type Entry = CachedLlmResponse;
    /// The response's envelope, when the codec packs it.
    type Encoded = Option<Vec<u8>>;
    type Stored = Stored;

    fn encode(
        _prompt: &LlmPrompt,
        response: &String,
        packing: Packing<'_>,
    ) -> Result<Option<Vec<u8>>> {
        check_text("response", response)?;
        packing.pack(response.as_bytes())
    }

    fn row_bytes(row: &Row<'_, Self>) -> usize {
        row.encoded.as_ref().map_or(row.value.len(), Vec::len)
    }

    fn columns<'r>(rows: &'r [Row<'_, Self>]) -> impl UpsertColumns + 'r {
        (
            column(llm_response_cache::provider, rows, |r| {
                r.key.provider.as_str()
            }),
            column(llm_response_cache::model, rows, |r| r.key.model.as_deref()),
            column(llm_response_cache::response, rows, |r| {
                r.encoded.is_none().then_some(r.value.as_str())
            }),
            column(llm_response_cache::packed, rows, |r| r.encoded.as_deref()),
            column(llm_response_cache::owner_id, rows, |r| r.key.owner),
        )
    }

    fn decode(row: Stored, written: &Written, packing: Packing<'_>) -> Option<CachedLlmResponse> {
        // The table's CHECK keeps exactly one of response and packed.
        let response = match (row.response, row.packed) {
            (Some(response), _) => response,
            (None, packed) => String::from_utf8(packing.open(&packed?)?).ok()?,
        };
        Some(CachedLlmResponse {
            response,
            provider: row.provider,
            model: row.model,
            hit_count: row.hit_count.unsigned_abs(),
            last_accessed_at: row.last_accessed_at,
            created_at: written.created_at,
            expires_at: written.expires_at,
        })
    }

    fn digest(prompt: &LlmPrompt) -> Result<KeyDigest> {
        prompt.digest()
    }
}

/// Deletes every response owned by `user` from `table` (schema-qualified); returns
/// the rows removed.
pub(crate) fn delete_owner(conn: &mut PgConnection, table: &str, user: Uuid) -> QueryResult<usize> {
    delete_owned(conn, table, llm_response_cache::owner_id::NAME, user)
}
