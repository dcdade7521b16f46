//! Connection affinity: a thread gets back the connection it used last.
//!
//! r2d2 hands out whichever idle connection is on top of its stack, so with several
//! threads each operation meets another connection, and so another server process:
//! the kernel keeps moving threads and backends between cores to follow their
//! partners. Measured on 2 cores with 4 threads doing kv gets: through the shared
//! stack about 0.55-0.75x the throughput of the same gets with one connection held
//! per thread, with 30-90x the CPU migrations. So a connection given back by a cache
//! operation is parked in a slot of its thread's instead (HikariCP's thread-local
//! hint, stealable): the thread's next operation takes it from there. Parked
//! connections stay available to everyone: a checkout that finds neither its own
//! slot filled nor an idle connection in r2d2 takes one from another slot, and
//! while any checkout waits in r2d2, connections go back to r2d2, not to slots. A
//! connection parked unused for [`PARK_FOR`] goes back to r2d2 (the flusher
//! sweeps), where its idle timeout applies as before.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

/// What a pool hands out, as parking needs it: a handle that gives the connection
/// back to its pool when dropped, and can tell whether that connection is broken.
pub(crate) trait Connection: DerefMut {
    /// Whether the connection is known to be unusable (it then goes back to the
    /// pool, which discards it, rather than into a slot).
    fn is_broken(&mut self) -> bool;
}

/// How long a connection stays parked unused before it goes back to the pool.
pub(crate) const PARK_FOR: Duration = Duration::from_secs(1);

/// Hands out each thread's slot number, in the order threads first check out.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// This thread's slot number (any pool: taken modulo its slot count).
fn own_slot() -> usize {
    SLOT.with(|slot| {
        slot.get().unwrap_or_else(|| {
            let n = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
            slot.set(Some(n));
            n
        })
    })
}

/// A parked connection and when it was parked.
type Parked<C> = Option<(C, Instant)>;

/// The slots of one pool.
pub(crate) struct Parking<C> {
    slots: Box<[Mutex<Parked<C>>]>,
    /// Checkouts waiting in r2d2: connections given back go there meanwhile.
    waiting: AtomicUsize,
}

impl<C> std::fmt::Debug for Parking<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("slots", &self.slots.len())
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock<C>(slot: &Mutex<Parked<C>>) -> Option<std::sync::MutexGuard<'_, Parked<C>>> {
    match slot.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        // Someone else is at this slot right now: look elsewhere, never wait.
        Err(TryLockError::WouldBlock) => None,
    }
}

impl<C: Connection> Parking<C> {
    /// One slot per connection the pool may hold.
    pub(crate) fn new(max_size: u32) -> Self {
        Parking {
            slots: (0..max_size.max(1)).map(|_| Mutex::new(None)).collect(),
            waiting: AtomicUsize::new(0),
        }
    }

    fn own(&self) -> &Mutex<Parked<C>> {
        &self.slots[own_slot() % self.slots.len()]
    }

    /// The connection this thread parked, if it is still there.
    pub(crate) fn take_own(&self) -> Option<C> {
        lock(self.own())?.take().map(|(conn, _)| conn)
    }

    /// A connection another thread parked.
    pub(crate) fn steal(&self) -> Option<C> {
        self.slots
            .iter()
            .find_map(|slot| lock(slot)?.take().map(|(conn, _)| conn))
    }

