//! The typed tables' batch statements: upserts of many rows in one statement
//! ([`UnnestUpsert`], one array per column, [`column`]), deletes by digest, and the
//! split of a batch too large for one statement ([`write_batches`]).

use std::marker::PhantomData;

use diesel::data_types::PgInterval;
use diesel::dsl::AsExprOf;
use diesel::expression::{AsExpression, TypedExpressionType};
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, Bool, Bytea, SqlType};
use diesel::Column;

use super::{Row, TypedTable};
use crate::expiry::ExpiresIn;
use crate::key::KeyDigest;
use crate::near::protocol;
use crate::relaxed::push_table;
use crate::statement::{Param, Prepared};

/// Payload bytes per INSERT: PostgreSQL caps one array value (one column of a batch)
/// at 1 GB, so only batches of large rows (inline audio) are split, far below that.
const BYTES_PER_STATEMENT: usize = 64 * 1024 * 1024;

/// Deletes the rows of `table` (schema-qualified, from
/// [`Tables`](crate::tables::Tables)) with these digests; returns how many of them
/// were live. The rows are locked in key order first, the order every batch upsert
/// takes too: a plan that visits them in another order (a bitmap scan, in physical
/// order) could deadlock against a concurrent `set_many`.
pub(crate) fn delete_digests(
    conn: &mut PgConnection,
    table: &str,
    digests: &[KeyDigest],
) -> QueryResult<u64> {
    #[derive(QueryableByName)]
    struct Live {
        #[diesel(sql_type = Bool)]
        live: bool,
    }
    let digests = digest_params(digests);
    let digests = Param::<Array<Bytea>, _>::new(&digests);
    let removed: Vec<Live> = Prepared::new(
        table,
        &[
            "DELETE FROM {t} WHERE key_hash IN (SELECT key_hash FROM {t} \
             WHERE key_hash = ANY(",
            ") ORDER BY key_hash FOR UPDATE) \
             RETURNING expires_at > statement_timestamp() AS live",
        ],
        vec![&digests],
    )
    .load(conn)?;
    Ok(removed.iter().filter(|r| r.live).count() as u64)
}

/// The digests as bind parameters for `key_hash = ANY($1)`.
pub(crate) fn digest_params(digests: &[KeyDigest]) -> Vec<&[u8]> {
    digests.iter().map(|d| d.as_bytes().as_slice()).collect()
}

/// Upserts `rows` (distinct keys, in key order) in as few statements as possible:
/// one unless their `size`s add up to more than [`BYTES_PER_STATEMENT`]; several run
/// in one transaction (a savepoint inside the caller's), so the batch is
/// all-or-nothing.
pub(crate) fn write_batches<R>(
    conn: &mut PgConnection,
    rows: &[R],
    size: impl Fn(&R) -> usize,
    upsert: impl Fn(&mut PgConnection, &[R]) -> QueryResult<usize>,
) -> QueryResult<usize> {
    match split_by_size(rows, size, BYTES_PER_STATEMENT).as_slice() {
        [] => Ok(0),
        [all] => upsert(conn, all),
        chunks => conn.transaction(|conn| {
            chunks
                .iter()
                .try_fold(0, |sum, chunk| Ok(sum + upsert(conn, chunk)?))
        }),
    }
}

/// Consecutive runs of `rows` whose sizes add up to at most `max` each (a larger
/// row alone); no runs for no rows.
fn split_by_size<R>(rows: &[R], size: impl Fn(&R) -> usize, max: usize) -> Vec<&[R]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let row_bytes = size(row);
        if i > start && bytes + row_bytes > max {
            runs.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += row_bytes;
    }
    if start < rows.len() {
        runs.push(&rows[start..]);
    }
    runs
}

/// `INSERT INTO t (key_hash, cols, expires_at) SELECT u.*, statement_timestamp() + $ttl
/// FROM unnest($1, ...) ON CONFLICT (key_hash) DO UPDATE SET ...`: the rows travel as
/// one array per column (their digests, then `A`, a tuple of [`ColumnArray`]s), so the
/// text is the same for any batch size. Diesel caches it by that text (which names
/// the schema), so it is prepared once per connection, which Diesel never does for
/// its own `ON CONFLICT`, nullable or multi-row inserts.
pub(crate) struct UnnestUpsert<'r, T, A> {
    /// The table, schema-qualified.
    name: &'r str,
    digests: Vec<&'r [u8]>,
    arrays: A,
    expires: ExpiresIn,
    table: PhantomData<T>,
}

