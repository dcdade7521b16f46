//! The r2d2 pool and the settings every cache connection starts with.

use std::sync::{Arc, Mutex, PoisonError};

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::event::AcquireEvent;
use diesel::r2d2::{self, ConnectionManager, CustomizeConnection, HandleError, HandleEvent};

use crate::config::{CacheConfig, Durability};
use crate::database_url::DatabaseUrl;
use crate::error::{Error, Result};

/// The cache's connection pool. Its errors never carry the connection string's
/// password, even where libpq's message echoes part of the string, and a timeout
/// says why the connections it waited for could not be opened.
pub(crate) struct PgPool {
    pool: r2d2::Pool<ConnectionManager<PgConnection>>,
    failures: Arc<ConnectFailures>,
}

impl PgPool {
    /// Checks a connection out, waiting at most the connection timeout.
    pub(crate) fn get(&self) -> Result<PooledConnection> {
        self.pool.get().map_err(|e| self.failures.error(&e))
    }

    pub(crate) fn max_size(&self) -> u32 {
        self.pool.max_size()
    }

    pub(crate) fn state(&self) -> r2d2::State {
        self.pool.state()
    }
}

/// What the pool's last connection attempt reported.
#[derive(Debug)]
struct ConnectFailures {
    url: DatabaseUrl,
    /// The last failed attempt's message, scrubbed; cleared by a success. r2d2 hands
    /// its own copy to only one of the callers timing out together, and others then
    /// learn nothing of the cause (an unknown database passing for a slow server).
    last: Mutex<Option<String>>,
}

impl ConnectFailures {
    /// The pool's error as an [`Error::Connection`], scrubbed, with the cause of
    /// the timeout when r2d2 did not give it.
    fn error(&self, error: &r2d2::PoolError) -> Error {
        let message = self.url.scrub(&error.to_string());
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match last.as_deref() {
            // r2d2's message is "timed out waiting for connection[: cause]".
            Some(cause) if !message.contains(':') => {
                Error::connection(&format!("{message}: {cause}"))
            }
            _ => Error::connection(&message),
        }
    }
}

/// r2d2's error and event handler: records (instead of r2d2's own logging, which
/// would print the unscrubbed message) each failed connection attempt.
#[derive(Debug)]
struct FailureLog(Arc<ConnectFailures>);

impl HandleError<r2d2::Error> for FailureLog {
    fn handle_error(&self, error: r2d2::Error) {
        let message = self.0.url.scrub(&error.to_string());
        // Debug: the pool retries in the background, and the caller gets the cause.
        tracing::debug!(error = %message, "pgcache: opening a connection failed");
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(message);
    }
}

impl HandleEvent for FailureLog {
    fn handle_acquire(&self, _: AcquireEvent) {
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// A connection checked out of the cache's pool; derefs to `PgConnection`.
pub type PooledConnection = r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// Runs once per new connection: search path, statement timeout, application name
/// and durability, so no cache operation pays for them again.
#[derive(Debug)]
struct SessionSetup {
    sql: String,
}

impl CustomizeConnection<PgConnection, r2d2::Error> for SessionSetup {
    fn on_acquire(&self, conn: &mut PgConnection) -> std::result::Result<(), r2d2::Error> {
        conn.batch_execute(&self.sql)
            .map_err(r2d2::Error::QueryError)
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

pub(crate) fn build_pool(config: &CacheConfig) -> Result<PgPool> {
    let settings = config.pool();
    let manager = ConnectionManager::<PgConnection>::new(config.database_url().expose());
    let failures = Arc::new(ConnectFailures {
        url: config.database_url().clone(),
        last: Mutex::new(None),
    });
    let pool = r2d2::Pool::builder()
        .max_size(settings.max_size)
        .min_idle(Some(settings.min_idle))
        .idle_timeout(Some(settings.idle_timeout))
        .connection_timeout(settings.connection_timeout)
        // A `SELECT 1` before every checkout would double the cost of a get; broken
        // connections are detected when a query fails and are then discarded.
        .test_on_check_out(false)
        .connection_customizer(Box::new(SessionSetup {
            sql: session_sql(config),
        }))
        .error_handler(Box::new(FailureLog(Arc::clone(&failures))))
        .event_handler(Box::new(FailureLog(Arc::clone(&failures))))
        .build(manager)
        .map_err(|e| failures.error(&e))?;
    let pool = PgPool { pool, failures };
    // With no idle minimum the pool opens nothing up front: check the server answers
    // now, so a wrong URL fails at start-up rather than on the first get. Fail-open
    // services start even while the database is down, and serve misses meanwhile.
    if !config.fail_open() {
        drop(pool.get()?);
    }
    Ok(pool)
}
