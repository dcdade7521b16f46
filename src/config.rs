//! Configuration: from code with [`CacheConfig::builder`], or from the environment with
//! [`CacheConfig::from_env`].

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use crate::database_url::DatabaseUrl;
use crate::error::{Error, Result};
use crate::expiry::{check_ttl, TtlPresets};
use crate::kind::CacheKind;

/// The URL used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/postgres";

/// The schema pgcache keeps its tables and its migration history in unless
/// configured otherwise: its own, so that an application's search path and its
/// `__diesel_schema_migrations` are never touched.
pub const DEFAULT_SCHEMA: &str = "pgcache";

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

impl Durability {
    fn parse(setting: &str, value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "full" => Ok(Durability::Full),
            "relaxed" => Ok(Durability::Relaxed),
            _ => Err(Error::config(
                setting,
                value,
                "expected `full` or `relaxed`",
            )),
        }
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
    /// [direct URL](CacheConfigBuilder::direct_url).
    Transaction,
}

impl Pooler {
    fn parse(setting: &str, value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "none" | "session" => Ok(Pooler::None),
            "transaction" => Ok(Pooler::Transaction),
            _ => Err(Error::config(
                setting,
                value,
                "expected `none` (or `session`) or `transaction`",
            )),
        }
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
/// [`CacheConfigBuilder::near_cache`] and docs/design/near-cache.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct NearCache {
    max_bytes: u64,
    max_age: Duration,
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

/// Default [`CacheConfigBuilder::migration_timeout`]: 10 minutes, for moving tables
/// of many millions of rows into partitions.
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// Default staleness bound of the near caches: 100 ms.
pub const DEFAULT_NEAR_CACHE_STALENESS: Duration = Duration::from_millis(100);

/// Everything a [`CacheManager`](crate::CacheManager) needs to know.
///
/// Build one with [`CacheConfig::builder`] or read it with [`CacheConfig::from_env`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub(crate) database_url: DatabaseUrl,
    pub(crate) shards: Vec<Shard>,
    /// The shard this configuration is of ([`DEFAULT_SHARD`] for one database): a
    /// label of its metrics and logs.
    ///
    /// [`DEFAULT_SHARD`]: crate::DEFAULT_SHARD
    pub(crate) shard_name: String,
    pub(crate) enabled: bool,
    pub(crate) ttl: TtlPresets,
    pub(crate) pool: PoolSettings,
    pub(crate) schema: String,
    pub(crate) run_migrations: bool,
    pub(crate) durability: Durability,
    pub(crate) statement_timeout: Duration,
    pub(crate) migration_timeout: Duration,
    pub(crate) application_name: String,
    pub(crate) fail_open: bool,
    pub(crate) stats_flush_interval: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) compute_wait_timeout: Duration,
    pub(crate) janitor_interval: Option<Duration>,
    pub(crate) size_bounds: [SizeBounds; CacheKind::COUNT],
    pub(crate) eviction_low_watermark: f64,
    pub(crate) near_caches: [Option<NearCache>; CacheKind::COUNT],
    pub(crate) near_cache_staleness: Duration,
    pub(crate) pooler: Pooler,
    /// The server itself, past the pooler, for what needs a session of its own.
    pub(crate) direct_url: Option<DatabaseUrl>,
}

impl CacheConfig {
    /// Every default (see each setter of the builder).
    fn defaults() -> Self {
        CacheConfig {
            database_url: DatabaseUrl::parse(DEFAULT_DATABASE_URL)
                .expect("the default URL is valid"),
            shards: Vec::new(),
            shard_name: crate::shards::DEFAULT_SHARD.to_owned(),
            enabled: true,
            ttl: TtlPresets::default(),
            pool: PoolSettings::default(),
            schema: DEFAULT_SCHEMA.to_owned(),
            run_migrations: true,
            durability: Durability::Full,
            statement_timeout: Duration::from_secs(5),
            migration_timeout: DEFAULT_MIGRATION_TIMEOUT,
            application_name: "pgcache".to_owned(),
            fail_open: false,
            stats_flush_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
            compute_wait_timeout: Duration::from_secs(60),
            janitor_interval: None,
            size_bounds: [SizeBounds::NONE; CacheKind::COUNT],
            eviction_low_watermark: DEFAULT_EVICTION_LOW_WATERMARK,
            near_caches: [None; CacheKind::COUNT],
            near_cache_staleness: DEFAULT_NEAR_CACHE_STALENESS,
            pooler: Pooler::None,
            direct_url: None,
        }
    }
}

impl CacheConfig {
    /// Starts a builder with every default (see each setter).
    pub fn builder() -> CacheConfigBuilder {
        CacheConfigBuilder::default()
    }

    /// Reads the configuration from the process environment. See [`Self::from_vars`]
    /// for the variables.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first malformed variable and its value.
    pub fn from_env() -> Result<Self> {
        CacheConfigBuilder::from_env()?.build()
    }

