//! Cache warmup: pre-populating every cache from one description (code or a JSON
//! file), all-or-nothing.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use diesel::data_types::PgInterval;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::{distinct_in_write_order, split_by_shard, Storage};
use crate::caches::kv::Row as KvRow;
use crate::caches::{AudioChunk, AudioChunkKey, EmbeddingKey, LlmPrompt, VectorSearchQuery};
use crate::caches::{
    AudioChunkCache, EmbeddingCache, KvCache, LlmResponseCache, VectorSearchCache,
};
use crate::caches::{AudioChunkTable, EmbeddingTable, LlmResponseTable, VectorSearchTable};
use crate::cluster::Cluster;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::expiry::ttl_interval;
use crate::table::Row as TypedRow;
use crate::watchdog;

/// Entries to pre-populate, per cache. Deserializes from JSON (`pgcache warmup
/// FILE.json`) with these snake_case field names; every section may be left out:
///
/// ```json
/// {
///   "ttl_secs": 86400,
///   "kv": [{"key": "config:v1", "value": {"theme": "dark"}}],
///   "embeddings": [{"text": "What is AI?", "model": "m1", "embedding": [0.1, 0.2]}],
///   "vector_searches": [{"user_id": "6f1c...", "embedding": [0.1, 0.2], "top_k": 5,
///                        "filters": {"lang": "en"}, "results": [{"id": 1}]}],
///   "llm_responses": [{"prompt": "Explain AI", "provider": "gemini-flash",
///                      "response": "AI is..."}],
///   "audio_chunks": [{"text": "Hello", "voice_model_id": "v1", "provider": "xtts-v2",
///                     "data": {"stored": {"path": "audio/hello.opus", "byte_size": 1200}},
///                     "format": "opus", "duration_ms": 500}]
/// }
/// ```
///
/// Optional key fields (`context`, `model`, `params`, `settings`, `filters`,
/// `owner_id`, audio metadata) take the same defaults as the key and value types.
///
/// Unknown fields are rejected at every level, with an error naming the item
/// (`llm_responses[3]: unknown field `contxt``, plus the line and column in the
/// JSON): a misspelt `owner_id` or `context` would otherwise silently store a
/// shared entry, or an answer served to requests without that context.
///
/// A key given twice in one section is stored once, with its last item, and
/// counted once in the [`WarmupReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    /// TTL of every warmed entry, in seconds. Default: each cache's default TTL.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// `statement_timeout` of the warmup's transaction, in milliseconds, for a warmup
    /// too large for the connections' own (`PGCACHE_STATEMENT_TIMEOUT_MS`). Default:
    /// theirs.
    #[serde(default)]
    pub statement_timeout_ms: Option<u64>,
    /// Key/value entries.
    #[serde(default, deserialize_with = "section")]
    pub kv: Vec<WarmupKv>,
    /// Embeddings.
    #[serde(default, deserialize_with = "section")]
    pub embeddings: Vec<WarmupEmbedding>,
    /// Vector-search results.
    #[serde(default, deserialize_with = "section")]
    pub vector_searches: Vec<WarmupVectorSearch>,
    /// LLM responses.
    #[serde(default, deserialize_with = "section")]
    pub llm_responses: Vec<WarmupLlmResponse>,
    /// Audio chunks (text over the default maximum length is skipped, as by `set`).
    #[serde(default, deserialize_with = "section")]
    pub audio_chunks: Vec<WarmupAudioChunk>,
}

/// A key/value entry to warm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupKv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Value,
}

/// An embedding to warm: the key's fields plus `embedding`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupEmbedding {
    /// Text, model and owner.
    #[serde(flatten)]
    pub key: EmbeddingKey,
    /// The vector.
    pub embedding: Vec<f32>,
}

/// Vector-search results to warm: the query's fields plus `results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupVectorSearch {
    /// The search.
    #[serde(flatten)]
    pub query: VectorSearchQuery,
    /// Its results.
    pub results: Value,
}

