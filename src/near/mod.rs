//! The near cache: an opt-in in-process copy (L1) of hot entries in front of the
//! tables, kept coherent across processes by the database itself.
//!
//! Here: the in-process caches ([`NearCaches`]) and their coherence. The poller
//! thread is `poller.rs`; every rule of logging changes (the stamping setting, the
//! stamp, the triggers, what counts as a changed payload, how the log is read) is
//! `protocol.rs`. What a table supplies, and the reads that go through L1, are the
//! tables' side (`cache/near.rs`).
//!
//! # How it stays coherent
//! - Every change to a row of a cache table with a near cache (an update, an upsert
//!   overwrite, a delete of a live row, a `TRUNCATE`, by pgcache or by any other
//!   program) is logged in the writer's transaction (see `protocol.rs`): by a
//!   statement-level trigger appending one row naming the changed keys to
//!   `cache_changes`, or, for pgcache's own updates on the pool of a manager with a
//!   near cache, by a stamp on the changed rows (`changed_xid`). A rollback logs
//!   nothing, and no lock is shared between writers.
//! - One poller thread per manager and shard ([`Poller`]) reads the log and the stamps and
//!   evicts the keys: every 2 ms while changes come in, backing off to a third of
//!   the staleness bound `S` while none do. Each poll asks for the changes of every
//!   transaction that was running at the previous poll's snapshot or began after
//!   it, so it sees every change committed since, whatever order the transactions
//!   took their ids in. A poll proves the log read up to its snapshot: L1 serves
//!   only while the last successful poll was sent less than `S` ago, so a slow,
//!   stalled or lost poller turns L1 off within `S` instead of serving stale
//!   entries.
//! - Losing the poller's connection empties every L1 at once (an epoch bump) and L1
//!   is neither read nor filled until the poller is back and current again. The
//!   poller's statements are watched like pooled ones: a poll a frozen server
//!   process never answers is cut after `statement_timeout` + 1 s, and the poller
//!   reconnects rather than waiting (and holding up the manager's drop).
//! - A read that raced an invalidation cannot put its old value back: every key
//!   hashes to a generation slot, bumped by each invalidation; a filler notes the
//!   slot's generation before its `SELECT`, inserts, then removes its entry again if
//!   the generation or the epoch moved meanwhile.
//! - A key/value entry read with tags is not served once one of them is
//!   invalidated (logged as `kv_tags`, see `protocol.rs`) after its reader's
//!   `SELECT` began: see `tags.rs`.
//! - An entry lives at most `min(remaining TTL as the database computed it, max
//!   age)`, judged by the latest time the database's clock can read: every poll
//!   bounds it from above (see `NearCaches::polled`), so entries leave early, never
//!   late.

use std::any::Any;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::{CacheConfig, NearCache};
use crate::kind::CacheKind;
use crate::metrics::{self, NearOutcome};
use crate::striped::StripedCounter;

mod front;
mod poller;
pub(crate) mod protocol;
mod stats;
mod tags;

pub(crate) use poller::{prune_changes, Poller};
pub use stats::NearCacheStats;
pub(crate) use tags::TagSlots;
use tags::{TagClock, TagMark};

/// A near-cache key: the entry's key digest, or a key/value key's bytes.
pub(crate) type NearKey = Box<[u8]>;

/// A near-cache value: what the table's `Storage` keeps of an entry.
pub(crate) type NearValue = Arc<dyn Any + Send + Sync>;

/// Generation slots keys hash to (a power of two).
const GENERATION_SLOTS: usize = 4096;

#[derive(Clone)]
struct Entry {
    value: NearValue,
    expires: Instant,
    weight: u64,
    /// The generation of its slot and the epoch it was filled under (its
    /// ticket's): a thread's front copies it only while both are current.
    generation: u64,
    epoch: u64,
    tags: Option<TagMark>,
}

#[derive(Clone)]
struct ByWeight;

impl quick_cache::Weighter<NearKey, Entry> for ByWeight {
    fn weight(&self, key: &NearKey, entry: &Entry) -> u64 {
        key.len() as u64 + entry.weight
    }
}

