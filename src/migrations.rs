//! Embedded migrations and the switch between logged and unlogged cache tables.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::{Pg, PgConnection};
use diesel::sql_types::{Array, Bool, Integer, Nullable, Text, Timestamptz};
use diesel::{Connection, QueryResult, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::config::CacheConfig;
use crate::error::{Error, MigrationError, Result};
use crate::kind::CacheKind;
use crate::near::protocol;
use crate::tables::{quote_ident, Tables};

/// The SQL migrations compiled into the crate.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The first key of every schema's migration lock (the second is the schema name's
/// `hashtext`): a two-key advisory lock never conflicts with an application's
/// one-key (`bigint`) locks.
const LOCK_CLASS: i32 = 726_281_731;

/// The migration lock of one schema, which serialises the processes changing that
/// schema's tables (migrating, partitioning, installing near-cache triggers) and
/// nothing else: a migration or partitioning elsewhere in the database never holds
/// up this schema's starts. Its wait, and the statements of migrations and
/// partitioning, run under the migration timeout, not the statement timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SchemaLock<'a> {
    schema: &'a str,
    /// `None`: under the connection's own `statement_timeout` (an application's
    /// connection, given to [`run_migrations`]; the near-cache poller's).
    timeout: Option<Duration>,
}

impl<'a> SchemaLock<'a> {
    /// The lock of `config`'s schema, with its migration timeout.
    pub(crate) fn of(config: &'a CacheConfig) -> Self {
        SchemaLock {
            schema: config.schema(),
            timeout: Some(config.migration_timeout()),
        }
    }

    /// The lock of `config`'s schema, waited for under the connection's own
    /// statement timeout: for the near-cache poller, which tries again later, and
    /// whose thread must stay quick to stop.
    pub(crate) fn briefly(config: &'a CacheConfig) -> Self {
        SchemaLock {
            schema: config.schema(),
            timeout: None,
        }
    }

    /// The schema it locks.
    pub(crate) fn schema(&self) -> &'a str {
        self.schema
    }

    /// Runs `op` with this thread's statements allowed the migration timeout by the
    /// watchdog (which would otherwise cut them at the statement timeout).
    pub(crate) fn extended<T>(&self, op: impl FnOnce() -> T) -> T {
        match self.timeout {
            Some(timeout) => crate::watchdog::extended(timeout, op),
            None => op(),
        }
    }

    /// Gives the statements of the transaction `conn` is in the migration timeout
    /// (`SET LOCAL`: the connection keeps its own afterwards).
    pub(crate) fn limit_transaction(&self, conn: &mut PgConnection) -> QueryResult<()> {
        match self.timeout {
            Some(timeout) => conn.batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                timeout.as_millis().min(i32::MAX as u128)
            )),
            None => Ok(()),
        }
    }

    /// Takes the lock, waiting at most the migration timeout.
    fn acquire(&self, conn: &mut PgConnection) -> QueryResult<()> {
        let lock = |conn: &mut PgConnection| {
            diesel::sql_query("SELECT pg_advisory_lock($1, hashtext($2))")
                .bind::<Integer, _>(LOCK_CLASS)
                .bind::<Text, _>(self.schema)
                .execute(conn)
                .map(drop)
        };
        match self.timeout {
            // In a transaction of its own, for the `SET LOCAL`; the lock is the
            // session's, held past its end.
            Some(_) => self.extended(|| {
                conn.transaction(|conn| {
                    self.limit_transaction(conn)?;
                    lock(conn)
                })
            }),
            None => lock(conn),
        }
    }

    fn release(&self, conn: &mut PgConnection) -> QueryResult<()> {
        diesel::sql_query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind::<Integer, _>(LOCK_CLASS)
            .bind::<Text, _>(self.schema)
            .execute(conn)
            .map(drop)
    }
}

/// Runs pgcache's pending migrations into `config`'s schema as a manager does
/// (start-up, catch-up, [`CacheManager::run_migrations`](crate::CacheManager::run_migrations)):
/// see [`migrate_into`], with the migration timeout.
pub(crate) fn migrate(conn: &mut PgConnection, config: &CacheConfig) -> Result<Vec<String>> {
    migrate_into(conn, SchemaLock::of(config))
}

