//! Configuration: from code with [`CacheConfig::builder`], or from the environment with
//! [`CacheConfig::from_env`].

use std::fmt;
use std::time::Duration;

use crate::cache::CacheKind;
use crate::error::{Error, Result};
use crate::ops::eviction::{check_bound, check_low_watermark};
use crate::ops::{SizeBounds, DEFAULT_EVICTION_LOW_WATERMARK};

/// The URL used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/postgres";

/// The longest TTL pgcache accepts: 100 years. Longer ones are rejected rather than
/// risking a timestamp overflow in the database.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A PostgreSQL connection URL whose password never appears in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Checks that `url` is a `postgres://` or `postgresql://` URL.
    ///
    /// # Errors
    /// [`Error::Config`] naming `DATABASE_URL` when the URL is malformed; the message
    /// shows the URL with its credentials masked.
    pub fn parse(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| {
            Error::config(
                "DATABASE_URL",
                mask_credentials(url),
                format!("not a URL ({e})"),
            )
        })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(Error::config(
                "DATABASE_URL",
                redact(&parsed),
                "the scheme must be postgres:// or postgresql://",
            ));
        }
        Ok(DatabaseUrl(url.to_owned()))
    }

    /// The full URL, password included, for opening connections. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, safe to print.
    pub fn redacted(&self) -> String {
        url::Url::parse(&self.0).map_or_else(|_| mask_credentials(&self.0), |u| redact(&u))
    }
}

fn redact(url: &url::Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        // Cannot fail: the URL already has credentials, so it has an authority.
        let _ = url.set_password(Some("***"));
    }
    url.to_string()
}

