//! [`CacheManager`]: the facade. Its whole public surface is in this file; each
//! method hands the work to the engine, a cache handle or an operation.

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use crate::background::Worker;
use crate::caches::{
    AudioChunkCache, EmbeddingCache, KvCache, LlmResponseCache, VectorSearchCache,
};
use crate::cluster::Cluster;
use crate::config::CacheConfig;
use crate::engine::Engine;
use crate::error::Result;
use crate::kind::CacheKind;
use crate::ops::{
    self, CacheStats, CleanupProgress, CleanupReport, HealthReport, HealthThresholds,
    InvalidationReport, Warmup, WarmupReport,
};
use crate::pool::{ConnectionPool, PooledConnection};

/// The entry point: owns the connection pool and the configuration, and hands out
/// one handle per cache table.
///
/// Cheap to clone (an `Arc`), `Send + Sync`: create one at start-up and share it.
/// With caching disabled (`ENABLE_CACHING=false`) no pool is created and no
/// connection is opened, but for [`connection`](CacheManager::connection).
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
    cluster: Arc<Cluster>,
    /// Dropped with the last clone, which stops the janitor threads.
    _janitors: Arc<Vec<Worker>>,
}

/// Compact and true: each shard's database (password hidden), the schema, and each
/// shard's pool as it is now (an application pool given to
/// [`with_pool`](CacheManager::with_pool) with its own size), e.g.
/// `CacheManager { databases: ["postgres://app:***@db/app"], schema: "pgcache",
/// pools: ["default: 1 open of 8 (the application's): 1 idle, 0 parked, 0 in use;
/// 0 waiting"], .. }`.
impl fmt::Debug for CacheManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.cluster.config();
        // Each shard's database, as its `Display` shows it: password hidden.
        let databases: Vec<String> = match config.shards() {
            [] => vec![config.database_url().to_string()],
            shards => shards
                .iter()
                .map(|s| format!("{}: {}", s.name(), s.database_url()))
                .collect(),
        };
        let pools: Vec<String> = self
            .cluster
            .pool_status()
            .iter()
            .map(|pool| format!("{}: {pool}", pool.shard))
            .collect();
        f.debug_struct("CacheManager")
            .field("databases", &databases)
            .field("schema", &config.schema())
            .field("pools", &pools)
            .finish_non_exhaustive()
    }
}

