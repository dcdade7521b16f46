//! [`CacheManager::stats`](crate::CacheManager::stats): entries, sizes, hits and misses of every cache.

use std::fmt;
use std::iter::Sum;
use std::ops::AddAssign;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use serde::Serialize;

use crate::cluster::Cluster;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::kind::CacheKind;
use crate::near::NearCacheStats;
use crate::pool::PoolStatus;
use crate::popularity::{hit_stats, merge_top, top_entries, HitStats, TopEntry};
use crate::tables::Tables;
use crate::watchdog::watched;

/// How many entries the "top cached" and "most accessed" lists show.
pub const TOP_ENTRIES: usize = 5;

/// A snapshot of every cache, from [`CacheManager::stats`](crate::CacheManager::stats). Its `Display` is the
/// "Cache Statistics" report; it serializes to JSON for monitoring.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// One entry per cache, in [`CacheKind::ALL`] order.
    pub caches: Vec<TableStats>,
    /// Live LLM responses with the most hits, most first (only those hit at least once).
    pub top_llm_responses: Vec<TopEntry>,
    /// Audio chunk cache figures.
    pub audio: HitStats,
    /// Rows over all caches, expired ones included.
    pub total_entries: u64,
    /// Hits and misses over all caches.
    pub lookups: Lookups,
    /// This process's near caches (empty when none is configured).
    pub near_caches: Vec<NearCacheStats>,
    /// Shards that did not answer (empty for one database, which fails the call
    /// instead): every figure above is over the shards that did.
    pub shards_down: Vec<ShardDown>,
    /// This process's connection pools, one per shard, as the call ended (see
    /// [`CacheManager::pool_status`](crate::CacheManager::pool_status)).
    pub pools: Vec<PoolStatus>,
}

/// A shard that did not answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShardDown {
    /// The shard's name.
    pub name: String,
    /// Why, as the error said it.
    pub error: String,
}

impl CacheStats {
    /// Several shards' figures as one; `down` lists the shards that gave none.
    fn merge(
        parts: Vec<CacheStats>,
        down: Vec<ShardDown>,
        near_caches: Vec<NearCacheStats>,
        pools: Vec<PoolStatus>,
    ) -> Self {
        let mut caches: Vec<TableStats> = CacheKind::ALL
            .into_iter()
            .map(|kind| TableStats {
                cache: kind,
                table: kind.table(),
                entries: 0,
                active_entries: 0,
                expired_entries: 0,
                size_bytes: 0,
                lookups: Lookups::default(),
            })
            .collect();
        for part in &parts {
            for (sum, c) in caches.iter_mut().zip(&part.caches) {
                *sum += c;
            }
        }
        let lookups = caches.iter().map(|c| c.lookups).sum();
        let (tops, audio): (Vec<_>, Vec<_>) = parts
            .into_iter()
            .map(|p| (p.top_llm_responses, p.audio))
            .unzip();
        CacheStats {
            total_entries: caches.iter().map(|c| c.entries).sum(),
            caches,
            top_llm_responses: merge_top(tops, TOP_ENTRIES),
            audio: HitStats::merge(audio, TOP_ENTRIES),
            lookups,
            near_caches,
            shards_down: down,
            pools,
        }
    }
}

/// Figures of one cache table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TableStats {
    /// The cache.
    pub cache: CacheKind,
    /// Its table.
    pub table: &'static str,
    /// Rows in the table, expired ones included.
    pub entries: u64,
    /// Rows that have not expired.
    pub active_entries: u64,
    /// Expired rows not yet removed by cleanup.
    pub expired_entries: u64,
    /// `pg_total_relation_size` of the table and its partitions: heap, indexes and
    /// TOAST, in bytes.
    pub size_bytes: u64,
    /// Reads of this cache, counted by every manager that has flushed.
    pub lookups: Lookups,
}

/// Hit and miss counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Lookups {
    /// Reads that found a live entry.
    pub hits: u64,
    /// Reads that found nothing or an expired entry.
    pub misses: u64,
}

impl Lookups {
    /// Hits and misses together.
    pub fn total(self) -> u64 {
        self.hits + self.misses
    }

    /// Hits divided by lookups (0.0 to 1.0); `None` before the first lookup.
    pub fn hit_rate(self) -> Option<f64> {
        (self.total() > 0).then(|| self.hits as f64 / self.total() as f64)
    }
}

impl AddAssign for Lookups {
    fn add_assign(&mut self, other: Lookups) {
        self.hits += other.hits;
        self.misses += other.misses;
    }
}

impl Sum for Lookups {
    fn sum<I: Iterator<Item = Lookups>>(parts: I) -> Lookups {
        parts.fold(Lookups::default(), |mut all, part| {
            all += part;
            all
        })
    }
}