    /// Reads the configuration from `(name, value)` pairs, as [`Self::from_env`] does
    /// from the environment. Unset names keep their defaults; unknown names are
    /// ignored, with a `tracing` warning for an unknown `PGCACHE_*` name (naming the
    /// closest known one), which is most likely a misspelling.
    ///
    /// | variable | default | meaning |
    /// |---|---|---|
    /// | `DATABASE_URL` | `postgres://postgres@localhost:5432/postgres` | server: a URL or `key=value` pairs |
    /// | `PGCACHE_SHARDS` | (one database, `DATABASE_URL`) | `name=url,name=url,...`: spread the cache over these databases |
    /// | `ENABLE_CACHING` | `true` | `false`: every get misses, every set is a no-op |
    /// | `CACHE_TTL_SHORT` / `_MEDIUM` / `_LONG` / `_WEEK` | 300 / 3600 / 86400 / 604800 | TTL presets, seconds |
    /// | `PGCACHE_POOL_MAX_SIZE` | 20 | pool size |
    /// | `PGCACHE_POOL_MIN_IDLE` | 0 | idle connections kept |
    /// | `PGCACHE_POOL_IDLE_TIMEOUT_SECS` | 30 | idle connection lifetime (after up to 1 s parked for its thread's next operation) |
    /// | `PGCACHE_POOL_CONNECTION_TIMEOUT_MS` | 2000 | wait for a connection |
    /// | `PGCACHE_STATEMENT_TIMEOUT_MS` | 5000 | per-statement limit on cache connections |
    /// | `PGCACHE_MIGRATION_TIMEOUT_MS` | 600000 | per-statement limit of migrations and partitioning, and of waiting for the schema's migration lock |
    /// | `PGCACHE_SCHEMA` | `pgcache` | schema holding the cache tables and their migration history |
    /// | `PGCACHE_RUN_MIGRATIONS` | `true` | run migrations at start-up |
    /// | `PGCACHE_DURABILITY` | `full` | `full` or `relaxed` |
    /// | `PGCACHE_FAIL_OPEN` | `false` | transient read errors become misses |
    /// | `PGCACHE_STATS_FLUSH_MS` | 1000 | how often a background thread flushes hit/miss counters |
    /// | `PGCACHE_LEASE_TTL_MS` | 30000 | single flight: a dead computer's lease lapses after this |
    /// | `PGCACHE_COMPUTE_WAIT_MS` | 60000 | single flight: longest wait for another caller's computation |
    /// | `PGCACHE_JANITOR_INTERVAL_SECS` | 0 (off) | run cleanup in the background this often |
    /// | `PGCACHE_<CACHE>_MAX_ENTRIES` | 0 (no bound) | cleanup evicts past this many entries |
    /// | `PGCACHE_<CACHE>_MAX_BYTES` | 0 (no bound) | cleanup evicts past this many payload bytes |
    /// | `PGCACHE_EVICTION_LOW_WATERMARK` | 0.8 | eviction goes down to this fraction of a bound |
    /// | `PGCACHE_<CACHE>_NEAR_CACHE_BYTES` | (no near cache) | a near cache of this many bytes (either variable turns it on) |
    /// | `PGCACHE_<CACHE>_NEAR_CACHE_MAX_AGE_MS` | 60000 | longest local life of a near-cache entry |
    /// | `PGCACHE_NEAR_CACHE_STALENESS_MS` | 100 | the near caches' staleness bound |
    /// | `PGCACHE_POOLER` | `none` | `transaction`: `DATABASE_URL` goes through a transaction pooler (PgBouncer); no session state on its connections |
    /// | `PGCACHE_DIRECT_URL` | (none) | with a transaction pooler: the server itself, for migrations and the near-cache poller |
    ///
    /// `<CACHE>` is `KV`, `EMBEDDING`, `VECTOR_SEARCH`, `LLM_RESPONSE` or
    /// `AUDIO_CHUNK`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first malformed variable and its value.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        CacheConfigBuilder::from_vars(vars)?.build()
    }

    /// The database URL (its `Display` hides the password). Not used when
    /// [`shards`](Self::shards) are configured.
    pub fn database_url(&self) -> &DatabaseUrl {
        &self.database_url
    }

    /// The shards the cache is spread over, in the order given; empty for one
    /// database ([`database_url`](Self::database_url)).
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// This configuration for one shard's engine: its database, no shards, and its
    /// share of every size bound (keys spread evenly over the shards).
    pub(crate) fn for_shard(&self, shard: &Shard) -> CacheConfig {
        let shards = self.shards.len().max(1) as u64;
        CacheConfig {
            database_url: shard.database_url.clone(),
            shards: Vec::new(),
            shard_name: shard.name.clone(),
            size_bounds: self.size_bounds.map(|b| b.share(shards)),
            // The direct URL is one server's: none is known for a shard.
            direct_url: None,
            ..self.clone()
        }
    }

    /// Whether caching is on. When off, no connection is ever opened.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The TTL presets.
    pub fn ttl(&self) -> TtlPresets {
        self.ttl
    }

    /// The pool settings.
    pub fn pool(&self) -> PoolSettings {
        self.pool
    }

    /// The schema holding the cache tables and pgcache's own migration history.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Whether [`CacheManager::new`](crate::CacheManager::new) runs pending migrations.
    pub fn run_migrations(&self) -> bool {
        self.run_migrations
    }

    /// The durability mode of the cache's connections.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The `statement_timeout` set on every cache connection.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// The `statement_timeout` of migrations and partitioning (see
    /// [`CacheConfigBuilder::migration_timeout`]).
    pub fn migration_timeout(&self) -> Duration {
        self.migration_timeout
    }

    /// The `application_name` of every cache connection.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// Whether transient failures turn reads into misses and skip writes.
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// How often in-memory hit and miss counters are written to the database.
    pub fn stats_flush_interval(&self) -> Duration {
        self.stats_flush_interval
    }

    /// How long a single-flight lease lasts: if the caller computing a missing entry
    /// dies, others take over after this.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// How long `get_or_compute` waits for another caller's computation of the same
    /// key before giving up with [`Error::ComputeTimeout`].
    pub fn compute_wait_timeout(&self) -> Duration {
        self.compute_wait_timeout
    }

    /// How often the background janitor runs
    /// [`cleanup`](crate::CacheManager::cleanup); `None` when it is off.
    pub fn janitor_interval(&self) -> Option<Duration> {
        self.janitor_interval
    }

    /// The size bounds [`cleanup`](crate::CacheManager::cleanup) enforces on `cache`.
    pub fn size_bounds(&self, cache: CacheKind) -> SizeBounds {
        self.size_bounds[cache.index()]
    }

    /// The fraction of a bound eviction brings an over-bound cache down to.
    pub fn eviction_low_watermark(&self) -> f64 {
        self.eviction_low_watermark
    }

    /// The near cache of `cache`, if it has one.
    pub fn near_cache(&self, cache: CacheKind) -> Option<NearCache> {
        self.near_caches[cache.index()]
    }

    /// How stale a near-cache read may be at most (see
    /// [`CacheConfigBuilder::near_cache_staleness`]).
    pub fn near_cache_staleness(&self) -> Duration {
        self.near_cache_staleness
    }

    /// The pooler the cache's connections go through (see [`Pooler`]).
    pub fn pooler(&self) -> Pooler {
        self.pooler
    }

    /// The server itself, past the pooler, if given (its `Display` hides the
    /// password).
    pub fn direct_url(&self) -> Option<&DatabaseUrl> {
        self.direct_url.as_ref()
    }

    /// Whether no session state may be kept on the pool's connections.
    pub(crate) fn sessionless(&self) -> bool {
        self.pooler == Pooler::Transaction
    }

    /// This configuration talking to the server directly, for what keeps a session
    /// (the near-cache poller, migrations under their session lock): the direct URL
    /// in transaction-pooler mode, else the configuration itself.
    ///
    /// # Errors
    /// [`Error::Config`] in transaction-pooler mode without a direct URL, saying
    /// what (`needs`) requires one.
    pub(crate) fn direct(&self, needs: &str) -> Result<CacheConfig> {
        match (self.pooler, &self.direct_url) {
            (Pooler::None, _) => Ok(self.clone()),
            (Pooler::Transaction, Some(url)) => Ok(CacheConfig {
                database_url: url.clone(),
                pooler: Pooler::None,
                ..self.clone()
            }),
            (Pooler::Transaction, None) => Err(Error::config(
                "PGCACHE_DIRECT_URL",
                "(unset)",
                format!(
                    "PGCACHE_POOLER=transaction and {needs}: a transaction pooler gives \
                     no session of its own, so set PGCACHE_DIRECT_URL (`.direct_url(..)`) \
                     to the server itself, past the pooler"
                ),
            )),
        }
    }
}

