//! # pgcache
//!
//! PostgreSQL as the application cache: a key/value cache that replaces Redis's
//! GET/SET/DEL, and typed caches for AI workloads, all in ordinary tables of the
//! database the application already has. Cache writes can join the application's
//! own transactions, so an invalidation commits or rolls back with the data change
//! that caused it.
//!
//! ## From zero to a get
//!
//! ```toml
//! [dependencies]
//! pgcache = "0.1"
//! serde_json = "1"
//! ```
//!
//! ```no_run
//! use std::time::Duration;
//! use pgcache::{Cache, CacheConfig, CacheManager};
//!
//! // DATABASE_URL and the PGCACHE_* variables, or CacheConfig::builder() in code.
//! let config = CacheConfig::builder()
//!     .database_url("postgres://postgres@localhost:5432/postgres")
//!     .build()?;
//! // Opens the pool and creates the tables in the schema `pgcache` on first start.
//! let cache = CacheManager::new(config)?;
//!
//! let kv = cache.kv();
//! kv.set_with_ttl("greeting", &serde_json::json!({"text": "hello"}), Duration::from_secs(60))?;
//! assert_eq!(kv.get("greeting")?, Some(serde_json::json!({"text": "hello"})));
//!
//! // Your own types, through serde.
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Profile { name: String }
//! let profiles = cache.kv().typed::<Profile>();
//! profiles.set("user:42", &Profile { name: "Ada".into() })?;
//! let ada: Option<Profile> = profiles.get("user:42")?;
//! # Ok::<(), pgcache::Error>(())
//! ```
//!
//! The main types: [`CacheConfig`] (built from the environment or a
//! [`CacheConfigBuilder`]), [`CacheManager`] (the pool and one handle per cache),
//! the [`Cache`] trait (get/set/delete and their batch and in-transaction forms,
//! shared by every cache), [`KvCache`] (the Redis replacement: also `incr`, `set_nx`,
//! `get_del`, `get_touch`, `get_or_set`), the typed AI caches ([`EmbeddingCache`],
//! [`VectorSearchCache`], [`LlmResponseCache`], [`AudioChunkCache`]) and [`Error`].
//! A service with a pool of its own passes it to [`CacheManager::with_pool`].
//!
//! With the optional feature `cached`, `Memo` (made by `CacheManager::memo`) memoises
//! functions on the key/value cache: it is a store for the `cached` crate's
//! `#[concurrent_cached]` macro, and its `get_or_compute` adds single flight.
//!
//! The API is blocking (Diesel and r2d2). With the optional feature `tokio`,
//! `CacheManager::to_async` gives its async face, `AsyncCacheManager` (near-cache
//! hits answered on the calling task, the rest on a bounded number of blocking
//! threads, async single flight); see `docs/async.md`. Without it, async services
//! call the blocking API through `tokio::task::spawn_blocking`:
//!
//! ```no_run
//! # async fn handler(cache: pgcache::CacheManager) -> Result<(), Box<dyn std::error::Error>> {
//! use pgcache::Cache;
//!
//! let c = cache.clone();
//! let profile = tokio::task::spawn_blocking(move || c.kv().get("user:42:profile:v2")).await??;
//! # Ok(()) }
//! ```
//!
//! Start with [`CacheManager`].

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

/// Adds the named count fields of `$part` into `$sum`: how per-shard reports merge.
macro_rules! add_counts {
    ($sum:expr, $part:expr; $($field:ident),+ $(,)?) => {
        $( $sum.$field += $part.$field; )+
    };
}

// Layers, bottom to top; a module imports only from its own layer or below (see
// ARCHITECTURE.md).
// Foundations: facts and checks with no database.
mod codec;
mod config;
mod database_url;
mod error;
mod expiry;
mod freshness;
mod jsonb;
mod key;
mod kind;
pub mod metrics;
mod relaxed;
mod shards;
mod statement;
mod striped;
mod tables;
mod validation;
// Database plumbing.
mod catalog;
mod migrations;
mod partitions;
mod pool;
mod schema;
mod watchdog;
// The engine: the one hot path every operation takes.
mod background;
mod cluster;
mod counters;
mod engine;
mod latency;
mod near;
mod skipped;
// The tables: the Cache trait, the typed-table core, one module per table.
mod cache;
pub mod caches;
mod eviction;
#[cfg(feature = "cached")]
mod memoize;
mod popularity;
mod single_flight;
mod table;
// Operations across tables, and the facade.
mod manager;
mod ops;
// The async face over the facade (feature `tokio`).
#[cfg(feature = "tokio")]
mod asynchronous;