/// An LLM response to warm: the prompt's fields plus `response`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupLlmResponse {
    /// The prompt.
    #[serde(flatten)]
    pub prompt: LlmPrompt,
    /// The response text.
    pub response: String,
}

/// An audio chunk to warm: the key's fields plus the chunk's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupAudioChunk {
    /// Text, voice, provider, settings and owner.
    #[serde(flatten)]
    pub key: AudioChunkKey,
    /// The audio and its metadata.
    #[serde(flatten)]
    pub chunk: AudioChunk,
}

/// What [`CacheManager::warmup`](crate::CacheManager::warmup) stored: distinct keys per cache (a key given
/// twice is one entry, holding its last item).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct WarmupReport {
    /// Key/value entries stored.
    pub kv: u64,
    /// Embeddings stored.
    pub embeddings: u64,
    /// Vector-search results stored.
    pub vector_searches: u64,
    /// LLM responses stored.
    pub llm_responses: u64,
    /// Audio chunks stored.
    pub audio_chunks: u64,
    /// Audio chunks skipped because their text is over the maximum length.
    pub skipped_audio_chunks: u64,
}

/// Another shard's part added in: the sums.
impl std::ops::AddAssign for WarmupReport {
    fn add_assign(&mut self, other: WarmupReport) {
        add_counts!(self, other; kv, embeddings, vector_searches, llm_responses, audio_chunks, skipped_audio_chunks);
    }
}

impl std::iter::Sum for WarmupReport {
    fn sum<I: Iterator<Item = WarmupReport>>(reports: I) -> WarmupReport {
        reports.fold(WarmupReport::default(), |mut all, report| {
            all += report;
            all
        })
    }
}

impl WarmupReport {
    /// Entries stored over every cache.
    pub fn total(&self) -> u64 {
        self.kv + self.embeddings + self.vector_searches + self.llm_responses + self.audio_chunks
    }
}

/// Names the item an error is about: `llm_responses[3]: invalid prompt: ...`.
fn at(section: &str, index: usize, error: Error) -> Error {
    match error {
        Error::InvalidInput { what, reason } => Error::invalid(
            "warmup",
            format!("{section}[{index}]: invalid {what}: {reason}"),
        ),
        other => other,
    }
}

/// An item of a warmup section.
trait Item: DeserializeOwned {
    /// The section's name in [`Warmup`], for errors naming an item.
    const SECTION: &'static str;
}

impl Item for WarmupKv {
    const SECTION: &'static str = "kv";
}

impl Item for WarmupEmbedding {
    const SECTION: &'static str = "embeddings";
}

impl Item for WarmupVectorSearch {
    const SECTION: &'static str = "vector_searches";
}

impl Item for WarmupLlmResponse {
    const SECTION: &'static str = "llm_responses";
}

impl Item for WarmupAudioChunk {
    const SECTION: &'static str = "audio_chunks";
}

/// Deserializes a section item by item, so that an item's error (an unknown field,
/// a wrong type) names it: `llm_responses[3]: unknown field `contxt``. Each item is
/// read as a JSON value first: its own error then carries no position, and the
/// format adds the position of the item's end once, instead of twice.
fn section<'de, D: Deserializer<'de>, T: Item>(deserializer: D) -> Result<Vec<T>, D::Error> {
    struct Items<T>(PhantomData<T>);

    impl<'de, T: Item> Visitor<'de> for Items<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an array of {} items", T::SECTION)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(value) = seq.next_element::<Value>()? {
                let item = serde_json::from_value(value).map_err(|e| {
                    de::Error::custom(format_args!("{}[{}]: {e}", T::SECTION, items.len()))
                })?;
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_seq(Items(PhantomData))
}

