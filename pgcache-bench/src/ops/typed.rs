//! The typed caches' rows of `pgcache-bench ops`: LLM responses (with hit tracking),
//! 1536-dimension embeddings, 32 kB audio chunks and vector-search results.
//!
//! The library side passes ready-made keys and computes their digests inside each
//! call (that is what a get or set costs); the raw side uses digests computed
//! beforehand, the physical limit of a lookup by `key_hash`.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use pgcache::{
    AudioChunk, AudioChunkKey, Cache, CacheManager, EmbeddingKey, KeyDigest, LlmPrompt,
    VectorSearchQuery,
};
use postgres::{Client, Statement};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{BenchResult, Interval, Operation, Worker, TTL};

/// Components of each embedding (the size of `text-embedding-3-small`).
const DIMENSIONS: usize = 1536;
/// Bytes of each inline audio chunk.
const AUDIO_BYTES: usize = 32 * 1024;
/// Rows of each typed table at most: their values are kilobytes, and filling them
/// is most of the bench's set-up (500 audio chunks are already 16 MB per side,
/// written twice before measuring); a lookup by `key_hash` is one index probe
/// either way.
pub(super) const MAX_ROWS: u64 = 500;
/// Rows per `set_many` while pre-filling (keeps each statement to tens of MB).
const FILL_BATCH: usize = 500;
const MODEL: &str = "text-embedding-3-small";
const PROVIDER: &str = "gemini-flash";

/// Pre-built keys with their digests, and the values written by the set rows.
struct Fixtures {
    rows: u64,
    prompts: Vec<LlmPrompt>,
    prompt_digests: Vec<KeyDigest>,
    embedding_keys: Vec<EmbeddingKey>,
    embedding_digests: Vec<KeyDigest>,
    audio_keys: Vec<AudioChunkKey>,
    audio_digests: Vec<KeyDigest>,
    searches: Vec<VectorSearchQuery>,
    search_digests: Vec<KeyDigest>,
    response: String,
    embedding: Vec<f32>,
    embedding_bytes: Vec<u8>,
    audio: AudioChunk,
    audio_bytes: Vec<u8>,
    results: Value,
}

static FIXTURES: OnceLock<Fixtures> = OnceLock::new();

fn fixtures() -> &'static Fixtures {
    FIXTURES
        .get()
        .expect("typed fixtures are built before measuring")
}

fn keyed<K>(
    rows: u64,
    make: impl Fn(u64) -> K,
    digest: impl Fn(&K) -> pgcache::Result<KeyDigest>,
) -> BenchResult<(Vec<K>, Vec<KeyDigest>)> {
    let keys: Vec<K> = (0..rows).map(make).collect();
    let digests = keys.iter().map(digest).collect::<pgcache::Result<_>>()?;
    Ok((keys, digests))
}

impl Fixtures {
    fn new(rows: u64) -> BenchResult<Self> {
        let embedding: Vec<f32> = (0..DIMENSIONS).map(|i| (i as f32 * 0.37).sin()).collect();
        // Incompressible, like real encoded audio: TOAST cannot shrink it.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let audio_bytes: Vec<u8> = (0..AUDIO_BYTES)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let (prompts, prompt_digests) = keyed(
            rows,
            |n| LlmPrompt::new(format!("Explain quantum computing, part {n}"), PROVIDER),
            LlmPrompt::digest,
        )?;
        let (embedding_keys, embedding_digests) = keyed(
            rows,
            |n| EmbeddingKey::new(format!("What is AI? ({n})"), MODEL),
            EmbeddingKey::digest,
        )?;
        let (audio_keys, audio_digests) = keyed(
            rows,
            |n| {
                AudioChunkKey::new(
                    format!("Hello, this is sentence {n}."),
                    "voice-123",
                    "xtts-v2",
                )
            },
            AudioChunkKey::digest,
        )?;
        let (searches, search_digests) = keyed(
            rows,
            |n| {
                VectorSearchQuery::new(Uuid::from_u128(u128::from(n) + 1), embedding.clone(), 10)
                    .with_filters(json!({"lang": "en"}))
            },
            VectorSearchQuery::digest,
        )?;
        Ok(Fixtures {
            rows,
            prompts,
            prompt_digests,
            embedding_keys,
            embedding_digests,
            audio_keys,
            audio_digests,
            searches,
            search_digests,
            response: "Quantum computers use qubits, which can be 0 and 1 at once. ".repeat(8),
            embedding_bytes: embedding.iter().flat_map(|c| c.to_le_bytes()).collect(),
            embedding,
            audio: AudioChunk::inline(audio_bytes.clone(), "opus").duration_ms(2000),
            audio_bytes,
            results: json!((0..10)
                .map(|i| json!({"id": i, "score": 0.9 - f64::from(i) * 0.01}))
                .collect::<Vec<_>>()),
        })
    }
}

