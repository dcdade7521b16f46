//! The transaction-pooler rows of `pgcache-bench ops --pooler-url`: kv get and set
//! through a transaction pooler (PgBouncer in `pool_mode = transaction`, the
//! library in [`Pooler::Transaction`] mode) against the same operations on the
//! server directly, on the same tables, alternating slices.

use pgcache::{Cache, CacheManager, Pooler};

use super::{
    bench_config, run_slice, BenchResult, Budget, Results, Samples, Scratch, Worker, TTL, WARMUP,
};

/// Runs the pooler rows for each thread count in `passes` on the bench's schema
/// (`bench`), filled with `rows` rows; `direct` is the bench's manager.
///
/// # Errors
/// Connection and database errors, and a relaxed run (refused in pooler mode).
pub(super) fn rows(
    bench: &Scratch,
    pooler_url: &str,
    rows: u64,
    passes: &[usize],
    budget: Budget,
    direct: &CacheManager,
    results: &mut Results,
) -> BenchResult<()> {
    let max_threads = passes.iter().copied().max().unwrap_or(1);
    let pooled = CacheManager::new(
        bench_config(pooler_url, &bench.schema, max_threads, false)
            .application_name("pgcache-bench-pooler")
            .pooler(Pooler::Transaction)
            .direct_url(bench.url.as_str())
            // The bench's manager ran them, on the server itself.
            .run_migrations(false)
            .build()?,
    )?;
    results.mark("pooler: manager");
    type Step = dyn Fn(&mut &CacheManager, &mut Worker) -> BenchResult<bool> + Sync;
    let get = |cache: &mut &CacheManager, w: &mut Worker| -> BenchResult<bool> {
        let key = w.existing_key().to_owned();
        Ok(cache.kv().get(&key)?.is_some())
    };
    let set = |cache: &mut &CacheManager, w: &mut Worker| -> BenchResult<bool> {
        let key = w.existing_key().to_owned();
        let value = w.value.clone();
        cache.kv().set_with_ttl(&key, &value, TTL)?;
        Ok(true)
    };
    for &threads in passes {
        for (name, step) in [
            ("kv get, pooler/direct", &get as &Step),
            ("kv set, pooler/direct", &set as &Step),
        ] {
            let mut pooled_ctx = vec![&pooled; threads];
            let mut direct_ctx = vec![direct; threads];
            let workers =
                || -> Vec<Worker> { (0..threads).map(|t| Worker::new(t, rows)).collect() };
            let (mut pooled_workers, mut direct_workers) = (workers(), workers());
            let warm = Budget {
                slices: 1,
                iterations: Some(WARMUP),
                ..budget
            };
            let mut ignored = Samples::default();
            run_slice(
                &mut pooled_ctx,
                &mut pooled_workers,
                warm,
                &mut ignored,
                step,
            )?;
            run_slice(
                &mut direct_ctx,
                &mut direct_workers,
                warm,
                &mut ignored,
                step,
            )?;
            let (mut through, mut past) = (Samples::default(), Samples::default());
            for _ in 0..budget.slices {
                run_slice(
                    &mut pooled_ctx,
                    &mut pooled_workers,
                    budget,
                    &mut through,
                    step,
                )?;
                run_slice(
                    &mut direct_ctx,
                    &mut direct_workers,
                    budget,
                    &mut past,
                    step,
                )?;
            }
            results.record(name, threads, through, Some(past));
        }
    }
    Ok(())
}