/// Validates every item of a section into `cache`'s rows, naming the first bad one;
/// a key given twice keeps its last item.
fn rows<'a, C: Storage, T: Item>(
    cache: &C,
    items: &'a [T],
    entry: impl Fn(&'a T) -> (&'a C::Key, &'a C::Value),
) -> Result<Vec<C::Row<'a>>> {
    let rows = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let (key, value) = entry(item);
            cache
                .check_entry(key, value)
                .map_err(|e| at(T::SECTION, i, e))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(distinct_in_write_order::<C>(rows))
}

/// Writes a section's rows, if any; returns how many.
fn write<C: Storage>(
    cache: &C,
    conn: &mut PgConnection,
    rows: &[C::Row<'_>],
    ttl: PgInterval,
) -> Result<u64> {
    if !rows.is_empty() {
        cache.write(conn, rows, ttl)?;
    }
    Ok(rows.len() as u64)
}

/// One shard's part of a warmup, per section.
struct ShardPart<'w> {
    kv: Vec<KvRow<'w>>,
    embeddings: Vec<TypedRow<'w, EmbeddingTable>>,
    searches: Vec<TypedRow<'w, VectorSearchTable>>,
    responses: Vec<TypedRow<'w, LlmResponseTable>>,
    audio: Vec<TypedRow<'w, AudioChunkTable>>,
}

impl ShardPart<'_> {
    fn is_empty(&self) -> bool {
        self.kv.is_empty()
            && self.embeddings.is_empty()
            && self.searches.is_empty()
            && self.responses.is_empty()
            && self.audio.is_empty()
    }
}

/// [`CacheManager::warmup`](crate::CacheManager::warmup): validated whole, then
/// written on every shard at once, each shard's part in one transaction.
pub(crate) fn warmup(cluster: &Cluster, warmup: &Warmup) -> Result<WarmupReport> {
    let ttl = |default: Duration| {
        let ttl = warmup.ttl_secs.map_or(default, Duration::from_secs);
        let interval = ttl_interval(ttl).map_err(|e| match e {
            Error::InvalidInput { reason, .. } => {
                Error::invalid("warmup", format!("ttl_secs: {reason}"))
            }
            other => other,
        })?;
        Ok::<_, Error>(interval)
    };
    let (kv, embedding, vector_search, llm, audio) = (
        KvCache::new(cluster),
        EmbeddingCache::new(cluster),
        VectorSearchCache::new(cluster),
        LlmResponseCache::new(cluster),
        AudioChunkCache::new(cluster),
    );
    if warmup.statement_timeout_ms == Some(0) {
        // 0 would switch PostgreSQL's timeout off, not make it short.
        return Err(Error::invalid(
            "warmup",
            "statement_timeout_ms: must be at least 1 (milliseconds)",
        ));
    }
    let kv_ttl = ttl(kv.default_ttl())?;
    let embedding_ttl = ttl(embedding.default_ttl())?;
    let vector_ttl = ttl(vector_search.default_ttl())?;
    let llm_ttl = ttl(llm.default_ttl())?;
    let audio_ttl = ttl(audio.default_ttl())?;

    let kv_rows = rows(&kv, &warmup.kv, |e| (e.key.as_str(), &e.value))?;
    let embeddings = rows(&embedding, &warmup.embeddings, |e| (&e.key, &e.embedding))?;
    let searches = rows(&vector_search, &warmup.vector_searches, |e| {
        (&e.query, &e.results)
    })?;
    let responses = rows(&llm, &warmup.llm_responses, |e| (&e.prompt, &e.response))?;
    let audio_rows = rows(&audio, &warmup.audio_chunks, |e| (&e.key, &e.chunk))?;
    let distinct_audio = audio_rows.len();
    let audio_rows = audio.cacheable(audio_rows);

    if !cluster.front().is_enabled() {
        return Ok(WarmupReport::default());
    }
    let skipped_audio_chunks = (distinct_audio - audio_rows.len()) as u64;
    let own_timeout = warmup.statement_timeout_ms.map(Duration::from_millis);
    let timeout = own_timeout.unwrap_or(cluster.config().statement_timeout());
    let mut kv_parts = split_by_shard::<KvCache<'_>>(cluster, kv_rows).into_iter();
    let mut embedding_parts = split_by_shard::<EmbeddingCache<'_>>(cluster, embeddings).into_iter();
    let mut search_parts = split_by_shard::<VectorSearchCache<'_>>(cluster, searches).into_iter();
    let mut response_parts = split_by_shard::<LlmResponseCache<'_>>(cluster, responses).into_iter();
    let mut audio_parts = split_by_shard::<AudioChunkCache<'_>>(cluster, audio_rows).into_iter();
    let parts: Vec<(usize, ShardPart<'_>)> = (0..cluster.map().len())
        .map(|shard| {
            let part = ShardPart {
                kv: kv_parts.next().unwrap_or_default(),
                embeddings: embedding_parts.next().unwrap_or_default(),
                searches: search_parts.next().unwrap_or_default(),
                responses: response_parts.next().unwrap_or_default(),
                audio: audio_parts.next().unwrap_or_default(),
            };
            (shard, part)
        })
        // A shard with nothing to store is not asked (it may be down).
        .filter(|(_, part)| !part.is_empty())
        .collect();
    let store = |engine: &Engine, part: &ShardPart<'_>| {
        engine
            .maintain(|conn| {
                conn.transaction(|conn| {
                    if let Some(timeout) = own_timeout {
                        // Ends with the transaction: the pooled connection keeps its own.
                        diesel::sql_query(format!(
                            "SET LOCAL statement_timeout = {}",
                            timeout.as_millis()
                        ))
                        .execute(conn)?;
                    }
                    Ok::<_, Error>(WarmupReport {
                        kv: write(&kv, conn, &part.kv, kv_ttl)?,
                        embeddings: write(&embedding, conn, &part.embeddings, embedding_ttl)?,
                        vector_searches: write(&vector_search, conn, &part.searches, vector_ttl)?,
                        llm_responses: write(&llm, conn, &part.responses, llm_ttl)?,
                        audio_chunks: write(&audio, conn, &part.audio, audio_ttl)?,
                        skipped_audio_chunks: 0,
                    })
                })
            })
            .map_err(|e| timed_out(e, timeout))
    };
    let reports = cluster.fan_out(&parts, |engine, part| {
        match own_timeout {
            // The watchdog must not cut what the server is allowed to run.
            Some(timeout) => watchdog::extended(timeout, || store(engine, part)),
            None => store(engine, part),
        }
    })?;
    let mut all: WarmupReport = reports.into_iter().sum();
    all.skipped_audio_chunks += skipped_audio_chunks;
    Ok(all)
}

