//! Key/value tags in L1: an entry read with tags is not served once one of them
//! is invalidated after its reader's `SELECT` began, without looking for the
//! entries that carry it.
//!
//! Tags hash to slots. Each invalidation applied (this process's own, or one the
//! poller read as `kv_tags`, see `protocol.rs`) advances a clock and marks its
//! tag's slot with the new time; a reader notes the time before its `SELECT`
//! (`NearCaches::ticket`), and its entry is served only while none of its tags'
//! slots bears a later mark. A mark made before the note came from a poll that
//! ended before the `SELECT` began: the `SELECT` then saw the invalidation and
//! did not return the entry. Tags sharing a slot only cost misses.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Slots tags hash to (a power of two, within `u16`).
const TAG_SLOTS: usize = 4096;

/// The slots of an entry's tags.
#[derive(Debug, Clone)]
pub(crate) struct TagSlots(Arc<[u16]>);

impl TagSlots {
    /// The slots of `tags`; `None` for none.
    pub(crate) fn of<'t>(tags: impl ExactSizeIterator<Item = &'t str>) -> Option<Self> {
        if tags.len() == 0 {
            return None;
        }
        Some(TagSlots(tags.map(slot).collect()))
    }
}

fn slot(tag: &str) -> u16 {
    let mut hasher = DefaultHasher::new();
    tag.hash(&mut hasher);
    (hasher.finish() as usize & (TAG_SLOTS - 1)) as u16
}

/// An entry's tags in L1: their slots, and the clock its reader noted.
#[derive(Clone)]
pub(super) struct TagMark {
    slots: TagSlots,
    read_after: u64,
}

impl TagMark {
    pub(super) fn new(slots: TagSlots, read_after: u64) -> Self {
        TagMark { slots, read_after }
    }
}

/// The clock and the slots' marks of one manager's near caches.
pub(super) struct TagClock {
    now: AtomicU64,
    marks: Box<[AtomicU64]>,
}

impl TagClock {
    pub(super) fn new() -> Self {
        TagClock {
            now: AtomicU64::new(0),
            marks: (0..TAG_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The time a reader notes before its `SELECT`.
    pub(super) fn note(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Marks `tag`'s slot with a new time.
    pub(super) fn invalidate(&self, tag: &str) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.marks[usize::from(slot(tag))].fetch_max(now, Ordering::SeqCst);
    }

    /// Whether an entry with `tags` may be served: none invalidated since its note.
    pub(super) fn hold(&self, tags: &Option<TagMark>) -> bool {
        tags.as_ref().is_none_or(|mark| {
            mark.slots.0.iter().all(|&slot| {
                self.marks[usize::from(slot)].load(Ordering::SeqCst) <= mark.read_after
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use chrono::Utc;

    use super::super::{protocol, NearCaches, Ticket};
    use super::*;
    use crate::config::{CacheConfig, NearCache};
    use crate::kind::CacheKind;

    fn mark(clock: &TagClock, tags: &[&str]) -> Option<TagMark> {
        TagSlots::of(tags.iter().copied()).map(|slots| TagMark::new(slots, clock.note()))
    }

    #[test]
    fn an_invalidated_tag_stops_only_what_was_read_with_it_before() {
        let clock = TagClock::new();
        assert_ne!(slot("t1"), slot("t2"), "the test's tags share no slot");
        let (both, other, none) = (mark(&clock, &["t1", "t2"]), mark(&clock, &["t2"]), None);
        clock.invalidate("t1");
        assert!(!clock.hold(&both));
        assert!(clock.hold(&other));
        assert!(clock.hold(&none));
        assert!(clock.hold(&mark(&clock, &["t1"])), "read after it");
    }

    #[test]
    fn a_read_that_raced_a_tag_invalidation_is_not_served() {
        let clock = TagClock::new();
        // Noted before the SELECT, which still found the entry live; the
        // invalidation is applied before the entry is kept.
        let read_after = clock.note();
        clock.invalidate("t");
        let kept = TagSlots::of(["t"].into_iter()).map(|s| TagMark::new(s, read_after));
        assert!(!clock.hold(&kept));
    }

    /// A near cache for kv, current, holding `key` read with `tags`.
    fn holding(near: &NearCaches, key: &[u8], tags: &[&str]) {
        let ticket: Ticket = near.ticket(CacheKind::Kv, key).unwrap();
        let ticket = ticket.carrying(TagSlots::of(tags.iter().copied()));
        let expires = Utc::now() + chrono::Duration::hours(1);
        near.fill(CacheKind::Kv, ticket, key.into(), Arc::new(()), expires, 1);
        assert!(near.get(CacheKind::Kv, key, |_| ()).is_some());
    }

    #[test]
    fn a_logged_tag_invalidation_stops_serving_and_all_tags_stop_every_tagged_entry() {
        let config = CacheConfig::builder()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .build()
            .unwrap();
        let near = NearCaches::new(&config).unwrap();
        near.baseline_taken(Instant::now(), Some(Utc::now().timestamp_micros()));
        holding(&near, b"a", &["t1"]);
        holding(&near, b"b", &["t2"]);
        near.apply(protocol::TAG_LOG_NAME, Some(&["t1".to_owned()]));
        assert!(near.get(CacheKind::Kv, b"a", |_| ()).is_none());
        assert!(
            near.get(CacheKind::Kv, b"b", |_| ()).is_some(),
            "another tag's entry"
        );
        near.apply(protocol::TAG_LOG_NAME, None);
        assert!(near.get(CacheKind::Kv, b"b", |_| ()).is_none(), "every tag");
    }
}
