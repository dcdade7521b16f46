//! A counter that many threads add to without sharing a cache line: each thread
//! adds to one of a few padded stripes, and a read sums them.
//!
//! A near-cache hit costs a few hundred nanoseconds; one `fetch_add` on a counter
//! that every core writes costs as much again once two cores take turns owning its
//! line, so the hit path's counters (hits and misses per cache, and the near cache's
//! own) are striped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per counter: more than the cores a cache's hot path usually shares.
const STRIPES: usize = 8;

/// One stripe, alone on its cache line (128 bytes: two lines are prefetched
/// together on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// A monotonic counter: [`add`](Self::add) from any thread, [`get`](Self::get)
/// the sum. A read racing adds sees some of them; each stripe only grows, so a
/// later read never sees less than an earlier one.
#[derive(Debug, Default)]
pub(crate) struct StripedCounter {
    stripes: [Stripe; STRIPES],
}

/// The stripe of the calling thread: threads take stripes in turn as they first
/// count.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

impl StripedCounter {
    pub(crate) fn add(&self, n: u64) {
        self.stripes[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_from_many_threads_are_all_counted() {
        let counter = StripedCounter::default();
        std::thread::scope(|s| {
            for _ in 0..2 * STRIPES {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.add(1);
                    }
                });
            }
        });
        assert_eq!(counter.get(), 2 * STRIPES as u64 * 1000);
    }
}