/// Start-up, configuration and connections.
impl CacheManager {
    /// Opens the pool (unless caching is disabled) and, unless turned off in the
    /// configuration, runs pending migrations. With a near cache, waits (at most
    /// 1 s) until its poller is current, so the first reads are kept in memory.
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection) when the database cannot be reached within the
    /// connection timeout; [`Error::Migration`](crate::Error::Migration) when migrations fail.
    pub fn new(config: CacheConfig) -> Result<Self> {
        Self::start(config, None)
    }

    /// A manager over a connection pool the application already has, instead of a
    /// pool of its own (the configuration's pool settings and database URL are then
    /// not used for it; the near caches' poller still opens its one connection from
    /// the URL).
    ///
    /// Nothing changes on the application's connections: every cache statement names
    /// its table with the cache's schema ([`CacheConfig::schema`], default
    /// `pgcache`), so no search path is touched; the application's statement
    /// timeout, application name and plan cache mode apply to cache statements, the
    /// cache's own are not set, and the watchdog that cuts statements a frozen server
    /// never answers does not watch these connections. Connections the cache checks
    /// out count against the application's pool size. With
    /// [`Durability::Relaxed`](crate::Durability::Relaxed), each write of the cache's
    /// own commits without waiting for the disk through a marker its statement
    /// carries (a trigger turns `synchronous_commit` off for that statement's
    /// transaction alone), so the application's sessions keep their setting.
    ///
    /// ```no_run
    /// use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel::PgConnection;
    /// use pgcache::{Cache, CacheConfig, CacheManager};
    ///
    /// let app_pool = Pool::builder()
    ///     .max_size(10)
    ///     .build(ConnectionManager::<PgConnection>::new("postgres://postgres@localhost/app"))?;
    /// let cache = CacheManager::with_pool(app_pool.clone(), CacheConfig::from_env()?)?;
    /// cache.kv().set("greeting", &serde_json::json!("hello"))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`CacheManager::new`](crate::CacheManager::new).
    pub fn with_pool(pool: ConnectionPool, config: CacheConfig) -> Result<Self> {
        Self::start(config, Some(pool))
    }

    fn start(config: CacheConfig, pool: Option<ConnectionPool>) -> Result<Self> {
        let cluster = Cluster::start(config, pool)?;
        // One janitor per shard: a shard that is down holds up only its own.
        let janitors = cluster
            .config()
            .janitor_interval()
            .filter(|_| cluster.front().is_enabled())
            .map(|interval| {
                cluster
                    .shards()
                    .filter_map(|(_, engine)| {
                        Worker::spawn(
                            "pgcache-janitor",
                            interval,
                            Arc::downgrade(engine),
                            |engine| ops::janitor::run(engine),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(CacheManager {
            cluster: Arc::new(cluster),
            _janitors: Arc::new(janitors),
        })
    }

    /// [`CacheManager::new`](crate::CacheManager::new) with [`CacheConfig::from_env`].
    ///
    /// # Errors
    /// As [`CacheConfig::from_env`] and [`CacheManager::new`](crate::CacheManager::new).
    pub fn from_env() -> Result<Self> {
        Self::new(CacheConfig::from_env()?)
    }

    /// The configuration this manager runs with.
    pub fn config(&self) -> &CacheConfig {
        self.cluster.config()
    }

    /// Whether caching is enabled.
    pub fn is_enabled(&self) -> bool {
        self.cluster.front().is_enabled()
    }

    /// The shards and which one holds a key: with one database, one shard named
    /// [`DEFAULT_SHARD`](crate::DEFAULT_SHARD). A key/value key's digest is
    /// [`KvCache::key_digest`].
    ///
    /// ```no_run
    /// let cache = pgcache::CacheManager::from_env()?;
    /// let digest = cache.kv().key_digest("user:42")?;
    /// println!("user:42 is on shard {}", cache.shard_map().name_of(&digest));
    /// # Ok::<(), pgcache::Error>(())
    /// ```
    pub fn shard_map(&self) -> &crate::ShardMap {
        self.cluster.map()
    }

    /// Checks a connection out of the cache's pool (search path and session settings
    /// applied), for running your own transaction around cache writes. A connection
    /// on which a statement failed (yours included) is probed before it is handed out
    /// again, and after any connection was found dead every pooled one is, so a
    /// connection that died in the pool (server restart, killed backend) is not
    /// handed out twice.
    ///
    /// With several shards, use [`shard_connection`](Self::shard_connection): a
    /// connection reaches one shard.
    ///
    /// With caching disabled there is no cache pool, but a connection all the same,
    /// so code around `*_in` calls (no-ops then) runs unchanged: with
    /// [`with_pool`](Self::with_pool), one of the application's pool, as it is;
    /// otherwise a plain connection to the configured URL (the server's default
    /// session), from a pool of the configured size built at the first call and
    /// keeping no connection idle.
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection) when no connection is free within
    /// the connection timeout; [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// with several shards.
    pub fn connection(&self) -> Result<PooledConnection> {
        match self.cluster.single() {
            Some(engine) => engine.connection(),
            None => Err(crate::Error::InvalidInput {
                what: "connection",
                reason: format!(
                    "the cache has {} shards: take `shard_connection(name)` of the shard \
                     holding your keys (`shard_map().name_of(digest)`)",
                    self.cluster.map().len()
                ),
            }),
        }
    }

    /// A connection of the shard named `name`, as [`connection`](Self::connection)
    /// gives one of a single database: for the `*_in` methods of the keys that shard
    /// holds (a key written on another shard's connection would never be read).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for an unknown shard; as
    /// [`connection`](Self::connection).
    pub fn shard_connection(&self, name: &str) -> Result<PooledConnection> {
        self.cluster.engine_named(name)?.connection()
    }

    /// Runs pending migrations into the configured schema (created if missing) and
    /// returns the versions applied. Safe to run from many processes at once.
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection) or [`Error::Migration`](crate::Error::Migration).
    pub fn run_migrations(&self) -> Result<Vec<String>> {
        let applied = self.cluster.all(Engine::run_migrations)?;
        // Every shard runs the same migrations: the versions any of them applied.
        let mut versions: Vec<String> = applied.into_iter().flatten().collect();
        versions.sort();
        versions.dedup();
        Ok(versions)
    }

    /// Makes every cache table hash-partitioned on its key into `partitions` tables
    /// (`<table>_p0` ...), moving the rows over: for tables of many millions of rows,
    /// whose indexes, vacuum and cleanup then work on one partition at a time. Each
    /// table converts in one transaction, during which its reads and writes wait;
    /// run it at migrate time (`pgcache migrate --partitions 16`). A table already
    /// partitioned into that many is left alone, so it is safe to run again.
    /// Privileges granted on a table are not carried over.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for 0 or more than
    /// [`MAX_PARTITIONS`](crate::MAX_PARTITIONS) partitions or a table already
    /// partitioned into another number; [`Error::Connection`](crate::Error::Connection)
    /// or a database error, which leaves the table being converted as it was.
    pub fn partition_tables(&self, partitions: u32) -> Result<Vec<crate::Partitioning>> {
        // Before any shard is touched (even by catching up on its migrations).
        crate::partitions::check_count(partitions)?;
        let done = self.cluster.all(|engine| {
            engine.in_session(crate::engine::MIGRATIONS_NEED, |conn| {
                let lock = crate::migrations::SchemaLock::of(engine.config());
                crate::partitions::partition(conn, lock, partitions)
            })
        })?;
        // Every shard's tables end the same: the first shard's account.
        Ok(done.into_iter().next().unwrap_or_default())
    }

    /// Makes every cache table `LOGGED` (durable, replicated) or `UNLOGGED` (faster
    /// writes; emptied after a crash and not replicated).
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection), or a database error (e.g. missing privileges).
    pub fn set_tables_logged(&self, logged: bool) -> Result<()> {
        self.cluster
            .all(|engine| {
                engine.maintain(|conn| crate::migrations::set_logged(conn, engine.tables(), logged))
            })
            .map(drop)
    }
}

/// The caches, one handle per table.
impl CacheManager {
    /// This process's near-cache figures, one entry per cache with a near cache
    /// (none when no near cache is configured). Costs no query.
    pub fn near_cache_stats(&self) -> Vec<crate::NearCacheStats> {
        self.cluster.near_cache_stats()
    }

    /// The key/value cache, holding `serde_json::Value`s; see
    /// [`KvCache::typed`] for a handle on your own type.
    pub fn kv(&self) -> KvCache<'_> {
        KvCache::new(&self.cluster)
    }

    /// The embedding cache (query text + model -> vector; default TTL medium).
    pub fn embedding(&self) -> EmbeddingCache<'_> {
        EmbeddingCache::new(&self.cluster)
    }

    /// The vector-search results cache (per user; default TTL short).
    pub fn vector_search(&self) -> VectorSearchCache<'_> {
        VectorSearchCache::new(&self.cluster)
    }

    /// The LLM response cache (hit counting, [`top`](LlmResponseCache::top); default
    /// TTL medium).
    pub fn llm_response(&self) -> LlmResponseCache<'_> {
        LlmResponseCache::new(&self.cluster)
    }

    /// The TTS audio chunk cache (hit counting, statistics, LRU eviction; default TTL
    /// short).
    pub fn audio_chunk(&self) -> AudioChunkCache<'_> {
        AudioChunkCache::new(&self.cluster)
    }

    /// A memo: a function's results in the key/value cache under `"{name}:{key}"`,
    /// each kept for `ttl` (feature `cached`). Put a version in the name
    /// (`user_name:v1`) and change it when the result's type changes.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a name that is not a
    /// valid kv key or a bad TTL.
    #[cfg(feature = "cached")]
    pub fn memo<K, V>(&self, name: &str, ttl: std::time::Duration) -> Result<crate::Memo<K, V>> {
        crate::Memo::new(
            Arc::clone(&self.cluster),
            Arc::clone(&self._janitors),
            name,
            ttl,
        )
    }
}