/// Builder for [`CacheConfig`]; every setter consumes and returns the builder.
///
/// It holds the configuration being built and, for each setting read from the
/// environment, the variable it came from: an invalid value is reported under the
/// name the caller used, the variable's or the setter's.
#[derive(Debug, Clone)]
#[must_use]
pub struct CacheConfigBuilder {
    config: CacheConfig,
    /// Unchecked until [`Self::build`], as the setters cannot fail.
    database_url: UnparsedUrl,
    /// Shard names and their unchecked URLs, in the order given.
    shards: Vec<(String, UnparsedUrl)>,
    /// Unchecked until [`Self::build`].
    direct_url: Option<UnparsedUrl>,
    /// Setting (setter name) to the variable and value it was read from.
    from_env: HashMap<String, (String, String)>,
}

impl Default for CacheConfigBuilder {
    fn default() -> Self {
        CacheConfigBuilder {
            config: CacheConfig::defaults(),
            database_url: UnparsedUrl(DEFAULT_DATABASE_URL.to_owned()),
            shards: Vec::new(),
            direct_url: None,
            from_env: HashMap::new(),
        }
    }
}

impl CacheConfigBuilder {
    /// A builder holding the configuration of the process environment, for a
    /// program that reads the environment and then overrides some settings (say,
    /// from its command line). See [`CacheConfig::from_vars`] for the variables.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first variable that is not even of the right
    /// type; values out of range are reported by [`Self::build`].
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// [`Self::from_env`] from `(name, value)` pairs.
    ///
    /// # Errors
    /// As [`Self::from_env`].
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut b = CacheConfigBuilder::default();
        for (name, value) in vars {
            let (name, value) = (name.as_ref(), value.as_ref());
            match VARIABLES.iter().find(|v| v.name == name) {
                Some(variable) => {
                    b = (variable.apply)(b, name, value)?;
                    // Kept for error messages (and the builder's `Debug`): never a URL.
                    let shown = if SECRET_SETTINGS.contains(&variable.setting.as_str()) {
                        "<not shown>"
                    } else {
                        value
                    };
                    b.from_env.insert(
                        variable.setting.clone(),
                        (name.to_owned(), shown.to_owned()),
                    );
                }
                None => warn_if_misspelt(name),
            }
        }
        Ok(b)
    }

    /// Changes one setting, which from now on is the caller's, not the environment's.
    fn set(mut self, setting: &str, change: impl FnOnce(&mut CacheConfig)) -> Self {
        self.from_env.remove(setting);
        change(&mut self.config);
        self
    }

    /// The server: a `postgres://` URL or libpq's `key=value` pairs (see
    /// [`DatabaseUrl`]). Default: [`DEFAULT_DATABASE_URL`].
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.from_env.remove("database_url");
        self.database_url = UnparsedUrl(url.into());
        self
    }

    /// Adds a shard: the cache is then spread over the shards given (by a
    /// consistent hash of each key over the shards' *names*, see [`ShardMap`]), and
    /// [`database_url`](Self::database_url) is not used. Each shard gets its own pool
    /// (of [`pool_max_size`](Self::pool_max_size) connections), migrations and near-cache
    /// poller. Keep a shard's name when its server moves: the name, not the URL,
    /// decides which keys it holds. Default: no shards, one database.
    ///
    /// [`ShardMap`]: crate::ShardMap
    pub fn shard(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        self.from_env.remove("shards");
        self.shards.push((name.into(), UnparsedUrl(url.into())));
        self
    }

    /// Turns caching on or off. Default: on.
    pub fn enabled(self, enabled: bool) -> Self {
        self.set("enabled", |c| c.enabled = enabled)
    }

    /// The short TTL preset. Default: 300 s.
    pub fn ttl_short(self, ttl: Duration) -> Self {
        self.set("ttl_short", |c| c.ttl.short = ttl)
    }

    /// The medium TTL preset. Default: 3600 s.
    pub fn ttl_medium(self, ttl: Duration) -> Self {
        self.set("ttl_medium", |c| c.ttl.medium = ttl)
    }

    /// The long TTL preset. Default: 86400 s.
    pub fn ttl_long(self, ttl: Duration) -> Self {
        self.set("ttl_long", |c| c.ttl.long = ttl)
    }

    /// The week TTL preset. Default: 604800 s.
    pub fn ttl_week(self, ttl: Duration) -> Self {
        self.set("ttl_week", |c| c.ttl.week = ttl)
    }

    /// Most pooled connections. Default: 20.
    pub fn pool_max_size(self, size: u32) -> Self {
        self.set("pool_max_size", |c| c.pool.max_size = size)
    }

    /// Idle connections the pool keeps open (see [`PoolSettings::min_idle`] before
    /// raising it). Default: 0.
    pub fn pool_min_idle(self, min_idle: u32) -> Self {
        self.set("pool_min_idle", |c| c.pool.min_idle = min_idle)
    }

    /// How long an idle connection is kept. Default: 30 s.
    pub fn pool_idle_timeout(self, timeout: Duration) -> Self {
        self.set("pool_idle_timeout", |c| c.pool.idle_timeout = timeout)
    }

    /// How long to wait for a connection. Default: 2 s.
    pub fn pool_connection_timeout(self, timeout: Duration) -> Self {
        self.set("pool_connection_timeout", |c| {
            c.pool.connection_timeout = timeout;
        })
    }

    /// Schema holding the cache tables and pgcache's migration history
    /// (`__diesel_schema_migrations` inside it, never the application's); created on
    /// first start and set as the cache connections' `search_path`. Default:
    /// [`DEFAULT_SCHEMA`] (`pgcache`).
    pub fn schema(self, schema: impl Into<String>) -> Self {
        let schema = schema.into();
        self.set("schema", |c| c.schema = schema)
    }

    /// Run pending migrations when the manager starts. Default: true. Turn off for
    /// deployments that migrate separately (`pgcache migrate`) and run the cache with
    /// a role that may not create tables: with it on, such a role fails to start
    /// with an [`Error::Migration`] saying so.
    pub fn run_migrations(self, run: bool) -> Self {
        self.set("run_migrations", |c| c.run_migrations = run)
    }

    /// Durability of cache writes. Default: [`Durability::Full`].
    pub fn durability(self, durability: Durability) -> Self {
        self.set("durability", |c| c.durability = durability)
    }

    /// `statement_timeout` on every cache connection, so a stuck database cannot hang
    /// a worker past it. Default: 5 s.
    ///
    /// A server that cannot enforce it (frozen, or behind a network path that
    /// swallows traffic) is covered client side: a statement of a cache operation
    /// still unanswered this timeout + 1 s after it was sent is cut, its connection
    /// discarded, and the operation fails with
    /// [`Error::Unresponsive`](crate::Error::Unresponsive) (Linux on x86-64 and
    /// AArch64). The same sum is libpq's `tcp_user_timeout` unless the connection
    /// string sets one.
    pub fn statement_timeout(self, timeout: Duration) -> Self {
        self.set("statement_timeout", |c| c.statement_timeout = timeout)
    }

    /// `statement_timeout` of migrations ([`CacheManager::new`](crate::CacheManager::new),
    /// [`run_migrations`](crate::CacheManager::run_migrations), `pgcache migrate`) and
    /// of partitioning ([`partition_tables`](crate::CacheManager::partition_tables)),
    /// in place of [`statement_timeout`](Self::statement_timeout) for the length of
    /// their transactions, which may have millions of rows to move; it also bounds the
    /// wait for the schema's migration lock while another process migrates or
    /// partitions that schema. The client-side cut of unanswered statements allows
    /// this timeout + 1 s for them. Default: [`DEFAULT_MIGRATION_TIMEOUT`] (10 minutes).
    pub fn migration_timeout(self, timeout: Duration) -> Self {
        self.set("migration_timeout", |c| c.migration_timeout = timeout)
    }

    /// `application_name` of the cache's connections, visible in `pg_stat_activity`.
    /// Default: `pgcache`.
    pub fn application_name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.set("application_name", |c| c.application_name = name)
    }

    /// Fail-open mode: reads that fail with a transient error return a miss, writes
    /// are skipped (each counted, and undone by a delete of their keys once the
    /// database answers, so no old value is served after recovery; a few log lines
    /// per outage). The manager
    /// starts while the database is down (not when it is misconfigured) and runs its
    /// migrations once it answers. Default: off.
    pub fn fail_open(self, fail_open: bool) -> Self {
        self.set("fail_open", |c| c.fail_open = fail_open)
    }

    /// How often a background thread writes the in-memory hit/miss counters to the
    /// database (and, after an outage in fail-open mode, catches up: migrations,
    /// skipped writes). Default: 1 s.
    pub fn stats_flush_interval(self, interval: Duration) -> Self {
        self.set("stats_flush_interval", |c| {
            c.stats_flush_interval = interval;
        })
    }

    /// Single flight: how long the lease of a caller computing a missing entry lasts,
    /// so that if its process dies the key is computed again by someone else after
    /// at most this long. Set it above your slowest computation: a computation still
    /// running when its lease lapses may be duplicated. Default: 30 s.
    pub fn lease_ttl(self, ttl: Duration) -> Self {
        self.set("lease_ttl", |c| c.lease_ttl = ttl)
    }

    /// Single flight: how long `get_or_compute` waits for another caller's
    /// computation of the same key before returning [`Error::ComputeTimeout`].
    /// Default: 60 s (longer than the default lease, so waiters outlive a dead
    /// computer and take over).
    pub fn compute_wait_timeout(self, timeout: Duration) -> Self {
        self.set("compute_wait_timeout", |c| {
            c.compute_wait_timeout = timeout;
        })
    }

    /// Runs [`cleanup`](crate::CacheManager::cleanup) on a background thread every
    /// `interval`, for services that do not schedule `pgcache cleanup` with cron. The
    /// thread stops when the last clone of the manager is dropped. Default: off.
    pub fn janitor_interval(self, interval: Duration) -> Self {
        self.set("janitor_interval", |c| c.janitor_interval = Some(interval))
    }

    /// Turns the background janitor off (the default).
    pub fn no_janitor(self) -> Self {
        self.set("janitor_interval", |c| c.janitor_interval = None)
    }

    /// The most entries `cache` may hold (`None`: no bound): past it,
    /// [`cleanup`](crate::CacheManager::cleanup) evicts expired entries, then the
    /// least recently used (LLM responses, audio) or oldest written (the others),
    /// down to the [low watermark](Self::eviction_low_watermark). With shards, each
    /// shard is held to its equal share. Default: none.
    pub fn max_entries(self, cache: CacheKind, max: Option<u64>) -> Self {
        self.set(&bound_setting(cache, Bound::Entries), |c| {
            c.size_bounds[cache.index()].max_entries = max;
        })
    }

    /// The most payload bytes `cache` may hold (`None`: no bound; see [`SizeBounds`]
    /// for what counts), enforced like [`max_entries`](Self::max_entries).
    /// Default: none.
    pub fn max_bytes(self, cache: CacheKind, max: Option<u64>) -> Self {
        self.set(&bound_setting(cache, Bound::Bytes), |c| {
            c.size_bounds[cache.index()].max_bytes = max;
        })
    }

    /// The fraction (0 to 1) of a bound that eviction brings an over-bound cache
    /// down to, so that it is not over again after a few writes. Default:
    /// [`DEFAULT_EVICTION_LOW_WATERMARK`] (0.8).
    pub fn eviction_low_watermark(self, fraction: f64) -> Self {
        self.set("eviction_low_watermark", |c| {
            c.eviction_low_watermark = fraction;
        })
    }

    /// An in-process near cache in front of `cache`'s table (`None`: none, the
    /// default): reads of hot keys are answered from memory, kept coherent with every
    /// writer of the database through triggers and a poller (see docs/design/near-cache.md
    /// for what is promised).
    pub fn near_cache(self, cache: CacheKind, near: Option<NearCache>) -> Self {
        self.set(&format!("near_cache({})", cache.name()), |c| {
            c.near_caches[cache.index()] = near;
        })
    }

    /// After a write commits anywhere, how long a near cache may still return the
    /// old value at most, even if notifications are delayed or lost: past it the near
    /// caches are bypassed until the channel proves current again. Default:
    /// [`DEFAULT_NEAR_CACHE_STALENESS`] (100 ms).
    pub fn near_cache_staleness(self, bound: Duration) -> Self {
        self.set("near_cache_staleness", |c| c.near_cache_staleness = bound)
    }

    /// Whether the database URL goes through a transaction pooler (see [`Pooler`]).
    /// Default: [`Pooler::None`].
    pub fn pooler(self, pooler: Pooler) -> Self {
        self.set("pooler", |c| c.pooler = pooler)
    }

    /// The server itself, past the transaction pooler, in either of the database
    /// URL's forms: for what needs a session of its own (the near-cache poller,
    /// migrations), unused without [`Pooler::Transaction`]. Kept as secret as the
    /// database URL. Default: none.
    pub fn direct_url(mut self, url: impl Into<String>) -> Self {
        self.from_env.remove("direct_url");
        self.direct_url = Some(UnparsedUrl(url.into()));
        self
    }

    /// Checks every setting and builds the configuration.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid setting: a malformed URL, a zero,
    /// sub-microsecond or over-long TTL, a zero pool size, a `min_idle` above
    /// `max_size`, a zero timeout, a zero or over-large size bound, a low watermark
    /// outside 0..=1. The setting is named as it was given: the environment variable
    /// when it was read by [`Self::from_env`], else the setter (`pool_max_size`,
    /// `max_entries(kv)`, ...).
    pub fn build(self) -> Result<CacheConfig> {
        let mut config = self.config.clone();
        config.database_url = DatabaseUrl::parse(&self.database_url.0).map_err(|error| {
            match (error, self.from_env.contains_key("database_url")) {
                // The parser names the variable; from code, name the setter.
                (Error::Config { value, reason, .. }, false) => {
                    Error::config("database_url", value, reason)
                }
                (error, _) => error,
            }
        })?;
        config.shards = self.build_shards()?;
        config.direct_url = match &self.direct_url {
            // Never the text of the URL: only the parser's reason.
            Some(url) => Some(DatabaseUrl::parse(&url.0).map_err(|error| {
                let reason = match error {
                    Error::Config { reason, .. } => reason,
                    other => other.to_string(),
                };
                self.invalid("direct_url", "<not shown>", reason)
            })?),
            None => None,
        };
        let c = &config;
        for (setting, ttl) in [
            ("ttl_short", c.ttl.short),
            ("ttl_medium", c.ttl.medium),
            ("ttl_long", c.ttl.long),
            ("ttl_week", c.ttl.week),
            ("lease_ttl", c.lease_ttl),
        ] {
            check_ttl(ttl).map_err(|reason| self.invalid(setting, format!("{ttl:?}"), reason))?;
        }
        if c.pool.max_size == 0 {
            return Err(self.invalid("pool_max_size", "0", "must be at least 1"));
        }
        if c.pool.min_idle > c.pool.max_size {
            return Err(self.invalid(
                "pool_min_idle",
                c.pool.min_idle.to_string(),
                format!("must not exceed the pool size {}", c.pool.max_size),
            ));
        }
        for (setting, d) in [
            ("pool_connection_timeout", c.pool.connection_timeout),
            ("statement_timeout", c.statement_timeout),
            ("migration_timeout", c.migration_timeout),
            ("stats_flush_interval", c.stats_flush_interval),
            ("compute_wait_timeout", c.compute_wait_timeout),
        ] {
            if d.is_zero() {
                return Err(self.invalid(setting, "0", "must be greater than zero"));
            }
        }
        if c.janitor_interval.is_some_and(|d| d.is_zero()) {
            return Err(self.invalid(
                "janitor_interval",
                "0",
                "must be greater than zero (leave unset to turn the janitor off)",
            ));
        }
        check_low_watermark(c.eviction_low_watermark).map_err(|reason| {
            self.invalid(
                "eviction_low_watermark",
                c.eviction_low_watermark.to_string(),
                reason,
            )
        })?;
        for cache in CacheKind::ALL {
            let b = c.size_bounds[cache.index()];
            for (bound, max) in [(Bound::Entries, b.max_entries), (Bound::Bytes, b.max_bytes)] {
                let Some(max) = max else { continue };
                let reason = match max {
                    0 => "must be greater than zero (leave unset for no bound)".to_owned(),
                    _ => match check_bound(max) {
                        Ok(_) => continue,
                        Err(reason) => reason,
                    },
                };
                return Err(self.invalid(&bound_setting(cache, bound), max.to_string(), reason));
            }
        }
        for cache in CacheKind::ALL {
            let Some(near) = c.near_caches[cache.index()] else {
                continue;
            };
            let setting = format!("near_cache({})", cache.name());
            if near.max_bytes == 0 {
                return Err(self.invalid(
                    &setting,
                    "max_bytes 0",
                    "max_bytes must be greater than zero",
                ));
            }
            if near.max_age.is_zero() {
                return Err(self.invalid(
                    &setting,
                    "max_age 0",
                    "max_age must be greater than zero",
                ));
            }
        }
        if c.near_cache_staleness < Duration::from_millis(4) {
            return Err(self.invalid(
                "near_cache_staleness",
                format!("{:?}", c.near_cache_staleness),
                "must be at least 4 ms (heartbeats go every quarter of it)",
            ));
        }
        if c.schema.is_empty() {
            return Err(self.invalid("schema", "", "must not be empty"));
        }
        if c.pooler == Pooler::Transaction && c.durability == Durability::Relaxed {
            return Err(self.invalid(
                "durability",
                "relaxed",
                "is a session setting (`synchronous_commit = off`), which a transaction \
                 pooler would leave on server connections other clients then use",
            ));
        }
        Ok(config)
    }

    /// The shards, each URL parsed and the names checked as [`ShardMap`] does.
    ///
    /// [`ShardMap`]: crate::ShardMap
    fn build_shards(&self) -> Result<Vec<Shard>> {
        // Never the variable's text: it holds every shard's password.
        let setting = match self.from_env.get("shards") {
            Some((variable, _)) => variable.as_str(),
            None => "shards",
        };
        let mut shards = Vec::with_capacity(self.shards.len());
        for (name, url) in &self.shards {
            let database_url = DatabaseUrl::parse(&url.0).map_err(|error| {
                let reason = match error {
                    Error::Config { reason, .. } => reason,
                    other => other.to_string(),
                };
                Error::config(setting, name, format!("shard `{name}`'s URL: {reason}"))
            })?;
            shards.push(Shard {
                name: name.clone(),
                database_url,
            });
        }
        if !shards.is_empty() {
            crate::shards::ShardMap::new(shards.iter().map(|s| s.name.clone())).map_err(
                |error| match error {
                    Error::Config { value, reason, .. } => Error::config(setting, value, reason),
                    other => other,
                },
            )?;
        }
        Ok(shards)
    }

    /// The error for an invalid `setting`, named as the caller gave it: its variable
    /// and the variable's text when it came from the environment.
    fn invalid(&self, setting: &str, value: impl Into<String>, reason: impl Into<String>) -> Error {
        match self.from_env.get(setting) {
            Some((variable, text)) => Error::config(variable, text, reason),
            None => Error::config(setting, value, reason),
        }
    }
}