/// Runs the pending migrations into `lock`'s schema and returns the versions
/// applied; nothing, and no lock taken, when the schema's history already lists
/// every migration. Otherwise on `conn` with the search path set to the schema
/// alone (restored afterwards, also on failure), so that Diesel records them in the
/// schema's own `__diesel_schema_migrations`.
fn migrate_into(conn: &mut PgConnection, lock: SchemaLock<'_>) -> Result<Vec<String>> {
    #[derive(QueryableByName)]
    struct Path {
        #[diesel(sql_type = Text)]
        path: String,
    }
    if !pending(conn, lock.schema)? {
        return Ok(Vec::new());
    }
    let before: Path =
        diesel::sql_query("SELECT current_setting('search_path') AS path").get_result(conn)?;
    let set_path = |conn: &mut PgConnection, path: &str| {
        diesel::sql_query("SELECT set_config('search_path', $1, false) AS path")
            .bind::<Text, _>(path)
            .get_result::<Path>(conn)
            .map(drop)
    };
    set_path(conn, &quote_ident(lock.schema))?;
    let result = lock.extended(|| run_pending(conn, lock));
    let restored = set_path(conn, &before.path);
    let applied = result?;
    restored?;
    Ok(applied)
}

/// The versions of the embedded migrations.
fn versions() -> Result<Vec<String>> {
    Ok(MigrationSource::<Pg>::migrations(&MIGRATIONS)
        .map_err(|e| Error::Migration(MigrationError::caused_by(e.to_string(), e)))?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

/// `schema`'s migration history, schema-qualified, for statements on any search
/// path.
fn history(schema: &str) -> String {
    format!("{}.__diesel_schema_migrations", quote_ident(schema))
}

/// Whether `schema`'s migration history exists and this role may read it.
fn history_readable(conn: &mut PgConnection, schema: &str) -> QueryResult<bool> {
    let readable: Flag = diesel::sql_query(
        "SELECT coalesce(has_table_privilege(to_regclass($1), 'SELECT'), false) AS flag",
    )
    .bind::<Text, _>(history(schema))
    .get_result(conn)?;
    Ok(readable.flag)
}

/// `select` (naming the history `{history}`, the embedded versions `$1`) over
/// `schema`'s history; `None` when the history is missing or not readable by this
/// role, checked first: a statement naming such a table fails.
fn read_history<R: QueryableByName<Pg> + 'static>(
    conn: &mut PgConnection,
    schema: &str,
    select: &str,
) -> Result<Option<R>> {
    if !history_readable(conn, schema)? {
        return Ok(None);
    }
    Ok(Some(
        diesel::sql_query(select.replace("{history}", &history(schema)))
            .bind::<Array<Text>, _>(versions()?)
            .get_result(conn)?,
    ))
}

/// Whether `schema`'s history lacks an embedded migration; also when it cannot be
/// read (missing, or not readable by this role: the run will say what is wrong).
/// Reads only, so it takes no lock.
fn pending(conn: &mut PgConnection, schema: &str) -> Result<bool> {
    let complete: Option<Flag> = read_history(
        conn,
        schema,
        "SELECT array(SELECT version::text FROM {history}) @> $1 AS flag",
    )?;
    Ok(!complete.is_some_and(|complete| complete.flag))
}

/// Runs every pending migration on `conn`, whose search path is `lock`'s schema
/// (created if missing), and returns the versions applied. Diesel records them in
/// the `__diesel_schema_migrations` the search path finds, so in the schema's own.
///
/// Everything happens under the schema's lock, creating the schema included:
/// `CREATE SCHEMA IF NOT EXISTS` is not safe against a concurrent create of the same
/// schema, so replicas starting together on a fresh database would otherwise fail on
/// a unique violation in `pg_namespace`. The run is one transaction, with the
/// migration timeout. A failure for want of privileges says what to do
/// ([`explain_missing_privilege`]).
fn run_pending(conn: &mut PgConnection, lock: SchemaLock<'_>) -> Result<Vec<String>> {
    locked(conn, lock, |conn| {
        conn.transaction(|conn| {
            lock.limit_transaction(conn)?;
            ensure_schema(conn, lock.schema)?;
            conn.run_pending_migrations(MIGRATIONS)
                .map(|versions| versions.iter().map(ToString::to_string).collect())
                .map_err(|e| Error::Migration(MigrationError::caused_by(e.to_string(), e)))
        })
    })
}

/// Runs `f` under `lock` (so changes to one schema from several processes never
/// interleave), explaining a missing privilege (see [`explain_missing_privilege`]).
///
/// # Errors
/// A database error when the lock cannot be taken within the migration timeout;
/// `f`'s error.
pub(crate) fn locked<T>(
    conn: &mut PgConnection,
    lock: SchemaLock<'_>,
    f: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    lock.acquire(conn)?;
    let result = f(conn);
    let unlock = lock.release(conn);
    let value = result.map_err(explain_missing_privilege)?;
    unlock?;
    Ok(value)
}

/// Runs pgcache's pending migrations into `schema` on a connection of your own, for
/// applications that run every migration in one step of their own (then start the
/// cache with `run_migrations(false)` / `PGCACHE_RUN_MIGRATIONS=false`). Creates
/// `schema` if missing and records the migrations in a `__diesel_schema_migrations`
/// inside it, so the application's own migration history is untouched. The
/// connection's search path is restored afterwards, also on failure. Returns the
/// versions applied.
///
/// ```no_run
/// use diesel::{Connection, PgConnection};
///
/// let mut conn = PgConnection::establish("postgres://postgres@localhost/app")?;
/// // ... the application's own migrations ...
/// let applied = pgcache::run_migrations(&mut conn, pgcache::DEFAULT_SCHEMA)?;
/// println!("pgcache migrations applied: {applied:?}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// The migrations run in one transaction under `conn`'s own `statement_timeout`
/// (a manager's run under [`CacheConfig::migration_timeout`]); with nothing pending
/// they take no lock.
///
/// # Errors
/// [`Error::Database`] when the search path cannot be read or set,
/// [`Error::Migration`] when a migration fails (saying what to do when the role may
/// not create the schema or tables).
pub fn run_migrations(conn: &mut PgConnection, schema: &str) -> Result<Vec<String>> {
    if schema.is_empty() {
        return Err(Error::config("schema", "", "must not be empty"));
    }
    let lock = SchemaLock {
        schema,
        timeout: None,
    };
    migrate_into(conn, lock)
}

/// A yes/no answer from the database.
#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

/// Creates `schema` unless it exists. Checked first because PostgreSQL checks the
/// database-wide CREATE privilege before `IF NOT EXISTS`, which would stop a role
/// that owns the schema but may not create schemas.
fn ensure_schema(conn: &mut PgConnection, schema: &str) -> Result<()> {
    let exists: Flag =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS flag")
            .bind::<Text, _>(schema)
            .get_result(conn)?;
    if !exists.flag {
        conn.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))?;
    }
    Ok(())
}

