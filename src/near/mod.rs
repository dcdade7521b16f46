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
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::{CacheConfig, NearCache};
use crate::kind::CacheKind;
use crate::metrics::{self, NearOutcome};

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
    hits: AtomicU64,
    misses: AtomicU64,
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
    tables: [Option<Table>; CacheKind::COUNT],
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
        Some(NearCaches {
            tables,
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
        self.nanos(Instant::now()) < self.fresh_until.load(Ordering::Acquire)
    }

    fn slot(kind: CacheKind, key: &[u8]) -> usize {
        let mut hasher = DefaultHasher::new();
        kind.hash(&mut hasher);
        key.hash(&mut hasher);
        hasher.finish() as usize & (GENERATION_SLOTS - 1)
    }

    /// The entry of `key` if L1 holds a live one and may serve it. Counts the
    /// lookup; `None` also when `kind` has no near cache.
    pub(crate) fn get(&self, kind: CacheKind, key: &[u8]) -> Option<NearValue> {
        let table = self.tables[kind.index()].as_ref()?;
        if !self.current() {
            table.bypasses.fetch_add(1, Ordering::Relaxed);
            metrics::near_cache_lookup(kind, NearOutcome::Bypass);
            return None;
        }
        match table.entries.get(key) {
            Some(entry) if entry.expires > Instant::now() && self.tags.hold(&entry.tags) => {
                table.hits.fetch_add(1, Ordering::Relaxed);
                metrics::near_cache_lookup(kind, NearOutcome::Hit);
                Some(entry.value)
            }
            _ => {
                table.misses.fetch_add(1, Ordering::Relaxed);
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
        let slot = Self::slot(kind, key);
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
            self.generations[Self::slot(kind, key)].fetch_add(1, Ordering::SeqCst);
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
                    hits: table.hits.load(Ordering::Relaxed),
                    misses: table.misses.load(Ordering::Relaxed),
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
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bypasses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }
}

/// [`NearCaches::db_clock_ahead_us`] before any poll: every entry reads as expired.
const NO_CLOCK_YET: i64 = i64::MAX / 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;

    /// Near caches for kv whose poller has not connected yet.
    fn kv_only() -> NearCaches {
        let config = CacheConfig::builder()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .build()
            .unwrap();
        NearCaches::new(&config).unwrap()
    }

    /// Now by this machine's clock, microseconds since the Unix epoch: the
    /// database's clock in these tests.
    fn clock_now_us() -> i64 {
        Utc::now().timestamp_micros()
    }

    /// Near caches for kv whose poller has its baseline and is current, as if it
    /// had just polled.
    fn current() -> Arc<NearCaches> {
        let near = Arc::new(kv_only());
        near.polled(Instant::now(), Some(clock_now_us()));
        near.has_baseline.store(true, Ordering::SeqCst);
        near.fresh_until.store(u64::MAX, Ordering::SeqCst);
        near
    }

    fn value(text: &str) -> NearValue {
        Arc::new(text.to_owned())
    }

    fn held(near: &NearCaches, key: &[u8]) -> Option<String> {
        near.get(CacheKind::Kv, key)
            .and_then(|v| v.downcast_ref::<String>().cloned())
    }

    fn in_an_hour() -> DateTime<Utc> {
        Utc::now() + chrono::Duration::hours(1)
    }

    /// A fill of kv `key` with `text`, live for an hour, read after `ticket`.
    fn fill(near: &NearCaches, ticket: Ticket, key: &[u8], text: &str) {
        near.fill(
            CacheKind::Kv,
            ticket,
            key.into(),
            value(text),
            in_an_hour(),
            1,
        );
    }

    #[test]
    fn a_fill_serves_until_its_key_is_invalidated() {
        let near = current();
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        fill(&near, ticket, b"k", "v1");
        assert_eq!(held(&near, b"k").as_deref(), Some("v1"));
        near.invalidate(CacheKind::Kv, [&b"k"[..]]);
        assert_eq!(held(&near, b"k"), None);
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_kept() {
        let near = current();
        // The reader notes the generation, then SELECTs the old value; the
        // invalidation of the write that replaced it lands before the fill...
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        near.invalidate(CacheKind::Kv, [&b"k"[..]]);
        fill(&near, ticket, b"k", "old");
        assert_eq!(held(&near, b"k"), None, "landed before the fill");
        // ...or between the fill's last check and its insert.
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        let weak = Arc::downgrade(&near);
        near.set_before_insert(Some(Box::new(move || {
            weak.upgrade()
                .unwrap()
                .invalidate(CacheKind::Kv, [&b"k"[..]]);
        })));
        fill(&near, ticket, b"k", "old");
        near.set_before_insert(None);
        assert_eq!(held(&near, b"k"), None, "landed before the insert");
    }

    #[test]
    fn a_lost_channel_drops_everything_and_refuses_fills_taken_before() {
        let near = current();
        let early = near.ticket(CacheKind::Kv, b"a").unwrap();
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        fill(&near, ticket, b"k", "v");
        near.lost();
        assert_eq!(held(&near, b"k"), None, "not served while not current");
        near.has_baseline.store(true, Ordering::SeqCst);
        near.fresh_until.store(u64::MAX, Ordering::SeqCst);
        assert_eq!(held(&near, b"k"), None, "dropped, not just hidden");
        fill(&near, early, b"a", "v");
        assert_eq!(
            held(&near, b"a"),
            None,
            "a read from before the loss is not kept"
        );
    }

    #[test]
    fn what_is_filled_right_after_the_baseline_is_served() {
        let near = kv_only();
        assert!(
            near.ticket(CacheKind::Kv, b"k").is_none(),
            "no baseline yet"
        );
        near.baseline_taken(Instant::now(), Some(clock_now_us()));
        // No poll after the baseline yet: the fill is served all the same.
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        fill(&near, ticket, b"k", "v");
        assert_eq!(held(&near, b"k").as_deref(), Some("v"));
        assert_eq!(near.stats()[0].bypasses, 0);
    }

    #[test]
    fn no_fill_without_a_baseline_and_no_serving_once_the_last_poll_is_old() {
        let near = current();
        near.has_baseline.store(false, Ordering::SeqCst);
        assert!(near.ticket(CacheKind::Kv, b"k").is_none());
        near.has_baseline.store(true, Ordering::SeqCst);
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        fill(&near, ticket, b"k", "v");
        near.fresh_until.store(0, Ordering::SeqCst);
        assert_eq!(held(&near, b"k"), None);
        assert_eq!(near.stats()[0].bypasses, 1);
    }

    #[test]
    fn the_byte_bound_evicts_and_counts_it() {
        let config = CacheConfig::builder()
            .near_cache(CacheKind::Kv, Some(NearCache::new().max_bytes(10_000)))
            .build()
            .unwrap();
        let near = NearCaches::new(&config).unwrap();
        near.baseline_taken(Instant::now(), Some(clock_now_us()));
        near.fresh_until.store(u64::MAX, Ordering::SeqCst);
        for i in 0..100u32 {
            let key = i.to_be_bytes();
            let ticket = near.ticket(CacheKind::Kv, &key).unwrap();
            near.fill(
                CacheKind::Kv,
                ticket,
                key[..].into(),
                value("v"),
                in_an_hour(),
                1_000,
            );
        }
        let stats = &near.stats()[0];
        assert!(stats.bytes <= 10_000, "{stats:?}");
        assert!(stats.evictions >= 90, "{stats:?}");
        assert_eq!(stats.entries + stats.evictions, 100, "{stats:?}");
    }

    #[test]
    fn a_replaced_entry_is_not_counted_as_an_eviction() {
        let near = current();
        for round in 0..50 {
            let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
            fill(&near, ticket, b"k", &format!("v{round}"));
        }
        let stats = &near.stats()[0];
        assert_eq!(stats.entries, 1, "{stats:?}");
        assert_eq!(stats.evictions, 0, "{stats:?}");
    }

    #[test]
    fn a_late_poll_reply_never_extends_an_entry() {
        let near = current();
        // The server read its clock as the poll was sent; the reply came back 200 ms
        // later. Guessing that the clock was read halfway would put the database
        // 100 ms behind and keep the entry 100 ms past its expiry.
        let sent = Instant::now();
        let db_clock = clock_now_us();
        std::thread::sleep(Duration::from_millis(200));
        near.polled(sent, Some(db_clock));
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        let expiry = Utc::now() + chrono::Duration::milliseconds(40);
        near.fill(
            CacheKind::Kv,
            ticket,
            b"k"[..].into(),
            value("v"),
            expiry,
            1,
        );
        loop {
            let asked = Utc::now();
            if held(&near, b"k").is_none() {
                break;
            }
            assert!(asked < expiry, "served past its database expiry");
        }
    }

    #[test]
    fn nothing_is_kept_before_the_database_clock_is_known() {
        let near = kv_only();
        near.has_baseline.store(true, Ordering::SeqCst);
        near.fresh_until.store(u64::MAX, Ordering::SeqCst);
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        fill(&near, ticket, b"k", "v");
        assert_eq!(held(&near, b"k"), None);
    }

    #[test]
    fn an_entry_lives_at_most_its_remaining_ttl() {
        let near = current();
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        let soon = Utc::now() + chrono::Duration::milliseconds(30);
        near.fill(CacheKind::Kv, ticket, b"k"[..].into(), value("v"), soon, 1);
        assert!(held(&near, b"k").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(held(&near, b"k"), None);
        let ticket = near.ticket(CacheKind::Kv, b"gone").unwrap();
        let past = Utc::now() - chrono::Duration::seconds(1);
        near.fill(
            CacheKind::Kv,
            ticket,
            b"gone"[..].into(),
            value("v"),
            past,
            1,
        );
        assert_eq!(held(&near, b"gone"), None);
    }

    #[test]
    fn a_poll_keeps_the_near_cache_serving_for_the_bound_only() {
        let config = CacheConfig::builder()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_millis(20))
            .build()
            .unwrap();
        let near = NearCaches::new(&config).unwrap();
        assert!(!near.current(), "not before the first poll");
        near.polled(Instant::now(), Some(clock_now_us()));
        assert!(near.current());
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !near.current(),
            "a poll older than the bound proves nothing"
        );
    }

    #[test]
    fn logged_changes_name_keys_or_the_whole_cache() {
        let near = current();
        for key in [&b"a"[..], b"b", b"c"] {
            let ticket = near.ticket(CacheKind::Kv, key).unwrap();
            near.fill(
                CacheKind::Kv,
                ticket,
                key.into(),
                value("v"),
                in_an_hour(),
                1,
            );
        }
        near.apply("kv", Some(&["a".to_owned(), "x".to_owned()]));
        assert_eq!(held(&near, b"a"), None);
        assert!(held(&near, b"b").is_some());
        near.apply("kv", None);
        assert_eq!(held(&near, b"b"), None);
        assert_eq!(held(&near, b"c"), None);
    }
}
