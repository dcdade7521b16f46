//! The YCSB request generators (Cooper et al., SoCC 2010; Gray et al., "Quickly
//! generating billion-record synthetic databases", SIGMOD 1994): Zipfian over the
//! record count, scrambled over the key space, and "latest".

/// YCSB's Zipfian constant θ.
pub(crate) const ZIPFIAN_CONSTANT: f64 = 0.99;

/// ζ(n, θ) = Σ_{i=1..n} 1/i^θ, the Zipfian normalisation (the generalised harmonic
/// number H(n, θ)).
pub(crate) fn zeta(n: u64, theta: f64) -> f64 {
    zeta_from(0, n, theta, 0.0)
}

/// ζ(n, θ) from ζ(`from`, θ) = `sum`, adding the terms `from + 1..=n`.
fn zeta_from(from: u64, n: u64, theta: f64, sum: f64) -> f64 {
    (from + 1..=n).fold(sum, |s, i| s + 1.0 / (i as f64).powf(theta))
}

/// The share of requests a Zipfian over `n` items sends to its `top` most popular
/// ones: ζ(top, θ) / ζ(n, θ).
pub(crate) fn expected_top_share(top: u64, n: u64, theta: f64) -> f64 {
    zeta(top, theta) / zeta(n, theta)
}

/// A xorshift64* stream: cheap, and a thread's own.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Ranks 0..n, rank 0 the most popular, P(rank i) ∝ 1/(i+1)^θ: Gray's algorithm as
/// YCSB's `ZipfianGenerator` has it, with ζ(n) kept up to date incrementally when
/// the item count grows (for "latest").
#[derive(Debug, Clone)]
pub(crate) struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    zeta2: f64,
    eta: f64,
}

impl Zipfian {
    pub(crate) fn new(items: u64, theta: f64) -> Self {
        let zeta2 = zeta(2, theta);
        let mut z = Zipfian {
            items: 0,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan: 0.0,
            zeta2,
            eta: 0.0,
        };
        z.grow(items.max(1));
        z
    }

    /// Extends the item count to `items` (never shrinks).
    fn grow(&mut self, items: u64) {
        if items <= self.items {
            return;
        }
        self.zetan = zeta_from(self.items, items, self.theta, self.zetan);
        self.items = items;
        self.eta =
            (1.0 - (2.0 / items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan);
    }

    /// A rank in 0..items.
    pub(crate) fn next(&mut self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }
}

/// Zipfian ranks spread over the key numbers 0..n by a bijection, so the popular
/// records are scattered across the key space. (YCSB hashes the rank modulo n,
/// which merges a few ranks; a bijection keeps each record's Zipfian share exact.)
#[derive(Debug, Clone)]
pub(crate) struct ScrambledZipfian {
    zipfian: Zipfian,
    items: u64,
    multiplier: u64,
}

impl ScrambledZipfian {
    pub(crate) fn new(items: u64, theta: f64) -> Self {
        let items = items.max(1);
        // An odd multiplier coprime to n makes rank -> rank * m mod n a bijection.
        let mut multiplier = (0x9E37_79B9_7F4A_7C15 % items) | 1;
        while gcd(multiplier, items) != 1 {
            multiplier += 2;
        }
        ScrambledZipfian {
            zipfian: Zipfian::new(items, theta),
            items,
            multiplier,
        }
    }

    /// The key number of the next request, and its popularity rank.
    pub(crate) fn next(&mut self, rng: &mut Rng) -> (u64, u64) {
        let rank = self.zipfian.next(rng);
        let key =
            ((u128::from(rank) * u128::from(self.multiplier)) % u128::from(self.items)) as u64;
        (key, rank)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// YCSB's "latest": the most recently inserted records are the most popular
/// (`latest - zipfian(count)`), the count growing as inserts are acknowledged.
#[derive(Debug, Clone)]
pub(crate) struct Latest {
    zipfian: Zipfian,
}

impl Latest {
    pub(crate) fn new(items: u64, theta: f64) -> Self {
        Latest {
            zipfian: Zipfian::new(items, theta),
        }
    }

    /// A key number among the `count` records inserted so far.
    pub(crate) fn next(&mut self, count: u64, rng: &mut Rng) -> u64 {
        let count = count.max(1);
        self.zipfian.grow(count);
        // The count only grows, but another thread's acknowledged insert may have
        // raised it past what this generator was built for: clamp.
        let back = self.zipfian.next(rng).min(count - 1);
        count - 1 - back
    }
}

/// The share of `draws` requests of a scrambled Zipfian over `items` records that
/// go to its hottest `top` records (by popularity rank).
pub(crate) fn measured_top_share(items: u64, top: u64, draws: u64, seed: u64) -> f64 {
    let mut generator = ScrambledZipfian::new(items, ZIPFIAN_CONSTANT);
    let mut rng = Rng::new(seed);
    let hot = (0..draws)
        .filter(|_| generator.next(&mut rng).1 < top)
        .count();
    hot as f64 / draws as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hottest_percent_of_100_000_records_gets_the_zipfian_share() {
        let expected = expected_top_share(1000, 100_000, ZIPFIAN_CONSTANT);
        // H(1000, 0.99) / H(100000, 0.99): about 0.61.
        assert!((0.55..0.67).contains(&expected), "{expected}");
        let measured = measured_top_share(100_000, 1000, 1_000_000, 7);
        // Gray's algorithm approximates the distribution's body: within 3 points of
        // the exact share (the sampling error of a million draws is 0.05 points).
        assert!(
            (measured - expected).abs() < 0.03,
            "measured {measured}, expected {expected}"
        );
    }

    #[test]
    fn the_most_popular_rank_gets_its_exact_share() {
        let mut z = Zipfian::new(100_000, ZIPFIAN_CONSTANT);
        let mut rng = Rng::new(3);
        let draws = 1_000_000;
        let first = (0..draws).filter(|_| z.next(&mut rng) == 0).count();
        let expected = 1.0 / zeta(100_000, ZIPFIAN_CONSTANT);
        let measured = first as f64 / f64::from(draws);
        assert!(
            (measured - expected).abs() < 0.005,
            "{measured} vs {expected}"
        );
    }

    #[test]
    fn scrambling_is_a_bijection_of_the_key_numbers() {
        let n = 1000;
        let s = ScrambledZipfian::new(n, ZIPFIAN_CONSTANT);
        let mut seen = vec![false; n as usize];
        for rank in 0..n {
            let key = (rank * s.multiplier) % n;
            assert!(!seen[key as usize], "rank {rank} collides");
            seen[key as usize] = true;
        }
        // The hottest record is not simply key 0's neighbour of the second.
        assert_ne!(s.multiplier % n, 1);
    }

    #[test]
    fn latest_favours_the_newest_records_and_follows_the_count() {
        let mut latest = Latest::new(1000, ZIPFIAN_CONSTANT);
        let mut rng = Rng::new(5);
        let draws = 100_000;
        let newest = (0..draws)
            .filter(|_| latest.next(1000, &mut rng) == 999)
            .count();
        assert!(newest as f64 / f64::from(draws) > 0.1, "{newest}");
        for _ in 0..1000 {
            assert!(latest.next(2000, &mut rng) < 2000);
        }
        let newest = (0..draws)
            .filter(|_| latest.next(2000, &mut rng) == 1999)
            .count();
        assert!(newest as f64 / f64::from(draws) > 0.1, "{newest}");
    }
}
