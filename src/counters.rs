//! Hit and miss counting, kept in memory and flushed to the database in batches, so
//! a get never pays for a write of its own.
//!
//! Two things are counted: per-cache hit and miss totals (flushed into
//! `cache_counters`, where `pgcache stats` in another process reads them) and, for
//! the caches that track popularity (LLM responses, audio chunks), hits per entry
//! (flushed as one `UPDATE ... FROM unnest(...)` per table, a HOT update since the
//! hit columns carry no index).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bytea};

use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::schema::cache_counters;

#[derive(Debug, Default)]
struct Pending {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What one flush writes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    totals: Vec<(CacheKind, u64, u64)>,
    entry_hits: Vec<(CacheKind, HashMap<KeyDigest, u64>)>,
}

#[derive(Debug)]
pub(crate) struct Counters {
    pending: [Pending; CacheKind::COUNT],
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
            pending: Default::default(),
            entry_hits: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn record_lookups(&self, kind: CacheKind, hits: u64, misses: u64) {
        let pending = &self.pending[kind.index()];
        if hits > 0 {
            pending.hits.fetch_add(hits, Ordering::Relaxed);
        }
        if misses > 0 {
            pending.misses.fetch_add(misses, Ordering::Relaxed);
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
    pub(crate) fn take(&self) -> Batch {
        let totals = CacheKind::ALL
            .into_iter()
            .map(|kind| {
                let p = &self.pending[kind.index()];
                (
                    kind,
                    p.hits.swap(0, Ordering::AcqRel),
                    p.misses.swap(0, Ordering::AcqRel),
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
            self.record_lookups(kind, hits, misses);
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
        let p = &self.pending[kind.index()];
        (
            p.hits.load(Ordering::Relaxed),
            p.misses.load(Ordering::Relaxed),
        )
    }
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.totals.is_empty() && self.entry_hits.is_empty()
    }

    /// Writes the batch in one transaction.
    pub(crate) fn write(&self, conn: &mut PgConnection) -> QueryResult<()> {
        conn.transaction(|conn| {
            for &(kind, hits, misses) in &self.totals {
                diesel::insert_into(cache_counters::table)
                    .values((
                        cache_counters::cache_name.eq(kind.name()),
                        cache_counters::hits.eq(hits as i64),
                        cache_counters::misses.eq(misses as i64),
                    ))
                    .on_conflict(cache_counters::cache_name)
                    .do_update()
                    .set((
                        cache_counters::hits.eq(cache_counters::hits + hits as i64),
                        cache_counters::misses.eq(cache_counters::misses + misses as i64),
                        cache_counters::updated_at.eq(crate::expiry::db_now()),
                    ))
                    .execute(conn)?;
            }
            for (kind, hits) in &self.entry_hits {
                let (digests, counts): (Vec<Vec<u8>>, Vec<i64>) = hits
                    .iter()
                    .map(|(d, n)| (d.as_bytes().to_vec(), *n as i64))
                    .unzip();
                // The table name comes from a closed enum, never from input.
                diesel::sql_query(format!(
                    "UPDATE {table} AS t SET hit_count = t.hit_count + h.n, \
                     last_accessed_at = greatest(t.last_accessed_at, now()) \
                     FROM unnest($1, $2) AS h(key_hash, n) WHERE t.key_hash = h.key_hash",
                    table = kind.table()
                ))
                .bind::<Array<Bytea>, _>(digests)
                .bind::<Array<BigInt>, _>(counts)
                .execute(conn)?;
            }
            Ok(())
        })
    }
}
