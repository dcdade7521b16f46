//! The session every connection of the cache's own pool starts with, set once per
//! connection ([`SessionSetup`], [`session_sql`]), the connection string it
//! connects with ([`conninfo`]), and connections of their own outside the pool
//! with the same settings ([`dedicated`]).

use diesel::connection::{InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::r2d2::{self, CustomizeConnection};
use diesel::{Connection, ConnectionError};

use super::health::Observer;
use crate::config::{CacheConfig, Durability};
use crate::database_url::{client_timeouts, with_defaults};
use crate::error::{Error, Result};
use crate::tables::quote_ident;
use crate::watchdog::{no_answer_limit, watched, Watchdog};

/// Runs once per new connection: search path, statement timeout, application name
/// and durability, so no cache operation pays for them again; in
/// transaction-pooler mode, only Diesel's statement cache turned off (see
/// [`session_sql`]).
#[derive(Debug)]
pub(super) struct SessionSetup {
    pub(super) sql: String,
    /// Transaction-pooler mode: no statement cache (see [`unprepared`]).
    pub(super) sessionless: bool,
    pub(super) observer: Observer,
    /// Dropped with the pool (and the prober), which stops its thread.
    pub(super) watchdog: Option<Watchdog>,
}

impl CustomizeConnection<PgConnection, r2d2::Error> for SessionSetup {
    fn on_acquire(&self, conn: &mut PgConnection) -> std::result::Result<(), r2d2::Error> {
        match &self.watchdog {
            Some(watchdog) => watchdog.adopt(conn, Box::new(self.observer.clone())),
            None => conn.set_instrumentation(self.observer.clone()),
        }
        if self.sessionless {
            unprepared(conn);
            return Ok(());
        }
        watched(conn, |conn| Ok(conn.batch_execute(&self.sql)?)).map_err(|error| match error {
            Error::Database(error) => r2d2::Error::QueryError(error),
            other => {
                r2d2::Error::ConnectionError(ConnectionError::BadConnection(other.to_string()))
            }
        })
    }
}

/// Turns Diesel's prepared-statement cache off on `conn`, for a connection through
/// a transaction pooler: a named statement prepared on one server connection would
/// be executed later on whichever the pooler hands out next ("prepared statement
/// ... does not exist", or "already exists" on one another client prepared it on).
/// Without the cache Diesel sends each statement unnamed, its parse, bind and
/// execute in one message sequence ending in one `Sync` (libpq's
/// `PQsendQueryParams`), which a pooler in transaction mode never splits across
/// server connections; inside a transaction the server connection is pinned anyway.
pub(crate) fn unprepared(conn: &mut PgConnection) {
    conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
}

/// Quotes an SQL string literal; only for `SET`, which takes no bind parameters.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The session a cache connection starts with. In transaction-pooler mode none at
/// all: the server connection under it is shared with other clients, which would
/// inherit every setting (and a setting made on one server connection is missing
/// on the next). There `statement_timeout` is not set (the watchdog still cuts a
/// statement left unanswered, client-side; operations allowed longer set their
/// own with `SET LOCAL`), nor `plan_cache_mode` (no statement outlives one
/// execution, so there is no cached plan to choose), `application_name` is in the
/// connection string (PgBouncer passes it on to the server connection, see
/// [`conninfo`]), the search path is not needed (statements name the cache's
/// schema), relaxed durability is refused by the configuration, and changes are
/// not stamped ([`crate::migrations::stamps_changes`]: the update triggers log
/// them).
pub(crate) fn session_sql(config: &CacheConfig) -> String {
    if config.sessionless() {
        return String::new();
    }
    // Generic plans always: every statement the cache prepares looks rows up by key,
    // and on hash-partitioned tables PostgreSQL's default would re-plan each
    // execution (a generic plan costed over every partition never wins), when the
    // generic plan prunes to one partition as it starts.
    let mut sql = format!(
        "SET statement_timeout = {}; SET application_name = {}; \
         SET plan_cache_mode = force_generic_plan;",
        config.statement_timeout().as_millis(),
        quote_literal(config.application_name())
    );
    // The cache's schema first, then the server's default path (the role's or
    // database's, `"$user", public` by default): pgcache's own statements name
    // their tables with the schema, and a caller's statements on
    // `cache.connection()` find the application's tables as on any connection.
    let schema = quote_literal(&quote_ident(config.schema()));
    sql.push_str(&format!(
        " SELECT set_config('search_path', CASE current_setting('search_path') \
           WHEN '' THEN {schema} ELSE {schema} || ', ' || current_setting('search_path') END, \
           false);"
    ));
    if config.durability() == Durability::Relaxed {
        sql.push_str(" SET synchronous_commit = off;");
    }
    if crate::migrations::stamps_changes(config) {
        sql.push_str(&format!(
            " SET {} = 'on';",
            crate::migrations::STAMPING_SETTING
        ));
    }
    sql
}

/// The connection string of `config`'s connections: its URL with pgcache's
/// client-side timeouts and, in transaction-pooler mode, its `application_name`
/// (where a session `SET` would outlive the cache's use of the server connection,
/// a start-up parameter is one a pooler tracks per client), unless the URL sets
/// them.
pub(super) fn conninfo(config: &CacheConfig) -> String {
    let mut params = client_timeouts(config.pool().connection_timeout, no_answer_limit(config));
    if config.sessionless() {
        params.push(("application_name", config.application_name().to_owned()));
    }
    with_defaults(config.database_url().expose(), &params)
}

/// A connection of its own (outside the pool) with the pool's connection settings
/// and session: for the near caches' poller, which holds it for good, and for the
/// outage's prober, which tries the database with it. Watched by
/// `watchdog` when there is one, as pooled connections are, so statements run
/// through [`watched`] on it are cut when the server does not answer.
pub(crate) fn dedicated(config: &CacheConfig, watchdog: Option<&Watchdog>) -> Result<PgConnection> {
    let mut conn = match watchdog {
        Some(watchdog) => watchdog.open(
            || establish(config),
            Box::new(|_: InstrumentationEvent<'_>| {}),
        )?,
        None => establish(config)?,
    };
    let sql = match session_sql(config) {
        // No session to set up: still a query, which tests the connection.
        sql if sql.is_empty() => "SELECT 1".to_owned(),
        sql => sql,
    };
    if config.sessionless() {
        unprepared(&mut conn);
    }
    watched(&mut conn, |conn| Ok(conn.batch_execute(&sql)?))?;
    Ok(conn)
}

/// One connection attempt outside the pool, bounded by libpq's connect timeout;
/// its error (scrubbed of the password) is the server's own.
pub(super) fn establish(config: &CacheConfig) -> Result<PgConnection> {
    PgConnection::establish(&conninfo(config))
        .map_err(|e| Error::connection(&config.database_url().scrub(&e.to_string())))
}
