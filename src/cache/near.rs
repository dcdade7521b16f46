//! What a table adds for its near cache ([`NearStorage`]), and the reads and
//! evictions of [`Cache`](super::Cache) that go through it: a get served from
//! memory or read and kept, a batch read likewise, and this process's writes
//! evicted at once (read-your-writes; other processes learn of them from the
//! change log, see `near/protocol.rs`).

use diesel::pg::PgConnection;

use super::Storage;
use crate::engine::Engine;
use crate::error::Result;
use crate::freshness::{random_unit, Found, Freshness};
use crate::metrics::Op;
use crate::near::{NearCaches, NearKey, NearValue, TagSlots, Ticket};

/// What a table supplies to its near cache: the keys the change log names, reads
/// that also say what to keep and for how long, and the way back from what was
/// kept. Implemented by every table, whether a near cache is configured or not.
pub trait NearStorage: Storage {
    /// The near-cache key of a checked key: what the change log names (the
    /// digest, or a key/value key's bytes, see `protocol::near_key_from_log`).
    fn near_key(key: &Self::Key, checked: &Self::CheckedKey) -> NearKey;

    /// The near-cache key of a row about to be written.
    fn row_near_key(row: &Self::Row<'_>) -> NearKey;

    /// Reads one live entry for the near cache: the entry, what the near cache
    /// keeps of it, its weight in bytes and its freshness with its expiry
    /// (database clock); also what `get_or_compute` reads, near cache or not.
    fn read_for_near(
        &self,
        conn: &mut PgConnection,
        key: &Self::Key,
        checked: &Self::CheckedKey,
    ) -> Result<Option<NearRead<Self::Entry>>>;

    /// Reads the live entries of checked keys for the near cache in one
    /// statement, in `keys` order: [`read_for_near`](Self::read_for_near) for a
    /// batch.
    fn read_many_for_near(
        &self,
        conn: &mut PgConnection,
        keys: &[&Self::Key],
        checked: &[Self::CheckedKey],
    ) -> Result<Vec<Option<NearRead<Self::Entry>>>>;

    /// An entry back from what the near cache kept of it.
    ///
    /// # Errors
    /// A value that does not decode into this handle's type (key/value).
    fn from_near(value: &NearValue) -> Result<Option<Self::Entry>>;

    /// Counts a hit served from the near cache where the table counts hits.
    fn near_hit(&self, _checked: &Self::CheckedKey) {}
}

/// A live entry read for the near cache.
pub struct NearRead<E> {
    pub(crate) entry: E,
    pub(crate) kept: NearValue,
    pub(crate) weight: usize,
    /// Its tags (key/value entries written with tags).
    pub(crate) tags: Option<TagSlots>,
    /// Its freshness, with its expiry (database clock).
    pub(crate) fresh: Freshness,
}

impl<E> std::fmt::Debug for NearRead<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearRead")
            .field("fresh", &self.fresh)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// The near cache of `C`'s table on `engine`'s shard, if it has one.
pub(super) fn near_of<C: NearStorage + ?Sized>(engine: &Engine) -> Option<&NearCaches> {
    engine.near().filter(|near| near.serves(C::KIND))
}

/// A get through the near cache: served from memory when it holds a live entry and
/// the channel is current (unless `memory` is false: the caller looked already,
/// [`get_from_memory`]); else read with its freshness, and kept unless an
/// invalidation came meanwhile.
pub(super) fn get<C: NearStorage + ?Sized>(
    cache: &C,
    engine: &Engine,
    near: &NearCaches,
    key: &C::Key,
    checked: &C::CheckedKey,
    memory: bool,
) -> Result<Option<Found<C::Entry>>> {
    let near_key = C::near_key(key, checked);
    let kept = if memory {
        near.get(C::KIND, &near_key, C::from_near)
    } else {
        None
    };
    if let Some(entry) = kept.transpose()?.flatten() {
        cache.near_hit(checked);
        return Ok(Some(Found { entry, fresh: None }));
    }
    let ticket = near.ticket(C::KIND, &near_key);
    let read = engine.read(C::KIND, Op::Get, None, |conn| {
        cache.read_for_near(conn, key, checked)
    })?;
    Ok(read.map(|read| {
        let fresh = Some(read.fresh);
        let entry = keep::<C>(engine, near, ticket, near_key, read);
        Found { entry, fresh }
    }))
}

/// A get answered from this process's near cache alone, with no connection and no
/// wait: `None` when it holds no live entry of `key` (or the key is bad), and the
/// caller goes on with [`get_entry`](super::get_entry) without `memory`. A hit is
/// counted and observed as a get's.
#[cfg(feature = "tokio")]
pub(crate) fn get_from_memory<C: NearStorage + ?Sized>(
    cache: &C,
    key: &C::Key,
) -> Option<Result<C::Entry>> {
    // A bad key: the full get reports it.
    let checked = cache.check_key(key).ok()?;
    let engine = cache.engine_for(key, &checked);
    let kept = near_of::<C>(engine)?.get(C::KIND, &C::near_key(key, &checked), C::from_near)?;
    let entry = match kept {
        Ok(Some(entry)) => entry,
        // Not servable from memory: the database read decides.
        Ok(None) => return None,
        Err(error) => return Some(cache.front().observe(C::KIND, Op::Get, |_| Err(error))),
    };
    cache
        .front()
        .observe(C::KIND, Op::Get, |span| {
            cache.near_hit(&checked);
            engine.record_lookups(C::KIND, 1, 0);
            span.record("hit", true);
            Ok(())
        })
        .ok()?;
    Some(Ok(entry))
}

/// Puts what a reader read after taking `ticket` into L1 (unless an invalidation
/// came meanwhile; no ticket, no fill) and hands back its entry. L1 keeps it no
/// longer than it is fresh, and ends that early by XFetch's draw (see
/// [`Freshness::near_until`]), so `get_or_compute` sees an entry due for early
/// refresh in the database, never served stale from memory.
fn keep<C: NearStorage + ?Sized>(
    engine: &Engine,
    near: &NearCaches,
    ticket: Option<Ticket>,
    near_key: NearKey,
    read: NearRead<C::Entry>,
) -> C::Entry {
    if let Some(ticket) = ticket {
        near.fill(
            C::KIND,
            ticket.carrying(read.tags),
            near_key,
            read.kept,
            read.fresh
                .near_until(engine.config().early_refresh_beta(), random_unit()),
            read.weight,
        );
    }
    read.entry
}

/// What a batch found in memory on the calling task ([`get_many_from_memory`]):
/// the entries the near cache holds, by position, and the positions still to read.
#[cfg(feature = "tokio")]
pub(crate) struct FromMemory<E> {
    pub(crate) found: Vec<Option<E>>,
    pub(crate) missing: Vec<usize>,
}

/// A batch looked up in this process's near cache alone, with no connection and no
/// wait: the entries it holds (each hit counted; observed as a batch's when there
/// is nothing left to read), and the positions the caller reads with
/// [`get_many_entries`](super::get_many_entries) without `memory`, so no miss is
/// counted twice. `None` when the table has no near cache or a key is bad (the
/// full batch reports it).
#[cfg(feature = "tokio")]
pub(crate) fn get_many_from_memory<C: NearStorage + ?Sized>(
    cache: &C,
    keys: &[&C::Key],
) -> Option<Result<FromMemory<C::Entry>>> {
    let checked: Vec<C::CheckedKey> = keys
        .iter()
        .map(|k| cache.check_key(k).ok())
        .collect::<Option<_>>()?;
    // Every key's shard must have a near cache before anything is counted.
    let shards: Vec<(&Engine, &NearCaches)> = keys
        .iter()
        .zip(&checked)
        .map(|(key, checked)| {
            let engine = cache.engine_for(key, checked);
            near_of::<C>(engine).map(|near| (engine, near))
        })
        .collect::<Option<_>>()?;
    let mut part = FromMemory {
        found: Vec::with_capacity(keys.len()),
        missing: Vec::new(),
    };
    for (i, ((key, checked), (_, near))) in keys.iter().zip(&checked).zip(&shards).enumerate() {
        match near
            .get(C::KIND, &C::near_key(key, checked), C::from_near)
            .transpose()
        {
            Ok(Some(Some(entry))) => {
                cache.near_hit(checked);
                part.found.push(Some(entry));
            }
            Ok(_) => {
                part.missing.push(i);
                part.found.push(None);
            }
            Err(error) => {
                return Some(cache.front().observe(C::KIND, Op::GetMany, |_| Err(error)));
            }
        }
    }
    // The hits, counted by the shard holding each, as the full read counts them.
    for ((engine, _), found) in shards.iter().zip(&part.found) {
        if found.is_some() {
            engine.record_lookups(C::KIND, 1, 0);
        }
    }
    if part.missing.is_empty() {
        // All served here: observed as the batch's, as the full read would be.
        let observed = cache.front().observe(C::KIND, Op::GetMany, |span| {
            span.record("rows", keys.len());
            Ok(())
        });
        if let Err(error) = observed {
            return Some(Err(error));
        }
    }
    Some(Ok(part))
}

/// A batch read on one shard, its lookups counted: through its near cache if it
/// has one (the keys it holds served from memory, unless `memory` is false: the
/// caller looked already, [`get_many_from_memory`]; the rest read in one
/// statement and kept as a get keeps them), else in one statement.
pub(super) fn read_many<C: NearStorage + ?Sized>(
    cache: &C,
    engine: &Engine,
    keys: &[&C::Key],
    checked: &[C::CheckedKey],
    memory: bool,
) -> Result<Vec<Option<C::Entry>>> {
    let Some(near) = near_of::<C>(engine) else {
        let found = engine.read_with(
            C::KIND,
            Op::GetMany,
            || keys.iter().map(|_| None).collect(),
            |conn| cache.read_many(conn, keys, checked),
        )?;
        return Ok(super::counted(engine, C::KIND, found));
    };
    let mut found = Vec::with_capacity(keys.len());
    let mut wanted = Vec::new();
    for (i, (key, checked)) in keys.iter().zip(checked).enumerate() {
        let near_key = C::near_key(key, checked);
        let entry = if memory {
            near.get(C::KIND, &near_key, C::from_near)
                .transpose()?
                .flatten()
        } else {
            None
        };
        if entry.is_some() {
            cache.near_hit(checked);
        } else {
            // Taken before the read, as a get takes its own.
            let ticket = near.ticket(C::KIND, &near_key);
            wanted.push((i, near_key, ticket));
        }
        found.push(entry);
    }
    if !wanted.is_empty() {
        let wanted_keys: Vec<&C::Key> = wanted.iter().map(|(i, ..)| keys[*i]).collect();
        let wanted_checked: Vec<C::CheckedKey> =
            wanted.iter().map(|(i, ..)| checked[*i].clone()).collect();
        let read = engine.read_with(
            C::KIND,
            Op::GetMany,
            || wanted.iter().map(|_| None).collect(),
            |conn| cache.read_many_for_near(conn, &wanted_keys, &wanted_checked),
        )?;
        for ((i, near_key, ticket), read) in wanted.into_iter().zip(read) {
            found[i] = read.map(|read| keep::<C>(engine, near, ticket, near_key, read));
        }
    }
    Ok(super::counted(engine, C::KIND, found))
}

/// Evicts the keys of `rows` from the near cache of `engine`'s shard in this
/// process (read-your-writes).
pub(super) fn evict_rows<C: NearStorage + ?Sized>(engine: &Engine, rows: &[C::Row<'_>]) {
    if let Some(near) = near_of::<C>(engine) {
        let keys: Vec<NearKey> = rows.iter().map(|r| C::row_near_key(r)).collect();
        near.invalidate(C::KIND, keys.iter().map(|k| &k[..]));
    }
}

/// Evicts checked keys from the near cache of `engine`'s shard in this process
/// (read-your-writes).
pub(super) fn evict_keys<C: NearStorage + ?Sized>(
    engine: &Engine,
    keys: &[&C::Key],
    checked: &[C::CheckedKey],
) {
    if let Some(near) = near_of::<C>(engine) {
        let keys: Vec<NearKey> = keys
            .iter()
            .zip(checked)
            .map(|(k, c)| C::near_key(k, c))
            .collect();
        near.invalidate(C::KIND, keys.iter().map(|k| &k[..]));
    }
}

/// Evicts the keys of rows written on a caller's connection from this process's
/// near caches, each from its shard's.
pub(super) fn evict_rows_anywhere<C: NearStorage + ?Sized>(cache: &C, rows: &[C::Row<'_>]) {
    let cluster = cache.handle().cluster;
    match cluster.single() {
        Some(engine) => evict_rows::<C>(engine, rows),
        None => {
            for row in rows {
                let engine = cluster.engine_for(|| C::row_route(row));
                evict_rows::<C>(engine, std::slice::from_ref(row));
            }
        }
    }
}
