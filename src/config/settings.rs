//! The settings' own types and their checks: durability, the pooler, size bounds,
//! the pool and the near caches.

use std::time::Duration;

use crate::error::{Error, Result};

/// How much durability the cache trades for write speed.
///
/// A third option, unlogged tables, is a property of the tables rather than of the
/// connections: switch it with `pgcache migrate --unlogged` (or
/// [`CacheManager::set_tables_logged`](crate::CacheManager::set_tables_logged)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Normal synchronous commit: an acknowledged write survives a crash.
    #[default]
    Full,
    /// `synchronous_commit = off` on the cache's own connections (on an
    /// application's pool, `SET LOCAL` inside each cache write's own transaction): a
    /// crash may lose the last fraction of a second of cache writes, never corrupts
    /// anything. The application's own sessions are unaffected.
    Relaxed,
}

/// The choice `value` names among `choices` (trimmed, any case); else a
/// configuration error for `setting` that says what was `expected`.
pub(super) fn parse_keyword<T: Copy>(
    setting: &str,
    value: &str,
    choices: &[(&str, T)],
    expected: &str,
) -> Result<T> {
    let keyword = value.trim().to_ascii_lowercase();
    choices
        .iter()
        .find(|(name, _)| *name == keyword)
        .map(|&(_, choice)| choice)
        .ok_or_else(|| Error::config(setting, value, expected))
}

impl Durability {
    pub(super) fn parse(setting: &str, value: &str) -> Result<Self> {
        parse_keyword(
            setting,
            value,
            &[("full", Durability::Full), ("relaxed", Durability::Relaxed)],
            "expected `full` or `relaxed`",
        )
    }
}

/// `full` or `relaxed`, any case.
impl std::str::FromStr for Durability {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Durability::parse("durability", text)
    }
}

/// Whether the cache's connections go through a transaction pooler (PgBouncer in
/// `pool_mode = transaction`, or a managed equivalent), which hands each
/// transaction, or each statement outside one, to whichever server connection is
/// free. Not detected: a pooler passes the server's answers through, and its one
/// tell (`pg_backend_pid()` changing between transactions) shows only under load.
/// See "Transaction poolers" in docs/operations.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Pooler {
    /// A server connection is the cache's for as long as the cache holds it (no
    /// pooler, or a pooler in session mode): session settings, prepared statements.
    #[default]
    None,
    /// A transaction pooler: pgcache keeps no session state on server connections
    /// (no prepared statement outlives its transaction, no session `SET`, no session
    /// lock); the near-cache poller and migrations use the
    /// [direct URL](super::CacheConfigBuilder::direct_url).
    Transaction,
}

impl Pooler {
    pub(super) fn parse(setting: &str, value: &str) -> Result<Self> {
        parse_keyword(
            setting,
            value,
            &[
                ("none", Pooler::None),
                ("session", Pooler::None),
                ("transaction", Pooler::Transaction),
            ],
            "expected `none` (or `session`) or `transaction`",
        )
    }
}

/// `none`, `session` or `transaction`, any case.
impl std::str::FromStr for Pooler {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Pooler::parse("pooler", text)
    }
}

/// The low watermark used unless configured otherwise: a cache over a bound is
/// evicted down to 80 % of it, so the next few writes do not push it over again.
pub const DEFAULT_EVICTION_LOW_WATERMARK: f64 = 0.8;

/// XFetch's `beta` used unless configured otherwise: the paper's recommended
/// value, which recomputes a key roughly one computation's time before it expires.
pub const DEFAULT_EARLY_REFRESH_BETA: f64 = 1.0;

/// Why `beta` is not a valid XFetch weight (finite, zero or more).
pub(crate) fn check_early_refresh_beta(beta: f64) -> Result<(), String> {
    if beta.is_finite() && beta >= 0.0 {
        Ok(())
    } else {
        Err(format!(
            "must be a finite number, zero (never early) or more, got {beta}"
        ))
    }
}

/// Optional size bounds of one cache, enforced by
/// [`CacheManager::cleanup`](crate::CacheManager::cleanup). Default: no bound.
///
/// Bytes are the entries' payload (key/value: key and stored value; embeddings: the
/// vector; vector search: the results; LLM: the response text; audio: `byte_size`,
/// inline or at the storage path), not the table's size on disk, which
/// [`HealthThresholds::size_budget_bytes`](crate::HealthThresholds::size_budget_bytes)
/// watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SizeBounds {
    /// Most entries (expired ones included until cleanup removes them).
    pub max_entries: Option<u64>,
    /// Most payload bytes.
    pub max_bytes: Option<u64>,
}

