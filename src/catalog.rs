//! What the server's catalog says of a cache table: its leaf partitions. Below
//! both migrations (the near-cache triggers go on every leaf) and partitioning
//! (which runs under the migrations' lock), so neither imports the other for it.

use diesel::pg::PgConnection;
use diesel::sql_types::Text;
use diesel::{QueryResult, QueryableByName, RunQueryDsl};

/// The tables holding `table`'s rows (`table` schema-qualified): its leaf
/// partitions, or the table itself when it is not partitioned. Names quoted and
/// schema-qualified, so usable in SQL as they are on any search path.
pub(crate) fn leaves(conn: &mut PgConnection, table: &str) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Leaf {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let leaves: Vec<Leaf> = diesel::sql_query(
        "SELECT format('%I.%I', n.nspname, c.relname) AS name \
         FROM pg_partition_tree($1::regclass) t JOIN pg_class c ON c.oid = t.relid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.isleaf ORDER BY t.relid",
    )
    .bind::<Text, _>(table)
    .load(conn)?;
    Ok(if leaves.is_empty() {
        vec![table.to_owned()]
    } else {
        leaves.into_iter().map(|leaf| leaf.name).collect()
    })
}