// The crates whose types the API's signatures use, so a user's versions always match.
pub use chrono;
pub use diesel;
pub use serde_json;
pub use uuid;

#[cfg(feature = "tokio")]
pub use asynchronous::{AsyncCache, AsyncCacheManager, AsyncTable, KvTable};
pub use cache::Cache;
pub use caches::kv::{MAX_TAGS_PER_ENTRY, MAX_TAG_BYTES};
pub use caches::{
    AudioChunk, AudioChunkCache, AudioChunkKey, AudioChunkTable, AudioData, CachedAudioChunk,
    CachedEmbedding, CachedLlmResponse, CachedVectorSearch, EmbeddingCache, EmbeddingKey,
    EmbeddingTable, KvCache, LlmPrompt, LlmResponseCache, LlmResponseTable, VectorSearchCache,
    VectorSearchQuery, VectorSearchTable, DEFAULT_MAX_AUDIO_TEXT_CHARS, MAX_AUDIO_BYTES,
};
pub use codec::DEFAULT_COMPRESSION_THRESHOLD;
pub use config::UnknownVariable;
pub use config::{
    CacheConfig, CacheConfigBuilder, Durability, PoolSettings, Pooler, Shard, DEFAULT_DATABASE_URL,
    DEFAULT_MIGRATION_TIMEOUT, DEFAULT_SCHEMA,
};
pub use config::{NearCache, DEFAULT_NEAR_CACHE_STALENESS};
pub use config::{SizeBounds, DEFAULT_EARLY_REFRESH_BETA, DEFAULT_EVICTION_LOW_WATERMARK};
pub use counters::{CacheCounters, CounterSnapshot};
pub use database_url::DatabaseUrl;
pub use error::{ConnectionError, Error, MigrationError, Result};
pub use eviction::{EvictionReport, CLEANUP_BATCH_SIZE};
pub use expiry::{TtlPresets, MAX_TTL};
pub use key::{KeyDigest, KEY_FORMAT_VERSION};
pub use kind::CacheKind;
pub use manager::CacheManager;
#[cfg(feature = "cached")]
pub use memoize::Memo;
pub use migrations::{run_migrations, MIGRATIONS};
pub use near::NearCacheStats;
pub use ops::{
    Alert, CacheStats, CleanupProgress, CleanupReport, CleanupRun, HealthReport, HealthThresholds,
    Lookups, ShardDown, TableCleanup, TableStats, TOP_ENTRIES,
};
pub use ops::{
    InvalidationReport, Warmup, WarmupAudioChunk, WarmupEmbedding, WarmupKv, WarmupLlmResponse,
    WarmupReport, WarmupVectorSearch,
};
pub use partitions::{Partitioning, MAX_PARTITIONS};
pub use pool::{ConnectionPool, PoolSource, PoolStatus, PooledConnection};
pub use popularity::{HitStats, TopEntry};
pub use shards::{ShardMap, DEFAULT_SHARD};
pub use skipped::MAX_SKIPPED_KEYS;
pub use table::TypedCache;
pub use validation::{MAX_EMBEDDING_DIMENSIONS, MAX_KEY_BYTES};

/// Compiles the Rust examples of the README and of every page in `docs/` as
/// doctests, so they cannot drift from the API.
#[cfg(doctest)]
mod doc_examples {
    /// The README's async section uses the `tokio` feature, as CI's test command
    /// enables it (`--all-features`).
    #[cfg(feature = "tokio")]
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/guide.md")]
    struct Guide;
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../docs/benchmarks.md")]
    struct Benchmarks;
    #[doc = include_str!("../docs/reference/configuration.md")]
    struct Configuration;
    #[doc = include_str!("../docs/reference/errors.md")]
    struct Errors;
    #[doc = include_str!("../docs/reference/metrics.md")]
    struct Metrics;
    #[doc = include_str!("../docs/reference/cli.md")]
    struct Cli;
    #[doc = include_str!("../docs/design/near-cache.md")]
    struct NearCache;
    #[doc = include_str!("../docs/design/watchdog.md")]
    struct Watchdog;
    #[doc = include_str!("../docs/design/single-flight.md")]
    struct SingleFlight;
}

/// Compiles the async guide's Rust examples as doctests.
#[cfg(all(doctest, feature = "tokio"))]
#[doc = include_str!("../docs/async.md")]
struct AsyncDoctests;
