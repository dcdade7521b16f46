//! In-process latency of cache queries over a sliding window (what the
//! `slow_queries` health alert judges): a ring of per-minute fixed-bucket histograms
//! of atomics. Recording a sample is a relaxed `fetch_add` into a slot already
//! stamped with its minute; the first sample of a new minute clears the slot that
//! minute reuses, under a lock taken once a minute (the ring turns lazily, no thread
//! needed), and publishes the new stamp only once the slot is clear, so a sample
//! recorded beside the clearing waits for it instead of being wiped by it. A reader
//! sums the slots still in the window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Minutes of samples the window holds: the current minute and the ones before it.
const WINDOW_MINUTES: usize = 5;
/// How far back the latency window reaches (at most; the current minute is partial).
pub(crate) const WINDOW: Duration = Duration::from_secs(60 * WINDOW_MINUTES as u64);

/// Sub-buckets per power of two: bucket bounds grow by about 19 %, fine enough to
/// tell 8 ms from 12 ms.
const SUB_BITS: u32 = 2;
const SUBS: usize = 1 << SUB_BITS;
/// Powers of two covered, in microseconds: up to 2^28 µs (about 4.5 minutes); longer
/// samples land in the last bucket.
const OCTAVES: usize = 28;
const BUCKETS: usize = OCTAVES * SUBS;

/// The bucket holding `micros`: buckets `0..SUBS` are exact microseconds, above that
/// the octave (position of the highest bit) and the next `SUB_BITS` bits.
fn bucket(micros: u64) -> usize {
    if micros < SUBS as u64 {
        return micros as usize;
    }
    let octave = 63 - micros.leading_zeros(); // >= SUB_BITS
    let sub = (micros >> (octave - SUB_BITS)) as usize & (SUBS - 1);
    let index = (octave - SUB_BITS + 1) as usize * SUBS + sub;
    index.min(BUCKETS - 1)
}

/// The largest value, in microseconds, that falls into bucket `index`.
fn upper_bound(index: usize) -> u64 {
    if index < SUBS {
        return index as u64;
    }
    let octave = (index / SUBS) as u32 + SUB_BITS - 1;
    let sub = (index % SUBS) as u64;
    let low = (1u64 << octave) | (sub << (octave - SUB_BITS));
    low + (1u64 << (octave - SUB_BITS)) - 1
}

/// One minute of samples.
#[derive(Debug)]
struct Slot {
    /// The minute (since the window's epoch) plus one whose samples the slot holds;
    /// 0 for none yet.
    stamp: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// The latency of this process's cache queries over the last [`WINDOW`].
#[derive(Debug)]
pub(crate) struct LatencyWindow {
    epoch: Instant,
    slots: [Slot; WINDOW_MINUTES],
    /// Held while a slot turns over to a new minute.
    turning: Mutex<()>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            epoch: Instant::now(),
            slots: std::array::from_fn(|_| Slot {
                stamp: AtomicU64::new(0),
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
            turning: Mutex::new(()),
        }
    }
}

/// The samples of a window, summed.
#[derive(Debug)]
pub(crate) struct Histogram {
    counts: [u64; BUCKETS],
}

impl LatencyWindow {
    /// The minute `at` falls in, counted from the window's creation.
    fn minute(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_secs() / 60
    }

    /// Records a query that took `elapsed` and ended at `finished` (the caller has
    /// just read the clock for `elapsed`; no second read).
    pub(crate) fn record(&self, finished: Instant, elapsed: Duration) {
        self.record_in(self.minute(finished), elapsed);
    }

