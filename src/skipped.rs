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
use diesel::QueryResult;

/// Most keys (or prefixes) remembered for replay.
pub const MAX_SKIPPED_KEYS: usize = 10_000;

/// A delete run on a connection.
type Undo = Box<dyn Fn(&mut PgConnection) -> QueryResult<()> + Send>;

/// The delete that undoes a skipped write or delete: made by the table that skipped
/// it, run by the engine once the database answers (plumbing of
/// [`Cache`](crate::Cache), not re-exported).
pub struct Skipped {
    /// How many keys (or prefixes) it covers, for the bound.
    keys: usize,
    undo: Undo,
}

impl Skipped {
    /// An undo covering `keys` keys.
    pub(crate) fn new(
        keys: usize,
        undo: impl Fn(&mut PgConnection) -> QueryResult<()> + Send + 'static,
    ) -> Self {
        Skipped {
            keys,
            undo: Box::new(undo),
        }
    }

    fn keys(&self) -> usize {
        self.keys
    }

    fn apply(&self, conn: &mut PgConnection) -> QueryResult<()> {
        (self.undo)(conn)
    }
}

impl std::fmt::Debug for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Skipped")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
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
    fn queued_keys(&self) -> Vec<usize> {
        self.queue
            .lock()
            .unwrap()
            .items
            .iter()
            .map(Skipped::keys)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undo(keys: usize) -> Skipped {
        Skipped::new(keys, |_| Ok(()))
    }

    #[test]
    fn the_oldest_skipped_keys_are_dropped_past_the_bound() {
        let skipped = SkippedWrites::default();
        assert!(!skipped.is_pending());
        skipped.remember(undo(1));
        skipped.remember(undo(MAX_SKIPPED_KEYS - 1));
        assert!(skipped.is_pending());
        assert_eq!(skipped.queued_keys(), vec![1, MAX_SKIPPED_KEYS - 1]);
        skipped.remember(undo(1));
        assert_eq!(
            skipped.queued_keys(),
            vec![MAX_SKIPPED_KEYS - 1, 1],
            "the first one was dropped"
        );
    }
}
