//! # pgcache
//!
//! PostgreSQL as the application cache: a key/value cache that replaces Redis's
//! GET/SET/DEL, and typed caches for AI workloads, all in ordinary tables of the
//! database the application already has. Cache writes can join the application's
//! own transactions, so an invalidation commits or rolls back with the data change
//! that caused it.
//!
//! The API is blocking (Diesel and r2d2). Async services call it through
//! `tokio::task::spawn_blocking`:
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

// Layers, bottom to top; a module imports only from its own layer or below (see
// ARCHITECTURE.md).
// Foundations: facts and checks with no database.
mod config;
mod database_url;
mod error;
mod expiry;
mod jsonb;
mod key;
mod kind;
mod validation;
// Database plumbing.
mod conninfo;
mod migrations;
mod pool;
mod schema;
mod watchdog;
// The engine: the one hot path every operation takes.
mod background;
mod counters;
mod engine;
mod latency;
mod near;
mod skipped;
// The tables: the Cache trait, the typed-table core, one module per table.
mod cache;
pub mod caches;
mod eviction;
mod popularity;
mod single_flight;
mod table;
// Operations across tables, and the facade.
mod manager;
mod ops;

pub use cache::Cache;
pub use caches::{
    AudioChunk, AudioChunkCache, AudioChunkKey, AudioChunkTable, AudioData, CachedAudioChunk,
    CachedEmbedding, CachedLlmResponse, CachedVectorSearch, EmbeddingCache, EmbeddingKey,
    EmbeddingTable, KvCache, LlmPrompt, LlmResponseCache, LlmResponseTable, VectorSearchCache,
    VectorSearchQuery, VectorSearchTable, DEFAULT_MAX_AUDIO_TEXT_CHARS, MAX_AUDIO_BYTES,
};
pub use config::{CacheConfig, CacheConfigBuilder, Durability, PoolSettings, DEFAULT_DATABASE_URL};
pub use config::{NearCache, DEFAULT_NEAR_CACHE_STALENESS};
pub use config::{SizeBounds, DEFAULT_EVICTION_LOW_WATERMARK};
pub use database_url::DatabaseUrl;
pub use error::{ConnectionError, Error, MigrationError, Result};
pub use eviction::{EvictionReport, CLEANUP_BATCH_SIZE};
pub use expiry::{TtlPresets, MAX_TTL};
pub use key::{KeyDigest, KEY_FORMAT_VERSION};
pub use kind::CacheKind;
pub use manager::CacheManager;
pub use migrations::MIGRATIONS;
pub use near::NearCacheStats;
pub use ops::{
    Alert, CacheStats, CleanupProgress, CleanupReport, CleanupRun, HealthReport, HealthThresholds,
    Lookups, TableCleanup, TableStats, TOP_ENTRIES,
};
pub use ops::{
    InvalidationReport, Warmup, WarmupAudioChunk, WarmupEmbedding, WarmupKv, WarmupLlmResponse,
    WarmupReport, WarmupVectorSearch,
};
pub use pool::PooledConnection;
pub use popularity::{HitStats, TopEntry};
pub use skipped::MAX_SKIPPED_KEYS;
pub use table::TypedCache;
pub use validation::{MAX_EMBEDDING_DIMENSIONS, MAX_KEY_BYTES};

/// Compiles the README's Rust examples as doctests, so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