/// The settings whose text holds a password, never kept or shown as given.
const SECRET_SETTINGS: [&str; 3] = ["database_url", "shards", "direct_url"];

/// How an environment variable's text is applied to the builder; given the
/// variable's name for its parse errors.
type Apply =
    Box<dyn Fn(CacheConfigBuilder, &str, &str) -> Result<CacheConfigBuilder> + Send + Sync>;

/// One environment variable and the builder setting it feeds.
struct Variable {
    name: String,
    /// The setter's name, as errors about builder values give it.
    setting: String,
    apply: Apply,
}

/// Every environment variable pgcache reads: the one list `from_vars` follows.
static VARIABLES: LazyLock<Vec<Variable>> = LazyLock::new(|| {
    fn var(
        name: &str,
        setting: &str,
        apply: impl Fn(CacheConfigBuilder, &str, &str) -> Result<CacheConfigBuilder>
            + Send
            + Sync
            + 'static,
    ) -> Variable {
        Variable {
            name: name.to_owned(),
            setting: setting.to_owned(),
            apply: Box::new(apply),
        }
    }
    let mut variables = vec![
        var("DATABASE_URL", "database_url", |b, _, v| {
            Ok(b.database_url(v))
        }),
        var("PGCACHE_SHARDS", "shards", parse_shards),
        var("ENABLE_CACHING", "enabled", |b, n, v| {
            Ok(b.enabled(parse_bool(n, v)?))
        }),
        var("CACHE_TTL_SHORT", "ttl_short", |b, n, v| {
            Ok(b.ttl_short(parse_secs(n, v)?))
        }),
        var("CACHE_TTL_MEDIUM", "ttl_medium", |b, n, v| {
            Ok(b.ttl_medium(parse_secs(n, v)?))
        }),
        var("CACHE_TTL_LONG", "ttl_long", |b, n, v| {
            Ok(b.ttl_long(parse_secs(n, v)?))
        }),
        var("CACHE_TTL_WEEK", "ttl_week", |b, n, v| {
            Ok(b.ttl_week(parse_secs(n, v)?))
        }),
        var("PGCACHE_POOL_MAX_SIZE", "pool_max_size", |b, n, v| {
            Ok(b.pool_max_size(parse_u32(n, v)?))
        }),
        var("PGCACHE_POOL_MIN_IDLE", "pool_min_idle", |b, n, v| {
            Ok(b.pool_min_idle(parse_u32(n, v)?))
        }),
        var(
            "PGCACHE_POOL_IDLE_TIMEOUT_SECS",
            "pool_idle_timeout",
            |b, n, v| Ok(b.pool_idle_timeout(parse_secs(n, v)?)),
        ),
        var(
            "PGCACHE_POOL_CONNECTION_TIMEOUT_MS",
            "pool_connection_timeout",
            |b, n, v| Ok(b.pool_connection_timeout(parse_millis(n, v)?)),
        ),
        var(
            "PGCACHE_STATEMENT_TIMEOUT_MS",
            "statement_timeout",
            |b, n, v| Ok(b.statement_timeout(parse_millis(n, v)?)),
        ),
        var(
            "PGCACHE_MIGRATION_TIMEOUT_MS",
            "migration_timeout",
            |b, n, v| Ok(b.migration_timeout(parse_millis(n, v)?)),
        ),
        var("PGCACHE_SCHEMA", "schema", |b, _, v| Ok(b.schema(v))),
        var("PGCACHE_RUN_MIGRATIONS", "run_migrations", |b, n, v| {
            Ok(b.run_migrations(parse_bool(n, v)?))
        }),
        var("PGCACHE_DURABILITY", "durability", |b, n, v| {
            Ok(b.durability(Durability::parse(n, v)?))
        }),
        var("PGCACHE_FAIL_OPEN", "fail_open", |b, n, v| {
            Ok(b.fail_open(parse_bool(n, v)?))
        }),
        var(
            "PGCACHE_STATS_FLUSH_MS",
            "stats_flush_interval",
            |b, n, v| Ok(b.stats_flush_interval(parse_millis(n, v)?)),
        ),
        var("PGCACHE_LEASE_TTL_MS", "lease_ttl", |b, n, v| {
            Ok(b.lease_ttl(parse_millis(n, v)?))
        }),
        var(
            "PGCACHE_COMPUTE_WAIT_MS",
            "compute_wait_timeout",
            |b, n, v| Ok(b.compute_wait_timeout(parse_millis(n, v)?)),
        ),
        // 0 means off, as unset.
        var(
            "PGCACHE_JANITOR_INTERVAL_SECS",
            "janitor_interval",
            |b, n, v| {
                Ok(match parse_secs(n, v)? {
                    Duration::ZERO => b.no_janitor(),
                    interval => b.janitor_interval(interval),
                })
            },
        ),
        var(
            "PGCACHE_EVICTION_LOW_WATERMARK",
            "eviction_low_watermark",
            |b, n, v| {
                let fraction = v
                    .trim()
                    .parse()
                    .map_err(|_| Error::config(n, v, "expected a fraction between 0 and 1"))?;
                Ok(b.eviction_low_watermark(fraction))
            },
        ),
    ];
    variables.push(var("PGCACHE_POOLER", "pooler", |b, n, v| {
        Ok(b.pooler(Pooler::parse(n, v)?))
    }));
    variables.push(var("PGCACHE_DIRECT_URL", "direct_url", |b, _, v| {
        Ok(b.direct_url(v))
    }));
    variables.push(var(
        "PGCACHE_NEAR_CACHE_STALENESS_MS",
        "near_cache_staleness",
        |b, n, v| Ok(b.near_cache_staleness(parse_millis(n, v)?)),
    ));
    for cache in CacheKind::ALL {
        let upper = cache.name().to_ascii_uppercase();
        let setting = format!("near_cache({})", cache.name());
        // Either variable turns the near cache on, with the other's default.
        variables.push(var(
            &format!("PGCACHE_{upper}_NEAR_CACHE_BYTES"),
            &setting,
            move |b, n, v| {
                let near = b.config.near_caches[cache.index()].unwrap_or_default();
                Ok(b.near_cache(cache, Some(near.max_bytes(parse_u64(n, v, "bytes")?))))
            },
        ));
        variables.push(var(
            &format!("PGCACHE_{upper}_NEAR_CACHE_MAX_AGE_MS"),
            &setting,
            move |b, n, v| {
                let near = b.config.near_caches[cache.index()].unwrap_or_default();
                Ok(b.near_cache(cache, Some(near.max_age(parse_millis(n, v)?))))
            },
        ));
        // 0 means no bound, as unset.
        variables.push(var(
            &bound_variable(cache, Bound::Entries),
            &bound_setting(cache, Bound::Entries),
            move |b, n, v| {
                let max = parse_u64(n, v, "entries")?;
                Ok(b.max_entries(cache, Some(max).filter(|&n| n > 0)))
            },
        ));
        variables.push(var(
            &bound_variable(cache, Bound::Bytes),
            &bound_setting(cache, Bound::Bytes),
            move |b, n, v| {
                let max = parse_u64(n, v, "bytes")?;
                Ok(b.max_bytes(cache, Some(max).filter(|&n| n > 0)))
            },
        ));
    }
    variables
});

