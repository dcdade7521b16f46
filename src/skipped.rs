//! What fail-open mode skipped, replayed once the database answers again.
//!
//! A write or delete skipped while the database was unreachable would leave the
//! entry's old value readable after recovery, until its TTL ends: a skipped
//! invalidation is exactly the stale read a cache must not serve. So each skipped
//! write or delete is remembered as a delete of the keys it touched, and the deletes
//! run before this manager's next operation once the database answers (and from the
//! background flusher), in the order they were skipped. At most
//! [`MAX_SKIPPED_KEYS`] keys are remembered; past that the oldest are dropped and
//! an error is logged, and those entries may be read stale until their TTL ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::caches::common::delete_digests;
use crate::caches::kv::delete_prefix as kv_delete_prefix;
use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::schema::cache_entries;

/// Most keys (or prefixes) remembered for replay.
pub const MAX_SKIPPED_KEYS: usize = 10_000;

/// One skipped write or delete, as the delete that undoes its staleness (plumbing
/// of [`Cache`](crate::Cache), not re-exported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// Key/value keys.
    KvKeys(Vec<String>),
    /// Every key/value key starting with this prefix.
    KvPrefix(String),
    /// The whole key/value cache.
    KvAll,
    /// Rows of a digest-keyed cache.
    Digests(CacheKind, Vec<KeyDigest>),
}

impl Skipped {
    fn keys(&self) -> usize {
        match self {
            Skipped::KvKeys(keys) => keys.len(),
            Skipped::Digests(_, digests) => digests.len(),
            Skipped::KvPrefix(_) | Skipped::KvAll => 1,
        }
    }

    fn apply(&self, conn: &mut PgConnection) -> QueryResult<()> {
        match self {
            Skipped::KvKeys(keys) => {
                diesel::delete(cache_entries::table.filter(cache_entries::key.eq_any(keys)))
                    .execute(conn)?;
            }
            Skipped::KvPrefix(prefix) => {
                kv_delete_prefix(conn, prefix)?;
            }
            Skipped::KvAll => {
                diesel::delete(cache_entries::table).execute(conn)?;
            }
            Skipped::Digests(kind, digests) => {
                delete_digests(conn, *kind, digests)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub(crate) struct SkippedWrites {
    pending: AtomicBool,
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Skipped>,
    keys: usize,
}

impl SkippedWrites {
    /// True while something waits for replay: one atomic load on the request path.
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    pub(crate) fn remember(&self, skipped: Skipped) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.keys += skipped.keys();
        queue.items.push_back(skipped);
        let mut dropped = 0;
        while queue.keys > MAX_SKIPPED_KEYS && queue.items.len() > 1 {
            let oldest = queue.items.pop_front().expect("more than one item");
            queue.keys -= oldest.keys();
            dropped += oldest.keys();
        }
        if dropped > 0 {
            tracing::error!(
                dropped,
                "pgcache: too many writes skipped in fail-open mode; the oldest may be read stale until their TTL ends"
            );
        }
        self.pending.store(true, Ordering::Release);
    }

    /// Applies everything remembered, in order, on `conn`. Callers that arrive
    /// meanwhile wait, so none reads an entry whose delete is still queued. What
    /// fails stays queued.
    pub(crate) fn replay(&self, conn: &mut PgConnection) -> QueryResult<()> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(next) = queue.items.front() {
            next.apply(conn)?;
            let done = queue.items.pop_front().expect("front exists");
            queue.keys -= done.keys();
        }
        self.pending.store(false, Ordering::Release);
        Ok(())
    }

    #[cfg(test)]
    fn queued(&self) -> Vec<Skipped> {
        self.queue.lock().unwrap().items.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_skipped_keys_are_dropped_past_the_bound() {
        let skipped = SkippedWrites::default();
        assert!(!skipped.is_pending());
        skipped.remember(Skipped::KvKeys(vec!["first".into()]));
        skipped.remember(Skipped::KvKeys(vec!["k".into(); MAX_SKIPPED_KEYS - 1]));
        assert!(skipped.is_pending());
        assert_eq!(skipped.queued().len(), 2);
        skipped.remember(Skipped::KvAll);
        let queued = skipped.queued();
        assert_eq!(queued.len(), 2, "the first one was dropped");
        assert_eq!(queued[1], Skipped::KvAll);
    }
}