/// The same cache's figures on another shard added in: the sums.
impl AddAssign<&TableStats> for TableStats {
    fn add_assign(&mut self, other: &TableStats) {
        debug_assert_eq!(self.cache, other.cache);
        self.entries += other.entries;
        self.active_entries += other.active_entries;
        self.expired_entries += other.expired_entries;
        self.size_bytes += other.size_bytes;
        self.lookups += other.lookups;
    }
}

/// [`CacheManager::stats`](crate::CacheManager::stats): every shard at once; with
/// several, one that does not answer is listed instead of failing the call.
pub(crate) fn stats(cluster: &Cluster) -> Result<CacheStats> {
    let mut parts = Vec::new();
    let mut down = Vec::new();
    for (name, result) in cluster.each(shard_stats) {
        match result {
            Ok(part) => parts.push(part),
            Err(error) if cluster.single().is_some() => return Err(error),
            Err(error) => {
                tracing::warn!(shard = name, %error, "pgcache: a shard gave no statistics");
                down.push(ShardDown {
                    name: name.to_owned(),
                    error: error.to_string(),
                });
            }
        }
    }
    Ok(CacheStats::merge(
        parts,
        down,
        cluster.near_cache_stats(),
        cluster.pool_status(),
    ))
}

/// One shard's figures (its near caches left to the caller): every statement on one
/// live connection, under the watchdog, so a server that freezes during the call
/// fails it within the statement limit.
fn shard_stats(engine: &Engine) -> Result<CacheStats> {
    flush_before_reading(engine)?;
    let mut conn = engine.live_connection()?;
    watched(&mut conn, |conn| {
        let mut caches = Vec::with_capacity(CacheKind::ALL.len());
        for (kind, lookups) in lookups(engine, conn)? {
            let counts = table_counts(conn, engine.tables().of(kind))?;
            caches.push(TableStats {
                cache: kind,
                table: kind.table(),
                entries: counts.total as u64,
                active_entries: counts.active as u64,
                expired_entries: (counts.total - counts.active) as u64,
                size_bytes: counts.size_bytes as u64,
                lookups,
            });
        }
        let tables = engine.tables();
        let (llm, audio) = (CacheKind::LlmResponse, CacheKind::AudioChunk);
        let top_llm_responses = top_entries(conn, llm, tables.of(llm), TOP_ENTRIES)?;
        let audio = hit_stats(conn, audio, tables.of(audio), TOP_ENTRIES)?;
        let all = caches.iter().map(|c| c.lookups).sum();
        Ok(CacheStats {
            total_entries: caches.iter().map(|c| c.entries).sum(),
            caches,
            top_llm_responses,
            audio,
            near_caches: Vec::new(),
            lookups: all,
            shards_down: Vec::new(),
            pools: Vec::new(),
        })
    })
}