/// A `PGCACHE_*` environment variable pgcache does not read: most likely a
/// misspelling, which would otherwise pass silently for the default. Its `Display`
/// is the warning: `unknown environment variable PGCACHE_STATMENT_TIMEOUT_MS
/// ignored; did you mean PGCACHE_STATEMENT_TIMEOUT_MS?`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnknownVariable {
    /// The name as set.
    pub name: String,
    /// The closest known name, when one is within three edits.
    pub closest: Option<&'static str>,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown environment variable {} ignored", self.name)?;
        match self.closest {
            Some(closest) => write!(f, "; did you mean {closest}?"),
            None => Ok(()),
        }
    }
}

impl CacheConfig {
    /// The `PGCACHE_*` variables of the process environment that pgcache does not
    /// read, each with the closest known name: what [`Self::from_env`] warns about
    /// through `tracing`, for a program that reports it another way.
    pub fn unknown_env_vars() -> Vec<UnknownVariable> {
        std::env::vars_os()
            .filter_map(|(name, _)| {
                let name = name.into_string().ok()?;
                let closest = unknown_variable(&name)?;
                Some(UnknownVariable { name, closest })
            })
            .collect()
    }
}

/// Warns about a `PGCACHE_*` variable pgcache does not read (see [`UnknownVariable`]).
fn warn_if_misspelt(name: &str) {
    if let Some(closest) = unknown_variable(name) {
        let unknown = UnknownVariable {
            name: name.to_owned(),
            closest,
        };
        tracing::warn!(variable = name, "pgcache: {unknown}");
    }
}

