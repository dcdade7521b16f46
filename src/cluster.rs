//! The cluster: one [`Engine`] per shard and the rule that routes a key to one.
//!
//! A cache over one database is a cluster of one shard (named
//! [`DEFAULT_SHARD`]), and every routing call short-cuts to it without hashing. With
//! several shards ([`CacheConfig::shards`]) each has its own engine: pool,
//! migrations, counters, fail-open state, near caches and poller, so a shard that is
//! down is that shard's problem only. A key goes to the shard [`ShardMap`] names
//! for its digest; a batch is split by shard and each part runs on its own thread
//! ([`Cluster::fan_out`]); operations over the whole cache run on every shard at
//! once ([`Cluster::each`]).

use std::fmt;
use std::sync::Arc;

use crate::config::CacheConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::key::KeyDigest;
use crate::near::{NearCacheStats, NearCaches};
use crate::pool::ConnectionPool;
use crate::shards::{ShardMap, DEFAULT_SHARD};

/// Every shard's engine, and the routing between them.
pub struct Cluster {
    /// The manager's configuration (each engine has its shard's copy).
    config: CacheConfig,
    map: ShardMap,
    /// In the map's order.
    engines: Vec<Arc<Engine>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("shards", &self.map.names())
            .field("engines", &self.engines)
            .finish()
    }
}

/// One part of a batch: the shard, and the positions in the batch of its items.
pub(crate) type Part = (usize, Vec<usize>);

