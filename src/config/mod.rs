//! Configuration: from code with [`CacheConfig::builder`], or from the environment with
//! [`CacheConfig::from_env`].

mod builder;
mod env;
mod settings;

use std::sync::Arc;
use std::time::Duration;

use crate::codec::Codec;
use crate::database_url::DatabaseUrl;
use crate::error::{Error, Result};
use crate::expiry::TtlPresets;
use crate::kind::CacheKind;

pub use builder::CacheConfigBuilder;
pub use env::UnknownVariable;
pub(crate) use settings::{check_bound, check_early_refresh_beta, check_low_watermark};
pub use settings::{
    Durability, NearCache, PoolSettings, Pooler, SizeBounds, DEFAULT_EARLY_REFRESH_BETA,
    DEFAULT_EVICTION_LOW_WATERMARK, DEFAULT_MIGRATION_TIMEOUT, DEFAULT_NEAR_CACHE_STALENESS,
};

/// The URL used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/postgres";

/// The schema pgcache keeps its tables and its migration history in unless
/// configured otherwise: its own, so that an application's search path and its
/// `__diesel_schema_migrations` are never touched.
pub const DEFAULT_SCHEMA: &str = "pgcache";

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
    pub(crate) watchdog: bool,
    pub(crate) stats_flush_interval: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) compute_wait_timeout: Duration,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) early_refresh_beta: f64,
    pub(crate) janitor_interval: Option<Duration>,
    pub(crate) size_bounds: [SizeBounds; CacheKind::COUNT],
    pub(crate) eviction_low_watermark: f64,
    pub(crate) near_caches: [Option<NearCache>; CacheKind::COUNT],
    pub(crate) near_cache_staleness: Duration,
    pub(crate) pooler: Pooler,
    /// The server itself, past the pooler, for what needs a session of its own.
    pub(crate) direct_url: Option<DatabaseUrl>,
    /// Compression, encryption keys, the hashing of key/value keys (its `Debug`
    /// shows no key material).
    pub(crate) codec: Arc<Codec>,
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
            watchdog: true,
            stats_flush_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
            compute_wait_timeout: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            early_refresh_beta: DEFAULT_EARLY_REFRESH_BETA,
            janitor_interval: None,
            size_bounds: [SizeBounds::NONE; CacheKind::COUNT],
            eviction_low_watermark: DEFAULT_EVICTION_LOW_WATERMARK,
            near_caches: [None; CacheKind::COUNT],
            near_cache_staleness: DEFAULT_NEAR_CACHE_STALENESS,
            pooler: Pooler::None,
            direct_url: None,
            codec: Arc::default(),
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
    /// | `PGCACHE_WATCHDOG` | `true` | cut statements a frozen server never answers |
    /// | `PGCACHE_STATS_FLUSH_MS` | 1000 | how often a background thread flushes hit/miss counters |
    /// | `PGCACHE_LEASE_TTL_MS` | 30000 | single flight: a dead computer's lease lapses after this |
    /// | `PGCACHE_COMPUTE_WAIT_MS` | 60000 | single flight: longest wait for another caller's computation |
    /// | `PGCACHE_STALE_WHILE_REVALIDATE_MS` | 0 (off) | `get_or_compute`: serve a value this long past its freshness while one caller recomputes |
    /// | `PGCACHE_EARLY_REFRESH_BETA` | 1.0 | `get_or_compute`: XFetch's beta, recomputing before expiry (0: never early) |
    /// | `PGCACHE_JANITOR_INTERVAL_SECS` | 0 (off) | run cleanup in the background this often |
    /// | `PGCACHE_<CACHE>_MAX_ENTRIES` | 0 (no bound) | cleanup evicts past this many entries |
    /// | `PGCACHE_<CACHE>_MAX_BYTES` | 0 (no bound) | cleanup evicts past this many payload bytes |
    /// | `PGCACHE_EVICTION_LOW_WATERMARK` | 0.8 | eviction goes down to this fraction of a bound |
    /// | `PGCACHE_<CACHE>_NEAR_CACHE_BYTES` | (no near cache) | a near cache of this many bytes (either variable turns it on) |
    /// | `PGCACHE_<CACHE>_NEAR_CACHE_MAX_AGE_MS` | 60000 | longest local life of a near-cache entry |
    /// | `PGCACHE_NEAR_CACHE_STALENESS_MS` | 100 | the near caches' staleness bound |
    /// | `PGCACHE_POOLER` | `none` | `transaction`: `DATABASE_URL` goes through a transaction pooler (PgBouncer); no session state on its connections |
    /// | `PGCACHE_DIRECT_URL` | (none) | with a transaction pooler: the server itself, for migrations and the near-cache poller |
    /// | `PGCACHE_COMPRESSION_THRESHOLD_BYTES` | 1024 | values over this many bytes are stored compressed (zstd); `off`: none is |
    /// | `PGCACHE_ENCRYPTION_KEYS` | (none: no encryption) | `id:base64key,...` (32-byte keys): values sealed with the first, read with any (key/value, LLM responses, embeddings, vector searches, inline audio) |
    /// | `PGCACHE_HASH_KV_KEYS` | (none) | a key id of `PGCACHE_ENCRYPTION_KEYS`: key/value keys stored as keyed hashes under it |
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

    /// Whether statements a frozen server never answers are cut client side (see
    /// [`CacheConfigBuilder::watchdog`]).
    pub fn watchdog(&self) -> bool {
        self.watchdog
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

    /// How long past its freshness `get_or_compute` serves a value while one caller
    /// recomputes it (zero: off); see [`CacheConfigBuilder::stale_while_revalidate`].
    pub fn stale_while_revalidate(&self) -> Duration {
        self.stale_while_revalidate
    }

    /// XFetch's `beta` of `get_or_compute`'s early recomputation (zero: off); see
    /// [`CacheConfigBuilder::early_refresh_beta`].
    pub fn early_refresh_beta(&self) -> f64 {
        self.early_refresh_beta
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

    /// Values (key/value JSON text and bytes, LLM responses) of more than this many
    /// bytes are stored compressed; `None` when compression is off.
    pub fn compression_threshold(&self) -> Option<usize> {
        self.codec.compression_threshold()
    }

    /// The ids of the encryption keys, the primary (which seals new values) first;
    /// empty when values are not encrypted. Never the keys themselves.
    pub fn encryption_key_ids(&self) -> Vec<&str> {
        self.codec.key_ids()
    }

    /// The id of the encryption key under which key/value keys are stored as keyed
    /// hashes, if they are.
    pub fn kv_key_hashing(&self) -> Option<&str> {
        self.codec.kv_key_hashing()
    }

    /// The value codec: compression, sealing, key hashing.
    pub(crate) fn codec(&self) -> &Codec {
        &self.codec
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