impl Worker {
    /// A pre-filled row of the typed tables, at random.
    fn typed_row(&mut self) -> usize {
        (self.random() % fixtures().rows) as usize
    }
}

/// The typed tables, each with its raw twin (`raw_<table>`).
const TABLES: [&str; 4] = [
    "llm_response_cache",
    "embedding_cache",
    "audio_chunk_cache",
    "vector_search_cache",
];

/// Builds the keys, fills the library's typed tables through the library (so the
/// rows are exactly what it writes) and copies them into identically shaped raw
/// tables.
pub(super) fn prepare_tables(
    cache: &CacheManager,
    client: &mut Client,
    rows: u64,
    create_like: impl Fn(&mut Client, &str, &str) -> BenchResult<()>,
) -> BenchResult<()> {
    if FIXTURES.get().is_none() {
        let _ = FIXTURES.set(Fixtures::new(rows.min(MAX_ROWS))?);
    }
    let f = fixtures();
    let ttl = Duration::from_secs(86_400);
    for n in (0..f.prompts.len()).step_by(FILL_BATCH) {
        let end = (n + FILL_BATCH).min(f.prompts.len());
        let llm: Vec<(&LlmPrompt, &String)> =
            f.prompts[n..end].iter().map(|k| (k, &f.response)).collect();
        cache.llm_response().set_many(&llm, ttl)?;
        let emb: Vec<(&EmbeddingKey, &Vec<f32>)> = f.embedding_keys[n..end]
            .iter()
            .map(|k| (k, &f.embedding))
            .collect();
        cache.embedding().set_many(&emb, ttl)?;
        let audio: Vec<(&AudioChunkKey, &AudioChunk)> =
            f.audio_keys[n..end].iter().map(|k| (k, &f.audio)).collect();
        cache.audio_chunk().set_many(&audio, ttl)?;
        let search: Vec<(&VectorSearchQuery, &Value)> =
            f.searches[n..end].iter().map(|k| (k, &f.results)).collect();
        cache.vector_search().set_many(&search, ttl)?;
    }
    for table in TABLES {
        let raw = format!("raw_{table}");
        create_like(client, table, &raw)?;
        client.batch_execute(&format!("INSERT INTO {raw} SELECT * FROM {table}"))?;
    }
    Ok(())
}

/// Every table `prepare_tables` filled, for `VACUUM ANALYZE`.
pub(super) fn tables() -> impl Iterator<Item = String> {
    TABLES
        .into_iter()
        .flat_map(|t| [t.to_owned(), format!("raw_{t}")])
}

/// The raw side's typed statements, prepared once per connection.
pub(super) struct RawTyped {
    llm_get: Statement,
    llm_set: Statement,
    embedding_get: Statement,
    embedding_set: Statement,
    audio_get: Statement,
    audio_set: Statement,
    search_get: Statement,
    search_set: Statement,
}

/// `ON CONFLICT` clause overwriting `columns` from the new row, plus `extra`.
fn overwrite(columns: &str, extra: &str) -> String {
    let sets: Vec<String> = columns
        .split(", ")
        .skip(1)
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        " ON CONFLICT (key_hash) DO UPDATE SET {}{extra}",
        sets.join(", ")
    )
}

/// An upsert of `columns` (the first is `key_hash`, the last `expires_at` from a
/// TTL interval) into `raw_<table>`.
fn upsert(client: &mut Client, table: &str, columns: &str, extra: &str) -> BenchResult<Statement> {
    let n = columns.split(", ").count();
    let params: Vec<String> = (1..n).map(|i| format!("${i}")).collect();
    Ok(client.prepare(&format!(
        "INSERT INTO raw_{table} ({columns}) VALUES ({}, now() + ${n}){}",
        params.join(", "),
        overwrite(columns, extra)
    ))?)
}

