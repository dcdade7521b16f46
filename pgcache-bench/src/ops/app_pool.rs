//! The application-pool row of `pgcache-bench ops`: `incr` with relaxed durability
//! through a manager over an application's pool (`with_pool`: each write marked
//! for a relaxed commit of its own transaction, the session untouched) against a
//! manager with its own relaxed pool (the setting is the session's), alternating
//! slices. Whatever `--durability` says: this row is about the relaxed write's cost.

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;
use pgcache::CacheManager;

use super::{bench_config, run_slice, BenchResult, Budget, Results, Samples, Worker, TTL};

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
    let incr = |cache: &mut &CacheManager, w: &mut Worker| -> BenchResult<bool> {
        let n = w.random() % COUNTERS;
        let key = w.set_key(format_args!("app-pool counter:{n}"));
        Ok(cache.kv().incr(key, 1, TTL)? > 0)
    };
    for &threads in passes {
        let mut sides = [
            (vec![&shared; threads], Samples::default()),
            (vec![&own; threads], Samples::default()),
        ];
        let mut workers: Vec<Vec<Worker>> = (0..2)
            .map(|side| {
                (0..threads)
                    .map(|t| Worker::new(2000 + side * 100 + t, COUNTERS))
                    .collect()
            })
            .collect();
        // Warm-up: prepares the statement on every connection.
        let warm = Budget {
            slices: 1,
            iterations: Some(super::WARMUP),
            ..budget
        };
        for ((ctx, _), w) in sides.iter_mut().zip(&mut workers) {
            run_slice(ctx, w, warm, &mut Samples::default(), &incr)?;
        }
        for _ in 0..budget.slices {
            for ((ctx, samples), w) in sides.iter_mut().zip(&mut workers) {
                run_slice(ctx, w, budget, samples, &incr)?;
            }
        }
        let [(_, app), (_, own)] = sides;
        results.record(NAME, threads, app, Some(own));
    }
    Ok(())
}
