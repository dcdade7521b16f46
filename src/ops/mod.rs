//! Operations: cleanup of expired rows, the background janitor, statistics, health
//! checks and clearing caches. Each is a method on
//! [`CacheManager`](crate::CacheManager) and a `pgcache` subcommand.

mod cleanup;
mod health;
pub(crate) mod janitor;
pub(crate) mod latency;
mod stats;

pub use cleanup::{CleanupProgress, CleanupReport, TableCleanup, CLEANUP_BATCH_SIZE};
pub use health::{Alert, CleanupRun, HealthReport, HealthThresholds};
pub use stats::{AudioStats, CacheStats, Lookups, TableStats, TopEntry, TOP_ENTRIES};
