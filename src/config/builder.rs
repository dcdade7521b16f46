//! [`CacheConfigBuilder`]: every setter, its default, and the checks of `build`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::env::{bound_setting, warn_if_misspelt, Bound, SECRET_SETTINGS, VARIABLES};
use super::{
    check_bound, check_early_refresh_beta, check_low_watermark, CacheConfig, Durability, NearCache,
    Pooler, Shard, DEFAULT_DATABASE_URL,
};
use crate::codec::{Codec, CodecSettings};
use crate::database_url::DatabaseUrl;
use crate::error::{Error, Result};
use crate::expiry::check_ttl;
use crate::kind::CacheKind;

/// Builder for [`CacheConfig`]; every setter consumes and returns the builder.
///
/// It holds the configuration being built and, for each setting read from the
/// environment, the variable it came from: an invalid value is reported under the
/// name the caller used, the variable's or the setter's.
#[derive(Debug, Clone)]
#[must_use]
pub struct CacheConfigBuilder {
    pub(super) config: CacheConfig,
    /// Unchecked until [`Self::build`], as the setters cannot fail.
    database_url: UnparsedUrl,
    /// Shard names and their unchecked URLs, in the order given.
    pub(super) shards: Vec<(String, UnparsedUrl)>,
    /// Unchecked until [`Self::build`].
    direct_url: Option<UnparsedUrl>,
    /// Setting (setter name) to the variable and value it was read from.
    from_env: HashMap<String, (String, String)>,
    /// Compression and encryption, unchecked until [`Self::build`] (its `Debug`
    /// shows no key material).
    pub(super) codec: CodecSettings,
}

