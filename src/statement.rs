//! Hand-written statements whose text is fixed but for their table: [`Prepared`].
//! Every statement pgcache prepares by hand names its table schema-qualified
//! (from [`Tables`](crate::tables::Tables)), through [`push_with_table`], which also
//! carries the relaxed-commit marker (see [`crate::relaxed`]). The key/value
//! cache's statements that judge an entry's tags name the tag table too
//! ([`TAGS`], [`push_with_tables`]).

use std::marker::PhantomData;

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};

use crate::relaxed::push_table;

/// The token a [`Prepared`] statement's pieces write for its table.
pub(crate) const TABLE: &str = "{t}";

/// The token a key/value statement writes for the tag table (`cache_tags`), named
/// by [`Prepared::with_tags`] or [`push_with_tables`].
pub(crate) const TAGS: &str = "{g}";

/// A hand-written statement whose text is fixed but for its table (written
/// [`TABLE`], replaced by the schema-qualified name from
/// [`Tables`](crate::tables::Tables)). Diesel caches it by its text (no static query
/// id: managers with different schemas may share a connection), so it is prepared
/// once per connection and schema; `diesel::sql_query` it never caches. The text
/// is given in pieces, one parameter between each two.
pub(crate) struct Prepared<'q> {
    table: &'q str,
    tags: &'q str,
    pieces: &'static [&'static str],
    params: Vec<&'q dyn BindParam>,
}

impl<'q> Prepared<'q> {
    pub(crate) fn new(
        table: &'q str,
        pieces: &'static [&'static str],
        params: Vec<&'q dyn BindParam>,
    ) -> Self {
        debug_assert_eq!(pieces.len(), params.len() + 1);
        Prepared {
            table,
            tags: "",
            pieces,
            params,
        }
    }

    /// The statement naming the tag table (`tags`, schema-qualified) where its
    /// pieces write [`TAGS`].
    pub(crate) fn with_tags(mut self, tags: &'q str) -> Self {
        self.tags = tags;
        self
    }
}

/// Pushes `sql` with every [`TABLE`] token replaced by `table`.
pub(crate) fn push_with_table(out: &mut AstPass<'_, '_, Pg>, sql: &str, table: &str) {
    push_with_tables(out, sql, table, "");
}

/// Pushes `sql` with every [`TABLE`] token replaced by `table` and every [`TAGS`]
/// token by `tags`.
pub(crate) fn push_with_tables(
    out: &mut AstPass<'_, '_, Pg>,
    mut sql: &str,
    table: &str,
    tags: &str,
) {
    loop {
        let next = [(TABLE, table), (TAGS, tags)]
            .into_iter()
            .filter_map(|(token, name)| sql.find(token).map(|at| (at, token.len(), name)))
            .min_by_key(|&(at, ..)| at);
        let Some((at, len, name)) = next else {
            out.push_sql(sql);
            return;
        };
        debug_assert!(
            !name.is_empty(),
            "a statement names a table it was not given"
        );
        out.push_sql(&sql[..at]);
        push_table(out, name);
        sql = &sql[at + len..];
    }
}

/// One parameter of a [`Prepared`] statement.
pub(crate) trait BindParam {
    fn bind<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>;
}

/// A value bound as SQL type `ST`.
pub(crate) struct Param<ST, V>(pub(crate) V, PhantomData<ST>);

impl<ST, V> Param<ST, V> {
    pub(crate) fn new(value: V) -> Self {
        Param(value, PhantomData)
    }
}

impl<ST, V> BindParam for Param<ST, V>
where
    Pg: diesel::sql_types::HasSqlType<ST>,
    V: diesel::serialize::ToSql<ST, Pg>,
{
    fn bind<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, V>(&self.0)
    }
}

impl QueryFragment<Pg> for Prepared<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        for (i, piece) in self.pieces.iter().enumerate() {
            push_with_tables(&mut out, piece, self.table, self.tags);
            if let Some(param) = self.params.get(i) {
                param.bind(&mut out)?;
            }
        }
        Ok(())
    }
}

impl QueryId for Prepared<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for Prepared<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl<Conn> RunQueryDsl<Conn> for Prepared<'_> {}
