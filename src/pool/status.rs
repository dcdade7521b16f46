//! What a shard's connection pool holds right now ([`PoolStatus`]), and the count
//! of the cache's checkouts waiting for a connection.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

/// Whose pool a shard's cache connections come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PoolSource {
    /// The cache's own pool ([`CacheManager::new`](crate::CacheManager::new)).
    Own,
    /// The application's pool
    /// ([`CacheManager::with_pool`](crate::CacheManager::with_pool)): its figures
    /// include the application's own connections.
    Application,
    /// Caching is disabled: the connections
    /// [`CacheManager::connection`](crate::CacheManager::connection) hands out (the
    /// application's pool's, or a plain pool opened at the first call).
    Disabled,
}

/// One shard's connection pool, now: from
/// [`CacheManager::pool_status`](crate::CacheManager::pool_status), and in
/// [`CacheStats`](crate::CacheStats) (`pgcache stats` shows its own process's).
/// Read from memory: cheap enough to poll.
///
/// Connections `open` = `idle` + `parked` + in use. Not counted here: the near
/// caches' poller's connection and, while the database is down, the prober's (see
/// "Connection budget" in docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The shard's name ([`DEFAULT_SHARD`](crate::DEFAULT_SHARD) for one database).
    pub shard: String,
    /// Whose pool it is.
    pub source: PoolSource,
    /// The most connections it opens.
    pub max_size: u32,
    /// Server connections open now.
    pub open: u32,
    /// Open and idle in the pool.
    pub idle: u32,
    /// Open and parked for their thread's next cache operation (the cache's own
    /// pool only; they go back to the pool after a second unused).
    pub parked: u32,
    /// The cache's checkouts waiting for a connection now.
    pub waiting: u32,
}

impl PoolStatus {
    /// Connections in use now: open, neither idle nor parked.
    pub fn in_use(&self) -> u32 {
        self.open.saturating_sub(self.idle + self.parked)
    }
}

impl fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match self.source {
            PoolSource::Own => "own",
            PoolSource::Application => "the application's",
            PoolSource::Disabled => "caching disabled",
        };
        write!(
            f,
            "{} open of {} ({source}): {} idle, {} parked, {} in use; {} waiting",
            self.open,
            self.max_size,
            self.idle,
            self.parked,
            self.in_use(),
            self.waiting
        )
    }
}

/// Counts the checkouts waiting for a connection.
#[derive(Debug, Default)]
pub(crate) struct Waiters(AtomicU32);

impl Waiters {
    /// Counts one until the guard is dropped.
    pub(crate) fn enter(&self) -> Waiter<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Waiter(self)
    }

    pub(crate) fn count(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A checkout waiting (see [`Waiters::enter`]).
#[derive(Debug)]
pub(crate) struct Waiter<'a>(&'a Waiters);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}
