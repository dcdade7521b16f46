//! The audio chunk cache (`audio_chunk_cache`): text + voice model + provider +
//! settings -> synthesized audio, inline bytes or a storage path, with hit counting,
//! statistics and LRU eviction to a byte budget.
//!
//! # Key rule
//! An entry is found by the SHA-256 digest of: the key-format version, the domain tag
//! `audio_chunk`, the text, the voice model id, the provider (each length-prefixed),
//! the settings as canonical JSON (object keys sorted at every depth, so
//! `{"speed":1,"pitch":0}` and `{"pitch":0,"speed":1}` meet) and the optional owner.
//!
//! # Limits
//! - Text longer than the handle's maximum ([`DEFAULT_MAX_AUDIO_TEXT_CHARS`] unless
//!   changed with [`AudioChunkCache::with_max_text_chars`]) is not cached: `set`
//!   skips it and `get` misses without a query, so long one-off answers do not push
//!   out the short phrases that repeat.
//! - Inline audio is at most [`MAX_AUDIO_BYTES`]; larger audio is an error (store it
//!   elsewhere and cache its path with [`AudioChunk::stored`]).
//!
//! Hits are counted as for LLM responses: one `SELECT` per get, hits and last access
//! written in deferred batches.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::common::check_name;
use crate::config::SizeBounds;
use crate::error::{Error, Result};
use crate::eviction::{evict, EvictionReport, Limits};
use crate::key::{KeyDigest, KeyHasher};
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::popularity::{flushed_reports, hit_stats, HitStats};
use crate::schema::audio_chunk_cache;
use crate::table::{
    column, Packing, Row, TableEntry, TypedCache, TypedTable, UpsertColumns, Written,
};
use crate::validation::{check_json, check_text};

/// The audio chunk cache; get it with [`CacheManager::audio_chunk`](crate::CacheManager::audio_chunk).
///
/// Default TTL: the short preset (`CACHE_TTL_SHORT`, 5 minutes). Default maximum
/// text: [`DEFAULT_MAX_AUDIO_TEXT_CHARS`] characters.
///
/// ```no_run
/// use pgcache::{AudioChunk, AudioChunkKey, Cache, CacheManager};
///
/// let cache = CacheManager::from_env()?;
/// let key = AudioChunkKey::new("Hello world", "voice-123", "xtts-v2");
/// let audio = cache.audio_chunk().get_or_compute(&key, || {
///     let bytes = vec![0u8; 320]; // synthesize here
///     Ok::<_, pgcache::Error>(AudioChunk::inline(bytes, "opus").duration_ms(1000).compression("opus"))
/// })?;
/// let report = cache.audio_chunk().evict_to_budget(512 * 1024 * 1024, 0.8)?;
/// for path in report.released_paths { /* delete the file */ }
/// # Ok::<(), pgcache::Error>(())
/// ```
pub type AudioChunkCache<'a> = TypedCache<'a, AudioChunkTable>;

/// The audio chunk cache's table, with the longest text a handle caches: the
/// parameter of [`AudioChunkCache`].
#[derive(Debug, Clone, Copy)]
pub struct AudioChunkTable {
    max_text_chars: Option<usize>,
}

impl Default for AudioChunkTable {
    fn default() -> Self {
        AudioChunkTable {
            max_text_chars: Some(DEFAULT_MAX_AUDIO_TEXT_CHARS),
        }
    }
}

impl AudioChunkTable {
    fn caches_text(&self, key: &AudioChunkKey) -> bool {
        self.max_text_chars
            .is_none_or(|max| key.text.chars().nth(max).is_none())
    }
}

