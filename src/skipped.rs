//! What fail-open mode skipped, replayed as deletes once the database answers, and
//! the once-per-outage log lines of fail-open mode.
//!
//! A write or delete skipped while the database could not be reached would leave the
//! entry's old value readable after recovery, until its TTL ends: a skipped
//! invalidation is exactly the stale read a cache must not serve. So each skipped
//! write or delete is remembered, per cache, as the keys it touched (a set: writing
//! the same keys again costs nothing more), the prefixes of skipped
//! `delete_prefix` calls, or "the whole cache" for a skipped `clear`. Past
//! [`MAX_SKIPPED_KEYS`] distinct keys and prefixes in one cache, the cache collapses
//! to "the whole cache": no undo is ever dropped, the cache is emptied instead.
//!
//! The replay deletes each cache's keys in batches (`= ANY($1)` of up to
//! [`REPLAY_BATCH`] keys), each prefix in a statement of its own, a whole cache in
//! short batches until one comes back short. It runs on the background flusher
//! (nudged when an operation finds the database answering again), or on a write of
//! that cache; never under a lock that a request waits for while a statement runs.
//!
//! Why nothing stale is served and no write that succeeded after recovery is lost,
//! although requests do not wait for the replay (per engine, that is per shard):
//! - While a cache has anything remembered or being replayed, its reads (gets,
//!   batch gets, `ttl`) do not go to the database: they are misses, as fail-open
//!   reads are, so no old value the replay has not deleted yet can be read.
//!   Other caches are not concerned, so a replay stuck on one table (locked,
//!   say) holds up no request of another.
//! - A write, delete or exact operation (`incr`, ...) on such a cache first settles
//!   it: it replays the remembered keys and prefixes itself on its own connection
//!   (a few statements), or waits for the one replay in progress (the flusher's, or
//!   its emptying of a whole cache, which a request does not take on); the replayed
//!   deletes therefore always come before its statement, and cannot delete what it
//!   writes. It waits for at most one replay attempt, and at most the statement
//!   timeout: past that, or if that attempt fails, the operation fails (transiently,
//!   so fail-open mode skips it and remembers its keys, to be replayed after). So
//!   writes are never skipped for long after recovery, and the replays converge:
//!   what is skipped while one runs is a short replay after it, done by the next
//!   write.
//! - A replay takes the remembered undos out under the lock, runs them without it,
//!   and on failure puts them back (a delete done twice is harmless: nothing was
//!   written in between, since writes wait). Writes skipped meanwhile are
//!   remembered anew and replayed after.
//!
//! So a write that succeeds is only ever deleted by the replay of a write skipped
//! at the same time or later (a miss, never an older value). Another process may
//! read an old value during the outage and until the replay: it never saw the
//! skipped write. A process that exits before the database answers forgets its
//! undos.
//!
//! Logging: one warning when a cache starts failing open, one when the first write
//! is skipped, one when a cache passes the bound, and one line once everything is
//! replayed, with counts; every skipped operation is otherwise logged at `debug`.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::sql_types::Integer;
use diesel::RunQueryDsl;

use crate::error::{Error, Result};
use crate::kind::CacheKind;
use crate::tables::Tables;

/// Most distinct keys (and prefixes) remembered per cache (and shard) while the
/// database is down; past that, the whole cache is emptied once it answers.
pub const MAX_SKIPPED_KEYS: usize = 10_000;

/// Most keys deleted by one replay statement (and rows by one statement of a whole
/// cache's delete).
pub(crate) const REPLAY_BATCH: usize = 5_000;

/// How often, at most, requests nudge the background flusher to replay.
const NUDGE_EVERY: Duration = Duration::from_millis(100);

/// How long after a failed replay (the database still down) requests wait before
/// nudging the flusher again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

/// Deletes the entries of these keys (as [`Skipped::keys`] holds them) from the
/// table (schema-qualified).
pub(crate) type DeleteKeys = fn(&mut PgConnection, &str, &[&[u8]]) -> Result<()>;

/// Deletes the entries under a prefix from the table (schema-qualified).
pub(crate) type DeletePrefix = fn(&mut PgConnection, &str, &str) -> Result<()>;

/// The undo of a skipped write or delete: made by the table that skipped it,
/// remembered and replayed by the engine once the database answers (plumbing of
/// [`Cache`](crate::Cache), not re-exported).
pub struct Skipped {
    undo: Undo,
}

enum Undo {
    Keys {
        keys: Vec<Box<[u8]>>,
        delete: DeleteKeys,
    },
    Prefix {
        prefix: String,
        delete: DeletePrefix,
    },
    Whole,
}

impl Skipped {
    /// Delete these keys (a kv key's bytes, or a digest), with `delete`.
    pub(crate) fn keys(keys: Vec<Box<[u8]>>, delete: DeleteKeys) -> Self {
        Skipped {
            undo: Undo::Keys { keys, delete },
        }
    }

