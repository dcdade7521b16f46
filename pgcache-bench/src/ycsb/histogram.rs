//! Latencies in log-linear buckets: constant memory however many operations a
//! fast system completes, within 0.2 % of the exact value.

/// Values below this are counted exactly; above, with 9 bits of mantissa.
const LINEAR: u64 = 1024;
const MANTISSA_BITS: u32 = 9;

#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

fn bucket(nanos: u64) -> usize {
    if nanos < LINEAR {
        return nanos as usize;
    }
    let shift = 63 - nanos.leading_zeros() - MANTISSA_BITS;
    // shift >= 1 here; the mantissa is in 512..1024.
    (shift as usize) * 512 + (nanos >> shift) as usize
}

/// The middle of a bucket's range, in nanoseconds.
fn value(bucket: usize) -> u64 {
    if bucket < LINEAR as usize {
        return bucket as u64;
    }
    let shift = (bucket / 512 - 1) as u32;
    let mantissa = (bucket % 512 + 512) as u64;
    (mantissa << shift) + ((1u64 << shift) >> 1)
}

impl Histogram {
    pub(crate) fn record(&mut self, nanos: u64) {
        let b = bucket(nanos);
        if b >= self.counts.len() {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] += 1;
        self.total += 1;
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile in microseconds, `None` without samples.
    pub(crate) fn quantile_us(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((self.total - 1) as f64 * q).round() as u64;
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Some(value(b) as f64 / 1000.0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_values_within_two_per_mille() {
        for v in [0u64, 1, 1023, 1024, 1500, 65_537, 1_000_000, 123_456_789] {
            let back = value(bucket(v));
            let error = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(error <= 0.002, "{v} -> {back}");
        }
        assert!(bucket(1024) > bucket(1023));
    }

    #[test]
    fn quantiles_pick_the_ranked_sample() {
        let mut h = Histogram::default();
        // 0, 1, ..., 100 µs: the median is 50, the 99th percentile 99.
        for v in 0..=100u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 101);
        let p50 = h.quantile_us(0.5).unwrap();
        assert!((p50 - 50.0).abs() < 0.2, "{p50}");
        let p99 = h.quantile_us(0.99).unwrap();
        assert!((p99 - 99.0).abs() < 0.3, "{p99}");
        assert_eq!(Histogram::default().quantile_us(0.5), None);
    }
}