impl AudioChunkCache<'_> {
    /// A handle that does not cache text longer than `max` characters (`None`: no
    /// limit). Default: [`DEFAULT_MAX_AUDIO_TEXT_CHARS`].
    #[must_use]
    pub fn with_max_text_chars(mut self, max: Option<usize>) -> Self {
        self.table.max_text_chars = max;
        self
    }

    /// Whether `key`'s text is short enough to be cached by this handle.
    pub fn caches_text(&self, key: &AudioChunkKey) -> bool {
        self.table.caches_text(key)
    }

    /// Live entries, their bytes, average hits and the `top` most-hit live entries
    /// (hit at least once). Flushes this manager's pending hits first. A
    /// maintenance query: it aggregates over the live rows.
    ///
    /// # Errors
    /// A connection or database error.
    pub fn stats(&self, top: usize) -> Result<HitStats> {
        let parts = flushed_reports(
            self.cluster(),
            AudioChunkTable::CACHE,
            HitStats::empty(),
            |conn, table| hit_stats(conn, AudioChunkTable::CACHE, table, top),
        )?;
        Ok(HitStats::merge(parts, top))
    }

    /// When the audio entries total more than `max_bytes`, evicts entries (expired
    /// ones first, then the least recently used) until at most
    /// `max_bytes * low_watermark_fraction` remain, e.g. `(budget, 0.8)` evicts to
    /// 80 % once over 100 %. With shards, each shard is held to its equal share of
    /// the budget. Flushes this manager's pending hits first so recent
    /// reads count as recent. Returns what was removed, including the storage paths
    /// the caller may now delete.
    ///
    /// The same eviction [`CacheManager::cleanup`](crate::CacheManager::cleanup) runs for a configured
    /// [`SizeBounds`] (`PGCACHE_AUDIO_CHUNK_MAX_BYTES`), here on demand: a
    /// maintenance operation that ranks every row of the table, then deletes in
    /// short batches.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a fraction outside 0..=1 or a budget over
    /// `i64::MAX`; a connection or database error.
    pub fn evict_to_budget(
        &self,
        max_bytes: u64,
        low_watermark_fraction: f64,
    ) -> Result<EvictionReport> {
        let bounds = SizeBounds {
            max_entries: None,
            max_bytes: Some(max_bytes),
        }
        .share(self.cluster().map().len() as u64);
        let limits = Limits::new(bounds, low_watermark_fraction)
            .map_err(|(what, reason)| Error::invalid(what, reason))?;
        let reports = self.cluster().all(|engine| {
            engine.flush()?;
            engine.write(
                CacheKind::AudioChunk,
                Op::Evict,
                EvictionReport::default(),
                || None,
                |conn| {
                    let table = engine.tables().of(CacheKind::AudioChunk);
                    Ok(evict(
                        conn,
                        CacheKind::AudioChunk,
                        table,
                        &limits,
                        &mut |_| {},
                    )?)
                },
            )
        })?;
        let report = EvictionReport::merge(reports);
        crate::metrics::evictions(CacheKind::AudioChunk, report.rows_removed);
        Ok(report)
    }
}

/// Longest text (in characters) the audio cache stores unless told otherwise: about
/// three spoken sentences.
pub const DEFAULT_MAX_AUDIO_TEXT_CHARS: usize = 500;

/// Largest inline audio accepted, in bytes (16 MiB).
pub const MAX_AUDIO_BYTES: usize = 16 * 1024 * 1024;

/// What identifies a cached audio chunk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioChunkKey {
    /// The text spoken.
    pub text: String,
    /// The voice model, e.g. `voice-123`.
    pub voice_model_id: String,
    /// The TTS provider, e.g. `xtts-v2`.
    pub provider: String,
    /// Synthesis settings (speed, pitch, ...) as JSON; key order does not matter.
    /// Default: `{}`.
    #[serde(default = "no_settings")]
    pub settings: Value,
    /// The user the entry belongs to; part of the key, so an owned entry is only
    /// found with the same owner, and removed by
    /// [`CacheManager::invalidate_user`](crate::CacheManager::invalidate_user). Default: none (shared).
    #[serde(default, rename = "owner_id", skip_serializing_if = "Option::is_none")]
    pub owner: Option<Uuid>,
}

fn no_settings() -> Value {
    Value::Object(serde_json::Map::new())
}

impl AudioChunkKey {
    /// A key with empty settings and no owner.
    pub fn new(
        text: impl Into<String>,
        voice_model_id: impl Into<String>,
        provider: impl Into<String>,
    ) -> Self {
        AudioChunkKey {
            text: text.into(),
            voice_model_id: voice_model_id.into(),
            provider: provider.into(),
            settings: no_settings(),
            owner: None,
        }
    }

    /// The same key with synthesis `settings`.
    #[must_use]
    pub fn with_settings(mut self, settings: Value) -> Self {
        self.settings = settings;
        self
    }

    owned_by_builder!("key");

