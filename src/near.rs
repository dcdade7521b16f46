//! The near cache: an opt-in in-process copy (L1) of hot entries in front of the
//! tables, kept coherent across processes by the database itself.
//!
//! # How it stays coherent
//! - Every change to a row of a cache table with a near cache (an update, an upsert
//!   overwrite, a delete of a live row, a `TRUNCATE`, by pgcache or by any other
//!   program) fires a statement-level trigger that sends one `NOTIFY` on the
//!   schema's channel naming the changed keys (`migrations/`,
//!   `pgcache_near_invalidate`). Notifications are delivered in commit order, and only
//!   for transactions that commit.
//! - One listener thread per manager ([`Listener`]) receives them and evicts the keys.
//!   Every [`HEARTBEATS_PER_BOUND`]th of the staleness bound `S` it sends a
//!   heartbeat on the same channel; receiving its own heartbeat proves every change
//!   committed before it was sent has been received. L1 serves only while the last
//!   heartbeat received was sent less than `S` ago, so a delayed or lost channel
//!   turns L1 off within `S` instead of serving stale entries.
//! - Losing the listener connection empties every L1 at once (an epoch bump) and
//!   L1 is neither read nor filled until the listener is back and current again.
//! - A read that raced an invalidation cannot put its old value back: every key
//!   hashes to a generation slot, bumped by each invalidation; a filler notes the
//!   slot's generation before its `SELECT`, inserts, then removes its entry again if
//!   the generation or the epoch moved meanwhile.
//! - An entry lives at most `min(remaining TTL as the database computed it, max
//!   age)`: the database clock's offset is measured by every heartbeat.

use std::any::Any;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use serde::Serialize;

use crate::config::{CacheConfig, NearCache};
use crate::kind::CacheKind;

/// A near-cache key: the entry's key digest, or a key/value key's bytes.
pub(crate) type NearKey = Box<[u8]>;

/// A near-cache value: what the table's `Storage` keeps of an entry.
pub(crate) type NearValue = Arc<dyn Any + Send + Sync>;

/// Generation slots keys hash to (a power of two).
const GENERATION_SLOTS: usize = 4096;

/// Heartbeats per staleness bound: L1 tolerates this many minus one late ones.
pub(crate) const HEARTBEATS_PER_BOUND: u32 = 4;

/// How often the listener reads the socket for notifications: the floor of the
/// commit-to-eviction latency.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The wait before reconnecting a lost listener.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Entry {
    value: NearValue,
    expires: Instant,
    weight: u64,
}

#[derive(Clone)]
struct ByWeight;

impl quick_cache::Weighter<NearKey, Entry> for ByWeight {
    fn weight(&self, key: &NearKey, entry: &Entry) -> u64 {
        key.len() as u64 + entry.weight
    }
}

/// One cache's L1 and its figures.
struct Table {
    entries: quick_cache::sync::Cache<NearKey, Entry, ByWeight>,
    max_age: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    invalidations: AtomicU64,
}

/// The near-cache figures of one cache, in [`CacheStats`](crate::CacheStats) and
/// from [`CacheManager::near_cache_stats`](crate::CacheManager::near_cache_stats).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct NearCacheStats {
    /// The cache.
    pub cache: CacheKind,
    /// Reads answered from this process's memory.
    pub hits: u64,
    /// Reads L1 could serve but did not hold (they went to the database).
    pub misses: u64,
    /// Reads that skipped L1 because the invalidation channel was not current.
    pub bypasses: u64,
    /// Keys evicted by invalidations (notifications and this process's writes).
    pub invalidations: u64,
    /// Entries held.
    pub entries: u64,
    /// Their weight in bytes (keys and values).
    pub bytes: u64,
    /// Milliseconds since the newest heartbeat this process received was sent
    /// (`None` while the listener is not current): how far behind the channel is.
    pub channel_lag_ms: Option<f64>,
}

/// What a reader notes before its `SELECT`, to fill L1 only if nothing changed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    slot: usize,
    generation: u64,
    epoch: u64,
}

