//! Embedded migrations and the switch between logged and unlogged cache tables.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::cache::CacheKind;
use crate::error::{Error, Result};

/// The SQL migrations compiled into the crate.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Serialises concurrent migrators (several processes starting at once).
const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock(7262817313)";
const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock(7262817313)";

/// Runs every pending migration on `conn` (into its current search path) and returns
/// the versions applied.
pub(crate) fn run_pending(conn: &mut PgConnection) -> Result<Vec<String>> {
    conn.batch_execute(MIGRATION_LOCK)?;
    let result = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(ToString::to_string).collect())
        .map_err(|e| Error::Migration(e.to_string()));
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