/// For a `PGCACHE_*` name that is not a known variable, `Some`, with the closest
/// known name when one is within three edits; `None` for known and foreign names.
fn unknown_variable(name: &str) -> Option<Option<&'static str>> {
    if !name.starts_with("PGCACHE_") || VARIABLES.iter().any(|v| v.name == name) {
        return None;
    }
    let closest = VARIABLES
        .iter()
        .map(|v| (edit_distance(name, &v.name), v.name.as_str()))
        .min()
        .filter(|&(distance, _)| distance <= 3)
        .map(|(_, closest)| closest);
    Some(closest)
}

/// Levenshtein distance (names are short ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.as_bytes().iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The two bounds a cache may have.
#[derive(Clone, Copy)]
enum Bound {
    Entries,
    Bytes,
}

/// The environment variable setting `bound` of `cache`, e.g. `PGCACHE_KV_MAX_BYTES`.
fn bound_variable(cache: CacheKind, bound: Bound) -> String {
    let suffix = match bound {
        Bound::Entries => "MAX_ENTRIES",
        Bound::Bytes => "MAX_BYTES",
    };
    format!("PGCACHE_{}_{suffix}", cache.name().to_ascii_uppercase())
}

/// The builder setting of `bound` of `cache`, e.g. `max_bytes(kv)`.
fn bound_setting(cache: CacheKind, bound: Bound) -> String {
    let setter = match bound {
        Bound::Entries => "max_entries",
        Bound::Bytes => "max_bytes",
    };
    format!("{setter}({})", cache.name())
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(name, value, "expected true or false")),
    }
}

