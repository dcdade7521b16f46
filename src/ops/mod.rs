//! Operations across the cache tables: cleanup of expired rows, size bounds
//! (eviction), the background janitor, statistics, health checks, warmup, per-user
//! invalidation and clearing caches: functions over the shards' engines, each exposed as a
//! method of [`CacheManager`](crate::CacheManager) and a `pgcache` subcommand.

pub(crate) mod cleanup;
pub(crate) mod health;
pub(crate) mod invalidation;
pub(crate) mod janitor;
pub(crate) mod stats;
pub(crate) mod warmup;

pub use cleanup::{CleanupProgress, CleanupReport, TableCleanup};
pub use health::{Alert, CleanupRun, HealthReport, HealthThresholds};
pub use invalidation::InvalidationReport;
pub use stats::{CacheStats, Lookups, ShardDown, TableStats, TOP_ENTRIES};
pub use warmup::{
    Warmup, WarmupAudioChunk, WarmupEmbedding, WarmupKv, WarmupLlmResponse, WarmupReport,
    WarmupVectorSearch,
};