impl RawTyped {
    pub(super) fn prepare(client: &mut Client) -> BenchResult<Self> {
        const RESET_HITS: &str = ", hit_count = 0, last_accessed_at = now(), created_at = now()";
        const RECREATED: &str = ", created_at = now()";
        Ok(RawTyped {
            llm_get: client.prepare(
                "SELECT response, provider, model, hit_count, last_accessed_at, created_at, \
                 expires_at FROM raw_llm_response_cache WHERE key_hash = $1 AND expires_at > now()",
            )?,
            llm_set: upsert(
                client,
                "llm_response_cache",
                "key_hash, provider, model, response, owner_id, expires_at",
                RESET_HITS,
            )?,
            embedding_get: client.prepare(
                "SELECT model, embedding, owner_id, created_at, expires_at FROM raw_embedding_cache \
                 WHERE key_hash = $1 AND expires_at > now()",
            )?,
            embedding_set: upsert(
                client,
                "embedding_cache",
                "key_hash, model, dimensions, embedding, owner_id, expires_at",
                RECREATED,
            )?,
            audio_get: client.prepare(
                "SELECT audio_data, storage_path, format, duration_ms, sample_rate, channels, \
                 compression, byte_size, hit_count, last_accessed_at, created_at, expires_at \
                 FROM raw_audio_chunk_cache WHERE key_hash = $1 AND expires_at > now()",
            )?,
            audio_set: upsert(
                client,
                "audio_chunk_cache",
                "key_hash, voice_model_id, provider, audio_data, storage_path, format, \
                 duration_ms, sample_rate, channels, compression, byte_size, owner_id, expires_at",
                RESET_HITS,
            )?,
            search_get: client.prepare(
                "SELECT user_id, top_k, filters, results, created_at, expires_at \
                 FROM raw_vector_search_cache WHERE key_hash = $1 AND user_id = $2 \
                 AND expires_at > now()",
            )?,
            search_set: upsert(
                client,
                "vector_search_cache",
                "key_hash, user_id, top_k, filters, results, expires_at",
                RECREATED,
            )?,
        })
    }
}

/// The digest as a `BYTEA` parameter.
fn hash(digest: &KeyDigest) -> &[u8] {
    digest.as_bytes()
}

/// What the application gets from a raw embedding read: the decoded vector.
type RawEmbedding = (String, Vec<f32>, Option<Uuid>, SystemTime, SystemTime);