/// Counts the entries L1 drops to stay within its byte bound. quick_cache calls
/// `before_evict` only for those (an entry pushed out, or one too large to admit);
/// `on_evict` would also count every entry replaced by a newer fill of its key.
#[derive(Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl quick_cache::Lifecycle<NearKey, Entry> for CountEvictions {
    type RequestState = ();

    fn before_evict(&self, _state: &mut (), _key: &NearKey, _entry: &mut Entry) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Entries = quick_cache::sync::Cache<
    NearKey,
    Entry,
    ByWeight,
    quick_cache::DefaultHashBuilder,
    CountEvictions,
>;

/// One cache's L1 and its figures.
struct Table {
    entries: Entries,
    evictions: CountEvictions,
    max_age: Duration,
    /// Striped: counted by every hit, on every core.
    hits: StripedCounter,
    misses: StripedCounter,
    bypasses: AtomicU64,
    invalidations: AtomicU64,
}

/// What a reader notes before its `SELECT`, to fill L1 only if nothing changed,
/// and, once it has read the entry, the slots of its tags, checked at every serve.
#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    slot: usize,
    generation: u64,
    epoch: u64,
    tag_clock: u64,
    tags: Option<TagSlots>,
}

impl Ticket {
    /// The ticket of an entry read with tags (`Some`).
    pub(crate) fn carrying(self, tags: Option<TagSlots>) -> Self {
        Ticket { tags, ..self }
    }
}