/// Operations across the caches: cleanup, statistics, health, warmup, invalidation.
impl CacheManager {
    /// Deletes every expired row (`expires_at <= now()`, database clock) from every
    /// cache table, and expired single-flight leases, in batches of
    /// [`CLEANUP_BATCH_SIZE`](crate::CLEANUP_BATCH_SIZE) rows per statement. Rows are claimed with
    /// `FOR UPDATE SKIP LOCKED`, so cleanups running at the same time (cron on two
    /// hosts, the janitor) share the work and never wait on or deadlock with each
    /// other.
    ///
    /// Then it enforces the configured size bounds
    /// ([`CacheConfigBuilder::max_entries`](crate::CacheConfigBuilder::max_entries),
    /// [`max_bytes`](crate::CacheConfigBuilder::max_bytes)): a cache over a bound
    /// loses its least recently used (LLM responses, audio) or oldest written (the
    /// others) entries until it is at the
    /// [low watermark](crate::CacheConfigBuilder::eviction_low_watermark) of the
    /// bound, in batches as above. This manager's pending hits are flushed first so
    /// recent reads count as recent. Only bounded caches are measured (a full scan
    /// each); without bounds, live entries are never touched.
    ///
    /// The run is recorded in `cache_cleanup_runs` (success or failure), which
    /// [`health`](CacheManager::health) reads.
    ///
    /// ```no_run
    /// let cache = pgcache::CacheManager::from_env()?;
    /// let report = cache.cleanup()?;
    /// println!("{report}");
    /// # Ok::<(), pgcache::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection) (also when caching is
    /// disabled), [`Error::MissingTable`](crate::Error::MissingTable) before
    /// migrations, or a database error. Batches already deleted stay deleted.
    pub fn cleanup(&self) -> Result<CleanupReport> {
        ops::cleanup::cleanup(&self.cluster)
    }

