//! The [`Cache`] trait every cache table implements, and [`CacheKind`].

use std::time::Duration;

use diesel::pg::PgConnection;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::key::KeyDigest;
use crate::manager::CacheManager;

/// The five caches, one table each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CacheKind {
    /// The generic key/value cache (`cache_entries`).
    Kv,
    /// Query embeddings (`embedding_cache`).
    Embedding,
    /// Vector-search results per user (`vector_search_cache`).
    VectorSearch,
    /// LLM responses with hit counts (`llm_response_cache`).
    LlmResponse,
    /// TTS audio chunks (`audio_chunk_cache`).
    AudioChunk,
}

impl CacheKind {
    /// Every cache, in a fixed order.
    pub const ALL: [CacheKind; 5] = [
        CacheKind::Kv,
        CacheKind::Embedding,
        CacheKind::VectorSearch,
        CacheKind::LlmResponse,
        CacheKind::AudioChunk,
    ];

    /// Short name used in counters, the CLI and reports (`kv`, `embedding`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CacheKind::Kv => "kv",
            CacheKind::Embedding => "embedding",
            CacheKind::VectorSearch => "vector_search",
            CacheKind::LlmResponse => "llm_response",
            CacheKind::AudioChunk => "audio_chunk",
        }
    }

    /// The table holding this cache.
    pub fn table(self) -> &'static str {
        match self {
            CacheKind::Kv => "cache_entries",
            CacheKind::Embedding => "embedding_cache",
            CacheKind::VectorSearch => "vector_search_cache",
            CacheKind::LlmResponse => "llm_response_cache",
            CacheKind::AudioChunk => "audio_chunk_cache",
        }
    }

    /// Looks a cache up by [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for CacheKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The blocking interface of every cache table.
///
/// Implementors supply the connection-level operations (`*_in`), which are also the
/// transactional API: pass a connection inside your own transaction and the cache
/// write commits or rolls back with your data. The provided methods take a pooled
/// connection, honour `ENABLE_CACHING=false` and fail-open mode, and count hits and
/// misses, identically for every cache.
///
/// Async callers run these inside `tokio::task::spawn_blocking`.
pub trait Cache {
    /// What identifies an entry.
    type Key: ?Sized;
    /// What is stored.
    type Value;
    /// What a hit returns: the value, with metadata for the typed caches.
    type Entry;

    /// Which cache this is.
    const KIND: CacheKind;

    /// The manager (pool, configuration, counters) this cache works through.
    fn manager(&self) -> &CacheManager;

    /// The TTL used by [`set`](Self::set) and [`get_or_compute`](Self::get_or_compute).
    fn default_ttl(&self) -> Duration;

    /// The stored value of a hit, without its metadata.
    fn into_value(entry: Self::Entry) -> Self::Value;

    /// A digest of `key` that is the same in every process: it names the key's
    /// single-flight lease in [`get_or_compute`](Self::get_or_compute). The typed
    /// caches return the digest their rows are stored under.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key.
    fn key_digest(&self, key: &Self::Key) -> Result<KeyDigest>;

    /// Reads a live entry on `conn`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key, or a
    /// database error.
    fn get_in(&self, conn: &mut PgConnection, key: &Self::Key) -> Result<Option<Self::Entry>> {
        // A batch of one; caches with a faster single-key statement override this.
        Ok(self.get_many_in(conn, &[key])?.pop().flatten())
    }

    /// Reads many entries on `conn` in one round trip; the result is in `keys` order.
    ///
    /// # Errors
    /// As [`get_in`](Self::get_in).
    fn get_many_in(
        &self,
        conn: &mut PgConnection,
        keys: &[&Self::Key],
    ) -> Result<Vec<Option<Self::Entry>>>;

    /// Stores (inserts or overwrites) an entry on `conn`, expiring `ttl` after the
    /// database's `now()`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key, value or
    /// TTL (zero, under 1 µs, or over [`MAX_TTL`](crate::MAX_TTL)): nothing is
    /// stored. Or a database error.
    fn set_in(
        &self,
        conn: &mut PgConnection,
        key: &Self::Key,
        value: &Self::Value,
        ttl: Duration,
    ) -> Result<()>;

    /// Stores many entries on `conn` in one statement; all or none are stored.
    ///
    /// # Errors
    /// As [`set_in`](Self::set_in); one bad entry rejects the whole batch.
    fn set_many_in(
        &self,
        conn: &mut PgConnection,
        entries: &[(&Self::Key, &Self::Value)],
        ttl: Duration,
    ) -> Result<()>;