    /// The digest that identifies this key's entry (see the module docs).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a NUL character in the text or settings, or an
    /// empty voice model or provider.
    pub fn digest(&self) -> Result<KeyDigest> {
        check_text("text", &self.text)?;
        check_name("voice_model_id", &self.voice_model_id)?;
        check_name("provider", &self.provider)?;
        check_json("settings", &self.settings)?;
        Ok(KeyHasher::new("audio_chunk")
            .text(&self.text)
            .text(&self.voice_model_id)
            .text(&self.provider)
            .json(&self.settings)
            .opt_uuid(self.owner)
            .finish())
    }
}

/// Where the audio of a chunk is.
///
/// In JSON (a warmup file), inline bytes are a base64 string (standard alphabet,
/// padded): `{"inline": "UklGRg=="}`; an array of byte values is still accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AudioData {
    /// The bytes, stored in the database (at most [`MAX_AUDIO_BYTES`]).
    Inline(#[serde(with = "base64_bytes")] Vec<u8>),
    /// A path (file, object-store key) where the caller keeps the audio.
    Stored {
        /// The path.
        path: String,
        /// Size of the audio there, in bytes (counts towards eviction budgets).
        byte_size: u64,
    },
}

/// A synthesized audio chunk: the value of the audio cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioChunk {
    /// The audio, inline or by path.
    pub data: AudioData,
    /// Container or codec, e.g. `opus`, `wav`.
    pub format: String,
    /// Duration in milliseconds. Default: 0 (unknown).
    #[serde(default)]
    pub duration_ms: u32,
    /// Sample rate in Hz. Default: 16 000.
    #[serde(default = "default_sample_rate")]
    pub sample_rate: u32,
    /// Channels. Default: 1.
    #[serde(default = "default_channels")]
    pub channels: u16,
    /// Compression applied, if any. Default: none.
    #[serde(default)]
    pub compression: Option<String>,
}

fn default_sample_rate() -> u32 {
    16_000
}

fn default_channels() -> u16 {
    1
}

impl AudioChunk {
    /// Inline audio bytes in `format`, 16 kHz mono, duration unknown, uncompressed.
    pub fn inline(bytes: Vec<u8>, format: impl Into<String>) -> Self {
        Self::with_data(AudioData::Inline(bytes), format.into())
    }

    /// Audio kept at `path` (`byte_size` bytes) in `format`, 16 kHz mono, duration
    /// unknown, uncompressed.
    pub fn stored(path: impl Into<String>, byte_size: u64, format: impl Into<String>) -> Self {
        Self::with_data(
            AudioData::Stored {
                path: path.into(),
                byte_size,
            },
            format.into(),
        )
    }

    fn with_data(data: AudioData, format: String) -> Self {
        AudioChunk {
            data,
            format,
            duration_ms: 0,
            sample_rate: default_sample_rate(),
            channels: default_channels(),
            compression: None,
        }
    }

    /// The same chunk with its duration.
    #[must_use]
    pub fn duration_ms(mut self, duration_ms: u32) -> Self {
        self.duration_ms = duration_ms;
        self
    }

    /// The same chunk with its sample rate.
    #[must_use]
    pub fn sample_rate(mut self, hz: u32) -> Self {
        self.sample_rate = hz;
        self
    }

    /// The same chunk with its channel count.
    #[must_use]
    pub fn channels(mut self, channels: u16) -> Self {
        self.channels = channels;
        self
    }

    /// The same chunk with its compression.
    #[must_use]
    pub fn compression(mut self, compression: impl Into<String>) -> Self {
        self.compression = Some(compression.into());
        self
    }

    /// Size of the audio in bytes, inline or at its path.
    pub fn byte_size(&self) -> u64 {
        match &self.data {
            AudioData::Inline(bytes) => bytes.len() as u64,
            AudioData::Stored { byte_size, .. } => *byte_size,
        }
    }
}

/// A cached audio chunk with its metadata.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CachedAudioChunk {
    /// The chunk.
    pub chunk: AudioChunk,
    /// Hits counted in the database (hits not yet flushed are not included).
    pub hit_count: u64,
    /// Last hit or write, as of the last flush.
    pub last_accessed_at: DateTime<Utc>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// When it expires (database time).
    pub expires_at: DateTime<Utc>,
}

impl TableEntry for CachedAudioChunk {
    type Value = AudioChunk;

