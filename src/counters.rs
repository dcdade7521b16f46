//! Operation counting, kept in memory and flushed to the database in batches, so
//! a get never pays for a write of its own.
//!
//! Per cache, this process's totals since start of hits, misses, sets, deletes,
//! errors and fail-open skips ([`CounterSnapshot`], read without a round trip).
//! Hit and miss totals are also flushed into `cache_counters` (the part counted
//! since the last flush), where `pgcache stats` in another process reads them. For
//! the caches that track popularity (LLM responses, audio chunks), hits per entry
//! (flushed as one `UPDATE ... FROM unnest(...)` per table, a HOT update since the
//! hit columns carry no index).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bytea, Text};

use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::striped::StripedCounter;
use crate::tables::Tables;

/// One cache's totals since start; hits and misses up to `flushed_*` are written.
#[derive(Debug, Default)]
struct Tally {
    /// Striped: every hit and miss, near-cache hits included, counts here.
    hits: StripedCounter,
    misses: StripedCounter,
    sets: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
    fail_open: AtomicU64,
    flushed_hits: AtomicU64,
    flushed_misses: AtomicU64,
}

impl Tally {
    /// What is counted past the flushed mark, moving the mark up to it.
    fn take(total: &StripedCounter, flushed: &AtomicU64) -> u64 {
        let now = total.get();
        now - flushed.swap(now, Ordering::AcqRel)
    }
}

/// One cache's operation counts in this process since start (see
/// [`CacheManager::counters`](crate::CacheManager::counters)). Operations on a
/// caller's connection (the `*_in` methods) are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CacheCounters {
    /// Which cache.
    pub cache: CacheKind,
    /// Keys looked up that found a live entry (near-cache hits included).
    pub hits: u64,
    /// Keys looked up that found nothing (fail-open misses included).
    pub misses: u64,
    /// Entries written by `set` and `set_many`.
    pub sets: u64,
    /// Keys given to `delete` and `delete_many`.
    pub deletes: u64,
    /// Operations that returned an error.
    pub errors: u64,
    /// Operations that failed transiently and were answered as a miss or a skipped
    /// write (fail-open mode).
    pub fail_open_skips: u64,
}

/// This process's operation counts, per cache, read from memory (no database round
/// trip): what [`CacheManager::counters`](crate::CacheManager::counters) returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CounterSnapshot {
    /// One entry per cache, in [`CacheKind::ALL`] order.
    pub caches: Vec<CacheCounters>,
}

impl CounterSnapshot {
    /// Several shards' counts as one.
    pub(crate) fn sum(snapshots: impl Iterator<Item = CounterSnapshot>) -> CounterSnapshot {
        snapshots
            .reduce(|mut all, shard| {
                for (sum, c) in all.caches.iter_mut().zip(shard.caches) {
                    add_counts!(sum, c; hits, misses, sets, deletes, errors, fail_open_skips);
                }
                all
            })
            .expect("a cache has at least one shard")
    }

    /// The counts of one cache.
    pub fn cache(&self, kind: CacheKind) -> &CacheCounters {
        &self.caches[kind.index()]
    }
}

/// What one flush writes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    totals: Vec<(CacheKind, u64, u64)>,
    entry_hits: Vec<(CacheKind, HashMap<KeyDigest, u64>)>,
}

#[derive(Debug)]
pub(crate) struct Counters {
    tallies: [Tally; CacheKind::COUNT],
    entry_hits: Mutex<HashMap<(CacheKind, KeyDigest), u64>>,
}

/// Flush early when this many distinct entries have pending hits, to bound memory.
const FLUSH_AT_ENTRIES: usize = 10_000;

