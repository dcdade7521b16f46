//! In-process latency of cache queries: a fixed-bucket histogram of atomics, so
//! recording a sample is two relaxed `fetch_add`s and never takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: bucket bounds grow by about 19 %, fine enough to
/// tell 8 ms from 12 ms.
const SUB_BITS: u32 = 2;
const SUBS: usize = 1 << SUB_BITS;
/// Powers of two covered, in microseconds: up to 2^28 µs (about 4.5 minutes); longer
/// samples land in the last bucket.
const OCTAVES: usize = 28;
const BUCKETS: usize = OCTAVES * SUBS;

#[derive(Debug)]
pub(crate) struct LatencyRecorder {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

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

impl LatencyRecorder {
    pub(crate) fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// How many samples were recorded.
    pub(crate) fn samples(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0 < q <= 1), rounded up to its bucket's upper bound;
    /// `None` without samples.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
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
        let recorder = LatencyRecorder::default();
        assert_eq!(recorder.quantile(0.95), None);
        for _ in 0..90 {
            recorder.record(Duration::from_micros(500));
        }
        for _ in 0..10 {
            recorder.record(Duration::from_millis(20));
        }
        let p95 = recorder.quantile(0.95).unwrap();
        assert!(p95 >= Duration::from_millis(20) && p95 < Duration::from_millis(25));
        let p50 = recorder.quantile(0.5).unwrap();
        assert!(p50 >= Duration::from_micros(500) && p50 < Duration::from_micros(600));
        assert_eq!(recorder.samples(), 100);
    }
}
