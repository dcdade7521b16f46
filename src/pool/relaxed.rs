//! Relaxed durability on the application's pool: pgcache's own writes there run in
//! a transaction of their own whose commit does not wait for the disk
//! (`SET LOCAL synchronous_commit = off`), so the application's sessions keep their
//! setting. On the cache's own pool the setting is the session's instead (see
//! [`session_sql`](super::session_sql)): no statement more per write.

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;

use crate::error::Result;

/// Opens the transaction and scopes the setting to it: one round trip.
const BEGIN_RELAXED: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// Runs `op` inside its own transaction committed without waiting for the disk:
/// two round trips more than `op` alone (the `BEGIN` with its setting, the
/// `COMMIT`). `op` may open transactions of its own (they become savepoints). On
/// an error, the transaction is rolled back and the error returned.
///
/// # Errors
/// `op`'s error, or the database's for the `BEGIN` or the `COMMIT`.
pub(crate) fn relaxed<T>(
    conn: &mut PgConnection,
    op: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    if let Err(error) = AnsiTransactionManager::begin_transaction_sql(conn, BEGIN_RELAXED) {
        // The `BEGIN` may have run before the setting failed: close what it opened.
        let _ = conn.batch_execute("ROLLBACK");
        return Err(error.into());
    }
    match op(conn) {
        Ok(done) => {
            AnsiTransactionManager::commit_transaction(conn)?;
            Ok(done)
        }
        Err(error) => {
            // A failure here leaves the connection marked broken: r2d2 drops it.
            let _ = AnsiTransactionManager::rollback_transaction(conn);
            Err(error)
        }
    }
}
