//! The near caches' figures, per cache, as reports show them.

use serde::Serialize;

use crate::kind::CacheKind;

/// The near-cache figures of one cache, in [`CacheStats`](crate::CacheStats) and
/// from [`CacheManager::near_cache_stats`](crate::CacheManager::near_cache_stats).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct NearCacheStats {
    /// The cache.
    pub cache: CacheKind,
    /// Reads answered from this process's memory.
    pub hits: u64,
    /// Reads L1 could serve but did not hold (they went to the database).
    pub misses: u64,
    /// Reads that skipped L1 because its poller was not current.
    pub bypasses: u64,
    /// Keys invalidated, held or not: named by a logged change or written by this
    /// process (whose own writes are then counted again when their change is read).
    pub invalidations: u64,
    /// Entries dropped to stay within the byte bound.
    pub evictions: u64,
    /// Entries held.
    pub entries: u64,
    /// Their weight in bytes (keys and values).
    pub bytes: u64,
    /// Milliseconds since the last successful poll of the change log was sent
    /// (`None` while the poller is not current): how far behind the near cache may be.
    pub poll_lag_ms: Option<f64>,
    /// Polls of the change log this process made for its near caches since start
    /// (one poller for them all, so every cache shows the same count): every 2 ms
    /// while changes come in, every third of the staleness bound while none do.
    pub polls: u64,
}

impl NearCacheStats {
    /// Several shards' near caches of this process, one entry per cache: counts
    /// summed, the lag the worst (not current if one is not).
    pub(crate) fn merged(
        parts: impl IntoIterator<Item = Vec<NearCacheStats>>,
    ) -> Vec<NearCacheStats> {
        let mut all: Vec<NearCacheStats> = Vec::new();
        for stats in parts.into_iter().flatten() {
            match all.iter_mut().find(|s| s.cache == stats.cache) {
                None => all.push(stats),
                Some(sum) => {
                    add_counts!(sum, stats; hits, misses, bypasses, invalidations, evictions, entries, bytes, polls);
                    sum.poll_lag_ms = sum
                        .poll_lag_ms
                        .zip(stats.poll_lag_ms)
                        .map(|(a, b)| a.max(b));
                }
            }
        }
        all
    }
}
