//! SQL building blocks shared by every cache table.

use diesel::data_types::PgInterval;
use diesel::expression::{
    is_aggregate, AppearsOnTable, Expression, SelectableExpression, ValidGrouping,
};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Interval, Timestamptz};
use diesel::QueryResult;

diesel::define_sql_function! {
    /// The database clock at the start of the current statement, as `timestamptz`:
    /// expiry is always judged by the database clock so every process agrees,
    /// whatever its own clock says. Not `now()`, which is the start of the
    /// transaction: inside a caller's long transaction it would let a read return
    /// an entry that expired since the transaction began.
    #[sql_name = "statement_timestamp"]
    fn db_now() -> Timestamptz;
}

/// `statement_timestamp() + $ttl`: the expiry of an entry written now. A typed expression (rather
/// than raw SQL) keeps every statement using it in Diesel's prepared-statement cache.
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct ExpiresIn(pub(crate) PgInterval);

impl Expression for ExpiresIn {
    type SqlType = Timestamptz;
}

impl QueryFragment<Pg> for ExpiresIn {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("(statement_timestamp() + ");
        out.push_bind_param::<Interval, _>(&self.0)?;
        out.push_sql(")");
        Ok(())
    }
}

impl<QS> AppearsOnTable<QS> for ExpiresIn {}

impl<QS> SelectableExpression<QS> for ExpiresIn {}

impl ValidGrouping<()> for ExpiresIn {
    type IsAggregate = is_aggregate::Never;
}
