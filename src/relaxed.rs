//! Relaxed durability on the application's pool: pgcache's own writes there commit
//! without waiting for the disk, in one round trip, and the application's sessions
//! keep their setting. On the cache's own pool the setting is the session's
//! instead (see `pool::session_sql`).
//!
//! How: every statement pgcache builds while [`relaxed`] runs names its tables
//! followed by [`MARKER`], a comment. A statement trigger on each table pgcache
//! writes (migration `relaxed_commit`, [`TRIGGER`] for a table made anew) sees the
//! marker in `current_query()` and turns `synchronous_commit` off for the
//! statement's transaction (`set_config(.., true)`): an autocommit write then
//! commits relaxed with no `BEGIN`, `SET LOCAL` or `COMMIT` of its own. A
//! statement without the marker (the application's own, pgcache's inside the
//! application's transactions) is untouched. The marker travels on the table name
//! because every statement names its table, and Diesel walks a statement's text on
//! the calling thread, inside `op`.

use std::cell::Cell;

use diesel::pg::{Pg, PgConnection};
use diesel::query_builder::AstPass;

use crate::error::Result;

/// The comment that asks the trigger for a relaxed commit. The migration
/// `relaxed_commit` spells it out in its trigger's condition: change both or neither.
const MARKER: &str = "/* pgcache: relaxed commit */";

/// The trigger of migration `relaxed_commit`, for a table made after it (a table
/// partitioned anew): `{table}` and `{schema}` quoted.
pub(crate) const TRIGGER: &str = "CREATE TRIGGER pgcache_relaxed_commit \
     BEFORE INSERT OR UPDATE OR DELETE ON {table} FOR EACH STATEMENT \
     WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0) \
     EXECUTE FUNCTION {schema}.pgcache_relaxed_commit()";

thread_local! {
    /// Whether the statements this thread builds now are to commit relaxed.
    static RELAXED: Cell<bool> = const { Cell::new(false) };
}

/// Resets [`RELAXED`] when `op` returns or panics.
struct Reset(bool);

impl Drop for Reset {
    fn drop(&mut self) {
        RELAXED.with(|relaxed| relaxed.set(self.0));
    }
}

/// Runs `op` with every statement it builds marked for a relaxed commit: each
/// autocommit write commits without waiting for the disk, in its one round trip.
/// `op` must not run inside the application's transaction (its whole transaction
/// would commit relaxed); pgcache calls it only on connections it checked out.
///
/// # Errors
/// `op`'s.
pub(crate) fn relaxed<T>(
    conn: &mut PgConnection,
    op: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    let _reset = Reset(RELAXED.with(|relaxed| relaxed.replace(true)));
    op(conn)
}

/// Pushes a table's name (schema-qualified), marked while [`relaxed`] runs.
pub(crate) fn push_table(out: &mut AstPass<'_, '_, Pg>, name: &str) {
    out.push_sql(name);
    if RELAXED.with(Cell::get) {
        out.push_sql(MARKER);
    }
}

/// `sql` marked while [`relaxed`] runs, for a statement built as text.
pub(crate) fn marked(sql: String) -> String {
    if RELAXED.with(Cell::get) {
        format!("{MARKER} {sql}")
    } else {
        sql
    }
}
