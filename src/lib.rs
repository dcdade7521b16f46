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

mod cache;
pub mod caches;
mod config;
mod conninfo;
mod counters;
mod error;
mod input;
mod jsonb;
mod key;
mod manager;
mod migrations;
mod ops;
mod pool;
mod reconnect;
mod schema;
mod single_flight;
mod sql;
mod watchdog;

pub use cache::{Cache, CacheKind};
pub use caches::{
    AudioChunk, AudioChunkCache, AudioChunkKey, AudioChunkStats, AudioData, CachedAudioChunk,
    CachedEmbedding, CachedLlmResponse, CachedVectorSearch, EmbeddingCache, EmbeddingKey, KvCache,
    LlmPrompt, LlmResponseCache, TopAudioChunk, TopLlmResponse, VectorSearchCache,
    VectorSearchQuery, DEFAULT_MAX_AUDIO_TEXT_CHARS, MAX_AUDIO_BYTES,
};
pub use config::{
    CacheConfig, CacheConfigBuilder, DatabaseUrl, Durability, PoolSettings, TtlPresets,
    DEFAULT_DATABASE_URL, MAX_TTL,
};
pub use error::{Error, Result};
pub use input::{MAX_EMBEDDING_DIMENSIONS, MAX_KEY_BYTES};
pub use key::{KeyDigest, KEY_FORMAT_VERSION};
pub use manager::CacheManager;
pub use migrations::MIGRATIONS;
pub use ops::{
    Alert, AudioStats, CacheStats, CleanupProgress, CleanupReport, CleanupRun, HealthReport,
    HealthThresholds, Lookups, TableCleanup, TableStats, TopEntry, CLEANUP_BATCH_SIZE, TOP_ENTRIES,
};
pub use ops::{
    EvictionReport, InvalidationReport, SizeBounds, Warmup, WarmupAudioChunk, WarmupEmbedding,
    WarmupKv, WarmupLlmResponse, WarmupReport, WarmupVectorSearch, DEFAULT_EVICTION_LOW_WATERMARK,
};
pub use pool::PooledConnection;

/// Compiles the README's Rust examples as doctests, so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
