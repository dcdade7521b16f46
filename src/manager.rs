//! [`CacheManager`]: the facade that owns the pool and hands out the caches.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use diesel::pg::PgConnection;

use crate::cache::CacheKind;
use crate::caches::KvCache;
use crate::config::CacheConfig;
use crate::counters::Counters;
use crate::error::{Error, Result};
use crate::key::KeyDigest;
use crate::ops::janitor::JanitorStop;
use crate::ops::latency::LatencyRecorder;
use crate::pool::{build_pool, PgPool, PooledConnection};

/// The entry point: owns the connection pool and the configuration, and hands out
/// one handle per cache table.
///
/// Cheap to clone (an `Arc`), `Send + Sync`: create one at start-up and share it.
/// With caching disabled (`ENABLE_CACHING=false`) no pool is created and no
/// connection is ever opened.
///
/// ```no_run
/// use pgcache::{Cache, CacheConfig, CacheManager};
///
/// let cache = CacheManager::new(CacheConfig::from_env()?)?;
/// cache.kv().set("user:42:profile:v2", &serde_json::json!({"name": "Ada"}))?;
/// assert!(cache.kv().get("user:42:profile:v2")?.is_some());
/// # Ok::<(), pgcache::Error>(())
/// ```
#[derive(Clone)]
pub struct CacheManager {
    inner: Arc<Inner>,
}

struct Inner {
    config: CacheConfig,
    pool: Option<PgPool>,
    counters: Counters,
    failed_open: AtomicU64,
    latency: LatencyRecorder,
    /// Dropped with the last clone, which wakes and stops the janitor thread.
    _janitor: Option<JanitorStop>,
}

/// A manager reference that does not keep it alive (for the janitor thread).
pub(crate) struct WeakManager(Weak<Inner>);

impl WeakManager {
    pub(crate) fn upgrade(&self) -> Option<CacheManager> {
        self.0.upgrade().map(|inner| CacheManager { inner })
    }
}

impl fmt::Debug for CacheManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheManager")
            .field("config", &self.inner.config)
            .field("pool", &self.inner.pool.as_ref().map(|p| p.state()))
            .finish_non_exhaustive()
    }
}

impl CacheManager {
    /// Opens the pool (unless caching is disabled) and, unless turned off in the
    /// configuration, runs pending migrations.
    ///
    /// # Errors
    /// [`Error::Connection`] when the database cannot be reached within the
    /// connection timeout; [`Error::Migration`] when migrations fail.
    pub fn new(config: CacheConfig) -> Result<Self> {
        let pool = if config.enabled() {
            Some(build_pool(&config)?)
        } else {
            None
        };
        let (janitor_stop, janitor) = crate::ops::janitor::prepare(&config, pool.is_some());
        let manager = CacheManager {
            inner: Arc::new(Inner {
                counters: Counters::new(config.stats_flush_interval()),
                config,
                pool,
                failed_open: AtomicU64::new(0),
                latency: LatencyRecorder::default(),
                _janitor: janitor_stop,
            }),
        };
        if manager.inner.config.run_migrations() && manager.inner.pool.is_some() {
            manager.run_migrations()?;
        }
        if let Some(janitor) = janitor {
            janitor.start(&manager);
        }
        Ok(manager)
    }

    /// [`CacheManager::new`] with [`CacheConfig::from_env`].
    ///
    /// # Errors
    /// As [`CacheConfig::from_env`] and [`CacheManager::new`].
    pub fn from_env() -> Result<Self> {
        Self::new(CacheConfig::from_env()?)
    }

    /// The configuration this manager runs with.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Whether caching is enabled.
    pub fn is_enabled(&self) -> bool {
        self.inner.pool.is_some()
    }

