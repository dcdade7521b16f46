//! The r2d2 pool and the settings every cache connection starts with.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ConnectionManager, CustomizeConnection};
use diesel::ConnectionError;

use crate::config::{CacheConfig, Durability};
use crate::conninfo::{client_timeouts, with_defaults};
use crate::error::{Error, Result};
use crate::watchdog::{no_answer_limit, watched, Watchdog};

pub(crate) type PgPool = r2d2::Pool<ConnectionManager<PgConnection>>;

/// A connection checked out of the cache's pool; derefs to `PgConnection`.
pub type PooledConnection = r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// Runs once per new connection: puts it under the pool's watchdog, and sets the
/// search path, statement timeout, application name and durability, so no cache
/// operation pays for them again.
#[derive(Debug)]
struct SessionSetup {
    sql: String,
    /// Dropped with the pool, which stops its thread.
    watchdog: Option<Watchdog>,
}

impl CustomizeConnection<PgConnection, r2d2::Error> for SessionSetup {
    fn on_acquire(&self, conn: &mut PgConnection) -> std::result::Result<(), r2d2::Error> {
        if let Some(watchdog) = &self.watchdog {
            watchdog.watch(conn);
        }
        watched(conn, |conn| Ok(conn.batch_execute(&self.sql)?)).map_err(|error| match error {
            Error::Database(error) => r2d2::Error::QueryError(error),
            other => {
                r2d2::Error::ConnectionError(ConnectionError::BadConnection(other.to_string()))
            }
        })
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
    let limit = no_answer_limit(config);
    let manager = ConnectionManager::<PgConnection>::new(with_defaults(
        config.database_url().expose(),
        &client_timeouts(settings.connection_timeout, limit),
    ));
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
            watchdog: Watchdog::start(limit),
        }))
        .build(manager)?;
    // With no idle minimum the pool opens nothing up front: check the server answers
    // now, so a wrong URL fails at start-up rather than on the first get. Fail-open
    // services start even while the database is down, and serve misses meanwhile.
    if !config.fail_open() {
        drop(pool.get()?);
    }
    Ok(pool)
}
