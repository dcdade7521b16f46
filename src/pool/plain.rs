//! Connections for the caller while caching is disabled (`ENABLE_CACHING=false`):
//! the cache has no pool then, but `cache.connection()` must still hand one out, so
//! that code written for the cache (`*_in` inside the application's transaction)
//! runs unchanged with the cache off.

use std::sync::OnceLock;

use diesel::pg::PgConnection;
use diesel::r2d2::{self, ConnectionManager};

use super::{ConnectionPool, PoolSource, PoolStatus, PooledConnection};
use crate::config::CacheConfig;
use crate::database_url::{client_timeouts, with_defaults};
use crate::error::{Error, Result};
use crate::watchdog::no_answer_limit;

/// Where a disabled cache's connections come from.
pub(crate) enum Plain {
    /// The application's pool (`with_pool`): its connections, as they are.
    App(ConnectionPool),
    /// Plain connections to the configured URL (no session setting of the cache's:
    /// the server's defaults, so the application's tables are found as on any
    /// connection of its own), from a pool built at the first call, never opening
    /// a connection before one is asked for and keeping none idle.
    Lazy {
        config: Box<CacheConfig>,
        pool: OnceLock<ConnectionPool>,
    },
}

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plain::App(_) => f.write_str("Plain::App"),
            Plain::Lazy { pool, .. } => f
                .debug_struct("Plain::Lazy")
                .field("built", &pool.get().is_some())
                .finish(),
        }
    }
}

impl Plain {
    /// The application's pool if there is one, else plain connections to the
    /// configured URL, with the pool's size and timeouts.
    pub(crate) fn new(config: &CacheConfig, app_pool: Option<ConnectionPool>) -> Self {
        match app_pool {
            Some(pool) => Plain::App(pool),
            None => Plain::Lazy {
                config: Box::new(config.clone()),
                pool: OnceLock::new(),
            },
        }
    }

    /// What the pool holds now (nothing open before the first call, standalone).
    pub(crate) fn status(&self, shard: &str) -> PoolStatus {
        let (max_size, state) = match self {
            Plain::App(pool) => (pool.max_size(), Some(pool.state())),
            Plain::Lazy { config, pool } => {
                (config.pool().max_size, pool.get().map(r2d2::Pool::state))
            }
        };
        PoolStatus {
            shard: shard.to_owned(),
            source: PoolSource::Disabled,
            max_size,
            open: state.as_ref().map_or(0, |s| s.connections),
            idle: state.as_ref().map_or(0, |s| s.idle_connections),
            parked: 0,
            waiting: 0,
        }
    }

    /// A connection, waiting at most the pool's connection timeout.
    ///
    /// # Errors
    /// [`Error::Connection`] when none can be had in time (the password scrubbed).
    pub(crate) fn get(&self) -> Result<PooledConnection> {
        let (pool, config) = match self {
            Plain::App(pool) => (pool, None),
            Plain::Lazy { config, pool } => (pool.get_or_init(|| build(config)), Some(config)),
        };
        pool.get().map_err(|e| match config {
            Some(config) => Error::connection(&config.database_url().scrub(&e.to_string())),
            None => Error::connection(&e.to_string()),
        })
    }
}

fn build(config: &CacheConfig) -> ConnectionPool {
    let settings = config.pool();
    let url = with_defaults(
        config.database_url().expose(),
        &client_timeouts(settings.connection_timeout, no_answer_limit(config)),
    );
    r2d2::Pool::builder()
        .max_size(settings.max_size)
        .min_idle(Some(0))
        .idle_timeout(Some(settings.idle_timeout))
        .connection_timeout(settings.connection_timeout)
        // A failed attempt reaches the caller in `get`'s error, scrubbed there.
        .error_handler(Box::new(r2d2::NopErrorHandler))
        .build_unchecked(ConnectionManager::<PgConnection>::new(url))
}