/// The near caches of one manager and the state of their poller.
pub(crate) struct NearCaches {
    /// Unique in the process: names this manager's copies in threads' fronts.
    id: u64,
    tables: [Option<Table>; CacheKind::COUNT],
    /// Hashes keys to generation slots and front slots (fast, seeded per manager).
    hasher: quick_cache::DefaultHashBuilder,
    generations: Box<[AtomicU64]>,
    epoch: AtomicU64,
    tags: TagClock,
    /// Whether the poller has its baseline on its current connection: fills are safe.
    has_baseline: AtomicBool,
    /// Nanoseconds since `base` until which L1 may serve (last poll sent + S).
    fresh_until: AtomicU64,
    /// When the last successful poll was sent, nanoseconds since `base`.
    polled_at: AtomicU64,
    /// At least how far the database clock is ahead of `base` in microseconds (so
    /// the database's time is at most `base`'s elapsed time plus this): see
    /// [`NearCaches::polled`]. Until the first poll, so large that nothing is kept.
    db_clock_ahead_us: AtomicI64,
    base: Instant,
    staleness: Duration,
    /// Polls of the change log made (baselines included).
    polls: AtomicU64,
    /// Test hook: runs between a fill's last check and its insert.
    #[cfg(test)]
    before_insert: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl std::fmt::Debug for NearCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCaches")
            .field("staleness", &self.staleness)
            .field("has_baseline", &self.has_baseline.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl NearCaches {
    /// The near caches `config` asks for; `None` when it asks for none.
    pub(crate) fn new(config: &CacheConfig) -> Option<Self> {
        let tables = CacheKind::ALL.map(|kind| config.near_cache(kind).map(Table::new));
        if tables.iter().all(Option::is_none) {
            return None;
        }
        static IDS: AtomicU64 = AtomicU64::new(0);
        Some(NearCaches {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            tables,
            hasher: quick_cache::DefaultHashBuilder::default(),
            generations: (0..GENERATION_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            tags: TagClock::new(),
            has_baseline: AtomicBool::new(false),
            fresh_until: AtomicU64::new(0),
            polled_at: AtomicU64::new(0),
            db_clock_ahead_us: AtomicI64::new(NO_CLOCK_YET),
            base: Instant::now(),
            staleness: config.near_cache_staleness(),
            polls: AtomicU64::new(0),
            #[cfg(test)]
            before_insert: Mutex::new(None),
        })
    }

    /// Test hook: `hook` runs in every fill between its last check and its insert.
    #[cfg(test)]
    pub(crate) fn set_before_insert(&self, hook: Option<Box<dyn Fn() + Send>>) {
        *self.before_insert.lock().expect("hook") = hook;
    }

    /// The staleness bound: L1 serves only while the last poll was sent less than
    /// this long ago.
    pub(super) fn staleness(&self) -> Duration {
        self.staleness
    }

    /// Whether `kind` has a near cache.
    pub(crate) fn serves(&self, kind: CacheKind) -> bool {
        self.tables[kind.index()].is_some()
    }

    /// The kinds with a near cache.
    pub(crate) fn kinds(&self) -> impl Iterator<Item = CacheKind> + '_ {
        CacheKind::ALL
            .into_iter()
            .filter(|kind| self.tables[kind.index()].is_some())
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whole microseconds since `base`, rounded down.
    fn micros(&self, at: Instant) -> i64 {
        at.saturating_duration_since(self.base).as_micros() as i64
    }

    /// Whether L1 may serve now: the change log was read up to a snapshot taken less
    /// than `S` ago.
    fn current(&self) -> bool {
        self.current_at(Instant::now())
    }

    fn current_at(&self, now: Instant) -> bool {
        self.nanos(now) < self.fresh_until.load(Ordering::Acquire)
    }

    fn hash(&self, kind: CacheKind, key: &[u8]) -> u64 {
        self.hasher.hash_one((kind, key))
    }

    fn slot(&self, kind: CacheKind, key: &[u8]) -> usize {
        Self::slot_of(self.hash(kind, key))
    }

    fn slot_of(hash: u64) -> usize {
        hash as usize & (GENERATION_SLOTS - 1)
    }

    /// `read` of the entry of `key` if L1 holds a live one and may serve it, first
    /// from this thread's front (see `front.rs`). Counts the lookup; `None` also
    /// when `kind` has no near cache. `read` sees the value in place: a hit on the
    /// front clones no shared reference.
    pub(crate) fn get<R>(
        &self,
        kind: CacheKind,
        key: &[u8],
        read: impl FnOnce(&NearValue) -> R,
    ) -> Option<R> {
        let table = self.tables[kind.index()].as_ref()?;
        let now = Instant::now();
        if !self.current_at(now) {
            table.bypasses.fetch_add(1, Ordering::Relaxed);
            metrics::near_cache_lookup(kind, NearOutcome::Bypass);
            return None;
        }
        let hit = || {
            table.hits.add(1);
            metrics::near_cache_lookup(kind, NearOutcome::Hit);
        };
        let hash = self.hash(kind, key);
        // Both before the L1 lookup: see `front.rs`.
        let stamp = front::Stamp {
            owner: self.id,
            generation: self.generations[Self::slot_of(hash)].load(Ordering::SeqCst),
            epoch: self.epoch.load(Ordering::SeqCst),
        };
        let read = match front::read(kind, key, hash, stamp, now, read) {
            Ok(found) => {
                hit();
                return Some(found);
            }
            Err(read) => read,
        };
        match table.entries.get(key) {
            Some(entry) if entry.expires > now && self.tags.hold(&entry.tags) => {
                // Tagged entries are checked against their tags at every serve,
                // which the front does not do: they stay in L1 alone.
                let current = entry.generation == stamp.generation && entry.epoch == stamp.epoch;
                if current && entry.tags.is_none() {
                    front::keep(kind, key, hash, stamp, entry.value.clone(), entry.expires);
                }
                hit();
                Some(read(&entry.value))
            }
            _ => {
                table.misses.add(1);
                metrics::near_cache_lookup(kind, NearOutcome::Miss);
                None
            }
        }
    }

    /// Notes what a fill of `key` must find unchanged; `None` when L1 must not be
    /// filled (no near cache for `kind`, or no poller with a baseline).
    pub(crate) fn ticket(&self, kind: CacheKind, key: &[u8]) -> Option<Ticket> {
        self.tables[kind.index()].as_ref()?;
        // The epoch first: a poller lost after this moment bumps it.
        let epoch = self.epoch.load(Ordering::SeqCst);
        if !self.has_baseline.load(Ordering::SeqCst) {
            return None;
        }
        let slot = self.slot(kind, key);
        Some(Ticket {
            slot,
            generation: self.generations[slot].load(Ordering::SeqCst),
            epoch,
            tag_clock: self.tags.note(),
            tags: None,
        })
    }

    /// Puts a value read after `ticket` was taken into L1, unless an invalidation
    /// of its slot or a lost poller came in between. `expires_at` is the entry's
    /// expiry by the database clock.
    pub(crate) fn fill(
        &self,
        kind: CacheKind,
        ticket: Ticket,
        key: NearKey,
        value: NearValue,
        expires_at: DateTime<Utc>,
        weight: usize,
    ) {
        let Some(table) = &self.tables[kind.index()] else {
            return;
        };
        let Some(expires) = self.local_expiry(expires_at, table.max_age) else {
            return;
        };
        let tags = ticket
            .tags
            .map(|slots| TagMark::new(slots, ticket.tag_clock));
        let unchanged = |caches: &Self| {
            caches.generations[ticket.slot].load(Ordering::SeqCst) == ticket.generation
                && caches.epoch.load(Ordering::SeqCst) == ticket.epoch
        };
        if !unchanged(self) {
            return;
        }
        #[cfg(test)]
        if let Some(hook) = &*self.before_insert.lock().expect("hook") {
            hook();
        }
        table.entries.insert(
            key.clone(),
            Entry {
                value,
                expires,
                weight: weight as u64,
                generation: ticket.generation,
                epoch: ticket.epoch,
                tags,
            },
        );
        // An invalidation may have bumped the slot between the check and the
        // insert: it removed nothing then, so the insert is undone here.
        if !unchanged(self) {
            table.entries.remove(&key);
        }
    }

    /// When an entry expiring at `expires_at` (database clock) leaves L1: after its
    /// remaining TTL or `max_age`, whichever is first; `None` if already expired.
    fn local_expiry(&self, expires_at: DateTime<Utc>, max_age: Duration) -> Option<Instant> {
        // The latest the database's clock can read now: entries leave early, never
        // late. One clock read for both ends, and `micros` rounds down: + 1 µs.
        let now = Instant::now();
        let db_now_us =
            (self.micros(now) + 1).saturating_add(self.db_clock_ahead_us.load(Ordering::Acquire));
        let remaining_us = expires_at.timestamp_micros().saturating_sub(db_now_us);
        let remaining = Duration::from_micros(u64::try_from(remaining_us).ok().filter(|&r| r > 0)?);
        Some(now + remaining.min(max_age))
    }

    /// Evicts `keys` of `kind` from L1 (a write of this process, or a notification).
    pub(crate) fn invalidate<'k>(&self, kind: CacheKind, keys: impl IntoIterator<Item = &'k [u8]>) {
        let Some(table) = &self.tables[kind.index()] else {
            return;
        };
        for key in keys {
            self.generations[self.slot(kind, key)].fetch_add(1, Ordering::SeqCst);
            table.entries.remove(key);
            table.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops serving the key/value entries read with any of `tags` before now (an
    /// invalidation of this process, or a logged one).
    pub(crate) fn invalidate_tags<'t>(&self, tags: impl IntoIterator<Item = &'t str>) {
        if self.serves(CacheKind::Kv) {
            tags.into_iter().for_each(|tag| self.tags.invalidate(tag));
        }
    }

    /// Evicts every entry of `kind` (a `TRUNCATE`, a batch too large to name).
    pub(crate) fn invalidate_all(&self, kind: CacheKind) {
        if let Some(table) = &self.tables[kind.index()] {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            table.entries.clear();
        }
    }

    /// The poller lost its connection: nothing is served or filled until a new one is
    /// current, and everything held is dropped (changes may have been missed).
    pub(super) fn lost(&self) {
        self.has_baseline.store(false, Ordering::SeqCst);
        self.fresh_until.store(0, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for table in self.tables.iter().flatten() {
            table.entries.clear();
        }
    }

    /// The figures of every near cache.
    pub(crate) fn stats(&self) -> Vec<NearCacheStats> {
        let lag = self.current().then(|| {
            let sent = self.polled_at.load(Ordering::Acquire);
            let now = self.nanos(Instant::now());
            now.saturating_sub(sent) as f64 / 1e6
        });
        self.kinds()
            .filter_map(|kind| {
                let table = self.tables[kind.index()].as_ref()?;
                Some(NearCacheStats {
                    cache: kind,
                    hits: table.hits.get(),
                    misses: table.misses.get(),
                    bypasses: table.bypasses.load(Ordering::Relaxed),
                    invalidations: table.invalidations.load(Ordering::Relaxed),
                    evictions: table.evictions.0.load(Ordering::Relaxed),
                    entries: table.entries.len() as u64,
                    bytes: table.entries.weight(),
                    poll_lag_ms: lag,
                    polls: self.polls.load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    /// Applies one logged change: the keys of `cache`, or all of it (`None`); or
    /// invalidated key/value tags (every tag: `None`).
    pub(super) fn apply(&self, cache: &str, keys: Option<&[String]>) {
        if cache == protocol::TAG_LOG_NAME {
            match keys {
                Some(tags) => self.invalidate_tags(tags.iter().map(String::as_str)),
                None => self.invalidate_all(CacheKind::Kv),
            }
            return;
        }
        let Some(kind) = CacheKind::from_name(cache) else {
            return;
        };
        match keys {
            None => self.invalidate_all(kind),
            Some(keys) => {
                let keys: Vec<Vec<u8>> = keys
                    .iter()
                    .filter_map(|k| protocol::near_key_from_log(kind, k))
                    .collect();
                self.invalidate(kind, keys.iter().map(Vec::as_slice));
            }
        }
    }

    /// Waits until the poller has its baseline, so fills and serving may start, at
    /// most `limit`; whether it has.
    pub(crate) fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.has_baseline.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// The poller's baseline, sent at `sent`, returned: fills may start, and L1 may
    /// serve them as after any poll. Anything filled from now on was read after
    /// `sent`, so it holds every change committed before it, which is all a poll
    /// sent then would have evicted. Current first: a fill must never be made
    /// while serving is still off (the fill's lookups would bypass).
    pub(super) fn baseline_taken(&self, sent: Instant, db_clock_us: Option<i64>) {
        self.polled(sent, db_clock_us);
        self.has_baseline.store(true, Ordering::SeqCst);
    }

    /// A poll sent at `sent` read the change log up to its snapshot, and the
    /// database's clock read `db_clock_us` (microseconds since the Unix epoch) while
    /// running it. The server read its clock after `sent`, however late its reply
    /// came back (a descheduled poller, a stopped backend, a slow path one way), so
    /// `db_clock_us - sent` bounds how far the database's clock is ahead from above:
    /// entries expire by that bound, early by at most the poll's round trip, never
    /// late. (Assuming the reply came halfway made a late reply extend every entry.)
    pub(super) fn polled(&self, sent: Instant, db_clock_us: Option<i64>) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        if let Some(db_clock_us) = db_clock_us {
            self.db_clock_ahead_us
                .store(db_clock_us - self.micros(sent), Ordering::Release);
        }
        let at = self.nanos(sent);
        self.polled_at.fetch_max(at, Ordering::AcqRel);
        let until = at + self.staleness.as_nanos() as u64;
        self.fresh_until.fetch_max(until, Ordering::AcqRel);
    }
}

impl Table {
    fn new(settings: NearCache) -> Self {
        let bytes = settings.bytes();
        let evictions = CountEvictions::default();
        Table {
            // About 1 kB per entry for the index's first sizing; it grows.
            entries: Entries::with(
                (bytes / 1024).clamp(16, 1 << 20) as usize,
                bytes,
                ByWeight,
                quick_cache::DefaultHashBuilder::default(),
                evictions.clone(),
            ),
            evictions,
            max_age: settings.age(),
            hits: StripedCounter::default(),
            misses: StripedCounter::default(),
            bypasses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }
}

/// [`NearCaches::db_clock_ahead_us`] before any poll: every entry reads as expired.
const NO_CLOCK_YET: i64 = i64::MAX / 2;

#[cfg(test)]
mod tests;
