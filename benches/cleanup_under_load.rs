//! Cleanup throughput under load: one million expired key/value rows are removed by
//! `CacheManager::cleanup` while another thread keeps reading live keys. Prints rows
//! removed per second and the reader's p50/p99 latency, with a baseline measured
//! before cleanup starts.
//!
//! Runs against `DATABASE_URL` (or the local default) in a scratch schema that is
//! dropped afterwards: `cargo bench --bench cleanup_under_load`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use pgcache::{Cache, CacheConfig, CacheManager};

const EXPIRED_ROWS: u64 = 1_000_000;
const LIVE_ROWS: u64 = 10_000;
const BASELINE: Duration = Duration::from_secs(2);

fn main() {
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| pgcache::DEFAULT_DATABASE_URL.to_owned());
    let schema = format!("pgcache_bench_cleanup_{}", uuid::Uuid::new_v4().simple());
    let cache = CacheManager::new(
        CacheConfig::builder()
            .database_url(&url)
            .schema(&schema)
            .pool_max_size(4)
            .build()
            .expect("valid configuration"),
    )
    .expect("PostgreSQL is reachable");
    let mut admin = PgConnection::establish(&url).expect("connect");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&cache, &mut admin, &schema);
    }));
    drop(cache);
    admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .expect("drop the scratch schema");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn run(cache: &CacheManager, admin: &mut PgConnection, schema: &str) {
    let filled = Instant::now();
    admin
        .batch_execute(&format!(
            "SET search_path TO \"{schema}\"; SET statement_timeout = 0;
             INSERT INTO cache_entries (key, value, expires_at)
               SELECT 'expired:' || g, '{{\"n\": 1}}'::jsonb, now() - interval '1 minute'
               FROM generate_series(1, {EXPIRED_ROWS}) g;
             INSERT INTO cache_entries (key, value, expires_at)
               SELECT 'live:' || g, '{{\"n\": 1}}'::jsonb, now() + interval '1 day'
               FROM generate_series(0, {LIVE_ROWS} - 1) g;"
        ))
        .expect("fill the table");
    // As autovacuum would have by now: statistics and visibility map up to date.
    admin
        .batch_execute("VACUUM ANALYZE cache_entries")
        .expect("vacuum");
    println!(
        "filled {EXPIRED_ROWS} expired + {LIVE_ROWS} live rows in {:.1} s",
        filled.elapsed().as_secs_f64()
    );

    let baseline = read_while(cache, || {
        thread::sleep(BASELINE);
    });
    print_latency("reader alone     ", &baseline.1);

    let (report, during) = read_while(cache, || cache.cleanup().expect("cleanup"));
    let removed = report.rows_removed();
    assert_eq!(removed, EXPIRED_ROWS, "cleanup removed every expired row");
    println!(
        "cleanup removed {removed} rows in {:.2} s: {:.0} rows/s (batches of {})",
        report.elapsed.as_secs_f64(),
        removed as f64 / report.elapsed.as_secs_f64(),
        pgcache::CLEANUP_BATCH_SIZE
    );
    print_latency("reader during cleanup", &during);
}

/// Runs `work` while a reader thread gets live keys in a loop; returns `work`'s
/// result and the reader's latencies.
fn read_while<T>(cache: &CacheManager, work: impl FnOnce() -> T) -> (T, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (cache, stop) = (cache.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            let kv = cache.kv();
            let mut samples = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("live:{}", i % LIVE_ROWS);
                let started = Instant::now();
                let hit = kv.get(&key).expect("read");
                samples.push(started.elapsed());
                assert!(hit.is_some(), "live key {key} missing");
                i += 1;
            }
            samples
        })
    };
    let result = work();
    stop.store(true, Ordering::Relaxed);
    (result, reader.join().expect("reader"))
}

fn print_latency(label: &str, samples: &[Duration]) {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    println!(
        "{label}: {} reads, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        sorted.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        sorted[sorted.len() - 1].as_secs_f64() * 1e3
    );
}
