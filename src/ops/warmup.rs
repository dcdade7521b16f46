//! Cache warmup: pre-populating every cache from one description (code or a JSON
//! file), all-or-nothing.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use diesel::prelude::*;
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::Cache;
use crate::caches::{
    audio_chunk, embedding, llm_response, vector_search, AudioChunk, AudioChunkKey, EmbeddingKey,
    LlmPrompt, VectorSearchQuery,
};
use crate::error::{Error, Result};
use crate::input::{check_json, check_key, ttl_interval};
use crate::manager::CacheManager;

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

/// What [`CacheManager::warmup`] stored: distinct keys per cache (a key given
/// twice is one entry, holding its last item).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// Validates every item of a section into rows, naming the first bad one.
fn rows<'a, T: Item, R>(items: &'a [T], row: impl Fn(&'a T) -> Result<R>) -> Result<Vec<R>> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| row(item).map_err(|e| at(T::SECTION, i, e)))
        .collect()
}

impl CacheManager {
    /// Stores every entry of `warmup` (the spec's cache warming): everything is
    /// validated first, then written with one batched statement per table in one
    /// transaction. A bad item rejects the whole warmup with an error naming it
    /// (`llm_responses[3]: invalid prompt: ...`) and nothing is stored. Like
    /// invalidation, this never fails open. With caching disabled the entries are
    /// validated and nothing is stored.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the first bad item (or `ttl_secs`); a
    /// connection or database error, after which nothing is stored.
    pub fn warmup(&self, warmup: &Warmup) -> Result<WarmupReport> {
        let ttl = |default: Duration| {
            let ttl = warmup.ttl_secs.map_or(default, Duration::from_secs);
            let interval = ttl_interval(ttl).map_err(|e| match e {
                Error::InvalidInput { reason, .. } => {
                    Error::invalid("warmup", format!("ttl_secs: {reason}"))
                }
                other => other,
            })?;
            Ok::<_, Error>((ttl, interval))
        };
        let (kv_ttl, _) = ttl(self.kv().default_ttl())?;
        let (_, embedding_ttl) = ttl(self.embedding().default_ttl())?;
        let (_, vector_ttl) = ttl(self.vector_search().default_ttl())?;
        let (_, llm_ttl) = ttl(self.llm_response().default_ttl())?;
        let (_, audio_ttl) = ttl(self.audio_chunk().default_ttl())?;

        let kv: Vec<(&str, &Value)> = rows(&warmup.kv, |e| {
            check_key(&e.key)?;
            check_json("value", &e.value)?;
            Ok((e.key.as_str(), &e.value))
        })?;
        let embeddings = rows(&warmup.embeddings, |e| embedding::row(&e.key, &e.embedding))?;
        let searches = rows(&warmup.vector_searches, |e| {
            vector_search::row(&e.query, &e.results)
        })?;
        let responses = rows(&warmup.llm_responses, |e| {
            llm_response::row(&e.prompt, &e.response)
        })?;
        let audio = rows(&warmup.audio_chunks, |e| audio_chunk::row(&e.key, &e.chunk))?;
        let audio = self.audio_chunk().cacheable(audio);

        if !self.is_enabled() {
            return Ok(WarmupReport::default());
        }
        let mut report = WarmupReport {
            // The other sections count the rows their upserts wrote; a key given
            // twice is one row there, so count distinct keys here too.
            kv: kv.iter().map(|(key, _)| key).collect::<HashSet<_>>().len() as u64,
            skipped_audio_chunks: (warmup.audio_chunks.len() - audio.len()) as u64,
            ..WarmupReport::default()
        };
        let mut conn = self.connection()?;
        conn.transaction(|conn| {
            if !kv.is_empty() {
                self.kv().set_many_in(conn, &kv, kv_ttl)?;
            }
            report.embeddings = embedding::write(conn, embeddings, embedding_ttl)? as u64;
            report.vector_searches = vector_search::write(conn, searches, vector_ttl)? as u64;
            report.llm_responses = llm_response::write(conn, responses, llm_ttl)? as u64;
            report.audio_chunks = audio_chunk::write(conn, audio, audio_ttl)? as u64;
            Ok::<_, Error>(())
        })?;
        Ok(report)
    }
}
