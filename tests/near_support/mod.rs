//! What the near-cache tests share: the kv near cache's figures, and waiting until
//! it is current.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use pgcache::{CacheKind, CacheManager, NearCacheStats};

/// How soon after a fault ends a near cache must serve from memory again: the
/// near-cache design's "within a second" on a machine with time to spare, plus three times
/// what connecting to `database_url` and one statement take right now, which is
/// what a poller coming back does (reconnect, check its triggers, poll). A machine
/// too busy to connect quickly stretches the bound; nothing else does.
pub fn recovery_limit(database_url: &str) -> Duration {
    let started = Instant::now();
    let mut conn = PgConnection::establish(database_url).expect("connect");
    conn.batch_execute("SELECT 1").expect("a statement");
    Duration::from_secs(1) + 3 * started.elapsed()
}

/// The kv near cache's figures.
pub fn kv_stats(cache: &CacheManager) -> NearCacheStats {
    near_stats(cache, CacheKind::Kv)
}

/// The figures of `kind`'s near cache.
pub fn near_stats(cache: &CacheManager, kind: CacheKind) -> NearCacheStats {
    cache
        .near_cache_stats()
        .into_iter()
        .find(|s| s.cache == kind)
        .expect("the cache has a near cache")
}

/// Waits until the kv near cache is current (its poller connected and its first
/// poll came back), at most 10 s.
pub fn wait_current(cache: &CacheManager) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while kv_stats(cache).poll_lag_ms.is_none() {
        assert!(
            Instant::now() < deadline,
            "the near cache never became current"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `kind`'s near cache has read the change log in a poll sent after
/// `since` (so it has applied every change committed before `since`), at most 10 s.
/// A read right after is then answered by the near cache as coherence promises,
/// however late the machine ran the poller: what a fixed sleep cannot promise.
pub fn wait_polled_since(cache: &CacheManager, kind: CacheKind, since: Instant) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Read before the lag: the lag is then compared with a shorter span, never a
        // longer one, and a poll sent before `since` never passes.
        let elapsed_ms = since.elapsed().as_secs_f64() * 1e3;
        if matches!(near_stats(cache, kind).poll_lag_ms, Some(lag) if lag < elapsed_ms) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the near cache never polled after the change"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The hits and misses of `kind`'s near cache over `read`, which is run again (at
/// most five times) while a poll slowed by a loaded machine turns the near cache
/// off during it: such a bypass is the bound working, not what a hit count tests.
pub fn hits_and_misses(
    cache: &CacheManager,
    kind: CacheKind,
    mut read: impl FnMut(),
) -> (u64, u64) {
    for _ in 0..5 {
        let before = near_stats(cache, kind);
        read();
        let after = near_stats(cache, kind);
        if after.bypasses == before.bypasses {
            return (after.hits - before.hits, after.misses - before.misses);
        }
    }
    panic!("the near cache was bypassed in each of five tries");
}

/// Asserts that `read`, which makes `reads` reads of `kind`, is answered from
/// `cache`'s memory once it has run before (at most five tries: a read bypassed on
/// a loaded machine fills nothing).
pub fn assert_held(cache: &CacheManager, kind: CacheKind, reads: u64, mut read: impl FnMut()) {
    for _ in 0..5 {
        read();
        if hits_and_misses(cache, kind, &mut read).0 == reads {
            return;
        }
    }
    panic!("never held in memory");
}
