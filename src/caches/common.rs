//! What the typed caches share besides their table's statements (those are in
//! `table/statements.rs`): name checks and deletes by owner.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::error::{Error, Result};
use crate::relaxed::marked;
use crate::validation::check_text;

/// A name-like field (model, provider, voice, format): not empty, no NUL.
pub(crate) fn check_name(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    check_text(what, value)
}

/// Deletes the rows of `table` (schema-qualified) whose `column` (its owner:
/// `owner_id`, or `user_id` for searches) is `user`; returns how many.
pub(crate) fn delete_owned(
    conn: &mut PgConnection,
    table: &str,
    column: &str,
    user: uuid::Uuid,
) -> QueryResult<usize> {
    diesel::sql_query(marked(format!("DELETE FROM {table} WHERE {column} = $1")))
        .bind::<diesel::sql_types::Uuid, _>(user)
        .execute(conn)
}
