//! Which shard holds a key: rendezvous (highest random weight) hashing over the
//! shards' names.
//!
//! Each key scores every shard with a 64-bit mix of the key's digest and the shard
//! name's, and lives on the shard that scores highest. Names, not positions or
//! URLs, decide: a shard moved to another server keeps its keys, removing one moves
//! only its own keys (each to the shard that scored second), and adding one takes
//! about 1/N of every other shard's keys. No table is built or rebuilt; the cost is
//! one mix per shard per key (a few nanoseconds each), nothing against a round trip
//! for the handful of shards a cache has. Maglev hashing (Solid Cache's choice)
//! looks a key up in O(1) for hundreds of shards, at the price of a table to
//! rebuild and slightly more keys moving on a change.
//!
//! The routing is stable across processes, versions and platforms: it uses only the
//! key digest (SHA-256, [`KeyDigest`]) and SHA-256 of the name.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::key::KeyDigest;

/// The name of the one shard of a cache that is not sharded.
pub const DEFAULT_SHARD: &str = "default";

/// Named shards and the rule that maps a key to one of them.
///
/// ```no_run
/// use pgcache::{CacheManager, ShardMap};
///
/// let shards = ShardMap::new(["cache-a", "cache-b", "cache-c"])?;
/// let cache = CacheManager::from_env()?;
/// let digest = cache.kv().key_digest("user:42")?;
/// println!("user:42 lives on {}", shards.name_of(&digest));
/// # Ok::<(), pgcache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    names: Vec<String>,
    /// Per shard, the first eight bytes of SHA-256 of its name.
    seeds: Vec<u64>,
}

impl ShardMap {
    /// Shards with these names, in this order (the order only numbers them: the
    /// routing depends on the names alone).
    ///
    /// # Errors
    /// [`Error::Config`] (setting `shards`) for no names, an empty name, a name with
    /// characters other than ASCII letters, digits, `_` and `-`, or a name given twice.
    pub fn new(names: impl IntoIterator<Item = impl Into<String>>) -> Result<Self> {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if names.is_empty() {
            return Err(Error::config("shards", "", "at least one shard is needed"));
        }
        for (i, name) in names.iter().enumerate() {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(Error::config(
                    "shards",
                    name.as_str(),
                    "a shard name is one or more ASCII letters, digits, `_` or `-`",
                ));
            }
            if names[..i].contains(name) {
                return Err(Error::config(
                    "shards",
                    name.as_str(),
                    "each shard name may be given once",
                ));
            }
        }
        let seeds = names
            .iter()
            .map(|name| prefix(&Sha256::digest(name.as_bytes())))
            .collect();
        Ok(ShardMap { names, seeds })
    }

    /// The shards' names, in the order given.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// How many shards there are (at least one).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Always false: a map has at least one shard.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The position (in [`names`](Self::names)) of the shard holding the key with
    /// this digest.
    pub fn shard_of(&self, digest: &KeyDigest) -> usize {
        let key = prefix(digest.as_bytes());
        // Ties (equal 64-bit scores) go to the lower name, so every process agrees.
        (0..self.seeds.len())
            .max_by(|&a, &b| {
                score(key, self.seeds[a])
                    .cmp(&score(key, self.seeds[b]))
                    .then_with(|| self.names[b].cmp(&self.names[a]))
            })
            .unwrap_or(0)
    }

    /// The name of the shard holding the key with this digest.
    pub fn name_of(&self, digest: &KeyDigest) -> &str {
        &self.names[self.shard_of(digest)]
    }
}

/// The first eight bytes of a digest, as a number.
fn prefix(bytes: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(first)
}

