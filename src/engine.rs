//! The engine: what every cache handle and operation works through. It owns the
//! configuration and the pool and runs every cache operation on the one hot path
//! ([`Engine::read`] / [`Engine::write`]): checkout, catch-up after an outage,
//! retry on a dead connection, latency, and fail-open. Counters, metrics
//! ([`crate::metrics`]) and the operation's tracing span are recorded here, once
//! for every cache; the counters are written by a background flusher, never on the
//! request path.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError, Weak};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;

use crate::background::Worker;
use crate::config::{CacheConfig, Durability};
use crate::counters::{CounterSnapshot, Counters};
use crate::error::{Error, Result};
use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::latency::LatencyWindow;
use crate::metrics::{self, Op};
use crate::near::{NearCaches, Poller};
use crate::pool::{ConnectionPool, Plain, Pool, PooledConnection};
use crate::skipped::{Skipped, SkippedWrites};
use crate::tables::Tables;
use crate::watchdog::{no_answer_limit, watched, Watchdog};

/// The engine behind a [`CacheManager`](crate::CacheManager) (public only as the
/// unnameable type cache handles borrow).
pub struct Engine {
    config: CacheConfig,
    /// The cache's tables named with their schema, for every statement.
    tables: Tables,
    pool: Option<Pool>,
    /// With caching disabled, where the caller's connections come from.
    plain: Option<Plain>,
    /// Relaxed durability on the application's pool: each write of pgcache's own
    /// marked for a relaxed commit (see [`crate::relaxed`]).
    relaxed_writes: bool,
    counters: Counters,
    latency: LatencyWindow,
    /// Fail-open mode (or a shard) started while the database was down: migrations
    /// still to run.
    migrations_pending: AtomicBool,
    /// The database did not answer at start-up (tolerated in fail-open mode and for
    /// a shard).
    down_at_start: AtomicBool,
    /// Writes and deletes fail-open mode skipped, to replay.
    skipped: SkippedWrites,
    /// Flushes counters and catches up after an outage, off the request path.
    flusher: Option<Worker>,
    /// Held through a flush, so `flush` returns only once everything counted before
    /// it, including what the flusher had in flight, is written. Holds the limit
    /// the last flush's statement went unanswered for, when the watchdog cut it.
    flushing: Mutex<Option<u64>>,
    /// The near caches, when configured (and caching is on).
    near: Option<Arc<NearCaches>>,
    /// Keeps the near caches coherent; stops when the engine is dropped.
    _poller: Option<Poller>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("pool", &self.pool.as_ref().map(Pool::state))
            .finish_non_exhaustive()
    }
}

/// Why migrations need the direct URL past a transaction pooler.
pub(crate) const MIGRATIONS_NEED: &str =
    "migrations run (they hold the schema's session advisory lock across transactions)";

/// How long start-up waits for the near caches' poller to be ready.
const NEAR_START_WAIT: Duration = Duration::from_secs(1);

