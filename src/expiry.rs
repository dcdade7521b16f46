//! Expiry, in one place: which TTLs are valid, the presets, the expression that
//! sets an entry's expiry, and the clock every live filter compares with.
//!
//! Expiry is judged by the database clock at the start of each statement
//! (`statement_timestamp()`), so every process agrees whatever its own clock says,
//! and an entry that expires during a caller's long transaction reads as a miss in
//! it.

use std::time::Duration;

use diesel::data_types::PgInterval;
use diesel::expression::{
    is_aggregate, AppearsOnTable, Expression, SelectableExpression, ValidGrouping,
};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Interval, Timestamptz};
use diesel::QueryResult;

use crate::error::{Error, Result};
use crate::kind::CacheKind;

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

/// The longest TTL pgcache accepts: 100 years. Longer ones are rejected rather than
/// risking a timestamp overflow in the database.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The four TTL presets: short, medium, long and week.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPresets {
    /// Frequently changing data (`CACHE_TTL_SHORT`, default 300 s); the default for
    /// vector-search results and audio chunks.
    pub short: Duration,
    /// Moderately stable data (`CACHE_TTL_MEDIUM`, default 3600 s); the default for
    /// key/value entries, embeddings and LLM responses.
    pub medium: Duration,
    /// Stable data (`CACHE_TTL_LONG`, default 86400 s).
    pub long: Duration,
    /// Very stable data (`CACHE_TTL_WEEK`, default 604800 s).
    pub week: Duration,
}

impl TtlPresets {
    /// The preset the handles of cache `kind` use unless given another TTL.
    pub(crate) fn default_for(&self, kind: CacheKind) -> Duration {
        match kind {
            CacheKind::Kv | CacheKind::Embedding | CacheKind::LlmResponse => self.medium,
            CacheKind::VectorSearch | CacheKind::AudioChunk => self.short,
        }
    }
}

impl Default for TtlPresets {
    fn default() -> Self {
        TtlPresets {
            short: Duration::from_secs(300),
            medium: Duration::from_secs(3600),
            long: Duration::from_secs(86_400),
            week: Duration::from_secs(604_800),
        }
    }
}

/// Why `ttl` is not a valid TTL, if it is not. The database counts time in
/// microseconds, so a shorter non-zero TTL would round to zero and write an entry
/// that is already expired (replacing a live one): it is rejected as zero is.
pub(crate) fn check_ttl(ttl: Duration) -> std::result::Result<(), String> {
    if ttl.is_zero() {
        Err("a TTL must be greater than zero".to_owned())
    } else if ttl < Duration::from_micros(1) {
        Err("a TTL must be at least 1 µs, the database's resolution".to_owned())
    } else if ttl > MAX_TTL {
        Err(format!(
            "a TTL must be at most {} s (100 years)",
            MAX_TTL.as_secs()
        ))
    } else {
        Ok(())
    }
}

/// Checks a TTL and turns it into the interval added to the statement's time.
///
/// # Errors
/// [`Error::InvalidInput`] naming the TTL.
pub(crate) fn ttl_interval(ttl: Duration) -> Result<PgInterval> {
    check_ttl(ttl).map_err(|reason| Error::invalid("ttl", format!("{reason} (got {ttl:?})")))?;
    // Cannot overflow: MAX_TTL is far below i64::MAX microseconds.
    Ok(PgInterval::from_microseconds(ttl.as_micros() as i64))
}