/// Most distinct entries with pending hits: while flushes fail (database down),
/// hits on further entries are not counted, so memory stays bounded.
const MAX_PENDING_ENTRIES: usize = 8 * FLUSH_AT_ENTRIES;

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            tallies: Default::default(),
            entry_hits: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn record_lookups(&self, kind: CacheKind, hits: u64, misses: u64) {
        let tally = &self.tallies[kind.index()];
        if hits > 0 {
            tally.hits.add(hits);
        }
        if misses > 0 {
            tally.misses.add(misses);
        }
    }

    pub(crate) fn record_sets(&self, kind: CacheKind, entries: u64) {
        self.tallies[kind.index()]
            .sets
            .fetch_add(entries, Ordering::Relaxed);
    }

    pub(crate) fn record_deletes(&self, kind: CacheKind, keys: u64) {
        self.tallies[kind.index()]
            .deletes
            .fetch_add(keys, Ordering::Relaxed);
    }

    pub(crate) fn record_error(&self, kind: CacheKind) {
        self.tallies[kind.index()]
            .errors
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_fail_open(&self, kind: CacheKind) {
        self.tallies[kind.index()]
            .fail_open
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The totals since start.
    pub(crate) fn snapshot(&self) -> CounterSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            caches: CacheKind::ALL
                .into_iter()
                .map(|cache| {
                    let t = &self.tallies[cache.index()];
                    CacheCounters {
                        cache,
                        hits: t.hits.get(),
                        misses: t.misses.get(),
                        sets: load(&t.sets),
                        deletes: load(&t.deletes),
                        errors: load(&t.errors),
                        fail_open_skips: load(&t.fail_open),
                    }
                })
                .collect(),
        }
    }

    /// Counts one hit on an entry whose table tracks hit counts; true when enough
    /// entries are pending that a flush should run soon.
    pub(crate) fn record_entry_hit(&self, kind: CacheKind, digest: KeyDigest) -> bool {
        let mut map = self.entry_hits.lock().unwrap_or_else(|p| p.into_inner());
        let len = map.len();
        match map.get_mut(&(kind, digest)) {
            Some(n) => *n += 1,
            None if len < MAX_PENDING_ENTRIES => {
                map.insert((kind, digest), 1);
            }
            None => {}
        }
        map.len() >= FLUSH_AT_ENTRIES
    }

    /// Takes everything pending; give it back with [`Self::restore`] if writing fails.
    /// One flush at a time (the engine's `flushing` lock).
    pub(crate) fn take(&self) -> Batch {
        let totals = CacheKind::ALL
            .into_iter()
            .map(|kind| {
                let t = &self.tallies[kind.index()];
                (
                    kind,
                    Tally::take(&t.hits, &t.flushed_hits),
                    Tally::take(&t.misses, &t.flushed_misses),
                )
            })
            .filter(|(_, h, m)| h + m > 0)
            .collect();
        let drained =
            std::mem::take(&mut *self.entry_hits.lock().unwrap_or_else(|p| p.into_inner()));
        let mut by_kind: HashMap<CacheKind, HashMap<KeyDigest, u64>> = HashMap::new();
        for ((kind, digest), n) in drained {
            by_kind.entry(kind).or_default().insert(digest, n);
        }
        Batch {
            totals,
            entry_hits: by_kind.into_iter().collect(),
        }
    }

    /// Puts back a batch that could not be written, so no count is lost.
    pub(crate) fn restore(&self, batch: Batch) {
        for (kind, hits, misses) in batch.totals {
            // Lower the flushed mark: the totals since start already hold them.
            let t = &self.tallies[kind.index()];
            t.flushed_hits.fetch_sub(hits, Ordering::AcqRel);
            t.flushed_misses.fetch_sub(misses, Ordering::AcqRel);
        }
        let mut map = self.entry_hits.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, hits) in batch.entry_hits {
            for (digest, n) in hits {
                *map.entry((kind, digest)).or_insert(0) += n;
            }
        }
    }
    /// Pending (not yet flushed) hits and misses of one cache.
    pub(crate) fn pending(&self, kind: CacheKind) -> (u64, u64) {
        let t = &self.tallies[kind.index()];
        let pending = |total: &StripedCounter, flushed: &AtomicU64| {
            // The mark first: it never passes the total read after it.
            let flushed = flushed.load(Ordering::Acquire);
            total.get().saturating_sub(flushed)
        };
        (
            pending(&t.hits, &t.flushed_hits),
            pending(&t.misses, &t.flushed_misses),
        )
    }
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.totals.is_empty() && self.entry_hits.is_empty()
    }

    /// Writes the batch in one transaction, to `tables`.
    pub(crate) fn write(&self, conn: &mut PgConnection, tables: &Tables) -> QueryResult<()> {
        conn.transaction(|conn| {
            for &(kind, hits, misses) in &self.totals {
                diesel::sql_query(crate::relaxed::marked(format!(
                    "INSERT INTO {t} AS c (cache_name, hits, misses) VALUES ($1, $2, $3) \
                     ON CONFLICT (cache_name) DO UPDATE SET hits = c.hits + excluded.hits, \
                     misses = c.misses + excluded.misses, updated_at = statement_timestamp()",
                    t = tables.counters()
                )))
                .bind::<Text, _>(kind.name())
                .bind::<BigInt, _>(hits as i64)
                .bind::<BigInt, _>(misses as i64)
                .execute(conn)?;
            }
            for (kind, hits) in &self.entry_hits {
                let (digests, counts): (Vec<Vec<u8>>, Vec<i64>) = hits
                    .iter()
                    .map(|(d, n)| (d.as_bytes().to_vec(), *n as i64))
                    .unzip();
                diesel::sql_query(crate::relaxed::marked(format!(
                    "UPDATE {table} AS t SET hit_count = t.hit_count + h.n, \
                     last_accessed_at = greatest(t.last_accessed_at, now()) \
                     FROM unnest($1, $2) AS h(key_hash, n) WHERE t.key_hash = h.key_hash",
                    table = tables.of(*kind)
                )))
                .bind::<Array<Bytea>, _>(digests)
                .bind::<Array<BigInt>, _>(counts)
                .execute(conn)?;
            }
            Ok(())
        })
    }
}
