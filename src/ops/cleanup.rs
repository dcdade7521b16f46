//! Removing expired rows and enforcing size bounds ([`CacheManager::cleanup`](crate::CacheManager::cleanup)), and
//! emptying caches ([`CacheManager::clear`](crate::CacheManager::clear)).

use std::fmt;
use std::iter::Sum;
use std::ops::AddAssign;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz};
use serde::Serialize;

use crate::caches::kv::sweep_invalidated;
use crate::cluster::Cluster;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eviction::{evict, EvictionReport, Limits, CLEANUP_BATCH_SIZE};
use crate::expiry::db_now;
use crate::kind::CacheKind;
use crate::ops::stats::human_bytes;
use crate::tables::Tables;
use crate::watchdog::watched;

/// The table of single-flight leases, cleaned with the caches.
const LEASES_TABLE: &str = "cache_leases";

/// What one [`CacheManager::cleanup`](crate::CacheManager::cleanup) removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CleanupReport {
    /// Per cache table, in [`CacheKind::ALL`] order.
    pub tables: Vec<TableCleanup>,
    /// Expired single-flight leases removed.
    pub leases_removed: u64,
    /// Wall time of the whole run.
    #[serde(serialize_with = "as_millis")]
    pub elapsed: Duration,
}

/// What cleanup removed from one cache table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TableCleanup {
    /// The cache.
    pub cache: CacheKind,
    /// Expired rows deleted (and, for the key/value cache, entries with a tag
    /// invalidated since they were written).
    pub rows_removed: u64,
    /// Rows evicted because the cache was over a configured
    /// [`SizeBounds`](crate::SizeBounds) bound.
    pub evicted_rows: u64,
    /// Payload bytes of the evicted rows.
    pub evicted_bytes: u64,
    /// External storage paths of the evicted rows (audio stored outside the
    /// database): delete those files.
    pub released_paths: Vec<String>,
    /// Time spent on this table.
    #[serde(serialize_with = "as_millis")]
    pub elapsed: Duration,
}

/// Reported to the progress callback of [`CacheManager::cleanup_with_progress`](crate::CacheManager::cleanup_with_progress)
/// when a table is started and after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupProgress {
    /// The table being cleaned (a cache table or `cache_leases`).
    pub table: &'static str,
    /// Rows removed from this table so far.
    pub table_rows_removed: u64,
    /// Rows removed from every table so far in this run.
    pub rows_removed: u64,
}

impl CleanupReport {
    /// Expired cache rows removed over all cache tables (leases not included).
    pub fn rows_removed(&self) -> u64 {
        self.tables.iter().map(|t| t.rows_removed).sum()
    }

    /// Rows evicted over all cache tables to respect size bounds.
    pub fn evicted_rows(&self) -> u64 {
        self.tables.iter().map(|t| t.evicted_rows).sum()
    }

    /// External storage paths released by eviction, over all cache tables.
    pub fn released_paths(&self) -> impl Iterator<Item = &str> {
        self.tables
            .iter()
            .flat_map(|t| t.released_paths.iter().map(String::as_str))
    }
}

impl fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Removed {} expired {} in {:.2} s",
            self.rows_removed(),
            if self.rows_removed() == 1 {
                "entry"
            } else {
                "entries"
            },
            self.elapsed.as_secs_f64()
        )?;
        for t in &self.tables {
            write!(
                f,
                "  {:<14} {:>10}  ({} ms)",
                t.cache.name(),
                t.rows_removed,
                t.elapsed.as_millis()
            )?;
            if t.evicted_rows > 0 {
                write!(
                    f,
                    "  + {} evicted over size bounds ({})",
                    t.evicted_rows,
                    human_bytes(t.evicted_bytes)
                )?;
            }
            writeln!(f)?;
        }
        write!(f, "  {:<14} {:>10}", "leases", self.leases_removed)?;
        if self.released_paths().next().is_some() {
            write!(f, "\nReleased storage paths (delete these files):")?;
            for path in self.released_paths() {
                write!(f, "\n  {path}")?;
            }
        }
        Ok(())
    }
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Another run of the same cache's cleanup (another shard's) added in: the sums.
impl AddAssign for TableCleanup {
    fn add_assign(&mut self, other: TableCleanup) {
        debug_assert_eq!(self.cache, other.cache);
        self.rows_removed += other.rows_removed;
        self.evicted_rows += other.evicted_rows;
        self.evicted_bytes += other.evicted_bytes;
        self.released_paths.extend(other.released_paths);
        self.elapsed += other.elapsed;
    }
}

/// Another run (another shard's) added in: per cache, the sums.
impl AddAssign for CleanupReport {
    fn add_assign(&mut self, other: CleanupReport) {
        self.leases_removed += other.leases_removed;
        self.elapsed += other.elapsed;
        for table in other.tables {
            match self.tables.iter_mut().find(|t| t.cache == table.cache) {
                Some(sum) => *sum += table,
                None => self.tables.push(table),
            }
        }
    }
}