    /// [`cleanup`](Self::cleanup), calling `progress` when each table starts and after
    /// each batch (for a progress bar).
    ///
    /// # Errors
    /// As [`cleanup`](Self::cleanup).
    pub fn cleanup_with_progress(
        &self,
        progress: impl FnMut(&CleanupProgress),
    ) -> Result<CleanupReport> {
        ops::cleanup::cleanup_with_progress(&self.cluster, progress)
    }

    /// Deletes every entry of one cache, or of all caches (`None`), in one
    /// transaction; returns the rows removed per cache. Hit and miss counters are
    /// kept.
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection),
    /// [`Error::MissingTable`](crate::Error::MissingTable) or a database error;
    /// nothing is deleted then.
    pub fn clear(&self, cache: Option<CacheKind>) -> Result<Vec<(CacheKind, u64)>> {
        ops::cleanup::clear(&self.cluster, cache)
    }

    /// Gathers [`CacheStats`]: entries (active and expired), size on disk, hits,
    /// misses and hit rate per cache, the most hit LLM responses and audio chunks.
    ///
    /// Flushes this manager's hit counters first so its own lookups are included;
    /// other processes' lookups appear once they have flushed (every
    /// `stats_flush_interval`).
    ///
    /// This is a maintenance call: it counts every table's rows (a scan of each
    /// table), so call it from a dashboard or `pgcache stats`, not on a request path.
    ///
    /// ```no_run
    /// let cache = pgcache::CacheManager::from_env()?;
    /// println!("{}", cache.stats()?);
    /// # Ok::<(), pgcache::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection),
    /// [`Error::MissingTable`](crate::Error::MissingTable) or a database error.
    pub fn stats(&self) -> Result<CacheStats> {
        ops::stats::stats(&self.cluster)
    }

    /// Writes the in-memory hit and miss counters to the database now (this also
    /// happens every `stats_flush_interval` during use and when the last clone of the
    /// manager is dropped).
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection) or a database error; the counts are kept for the next
    /// flush.
    pub fn flush_stats(&self) -> Result<()> {
        self.cluster.all(Engine::flush).map(drop)
    }

    /// How many operations fail-open mode has turned into misses or skipped writes.
    pub fn failed_open_count(&self) -> u64 {
        self.cluster
            .shards()
            .map(|(_, engine)| engine.failed_open_count())
            .sum()
    }

    /// Every shard's connection pool now, in the shards' order: connections open,
    /// idle, parked for their thread's next operation, and the cache's checkouts
    /// waiting. Read from memory, cheap enough to poll; [`stats`](Self::stats)
    /// includes it. "Connection budget" in docs/operations.md says what else a manager
    /// opens.
    ///
    /// ```no_run
    /// let cache = pgcache::CacheManager::from_env()?;
    /// for pool in cache.pool_status() {
    ///     println!("{}: {pool}", pool.shard);
    /// }
    /// # Ok::<(), pgcache::Error>(())
    /// ```
    pub fn pool_status(&self) -> Vec<crate::PoolStatus> {
        self.cluster.pool_status()
    }

    /// This process's operation counts per cache since start (hits, misses, sets,
    /// deletes, errors, fail-open skips), read from memory: no database round trip,
    /// cheap enough to poll. [`stats`](Self::stats) is the database-wide view.
    ///
    /// ```no_run
    /// # fn main() -> pgcache::Result<()> {
    /// let cache = pgcache::CacheManager::from_env()?;
    /// let kv = *cache.counters().cache(pgcache::CacheKind::Kv);
    /// println!("kv: {} hits, {} misses, {} errors", kv.hits, kv.misses, kv.errors);
    /// # Ok(())
    /// # }
    /// ```
    pub fn counters(&self) -> crate::CounterSnapshot {
        crate::CounterSnapshot::sum(
            self.cluster
                .shards()
                .map(|(_, engine)| engine.counter_snapshot()),
        )
    }

    /// Evaluates the alert thresholds: hit rate over all caches, size against the
    /// budget, p95 query time of this process over the last 5 minutes, and the last
    /// cleanup (failed, or
    /// overdue). Does not count rows, so it is cheap enough for a monitor polling
    /// every minute.
    ///
    /// Query time is measured in this process (every cache operation through this
    /// manager and its clones), so call `health` inside the service; a separate
    /// process such as `pgcache health` has too few samples and skips that check.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use pgcache::HealthThresholds;
    ///
    /// let cache = pgcache::CacheManager::from_env()?;
    /// let report = cache.health(&HealthThresholds::new().size_budget_bytes(10 << 30))?;
    /// if !report.is_healthy() {
    ///     eprintln!("{report}");
    /// }
    /// # Ok::<(), pgcache::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Connection`](crate::Error::Connection),
    /// [`Error::MissingTable`](crate::Error::MissingTable) or a database error.
    pub fn health(&self, thresholds: &HealthThresholds) -> Result<HealthReport> {
        ops::health::health(&self.cluster, thresholds)
    }

    /// Stores every entry of `warmup` (cache warming, e.g. at deploy time): everything is
    /// validated first, then written with one batched statement per table in one
    /// transaction. A bad item rejects the whole warmup with an error naming it
    /// (`llm_responses[3]: invalid prompt: ...`) and nothing is stored. Like
    /// invalidation, this never fails open. With caching disabled the entries are
    /// validated and nothing is stored.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming the first bad item (or `ttl_secs`);
    /// [`Error::WarmupTimeout`](crate::Error::WarmupTimeout) when a statement ran past the
    /// warmup's statement timeout (`Warmup::statement_timeout_ms`, by default the
    /// connections' own); a connection or database error, after which nothing is
    /// stored.
    pub fn warmup(&self, warmup: &Warmup) -> Result<WarmupReport> {
        ops::warmup::warmup(&self.cluster, warmup)
    }

    /// Deletes every cache row that belongs to `user`: their vector searches and the
    /// embeddings, LLM responses and audio chunks owned by them. One indexed delete
    /// per table, all in one transaction. Unlike reads and writes, this never fails
    /// open: forgetting a user must not be skipped silently. With caching disabled
    /// there is nothing to delete.
    ///
    /// # Errors
    /// A connection or database error; then nothing was deleted.
    pub fn invalidate_user(&self, user: Uuid) -> Result<InvalidationReport> {
        ops::invalidation::invalidate_user(&self.cluster, user)
    }

    /// Deletes every cached embedding of `model` (a retired embedding model); returns
    /// the rows removed. Never fails open, like [`invalidate_user`](Self::invalidate_user).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for an empty model or one
    /// with a NUL character; a connection or database error.
    pub fn invalidate_model(&self, model: &str) -> Result<u64> {
        ops::invalidation::invalidate_model(&self.cluster, model)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use diesel::connection::SimpleConnection;
    use diesel::{Connection, PgConnection};
    use serde_json::json;

    use super::*;
    use crate::config::NearCache;
    use crate::Cache;

    /// A schema of its own on the local database, dropped afterwards.
    struct Schema(String);

    impl Schema {
        fn new() -> Self {
            Schema(format!("pgcache_test_{}", Uuid::new_v4().simple()))
        }

        fn url() -> String {
            std::env::var("DATABASE_URL").unwrap_or_else(|_| crate::DEFAULT_DATABASE_URL.to_owned())
        }

        /// Runs `sql` on a plain connection (another program) in this schema.
        fn exec(&self, sql: &str) {
            let mut conn = PgConnection::establish(&Self::url()).expect("connect");
            conn.batch_execute(&format!("SET search_path TO \"{}\"; {sql}", self.0))
                .expect("sql runs");
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            if let Ok(mut conn) = PgConnection::establish(&Self::url()) {
                let _ =
                    conn.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0));
            }
        }
    }

    /// Waits (at most 10 s) for `done`.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn kv_near_stats(cache: &CacheManager) -> crate::NearCacheStats {
        cache
            .near_cache_stats()
            .into_iter()
            .find(|stats| stats.cache == CacheKind::Kv)
            .expect("a kv near cache")
    }

    #[test]
    fn a_reader_paused_between_its_select_and_its_fill_keeps_nothing_an_invalidation_replaced() {
        paused_reader_keeps_nothing_stale(|cache| cache.kv().get("k").unwrap());
    }

    #[test]
    fn a_batch_reader_paused_before_its_fill_keeps_nothing_an_invalidation_replaced() {
        paused_reader_keeps_nothing_stale(|cache| {
            let mut found = cache.kv().get_many(&["k", "missing"]).unwrap();
            assert_eq!(found.pop(), Some(None));
            found.pop().unwrap()
        });
    }

    /// `read` (of key `k`) is paused after its `SELECT` while another program
    /// replaces `k` and this process's poller learns of it; then it goes on.
    fn paused_reader_keeps_nothing_stale(
        read: impl FnOnce(&CacheManager) -> Option<serde_json::Value> + Send,
    ) {
        let schema = Schema::new();
        let cache = CacheManager::new(
            CacheConfig::builder()
                .database_url(Schema::url())
                .schema(&schema.0)
                .near_cache(CacheKind::Kv, Some(NearCache::new()))
                .build()
                .unwrap(),
        )
        .unwrap();
        cache.kv().set("k", &json!("old")).unwrap();
        wait_for("a first poll", || {
            kv_near_stats(&cache).poll_lag_ms.is_some()
        });
        let near = cache.cluster.front().near().expect("configured");
        let (paused, reader_paused) = mpsc::channel();
        let (resume, resumed) = mpsc::channel::<()>();
        let armed = AtomicBool::new(true);
        near.set_before_insert(Some(Box::new(move || {
            if armed.swap(false, Ordering::SeqCst) {
                paused.send(()).unwrap();
                resumed.recv().unwrap();
            }
        })));
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| read(&cache));
            reader_paused
                .recv_timeout(Duration::from_secs(10))
                .expect("the reader reaches its fill");
            // The reader holds "old" from its SELECT. Another program replaces it,
            // and this process's poller learns of it before the fill goes on.
            let before = kv_near_stats(&cache).invalidations;
            schema.exec("UPDATE cache_entries SET value = '\"new\"' WHERE key = 'k'");
            wait_for("the invalidation", || {
                kv_near_stats(&cache).invalidations > before
            });
            resume.send(()).unwrap();
            // Read before the write committed: the old value is its right answer.
            assert_eq!(reader.join().unwrap(), Some(json!("old")));
        });
        near.set_before_insert(None);
        let hits = kv_near_stats(&cache).hits;
        assert_eq!(cache.kv().get("k").unwrap(), Some(json!("new")));
        assert_eq!(kv_near_stats(&cache).hits, hits, "not from memory");
    }
}