    /// Delete every entry under `prefix`, with `delete`.
    pub(crate) fn prefix(prefix: String, delete: DeletePrefix) -> Self {
        Skipped {
            undo: Undo::Prefix { prefix, delete },
        }
    }

    /// Delete every entry of the cache.
    pub(crate) fn whole() -> Self {
        Skipped { undo: Undo::Whole }
    }
}

impl std::fmt::Debug for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.undo {
            Undo::Keys { keys, .. } => format!("{} keys", keys.len()),
            Undo::Prefix { .. } => "a prefix".to_owned(),
            Undo::Whole => "the whole cache".to_owned(),
        };
        f.debug_struct("Skipped").field("undo", &what).finish()
    }
}

/// What one cache has to replay.
#[derive(Default)]
struct Pending {
    keys: HashSet<Box<[u8]>>,
    delete_keys: Option<DeleteKeys>,
    prefixes: BTreeSet<String>,
    delete_prefix: Option<DeletePrefix>,
    whole: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        !self.whole && self.keys.is_empty() && self.prefixes.is_empty()
    }

    fn add(&mut self, undo: Undo) {
        if self.whole {
            return;
        }
        match undo {
            Undo::Keys { keys, delete } => {
                self.delete_keys = Some(delete);
                self.keys.extend(keys);
            }
            Undo::Prefix { prefix, delete } => {
                self.delete_prefix = Some(delete);
                self.prefixes.insert(prefix);
            }
            Undo::Whole => self.collapse(),
        }
    }

    /// Everything of `other` added to this one.
    fn merge(&mut self, other: Pending) {
        if other.whole {
            self.collapse();
        }
        if self.whole {
            return;
        }
        self.delete_keys = self.delete_keys.or(other.delete_keys);
        self.delete_prefix = self.delete_prefix.or(other.delete_prefix);
        self.keys.extend(other.keys);
        self.prefixes.extend(other.prefixes);
    }

    fn over_bound(&self) -> bool {
        self.keys.len() + self.prefixes.len() > MAX_SKIPPED_KEYS
    }

    fn collapse(&mut self) {
        *self = Pending {
            whole: true,
            ..Pending::default()
        };
    }

    /// Runs the deletes on `conn`, on `kind`'s table among `tables`.
    fn replay(&self, kind: CacheKind, tables: &Tables, conn: &mut PgConnection) -> Result<()> {
        let table = tables.of(kind);
        if self.whole {
            return delete_whole(kind, table, conn);
        }
        if let Some(delete) = self.delete_prefix {
            for prefix in &self.prefixes {
                delete(conn, table, prefix)?;
            }
        }
        if let Some(delete) = self.delete_keys {
            let keys: Vec<&[u8]> = self.keys.iter().map(|k| &k[..]).collect();
            for batch in keys.chunks(REPLAY_BATCH) {
                delete(conn, table, batch)?;
            }
        }
        Ok(())
    }
}

/// Empties a cache's table in statements of at most [`REPLAY_BATCH`] rows (each
/// within the statement timeout however large the table), until one comes back
/// short. A `DELETE`, so the near-cache triggers log every key it removes.
fn delete_whole(kind: CacheKind, table: &str, conn: &mut PgConnection) -> Result<()> {
    let sql = format!(
        "DELETE FROM {table} WHERE {k} IN (SELECT {k} FROM {table} LIMIT $1)",
        k = kind.descriptor().key
    );
    loop {
        let removed = diesel::sql_query(&sql)
            .bind::<Integer, _>(REPLAY_BATCH as i32)
            .execute(conn)?;
        if removed < REPLAY_BATCH {
            return Ok(());
        }
    }
}

/// Writes skipped in fail-open mode, per cache, and the fail-open log state.
#[derive(Default)]
pub(crate) struct SkippedWrites {
    /// A bit per cache ([`CacheKind::index`]) with something remembered or being
    /// replayed: one atomic load on the request path.
    pending: AtomicU32,
    /// A bit per cache that failed open since it last answered (for the log).
    failing: AtomicU32,
    state: Mutex<State>,
    /// Signalled when a replay ends.
    replayed: Condvar,
    /// When requests last nudged the flusher, in ms since `epoch`.
    nudged_at: AtomicU64,
    epoch: OnceInstant,
}

impl std::fmt::Debug for SkippedWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkippedWrites")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// An `Instant` fixed at creation (`Instant` has no `Default`).
struct OnceInstant(Instant);

impl Default for OnceInstant {
    fn default() -> Self {
        OnceInstant(Instant::now())
    }
}