impl Cluster {
    /// Starts every shard's engine, the shards at once. With several shards, one that
    /// is down at start (a transient failure) does not stop the start: its
    /// migrations run once it answers, and until then its keys fail (or miss, in
    /// fail-open mode). All of them down is an error, as for one database.
    ///
    /// # Errors
    /// As [`Engine::start`]; [`Error::Config`] for an application's pool with
    /// shards (the pool reaches one database).
    pub(crate) fn start(config: CacheConfig, app_pool: Option<ConnectionPool>) -> Result<Self> {
        if config.shards().is_empty() {
            let engine = Engine::start(config.clone(), app_pool, false)?;
            return Ok(Cluster {
                map: ShardMap::new([DEFAULT_SHARD])?,
                config,
                engines: vec![engine],
            });
        }
        if app_pool.is_some() {
            return Err(Error::config(
                "shards",
                "",
                "an application's pool reaches one database: give each shard its URL and let \
                 pgcache open the pools",
            ));
        }
        let map = ShardMap::new(config.shards().iter().map(|s| s.name().to_owned()))?;
        let started: Vec<Result<Arc<Engine>>> = std::thread::scope(|scope| {
            let starts: Vec<_> = config
                .shards()
                .iter()
                .map(|shard| {
                    let shard_config = config.for_shard(shard);
                    scope.spawn(move || Engine::start(shard_config, None, true))
                })
                .collect();
            starts
                .into_iter()
                .map(|start| {
                    start
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut engines = Vec::with_capacity(started.len());
        for (shard, engine) in config.shards().iter().zip(started) {
            engines.push(engine.map_err(|error| error.on_shard(shard.name()))?);
        }
        if !config.fail_open() && engines.iter().all(|engine| engine.was_down_at_start()) {
            // The same answer as one database that is down, unless a shard answers
            // by now (its start-up check only failed on something transient, such
            // as a slow connection under load): the first shard's error.
            let mut first_error = None;
            let answers =
                map.names()
                    .iter()
                    .zip(&engines)
                    .any(|(name, engine)| match engine.connection() {
                        Ok(_) => true,
                        Err(error) => {
                            first_error.get_or_insert_with(|| error.on_shard(name.as_str()));
                            false
                        }
                    });
            if let (false, Some(error)) = (answers, first_error) {
                return Err(error);
            }
        }
        Ok(Cluster {
            config,
            map,
            engines,
        })
    }

    /// The manager's configuration.
    pub(crate) fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The shards' names and the routing.
    pub(crate) fn map(&self) -> &ShardMap {
        &self.map
    }

    /// The first shard's engine: where an operation's span and errors are counted
    /// before it is routed, and the only engine of a cache that is not sharded.
    pub(crate) fn front(&self) -> &Engine {
        &self.engines[0]
    }

    /// The engine of the only shard, when there is one.
    pub(crate) fn single(&self) -> Option<&Engine> {
        match &self.engines[..] {
            [engine] => Some(engine),
            _ => None,
        }
    }

    /// Every shard's name and engine.
    pub(crate) fn shards(&self) -> impl Iterator<Item = (&str, &Arc<Engine>)> {
        self.map
            .names()
            .iter()
            .map(String::as_str)
            .zip(&self.engines)
    }

    /// The engine of the shard holding the key `digest` computes (not called with
    /// one shard).
    pub(crate) fn engine_for(&self, digest: impl FnOnce() -> KeyDigest) -> &Engine {
        match self.single() {
            Some(engine) => engine,
            None => &self.engines[self.map.shard_of(&digest())],
        }
    }

    /// The engine of the shard named `name`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the shards there are.
    pub(crate) fn engine_named(&self, name: &str) -> Result<&Engine> {
        let names = self.map.names();
        match names.iter().position(|n| n == name) {
            Some(i) => Ok(&self.engines[i]),
            None => Err(Error::InvalidInput {
                what: "shard",
                reason: format!("no shard is named `{name}`; the shards are {names:?}"),
            }),
        }
    }

    /// `error` as it happened on shard `name`: named when there are several.
    pub(crate) fn on_shard(&self, name: &str, error: Error) -> Error {
        match self.single() {
            Some(_) => error,
            None => error.on_shard(name),
        }
    }

    /// Every shard's pool, now, in the shards' order.
    pub(crate) fn pool_status(&self) -> Vec<crate::pool::PoolStatus> {
        self.shards()
            .map(|(name, engine)| engine.pool_status(name))
            .collect()
    }

    /// This process's near-cache figures over every shard, one entry per cache.
    pub(crate) fn near_cache_stats(&self) -> Vec<NearCacheStats> {
        NearCacheStats::merged(
            self.engines
                .iter()
                .map(|engine| engine.near().map(NearCaches::stats).unwrap_or_default()),
        )
    }

    /// Splits a batch of `len` items by shard: each shard touched and the positions
    /// of its items, in batch order.
    pub(crate) fn parts(&self, len: usize, digest_of: impl Fn(usize) -> KeyDigest) -> Vec<Part> {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); self.engines.len()];
        for i in 0..len {
            parts[self.map.shard_of(&digest_of(i))].push(i);
        }
        parts
            .into_iter()
            .enumerate()
            .filter(|(_, items)| !items.is_empty())
            .collect()
    }

    /// Runs `work` on each part's shard, the parts at once (a round trip each, on
    /// threads of their own, when more than one shard is touched); the results are
    /// in `parts` order. Every part runs to its end even when another fails.
    ///
    /// # Errors
    /// The first failed part's error (in `parts` order), naming its shard when
    /// there are several.
    pub(crate) fn fan_out<P: Sync, T: Send>(
        &self,
        parts: &[(usize, P)],
        work: impl Fn(&Engine, &P) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let run = |(shard, part): &(usize, P)| {
            work(&self.engines[*shard], part)
                .map_err(|error| self.on_shard(&self.map.names()[*shard], error))
        };
        match parts {
            [] => Ok(Vec::new()),
            [one] => Ok(vec![run(one)?]),
            _ => std::thread::scope(|scope| {
                let (first, rest) = parts.split_first().expect("more than one part");
                let others: Vec<_> = rest
                    .iter()
                    .map(|part| scope.spawn(move || run(part)))
                    .collect();
                let mut results = vec![run(first)];
                results.extend(others.into_iter().map(|other| {
                    other
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                }));
                results.into_iter().collect()
            }),
        }
    }

    /// Runs `work` on every shard at once (one thread per shard beyond the first);
    /// each shard's result, named, in shard order.
    pub(crate) fn each<T: Send>(
        &self,
        work: impl Fn(&Engine) -> Result<T> + Sync,
    ) -> Vec<(&str, Result<T>)> {
        let names = self.map.names().iter().map(String::as_str);
        let parts: Vec<(usize, ())> = (0..self.engines.len()).map(|i| (i, ())).collect();
        // Every result as a value, failures included: `fan_out` reports only the first.
        let results = self
            .fan_out(&parts, |engine, ()| Ok(work(engine)))
            .expect("each part's result is returned as a value");
        names.zip(results).collect()
    }

    /// [`each`](Self::each), failing with the first shard's error (named) after every
    /// shard has finished; for operations that must run everywhere.
    ///
    /// # Errors
    /// The first failed shard's error, as [`Error::Shard`] when there are several.
    pub(crate) fn all<T: Send>(
        &self,
        work: impl Fn(&Engine) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let parts: Vec<(usize, ())> = (0..self.engines.len()).map(|i| (i, ())).collect();
        self.fan_out(&parts, |engine, ()| work(engine))
    }
}