fn parse_u64(name: &str, value: &str, unit: &str) -> Result<u64> {
    value.trim().parse::<u64>().map_err(|_| {
        Error::config(
            name,
            value,
            format!("expected a whole, non-negative number of {unit}"),
        )
    })
}

fn parse_secs(name: &str, value: &str) -> Result<Duration> {
    parse_u64(name, value, "seconds").map(Duration::from_secs)
}

fn parse_millis(name: &str, value: &str) -> Result<Duration> {
    parse_u64(name, value, "milliseconds").map(Duration::from_millis)
}

fn parse_u32(name: &str, value: &str) -> Result<u32> {
    value
        .trim()
        .parse::<u32>()
        .map_err(|_| Error::config(name, value, "expected a whole, non-negative number"))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_variable_is_reported_with_the_closest_name() {
        assert_eq!(
            unknown_variable("PGCACHE_POOL_MAX_SIZ"),
            Some(Some("PGCACHE_POOL_MAX_SIZE"))
        );
        assert_eq!(
            unknown_variable("PGCACHE_KV_MAX_ENTRY"),
            Some(Some("PGCACHE_KV_MAX_ENTRIES"))
        );
        assert_eq!(
            unknown_variable("PGCACHE_SOMETHING_ELSE_ENTIRELY"),
            Some(None)
        );
    }

    #[test]
    fn known_and_foreign_variables_are_not_reported() {
        assert_eq!(unknown_variable("PGCACHE_POOL_MAX_SIZE"), None);
        assert_eq!(unknown_variable("PGCACHE_AUDIO_CHUNK_MAX_BYTES"), None);
        assert_eq!(unknown_variable("PATH"), None);
        assert_eq!(unknown_variable("CACHE_TTL_SHORT"), None);
    }

    /// The tables in docs/reference/configuration.md and in `from_vars`'s
    /// documentation are written by hand: each must name every variable of the list
    /// (the bounds once, for all caches).
    #[test]
    fn the_documented_tables_name_every_variable() {
        let readme = include_str!("../docs/reference/configuration.md");
        let rustdoc: String = include_str!("config.rs")
            .lines()
            .filter(|line| line.trim_start().starts_with("/// | `"))
            .collect();
        for variable in VARIABLES.iter() {
            let mut name = variable.name.clone();
            for cache in CacheKind::ALL {
                let prefix = format!("PGCACHE_{}_", cache.name().to_ascii_uppercase());
                name = name.replace(&prefix, "PGCACHE_<CACHE>_");
            }
            let name = name.replace("CACHE_TTL_", "");
            for (doc, text) in [("configuration.md", readme), ("rustdoc", rustdoc.as_str())] {
                assert!(
                    text.contains(&name),
                    "{doc} does not name {}",
                    variable.name
                );
            }
        }
    }
}