/// For strings that are not even URLs: hide everything before the last `@` (after
/// the scheme, when there is a `://`), where a password would be, even if the `://`
/// itself is mistyped.
fn mask_credentials(raw: &str) -> String {
    match raw.rfind('@') {
        Some(at) => {
            let start = raw.find("://").map_or(0, |i| i + 3).min(at);
            format!("{}***{}", &raw[..start], &raw[at..])
        }
        None => raw.to_owned(),
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

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
    /// `synchronous_commit = off` on the cache's own connections: a crash may lose the
    /// last fraction of a second of cache writes, never corrupts anything. The
    /// application's own connections are unaffected.
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

/// The four TTL presets of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPresets {
    /// Frequently changing data (`CACHE_TTL_SHORT`, default 300 s); the default for
    /// vector-search results and audio chunks.
    pub short: Duration,
    /// Moderately stable data (`CACHE_TTL_MEDIUM`, default 3600 s); the default for
    /// key/value entries, embeddings and LLM responses.
    pub medium: Duration,
    /// Stable data (`CACHE_TTL_LONG`, default 86400 s).
    pub long: Duration,
    /// Very stable data (`CACHE_TTL_WEEK`, default 604800 s).
    pub week: Duration,
}

impl Default for TtlPresets {
    fn default() -> Self {
        TtlPresets {
            short: Duration::from_secs(300),
            medium: Duration::from_secs(3600),
            long: Duration::from_secs(86_400),
            week: Duration::from_secs(604_800),
        }
    }
}

/// Connection-pool settings (the spec's `Pool` options).
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

/// Everything a [`CacheManager`](crate::CacheManager) needs to know.
///
/// Build one with [`CacheConfig::builder`] or read it with [`CacheConfig::from_env`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub(crate) database_url: DatabaseUrl,
    pub(crate) enabled: bool,
    pub(crate) ttl: TtlPresets,
    pub(crate) pool: PoolSettings,
    pub(crate) schema: Option<String>,
    pub(crate) run_migrations: bool,
    pub(crate) durability: Durability,
    pub(crate) statement_timeout: Duration,
    pub(crate) application_name: String,
    pub(crate) fail_open: bool,
    pub(crate) stats_flush_interval: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) compute_wait_timeout: Duration,
    pub(crate) janitor_interval: Option<Duration>,
    pub(crate) size_bounds: [SizeBounds; 5],
    pub(crate) eviction_low_watermark: f64,
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
        Self::from_vars(std::env::vars())
    }

    /// Reads the configuration from `(name, value)` pairs, as [`Self::from_env`] does
    /// from the environment. Unknown names are ignored; unset ones keep their defaults.
    ///
    /// | variable | default | meaning |
    /// |---|---|---|
    /// | `DATABASE_URL` | `postgres://postgres@localhost:5432/postgres` | server |
    /// | `ENABLE_CACHING` | `true` | `false`: every get misses, every set is a no-op |
    /// | `CACHE_TTL_SHORT` / `_MEDIUM` / `_LONG` / `_WEEK` | 300 / 3600 / 86400 / 604800 | TTL presets, seconds |
    /// | `PGCACHE_POOL_MAX_SIZE` | 20 | pool size |
    /// | `PGCACHE_POOL_MIN_IDLE` | 0 | idle connections kept |
    /// | `PGCACHE_POOL_IDLE_TIMEOUT_SECS` | 30 | idle connection lifetime |
    /// | `PGCACHE_POOL_CONNECTION_TIMEOUT_MS` | 2000 | wait for a connection |
    /// | `PGCACHE_STATEMENT_TIMEOUT_MS` | 5000 | per-statement limit on cache connections |
    /// | `PGCACHE_SCHEMA` | (search path) | schema holding the cache tables |
    /// | `PGCACHE_RUN_MIGRATIONS` | `true` | run migrations at start-up |
    /// | `PGCACHE_DURABILITY` | `full` | `full` or `relaxed` |
    /// | `PGCACHE_FAIL_OPEN` | `false` | transient read errors become misses |
    /// | `PGCACHE_STATS_FLUSH_MS` | 1000 | how often hit/miss counters are flushed |
    /// | `PGCACHE_LEASE_TTL_MS` | 30000 | single flight: a dead computer's lease lapses after this |
    /// | `PGCACHE_COMPUTE_WAIT_MS` | 60000 | single flight: longest wait for another caller's computation |
    /// | `PGCACHE_JANITOR_INTERVAL_SECS` | 0 (off) | run cleanup in the background this often |
    /// | `PGCACHE_<CACHE>_MAX_ENTRIES` | 0 (no bound) | cleanup evicts past this many entries |
    /// | `PGCACHE_<CACHE>_MAX_BYTES` | 0 (no bound) | cleanup evicts past this many payload bytes |
    /// | `PGCACHE_EVICTION_LOW_WATERMARK` | 0.8 | eviction goes down to this fraction of a bound |
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
        let mut b = CacheConfig::builder();
        for (name, value) in vars {
            let (name, value) = (name.as_ref(), value.as_ref());
            b = match name {
                "DATABASE_URL" => b.database_url(value),
                "ENABLE_CACHING" => b.enabled(parse_bool(name, value)?),
                "CACHE_TTL_SHORT" => b.ttl_short(parse_secs(name, value)?),
                "CACHE_TTL_MEDIUM" => b.ttl_medium(parse_secs(name, value)?),
                "CACHE_TTL_LONG" => b.ttl_long(parse_secs(name, value)?),
                "CACHE_TTL_WEEK" => b.ttl_week(parse_secs(name, value)?),
                "PGCACHE_POOL_MAX_SIZE" => b.pool_max_size(parse_u32(name, value)?),
                "PGCACHE_POOL_MIN_IDLE" => b.pool_min_idle(parse_u32(name, value)?),
                "PGCACHE_POOL_IDLE_TIMEOUT_SECS" => b.pool_idle_timeout(parse_secs(name, value)?),
                "PGCACHE_POOL_CONNECTION_TIMEOUT_MS" => {
                    b.pool_connection_timeout(parse_millis(name, value)?)
                }
                "PGCACHE_STATEMENT_TIMEOUT_MS" => b.statement_timeout(parse_millis(name, value)?),
                "PGCACHE_SCHEMA" => b.schema(value),
                "PGCACHE_RUN_MIGRATIONS" => b.run_migrations(parse_bool(name, value)?),
                "PGCACHE_DURABILITY" => b.durability(Durability::parse(name, value)?),
                "PGCACHE_FAIL_OPEN" => b.fail_open(parse_bool(name, value)?),
                "PGCACHE_STATS_FLUSH_MS" => b.stats_flush_interval(parse_millis(name, value)?),
                "PGCACHE_LEASE_TTL_MS" => b.lease_ttl(parse_millis(name, value)?),
                "PGCACHE_COMPUTE_WAIT_MS" => b.compute_wait_timeout(parse_millis(name, value)?),
                "PGCACHE_JANITOR_INTERVAL_SECS" => match parse_secs(name, value)? {
                    Duration::ZERO => b.no_janitor(),
                    interval => b.janitor_interval(interval),
                },
                "PGCACHE_EVICTION_LOW_WATERMARK" => {
                    b.eviction_low_watermark(value.trim().parse().map_err(|_| {
                        Error::config(name, value, "expected a fraction between 0 and 1")
                    })?)
                }
                _ => match bound_setting(name) {
                    // 0 means no bound, as unset.
                    Some((kind, Bound::Entries)) => b.max_entries(
                        kind,
                        Some(parse_u64(name, value, "entries")?).filter(|&n| n > 0),
                    ),
                    Some((kind, Bound::Bytes)) => b.max_bytes(
                        kind,
                        Some(parse_u64(name, value, "bytes")?).filter(|&n| n > 0),
                    ),
                    None => b,
                },
            };
        }
        b.build()
    }

    /// The database URL (its `Display` hides the password).
    pub fn database_url(&self) -> &DatabaseUrl {
        &self.database_url
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

    /// The schema holding the cache tables, when not the connection's search path.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// Whether [`CacheManager::new`](crate::CacheManager::new) runs pending migrations.
    pub fn run_migrations(&self) -> bool {
        self.run_migrations
    }

    /// The durability mode of the cache's connections.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The `statement_timeout` set on every cache connection; see
    /// [`CacheConfigBuilder::statement_timeout`] for the client-side limit built on it.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
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
}