    /// The key/value cache, holding `serde_json::Value`s; see
    /// [`KvCache::typed`] for a handle on your own type.
    pub fn kv(&self) -> KvCache<'_> {
        KvCache::new(self)
    }

    /// Checks a connection out of the cache's pool (search path and session settings
    /// applied), for running your own transaction around cache writes.
    ///
    /// # Errors
    /// [`Error::Connection`] when caching is disabled or no connection is free within
    /// the connection timeout.
    pub fn connection(&self) -> Result<PooledConnection> {
        match &self.inner.pool {
            Some(pool) => Ok(pool.get()?),
            None => Err(Error::Connection(
                "caching is disabled (ENABLE_CACHING=false), so there is no pool".to_owned(),
            )),
        }
    }

    /// Runs pending migrations into the configured schema (created if missing) and
    /// returns the versions applied.
    ///
    /// # Errors
    /// [`Error::Connection`] or [`Error::Migration`].
    pub fn run_migrations(&self) -> Result<Vec<String>> {
        let mut conn = self.connection()?;
        if let Some(schema) = self.config().schema() {
            use diesel::connection::SimpleConnection;
            conn.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                crate::pool::quote_ident(schema)
            ))?;
        }
        crate::migrations::run_pending(&mut conn)
    }

    /// Makes every cache table `LOGGED` (durable, replicated) or `UNLOGGED` (faster
    /// writes; emptied after a crash and not replicated).
    ///
    /// # Errors
    /// [`Error::Connection`], or a database error (e.g. missing privileges).
    pub fn set_tables_logged(&self, logged: bool) -> Result<()> {
        crate::migrations::set_logged(&mut *self.connection()?, logged)
    }

    /// Writes the in-memory hit and miss counters to the database now (this also
    /// happens every `stats_flush_interval` during use and when the last clone of the
    /// manager is dropped).
    ///
    /// # Errors
    /// [`Error::Connection`] or a database error; the counts are kept for the next
    /// flush.
    pub fn flush_stats(&self) -> Result<()> {
        if self.inner.pool.is_none() {
            return Ok(());
        }
        self.inner.flush()
    }

    /// How many operations fail-open mode has turned into misses or skipped writes.
    pub fn failed_open_count(&self) -> u64 {
        self.inner.failed_open.load(Ordering::Relaxed)
    }

    pub(crate) fn record_lookups(&self, kind: CacheKind, hits: u64, misses: u64) {
        self.inner.counters.record_lookups(kind, hits, misses);
        self.flush_if_due();
    }

    pub(crate) fn record_entry_hit(&self, kind: CacheKind, digest: KeyDigest) {
        if self.inner.counters.record_entry_hit(kind, digest) {
            // Bound the memory held by pending hits: flush now.
            if let Err(error) = self.inner.flush() {
                tracing::warn!(%error, "pgcache: flushing hit counters failed");
            }
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub(crate) fn latency(&self) -> &LatencyRecorder {
        &self.inner.latency
    }

    pub(crate) fn downgrade(&self) -> WeakManager {
        WeakManager(Arc::downgrade(&self.inner))
    }

    fn flush_if_due(&self) {
        if self.inner.counters.claim_flush() {
            if let Err(error) = self.inner.flush() {
                tracing::warn!(%error, "pgcache: flushing hit counters failed; will retry");
            }
        }
    }

    /// Runs a read: a miss (`miss`) when caching is disabled, or, in fail-open mode,
    /// when it fails transiently. `op` runs a second time, on a live connection, if
    /// the first connection was dead (see `reconnect`), so it must be idempotent.
    pub(crate) fn read<T>(
        &self,
        kind: CacheKind,
        miss: T,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.read_with(kind, || miss, op)
    }

    pub(crate) fn read_with<T>(
        &self,
        kind: CacheKind,
        miss: impl FnOnce() -> T,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.run(kind, "read", miss, op)
    }

    /// Runs a write: skipped (returning `skipped`) when caching is disabled, or, in
    /// fail-open mode, when it fails transiently. Retried like [`Self::read`].
    pub(crate) fn write<T>(
        &self,
        kind: CacheKind,
        skipped: T,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.run(kind, "write", || skipped, op)
    }

    fn run<T>(
        &self,
        kind: CacheKind,
        what: &'static str,
        fallback: impl FnOnce() -> T,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let Some(pool) = &self.inner.pool else {
            return Ok(fallback());
        };
        let started = Instant::now();
        let result = crate::reconnect::run_on_pool(pool, op);
        // Pool wait included: it is part of what the caller waits for.
        self.inner.latency.record(started.elapsed());
        match result {
            Err(error) if self.inner.config.fail_open() && error.is_transient() => {
                self.inner.failed_open.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cache = %kind, operation = what, %error, "pgcache: failing open");
                Ok(fallback())
            }
            other => other,
        }
    }
}

impl Inner {
    fn flush(&self) -> Result<()> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        let batch = self.counters.take();
        if batch.is_empty() {
            return Ok(());
        }
        let written = pool.get().map_err(Error::from).and_then(|mut conn| {
            crate::watchdog::watched(&mut conn, |conn| Ok(batch.write(conn)?))
        });
        if let Err(error) = written {
            self.counters.restore(batch);
            return Err(error);
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            tracing::warn!(%error, "pgcache: final flush of hit counters failed");
        }
    }
}
