//! The [`Cache`] trait: what users call on every cache handle. What each table
//! supplies is the crate-private [`Storage`] supertrait, so the public trait shows
//! only operations and cannot be implemented outside the crate.

use std::cmp::Ordering;
use std::time::Duration;

use diesel::data_types::PgInterval;
use diesel::pg::PgConnection;
use diesel::Connection;

use crate::cluster::{Cluster, Part};
use crate::engine::Engine;
use crate::error::Result;
use crate::expiry::ttl_interval;
use crate::freshness::Found;
use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::skipped::Skipped;

mod near;

#[cfg(feature = "tokio")]
pub(crate) use near::{get_from_memory, get_many_from_memory};

/// `Cache::get`; with `memory` false, the near cache is not looked in first (the
/// caller did, `get_from_memory`), so its miss is not counted twice.
pub(crate) fn get_entry<C: NearStorage + ?Sized>(
    cache: &C,
    key: &C::Key,
    memory: bool,
) -> Result<Option<C::Entry>> {
    Ok(lookup(cache, key, memory, false)?.map(|found| found.entry))
}

/// `Cache::get_many`; with `memory` false, as [`get_entry`]'s (the caller looked
/// in the near cache already, `get_many_from_memory`).
pub(crate) fn get_many_entries<C: NearStorage + ?Sized>(
    cache: &C,
    keys: &[&C::Key],
    memory: bool,
) -> Result<Vec<Option<C::Entry>>> {
    cache.front().observe(C::KIND, Op::GetMany, |span| {
        let checked = check_keys(cache, keys)?;
        span.record("rows", keys.len());
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut parts = per_shard(cache, keys, &checked, |engine, keys, checked| {
            near::read_many(cache, engine, keys, checked, memory)
        })?;
        // One part (always so with one shard) holds every key, in order.
        if let [(_, found)] = &mut parts[..] {
            return Ok(std::mem::take(found));
        }
        let mut found: Vec<Option<C::Entry>> = keys.iter().map(|_| None).collect();
        for (items, entries) in parts {
            for (i, entry) in items.into_iter().zip(entries) {
                found[i] = entry;
            }
        }
        Ok(found)
    })
}

/// [`get_entry`], and with `fresh` the entry's freshness when it is read from the
/// database: what `get_or_compute` decides early refresh by. A get counted and
/// observed as such either way.
pub(crate) fn lookup<C: NearStorage + ?Sized>(
    cache: &C,
    key: &C::Key,
    memory: bool,
    fresh: bool,
) -> Result<Option<Found<C::Entry>>> {
    cache.front().observe(C::KIND, Op::Get, |span| {
        let checked = cache.check_key(key)?;
        let engine = cache.engine_for(key, &checked);
        let found = match near::near_of::<C>(engine) {
            Some(near) => near::get(cache, engine, near, key, &checked, memory)?,
            None if fresh => engine
                .read(C::KIND, Op::Get, None, |conn| {
                    cache.read_for_near(conn, key, &checked)
                })?
                .map(|read| Found {
                    entry: read.entry,
                    fresh: Some(read.fresh),
                }),
            None => engine
                .read(C::KIND, Op::Get, None, |conn| {
                    cache.read_one(conn, key, &checked)
                })?
                .map(|entry| Found { entry, fresh: None }),
        };
        let hit = found.is_some();
        engine.record_lookups(C::KIND, u64::from(hit), u64::from(!hit));
        span.record("hit", hit);
        Ok(found)
    })
}

pub(crate) use near::{NearRead, NearStorage};
pub(crate) use storage::Storage;

/// What every cache handle holds: the shards' engines it works through and, when
/// the caller chose one with `with_default_ttl`, the TTL of its `set`.
#[derive(Debug, Clone, Copy)]
pub struct Handle<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) ttl: Option<Duration>,
}

impl<'a> Handle<'a> {
    /// A handle with its cache's default TTL.
    pub(crate) fn new(cluster: &'a Cluster) -> Self {
        Handle { cluster, ttl: None }
    }