impl<'r, T: TypedTable, A> UnnestUpsert<'r, T, A> {
    /// Upserts `rows` with their other columns in `arrays`.
    pub(crate) fn new(name: &'r str, rows: &'r [Row<'_, T>], arrays: A, ttl: PgInterval) -> Self {
        UnnestUpsert {
            name,
            digests: rows
                .iter()
                .map(|r| r.digest.as_bytes().as_slice())
                .collect(),
            arrays,
            expires: ExpiresIn(ttl),
            table: PhantomData,
        }
    }
}

impl<T, A> QueryFragment<Pg> for UnnestUpsert<'_, T, A>
where
    T: TypedTable,
    A: ColumnList + QueryFragment<Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let table = T::CACHE.descriptor();
        out.push_sql("INSERT INTO ");
        push_table(&mut out, self.name);
        out.push_sql(" (key_hash, ");
        for column in A::NAMES {
            out.push_sql(column);
            out.push_sql(", ");
        }
        out.push_sql("expires_at) SELECT u.*, ");
        self.expires.walk_ast(out.reborrow())?;
        out.push_sql(" FROM unnest(");
        out.push_bind_param::<Array<Bytea>, _>(&self.digests)?;
        out.push_sql(", ");
        self.arrays.walk_ast(out.reborrow())?;
        out.push_sql(") AS u ON CONFLICT (key_hash) DO UPDATE SET ");
        for column in A::NAMES {
            out.push_sql(column);
            out.push_sql(" = excluded.");
            out.push_sql(column);
            out.push_sql(", ");
        }
        out.push_sql("expires_at = excluded.expires_at, created_at = now()");
        if table.tracks_hits() {
            // An overwrite is a new entry: its popularity starts again.
            out.push_sql(", hit_count = 0, last_accessed_at = now()");
        }
        // Stamped as the change-logging protocol says: see `upsert_stamp`.
        out.push_sql(", ");
        out.push_sql(&protocol::upsert_stamp(T::CACHE, self.name));
        Ok(())
    }
}

// Cached by its text, which names the schema (see `Prepared`).
impl<T: TypedTable, A: QueryId> QueryId for UnnestUpsert<'_, T, A> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<T, A, Conn> RunQueryDsl<Conn> for UnnestUpsert<'_, T, A> {}

/// One column of a batch: the values of Diesel column `C` bound as one array (`E`),
/// so the column's name and SQL type come from the generated schema.
pub(crate) struct ColumnArray<C, E> {
    values: E,
    column: PhantomData<C>,
}

/// The values `value` takes on `rows`, as column `C` of an [`UnnestUpsert`].
pub(crate) fn column<'r, C, R, V>(
    _column: C,
    rows: &'r [R],
    value: impl Fn(&'r R) -> V,
) -> ColumnArray<C, AsExprOf<Vec<V>, Array<C::SqlType>>>
where
    C: Column,
    C::SqlType: SqlType + TypedExpressionType + 'static,
    Vec<V>: AsExpression<Array<C::SqlType>>,
{
    ColumnArray {
        values: rows
            .iter()
            .map(value)
            .collect::<Vec<_>>()
            .into_sql::<Array<C::SqlType>>(),
        column: PhantomData,
    }
}

impl<C, E: QueryFragment<Pg>> QueryFragment<Pg> for ColumnArray<C, E> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.values.walk_ast(out)
    }
}

impl<C, E: QueryId> QueryId for ColumnArray<C, E> {
    type QueryId = E::QueryId;
    const HAS_STATIC_QUERY_ID: bool = E::HAS_STATIC_QUERY_ID;
}

/// The names of a tuple of [`ColumnArray`]s, in order.
pub trait ColumnList {
    /// The column names.
    const NAMES: &'static [&'static str];
}

/// What a table's upsert columns are: named, bound arrays with a static query id.
pub trait UpsertColumns: ColumnList + QueryFragment<Pg> + QueryId {}

impl<A: ColumnList + QueryFragment<Pg> + QueryId> UpsertColumns for A {}

/// [`ColumnList`] for the tuple sizes the tables use (columns besides `key_hash`).
macro_rules! column_list {
    ($($C:ident $E:ident),+) => {
        impl<$($C: Column, $E),+> ColumnList for ($(ColumnArray<$C, $E>,)+) {
            const NAMES: &'static [&'static str] = &[$($C::NAME),+];
        }
    };
}
column_list!(C1 E1, C2 E2, C3 E3, C4 E4);
column_list!(C1 E1, C2 E2, C3 E3, C4 E4, C5 E5);
column_list!(C1 E1, C2 E2, C3 E3, C4 E4, C5 E5, C6 E6, C7 E7, C8 E8, C9 E9, C10 E10, C11 E11, C12 E12);

#[cfg(test)]
mod tests {
    use super::split_by_size;

    #[test]
    fn batches_split_only_where_the_byte_budget_overflows() {
        let sizes = [3, 4, 1, 9, 2, 2];
        let runs = split_by_size(&sizes, |s| *s, 8);
        assert_eq!(runs, vec![&[3, 4, 1][..], &[9], &[2, 2]]);
        assert_eq!(split_by_size(&sizes, |s| *s, 100), vec![&sizes[..]]);
        assert!(split_by_size(&[0u8; 0], |_| 1, 8).is_empty());
    }
}