    fn record_in(&self, minute: u64, elapsed: Duration) {
        let slot = &self.slots[minute as usize % WINDOW_MINUTES];
        let stamp = minute + 1;
        // A slot of a newer minute takes a late sample of an older one as it is.
        if slot.stamp.load(Ordering::Acquire) < stamp {
            // A poisoned lock guards nothing but the clearing: go on.
            let _turning = self
                .turning
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if slot.stamp.load(Ordering::Acquire) < stamp {
                for b in &slot.buckets {
                    b.store(0, Ordering::Relaxed);
                }
                // Release after the clearing: whoever sees the new stamp adds to a
                // clear slot.
                slot.stamp.store(stamp, Ordering::Release);
            }
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        slot.buckets[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The samples of the last [`WINDOW`].
    pub(crate) fn histogram(&self) -> Histogram {
        self.histogram_in(self.minute(Instant::now()))
    }

    fn histogram_in(&self, minute: u64) -> Histogram {
        let mut counts = [0; BUCKETS];
        let oldest = (minute + 1).saturating_sub(WINDOW_MINUTES as u64 - 1);
        for slot in &self.slots {
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp != 0 && (oldest..=minute + 1).contains(&stamp) {
                for (count, b) in counts.iter_mut().zip(&slot.buckets) {
                    *count += b.load(Ordering::Relaxed);
                }
            }
        }
        Histogram { counts }
    }
}

impl Histogram {
    /// Adds another window's samples (another shard's), for one quantile over both.
    pub(crate) fn add(&mut self, other: &Histogram) {
        for (count, more) in self.counts.iter_mut().zip(other.counts) {
            *count += more;
        }
    }

    /// How many samples there are.
    pub(crate) fn samples(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0 < q <= 1), rounded up to its bucket's upper bound;
    /// `None` without samples.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.samples();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_micros(upper_bound(index)));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_into_a_bucket_whose_bounds_hold_it() {
        for micros in (0..5000).chain([9_999, 10_000, 12_345, 1 << 20, (1 << 28) - 1]) {
            let index = bucket(micros);
            assert!(micros <= upper_bound(index), "{micros} in {index}");
            if index > 0 {
                assert!(micros > upper_bound(index - 1), "{micros} in {index}");
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn p95_reports_the_slow_tail() {
        let window = LatencyWindow::default();
        assert_eq!(window.histogram_in(0).quantile(0.95), None);
        for _ in 0..90 {
            window.record_in(0, Duration::from_micros(500));
        }
        for _ in 0..10 {
            window.record_in(0, Duration::from_millis(20));
        }
        let histogram = window.histogram_in(0);
        let p95 = histogram.quantile(0.95).unwrap();
        assert!(p95 >= Duration::from_millis(20) && p95 < Duration::from_millis(25));
        let p50 = histogram.quantile(0.5).unwrap();
        assert!(p50 >= Duration::from_micros(500) && p50 < Duration::from_micros(600));
        assert_eq!(histogram.samples(), 100);
    }

    #[test]
    fn old_samples_leave_the_window() {
        let window = LatencyWindow::default();
        // A slow spell in minute 10, then fast queries every minute after it.
        for _ in 0..100 {
            window.record_in(10, Duration::from_millis(50));
        }
        for minute in 11..=20 {
            window.record_in(minute, Duration::from_micros(300));
            let histogram = window.histogram_in(minute);
            let slow_still_in = minute < 10 + WINDOW_MINUTES as u64;
            assert_eq!(
                histogram.samples(),
                100 * u64::from(slow_still_in)
                    + (minute - 10).min(WINDOW_MINUTES as u64 - u64::from(slow_still_in)),
                "minute {minute}"
            );
            let p95 = histogram.quantile(0.95).unwrap();
            assert_eq!(
                p95 >= Duration::from_millis(50),
                slow_still_in,
                "minute {minute}"
            );
        }
    }

    #[test]
    fn samples_recorded_while_a_minute_begins_are_all_kept() {
        // Threads whose queries end together (all released by one lock) record the
        // first samples of a minute at once; none may be wiped by the slot's
        // clearing. Many rounds, each a new minute reusing a slot full of old ones.
        const THREADS: u64 = 4;
        const EACH: u64 = 50;
        let window = LatencyWindow::default();
        for minute in 0..200u64 {
            let start = std::sync::Barrier::new(THREADS as usize);
            std::thread::scope(|scope| {
                for _ in 0..THREADS {
                    scope.spawn(|| {
                        start.wait();
                        for _ in 0..EACH {
                            window.record_in(minute, Duration::from_millis(30));
                        }
                    });
                }
            });
            assert_eq!(
                window.histogram_in(minute).samples(),
                THREADS * EACH * (minute + 1).min(WINDOW_MINUTES as u64),
                "minute {minute}"
            );
        }
    }

    #[test]
    fn a_reader_ignores_minutes_nobody_recorded_since() {
        let window = LatencyWindow::default();
        window.record_in(3, Duration::from_millis(50));
        assert_eq!(window.histogram_in(3).samples(), 1);
        assert_eq!(window.histogram_in(7).samples(), 1);
        // Minute 8 reuses no slot yet, but minute 3 is out of its window.
        assert_eq!(window.histogram_in(8).samples(), 0);
        assert_eq!(window.histogram_in(8).quantile(0.95), None);
    }
}