#[derive(Default)]
struct State {
    kinds: [Pending; CacheKind::COUNT],
    /// Caches whose undos a replay has taken out and not yet finished with.
    replaying: [bool; CacheKind::COUNT],
    /// Bumped when a replay of the cache ends, for callers waiting on one.
    attempts: [u64; CacheKind::COUNT],
    /// This outage's skipped writes (from the first one to the end of the replay).
    skipped: u64,
    /// This outage's caches emptied because they passed the bound.
    collapsed: u64,
}

impl State {
    fn nothing_pending(&self) -> bool {
        self.kinds.iter().all(Pending::is_empty) && !self.replaying.iter().any(|r| *r)
    }
}

fn bit(kind: CacheKind) -> u32 {
    1 << kind.index()
}

impl SkippedWrites {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `kind` has skipped writes remembered or being replayed: its reads
    /// are misses meanwhile. One atomic load.
    pub(crate) fn is_pending(&self, kind: CacheKind) -> bool {
        self.pending.load(Ordering::Acquire) & bit(kind) != 0
    }

    /// Whether any cache has skipped writes to replay.
    pub(crate) fn any_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) != 0
    }

    /// True at most once per [`NUDGE_EVERY`]: whether a request should nudge the
    /// flusher to replay now.
    pub(crate) fn nudge_due(&self) -> bool {
        let every = NUDGE_EVERY.as_millis() as u64;
        // Offset by one period, so that the first nudge (from 0) is due at once.
        let now = self.epoch.0.elapsed().as_millis() as u64 + every;
        let last = self.nudged_at.load(Ordering::Relaxed);
        now >= last + every
            && self
                .nudged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Notes a failed replay attempt: requests nudge the flusher again only after
    /// [`RETRY_AFTER_FAILURE`].
    pub(crate) fn replay_failed(&self) {
        let every = NUDGE_EVERY.as_millis() as u64;
        let now = self.epoch.0.elapsed().as_millis() as u64 + every;
        self.nudged_at.fetch_max(
            now + RETRY_AFTER_FAILURE.as_millis() as u64 - every,
            Ordering::Relaxed,
        );
    }

    /// Notes an operation of `kind` failing open; true the first time since the
    /// cache last answered (the one time to log it as a warning).
    pub(crate) fn failed_open(&self, kind: CacheKind) -> bool {
        self.failing.fetch_or(bit(kind), Ordering::AcqRel) & bit(kind) == 0
    }

    /// Notes an operation of `kind` answered by the database.
    pub(crate) fn answered(&self, kind: CacheKind) {
        if self.failing.load(Ordering::Relaxed) & bit(kind) != 0 {
            self.failing.fetch_and(!bit(kind), Ordering::AcqRel);
        }
    }

    /// Remembers a skipped write or delete of `kind`.
    pub(crate) fn remember(&self, kind: CacheKind, skipped: Skipped) {
        let mut state = self.lock();
        if state.nothing_pending() {
            tracing::warn!(cache = %kind, "pgcache: a write was skipped in fail-open mode; the keys of skipped writes are deleted once the database answers");
        }
        state.skipped += 1;
        let pending = &mut state.kinds[kind.index()];
        let was_whole = pending.whole;
        pending.add(skipped.undo);
        if !was_whole && pending.over_bound() {
            let keys = pending.keys.len() + pending.prefixes.len();
            pending.collapse();
            state.collapsed += 1;
            tracing::warn!(cache = %kind, keys, bound = MAX_SKIPPED_KEYS, "pgcache: too many distinct keys skipped in fail-open mode; the whole cache will be emptied once the database answers");
        }
        self.pending.fetch_or(bit(kind), Ordering::AcqRel);
    }

    /// Takes `kind`'s undos out for a replay, unless there are none or a replay has
    /// them already.
    fn take(&self, state: &mut State, kind: CacheKind) -> Option<Pending> {
        let i = kind.index();
        if state.replaying[i] || state.kinds[i].is_empty() {
            return None;
        }
        state.replaying[i] = true;
        Some(std::mem::take(&mut state.kinds[i]))
    }

    /// Ends a replay of `kind`: what failed goes back.
    fn finish(&self, kind: CacheKind, taken: Pending, result: &Result<()>) {
        let mut state = self.lock();
        let i = kind.index();
        state.replaying[i] = false;
        state.attempts[i] += 1;
        if result.is_err() {
            state.kinds[i].merge(taken);
            if !state.kinds[i].whole && state.kinds[i].over_bound() {
                state.kinds[i].collapse();
                state.collapsed += 1;
            }
        }
        if state.kinds[i].is_empty() {
            self.pending.fetch_and(!bit(kind), Ordering::AcqRel);
        }
        if result.is_ok() && state.nothing_pending() {
            tracing::info!(
                skipped = state.skipped,
                caches_emptied = state.collapsed,
                "pgcache: the writes skipped in fail-open mode are undone"
            );
            state.skipped = 0;
            state.collapsed = 0;
        }
        drop(state);
        self.replayed.notify_all();
    }

    /// Replays `kind`'s undos on `conn` if they are there to take.
    fn replay_kind(
        &self,
        kind: CacheKind,
        tables: &Tables,
        conn: &mut PgConnection,
    ) -> Option<Result<()>> {
        let taken = self.take(&mut self.lock(), kind)?;
        let result = taken.replay(kind, tables, conn);
        self.finish(kind, taken, &result);
        Some(result)
    }

    /// The flusher's replay: every cache whose undos no one else is replaying,
    /// each on its own (one whose table does not answer holds up no other).
    ///
    /// # Errors
    /// The first cache's failure; the others are still tried.
    pub(crate) fn replay(&self, tables: &Tables, conn: &mut PgConnection) -> Result<()> {
        let mut first = Ok(());
        for kind in CacheKind::ALL {
            if self.is_pending(kind) {
                if let Some(Err(error)) = self.replay_kind(kind, tables, conn) {
                    tracing::debug!(cache = %kind, %error, "pgcache: replaying skipped writes failed; will retry");
                    if first.is_ok() {
                        first = Err(error);
                    }
                }
            }
        }
        first
    }

    /// Before a write, delete or exact operation of `kind`: replays its keys and
    /// prefixes on `conn` (a whole cache too if `whole_inline`: emptying a large
    /// table is otherwise left to the flusher), or waits for the replay in progress
    /// (one attempt, at most `wait`).
    ///
    /// # Errors
    /// The replay's, or a transient [`Error::Connection`] when the replay waited
    /// for did not end in time or failed.
    pub(crate) fn settle(
        &self,
        kind: CacheKind,
        tables: &Tables,
        conn: &mut PgConnection,
        wait: Duration,
        whole_inline: bool,
    ) -> Result<()> {
        let i = kind.index();
        let deadline = Instant::now() + wait;
        let mut waited = false;
        while self.is_pending(kind) {
            let mut state = self.lock();
            if whole_inline || !state.kinds[i].whole {
                if let Some(taken) = self.take(&mut state, kind) {
                    drop(state);
                    let result = taken.replay(kind, tables, conn);
                    self.finish(kind, taken, &result);
                    return result;
                }
            }
            if !state.replaying[i] && state.kinds[i].is_empty() {
                break;
            }
            if waited {
                // The attempt waited for failed, or another began: do not wait again.
                return Err(still_replaying(kind));
            }
            let attempt = state.attempts[i];
            let left = deadline.saturating_duration_since(Instant::now());
            let (state, waiting) = self
                .replayed
                .wait_timeout_while(state, left, |s| s.attempts[i] == attempt)
                .unwrap_or_else(|p| p.into_inner());
            drop(state);
            if waiting.timed_out() {
                return Err(still_replaying(kind));
            }
            waited = true;
        }
        Ok(())
    }
}