pub(super) fn operations() -> Vec<Operation> {
    vec![
        Operation {
            name: "llm get hit (hit tracking)",
            lib: |cache, w| {
                let f = fixtures();
                let key = &f.prompts[w.typed_row()];
                Ok(cache.llm_response().get(key)?.is_some())
            },
            raw: |raw, w| {
                let f = fixtures();
                let digest = &f.prompt_digests[w.typed_row()];
                let row = raw.client.query_opt(&raw.typed.llm_get, &[&hash(digest)])?;
                let found = row.map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, Option<String>>(2),
                        r.get::<_, i64>(3),
                        r.get::<_, SystemTime>(4),
                        r.get::<_, SystemTime>(5),
                        r.get::<_, SystemTime>(6),
                    )
                });
                Ok(found.is_some())
            },
        },
        Operation {
            name: "llm set",
            lib: |cache, w| {
                let f = fixtures();
                let key = &f.prompts[w.typed_row()];
                cache.llm_response().set_with_ttl(key, &f.response, TTL)?;
                Ok(true)
            },
            raw: |raw, w| {
                let f = fixtures();
                let digest = &f.prompt_digests[w.typed_row()];
                raw.client.execute(
                    &raw.typed.llm_set,
                    &[
                        &hash(digest),
                        &PROVIDER,
                        &None::<&str>,
                        &f.response,
                        &None::<Uuid>,
                        &Interval(TTL),
                    ],
                )?;
                Ok(true)
            },
        },
        Operation {
            name: "embedding get hit (1536-d)",
            lib: |cache, w| {
                let f = fixtures();
                let key = &f.embedding_keys[w.typed_row()];
                Ok(cache.embedding().get(key)?.is_some())
            },
            raw: |raw, w| {
                let f = fixtures();
                let digest = &f.embedding_digests[w.typed_row()];
                let row = raw
                    .client
                    .query_opt(&raw.typed.embedding_get, &[&hash(digest)])?;
                let found: Option<RawEmbedding> = row.map(|r| {
                    let bytes: &[u8] = r.get(1);
                    let vector = bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    (r.get(0), vector, r.get(2), r.get(3), r.get(4))
                });
                Ok(found.is_some())
            },
        },
        Operation {
            name: "embedding set (1536-d)",
            lib: |cache, w| {
                let f = fixtures();
                let key = &f.embedding_keys[w.typed_row()];
                cache.embedding().set_with_ttl(key, &f.embedding, TTL)?;
                Ok(true)
            },
            raw: |raw, w| {
                let f = fixtures();
                let digest = &f.embedding_digests[w.typed_row()];
                raw.client.execute(
                    &raw.typed.embedding_set,
                    &[
                        &hash(digest),
                        &MODEL,
                        &(DIMENSIONS as i32),
                        &f.embedding_bytes,
                        &None::<Uuid>,
                        &Interval(TTL),
                    ],
                )?;
                Ok(true)
            },
        },
        Operation {
            name: "audio get hit (32 kB)",
            lib: |cache, w| {
                let f = fixtures();
                let key = &f.audio_keys[w.typed_row()];
                Ok(cache.audio_chunk().get(key)?.is_some())
            },
            raw: |raw, w| {
                let f = fixtures();
                let digest = &f.audio_digests[w.typed_row()];
                let row = raw
                    .client
                    .query_opt(&raw.typed.audio_get, &[&hash(digest)])?;
                let found = row.map(|r| {
                    (
                        (
                            r.get::<_, Option<Vec<u8>>>(0),
                            r.get::<_, Option<String>>(1),
                            r.get::<_, String>(2),
                            r.get::<_, i32>(3),
                            r.get::<_, i32>(4),
                            r.get::<_, i16>(5),
                        ),
                        (
                            r.get::<_, Option<String>>(6),
                            r.get::<_, i64>(7),
                            r.get::<_, i64>(8),
                            r.get::<_, SystemTime>(9),
                            r.get::<_, SystemTime>(10),
                            r.get::<_, SystemTime>(11),
                        ),
                    )
                });
                Ok(found.is_some())
            },
        },
        Operation {
            name: "audio set (32 kB)",
            lib: |cache, w| {
                let f = fixtures();
                let key = &f.audio_keys[w.typed_row()];
                cache.audio_chunk().set_with_ttl(key, &f.audio, TTL)?;
                Ok(true)
            },
            raw: |raw, w| {
                let f = fixtures();
                let digest = &f.audio_digests[w.typed_row()];
                raw.client.execute(
                    &raw.typed.audio_set,
                    &[
                        &hash(digest),
                        &"voice-123",
                        &"xtts-v2",
                        &f.audio_bytes,
                        &None::<&str>,
                        &"opus",
                        &2000i32,
                        &16_000i32,
                        &1i16,
                        &None::<&str>,
                        &(AUDIO_BYTES as i64),
                        &None::<Uuid>,
                        &Interval(TTL),
                    ],
                )?;
                Ok(true)
            },
        },
        Operation {
            name: "vector search get hit",
            lib: |cache, w| {
                let f = fixtures();
                let query = &f.searches[w.typed_row()];
                Ok(cache.vector_search().get(query)?.is_some())
            },
            raw: |raw, w| {
                let f = fixtures();
                let i = w.typed_row();
                let user = f.searches[i].user_id;
                let row = raw
                    .client
                    .query_opt(&raw.typed.search_get, &[&hash(&f.search_digests[i]), &user])?;
                let found = row.map(|r| {
                    (
                        r.get::<_, Uuid>(0),
                        r.get::<_, i32>(1),
                        r.get::<_, Value>(2),
                        r.get::<_, Value>(3),
                        r.get::<_, SystemTime>(4),
                        r.get::<_, SystemTime>(5),
                    )
                });
                Ok(found.is_some())
            },
        },
        Operation {
            name: "vector search set",
            lib: |cache, w| {
                let f = fixtures();
                let query = &f.searches[w.typed_row()];
                cache.vector_search().set_with_ttl(query, &f.results, TTL)?;
                Ok(true)
            },
            raw: |raw, w| {
                let f = fixtures();
                let i = w.typed_row();
                let query = &f.searches[i];
                raw.client.execute(
                    &raw.typed.search_set,
                    &[
                        &hash(&f.search_digests[i]),
                        &query.user_id,
                        &10i32,
                        &postgres::types::Json(&query.filters),
                        &postgres::types::Json(&f.results),
                        &Interval(TTL),
                    ],
                )?;
                Ok(true)
            },
        },
    ]
}