    /// Deletes an entry on `conn`; true if a live entry was removed.
    ///
    /// # Errors
    /// As [`get_in`](Self::get_in).
    fn delete_in(&self, conn: &mut PgConnection, key: &Self::Key) -> Result<bool>;

    /// Deletes many entries on `conn` in one statement; returns how many live entries
    /// were removed.
    ///
    /// # Errors
    /// As [`get_in`](Self::get_in).
    fn delete_many_in(&self, conn: &mut PgConnection, keys: &[&Self::Key]) -> Result<u64>;

    /// Reads a live entry; `None` on a miss, on an expired entry, and when caching is
    /// disabled.
    ///
    /// # Errors
    /// See [`get_in`](Self::get_in); also [`Error::Connection`](crate::Error::Connection)
    /// when no connection can be had (a miss instead in fail-open mode).
    fn get(&self, key: &Self::Key) -> Result<Option<Self::Entry>> {
        let manager = self.manager();
        let found = manager.read(Self::KIND, None, |conn| self.get_in(conn, key))?;
        manager.record_lookups(
            Self::KIND,
            u64::from(found.is_some()),
            u64::from(found.is_none()),
        );
        Ok(found)
    }

    /// Reads many entries in one round trip, in `keys` order.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    fn get_many(&self, keys: &[&Self::Key]) -> Result<Vec<Option<Self::Entry>>> {
        let manager = self.manager();
        let misses = || keys.iter().map(|_| None).collect();
        let found = if keys.is_empty() {
            Vec::new()
        } else {
            manager.read_with(Self::KIND, misses, |conn| self.get_many_in(conn, keys))?
        };
        let hits = found.iter().filter(|e| e.is_some()).count() as u64;
        manager.record_lookups(Self::KIND, hits, found.len() as u64 - hits);
        Ok(found)
    }

    /// Stores an entry with the cache's default TTL.
    ///
    /// # Errors
    /// As [`set_in`](Self::set_in); also connection errors (skipped in fail-open mode).
    fn set(&self, key: &Self::Key, value: &Self::Value) -> Result<()> {
        self.set_with_ttl(key, value, self.default_ttl())
    }

    /// Stores an entry expiring `ttl` from now (database time).
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn set_with_ttl(&self, key: &Self::Key, value: &Self::Value, ttl: Duration) -> Result<()> {
        self.manager()
            .write(Self::KIND, (), |conn| self.set_in(conn, key, value, ttl))
    }

    /// Stores many entries in one statement with the given TTL; all or none.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn set_many(&self, entries: &[(&Self::Key, &Self::Value)], ttl: Duration) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.manager()
            .write(Self::KIND, (), |conn| self.set_many_in(conn, entries, ttl))
    }

    /// Deletes an entry; true if a live entry was removed.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn delete(&self, key: &Self::Key) -> Result<bool> {
        self.manager()
            .write(Self::KIND, false, |conn| self.delete_in(conn, key))
    }

    /// Deletes many entries in one statement; returns how many live entries were
    /// removed.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn delete_many(&self, keys: &[&Self::Key]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.manager()
            .write(Self::KIND, 0, |conn| self.delete_many_in(conn, keys))
    }

    /// Cache-aside: returns the live value, or runs `compute`, stores its result with
    /// the default TTL and returns it. An `Err` from `compute` is returned as it is
    /// and nothing is cached.
    ///
    /// Single flight: concurrent misses on one key, in any thread of any process
    /// sharing the database, run `compute` once; the others wait for its result,
    /// polling without holding a pool connection. If the computing caller fails,
    /// panics or dies, a waiter takes over (at once, or after the lease TTL for a dead
    /// process). With caching disabled every call computes.
    ///
    /// # Errors
    /// `compute`'s error, or a cache error converted into `E`:
    /// [`Error::ComputeTimeout`](crate::Error::ComputeTimeout) when another caller's
    /// computation of the key outlasts the compute wait timeout.
    fn get_or_compute<E, F>(&self, key: &Self::Key, compute: F) -> Result<Self::Value, E>
    where
        F: FnOnce() -> Result<Self::Value, E>,
        E: From<crate::Error>,
    {
        self.get_or_compute_with_ttl(key, self.default_ttl(), compute)
    }

    /// [`get_or_compute`](Self::get_or_compute) with an explicit TTL.
    ///
    /// # Errors
    /// As [`get_or_compute`](Self::get_or_compute).
    fn get_or_compute_with_ttl<E, F>(
        &self,
        key: &Self::Key,
        ttl: Duration,
        compute: F,
    ) -> Result<Self::Value, E>
    where
        F: FnOnce() -> Result<Self::Value, E>,
        E: From<crate::Error>,
    {
        crate::single_flight::get_or_compute(self, key, ttl, compute)
    }
}
