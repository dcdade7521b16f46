//! Size-bounded caches: eviction of the oldest or least recently used rows down to a
//! low watermark of an entry-count and/or byte bound.
//!
//! One mechanism for every table, parameterised by the table's descriptor: how it
//! measures a row's size, its recency and any external storage it holds.
//! [`CacheManager::cleanup`](crate::CacheManager::cleanup) enforces the configured
//! [`SizeBounds`]; the audio cache's `evict_to_budget` runs it on demand.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use serde::Serialize;

use crate::config::{check_bound, check_low_watermark, SizeBounds};
use crate::kind::CacheKind;

/// Rows deleted per cleanup statement. Each statement is its own short transaction,
/// so locks are held briefly and the WAL is written in small steps, however many rows
/// have expired.
pub const CLEANUP_BATCH_SIZE: i64 = 5_000;

/// What one eviction run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EvictionReport {
    /// Rows deleted.
    pub rows_removed: u64,
    /// Bytes those rows accounted for.
    pub bytes_freed: u64,
    /// External storage paths of the removed rows: the caller deletes those files.
    pub released_paths: Vec<String>,
}

impl EvictionReport {
    /// Several shards' runs as one.
    pub(crate) fn merge(reports: Vec<EvictionReport>) -> EvictionReport {
        reports
            .into_iter()
            .fold(EvictionReport::default(), |mut all, report| {
                all.rows_removed += report.rows_removed;
                all.bytes_freed += report.bytes_freed;
                all.released_paths.extend(report.released_paths);
                all
            })
    }
}

/// Checked bounds of one run: `(max, target)` per dimension, `None` when unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    rows: Option<(i64, i64)>,
    bytes: Option<(i64, i64)>,
}

impl Limits {
    /// The limits of `bounds` with targets at `low_watermark` of each bound, rounded
    /// down (evicting one too many is better than staying over the mark). Errors
    /// name the offending field.
    pub(crate) fn new(
        bounds: SizeBounds,
        low_watermark: f64,
    ) -> Result<Limits, (&'static str, String)> {
        check_low_watermark(low_watermark).map_err(|r| ("low_watermark_fraction", r))?;
        let pair = |what, max: Option<u64>| {
            max.map(|m| {
                let max = check_bound(m).map_err(|r| (what, r))?;
                Ok((max, (max as f64 * low_watermark) as i64))
            })
            .transpose()
        };
        Ok(Limits {
            rows: pair("max_entries", bounds.max_entries)?,
            bytes: pair("max_bytes", bounds.max_bytes)?,
        })
    }

    /// Rows and bytes to evict from a table holding `rows` rows of `bytes` bytes:
    /// each bound that is exceeded is brought down to its target.
    fn excess(&self, rows: i64, bytes: i64) -> (i64, i64) {
        let over = |limit: Option<(i64, i64)>, have: i64| match limit {
            Some((max, target)) if have > max => have - target,
            _ => 0,
        };
        (over(self.rows, rows), over(self.bytes, bytes))
    }
}