/// Builder for [`CacheConfig`]; every setter consumes and returns the builder.
#[derive(Debug, Clone)]
#[must_use]
pub struct CacheConfigBuilder {
    database_url: String,
    enabled: bool,
    ttl: TtlPresets,
    pool: PoolSettings,
    schema: Option<String>,
    run_migrations: bool,
    durability: Durability,
    statement_timeout: Duration,
    application_name: String,
    fail_open: bool,
    stats_flush_interval: Duration,
    lease_ttl: Duration,
    compute_wait_timeout: Duration,
    janitor_interval: Option<Duration>,
    size_bounds: [SizeBounds; 5],
    eviction_low_watermark: f64,
}

impl Default for CacheConfigBuilder {
    fn default() -> Self {
        CacheConfigBuilder {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            enabled: true,
            ttl: TtlPresets::default(),
            pool: PoolSettings::default(),
            schema: None,
            run_migrations: true,
            durability: Durability::Full,
            statement_timeout: Duration::from_secs(5),
            application_name: "pgcache".to_owned(),
            fail_open: false,
            stats_flush_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
            compute_wait_timeout: Duration::from_secs(60),
            janitor_interval: None,
            size_bounds: [SizeBounds::NONE; 5],
            eviction_low_watermark: DEFAULT_EVICTION_LOW_WATERMARK,
        }
    }
}