/// One shard of a sharded cache: its stable name and its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    name: String,
    database_url: DatabaseUrl,
}

impl Shard {
    /// The shard's name, which decides the keys it holds.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shard's database (its `Display` hides the password).
    pub fn database_url(&self) -> &DatabaseUrl {
        &self.database_url
    }
}

/// `PGCACHE_SHARDS`: `name=url` pairs separated by commas (a URL's own first `=`
/// ends the name, so libpq's `key=value` form works: `a=host=db1 port=5432`).
fn parse_shards(
    mut b: CacheConfigBuilder,
    variable: &str,
    text: &str,
) -> Result<CacheConfigBuilder> {
    b.shards.clear();
    let pairs = text.split(',').map(str::trim).filter(|p| !p.is_empty());
    for (i, pair) in pairs.enumerate() {
        let Some((name, url)) = pair.split_once('=') else {
            // The pair may be a bare URL with a password: not shown.
            return Err(Error::config(
                variable,
                format!("<pair {}, not shown>", i + 1),
                "each shard is `name=url` (e.g. `a=postgres://db1/cache,b=postgres://db2/cache`)",
            ));
        };
        b = b.shard(name.trim(), url.trim());
    }
    if b.shards.is_empty() {
        return Err(Error::config(
            variable,
            "",
            "at least one `name=url` pair is needed; unset it for one database",
        ));
    }
    Ok(b)
}

/// A connection string as given to the builder, whose `Debug` hides its password
/// as [`DatabaseUrl`]'s does.
#[derive(Clone)]
struct UnparsedUrl(String);

impl fmt::Debug for UnparsedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DatabaseUrl::parse(&self.0) {
            Ok(url) => fmt::Debug::fmt(&url, f),
            // Where its password ends is unknown: show none of it.
            Err(_) => f.write_str("DatabaseUrl(<invalid, not shown>)"),
        }
    }
}
