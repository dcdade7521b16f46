//! The r2d2 pool, the settings every cache connection starts with, and surviving
//! connections lost under the pool (killed backends, server restart, network cut)
//! without restarting the process.
//!
//! r2d2 discards a connection when Diesel reports it broken, but Diesel only notices
//! a dead socket when a statement it *executes* fails: when *preparing* a query
//! fails (the first use of each query on a connection), the connection is not
//! marked, r2d2 takes it back, and it fails again for the next caller, forever if
//! calls come more often than the idle timeout. So after any statement failed on a
//! pooled connection (seen by an instrumentation installed on every one, whoever ran
//! the statement: a cache operation or your own transaction on
//! `cache.connection()`), the next `max_size` checkouts are probed through the path
//! Diesel does watch ([`probe`]): the connections that died at the same moment
//! (server restart, killed backends) are marked and discarded before an operation
//! meets them. A cache operation whose connection turns out dead is run once more on
//! one that has just answered. A `SELECT 1` before every checkout would double the
//! cost of a get, so while nothing fails, nothing is probed. Every cache operation
//! is idempotent (a read, an upsert or a delete), so the retry cannot apply anything
//! twice. A statement PostgreSQL aborted to break a deadlock, or for a serialization
//! failure, is likewise retried once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ConnectionManager, CustomizeConnection};
use diesel::Connection;

use crate::config::{CacheConfig, Durability};
use crate::error::{Error, Result};

type PgPool = r2d2::Pool<ConnectionManager<PgConnection>>;

/// A connection checked out of the cache's pool; derefs to `PgConnection`.
pub type PooledConnection = r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// Runs once per new connection: search path, statement timeout, application name
/// and durability, so no cache operation pays for them again.
#[derive(Debug)]
struct SessionSetup {
    sql: String,
    suspicion: Suspicion,
}

impl CustomizeConnection<PgConnection, r2d2::Error> for SessionSetup {
    fn on_acquire(&self, conn: &mut PgConnection) -> std::result::Result<(), r2d2::Error> {
        conn.set_instrumentation(self.suspicion.clone());
        conn.batch_execute(&self.sql)
            .map_err(r2d2::Error::QueryError)
    }
}

/// How many checkouts are still to be probed; shared by the pool and the
/// instrumentation of each of its connections.
#[derive(Debug, Clone)]
struct Suspicion {
    remaining: Arc<AtomicU32>,
    pool_size: u32,
}

impl Suspicion {
    /// Every pooled connection may be dead: probe each at its next checkout.
    fn raise(&self) {
        self.remaining.fetch_max(self.pool_size, Ordering::Relaxed);
    }

    /// Whether this checkout is to be probed.
    fn take(&self) -> bool {
        self.remaining.load(Ordering::Relaxed) > 0
            && self
                .remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }
}

impl Instrumentation for Suspicion {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { error: Some(_), .. } = event {
            self.raise();
        }
    }
}

/// Quotes an SQL identifier (schema name) the way PostgreSQL's `quote_ident` does.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal; only for `SET`, which takes no bind parameters.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

pub(crate) fn session_sql(config: &CacheConfig) -> String {
    let mut sql = format!(
        "SET statement_timeout = {}; SET application_name = {};",
        config.statement_timeout().as_millis(),
        quote_literal(config.application_name())
    );
    if let Some(schema) = config.schema() {
        sql.push_str(&format!(" SET search_path TO {};", quote_ident(schema)));
    }
    if config.durability() == Durability::Relaxed {
        sql.push_str(" SET synchronous_commit = off;");
    }
    sql
}

/// Marks `conn` broken if it is dead, so r2d2 discards it when it is given back;
/// true if it was dead. `batch_execute` goes through Diesel's connection-status
/// bookkeeping whatever statement failed before.
fn probe(conn: &mut PgConnection) -> bool {
    conn.batch_execute("SELECT 1").is_err()
}

/// The cache's connection pool.
pub(crate) struct Pool {
    pool: PgPool,
    suspicion: Suspicion,
}

impl Pool {
    /// Builds the pool; unless in fail-open mode, checks that the server answers, so
    /// a wrong URL fails at start-up rather than on the first get.
    pub(crate) fn new(config: &CacheConfig) -> Result<Self> {
        let settings = config.pool();
        let suspicion = Suspicion {
            remaining: Arc::new(AtomicU32::new(0)),
            pool_size: settings.max_size,
        };
        let manager = ConnectionManager::<PgConnection>::new(config.database_url().expose());
        let pool = r2d2::Pool::builder()
            .max_size(settings.max_size)
            .min_idle(Some(settings.min_idle))
            .idle_timeout(Some(settings.idle_timeout))
            .connection_timeout(settings.connection_timeout)
            // See the module docs: probed after failures instead.
            .test_on_check_out(false)
            .connection_customizer(Box::new(SessionSetup {
                sql: session_sql(config),
                suspicion: suspicion.clone(),
            }))
            .build(manager)?;
        let pool = Pool { pool, suspicion };
        if !config.fail_open() {
            drop(pool.checkout()?);
        }
        Ok(pool)
    }

    /// The pool's current state (for `Debug`).
    pub(crate) fn state(&self) -> r2d2::State {
        self.pool.state()
    }

    /// A connection not known to be dead: probed first while connections are
    /// suspect (see the module docs). Dead ones met on the way are discarded.
    /// Bounded: the pool holds at most `max_size` dead connections, after which it
    /// opens a fresh one or fails after its connection timeout.
    pub(crate) fn checkout(&self) -> Result<PooledConnection> {
        for _ in 0..=self.pool.max_size() {
            let mut conn = self.pool.get()?;
            if !self.suspicion.take() || !probe(&mut conn) {
                return Ok(conn);
            }
            self.suspicion.raise();
        }
        Err(Error::Connection(
            "every pooled connection was dead and no new one answered".into(),
        ))
    }

    /// A connection that has just answered a probe, for maintenance work (statistics,
    /// health, cleanup) whose cost dwarfs the extra round trip.
    pub(crate) fn live(&self) -> Result<PooledConnection> {
        for _ in 0..=self.pool.max_size() {
            let mut conn = self.checkout()?;
            if !probe(&mut conn) {
                return Ok(conn);
            }
            self.suspicion.raise();
        }
        Err(Error::Connection(
            "every pooled connection was dead and no new one answered".into(),
        ))
    }

    /// Runs `op` on a pooled connection; once more, on a live connection, if the
    /// first one turned out to be dead or PostgreSQL aborted the statement to
    /// resolve a conflict.
    pub(crate) fn run<T>(&self, op: impl Fn(&mut PgConnection) -> Result<T>) -> Result<T> {
        let mut conn = self.checkout()?;
        match op(&mut conn) {
            Err(error) if error.is_database_failure() && probe(&mut conn) => {
                drop(conn);
                self.suspicion.raise();
                tracing::warn!(%error, "pgcache: connection lost; retrying once on a live connection");
                op(&mut *self.checkout()?)
            }
            // PostgreSQL rolled the statement back to break a deadlock (or a
            // serialization conflict): running it again normally succeeds.
            Err(error) if error.is_retryable_conflict() => {
                tracing::debug!(%error, "pgcache: retrying once after a conflict");
                op(&mut conn)
            }
            other => other,
        }
    }
}
