//! Reading live rows of a typed table: the statement ([`LiveRows`]) and what every
//! table's row holds besides its own columns ([`Written`]), so a table decodes only
//! what is its own.

use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::row::NamedRow;
use diesel::sql_types::{Array, Bytea, Timestamptz, Untyped};
use diesel::{QueryResult, QueryableByName, RunQueryDsl};

use super::TypedTable;
use crate::freshness::{read_at, Facts};

/// The columns every digest-keyed table has, read by name with each live row and
/// handed to [`TypedTable::decode`] beside the table's own.
#[derive(Debug, QueryableByName)]
pub struct Written {
    #[diesel(sql_type = Bytea)]
    key_hash: Vec<u8>,
    /// When the entry was written.
    #[diesel(sql_type = Timestamptz)]
    pub(crate) created_at: DateTime<Utc>,
    /// When it expires (database clock).
    #[diesel(sql_type = Timestamptz)]
    pub(crate) expires_at: DateTime<Utc>,
}

impl Written {
    /// The digest the row is stored under (what a packed payload is sealed to).
    pub(crate) fn digest(&self) -> &[u8] {
        &self.key_hash
    }
}

/// A live row as read: the table's own columns (`S`), the common ones and the
/// facts of its freshness, all from the same row (columns matched by name).
pub(super) struct Live<S> {
    pub(super) stored: S,
    pub(super) written: Written,
    pub(super) facts: Facts,
}

impl<S: QueryableByName<Pg>> QueryableByName<Pg> for Live<S> {
    fn build<'a>(row: &impl NamedRow<'a, Pg>) -> diesel::deserialize::Result<Self> {
        Ok(Live {
            stored: S::build(row)?,
            written: Written::build(row)?,
            facts: Facts::build(row)?,
        })
    }
}

/// `SELECT *, statement_timestamp() AS read_at FROM <table> WHERE key_hash = $1`
/// (one digest, a plain index probe) or `= ANY($1)` (many) `AND expires_at >
/// statement_timestamp()`: the row with the facts of its freshness. Cached by its text
/// (which names the schema, see `Prepared` in `statement.rs`): Diesel prepares
/// it once per connection.
pub(super) struct LiveRows<'n, T, D> {
    /// The table, schema-qualified.
    name: &'n str,
    digests: D,
    table: PhantomData<T>,
}

impl<'n, T, D> LiveRows<'n, T, D> {
    pub(super) fn new(name: &'n str, digests: D) -> Self {
        LiveRows {
            name,
            digests,
            table: PhantomData,
        }
    }
}

/// How the digests are bound: one, or an array.
pub(super) trait DigestParam {
    fn walk<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>;
}

impl DigestParam for &[u8] {
    fn walk<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(" = ");
        out.push_bind_param::<Bytea, _>(self)
    }
}

impl DigestParam for Vec<&[u8]> {
    fn walk<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(" = ANY(");
        out.push_bind_param::<Array<Bytea>, _>(self)?;
        out.push_sql(")");
        Ok(())
    }
}

impl<T: TypedTable, D: DigestParam> QueryFragment<Pg> for LiveRows<'_, T, D> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("SELECT *, ");
        out.push_sql(read_at!());
        out.push_sql(" FROM ");
        crate::relaxed::push_table(&mut out, self.name);
        out.push_sql(" WHERE key_hash");
        self.digests.walk(&mut out)?;
        out.push_sql(" AND expires_at > statement_timestamp()");
        Ok(())
    }
}

impl<T: TypedTable, D: DigestParam> QueryId for LiveRows<'_, T, D> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<T, D> Query for LiveRows<'_, T, D> {
    type SqlType = Untyped;
}

impl<T, D, Conn> RunQueryDsl<Conn> for LiveRows<'_, T, D> {}