/// What to do when the role may not create the cache's schema or tables.
const PRIVILEGE_HINT: &str = "this role may not create the cache tables: run `pgcache migrate` \
    with a role that may (e.g. the schema owner), and start the application with \
    PGCACHE_RUN_MIGRATIONS=false (or `.run_migrations(false)`)";

/// Turns a failed migration run caused by a missing privilege (SQLSTATE 42501,
/// whose messages are "permission denied ..." and "must be owner of ...") into an
/// [`Error::Migration`] saying what to do; other errors are returned as they are.
fn explain_missing_privilege(error: Error) -> Error {
    let message = match &error {
        Error::Migration(message) => message.to_string(),
        Error::Database(cause) => cause.to_string(),
        _ => return error,
    };
    if message.contains("permission denied") || message.contains("must be owner of") {
        Error::Migration(MigrationError::caused_by(
            format!("{message}: {PRIVILEGE_HINT}"),
            error,
        ))
    } else {
        error
    }
}

/// When pgcache's first migration ran into `schema` (from its
/// `__diesel_schema_migrations`, named with its schema: an application's own,
/// earlier on an application connection's search path, is never read), or `None`
/// when that is not recorded or not readable.
pub(crate) fn migrated_at(conn: &mut PgConnection, schema: &str) -> Result<Option<DateTime<Utc>>> {
    #[derive(QueryableByName)]
    struct At {
        #[diesel(sql_type = Nullable<Timestamptz>)]
        at: Option<DateTime<Utc>>,
    }
    // `run_on` is a timestamp without time zone, written in the session's zone.
    let first: Option<At> = read_history(
        conn,
        schema,
        "SELECT min(run_on)::timestamptz AS at FROM {history} WHERE version = ANY($1)",
    )?;
    Ok(first.and_then(|first| first.at))
}