    /// The TTL of `set` for cache `kind`: the one chosen, else the kind's preset.
    pub(crate) fn ttl(&self, kind: CacheKind) -> Duration {
        self.ttl
            .unwrap_or_else(|| self.cluster.config().ttl().default_for(kind))
    }

    /// Where an operation is observed (its span, its error count) before its key is
    /// routed.
    pub(crate) fn front(&self) -> &'a Engine {
        self.cluster.front()
    }
}

mod storage {
    use super::*;

    /// What one cache table supplies to the shared operations of [`Cache`]: keys and
    /// entries checked before a connection is taken, then read, written and removed
    /// on a connection. Implemented by the key/value cache and, through the
    /// typed-table core, by every digest-keyed table.
    // `Sync` and `Send` bounds: a batch over several shards runs on a thread per shard.
    pub trait Storage: Sync {
        /// What identifies an entry.
        type Key: ?Sized + Sync;
        /// What is stored.
        type Value;
        /// What a hit returns: the value, with metadata for the typed caches.
        type Entry: Send;
        /// A key checked before any connection is taken (its digest, for the
        /// digest-keyed tables), so the work is not done twice.
        type CheckedKey: Clone + Send + Sync;
        /// An entry validated before any connection is taken, ready to write.
        type Row<'a>: Send + Sync
        where
            Self: 'a;

        /// Which cache this is.
        const KIND: CacheKind;

        /// The shards and chosen TTL of this handle.
        fn handle(&self) -> &Handle<'_>;

        /// The digest that routes a checked key to its shard.
        fn route(key: &Self::Key, checked: &Self::CheckedKey) -> KeyDigest;

        /// The digest that routes a row to its shard.
        fn row_route(row: &Self::Row<'_>) -> KeyDigest;

        /// The engine (pool, counters, near cache) of the shard holding `key`.
        fn engine_for(&self, key: &Self::Key, checked: &Self::CheckedKey) -> &Engine {
            self.handle()
                .cluster
                .engine_for(|| Self::route(key, checked))
        }

        /// Where an operation is observed before its key is routed.
        fn front(&self) -> &Engine {
            self.handle().front()
        }

        /// This cache's table, schema-qualified (every shard's schema is the same).
        fn table(&self) -> &str {
            self.front().tables().of(Self::KIND)
        }

        /// The TTL of `set` and `get_or_compute`.
        fn default_ttl(&self) -> Duration {
            self.handle().ttl(Self::KIND)
        }

        /// The stored value of a hit, without its metadata.
        fn into_value(entry: Self::Entry) -> Self::Value;

        /// A digest of `key`, the same in every process: it names the key's
        /// single-flight lease.
        fn key_digest(&self, key: &Self::Key) -> Result<KeyDigest>;

        /// Validates a key.
        fn check_key(&self, key: &Self::Key) -> Result<Self::CheckedKey>;

        /// Validates an entry into a row.
        fn check_entry<'a>(
            &self,
            key: &'a Self::Key,
            value: &'a Self::Value,
        ) -> Result<Self::Row<'a>>;

        /// The order rows are written in (every multi-row write locks rows in key
        /// order, so overlapping batches cannot deadlock); equal for the same key.
        fn row_order(a: &Self::Row<'_>, b: &Self::Row<'_>) -> Ordering;

        /// Whether this handle stores `key` at all (the audio cache skips long text).
        fn stores(&self, _key: &Self::Key) -> bool {
            true
        }

        /// The delete that undoes a write or delete of `keys` skipped in fail-open
        /// mode (their old values would read stale after recovery).
        fn skipped(&self, keys: &[&Self::Key], checked: &[Self::CheckedKey]) -> Skipped;

        /// Reads the live entry of one checked key.
        fn read_one(
            &self,
            conn: &mut PgConnection,
            key: &Self::Key,
            checked: &Self::CheckedKey,
        ) -> Result<Option<Self::Entry>>;

        /// Reads the live entries of checked keys in one statement, in `keys` order.
        fn read_many(
            &self,
            conn: &mut PgConnection,
            keys: &[&Self::Key],
            checked: &[Self::CheckedKey],
        ) -> Result<Vec<Option<Self::Entry>>>;