/// Tries to write this manager's pending counts before they are read, so that
/// none is in flight meanwhile (on failure they stay pending, and [`lookups`] adds
/// them). A database that did not answer (unresponsive, or no connection) fails
/// the call at once: its statements would only wait as long again.
pub(crate) fn flush_before_reading(engine: &Engine) -> Result<()> {
    match engine.flush() {
        Err(error @ (Error::Unresponsive { .. } | Error::Connection(_))) => Err(error),
        Err(error) => {
            tracing::warn!(%error, "pgcache: flushing hit counters before reading them failed");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Hits and misses per cache: the flushed totals of every process, read on `conn`
/// (after [`flush_before_reading`]), plus this manager's unflushed counts.
pub(crate) fn lookups(
    engine: &Engine,
    conn: &mut PgConnection,
) -> Result<Vec<(CacheKind, Lookups)>> {
    #[derive(QueryableByName)]
    struct Flushed {
        #[diesel(sql_type = diesel::sql_types::Text)]
        cache_name: String,
        #[diesel(sql_type = BigInt)]
        hits: i64,
        #[diesel(sql_type = BigInt)]
        misses: i64,
    }
    let flushed: Vec<(String, i64, i64)> = diesel::sql_query(format!(
        "SELECT cache_name, hits, misses FROM {}",
        engine.tables().counters()
    ))
    .load::<Flushed>(conn)?
    .into_iter()
    .map(|f| (f.cache_name, f.hits, f.misses))
    .collect();
    Ok(CacheKind::ALL
        .into_iter()
        .map(|kind| {
            let (hits, misses) = engine.counters().pending(kind);
            let mut lookups = Lookups { hits, misses };
            if let Some((_, h, m)) = flushed.iter().find(|(name, ..)| name == kind.name()) {
                lookups += Lookups {
                    hits: *h as u64,
                    misses: *m as u64,
                };
            }
            (kind, lookups)
        })
        .collect())
}

#[derive(QueryableByName)]
struct TableCounts {
    #[diesel(sql_type = BigInt)]
    total: i64,
    #[diesel(sql_type = BigInt)]
    active: i64,
    #[diesel(sql_type = BigInt)]
    size_bytes: i64,
}

fn table_counts(conn: &mut PgConnection, table: &str) -> QueryResult<TableCounts> {
    // Table names come from a closed list, never from input.
    diesel::sql_query(format!(
        "SELECT count(*) AS total, count(*) FILTER (WHERE expires_at > now()) AS active, \
         {size} AS size_bytes FROM {table}",
        size = crate::partitions::size_sql(table)
    ))
    .get_result(conn)
}

/// Bytes on disk of every cache table of `tables` (`pg_total_relation_size`),
/// without counting rows: cheap enough for health checks.
pub(crate) fn total_size(conn: &mut PgConnection, tables: &Tables) -> QueryResult<u64> {
    #[derive(QueryableByName)]
    struct Size {
        #[diesel(sql_type = BigInt)]
        size_bytes: i64,
    }
    let sum = CacheKind::ALL
        .map(|kind| crate::partitions::size_sql(tables.of(kind)))
        .join(" + ");
    let size: Size =
        diesel::sql_query(format!("SELECT ({sum})::int8 AS size_bytes")).get_result(conn)?;
    Ok(size.size_bytes as u64)
}

/// Bytes as `pg_size_pretty` shows them (1024-based), with two decimals.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// A hit rate as a percentage, or `n/a` before the first lookup.
pub(crate) fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "n/a".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

fn write_top(
    f: &mut fmt::Formatter<'_>,
    heading: &str,
    entries: &[TopEntry],
    provider: bool,
) -> fmt::Result {
    if entries.is_empty() {
        return Ok(());
    }
    writeln!(f, "  {heading}:")?;
    for (i, e) in entries.iter().enumerate() {
        let hash = e.hash_prefix();
        if provider {
            writeln!(
                f,
                "    {}. Hash: {hash}... ({} hits, {})",
                i + 1,
                e.hits,
                e.provider
            )?;
        } else {
            writeln!(f, "    {}. Hash: {hash}... ({} hits)", i + 1, e.hits)?;
        }
    }
    Ok(())
}

impl fmt::Display for CacheStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "=== Cache Statistics ===")?;
        for c in &self.caches {
            writeln!(f)?;
            writeln!(f, "{}:", c.cache.descriptor().title)?;
            writeln!(
                f,
                "  Total Entries: {} ({} active, {} expired)",
                c.entries, c.active_entries, c.expired_entries
            )?;
            writeln!(f, "  Size on Disk: {}", human_bytes(c.size_bytes))?;
            writeln!(
                f,
                "  Hits: {}, Misses: {}, Hit Rate: {}",
                c.lookups.hits,
                c.lookups.misses,
                percent(c.lookups.hit_rate())
            )?;
            match c.cache {
                CacheKind::LlmResponse => {
                    write_top(f, "Top Cached Responses", &self.top_llm_responses, true)?;
                }
                CacheKind::AudioChunk => {
                    writeln!(f, "  Total Size: {}", human_bytes(self.audio.total_bytes))?;
                    writeln!(
                        f,
                        "  Average Hit Count: {:.2}",
                        self.audio.average_hit_count
                    )?;
                    write_top(f, "Most Accessed", &self.audio.most_accessed, false)?;
                }
                _ => {}
            }
        }
        for near in &self.near_caches {
            writeln!(f)?;
            writeln!(f, "Near Cache ({}):", near.cache)?;
            writeln!(
                f,
                "  Hits: {}, Misses: {}, Bypassed: {}, Invalidated: {}, Evicted: {}",
                near.hits, near.misses, near.bypasses, near.invalidations, near.evictions
            )?;
            writeln!(
                f,
                "  Entries: {} ({}), Poll Lag: {}",
                near.entries,
                human_bytes(near.bytes),
                near.poll_lag_ms
                    .map_or_else(|| "not current".to_owned(), |ms| format!("{ms:.1} ms"))
            )?;
        }
        for pool in &self.pools {
            writeln!(f)?;
            writeln!(f, "Connection Pool ({}):", pool.shard)?;
            writeln!(f, "  {pool}")?;
        }
        for shard in &self.shards_down {
            writeln!(f)?;
            writeln!(
                f,
                "Shard `{}` DOWN (not counted): {}",
                shard.name, shard.error
            )?;
        }
        writeln!(f)?;
        writeln!(f, "Total Cache Entries: {}", self.total_entries)?;
        write!(
            f,
            "Overall Hit Rate: {} ({} hits, {} misses)",
            percent(self.lookups.hit_rate()),
            self.lookups.hits,
            self.lookups.misses
        )
    }
}