/// The near caches of one manager and the state of their invalidation channel.
pub(crate) struct NearCaches {
    tables: [Option<Table>; CacheKind::COUNT],
    generations: Box<[AtomicU64]>,
    epoch: AtomicU64,
    /// Whether the listener is listening on its current connection: fills are safe.
    listening: AtomicBool,
    /// Nanoseconds since `base` until which L1 may serve (heartbeat sent + S).
    fresh_until: AtomicU64,
    /// When the newest heartbeat received was sent, nanoseconds since `base`.
    heartbeat_sent: AtomicU64,
    /// Database clock minus local clock, microseconds.
    clock_offset_us: AtomicI64,
    base: Instant,
    staleness: Duration,
    /// Test hook: runs between a fill's last check and its insert.
    #[cfg(test)]
    before_insert: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl std::fmt::Debug for NearCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCaches")
            .field("staleness", &self.staleness)
            .field("listening", &self.listening.load(Ordering::Relaxed))
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
            listening: AtomicBool::new(false),
            fresh_until: AtomicU64::new(0),
            heartbeat_sent: AtomicU64::new(0),
            clock_offset_us: AtomicI64::new(0),
            base: Instant::now(),
            staleness: config.near_cache_staleness(),
            #[cfg(test)]
            before_insert: Mutex::new(None),
        })
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

    /// Whether L1 may serve now: the channel proved current less than `S` ago.
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
            return None;
        }
        match table.entries.get(key) {
            Some(entry) if entry.expires > Instant::now() => {
                table.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.value)
            }
            _ => {
                table.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Notes what a fill of `key` must find unchanged; `None` when L1 must not be
    /// filled (no near cache for `kind`, or no listener on the channel).
    pub(crate) fn ticket(&self, kind: CacheKind, key: &[u8]) -> Option<Ticket> {
        self.tables[kind.index()].as_ref()?;
        // The epoch first: a listener lost after this moment bumps it.
        let epoch = self.epoch.load(Ordering::SeqCst);
        if !self.listening.load(Ordering::SeqCst) {
            return None;
        }
        let slot = Self::slot(kind, key);
        Some(Ticket {
            slot,
            generation: self.generations[slot].load(Ordering::SeqCst),
            epoch,
        })
    }

    /// Puts a value read after `ticket` was taken into L1, unless an invalidation
    /// of its slot or a lost channel came in between. `expires_at` is the entry's
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
        let db_now_us =
            unix_micros(SystemTime::now()) + self.clock_offset_us.load(Ordering::Relaxed);
        let remaining_us = expires_at.timestamp_micros() - db_now_us;
        let remaining = Duration::from_micros(u64::try_from(remaining_us).ok().filter(|&r| r > 0)?);
        Some(Instant::now() + remaining.min(max_age))
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

    /// Evicts every entry of `kind` (a `TRUNCATE`, a batch too large to name).
    pub(crate) fn invalidate_all(&self, kind: CacheKind) {
        if let Some(table) = &self.tables[kind.index()] {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            table.entries.clear();
        }
    }

    /// The channel is gone: nothing is served or filled until a new listener is
    /// current, and everything held is dropped (changes may have been missed).
    fn lost(&self) {
        self.listening.store(false, Ordering::SeqCst);
        self.fresh_until.store(0, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for table in self.tables.iter().flatten() {
            table.entries.clear();
        }
    }

    /// The figures of every near cache.
    pub(crate) fn stats(&self) -> Vec<NearCacheStats> {
        let lag = self.current().then(|| {
            let sent = self.heartbeat_sent.load(Ordering::Acquire);
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
                    entries: table.entries.len() as u64,
                    bytes: table.entries.weight(),
                    channel_lag_ms: lag,
                })
            })
            .collect()
    }

    /// Applies one notification of the channel; a heartbeat of `token` makes the
    /// channel current as of when it was sent.
    fn apply(&self, payload: &str, token: &str, sent: &dyn Fn(u64) -> Option<Instant>) {
        let mut words = payload.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("hb"), Some(from), Some(seq)) if from == token => {
                if let Some(at) = seq.parse().ok().and_then(sent) {
                    let at = self.nanos(at);
                    self.heartbeat_sent.fetch_max(at, Ordering::AcqRel);
                    let until = at + self.staleness.as_nanos() as u64;
                    self.fresh_until.fetch_max(until, Ordering::AcqRel);
                }
            }
            (Some("hb"), ..) => {}
            (Some(name), Some("*"), None) => {
                if let Some(kind) = CacheKind::from_name(name) {
                    self.invalidate_all(kind);
                }
            }
            (Some(name), Some(keys), None) => {
                let Some(kind) = CacheKind::from_name(name) else {
                    return;
                };
                match serde_json::from_str::<Vec<String>>(keys) {
                    Ok(keys) if kind == CacheKind::Kv => {
                        self.invalidate(kind, keys.iter().map(|k| k.as_bytes()));
                    }
                    Ok(keys) => {
                        let digests: Vec<Vec<u8>> =
                            keys.iter().filter_map(|k| hex::decode(k).ok()).collect();
                        self.invalidate(kind, digests.iter().map(Vec::as_slice));
                    }
                    // Not ours to read: safest to forget the whole cache.
                    Err(_) => self.invalidate_all(kind),
                }
            }
            _ => {}
        }
    }
}

