//! Size-bounded caches: least-recently-used eviction down to a byte budget.
//!
//! The mechanism is one statement per run, parameterised by an [`LruTable`] that
//! says how a table measures a row's size, its recency and any external storage it
//! holds, so every cache table can get a size bound by describing itself.

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};

use crate::cache::CacheKind;
use crate::error::{Error, Result};

/// What one eviction run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EvictionReport {
    /// Rows deleted.
    pub rows_removed: u64,
    /// Bytes those rows accounted for.
    pub bytes_freed: u64,
    /// External storage paths of the removed rows: the caller deletes those files.
    pub released_paths: Vec<String>,
}

/// How a table takes part in LRU eviction. Every field is trusted SQL written in
/// this crate, never input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LruTable {
    /// The cache (and so the table).
    pub(crate) kind: CacheKind,
    /// Expression for a row's size in bytes (`bigint`).
    pub(crate) size: &'static str,
    /// Expression ordering rows from least to most recently used.
    pub(crate) recency: &'static str,
    /// Expression for external storage a row holds (`text`, may be NULL).
    pub(crate) path: &'static str,
}

/// Checks an eviction budget; returns `(max_bytes, target_bytes)`.
pub(crate) fn budget(max_bytes: u64, low_watermark: f64) -> Result<(i64, i64)> {
    if !(0.0..=1.0).contains(&low_watermark) {
        return Err(Error::invalid(
            "low_watermark_fraction",
            format!("must be between 0 and 1, got {low_watermark}"),
        ));
    }
    let max = i64::try_from(max_bytes).map_err(|_| {
        Error::invalid(
            "max_bytes",
            format!("must be at most {}, got {max_bytes}", i64::MAX),
        )
    })?;
    // Rounded down: evicting a byte too many is better than staying over the mark.
    Ok((max, (max as f64 * low_watermark) as i64))
}

#[derive(QueryableByName)]
struct Evicted {
    #[diesel(sql_type = BigInt)]
    size: i64,
    #[diesel(sql_type = Nullable<Text>)]
    path: Option<String>,
}

/// When the rows of `table` total more than `max` bytes, deletes rows until at most
/// `target` bytes remain: expired rows first, then the least recently used. One
/// statement, so a concurrent run sees either all or none of this one's deletions.
pub(crate) fn evict_lru(
    conn: &mut PgConnection,
    table: &LruTable,
    max: i64,
    target: i64,
) -> QueryResult<EvictionReport> {
    let sql = format!(
        "WITH ranked AS ( \
           SELECT key_hash, ({size})::bigint AS size, \
                  sum({size}) OVER (ORDER BY expires_at > now(), {recency}, key_hash \
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)::bigint AS upto \
           FROM {table}), \
         total AS (SELECT coalesce(sum(size), 0)::bigint AS bytes FROM ranked), \
         doomed AS ( \
           SELECT r.key_hash FROM ranked r, total \
           WHERE total.bytes > $1 AND r.upto - r.size < total.bytes - $2) \
         DELETE FROM {table} t USING doomed d WHERE t.key_hash = d.key_hash \
         RETURNING ({size})::bigint AS size, {path} AS path",
        table = table.kind.table(),
        size = table.size,
        recency = table.recency,
        path = table.path,
    );
    let evicted: Vec<Evicted> = diesel::sql_query(sql)
        .bind::<BigInt, _>(max)
        .bind::<BigInt, _>(target)
        .load(conn)?;
    Ok(EvictionReport {
        rows_removed: evicted.len() as u64,
        bytes_freed: evicted.iter().map(|e| e.size.unsigned_abs()).sum(),
        released_paths: evicted.into_iter().filter_map(|e| e.path).collect(),
    })
}
