//! The application-pool row of `pgcache-bench ops`: `incr` with relaxed durability
//! through a manager over an application's pool (`with_pool`: each write marked
//! for a relaxed commit of its own transaction, the session untouched) against a
//! manager with its own relaxed pool (the setting is the session's), alternating
//! slices. Whatever `--durability` says: this row is about the relaxed write's cost.

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;
use pgcache::CacheManager;

use super::{bench_config, side_by_side, BenchResult, Budget, Results, TTL};

/// The row's name (`app pool` side / `own pool` side, the "raw" columns).
pub(super) const NAME: &str = "kv incr relaxed app/own pool";

/// Distinct counters each side increments.
const COUNTERS: u64 = 1000;

/// Measures the row for each thread count in `passes` on the bench's schema.
pub(super) fn rows(
    url: &str,
    schema: &str,
    passes: &[usize],
    budget: Budget,
    results: &mut Results,
) -> BenchResult<()> {
    let max_threads = passes.iter().copied().max().unwrap_or(1);
    let config = || {
        bench_config(url, schema, max_threads, true)
            .application_name("pgcache-bench-app-pool")
            .build()
    };
    // Like the cache's own pool, no `SELECT 1` before each checkout (r2d2's
    // default): the row measures the relaxed transaction, not the pool's probe.
    let app_pool = Pool::builder()
        .max_size(max_threads as u32 + 1)
        .test_on_check_out(false)
        .build(ConnectionManager::<PgConnection>::new(url))?;
    let shared = CacheManager::with_pool(app_pool, config()?)?;
    let own = CacheManager::new(config()?)?;
    results.mark("app pool: managers");
    side_by_side(
        NAME,
        [&shared, &own],
        passes,
        budget,
        results,
        &|cache, w| {
            let n = w.random() % COUNTERS;
            let key = w.set_key(format_args!("app-pool counter:{n}"));
            Ok(cache.kv().incr(key, 1, TTL)? > 0)
        },
    )
}