/// `ALTER TABLE ... SET LOGGED | UNLOGGED` on every cache table, in one transaction.
///
/// Unlogged tables skip the write-ahead log: writes are faster, but the tables are
/// emptied after a crash and are not replicated to standbys.
pub(crate) fn set_logged(conn: &mut PgConnection, tables: &Tables, logged: bool) -> Result<()> {
    let mode = if logged { "LOGGED" } else { "UNLOGGED" };
    conn.transaction(|conn| {
        for kind in CacheKind::ALL {
            // A partitioned table has no storage of its own: its partitions do.
            for leaf in crate::catalog::leaves(conn, tables.of(kind))? {
                conn.batch_execute(&format!("ALTER TABLE {leaf} SET {mode}"))?;
            }
        }
        Ok(())
    })
}

/// The tables that carry `kind`'s near-cache triggers: its table and, when it is
/// partitioned, every leaf partition. PostgreSQL fires a statement-level trigger
/// only for the table a statement names: a statement naming the partitioned table
/// fires its triggers alone (their transition tables hold the rows of every
/// partition), one naming a partition (cleanup's and eviction's per-partition
/// deletes, or anyone's SQL) fires the partition's alone. A `TRUNCATE` of the
/// partitioned table fires both, logging "everything" more than once.
fn near_trigger_tables(conn: &mut PgConnection, kind: CacheKind) -> QueryResult<Vec<String>> {
    let table = kind.table();
    let mut tables = vec![table.to_owned()];
    // `leaves` names an unpartitioned table itself.
    tables.extend(
        crate::catalog::leaves(conn, table)?
            .into_iter()
            .filter(|leaf| leaf != table),
    );
    Ok(tables)
}

/// Creates `kind`'s near-cache triggers on `tables` (from [`near_trigger_tables`],
/// the table first), replacing those there, as the protocol writes them
/// ([`protocol::create_triggers_sql`]). Run it in a transaction: `CREATE TRIGGER`
/// waits for writes in flight, so every write that commits afterwards is logged.
fn create_near_triggers(
    conn: &mut PgConnection,
    kind: CacheKind,
    tables: &[String],
) -> QueryResult<()> {
    let sql: String = tables
        .iter()
        .map(|t| protocol::create_triggers_sql(kind, t))
        .collect();
    conn.batch_execute(&sql)
}

/// Creates `kind`'s near-cache triggers on its table and every leaf partition, in
/// the caller's transaction: for `partitions::convert`, which has just replaced
/// the table by a partitioned one.
pub(crate) fn install_near_triggers(conn: &mut PgConnection, kind: CacheKind) -> QueryResult<()> {
    let tables = near_trigger_tables(conn, kind)?;
    create_near_triggers(conn, kind, &tables)
}

// The pool turns stamping on by these names.
pub(crate) use protocol::{stamps_changes, STAMPING_SETTING};

/// Installs the near-cache invalidation triggers on the tables of `kinds` (and on
/// each leaf partition, see [`near_trigger_tables`]) that lack them, under the
/// migration lock, one cache table per transaction. `CREATE TRIGGER` waits for
/// writes in flight, so every write that commits afterwards is logged in
/// `cache_changes`.
pub(crate) fn ensure_near_triggers(
    conn: &mut PgConnection,
    lock: SchemaLock<'_>,
    kinds: impl IntoIterator<Item = CacheKind>,
) -> Result<()> {
    #[derive(QueryableByName)]
    struct Lacking {
        #[diesel(sql_type = Text)]
        name: String,
    }
    locked(conn, lock, |conn| {
        kinds.into_iter().try_for_each(|kind| {
            let tables = near_trigger_tables(conn, kind)?;
            // The tables whose triggers are not the protocol's (replaced).
            let lacking: Vec<Lacking> = diesel::sql_query(protocol::LACKING_TRIGGERS_SQL)
                .bind::<Array<Text>, _>(&tables)
                .bind::<Text, _>(protocol::setting_in_trigger())
                .load(conn)?;
            if lacking.is_empty() {
                return Ok(());
            }
            let lacking: Vec<String> = lacking.into_iter().map(|t| t.name).collect();
            conn.transaction(|conn| create_near_triggers(conn, kind, &lacking))
                .map_err(Error::from)
        })
    })
}