/// A key's weight on a shard: SplitMix64's finaliser over the two, so every bit of
/// each moves every bit of the score.
fn score(key: u64, seed: u64) -> u64 {
    let mut z = key ^ seed.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyHasher;

    fn digest(i: u64) -> KeyDigest {
        KeyHasher::new("kv").text(&format!("key:{i}")).finish()
    }

    const KEYS: u64 = 1_000_000;

    /// The digests of `key:0` .. `key:999999`, computed once for every test.
    fn digests() -> &'static [KeyDigest] {
        static DIGESTS: std::sync::OnceLock<Vec<KeyDigest>> = std::sync::OnceLock::new();
        DIGESTS.get_or_init(|| (0..KEYS).map(digest).collect())
    }

    fn assignments(map: &ShardMap) -> Vec<&str> {
        digests().iter().map(|d| map.name_of(d)).collect()
    }

    #[test]
    fn a_million_keys_spread_within_two_percent() {
        let map = ShardMap::new(["a", "b", "c"]).unwrap();
        let mut counts = [0u64; 3];
        for digest in digests() {
            counts[map.shard_of(digest)] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        let spread = (*max - *min) as f64 / *min as f64;
        eprintln!("shards: 1M keys over 3 shards: {counts:?}, max/min - 1 = {spread:.4}");
        assert!(spread <= 0.02, "{counts:?}: max/min - 1 = {spread:.4}");
    }

    #[test]
    fn a_fourth_shard_takes_about_a_quarter_of_the_keys() {
        let (three, four) = (
            ShardMap::new(["a", "b", "c"]).unwrap(),
            ShardMap::new(["a", "b", "c", "d"]).unwrap(),
        );
        let (three, four) = (assignments(&three), assignments(&four));
        let moved = three.iter().zip(&four).filter(|(x, y)| x != y).count();
        // Every key that moved went to the new shard.
        assert!(three.iter().zip(&four).all(|(x, y)| x == y || *y == "d"));
        let share = moved as f64 / KEYS as f64;
        eprintln!("shards: 3 -> 4 shards moved {share:.4} of 1M keys");
        assert!(share <= 0.30, "{share:.4} of the keys moved");
        assert!(
            (0.23..=0.27).contains(&share),
            "{share:.4} of the keys moved"
        );
    }

    #[test]
    fn removing_a_shard_moves_only_its_keys() {
        let four = ShardMap::new(["a", "b", "c", "d"]).unwrap();
        // Order does not matter, names do.
        let three = ShardMap::new(["c", "a", "b"]).unwrap();
        let (four, three) = (assignments(&four), assignments(&three));
        let moved_others = four
            .iter()
            .zip(&three)
            .filter(|(x, y)| x != y && **x != "d")
            .count();
        assert_eq!(moved_others, 0);
    }

    #[test]
    fn routing_depends_on_names_only_and_is_fixed() {
        let map = ShardMap::new(["eu-1", "eu-2", "us-1"]).unwrap();
        let reordered = ShardMap::new(["us-1", "eu-1", "eu-2"]).unwrap();
        for i in 0..1000 {
            assert_eq!(map.name_of(&digest(i)), reordered.name_of(&digest(i)));
        }
        // Pinned: a change here would move keys between shards of running caches.
        let pinned: Vec<&str> = (0..8).map(|i| map.name_of(&digest(i))).collect();
        assert_eq!(pinned, PINNED);
    }

    /// The shards of `key:0` .. `key:7` over `eu-1`, `eu-2`, `us-1`.
    const PINNED: [&str; 8] = [
        "eu-1", "eu-2", "eu-1", "us-1", "us-1", "eu-2", "us-1", "eu-2",
    ];

    #[test]
    fn bad_names_are_refused_by_name() {
        for (names, bad) in [
            (vec![], ""),
            (vec!["a", ""], ""),
            (vec!["a b"], "a b"),
            (vec!["a", "b", "a"], "a"),
            (vec!["db=x"], "db=x"),
        ] {
            match ShardMap::new(names) {
                Err(Error::Config { setting, value, .. }) => {
                    assert_eq!(setting, "shards");
                    assert_eq!(value, bad);
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