fn still_replaying(kind: CacheKind) -> Error {
    Error::Connection(
        format!("the writes to cache `{kind}` skipped in fail-open mode are not deleted yet")
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: std::ops::Range<usize>) -> Skipped {
        Skipped::keys(
            n.map(|i| i.to_string().into_bytes().into_boxed_slice())
                .collect(),
            |_, _, _| Ok(()),
        )
    }

    fn pending(skipped: &SkippedWrites, kind: CacheKind) -> (usize, bool) {
        let state = skipped.lock();
        let p = &state.kinds[kind.index()];
        (p.keys.len(), p.whole)
    }

    #[test]
    fn rewriting_the_same_keys_remembers_each_once() {
        let skipped = SkippedWrites::default();
        assert!(!skipped.any_pending());
        for _ in 0..3 * MAX_SKIPPED_KEYS {
            skipped.remember(CacheKind::Kv, keys(0..40));
        }
        assert!(skipped.is_pending(CacheKind::Kv));
        assert!(!skipped.is_pending(CacheKind::Embedding));
        assert_eq!(pending(&skipped, CacheKind::Kv), (40, false));
    }

    #[test]
    fn past_the_bound_the_whole_cache_is_remembered_never_fewer_keys() {
        let skipped = SkippedWrites::default();
        skipped.remember(CacheKind::Kv, keys(0..MAX_SKIPPED_KEYS));
        assert_eq!(pending(&skipped, CacheKind::Kv), (MAX_SKIPPED_KEYS, false));
        skipped.remember(CacheKind::Kv, keys(MAX_SKIPPED_KEYS..MAX_SKIPPED_KEYS + 1));
        assert_eq!(pending(&skipped, CacheKind::Kv), (0, true));
        skipped.remember(CacheKind::Kv, keys(0..1));
        assert_eq!(pending(&skipped, CacheKind::Kv), (0, true), "still whole");
    }
}