impl Engine {
    /// Opens the pool (unless caching is disabled), starts the flusher and, unless
    /// turned off, runs pending migrations (under the migration timeout), or else,
    /// for one shard of several (`shard`), checks a connection out. In fail-open
    /// mode, or for a shard, a transient failure does not stop the start: migrations
    /// then run once the database answers, and [`was_down_at_start`] tells the
    /// cluster, which fails the start when every shard was down.
    ///
    /// [`was_down_at_start`]: Self::was_down_at_start
    ///
    /// # Errors
    /// [`Error::Connection`] when the database cannot be reached within the
    /// connection timeout (outside fail-open mode) or refuses the configuration;
    /// [`Error::Migration`] when migrations fail.
    pub(crate) fn start(
        config: CacheConfig,
        app_pool: Option<ConnectionPool>,
        shard: bool,
    ) -> Result<Arc<Self>> {
        let relaxed_writes = app_pool.is_some() && config.durability() == Durability::Relaxed;
        let (pool, plain) = match app_pool {
            _ if !config.enabled() => (None, Some(Plain::new(&config, app_pool))),
            Some(app_pool) => (Some(Pool::shared(app_pool, &config)?), None),
            None => (
                Some(Pool::new(&config, !config.fail_open() && !shard)?),
                None,
            ),
        };
        let near = pool
            .is_some()
            .then(|| NearCaches::new(&config).map(Arc::new))
            .flatten();
        // The poller keeps a session (its connection for good, the schema's session
        // lock around the triggers' check): past a transaction pooler, on the
        // direct URL, and without one the start fails saying so.
        let poller_config = match &near {
            Some(_) => Some(config.direct(
                "a near cache is configured (its poller keeps a session of its own on the server)",
            )?),
            None => None,
        };
        let poller = near.as_ref().zip(poller_config).and_then(|(near, poller_config)| {
            let kinds: Vec<CacheKind> = near.kinds().collect();
            // The poller's own watchdog (its connection is not the pool's): a poll a
            // frozen server never answers is cut, and the poller reconnects instead
            // of waiting, near caches off, for as long as the freeze lasts.
            let watchdog = Watchdog::start(no_answer_limit(&config));
            Poller::start(Arc::downgrade(near), Tables::new(config.schema()), move || {
                let connected = crate::pool::dedicated(&poller_config, watchdog.as_ref())
                    .and_then(|mut conn| {
                        watched(&mut conn, |conn| {
                            crate::migrations::ensure_near_triggers(
                                conn,
                                crate::migrations::SchemaLock::briefly(&poller_config),
                                kinds.iter().copied(),
                            )
                        })?;
                        Ok(conn)
                    });
                match connected {
                    Ok(connected) => Some(connected),
                    Err(error) => {
                        tracing::warn!(%error, "pgcache: near-cache poller cannot connect; near caches off");
                        None
                    }
                }
            })
        });
        let engine = Arc::new_cyclic(|weak: &Weak<Engine>| Engine {
            flusher: pool
                .is_some()
                .then(|| {
                    Worker::spawn(
                        "pgcache-flusher",
                        config.stats_flush_interval(),
                        weak.clone(),
                        Engine::background_flush,
                    )
                })
                .flatten(),
            counters: Counters::new(),
            tables: Tables::new(config.schema()),
            config,
            pool,
            plain,
            relaxed_writes,
            latency: LatencyWindow::default(),
            migrations_pending: AtomicBool::new(false),
            down_at_start: AtomicBool::new(false),
            skipped: SkippedWrites::default(),
            flushing: Mutex::new(None),
            near,
            _poller: poller,
        });
        let config = &engine.config;
        // A shard's pool is built without a check (it may be down): without
        // migrations, a checkout tells whether it answers.
        if engine.pool.is_some() && (config.run_migrations() || config.fail_open() || shard) {
            // Fail-open mode starts while the database is down, but not when it is
            // misconfigured: only a transient failure is let through.
            let started = if config.run_migrations() {
                engine.run_migrations().map(drop)
            } else {
                engine.connection().map(drop)
            };
            match started {
                Err(error) if (config.fail_open() || shard) && error.is_transient() => {
                    tracing::warn!(%error, database = %config.database_url(), "pgcache: database unavailable at start-up; its keys fail (or miss, failing open) until it answers");
                    engine
                        .migrations_pending
                        .store(config.run_migrations(), Ordering::Release);
                    engine.down_at_start.store(true, Ordering::Release);
                }
                other => other?,
            }
        }
        if let Some(near) = &engine.near {
            // Reads are kept in memory only once the poller has its baseline (its
            // connection, the triggers checked, one poll): a brief wait for it lets
            // a new manager's first reads count.
            if !engine.was_down_at_start() && !near.wait_ready(NEAR_START_WAIT) {
                tracing::debug!("pgcache: near-cache poller not ready at start-up; reads go to the database until it is");
            }
        }
        Ok(engine)
    }