#[derive(QueryableByName)]
struct Totals {
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

#[derive(QueryableByName)]
struct Evicted {
    #[diesel(sql_type = BigInt)]
    size: i64,
    #[diesel(sql_type = Nullable<Text>)]
    path: Option<String>,
}

/// The session's list of rows to evict, ranked. Temporary, so it costs no WAL and
/// concurrent runs on other connections each have their own.
const PLAN: &str = "pg_temp.pgcache_eviction_plan";

/// When `table` exceeds a bound of `limits`, evicts rows until every exceeded bound
/// is at its target: expired rows first, then the least recently used (oldest
/// written, for tables without access tracking). `on_batch` gets the running total.
///
/// The table is measured in one read-only scan (no sort) and most runs stop there.
/// Otherwise one ranking scan writes the doomed keys to a temporary table, and rows
/// are deleted by rank in batches of [`CLEANUP_BATCH_SIZE`], each its own short
/// statement claiming rows with `FOR UPDATE SKIP LOCKED`, so no long lock is held and
/// concurrent cleaners never wait on each other. A row used or rewritten since the
/// ranking (its recency moved on) is spared. `name`: `kind`'s table, schema-qualified.
pub(crate) fn evict(
    conn: &mut PgConnection,
    kind: CacheKind,
    name: &str,
    limits: &Limits,
    on_batch: &mut dyn FnMut(&EvictionReport),
) -> QueryResult<EvictionReport> {
    let table = kind.descriptor();
    let (key, size, recency) = (table.key, table.payload_bytes, table.recency());
    let totals: Totals = diesel::sql_query(format!(
        "SELECT count(*) AS rows, coalesce(sum({size}), 0)::bigint AS bytes FROM {name}"
    ))
    .get_result(conn)?;
    let (excess_rows, excess_bytes) = limits.excess(totals.rows, totals.bytes);
    let mut report = EvictionReport::default();
    if excess_rows <= 0 && excess_bytes <= 0 {
        return Ok(report);
    }
    // A row is doomed while the rows ranked before it do not yet cover both excesses.
    // The excesses are numbers computed here, never input.
    conn.batch_execute(&format!(
        "DROP TABLE IF EXISTS {PLAN}; \
         CREATE TEMP TABLE pgcache_eviction_plan AS \
           SELECT n AS evict_n, k AS evict_key, r AS evict_recency FROM ( \
             SELECT {key} AS k, {recency} AS r, ({size})::bigint AS size, \
                    row_number() OVER w AS n, sum(({size})::bigint) OVER w AS upto \
             FROM {name} \
             WINDOW w AS (ORDER BY expires_at > now(), {recency}, {key} \
                          ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) ranked \
           WHERE n <= {excess_rows} OR upto - size < {excess_bytes}; \
         ALTER TABLE {PLAN} ADD PRIMARY KEY (evict_n)"
    ))?;
    let deleted = delete_planned(conn, kind, name, &mut report, on_batch);
    let dropped = conn.batch_execute(&format!("DROP TABLE IF EXISTS {PLAN}"));
    deleted.and(dropped).map(|()| report)
}

/// Deletes the planned rows in rank order, one batch per statement.
fn delete_planned(
    conn: &mut PgConnection,
    kind: CacheKind,
    name: &str,
    report: &mut EvictionReport,
    on_batch: &mut dyn FnMut(&EvictionReport),
) -> QueryResult<()> {
    #[derive(QueryableByName)]
    struct Planned {
        #[diesel(sql_type = BigInt)]
        planned: i64,
    }
    let table = kind.descriptor();
    let (key, size, recency, path) = (
        table.key,
        table.payload_bytes,
        table.recency(),
        table.external_path,
    );
    let planned = diesel::sql_query(format!(
        "SELECT coalesce(max(evict_n), 0) AS planned FROM {PLAN}"
    ))
    .get_result::<Planned>(conn)?
    .planned;
    // ctid, as in cleanup: the claimed rows are locked, so it is stable until the
    // delete. Per partition (a ctid is unique only within one), each batch of the
    // plan from every partition before the next batch, so rank order holds.
    let statements: Vec<String> = crate::partitions::leaves(conn, name)?
        .iter()
        .map(|leaf| {
            format!(
                "DELETE FROM {leaf} WHERE ctid = ANY(ARRAY( \
                   SELECT c.ctid FROM {leaf} c JOIN {PLAN} p ON c.{key} = p.evict_key \
                   WHERE p.evict_n > $1 AND p.evict_n <= $2 AND c.{recency} <= p.evict_recency \
                   FOR UPDATE OF c SKIP LOCKED)) \
                 RETURNING ({size})::bigint AS size, {path} AS path"
            )
        })
        .collect();
    let mut done = 0;
    while done < planned {
        let mut evicted: Vec<Evicted> = Vec::new();
        for sql in &statements {
            evicted.extend(
                diesel::sql_query(sql)
                    .bind::<BigInt, _>(done)
                    .bind::<BigInt, _>(done + CLEANUP_BATCH_SIZE)
                    .load::<Evicted>(conn)?,
            );
        }
        done += CLEANUP_BATCH_SIZE;
        if evicted.is_empty() {
            continue;
        }
        report.rows_removed += evicted.len() as u64;
        report.bytes_freed += evicted.iter().map(|e| e.size.unsigned_abs()).sum::<u64>();
        report
            .released_paths
            .extend(evicted.into_iter().filter_map(|e| e.path));
        on_batch(report);
    }
    Ok(())
}
