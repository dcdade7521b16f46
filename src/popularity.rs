//! Popularity reports of the tables that count hits per entry (LLM responses, audio
//! chunks): one query for the most-hit entries and one for the totals, serving
//! [`CacheManager::stats`](crate::CacheManager::stats),
//! [`LlmResponseCache::top`](crate::LlmResponseCache::top) and
//! [`AudioChunkCache::stats`](crate::AudioChunkCache::stats) alike.
//!
//! Both scan the live rows: hit counts carry no index, on purpose (the deferred
//! hit updates stay HOT), so these are maintenance queries, not request-path ones.

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bytea, Double, Nullable, Text};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::error::Result;
use crate::kind::CacheKind;
use crate::metrics::Op;

/// Hex characters of a digest in [`TopEntry::hash_prefix`].
const HASH_PREFIX_CHARS: usize = 16;

/// One of the most-hit live entries of a cache that counts hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TopEntry {
    /// The entry's key digest, 64 hex characters.
    pub key_hash: String,
    /// Hits counted in the database (hits not yet flushed are not included).
    pub hits: u64,
    /// The provider that produced the entry.
    pub provider: String,
    /// The model that produced it: the LLM model when the prompt named one, the
    /// voice model of an audio chunk.
    pub model: Option<String>,
}

impl TopEntry {
    /// The first 16 hex characters of [`key_hash`](Self::key_hash), as reports show
    /// it.
    pub fn hash_prefix(&self) -> &str {
        self.key_hash
            .get(..HASH_PREFIX_CHARS)
            .unwrap_or(&self.key_hash)
    }
}

/// Totals and most-hit entries of a cache that counts hits, over its live entries.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HitStats {
    /// Live entries.
    pub entries: u64,
    /// Their payload bytes (for audio: the chunks' `byte_size`, inline or at their
    /// storage path).
    pub total_bytes: u64,
    /// Mean hits per live entry.
    pub average_hit_count: f64,
    /// The entries with the most hits, most first (only those hit at least once).
    pub most_accessed: Vec<TopEntry>,
}

/// On every shard: flushes this manager's pending hits (so they count), then runs
/// `report` on a connection (with caching disabled, `empty`); each shard's report.
pub(crate) fn flushed_reports<R: Clone + Send + Sync>(
    cluster: &Cluster,
    kind: CacheKind,
    empty: R,
    report: impl Fn(&mut PgConnection, &str) -> QueryResult<R> + Sync,
) -> Result<Vec<R>> {
    cluster.all(|engine| {
        engine.flush()?;
        let table = engine.tables().of(kind);
        engine.read(kind, Op::Report, empty.clone(), |conn| {
            Ok(report(conn, table)?)
        })
    })
}

/// The `n` most-hit entries of several shards' top lists, most first (ties by
/// digest, as each shard orders them).
pub(crate) fn merge_top(lists: impl IntoIterator<Item = Vec<TopEntry>>, n: usize) -> Vec<TopEntry> {
    let mut all: Vec<TopEntry> = lists.into_iter().flatten().collect();
    all.sort_by(|a, b| {
        b.hits
            .cmp(&a.hits)
            .then_with(|| a.key_hash.cmp(&b.key_hash))
    });
    all.truncate(n);
    all
}

impl HitStats {
    /// Figures of no entries.
    pub(crate) fn empty() -> Self {
        HitStats {
            entries: 0,
            total_bytes: 0,
            average_hit_count: 0.0,
            most_accessed: Vec::new(),
        }
    }

    /// Several shards' figures as one: totals summed, the mean weighted by entries,
    /// the `top` most-hit entries of all.
    pub(crate) fn merge(parts: Vec<HitStats>, top: usize) -> HitStats {
        let entries: u64 = parts.iter().map(|p| p.entries).sum();
        let hits: f64 = parts
            .iter()
            .map(|p| p.average_hit_count * p.entries as f64)
            .sum();
        HitStats {
            entries,
            total_bytes: parts.iter().map(|p| p.total_bytes).sum(),
            average_hit_count: if entries == 0 {
                0.0
            } else {
                hits / entries as f64
            },
            most_accessed: merge_top(parts.into_iter().map(|p| p.most_accessed), top),
        }
    }
}

/// The `n` live entries of `kind` with the most hits (at least one), most first;
/// none for a cache that does not count hits. `name`: `kind`'s table,
/// schema-qualified.
pub(crate) fn top_entries(
    conn: &mut PgConnection,
    kind: CacheKind,
    name: &str,
    n: usize,
) -> QueryResult<Vec<TopEntry>> {
    #[derive(QueryableByName)]
    struct Top {
        #[diesel(sql_type = Bytea)]
        key_hash: Vec<u8>,
        #[diesel(sql_type = BigInt)]
        hit_count: i64,
        #[diesel(sql_type = Text)]
        provider: String,
        #[diesel(sql_type = Nullable<Text>)]
        model: Option<String>,
    }
    let table = kind.descriptor();
    let Some(hits) = &table.hits else {
        return Ok(Vec::new());
    };
    let [provider, model] = hits.made_by;
    // Table and column names come from the closed descriptors, never from input.
    let top: Vec<Top> = diesel::sql_query(format!(
        "SELECT key_hash, hit_count, {provider} AS provider, {model} AS model FROM {} \
         WHERE expires_at > statement_timestamp() AND hit_count > 0 \
         ORDER BY hit_count DESC, key_hash LIMIT $1",
        name
    ))
    .bind::<BigInt, _>(i64::try_from(n).unwrap_or(i64::MAX))
    .load(conn)?;
    Ok(top
        .into_iter()
        .map(|t| TopEntry {
            key_hash: hex::encode(t.key_hash),
            hits: t.hit_count.unsigned_abs(),
            provider: t.provider,
            model: t.model,
        })
        .collect())
}

/// Live entries, their payload bytes, mean hits and the `top` most-hit entries of
/// `kind` (a cache that counts hits), `name` its table, schema-qualified.
pub(crate) fn hit_stats(
    conn: &mut PgConnection,
    kind: CacheKind,
    name: &str,
    top: usize,
) -> QueryResult<HitStats> {
    #[derive(QueryableByName)]
    struct Totals {
        #[diesel(sql_type = BigInt)]
        entries: i64,
        #[diesel(sql_type = BigInt)]
        total_bytes: i64,
        #[diesel(sql_type = Double)]
        average_hits: f64,
    }
    let table = kind.descriptor();
    // sum and avg of bigint are numeric, which needs a decimal crate: cast.
    let totals: Totals = diesel::sql_query(format!(
        "SELECT count(*) AS entries, coalesce(sum({}), 0)::int8 AS total_bytes, \
         coalesce(avg(hit_count), 0)::float8 AS average_hits \
         FROM {} WHERE expires_at > statement_timestamp()",
        table.payload_bytes, name
    ))
    .get_result(conn)?;
    Ok(HitStats {
        entries: totals.entries.unsigned_abs(),
        total_bytes: totals.total_bytes.unsigned_abs(),
        average_hit_count: totals.average_hits,
        most_accessed: top_entries(conn, kind, name, top)?,
    })
}