impl Table {
    fn new(settings: NearCache) -> Self {
        let bytes = settings.bytes();
        Table {
            // About 1 kB per entry for the index's first sizing; it grows.
            entries: quick_cache::sync::Cache::with_weighter(
                (bytes / 1024).clamp(16, 1 << 20) as usize,
                bytes,
                ByWeight,
            ),
            max_age: settings.age(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bypasses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }
}

fn unix_micros(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The channel of the cache tables in `schema`: what the triggers notify on.
pub(crate) fn channel(schema: &str) -> String {
    // Channel names are identifiers: at most 63 bytes.
    let mut channel = format!("pgcache.{schema}");
    while channel.len() > 63 {
        channel.pop();
    }
    channel
}

/// The listener thread of one manager's near caches.
pub(crate) struct Listener {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

impl Listener {
    /// Starts listening for `caches`' invalidations with connections from
    /// `connect` (which also names the schema); the thread ends when `caches` is
    /// dropped or the listener is.
    pub(crate) fn start(
        caches: Weak<NearCaches>,
        connect: impl Fn() -> Option<(PgConnection, String)> + Send + 'static,
    ) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("pgcache-near-listener".to_owned())
            .spawn(move || listen(&caches, &connect, &stopping))
            .ok()?;
        Some(Listener {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

/// The listener's loop: connect, `LISTEN`, then poll for notifications and send
/// heartbeats until told to stop; a lost connection is reported and replaced.
fn listen(
    caches: &Weak<NearCaches>,
    connect: &dyn Fn() -> Option<(PgConnection, String)>,
    stop: &AtomicBool,
) {
    // Tells this listener's heartbeats from other processes' on the channel.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut seq: u64 = 0;
    // Heartbeats sent and not yet received: (seq, local send time).
    let mut in_flight: Vec<(u64, Instant)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Some(near) = caches.upgrade() else { return };
        let interval = near.staleness / HEARTBEATS_PER_BOUND;
        drop(near);
        let Some((mut conn, schema)) = connect() else {
            std::thread::sleep(RECONNECT_DELAY);
            continue;
        };
        let channel = channel(&schema);
        let listening =
            conn.batch_execute(&format!("LISTEN {}", crate::pool::quote_ident(&channel)));
        if listening.is_err() {
            std::thread::sleep(RECONNECT_DELAY);
            continue;
        }
        match caches.upgrade() {
            Some(near) => near.listening.store(true, Ordering::SeqCst),
            None => return,
        }
        in_flight.clear();
        let mut next_heartbeat = Instant::now();
        let outcome: QueryResult<()> = (|| loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let Some(near) = caches.upgrade() else {
                return Ok(());
            };
            if Instant::now() >= next_heartbeat {
                seq += 1;
                let sent = Instant::now();
                in_flight.push((seq, sent));
                // Keep only what the bound can still use.
                in_flight.retain(|(_, at)| at.elapsed() < near.staleness);
                let db_us = heartbeat(&mut conn, &channel, &token, seq)?;
                let local_us =
                    unix_micros(SystemTime::now()) - (sent.elapsed().as_micros() as i64) / 2;
                near.clock_offset_us
                    .store(db_us - local_us, Ordering::Relaxed);
                next_heartbeat = sent + interval;
            }
            for notification in conn.notifications_iter() {
                let notification = notification?;
                let sent = |n: u64| in_flight.iter().find(|(s, _)| *s == n).map(|(_, at)| *at);
                near.apply(&notification.payload, &token, &sent);
            }
            drop(near);
            std::thread::sleep(POLL_INTERVAL);
        })();
        if let Some(near) = caches.upgrade() {
            near.lost();
        }
        if let Err(error) = outcome {
            tracing::warn!(%error, "pgcache: near-cache listener lost its connection; near caches off until it is back");
            std::thread::sleep(RECONNECT_DELAY);
        }
    }
}

/// Sends heartbeat `seq` of `token` on `channel`; returns the database clock, in
/// microseconds since the Unix epoch.
fn heartbeat(conn: &mut PgConnection, channel: &str, token: &str, seq: u64) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Clock {
        #[diesel(sql_type = BigInt)]
        now_us: i64,
    }
    let clock: Clock = diesel::sql_query(
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now_us \
         FROM (SELECT pg_notify($1, $2)) AS sent",
    )
    .bind::<Text, _>(channel)
    .bind::<Text, _>(format!("hb {token} {seq}"))
    .get_result(conn)?;
    Ok(clock.now_us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;

    /// Near caches for kv whose channel is listening and current, as if a listener
    /// had just received its heartbeat.
    fn current() -> Arc<NearCaches> {
        let config = CacheConfig::builder()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .build()
            .unwrap();
        let near = Arc::new(NearCaches::new(&config).unwrap());
        near.listening.store(true, Ordering::SeqCst);
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

    #[test]
    fn a_fill_serves_until_its_key_is_invalidated() {
        let near = current();
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        near.fill(
            CacheKind::Kv,
            ticket,
            b"k"[..].into(),
            value("v1"),
            in_an_hour(),
            2,
        );
        assert_eq!(held(&near, b"k").as_deref(), Some("v1"));
        near.invalidate(CacheKind::Kv, [&b"k"[..]]);
        assert_eq!(held(&near, b"k"), None);
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_kept() {
        let near = current();
        // The reader notes the generation, then SELECTs the old value; the
        // invalidation of the write that replaced it lands before the insert.
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        near.invalidate(CacheKind::Kv, [&b"k"[..]]);
        near.fill(
            CacheKind::Kv,
            ticket,
            b"k"[..].into(),
            value("old"),
            in_an_hour(),
            3,
        );
        assert_eq!(held(&near, b"k"), None);
    }

    #[test]
    fn an_invalidation_landing_between_check_and_insert_undoes_the_insert() {
        let near = current();
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        let weak = Arc::downgrade(&near);
        *near.before_insert.lock().unwrap() = Some(Box::new(move || {
            let near = weak.upgrade().unwrap();
            near.invalidate(CacheKind::Kv, [&b"k"[..]]);
        }));
        near.fill(
            CacheKind::Kv,
            ticket,
            b"k"[..].into(),
            value("old"),
            in_an_hour(),
            3,
        );
        *near.before_insert.lock().unwrap() = None;
        assert_eq!(held(&near, b"k"), None);
    }

    #[test]
    fn a_lost_channel_drops_everything_and_refuses_fills_taken_before() {
        let near = current();
        let early = near.ticket(CacheKind::Kv, b"a").unwrap();
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        near.fill(
            CacheKind::Kv,
            ticket,
            b"k"[..].into(),
            value("v"),
            in_an_hour(),
            1,
        );
        near.lost();
        assert_eq!(held(&near, b"k"), None, "not served while not current");
        near.listening.store(true, Ordering::SeqCst);
        near.fresh_until.store(u64::MAX, Ordering::SeqCst);
        assert_eq!(held(&near, b"k"), None, "dropped, not just hidden");
        near.fill(
            CacheKind::Kv,
            early,
            b"a"[..].into(),
            value("v"),
            in_an_hour(),
            1,
        );
        assert_eq!(
            held(&near, b"a"),
            None,
            "a read from before the loss is not kept"
        );
    }

    #[test]
    fn no_fill_without_a_listener_and_no_serving_once_the_heartbeat_is_old() {
        let near = current();
        near.listening.store(false, Ordering::SeqCst);
        assert!(near.ticket(CacheKind::Kv, b"k").is_none());
        near.listening.store(true, Ordering::SeqCst);
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        near.fill(
            CacheKind::Kv,
            ticket,
            b"k"[..].into(),
            value("v"),
            in_an_hour(),
            1,
        );
        near.fresh_until.store(0, Ordering::SeqCst);
        assert_eq!(held(&near, b"k"), None);
        assert_eq!(near.stats()[0].bypasses, 1);
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
    fn heartbeats_of_other_listeners_do_not_make_the_channel_current() {
        let near = current();
        near.fresh_until.store(0, Ordering::SeqCst);
        let sent = Instant::now();
        let at = |seq: u64| (seq == 1).then_some(sent);
        near.apply("hb someone-else 1", "me", &at);
        assert!(!near.current());
        near.apply("hb me 1", "me", &at);
        assert!(near.current());
    }

    #[test]
    fn notifications_name_keys_or_the_whole_cache() {
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
        near.apply(r#"kv ["a","x"]"#, "me", &|_| None);
        assert_eq!(held(&near, b"a"), None);
        assert!(held(&near, b"b").is_some());
        near.apply("kv *", "me", &|_| None);
        assert_eq!(held(&near, b"b"), None);
        assert_eq!(held(&near, b"c"), None);
    }
}