impl SizeBounds {
    /// One of `parts` equal shares of these bounds (rounded up, at least 1).
    pub(crate) fn share(self, parts: u64) -> SizeBounds {
        let share = |max: u64| max.div_ceil(parts).max(1);
        SizeBounds {
            max_entries: self.max_entries.map(share),
            max_bytes: self.max_bytes.map(share),
        }
    }

    /// No bound (the default).
    pub const NONE: SizeBounds = SizeBounds {
        max_entries: None,
        max_bytes: None,
    };

    /// Whether any bound is set.
    pub fn is_bounded(&self) -> bool {
        self.max_entries.is_some() || self.max_bytes.is_some()
    }
}

/// Connection-pool settings: size, idle connections and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Most connections open at once (`PGCACHE_POOL_MAX_SIZE`, default 20).
    pub max_size: u32,
    /// Connections the pool keeps open while idle (`PGCACHE_POOL_MIN_IDLE`, default
    /// 0). Above 0 the pool reopens idle connections from a background thread; a
    /// short-lived program that exits while such a connection is being set up can be
    /// killed inside libpq/OpenSSL's exit handlers, so only long-running services
    /// should raise it.
    pub min_idle: u32,
    /// How long an idle connection is kept (`PGCACHE_POOL_IDLE_TIMEOUT_SECS`, default
    /// 30 s).
    pub idle_timeout: Duration,
    /// How long to wait for a connection before giving up
    /// (`PGCACHE_POOL_CONNECTION_TIMEOUT_MS`, default 2000 ms). Also libpq's
    /// `connect_timeout`, rounded up to whole seconds (at least 2), unless the
    /// connection string sets one.
    pub connection_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_size: 20,
            min_idle: 0,
            idle_timeout: Duration::from_secs(30),
            connection_timeout: Duration::from_secs(2),
        }
    }
}

/// An in-process near cache (L1) for one cache: see
/// [`CacheConfigBuilder::near_cache`](super::CacheConfigBuilder::near_cache) and docs/design/near-cache.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct NearCache {
    pub(super) max_bytes: u64,
    pub(super) max_age: Duration,
}

impl NearCache {
    /// Default memory bound: 64 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
    /// Default longest local life of an entry: 60 s.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);

    /// A near cache of at most [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES) whose
    /// entries live at most [`DEFAULT_MAX_AGE`](Self::DEFAULT_MAX_AGE).
    pub fn new() -> Self {
        NearCache {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_age: Self::DEFAULT_MAX_AGE,
        }
    }

    /// The memory bound: keys and values weigh their bytes; past it the least
    /// valuable entries go (quick_cache's CLOCK-Pro policy).
    pub fn max_bytes(self, max_bytes: u64) -> Self {
        NearCache { max_bytes, ..self }
    }

    /// The longest an entry lives in memory, whatever its TTL.
    pub fn max_age(self, max_age: Duration) -> Self {
        NearCache { max_age, ..self }
    }

    /// The memory bound in bytes.
    pub fn bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The longest local life of an entry.
    pub fn age(&self) -> Duration {
        self.max_age
    }
}

impl Default for NearCache {
    fn default() -> Self {
        NearCache::new()
    }
}

/// Default [`CacheConfigBuilder::migration_timeout`](super::CacheConfigBuilder::migration_timeout): 10 minutes, for moving tables
/// of many millions of rows into partitions.
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// Default staleness bound of the near caches: 100 ms.
pub const DEFAULT_NEAR_CACHE_STALENESS: Duration = Duration::from_millis(100);

/// Why `fraction` is not a valid low watermark, if it is not.
pub(crate) fn check_low_watermark(fraction: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(format!("must be between 0 and 1, got {fraction}"))
    }
}

/// `max` as the database's `bigint`, or why it does not fit.
pub(crate) fn check_bound(max: u64) -> Result<i64, String> {
    i64::try_from(max).map_err(|_| format!("must be at most {}, got {max}", i64::MAX))
}