        /// Upserts rows with distinct keys, in [`row_order`](Self::row_order),
        /// expiring `ttl` after the statement's time; all or none.
        fn write(
            &self,
            conn: &mut PgConnection,
            rows: &[Self::Row<'_>],
            ttl: PgInterval,
        ) -> Result<()>;

        /// Deletes the entries of checked keys, locking rows in key order; returns
        /// how many were live.
        fn remove(
            &self,
            conn: &mut PgConnection,
            keys: &[&Self::Key],
            checked: &[Self::CheckedKey],
        ) -> Result<u64>;
    }
}

/// Validates every entry of a batch into rows with distinct keys (a key given twice
/// keeps its last value), in write order.
pub(crate) fn check_entries<'a, C: Storage + ?Sized>(
    cache: &C,
    entries: &[(&'a C::Key, &'a C::Value)],
) -> Result<Vec<C::Row<'a>>> {
    let rows = entries
        .iter()
        .map(|(k, v)| cache.check_entry(k, v))
        .collect::<Result<Vec<_>>>()?;
    Ok(distinct_in_write_order::<C>(rows))
}

/// Rows in write order, a key given twice keeping its last row (one statement cannot
/// upsert a row twice).
pub(crate) fn distinct_in_write_order<'a, C: Storage + ?Sized>(
    mut rows: Vec<C::Row<'a>>,
) -> Vec<C::Row<'a>> {
    // Stable sort of the reversed batch, then keep the first of each key: its last.
    rows.reverse();
    rows.sort_by(C::row_order);
    rows.dedup_by(|later, kept| C::row_order(later, kept) == Ordering::Equal);
    rows
}

fn check_keys<C: Storage + ?Sized>(cache: &C, keys: &[&C::Key]) -> Result<Vec<C::CheckedKey>> {
    keys.iter().map(|k| cache.check_key(k)).collect()
}

/// Runs `work` once per shard holding some of `keys`, with that shard's keys and
/// checked keys (at once, on a thread each, when there are several); each part's
/// positions in `keys` with its result. With one shard the one part, which holds every
/// key in order, comes with no positions (nothing allocated on that path).
fn per_shard<C: Storage + ?Sized, T: Send>(
    cache: &C,
    keys: &[&C::Key],
    checked: &[C::CheckedKey],
    work: impl Fn(&Engine, &[&C::Key], &[C::CheckedKey]) -> Result<T> + Sync,
) -> Result<Vec<(Vec<usize>, T)>> {
    let cluster = cache.handle().cluster;
    if let Some(engine) = cluster.single() {
        // The one part holds every key in order: its positions are not spelled out.
        return Ok(vec![(Vec::new(), work(engine, keys, checked)?)]);
    }
    let parts: Vec<Part> = cluster.parts(keys.len(), |i| C::route(keys[i], &checked[i]));
    let results = cluster.fan_out(&parts, |engine, items| {
        let keys: Vec<&C::Key> = items.iter().map(|&i| keys[i]).collect();
        let checked: Vec<C::CheckedKey> = items.iter().map(|&i| checked[i].clone()).collect();
        work(engine, &keys, &checked)
    })?;
    Ok(parts
        .into_iter()
        .map(|(_, items)| items)
        .zip(results)
        .collect())
}

/// Rows split by the shard holding them: one list per shard (in the map's order,
/// empty where the shard holds none), each in write order.
pub(crate) fn split_by_shard<'r, C: Storage + ?Sized>(
    cluster: &Cluster,
    rows: Vec<C::Row<'r>>,
) -> Vec<Vec<C::Row<'r>>> {
    if cluster.single().is_some() {
        return vec![rows];
    }
    let mut parts: Vec<Vec<C::Row<'r>>> = (0..cluster.map().len()).map(|_| Vec::new()).collect();
    for row in rows {
        parts[cluster.map().shard_of(&C::row_route(&row))].push(row);
    }
    parts
}