impl CacheConfigBuilder {
    /// The server. Default: [`DEFAULT_DATABASE_URL`].
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = url.into();
        self
    }

    /// Turns caching on or off. Default: on.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The short TTL preset. Default: 300 s.
    pub fn ttl_short(mut self, ttl: Duration) -> Self {
        self.ttl.short = ttl;
        self
    }

    /// The medium TTL preset. Default: 3600 s.
    pub fn ttl_medium(mut self, ttl: Duration) -> Self {
        self.ttl.medium = ttl;
        self
    }

    /// The long TTL preset. Default: 86400 s.
    pub fn ttl_long(mut self, ttl: Duration) -> Self {
        self.ttl.long = ttl;
        self
    }

    /// The week TTL preset. Default: 604800 s.
    pub fn ttl_week(mut self, ttl: Duration) -> Self {
        self.ttl.week = ttl;
        self
    }

    /// Most pooled connections. Default: 20.
    pub fn pool_max_size(mut self, size: u32) -> Self {
        self.pool.max_size = size;
        self
    }

    /// Idle connections the pool keeps open (see [`PoolSettings::min_idle`] before
    /// raising it). Default: 0.
    pub fn pool_min_idle(mut self, min_idle: u32) -> Self {
        self.pool.min_idle = min_idle;
        self
    }

    /// How long an idle connection is kept. Default: 30 s.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool.idle_timeout = timeout;
        self
    }

    /// How long to wait for a connection; also libpq's `connect_timeout` (whole
    /// seconds, at least 2) unless the connection string sets one. Default: 2 s.
    pub fn pool_connection_timeout(mut self, timeout: Duration) -> Self {
        self.pool.connection_timeout = timeout;
        self
    }

    /// Schema holding the cache tables; set as the cache connections' `search_path`.
    /// Default: none (the server's search path, usually `public`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Run pending migrations when the manager starts. Default: true. Turn off for
    /// deployments that migrate separately (`pgcache migrate`) and run the cache with
    /// a role that may not create tables.
    pub fn run_migrations(mut self, run: bool) -> Self {
        self.run_migrations = run;
        self
    }

    /// Durability of cache writes. Default: [`Durability::Full`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// `statement_timeout` on every cache connection, so a stuck database cannot hang
    /// a worker past it. Default: 5 s.
    ///
    /// A server that cannot enforce it (frozen, or behind a network path that
    /// swallows traffic) is covered client side: a statement of a cache operation,
    /// cleanup or counter flush still unanswered this timeout + 1 s after it was sent
    /// is cut, its connection discarded, and the operation fails with
    /// [`Error::Unresponsive`](crate::Error::Unresponsive) (Linux on x86-64 and
    /// AArch64). The same sum is libpq's `tcp_user_timeout` unless the connection
    /// string sets one.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// `application_name` of the cache's connections, visible in `pg_stat_activity`.
    /// Default: `pgcache`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Fail-open mode: reads that fail with a transient error return a miss, writes
    /// are skipped (each logged and counted). Default: off.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    /// How often in-memory hit/miss counters are flushed to the database.
    /// Default: 1 s.
    pub fn stats_flush_interval(mut self, interval: Duration) -> Self {
        self.stats_flush_interval = interval;
        self
    }

    /// Single flight: how long the lease of a caller computing a missing entry lasts,
    /// so that if its process dies the key is computed again by someone else after
    /// at most this long. Set it above your slowest computation: a computation still
    /// running when its lease lapses may be duplicated. Default: 30 s.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Single flight: how long `get_or_compute` waits for another caller's
    /// computation of the same key before returning [`Error::ComputeTimeout`].
    /// Default: 60 s (longer than the default lease, so waiters outlive a dead
    /// computer and take over).
    pub fn compute_wait_timeout(mut self, timeout: Duration) -> Self {
        self.compute_wait_timeout = timeout;
        self
    }

    /// Runs [`cleanup`](crate::CacheManager::cleanup) on a background thread every
    /// `interval`, for services that do not schedule `pgcache cleanup` with cron. The
    /// thread stops when the last clone of the manager is dropped. Default: off.
    pub fn janitor_interval(mut self, interval: Duration) -> Self {
        self.janitor_interval = Some(interval);
        self
    }

    /// Turns the background janitor off (the default).
    pub fn no_janitor(mut self) -> Self {
        self.janitor_interval = None;
        self
    }

    /// The most entries `cache` may hold (`None`: no bound): past it,
    /// [`cleanup`](crate::CacheManager::cleanup) evicts expired entries, then the
    /// least recently used (LLM responses, audio) or oldest written (the others),
    /// down to the [low watermark](Self::eviction_low_watermark). Default: none.
    pub fn max_entries(mut self, cache: CacheKind, max: Option<u64>) -> Self {
        self.size_bounds[cache.index()].max_entries = max;
        self
    }

    /// The most payload bytes `cache` may hold (`None`: no bound; see [`SizeBounds`]
    /// for what counts), enforced like [`max_entries`](Self::max_entries).
    /// Default: none.
    pub fn max_bytes(mut self, cache: CacheKind, max: Option<u64>) -> Self {
        self.size_bounds[cache.index()].max_bytes = max;
        self
    }

    /// The fraction (0 to 1) of a bound that eviction brings an over-bound cache
    /// down to, so that it is not over again after a few writes. Default:
    /// [`DEFAULT_EVICTION_LOW_WATERMARK`] (0.8).
    pub fn eviction_low_watermark(mut self, fraction: f64) -> Self {
        self.eviction_low_watermark = fraction;
        self
    }

    /// Checks every setting and builds the configuration.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid setting: a malformed URL, a zero or
    /// over-long TTL, a zero pool size, a `min_idle` above `max_size`, a zero timeout,
    /// a zero or over-large size bound, a low watermark outside 0..=1.
    pub fn build(self) -> Result<CacheConfig> {
        let database_url = DatabaseUrl::parse(&self.database_url)?;
        for (name, ttl) in [
            ("CACHE_TTL_SHORT", self.ttl.short),
            ("CACHE_TTL_MEDIUM", self.ttl.medium),
            ("CACHE_TTL_LONG", self.ttl.long),
            ("CACHE_TTL_WEEK", self.ttl.week),
        ] {
            check_ttl(ttl).map_err(|reason| Error::config(name, secs(ttl), reason))?;
        }
        if self.pool.max_size == 0 {
            return Err(Error::config(
                "PGCACHE_POOL_MAX_SIZE",
                "0",
                "must be at least 1",
            ));
        }
        if self.pool.min_idle > self.pool.max_size {
            return Err(Error::config(
                "PGCACHE_POOL_MIN_IDLE",
                self.pool.min_idle.to_string(),
                format!("must not exceed the pool size {}", self.pool.max_size),
            ));
        }
        for (name, d) in [
            (
                "PGCACHE_POOL_CONNECTION_TIMEOUT_MS",
                self.pool.connection_timeout,
            ),
            ("PGCACHE_STATEMENT_TIMEOUT_MS", self.statement_timeout),
            ("PGCACHE_STATS_FLUSH_MS", self.stats_flush_interval),
            ("PGCACHE_COMPUTE_WAIT_MS", self.compute_wait_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::config(name, "0", "must be greater than zero"));
            }
        }
        check_ttl(self.lease_ttl).map_err(|reason| {
            Error::config(
                "PGCACHE_LEASE_TTL_MS",
                self.lease_ttl.as_millis().to_string(),
                reason,
            )
        })?;
        if self.janitor_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::config(
                "PGCACHE_JANITOR_INTERVAL_SECS",
                "0",
                "must be greater than zero (leave unset to turn the janitor off)",
            ));
        }
        check_bounds(&self.size_bounds, self.eviction_low_watermark)?;
        if self.schema.as_deref().is_some_and(str::is_empty) {
            return Err(Error::config("PGCACHE_SCHEMA", "", "must not be empty"));
        }
        Ok(CacheConfig {
            database_url,
            enabled: self.enabled,
            ttl: self.ttl,
            pool: self.pool,
            schema: self.schema,
            run_migrations: self.run_migrations,
            durability: self.durability,
            statement_timeout: self.statement_timeout,
            application_name: self.application_name,
            fail_open: self.fail_open,
            stats_flush_interval: self.stats_flush_interval,
            lease_ttl: self.lease_ttl,
            compute_wait_timeout: self.compute_wait_timeout,
            janitor_interval: self.janitor_interval,
            size_bounds: self.size_bounds,
            eviction_low_watermark: self.eviction_low_watermark,
        })
    }
}