    /// Marks a checkout as waiting in r2d2 until the guard is dropped.
    pub(crate) fn wait(&self) -> Waiting<'_, C> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(self)
    }

    /// Parks `conn` in this thread's slot, or gives it back to r2d2 (drops it) when
    /// the slot is taken or a checkout is waiting there.
    fn park(&self, conn: C) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return;
        }
        let slot = self.own();
        let Some(mut parked) = lock(slot) else {
            return;
        };
        if parked.is_some() {
            return;
        }
        *parked = Some((conn, Instant::now()));
        drop(parked);
        // A checkout that began to wait meanwhile may have looked at the slots
        // before this one was filled: it waits in r2d2, so the connection goes there.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            drop(lock(slot).and_then(|mut parked| parked.take()));
        }
    }

    /// Gives back to r2d2 every connection parked for longer than `idle`.
    pub(crate) fn sweep(&self, idle: Duration) {
        for slot in self.slots.iter() {
            let Some(mut parked) = lock(slot) else {
                continue;
            };
            if parked.as_ref().is_some_and(|(_, at)| at.elapsed() >= idle) {
                drop(parked.take());
            }
        }
    }

    /// How many connections are parked now.
    pub(crate) fn parked(&self) -> u32 {
        self.slots
            .iter()
            .filter(|slot| {
                slot.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some()
            })
            .count() as u32
    }
}

/// A checkout waiting in r2d2 (see [`Parking::wait`]).
#[derive(Debug)]
pub(crate) struct Waiting<'a, C>(&'a Parking<C>);

impl<C> Drop for Waiting<'_, C> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection checked out for a cache operation: parked in its thread's slot when
/// dropped (unless broken), when it came from a pool that parks.
pub(crate) struct Held<'a, C: Connection> {
    conn: Option<C>,
    parking: Option<&'a Parking<C>>,
}

impl<C: Connection> std::fmt::Debug for Held<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("parks", &self.parking.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a, C: Connection> Held<'a, C> {
    pub(crate) fn new(conn: C, parking: Option<&'a Parking<C>>) -> Self {
        Held {
            conn: Some(conn),
            parking,
        }
    }

    /// The connection itself, never parked: for callers that keep it.
    pub(crate) fn into_pooled(mut self) -> C {
        self.conn.take().expect("held until dropped")
    }
}

impl<C: Connection> Deref for Held<'_, C> {
    type Target = C::Target;

    fn deref(&self) -> &C::Target {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl<C: Connection> DerefMut for Held<'_, C> {
    fn deref_mut(&mut self) -> &mut C::Target {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl<C: Connection> Drop for Held<'_, C> {
    fn drop(&mut self) {
        let (Some(mut conn), Some(parking)) = (self.conn.take(), self.parking) else {
            return;
        };
        // A broken connection goes to r2d2, which discards it.
        if !std::thread::panicking() && !conn.is_broken() {
            parking.park(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_per_thread_and_stable() {
        let mine = own_slot();
        assert_eq!(own_slot(), mine);
        let theirs = std::thread::spawn(own_slot).join().unwrap();
        assert_ne!(theirs, mine);
    }

    /// A connection for the tests: a number, broken or not.
    struct Fake(u32, bool);

    impl Deref for Fake {
        type Target = u32;
        fn deref(&self) -> &u32 {
            &self.0
        }
    }

    impl DerefMut for Fake {
        fn deref_mut(&mut self) -> &mut u32 {
            &mut self.0
        }
    }

    impl Connection for Fake {
        fn is_broken(&mut self) -> bool {
            self.1
        }
    }

    #[test]
    fn a_connection_given_back_is_parked_for_its_thread_unless_broken() {
        let parking = Parking::new(4);
        drop(Held::new(Fake(1, false), Some(&parking)));
        assert_eq!(parking.parked(), 1);
        assert_eq!(parking.take_own().map(|c| c.0), Some(1));
        drop(Held::new(Fake(2, true), Some(&parking)));
        assert_eq!(parking.parked(), 0, "a broken connection was parked");
    }

    #[test]
    fn another_threads_parked_connection_can_be_stolen() {
        let parking = Parking::new(4);
        std::thread::scope(|s| {
            s.spawn(|| drop(Held::new(Fake(7, false), Some(&parking))));
        });
        assert!(parking.take_own().is_none());
        assert_eq!(parking.steal().map(|c| c.0), Some(7));
    }

    #[test]
    fn an_empty_parking_hands_out_nothing() {
        let parking = Parking::<Fake>::new(4);
        assert!(parking.take_own().is_none());
        assert!(parking.steal().is_none());
        assert_eq!(parking.parked(), 0);
    }
}
