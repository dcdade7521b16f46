//! Embedded migrations and the switch between logged and unlogged cache tables.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::{Error, MigrationError, Result};
use crate::kind::CacheKind;
use crate::pool::quote_ident;

/// The SQL migrations compiled into the crate.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Serialises concurrent migrators (several processes starting at once).
const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock(7262817313)";
const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock(7262817313)";

/// Runs every pending migration on `conn` into `schema` (created if missing; the
/// connection's search path when `None`) and returns the versions applied.
///
/// Everything happens under one advisory lock, `CREATE SCHEMA IF NOT EXISTS`
/// included: it is not safe against a concurrent create of the same schema, so
/// replicas starting together on a fresh database would otherwise fail on a unique
/// violation in `pg_namespace`.
pub(crate) fn run_pending(conn: &mut PgConnection, schema: Option<&str>) -> Result<Vec<String>> {
    conn.batch_execute(MIGRATION_LOCK)?;
    let result = match schema {
        Some(schema) => conn
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(schema)
            ))
            .map_err(Error::from),
        None => Ok(()),
    }
    .and_then(|()| {
        conn.run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect())
            .map_err(|e| Error::Migration(MigrationError::caused_by(e.to_string(), e)))
    });
    let unlock = conn.batch_execute(MIGRATION_UNLOCK);
    let versions = result?;
    unlock?;
    Ok(versions)
}

/// `ALTER TABLE ... SET LOGGED | UNLOGGED` on every cache table, in one transaction.
///
/// Unlogged tables skip the write-ahead log: writes are faster, but the tables are
/// emptied after a crash and are not replicated to standbys.
pub(crate) fn set_logged(conn: &mut PgConnection, logged: bool) -> Result<()> {
    let mode = if logged { "LOGGED" } else { "UNLOGGED" };
    let sql: String = CacheKind::ALL
        .iter()
        .map(|kind| format!("ALTER TABLE {} SET {mode};", kind.table()))
        .collect();
    conn.batch_execute(&format!("BEGIN; {sql} COMMIT;"))
        .map_err(|e| {
            let _ = conn.batch_execute("ROLLBACK");
            Error::from(e)
        })
}