impl Default for CacheConfigBuilder {
    fn default() -> Self {
        CacheConfigBuilder {
            config: CacheConfig::defaults(),
            database_url: UnparsedUrl(DEFAULT_DATABASE_URL.to_owned()),
            shards: Vec::new(),
            direct_url: None,
            from_env: HashMap::new(),
            codec: CodecSettings::default(),
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

    /// Idle connections the pool keeps open (see [`PoolSettings::min_idle`](super::PoolSettings::min_idle) before
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
    /// [`DEFAULT_SCHEMA`](super::DEFAULT_SCHEMA) (`pgcache`).
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
    /// this timeout + 1 s for them. Default: [`DEFAULT_MIGRATION_TIMEOUT`](super::DEFAULT_MIGRATION_TIMEOUT) (10 minutes).
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

    /// The watchdog: a statement the server leaves unanswered for
    /// `statement_timeout` plus 1 s (a frozen server, a network path that swallows
    /// traffic, where the server's own timeout cannot fire) is cut client side by
    /// shutting down its connection's socket, and the operation fails with
    /// [`Error::Unresponsive`]. Each connection's socket is recorded as the
    /// connection is made; one that cannot be told apart is not watched. Off, a
    /// statement waits for the server however long (as any libpq client). Needs a
    /// readable `/proc/self/fd` (Linux). Default: on.
    pub fn watchdog(self, on: bool) -> Self {
        self.set("watchdog", |c| c.watchdog = on)
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

    /// Early refresh, stale-while-revalidate: how long past its freshness (the TTL
    /// it was computed with) `get_or_compute` still serves a value at once while
    /// one caller, across every process, recomputes it (the one that takes the
    /// key's lease; the others do not wait). Past the window, callers wait for one
    /// computation as they do for a missing key. The value is stored for its TTL
    /// plus this window, so a plain `get` (and `ttl`) sees it until then. Applies
    /// to values stored from now on. Default: zero, off.
    pub fn stale_while_revalidate(self, window: Duration) -> Self {
        self.set("stale_while_revalidate", |c| {
            c.stale_while_revalidate = window;
        })
    }

    /// Early refresh, XFetch (Vattani et al., VLDB 2015): `get_or_compute`
    /// recomputes a fresh value before it expires when `now - delta * beta *
    /// ln(random) >= expiry`, `delta` being how long its last computation took (kept
    /// with the entry, so every process weighs it alike). Larger is earlier; the
    /// recomputation is single flight like any other (a caller that draws it but
    /// finds the lease taken returns the current value). Zero turns it off, and
    /// with it and [`stale_while_revalidate`](Self::stale_while_revalidate) both
    /// off `get_or_compute` stores plain entries as before. Must be finite and not
    /// negative. Default: [`DEFAULT_EARLY_REFRESH_BETA`](crate::DEFAULT_EARLY_REFRESH_BETA), 1.0.
    pub fn early_refresh_beta(self, beta: f64) -> Self {
        self.set("early_refresh_beta", |c| c.early_refresh_beta = beta)
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

    /// The most payload bytes `cache` may hold (`None`: no bound; see [`SizeBounds`](super::SizeBounds)
    /// for what counts), enforced like [`max_entries`](Self::max_entries).
    /// Default: none.
    pub fn max_bytes(self, cache: CacheKind, max: Option<u64>) -> Self {
        self.set(&bound_setting(cache, Bound::Bytes), |c| {
            c.size_bounds[cache.index()].max_bytes = max;
        })
    }

    /// The fraction (0 to 1) of a bound that eviction brings an over-bound cache
    /// down to, so that it is not over again after a few writes. Default:
    /// [`DEFAULT_EVICTION_LOW_WATERMARK`](super::DEFAULT_EVICTION_LOW_WATERMARK) (0.8).
    pub fn eviction_low_watermark(self, fraction: f64) -> Self {
        self.set("eviction_low_watermark", |c| {
            c.eviction_low_watermark = fraction;
        })
    }

    /// An in-process near cache in front of `cache`'s table (`None`: none, the
    /// default): reads of hot keys are answered from memory, kept coherent with every
    /// writer of the database through triggers and a poller (see
    /// docs/design/near-cache.md for what is promised).
    pub fn near_cache(self, cache: CacheKind, near: Option<NearCache>) -> Self {
        self.set(&format!("near_cache({})", cache.name()), |c| {
            c.near_caches[cache.index()] = near;
        })
    }

    /// After a write commits anywhere, how long a near cache may still return the
    /// old value at most, even if notifications are delayed or lost: past it the near
    /// caches are bypassed until the channel proves current again. Default:
    /// [`DEFAULT_NEAR_CACHE_STALENESS`](super::DEFAULT_NEAR_CACHE_STALENESS) (100 ms).
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

    /// Values of more than `bytes` bytes (key/value JSON text and bytes, LLM
    /// responses) are stored compressed with zstd, and read back transparently;
    /// `None` turns compression off. Entries stored before, either way, still read.
    /// Default: `Some(`[`DEFAULT_COMPRESSION_THRESHOLD`]`)` (1 KiB).
    ///
    /// [`DEFAULT_COMPRESSION_THRESHOLD`]: crate::DEFAULT_COMPRESSION_THRESHOLD
    pub fn compression_threshold(mut self, bytes: Option<usize>) -> Self {
        self.from_env.remove("compression_threshold");
        self.codec.compress_above = bytes;
        self
    }

    /// Adds an encryption key (32 bytes) under `id` (1 to 32 characters of `A-Z a-z
    /// 0-9 . _ -`), which values are then sealed with (XChaCha20-Poly1305) or read
    /// with. The first key added is the primary: new values are sealed with it,
    /// and every key opens what it sealed, so keys rotate by putting a new key
    /// first and keeping the old ones until their entries have expired (see the
    /// guide). Keys given here replace those of `PGCACHE_ENCRYPTION_KEYS`. The key
    /// is never shown in `Debug`, messages or logs. Default: no keys, values are
    /// not encrypted.
    pub fn encryption_key(mut self, id: impl Into<String>, key: impl AsRef<[u8]>) -> Self {
        if self.from_env.remove("encryption_keys").is_some() {
            self.codec.keys.clear();
        }
        self.codec.keys.push((id.into(), key.as_ref().to_vec()));
        self
    }

    /// Stores key/value keys as keyed hashes (HMAC-SHA256 under a key derived from
    /// the encryption key `key_id`), so the table reveals no key text. Prefixes
    /// cannot be found among hashes: [`KvCache::delete_prefix`] and
    /// [`KvCache::find_containing`] are then refused. Keep `key_id` in the ring
    /// for as long as it hashes: changing it leaves every key/value entry unread
    /// until it expires. Default: `None`, keys are stored as given.
    ///
    /// [`KvCache::delete_prefix`]: crate::KvCache::delete_prefix
    /// [`KvCache::find_containing`]: crate::KvCache::find_containing
    pub fn hash_kv_keys(mut self, key_id: Option<String>) -> Self {
        self.from_env.remove("hash_kv_keys");
        self.codec.hash_kv_keys = key_id;
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
    /// `max_entries(kv)`, ...). An encryption key of the wrong length or with a
    /// bad id, or key hashing under an id no key has, names the key's id, never the
    /// key.
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
        type Check = fn(f64) -> std::result::Result<(), String>;
        let numbers = [
            (
                "early_refresh_beta",
                c.early_refresh_beta,
                check_early_refresh_beta as Check,
            ),
            (
                "eviction_low_watermark",
                c.eviction_low_watermark,
                check_low_watermark,
            ),
        ];
        for (setting, number, check) in numbers {
            check(number).map_err(|reason| self.invalid(setting, number.to_string(), reason))?;
        }
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
        config.codec = Codec::new(&self.codec)
            .map_err(|(setting, value, reason)| self.invalid(setting, value, reason))?
            .into();
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

/// A connection string as given to the builder, whose `Debug` hides its password
/// as [`DatabaseUrl`]'s does.
#[derive(Clone)]
pub(super) struct UnparsedUrl(String);

impl fmt::Debug for UnparsedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DatabaseUrl::parse(&self.0) {
            Ok(url) => fmt::Debug::fmt(&url, f),
            // Where its password ends is unknown: show none of it.
            Err(_) => f.write_str("DatabaseUrl(<invalid, not shown>)"),
        }
    }
}