    fn into_value(self) -> AudioChunk {
        self.chunk
    }

    fn weight(&self) -> usize {
        match &self.chunk.data {
            AudioData::Inline(bytes) => bytes.len(),
            AudioData::Stored { path, .. } => path.len(),
        }
    }
}

/// A chunk's numbers in their column types, and its inline audio sealed when
/// values are.
#[derive(Debug, Clone)]
pub struct Encoded {
    duration_ms: i32,
    sample_rate: i32,
    channels: i16,
    byte_size: i64,
    packed: Option<Vec<u8>>,
}

/// The audio bytes stored in the row, if inline and not sealed.
fn inline<'r>(row: &'r Row<'_, AudioChunkTable>) -> Option<&'r [u8]> {
    match &row.value.data {
        AudioData::Inline(bytes) if row.encoded.packed.is_none() => Some(bytes),
        _ => None,
    }
}

/// A live row as read back.
#[derive(Debug, QueryableByName)]
#[diesel(table_name = audio_chunk_cache, check_for_backend(diesel::pg::Pg))]
pub struct Stored {
    audio_data: Option<Vec<u8>>,
    storage_path: Option<String>,
    packed: Option<Vec<u8>>,
    format: String,
    duration_ms: i32,
    sample_rate: i32,
    channels: i16,
    compression: Option<String>,
    byte_size: i64,
    hit_count: i64,
    last_accessed_at: DateTime<Utc>,
}

impl TypedTable for AudioChunkTable {
    const CACHE: CacheKind = CacheKind::AudioChunk;
    const PAYLOAD: &'static str = "audio";
    type Key = AudioChunkKey;
    type Value = AudioChunk;
    type Entry = CachedAudioChunk;
    type Encoded = Encoded;
    type Stored = Stored;

    /// Inline audio is sealed when values are (speech says what the text said); a
    /// storage path is not.
    fn encode(_key: &AudioChunkKey, chunk: &AudioChunk, packing: Packing<'_>) -> Result<Encoded> {
        match &chunk.data {
            AudioData::Inline(bytes) if bytes.len() > MAX_AUDIO_BYTES => {
                return Err(Error::invalid(
                    "audio",
                    format!(
                        "inline audio is at most {MAX_AUDIO_BYTES} bytes, this has {}; \
                         store it elsewhere and cache its path",
                        bytes.len()
                    ),
                ))
            }
            AudioData::Inline(_) => {}
            AudioData::Stored { path, .. } => check_name("storage_path", path)?,
        }
        check_name("format", &chunk.format)?;
        if let Some(compression) = &chunk.compression {
            check_text("compression", compression)?;
        }
        let positive = |what: &'static str, n: i64| {
            if n > 0 {
                Ok(())
            } else {
                Err(Error::invalid(what, "must be greater than zero"))
            }
        };
        positive("sample_rate", i64::from(chunk.sample_rate))?;
        positive("channels", i64::from(chunk.channels))?;
        let fits = |what: &'static str, n: u64, max: u64| {
            if n <= max {
                Ok(n)
            } else {
                Err(Error::invalid(
                    what,
                    format!("must be at most {max}, got {n}"),
                ))
            }
        };
        Ok(Encoded {
            duration_ms: fits("duration_ms", chunk.duration_ms.into(), i32::MAX as u64)? as i32,
            sample_rate: fits("sample_rate", chunk.sample_rate.into(), i32::MAX as u64)? as i32,
            channels: fits("channels", chunk.channels.into(), i16::MAX as u64)? as i16,
            byte_size: fits("byte_size", chunk.byte_size(), i64::MAX as u64)? as i64,
            packed: match &chunk.data {
                AudioData::Inline(bytes) => packing.seal(bytes)?,
                AudioData::Stored { .. } => None,
            },
        })
    }

    fn row_bytes(row: &Row<'_, Self>) -> usize {
        inline(row)
            .or(row.encoded.packed.as_deref())
            .map_or(0, <[u8]>::len)
    }

    fn columns<'r>(rows: &'r [Row<'_, Self>]) -> impl UpsertColumns + 'r {
        (
            column(audio_chunk_cache::voice_model_id, rows, |r| {
                r.key.voice_model_id.as_str()
            }),
            column(audio_chunk_cache::provider, rows, |r| {
                r.key.provider.as_str()
            }),
            column(audio_chunk_cache::audio_data, rows, inline),
            column(audio_chunk_cache::packed, rows, |r| {
                r.encoded.packed.as_deref()
            }),
            column(audio_chunk_cache::storage_path, rows, |r| {
                match &r.value.data {
                    AudioData::Inline(_) => None,
                    AudioData::Stored { path, .. } => Some(path.as_str()),
                }
            }),
            column(audio_chunk_cache::format, rows, |r| r.value.format.as_str()),
            column(audio_chunk_cache::duration_ms, rows, |r| {
                r.encoded.duration_ms
            }),
            column(audio_chunk_cache::sample_rate, rows, |r| {
                r.encoded.sample_rate
            }),
            column(audio_chunk_cache::channels, rows, |r| r.encoded.channels),
            column(audio_chunk_cache::compression, rows, |r| {
                r.value.compression.as_deref()
            }),
            column(audio_chunk_cache::byte_size, rows, |r| r.encoded.byte_size),
            column(audio_chunk_cache::owner_id, rows, |r| r.key.owner),
        )
    }

    fn decode(row: Stored, written: &Written, packing: Packing<'_>) -> Option<CachedAudioChunk> {
        // The table's CHECKs keep exactly one of bytes, sealed bytes and path, and
        // the numbers positive.
        let data = match (row.audio_data, row.packed, row.storage_path) {
            (Some(bytes), _, _) => AudioData::Inline(bytes),
            (None, Some(packed), _) => AudioData::Inline(packing.open(&packed)?),
            (None, None, path) => AudioData::Stored {
                path: path.unwrap_or_default(),
                byte_size: row.byte_size.unsigned_abs(),
            },
        };
        Some(CachedAudioChunk {
            chunk: AudioChunk {
                data,
                format: row.format,
                duration_ms: row.duration_ms.unsigned_abs(),
                sample_rate: row.sample_rate.unsigned_abs(),
                channels: row.channels.unsigned_abs(),
                compression: row.compression,
            },
            hit_count: row.hit_count.unsigned_abs(),
            last_accessed_at: row.last_accessed_at,
            created_at: written.created_at,
            expires_at: written.expires_at,
        })
    }

    /// Text over the handle's maximum is neither read nor written (validated all the
    /// same).
    fn stores(&self, key: &AudioChunkKey) -> bool {
        self.caches_text(key)
    }

    fn digest(key: &AudioChunkKey) -> Result<KeyDigest> {
        key.digest()
    }
}

