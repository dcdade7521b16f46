//! Operations across the cache tables: cleanup of expired rows, size bounds
//! (eviction), the background janitor, statistics, health checks, warmup, per-user
//! invalidation and clearing caches. Each is a method on
//! [`CacheManager`](crate::CacheManager) and a `pgcache` subcommand.

mod cleanup;
pub(crate) mod eviction;
mod health;
mod invalidation;
pub(crate) mod janitor;
pub(crate) mod latency;
mod stats;
mod warmup;

pub use cleanup::{CleanupProgress, CleanupReport, TableCleanup, CLEANUP_BATCH_SIZE};
pub use eviction::{EvictionReport, SizeBounds, DEFAULT_EVICTION_LOW_WATERMARK};
pub use health::{Alert, CleanupRun, HealthReport, HealthThresholds};
pub use invalidation::InvalidationReport;
pub use stats::{AudioStats, CacheStats, Lookups, TableStats, TopEntry, TOP_ENTRIES};
pub use warmup::{
    Warmup, WarmupAudioChunk, WarmupEmbedding, WarmupKv, WarmupLlmResponse, WarmupReport,
    WarmupVectorSearch,
};
