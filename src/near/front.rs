//! Each thread's front of the near caches: a few of the entries it last read from
//! L1, served with no lock and no write to memory another core reads.
//!
//! L1 is one map per cache behind sharded locks; a hot key's shard lock and its
//! entry's reference count are written by every hit, so cores that hit the same
//! key take turns owning those cache lines and a hit costs several times what it
//! costs on one core. The front holds its own reference to each value and proves
//! a copy still current by reading (never writing) the shared state:
//!
//! - a copy is made only of an L1 entry filled under the generation of its slot
//!   and the epoch that are current now, both read *before* the L1 lookup; any
//!   invalidation of its key bumps that slot's generation (and a lost poller or a
//!   whole-cache invalidation the epoch), so a copy is served only while neither
//!   has moved since: an invalidation that bumped before the reads made the entry
//!   unfit to copy, one that bumps after fails every later check;
//! - the copy keeps the entry's local expiry, and the caller checks that L1 may
//!   serve at all (the poll is recent) before asking the front.
//!
//! Bounded: [`SLOTS`] copies per thread, over all managers, each a reference to a
//! value L1 holds or held (a copy keeps a value L1 evicted alive until it is
//! replaced, fails a check, or the thread ends).

use std::cell::RefCell;
use std::time::Instant;

use super::{NearKey, NearValue};
use crate::kind::CacheKind;

/// Copies per thread (direct-mapped by key hash).
const SLOTS: usize = 64;

/// What a copy was made under, and what proves it still current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    /// The `NearCaches` it was copied from (an id unique in the process).
    pub(super) owner: u64,
    pub(super) generation: u64,
    pub(super) epoch: u64,
}

/// A copy this thread holds, and what proves it current.
struct Held {
    kind: CacheKind,
    key: NearKey,
    value: NearValue,
    expires: Instant,
    stamp: Stamp,
}

thread_local! {
    static FRONT: RefCell<[Option<Held>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

fn index(hash: u64, owner: u64) -> usize {
    // The slot-selecting low bits of `hash` are the generation slot's: take high ones.
    ((hash >> 40) ^ owner) as usize % SLOTS
}

/// `read` of this thread's copy of `key`, if it has one made under `stamp` (the
/// current generation of the key's slot and epoch) that lives past `now`; else
/// `read` back.
pub(super) fn read<R, F: FnOnce(&NearValue) -> R>(
    kind: CacheKind,
    key: &[u8],
    hash: u64,
    stamp: Stamp,
    now: Instant,
    read: F,
) -> Result<R, F> {
    FRONT.with(|front| {
        let Ok(front) = front.try_borrow() else {
            return Err(read);
        };
        match &front[index(hash, stamp.owner)] {
            Some(copy)
                if copy.stamp == stamp
                    && copy.kind == kind
                    && copy.expires > now
                    && *copy.key == *key =>
            {
                Ok(read(&copy.value))
            }
            _ => Err(read),
        }
    })
}

/// Keeps a copy of an L1 entry found under `stamp`.
pub(super) fn keep(
    kind: CacheKind,
    key: &[u8],
    hash: u64,
    stamp: Stamp,
    value: NearValue,
    expires: Instant,
) {
    let copy = Some(Held {
        kind,
        key: key.into(),
        value,
        expires,
        stamp,
    });
    // The copy it replaces is dropped after the borrow ends (a value's drop is the
    // user's code); a value's conversion reading the front meanwhile skips the copy.
    let _replaced = FRONT.with(|front| {
        let mut front = front.try_borrow_mut().ok()?;
        std::mem::replace(&mut front[index(hash, stamp.owner)], copy)
    });
}