impl AudioChunkCache<'_> {
    /// Drops the rows whose text this handle does not cache.
    pub(crate) fn cacheable<'r>(
        &self,
        rows: Vec<Row<'r, AudioChunkTable>>,
    ) -> Vec<Row<'r, AudioChunkTable>> {
        rows.into_iter()
            .filter(|r| self.caches_text(r.key))
            .collect()
    }
}

/// Deletes every chunk owned by `user`; returns the storage paths released (inline
/// rows as `None`).
pub(crate) fn delete_owner(
    conn: &mut PgConnection,
    table: &str,
    user: Uuid,
) -> QueryResult<Vec<Option<String>>> {
    #[derive(QueryableByName)]
    struct Released {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        storage_path: Option<String>,
    }
    let released: Vec<Released> = diesel::sql_query(crate::relaxed::marked(format!(
        "DELETE FROM {table} WHERE {} = $1 RETURNING {}",
        audio_chunk_cache::owner_id::NAME,
        audio_chunk_cache::storage_path::NAME
    )))
    .bind::<diesel::sql_types::Uuid, _>(user)
    .load(conn)?;
    Ok(released.into_iter().map(|r| r.storage_path).collect())
}

/// Inline audio in JSON: base64 (an array of numbers, as a JSON byte array would
/// be written, is a hundred times longer and read only for old files).
mod base64_bytes {
    use std::fmt;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        struct Bytes;

        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the audio as a base64 string")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
                STANDARD.decode(text).map_err(|e| {
                    E::custom(format_args!(
                        "`data.inline`: not base64 (standard alphabet, padded): {e}"
                    ))
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(byte) = seq.next_element()? {
                    bytes.push(byte);
                }
                Ok(bytes)
            }
        }

        deserializer.deserialize_any(Bytes)
    }
}