/// The shards holding some of `rows`, each with its rows in write order.
fn rows_per_shard<'r, C: Storage + ?Sized>(
    cluster: &Cluster,
    rows: Vec<C::Row<'r>>,
) -> Vec<(usize, Vec<C::Row<'r>>)> {
    split_by_shard::<C>(cluster, rows)
        .into_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .collect()
}

/// Records a batch's hits and misses; hands the batch back.
fn counted<E>(engine: &Engine, kind: CacheKind, found: Vec<Option<E>>) -> Vec<Option<E>> {
    let hits = found.iter().filter(|e| e.is_some()).count() as u64;
    engine.record_lookups(kind, hits, found.len() as u64 - hits);
    found
}

/// A statement run after a write on its connection, committed with it.
pub(crate) type Then<'a> = &'a (dyn Fn(&mut PgConnection) -> Result<()> + Sync);

/// `set_many` (as `op`): the rows `rows` checks, written in one statement per shard
/// and counted unless fail-open mode skipped them (remembering the delete of
/// `keys`), then evicted from this process's near cache. Shared with the
/// key/value cache's bytes, whose rows are checked differently. With `then`, the
/// write and `then` on each shard in one transaction (early refresh's facts about
/// the rows just written).
pub(crate) fn store_rows<'r, C: NearStorage + ?Sized + 'r>(
    cache: &C,
    op: Op,
    ttl: Duration,
    rows: impl FnOnce() -> Result<Vec<C::Row<'r>>>,
    keys: &[&C::Key],
    then: Option<Then<'_>>,
) -> Result<()> {
    let cluster = cache.handle().cluster;
    cache.front().observe(C::KIND, op, |span| {
        let interval = ttl_interval(ttl)?;
        let rows = rows()?;
        if rows.is_empty() {
            return Ok(());
        }
        span.record("rows", rows.len());
        let parts = rows_per_shard::<C>(cluster, rows);
        cluster.fan_out(&parts, |engine, rows| {
            let written = engine.write(
                C::KIND,
                op,
                false,
                || {
                    // All the batch's keys: deleting the other shards' too is harmless.
                    let checked = check_keys(cache, keys).ok()?;
                    Some(cache.skipped(keys, &checked))
                },
                |conn| match then {
                    None => cache.write(conn, rows, interval).map(|()| true),
                    Some(then) => conn.transaction(|conn| {
                        cache.write(conn, rows, interval)?;
                        then(conn).map(|()| true)
                    }),
                },
            )?;
            if written {
                engine.record_sets(C::KIND, rows.len() as u64);
            }
            near::evict_rows::<C>(engine, rows);
            Ok(())
        })?;
        Ok(())
    })
}

/// `delete_many` (as `op`): the keys deleted in one statement per shard, counted
/// unless fail-open mode skipped them.
fn delete_keys<C: NearStorage + ?Sized>(cache: &C, op: Op, keys: &[&C::Key]) -> Result<u64> {
    cache.front().observe(C::KIND, op, |span| {
        let checked = check_keys(cache, keys)?;
        if keys.is_empty() {
            return Ok(0);
        }
        span.record("rows", keys.len());
        let parts = per_shard(cache, keys, &checked, |engine, keys, checked| {
            let removed = engine.write(
                C::KIND,
                op,
                None,
                || Some(cache.skipped(keys, checked)),
                |conn| cache.remove(conn, keys, checked).map(Some),
            )?;
            if removed.is_some() {
                engine.record_deletes(C::KIND, keys.len() as u64);
            }
            near::evict_keys::<C>(engine, keys, checked);
            Ok(removed.unwrap_or(0))
        })?;
        Ok(parts.into_iter().map(|(_, removed)| removed).sum())
    })
}