/// The two bounds a cache may have.
enum Bound {
    Entries,
    Bytes,
}

/// The environment variable setting `bound` of `cache`, e.g. `PGCACHE_KV_MAX_BYTES`.
fn bound_variable(cache: CacheKind, bound: &Bound) -> String {
    let suffix = match bound {
        Bound::Entries => "MAX_ENTRIES",
        Bound::Bytes => "MAX_BYTES",
    };
    format!("PGCACHE_{}_{suffix}", cache.name().to_ascii_uppercase())
}

/// Which cache and bound the variable `name` sets, if it is a bound variable.
fn bound_setting(name: &str) -> Option<(CacheKind, Bound)> {
    CacheKind::ALL.into_iter().find_map(|cache| {
        [Bound::Entries, Bound::Bytes]
            .into_iter()
            .find(|bound| bound_variable(cache, bound) == name)
            .map(|bound| (cache, bound))
    })
}

fn check_bounds(bounds: &[SizeBounds; 5], low_watermark: f64) -> Result<()> {
    check_low_watermark(low_watermark).map_err(|reason| {
        Error::config(
            "PGCACHE_EVICTION_LOW_WATERMARK",
            low_watermark.to_string(),
            reason,
        )
    })?;
    for cache in CacheKind::ALL {
        let b = bounds[cache.index()];
        for (bound, max) in [(Bound::Entries, b.max_entries), (Bound::Bytes, b.max_bytes)] {
            let Some(max) = max else { continue };
            let reason = match max {
                0 => "must be greater than zero (leave unset for no bound)".to_owned(),
                _ => match check_bound(max) {
                    Ok(_) => continue,
                    Err(reason) => reason,
                },
            };
            return Err(Error::config(
                bound_variable(cache, &bound),
                max.to_string(),
                reason,
            ));
        }
    }
    Ok(())
}

/// Why `ttl` is not a valid TTL, if it is not.
pub(crate) fn check_ttl(ttl: Duration) -> std::result::Result<(), String> {
    if ttl.is_zero() {
        Err("a TTL must be greater than zero".to_owned())
    } else if ttl > MAX_TTL {
        Err(format!(
            "a TTL must be at most {} s (100 years)",
            MAX_TTL.as_secs()
        ))
    } else {
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
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