/// A statement cancelled by `statement_timeout` as [`Error::WarmupTimeout`], which
/// names the setting to raise; other errors as they are.
fn timed_out(error: Error, timeout: Duration) -> Error {
    match &error {
        Error::Database(diesel::result::Error::DatabaseError(_, info))
            // 57014 query_canceled; Diesel exposes no SQLSTATE.
            if info
                .message()
                .contains("canceling statement due to statement timeout") =>
        {
            Error::WarmupTimeout {
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }
        }
        _ => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error as Diesel};

    fn database_error(message: &str) -> Error {
        Error::Database(Diesel::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new(message.to_owned()),
        ))
    }

    #[test]
    fn a_statement_timeout_names_the_setting_to_raise() {
        let error = timed_out(
            database_error("canceling statement due to statement timeout"),
            Duration::from_millis(250),
        );
        assert!(matches!(error, Error::WarmupTimeout { timeout_ms: 250 }));
        let message = error.to_string();
        assert!(message.contains("statement_timeout_ms"), "{message}");
        assert!(message.contains("--statement-timeout-ms"), "{message}");
        assert!(message.contains("250 ms"), "{message}");
    }

    #[test]
    fn other_database_errors_are_kept() {
        let error = timed_out(
            database_error("canceling statement due to lock timeout"),
            Duration::from_millis(250),
        );
        assert!(matches!(error, Error::Database(_)), "{error}");
    }
}