    /// Whether the database did not answer at start-up (and start-up went on).
    pub(crate) fn was_down_at_start(&self) -> bool {
        self.down_at_start.load(Ordering::Acquire)
    }

    /// The near caches, if any cache has one.
    pub(crate) fn near(&self) -> Option<&NearCaches> {
        self.near.as_deref()
    }

    /// The cache's tables, schema-qualified.
    pub(crate) fn tables(&self) -> &Tables {
        &self.tables
    }

    pub(crate) fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// What this engine's pool holds now; `shard` names it.
    pub(crate) fn pool_status(&self, shard: &str) -> crate::pool::PoolStatus {
        match (&self.pool, &self.plain) {
            (Some(pool), _) => pool.status(shard),
            (None, Some(plain)) => plain.status(shard),
            (None, None) => unreachable!("an engine has a pool or, disabled, plain connections"),
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.pool.is_some()
    }

    fn pool(&self) -> Result<&Pool> {
        self.pool.as_ref().ok_or_else(disabled)
    }

    /// A pooled connection for the caller (see [`Pool::for_caller`]); with caching
    /// disabled, one of the application's pool or a plain one (see [`Plain`]).
    pub(crate) fn connection(&self) -> Result<PooledConnection> {
        match (&self.pool, &self.plain) {
            (None, Some(plain)) => plain.get(),
            _ => self.pool()?.for_caller(),
        }
    }

    /// A connection that has just answered a `SELECT 1`, for maintenance operations
    /// that run several statements on one connection.
    pub(crate) fn live_connection(&self) -> Result<PooledConnection> {
        self.pool()?.live()
    }

    /// Runs a maintenance operation (warmup, invalidation, clear, migrations): on a
    /// pooled connection, once more on a live one if the first was dead, like every
    /// cache operation; never failing open.
    pub(crate) fn maintain<T>(&self, op: impl Fn(&mut PgConnection) -> Result<T>) -> Result<T> {
        self.pool()?.run(|conn| {
            self.catch_up(conn, Settle::Everything)?;
            op(conn)
        })
    }

    /// Runs a maintenance operation that keeps a session on its connection (the
    /// schema's session advisory lock: migrations, partitioning): as
    /// [`maintain`](Self::maintain), or in transaction-pooler mode on a connection
    /// of its own to the direct URL (`needs` says why, in the error without one).
    ///
    /// # Errors
    /// [`Error::Config`] in transaction-pooler mode without a direct URL; `op`'s.
    pub(crate) fn in_session<T>(
        &self,
        needs: &str,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        if !self.config.sessionless() {
            return self.maintain(op);
        }
        self.pool()?;
        let mut conn = self.direct_connection(needs)?;
        op(&mut conn)
    }

    /// A connection for maintenance work that keeps state across statements outside
    /// a transaction (eviction's plan, a temporary table): [`live_connection`]'s,
    /// or in transaction-pooler mode one of its own to the direct URL (`needs`
    /// says why, in the error without one).
    ///
    /// [`live_connection`]: Self::live_connection
    ///
    /// # Errors
    /// [`Error::Config`] in transaction-pooler mode without a direct URL; a
    /// connection error.
    pub(crate) fn session_connection(&self, needs: &str) -> Result<SessionConnection> {
        if !self.config.sessionless() {
            return self.live_connection().map(SessionConnection::Pooled);
        }
        self.pool()?;
        self.direct_connection(needs).map(SessionConnection::Direct)
    }

    /// A connection of its own to the direct URL (transaction-pooler mode), with the
    /// session a pooled connection has without a pooler.
    fn direct_connection(&self, needs: &str) -> Result<PgConnection> {
        crate::pool::dedicated(&self.config.direct(needs)?, None)
    }

    /// Runs pending migrations into the configured schema (created if missing) and
    /// returns the versions applied.
    pub(crate) fn run_migrations(&self) -> Result<Vec<String>> {
        let applied = self.in_session(MIGRATIONS_NEED, |conn| {
            crate::migrations::migrate(conn, &self.config)
        })?;
        self.migrations_pending.store(false, Ordering::Release);
        Ok(applied)
    }

    /// Writes the pending counters now; they are kept for the next flush on failure.
    pub(crate) fn flush(&self) -> Result<()> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        let mut flushing = match self.flushing.try_lock() {
            Ok(flushing) => flushing,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // A flush in flight: once it ends, its counts are written or pending
                // again. If the server left it unanswered, it would leave this one
                // so too: fail now rather than make the caller wait twice.
                let flushing = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(waited_ms) = *flushing {
                    return Err(Error::Unresponsive { waited_ms });
                }
                flushing
            }
        };
        let batch = self.counters.take();
        if batch.is_empty() {
            *flushing = None;
            return Ok(());
        }
        let written = pool.run(|conn| {
            self.durable_as_configured(conn, |conn| Ok(batch.write(conn, &self.tables)?))
        });
        *flushing = match &written {
            Err(Error::Unresponsive { waited_ms }) => Some(*waited_ms),
            _ => None,
        };
        if let Err(error) = written {
            self.counters.restore(batch);
            return Err(error);
        }
        Ok(())
    }

    pub(crate) fn failed_open_count(&self) -> u64 {
        self.counters
            .snapshot()
            .caches
            .iter()
            .map(|c| c.fail_open_skips)
            .sum()
    }

    /// This process's operation counts since start.
    pub(crate) fn counter_snapshot(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    pub(crate) fn record_lookups(&self, kind: CacheKind, hits: u64, misses: u64) {
        self.counters.record_lookups(kind, hits, misses);
        metrics::lookups(kind, hits, misses);
    }

    pub(crate) fn record_sets(&self, kind: CacheKind, entries: u64) {
        self.counters.record_sets(kind, entries);
        metrics::sets(kind, entries);
    }

    pub(crate) fn record_deletes(&self, kind: CacheKind, keys: u64) {
        self.counters.record_deletes(kind, keys);
        metrics::deletes(kind, keys);
    }

    /// Runs one cache operation as the caller sees it: inside its tracing span
    /// ([`metrics::operation_span`]), counting an error it returns. `body` may record the
    /// span's `hit` and `rows`.
    pub(crate) fn observe<T>(
        &self,
        kind: CacheKind,
        op: Op,
        body: impl FnOnce(&tracing::Span) -> Result<T>,
    ) -> Result<T> {
        let span = metrics::operation_span(kind, op);
        let _entered = span.enter();
        let result = body(&span);
        if let Err(error) = &result {
            self.counters.record_error(kind);
            metrics::error(kind, op, error);
        }
        result
    }

    pub(crate) fn record_entry_hit(&self, kind: CacheKind, digest: KeyDigest) {
        if self.counters.record_entry_hit(kind, digest) {
            // Bound the memory held by pending hits, without making this get wait.
            if let Some(flusher) = &self.flusher {
                flusher.nudge();
            }
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(crate) fn latency(&self) -> &LatencyWindow {
        &self.latency
    }

    /// Runs a read: a miss (`miss`) when caching is disabled, or, in fail-open mode,
    /// when it fails transiently. `op` runs a second time, on a live connection, if
    /// the first connection was dead (see [`crate::pool`]), so it must be idempotent.
    pub(crate) fn read<T>(
        &self,
        kind: CacheKind,
        what: Op,
        miss: T,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.read_with(kind, what, || miss, op)
    }

    /// [`read`](Self::read) with a miss computed only when needed. While writes of
    /// `kind` skipped in fail-open mode wait for their replay, a miss without
    /// asking the database, which may still hold their old values (see
    /// [`crate::skipped`]).
    pub(crate) fn read_with<T>(
        &self,
        kind: CacheKind,
        what: Op,
        miss: impl FnOnce() -> T,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        if self.skipped.is_pending(kind) {
            self.nudge_replay();
            self.counters.record_fail_open(kind);
            metrics::fail_open(kind, what);
            tracing::debug!(cache = %kind, operation = what.name(), "pgcache: a miss while skipped writes wait for their replay");
            return Ok(miss());
        }
        self.run(kind, what, false, miss, op)
    }

    /// Runs a write: skipped (returning `skipped`) when caching is disabled, or, in
    /// fail-open mode, when it fails transiently; then `undo` says which keys may now
    /// be stale, to delete once the database answers. Retried like [`Self::read`].
    /// It runs after the replay of the writes of `kind` skipped before it (see
    /// [`crate::skipped`]), so that replay cannot delete what it writes.
    pub(crate) fn write<T>(
        &self,
        kind: CacheKind,
        what: Op,
        skipped: T,
        undo: impl FnOnce() -> Option<Skipped>,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.run(
            kind,
            what,
            true,
            || {
                if let Some(undo) = undo() {
                    self.skipped.remember(kind, undo);
                }
                skipped
            },
            op,
        )
    }

    /// Runs `op` (a write when `writes`: see [`Self::timed`]), answering
    /// `fallback` when caching is disabled or, in fail-open mode, on a transient
    /// failure: logged as a warning the first time since `kind` last answered, at
    /// `debug` level after that (an outage logs a few lines, not one per operation).
    fn run<T>(
        &self,
        kind: CacheKind,
        what: Op,
        writes: bool,
        fallback: impl FnOnce() -> T,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        match self.timed(kind, what, writes, op) {
            None => Ok(fallback()),
            Some(Err(error)) if self.config.fail_open() && error.is_transient() => {
                self.counters.record_fail_open(kind);
                metrics::fail_open(kind, what);
                if self.skipped.failed_open(kind) {
                    tracing::warn!(cache = %kind, operation = what.name(), %error, "pgcache: failing open until the database answers (further operations failing open are logged at debug level)");
                } else {
                    tracing::debug!(cache = %kind, operation = what.name(), %error, "pgcache: failing open");
                }
                Ok(fallback())
            }
            Some(result) => {
                if result.is_ok() {
                    self.skipped.answered(kind);
                    if self.skipped.any_pending() {
                        // The database answers: replay what other caches skipped.
                        self.nudge_replay();
                    }
                }
                result
            }
        }
    }

    /// Has the flusher replay skipped writes soon (at most every 100 ms).
    fn nudge_replay(&self) {
        if let Some(flusher) = &self.flusher {
            if self.skipped.nudge_due() {
                flusher.nudge();
            }
        }
    }

    /// Runs an operation whose answer cannot be made up (a counter's new value,
    /// whether `set_nx` stored): timed, counted and retried like the others, but an
    /// error, never a made-up answer, when caching is disabled or, in fail-open
    /// mode, when the database is down.
    pub(crate) fn exact<T>(
        &self,
        kind: CacheKind,
        what: Op,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.observe(kind, what, |_| {
            self.timed(kind, what, true, op)
                .unwrap_or_else(|| Err(disabled()))
        })
    }

    /// Runs `op` on the pool, recording its latency; `None` when caching is
    /// disabled. A write (`writes`) first settles `kind`'s skipped writes and runs
    /// with the configured durability ([`Self::durable_as_configured`]).
    fn timed<T>(
        &self,
        kind: CacheKind,
        what: Op,
        writes: bool,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Option<Result<T>> {
        let pool = self.pool.as_ref()?;
        let started = Instant::now();
        let settle = if writes {
            Settle::Cache(kind)
        } else {
            Settle::Nothing
        };
        let result = pool.run_from(started, |conn| {
            self.catch_up(conn, settle)?;
            if writes {
                self.durable_as_configured(conn, &op)
            } else {
                op(conn)
            }
        });
        // Pool wait included: it is part of what the caller waits for.
        let finished = Instant::now();
        let elapsed = finished - started;
        self.latency.record(finished, elapsed);
        metrics::duration(kind, what, elapsed);
        Some(result)
    }

    /// Runs a write of pgcache's own on `conn` with the configured durability: as it
    /// is on the cache's own pool (its sessions carry the setting), its statements
    /// marked for a relaxed commit on the application's with relaxed durability.
    fn durable_as_configured<T>(
        &self,
        conn: &mut PgConnection,
        op: impl FnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        if self.relaxed_writes {
            crate::relaxed::relaxed(conn, op)
        } else {
            op(conn)
        }
    }

    /// After an outage in fail-open mode, before anything else uses `conn`: runs
    /// the migrations start-up could not, and settles the skipped writes of the
    /// caches an operation is about to write (see [`SkippedWrites::settle`]). An
    /// atomic load or two when there is nothing to do.
    fn catch_up(&self, conn: &mut PgConnection, settle: Settle) -> Result<()> {
        if self.migrations_pending.load(Ordering::Acquire) {
            match self.config.sessionless() {
                false => crate::migrations::migrate(conn, &self.config)?,
                true => crate::migrations::migrate(
                    &mut self.direct_connection(MIGRATIONS_NEED)?,
                    &self.config,
                )?,
            };
            self.migrations_pending.store(false, Ordering::Release);
        }
        if self.skipped.any_pending() {
            let wait = self.config.statement_timeout();
            match settle {
                Settle::Nothing => {}
                Settle::Cache(kind) => {
                    // A whole cache to empty is the flusher's: have it start.
                    self.nudge_replay();
                    self.skipped.settle(kind, &self.tables, conn, wait, false)?;
                }
                Settle::Everything => {
                    for kind in CacheKind::ALL {
                        self.skipped.settle(kind, &self.tables, conn, wait, true)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The flusher thread's task: counters, and catching up once the database is
    /// back even if the application sends nothing meanwhile (replaying skipped
    /// writes, so requests do not have to).
    fn background_flush(self: &Arc<Self>) {
        if let Some(pool) = &self.pool {
            pool.release_parked();
        }
        let mut unavailable = false;
        if self.migrations_pending.load(Ordering::Acquire) || self.skipped.any_pending() {
            if let Some(pool) = &self.pool {
                let caught_up = pool.run(|conn| {
                    self.catch_up(conn, Settle::Nothing)?;
                    self.skipped.replay(&self.tables, conn)
                });
                if let Err(error) = caught_up {
                    self.skipped.replay_failed();
                    tracing::debug!(%error, "pgcache: database still unavailable");
                    unavailable = true;
                }
            }
        }
        match self.flush() {
            // Most likely the same cause, in a run a request may have nudged: not
            // logged again as a warning.
            Err(error) if unavailable => {
                tracing::debug!(%error, "pgcache: flushing hit counters failed; will retry");
            }
            Err(error) => {
                tracing::warn!(%error, "pgcache: flushing hit counters failed; will retry");
            }
            Ok(()) => {}
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            tracing::warn!(%error, "pgcache: final flush of hit counters failed");
        }
    }
}

/// A connection that keeps its session: see [`Engine::session_connection`].
pub(crate) enum SessionConnection {
    /// A pooled connection (no transaction pooler).
    Pooled(PooledConnection),
    /// One of its own, to the direct URL.
    Direct(PgConnection),
}

impl std::ops::Deref for SessionConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            SessionConnection::Pooled(conn) => conn,
            SessionConnection::Direct(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for SessionConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            SessionConnection::Pooled(conn) => conn,
            SessionConnection::Direct(conn) => conn,
        }
    }
}

/// Which caches' skipped writes an operation settles before it runs.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// None: a read (a miss while its cache has any), or the flusher's own replay.
    Nothing,
    /// The cache a write, delete or exact operation is about to change.
    Cache(CacheKind),
    /// Every cache, emptying a whole one too: a maintenance operation (clear,
    /// warmup, invalidation, migrations), which may take its time.
    Everything,
}

/// The error of an operation that needs the database while caching is disabled.
fn disabled() -> Error {
    Error::Connection("caching is disabled (ENABLE_CACHING=false), so there is no pool".into())
}