/// Writes checked rows (distinct keys, in write order) on `conn`, then evicts them
/// from this process's near cache: `set_many_in`, and the key/value cache's bytes.
pub(crate) fn write_rows_in<C: NearStorage + ?Sized>(
    cache: &C,
    conn: &mut PgConnection,
    rows: &[C::Row<'_>],
    interval: PgInterval,
) -> Result<()> {
    if rows.is_empty() || caching_off(cache) {
        return Ok(());
    }
    cache.write(conn, rows, interval)?;
    // Harmless if the caller's transaction rolls back; its commit notifies.
    near::evict_rows_anywhere(cache, rows);
    Ok(())
}

/// With caching disabled, a `*_in` call checks its input and stops there: the
/// caller's connection is never touched (the cache's tables need not exist), and
/// the answer is a disabled cache's (a miss, a skipped write, nothing deleted).
pub(crate) fn caching_off<C: Storage + ?Sized>(cache: &C) -> bool {
    !cache.front().is_enabled()
}

/// The blocking interface of every cache handle (`cache.kv()`, `cache.embedding()`,
/// ...).
///
/// The `*_in` methods run on a connection you pass, which is also the transactional
/// API: pass a connection inside your own transaction and the cache write commits
/// or rolls back with your data. The others take a pooled connection, honour
/// `ENABLE_CACHING=false` and fail-open mode, and count hits and misses, identically
/// for every cache. Every key, value and TTL is checked before a connection is
/// taken. With caching disabled the `*_in` methods too answer as a disabled cache
/// (a miss, a skipped write, nothing deleted) without a statement on your
/// connection, so your transaction runs on as it would without the cache.
///
/// Async callers use the `tokio` feature's `AsyncCacheManager`, or run these inside
/// `tokio::task::spawn_blocking`.
pub trait Cache: NearStorage {
    /// Reads a live entry on `conn`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key, or a
    /// database error.
    fn get_in(&self, conn: &mut PgConnection, key: &Self::Key) -> Result<Option<Self::Entry>> {
        let checked = self.check_key(key)?;
        if caching_off(self) {
            return Ok(None);
        }
        self.read_one(conn, key, &checked)
    }

    /// Reads many entries on `conn` in one round trip; the result is in `keys` order.
    ///
    /// # Errors
    /// As [`get_in`](Self::get_in).
    fn get_many_in(
        &self,
        conn: &mut PgConnection,
        keys: &[&Self::Key],
    ) -> Result<Vec<Option<Self::Entry>>> {
        let checked = check_keys(self, keys)?;
        if caching_off(self) {
            return Ok(keys.iter().map(|_| None).collect());
        }
        self.read_many(conn, keys, &checked)
    }

    /// Stores (inserts or overwrites) an entry on `conn`, expiring `ttl` after the
    /// statement's time.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key, value or
    /// TTL (zero, under 1 µs, or over [`MAX_TTL`](crate::MAX_TTL)): nothing is
    /// stored. Or a database error.
    fn set_in(
        &self,
        conn: &mut PgConnection,
        key: &Self::Key,
        value: &Self::Value,
        ttl: Duration,
    ) -> Result<()> {
        self.set_many_in(conn, &[(key, value)], ttl)
    }

    /// Stores many entries on `conn` in one statement; all or none are stored.
    ///
    /// # Errors
    /// As [`set_in`](Self::set_in); one bad entry rejects the whole batch.
    fn set_many_in(
        &self,
        conn: &mut PgConnection,
        entries: &[(&Self::Key, &Self::Value)],
        ttl: Duration,
    ) -> Result<()> {
        let interval = ttl_interval(ttl)?;
        let rows = check_entries(self, entries)?;
        write_rows_in(self, conn, &rows, interval)
    }

    /// Deletes an entry on `conn`; true if a live entry was removed.
    ///
    /// # Errors
    /// As [`get_in`](Self::get_in).
    fn delete_in(&self, conn: &mut PgConnection, key: &Self::Key) -> Result<bool> {
        Ok(self.delete_many_in(conn, &[key])? > 0)
    }

    /// Deletes many entries on `conn` in one statement; returns how many live entries
    /// were removed.
    ///
    /// # Errors
    /// As [`get_in`](Self::get_in).
    fn delete_many_in(&self, conn: &mut PgConnection, keys: &[&Self::Key]) -> Result<u64> {
        let checked = check_keys(self, keys)?;
        if caching_off(self) {
            return Ok(0);
        }
        let removed = self.remove(conn, keys, &checked)?;
        for (key, checked) in keys.iter().zip(&checked) {
            let engine = self.engine_for(key, checked);
            near::evict_keys::<Self>(engine, &[key], std::slice::from_ref(checked));
        }
        Ok(removed)
    }

    /// Reads a live entry; `None` on a miss, on an expired entry, and when caching is
    /// disabled.
    ///
    /// # Errors
    /// See [`get_in`](Self::get_in); also [`Error::Connection`](crate::Error::Connection)
    /// when no connection can be had (a miss instead in fail-open mode).
    fn get(&self, key: &Self::Key) -> Result<Option<Self::Entry>> {
        get_entry(self, key, true)
    }

    /// Reads many entries in one round trip, in `keys` order.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    fn get_many(&self, keys: &[&Self::Key]) -> Result<Vec<Option<Self::Entry>>> {
        get_many_entries(self, keys, true)
    }

    /// Stores an entry with the cache's default TTL.
    ///
    /// # Errors
    /// As [`set_in`](Self::set_in); also connection errors (skipped in fail-open mode).
    fn set(&self, key: &Self::Key, value: &Self::Value) -> Result<()> {
        self.set_with_ttl(key, value, self.default_ttl())
    }

    /// Stores an entry expiring `ttl` from now (database time).
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn set_with_ttl(&self, key: &Self::Key, value: &Self::Value, ttl: Duration) -> Result<()> {
        store_rows(
            self,
            Op::Set,
            ttl,
            || check_entries(self, &[(key, value)]),
            &[key],
            None,
        )
    }

    /// Stores many entries in one statement with the given TTL; all or none.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn set_many(&self, entries: &[(&Self::Key, &Self::Value)], ttl: Duration) -> Result<()> {
        store_rows(
            self,
            Op::SetMany,
            ttl,
            || check_entries(self, entries),
            &entries.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            None,
        )
    }

    /// Deletes an entry; true if a live entry was removed.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn delete(&self, key: &Self::Key) -> Result<bool> {
        Ok(delete_keys(self, Op::Delete, &[key])? > 0)
    }

    /// Deletes many entries in one statement; returns how many live entries were
    /// removed.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    fn delete_many(&self, keys: &[&Self::Key]) -> Result<u64> {
        delete_keys(self, Op::DeleteMany, keys)
    }

    /// Cache-aside: returns the live value, or runs `compute`, stores its result with
    /// the default TTL and returns it. An `Err` from `compute` is returned as it is
    /// and nothing is cached.
    ///
    /// Single flight: concurrent misses on one key, in any thread of any process
    /// sharing the database, run `compute` once; the others wait for its result,
    /// polling without holding a pool connection. If the computing caller fails,
    /// panics or dies, a waiter takes over (at once, or after the lease TTL for a dead
    /// process). With caching disabled every call computes.
    ///
    /// # Errors
    /// `compute`'s error, or a cache error converted into `E`:
    /// [`Error::ComputeTimeout`](crate::Error::ComputeTimeout) when another caller's
    /// computation of the key outlasts the compute wait timeout.
    fn get_or_compute<E, F>(&self, key: &Self::Key, compute: F) -> Result<Self::Value, E>
    where
        F: FnOnce() -> Result<Self::Value, E>,
        E: From<crate::Error>,
    {
        self.get_or_compute_with_ttl(key, self.default_ttl(), compute)
    }

    /// [`get_or_compute`](Self::get_or_compute) with an explicit TTL.
    ///
    /// # Errors
    /// As [`get_or_compute`](Self::get_or_compute).
    fn get_or_compute_with_ttl<E, F>(
        &self,
        key: &Self::Key,
        ttl: Duration,
        compute: F,
    ) -> Result<Self::Value, E>
    where
        F: FnOnce() -> Result<Self::Value, E>,
        E: From<crate::Error>,
    {
        crate::single_flight::get_or_compute(self, key, ttl, compute)
    }
}

/// Every table's storage gets the whole [`Cache`] interface.
impl<T: NearStorage + ?Sized> Cache for T {}