/// Several runs (one per shard) as one: per cache, the sums.
impl Sum for CleanupReport {
    fn sum<I: Iterator<Item = CleanupReport>>(reports: I) -> CleanupReport {
        reports.fold(
            CleanupReport {
                tables: Vec::new(),
                leases_removed: 0,
                elapsed: Duration::ZERO,
            },
            |mut all, report| {
                all += report;
                all
            },
        )
    }
}

/// [`CacheManager::cleanup`](crate::CacheManager::cleanup).
pub(crate) fn cleanup(cluster: &Cluster) -> Result<CleanupReport> {
    cleanup_with_progress(cluster, |_| {})
}

/// [`CacheManager::cleanup_with_progress`](crate::CacheManager::cleanup_with_progress):
/// shard after shard (the progress callback is not shared between threads), every
/// shard even when one fails.
pub(crate) fn cleanup_with_progress(
    cluster: &Cluster,
    mut progress: impl FnMut(&CleanupProgress),
) -> Result<CleanupReport> {
    let mut reports = Vec::new();
    let mut failure = None;
    for (name, engine) in cluster.shards() {
        match cleanup_shard(engine, &mut progress) {
            Ok(report) => reports.push(report),
            Err(error) => {
                tracing::warn!(shard = name, %error, "pgcache: cleanup failed");
                failure.get_or_insert_with(|| cluster.on_shard(name, error));
            }
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(reports.into_iter().sum()),
    }
}

/// One shard's cleanup (also the janitor's run).
pub(crate) fn cleanup_shard(
    engine: &Engine,
    mut progress: impl FnMut(&CleanupProgress),
) -> Result<CleanupReport> {
    let limits = eviction_limits(engine)?;
    if limits.iter().any(Option::is_some) {
        // Otherwise entries read since the last flush would look unused.
        if let Err(error) = engine.flush() {
            tracing::warn!(%error, "pgcache: flushing hits before eviction failed");
        }
    }
    // Eviction plans in a temporary table its batches read, outside a transaction:
    // a session's, which a transaction pooler does not keep.
    let mut conn = match limits.iter().any(Option::is_some) {
        true => engine.session_connection(
            "size bounds are set (eviction keeps its plan in a temporary table of its session)",
        )?,
        false => crate::engine::SessionConnection::Pooled(engine.live_connection()?),
    };
    // Each batch re-arms the watchdog, so only a batch left unanswered is cut.
    watched(&mut conn, |conn| {
        clean(conn, engine.tables(), &limits, &mut progress)
    })
}

/// The work of a cleanup, on one connection.
fn clean(
    conn: &mut PgConnection,
    names: &Tables,
    limits: &[Option<Limits>; CacheKind::COUNT],
    progress: &mut impl FnMut(&CleanupProgress),
) -> Result<CleanupReport> {
    let started_at: DateTime<Utc> = diesel::select(db_now()).get_result(conn)?;
    let clock = Instant::now();
    let mut tables = Vec::with_capacity(CacheKind::ALL.len());
    let mut leases_removed = 0;
    let mut total = 0;
    let mut outcome = Ok(());
    for table in CacheKind::ALL
        .map(CacheKind::table)
        .into_iter()
        .chain([LEASES_TABLE])
    {
        let table_clock = Instant::now();
        let mut report = |table_rows_removed| {
            // The caller's code: never counted as the server's silence.
            crate::watchdog::outside(|| {
                progress(&CleanupProgress {
                    table,
                    table_rows_removed,
                    rows_removed: total + table_rows_removed,
                })
            });
        };
        report(0);
        let cache = CacheKind::ALL.into_iter().find(|k| k.table() == table);
        let qualified = cache.map_or(names.leases(), |kind| names.of(kind));
        let bounded = cache.and_then(|c| Some((c, limits[c.index()]?)));
        let cleaned = delete_expired(conn, qualified, &mut report).and_then(|expired| {
            let removed = match cache {
                Some(CacheKind::Kv) => {
                    let mut delete = |conn: &mut PgConnection, condition: &str| {
                        delete_where(conn, qualified, condition, &mut |n| report(expired + n))
                    };
                    expired + sweep_invalidated(conn, names, &mut delete)?
                }
                _ => expired,
            };
            let evicted = match bounded {
                Some((kind, limits)) => evict(conn, kind, qualified, &limits, &mut |e| {
                    report(removed + e.rows_removed);
                })?,
                None => EvictionReport::default(),
            };
            Ok((removed, evicted))
        });
        match cleaned {
            Ok((removed, evicted)) => {
                total += removed + evicted.rows_removed;
                if let Some(cache) = cache {
                    crate::metrics::cleaned(cache, removed, evicted.rows_removed);
                }
                match cache {
                    Some(cache) => tables.push(TableCleanup {
                        cache,
                        rows_removed: removed,
                        evicted_rows: evicted.rows_removed,
                        evicted_bytes: evicted.bytes_freed,
                        released_paths: evicted.released_paths,
                        elapsed: table_clock.elapsed(),
                    }),
                    None => leases_removed = removed,
                }
            }
            Err(error) => {
                outcome = Err(crate::Error::from(error));
                break;
            }
        }
    }
    if outcome.is_ok() {
        outcome = crate::near::prune_changes(conn, names).map_err(Error::from);
    }
    let report = CleanupReport {
        tables,
        leases_removed,
        elapsed: clock.elapsed(),
    };
    let error_message = outcome.as_ref().err().map(ToString::to_string);
    let removed = report.rows_removed() + report.evicted_rows();
    let recorded = record_run(conn, names, started_at, removed, error_message);
    outcome?;
    recorded?;
    Ok(report)
}

/// [`CacheManager::clear`](crate::CacheManager::clear): every shard at once, each in
/// one transaction.
pub(crate) fn clear(cluster: &Cluster, cache: Option<CacheKind>) -> Result<Vec<(CacheKind, u64)>> {
    let mut cleared = cluster
        .all(|engine| clear_shard(engine, cache))?
        .into_iter();
    let mut all = cleared.next().unwrap_or_default();
    for shard in cleared {
        for ((_, sum), (_, removed)) in all.iter_mut().zip(shard) {
            *sum += removed;
        }
    }
    Ok(all)
}

fn clear_shard(engine: &Engine, cache: Option<CacheKind>) -> Result<Vec<(CacheKind, u64)>> {
    let kinds: Vec<CacheKind> = match cache {
        Some(kind) => vec![kind],
        None => CacheKind::ALL.to_vec(),
    };
    engine.maintain(|conn| {
        Ok(conn.transaction(|conn| {
            kinds
                .iter()
                .map(|kind| Ok((*kind, delete_all(conn, engine.tables().of(*kind))?)))
                .collect::<QueryResult<Vec<_>>>()
        })?)
    })
}

/// The checked limits of every cache with a configured bound, by
/// [`CacheKind::index`].
fn eviction_limits(engine: &Engine) -> Result<[Option<Limits>; CacheKind::COUNT]> {
    let config = engine.config();
    let mut limits = [None; CacheKind::COUNT];
    for cache in CacheKind::ALL {
        let bounds = config.size_bounds(cache);
        if bounds.is_bounded() {
            let checked = Limits::new(bounds, config.eviction_low_watermark())
                .map_err(|(what, reason)| Error::invalid(what, reason))?;
            limits[cache.index()] = Some(checked);
        }
    }
    Ok(limits)
}

/// Deletes expired rows of `table`, as [`delete_where`].
fn delete_expired(
    conn: &mut PgConnection,
    table: &str,
    on_batch: &mut dyn FnMut(u64),
) -> QueryResult<u64> {
    delete_where(conn, table, "expires_at <= now()", on_batch)
}

/// Deletes the rows of `table` matching `condition` (SQL on its columns) batch by
/// batch until a batch comes back short: the rest is either gone or claimed by a
/// concurrent cleaner, which finishes it. `on_batch` gets the running total.
fn delete_where(
    conn: &mut PgConnection,
    table: &str,
    condition: &str,
    on_batch: &mut dyn FnMut(u64),
) -> QueryResult<u64> {
    let mut removed = 0;
    // Per partition: a ctid is unique only within one.
    for leaf in crate::partitions::leaves(conn, table)? {
        // Table names come from a closed list and the catalog, never from input.
        // `ctid` makes one statement serve every table whatever its key; the
        // claimed rows are locked, so their ctid is stable until the delete.
        let sql = format!(
            "DELETE FROM {leaf} WHERE ctid = ANY(ARRAY(\
             SELECT ctid FROM {leaf} WHERE {condition} \
             LIMIT $1 FOR UPDATE SKIP LOCKED))"
        );
        loop {
            let batch = diesel::sql_query(&sql)
                .bind::<BigInt, _>(CLEANUP_BATCH_SIZE)
                .execute(conn)? as u64;
            removed += batch;
            if batch > 0 {
                on_batch(removed);
            }
            if batch < CLEANUP_BATCH_SIZE as u64 {
                break;
            }
        }
    }
    Ok(removed)
}

fn delete_all(conn: &mut PgConnection, table: &str) -> QueryResult<u64> {
    Ok(diesel::sql_query(format!("DELETE FROM {table}")).execute(conn)? as u64)
}

fn record_run(
    conn: &mut PgConnection,
    names: &Tables,
    started_at: DateTime<Utc>,
    rows_removed: u64,
    error_message: Option<String>,
) -> QueryResult<()> {
    diesel::sql_query(format!(
        "INSERT INTO {} (started_at, succeeded, rows_removed, error_message) \
         VALUES ($1, $2, $3, $4)",
        names.cleanup_runs()
    ))
    .bind::<Timestamptz, _>(started_at)
    .bind::<Bool, _>(error_message.is_none())
    .bind::<BigInt, _>(rows_removed as i64)
    .bind::<Nullable<Text>, _>(error_message)
    .execute(conn)
    .map(drop)
}
