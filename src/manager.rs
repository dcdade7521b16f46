//! [`CacheManager`]: the facade that owns the pool and hands out the caches.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use diesel::pg::PgConnection;

use crate::background::Worker;
use crate::caches::KvCache;
use crate::config::CacheConfig;
use crate::counters::Counters;
use crate::error::{Error, Result};
use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::ops::latency::LatencyRecorder;
use crate::pool::{Pool, PooledConnection};
use crate::skipped::{Skipped, SkippedWrites};

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
    pool: Option<Pool>,
    counters: Counters,
    failed_open: AtomicU64,
    latency: LatencyRecorder,
    /// Fail-open mode started while the database was down: migrations still to run.
    migrations_pending: AtomicBool,
    /// Writes and deletes fail-open mode skipped, to replay.
    skipped: SkippedWrites,
    /// Flushes counters and catches up after an outage, off the request path.
    flusher: Option<Worker>,
    /// Held through a flush, so `flush_stats` returns only once everything counted
    /// before it, including what the flusher had in flight, is written.
    flushing: Mutex<()>,
    /// Dropped with the last clone, which stops the janitor thread.
    _janitor: Option<Worker>,
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
            Some(Pool::new(&config)?)
        } else {
            None
        };
        let background = pool.is_some();
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            counters: Counters::new(),
            flusher: background
                .then(|| {
                    Worker::spawn(
                        "pgcache-flusher",
                        config.stats_flush_interval(),
                        weak.clone(),
                        Inner::background_flush,
                    )
                })
                .flatten(),
            _janitor: config
                .janitor_interval()
                .filter(|_| background)
                .and_then(|interval| {
                    Worker::spawn("pgcache-janitor", interval, weak.clone(), |inner| {
                        crate::ops::janitor::run(&CacheManager {
                            inner: Arc::clone(inner),
                        });
                    })
                }),
            config,
            pool,
            failed_open: AtomicU64::new(0),
            latency: LatencyRecorder::default(),
            migrations_pending: AtomicBool::new(false),
            skipped: SkippedWrites::default(),
            flushing: Mutex::new(()),
        });
        let manager = CacheManager { inner };
        let config = &manager.inner.config;
        if manager.inner.pool.is_some() && (config.run_migrations() || config.fail_open()) {
            // Fail-open mode starts while the database is down, but not when it is
            // misconfigured: only a transient failure is let through.
            let started = if config.run_migrations() {
                manager.run_migrations().map(drop)
            } else {
                manager.connection().map(drop)
            };
            match started {
                Err(error) if config.fail_open() && error.is_transient() => {
                    tracing::warn!(%error, "pgcache: database unavailable at start-up; serving misses until it answers");
                    manager
                        .inner
                        .migrations_pending
                        .store(config.run_migrations(), Ordering::Release);
                }
                other => other?,
            }
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
    /// applied), for running your own transaction around cache writes. A connection
    /// on which a statement failed (yours included) is probed before it is handed out
    /// again, and after any connection was found dead every pooled one is, so a
    /// connection that died in the pool (server restart, killed backend) is not
    /// handed out twice.
    ///
    /// # Errors
    /// [`Error::Connection`] when caching is disabled or no connection is free within
    /// the connection timeout.
    pub fn connection(&self) -> Result<PooledConnection> {
        self.pool()?.checkout()
    }

    /// A connection that has just answered a `SELECT 1`, for maintenance operations
    /// that run several statements on one connection.
    ///
    /// # Errors
    /// [`Error::Connection`] when caching is disabled or no connection can be had.
    pub(crate) fn live_connection(&self) -> Result<PooledConnection> {
        self.pool()?.live()
    }

    fn pool(&self) -> Result<&Pool> {
        self.inner.pool.as_ref().ok_or_else(|| {
            Error::Connection(
                "caching is disabled (ENABLE_CACHING=false), so there is no pool".to_owned(),
            )
        })
    }

    /// Runs a maintenance operation (stats, cleanup, invalidation, warmup, ...): on a
    /// pooled connection, once more on a live one if the first was dead, like every
    /// cache operation; never failing open.
    ///
    /// # Errors
    /// [`Error::Connection`] when caching is disabled or no connection can be had,
    /// and whatever `op` returns.
    pub(crate) fn maintain<T>(&self, op: impl Fn(&mut PgConnection) -> Result<T>) -> Result<T> {
        self.pool()?.run(|conn| {
            self.inner.catch_up(conn)?;
            op(conn)
        })
    }

    /// Runs pending migrations into the configured schema (created if missing) and
    /// returns the versions applied. Safe to run from many processes at once.
    ///
    /// # Errors
    /// [`Error::Connection`] or [`Error::Migration`].
    pub fn run_migrations(&self) -> Result<Vec<String>> {
        let schema = self.config().schema();
        let applied = self.maintain(|conn| crate::migrations::run_pending(conn, schema))?;
        self.inner
            .migrations_pending
            .store(false, Ordering::Release);
        Ok(applied)
    }

    /// Makes every cache table `LOGGED` (durable, replicated) or `UNLOGGED` (faster
    /// writes; emptied after a crash and not replicated).
    ///
    /// # Errors
    /// [`Error::Connection`], or a database error (e.g. missing privileges).
    pub fn set_tables_logged(&self, logged: bool) -> Result<()> {
        self.maintain(|conn| crate::migrations::set_logged(conn, logged))
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
    }

    pub(crate) fn record_entry_hit(&self, kind: CacheKind, digest: KeyDigest) {
        if self.inner.counters.record_entry_hit(kind, digest) {
            // Bound the memory held by pending hits, without making this get wait.
            if let Some(flusher) = &self.inner.flusher {
                flusher.nudge();
            }
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub(crate) fn latency(&self) -> &LatencyRecorder {
        &self.inner.latency
    }

    /// Runs a read: a miss (`miss`) when caching is disabled, or, in fail-open mode,
    /// when it fails transiently. `op` runs a second time, on a live connection, if
    /// the first connection was dead (see [`crate::pool`]), so it must be idempotent.
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
    /// fail-open mode, when it fails transiently; then `undo` says which keys may now
    /// be stale, to delete once the database answers. Retried like [`Self::read`].
    pub(crate) fn write<T>(
        &self,
        kind: CacheKind,
        skipped: T,
        undo: impl FnOnce() -> Option<Skipped>,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.run(
            kind,
            "write",
            || {
                if let Some(undo) = undo() {
                    self.inner.skipped.remember(undo);
                }
                skipped
            },
            op,
        )
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
        let result = pool.run(|conn| {
            self.inner.catch_up(conn)?;
            op(conn)
        });
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
    /// After an outage in fail-open mode: runs the migrations start-up could not,
    /// and the deletes of skipped writes, before anything else uses `conn`. Two
    /// atomic loads when there is nothing to do.
    fn catch_up(&self, conn: &mut PgConnection) -> Result<()> {
        if self.migrations_pending.load(Ordering::Acquire) {
            crate::migrations::run_pending(conn, self.config.schema())?;
            self.migrations_pending.store(false, Ordering::Release);
        }
        if self.skipped.is_pending() {
            self.skipped.replay(conn)?;
        }
        Ok(())
    }

    /// The flusher thread's task: counters, and catching up once the database is
    /// back even if the application sends nothing meanwhile.
    fn background_flush(self: &Arc<Self>) {
        if self.migrations_pending.load(Ordering::Acquire) || self.skipped.is_pending() {
            if let Some(pool) = &self.pool {
                if let Err(error) = pool.run(|conn| self.catch_up(conn)) {
                    tracing::debug!(%error, "pgcache: database still unavailable");
                }
            }
        }
        if let Err(error) = self.flush() {
            tracing::warn!(%error, "pgcache: flushing hit counters failed; will retry");
        }
    }

    fn flush(&self) -> Result<()> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        let _flushing = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let batch = self.counters.take();
        if batch.is_empty() {
            return Ok(());
        }
        let written = pool.run(|conn| Ok(batch.write(conn)?));
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
