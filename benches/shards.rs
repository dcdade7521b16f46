//! Sharding, measured side by side in one run (`cargo bench --bench shards`):
//!
//! 1. One database against three shards (three databases on the same local
//!    server, so this measures what routing and splitting cost, not the capacity
//!    three servers would add): single-key get and set, and batches of 100 keys,
//!    whose three per-shard statements run at once.
//! 2. A shard that is down: the p50 and p99 of gets on the two shards that are up,
//!    before, while and after the third (a cluster of the bench's own, created and
//!    dropped here, never the main one) is stopped, while another thread keeps
//!    asking for the stopped shard's keys; and how long those take to fail.
//!
//! Rounds alternate the variants so that the machine's noise falls on all of them.
//! Needs the local server (`DATABASE_URL`'s, or the default) and Debian's
//! `pg_createcluster` tools, as the fault tests do.

#[path = "../tests/integration/scratch/mod.rs"]
mod scratch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection, RunQueryDsl};
use pgcache::{Cache, CacheConfig, CacheConfigBuilder, CacheManager};
use serde_json::json;

const KEYS: usize = 3_000;
const ROUNDS: usize = 5;
const PER_ROUND: usize = 400;
const BATCH: usize = 100;

fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| pgcache::DEFAULT_DATABASE_URL.to_owned())
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    format!("{base}/{database}")
}

/// Databases of the bench's own on the local server, dropped at the end.
struct Databases {
    admin: PgConnection,
    names: Vec<String>,
}

impl Databases {
    fn create(count: usize) -> Self {
        let mut admin = PgConnection::establish(&server_url()).expect("the local server answers");
        let run = uuid::Uuid::new_v4().simple().to_string();
        let names: Vec<String> = (0..count)
            .map(|i| format!("pgcache_bench_{}_{i}", &run[..12]))
            .collect();
        for name in &names {
            diesel::sql_query(format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .expect("create a database");
        }
        Databases { admin, names }
    }

    fn url(&self, i: usize) -> String {
        with_database(&server_url(), &self.names[i])
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut self.admin);
        }
    }
}

fn base() -> CacheConfigBuilder {
    // No flusher traffic in the measurements.
    CacheConfig::builder().stats_flush_interval(Duration::from_secs(3600))
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("bench:key:{i}")).collect()
}

fn fill(cache: &CacheManager, keys: &[String]) {
    for chunk in keys.chunks(500) {
        let value = json!({"payload": "x".repeat(100)});
        let entries: Vec<(&str, &serde_json::Value)> =
            chunk.iter().map(|k| (k.as_str(), &value)).collect();
        cache
            .kv()
            .set_many(&entries, Duration::from_secs(3600))
            .expect("fill");
    }
}

/// p50 and p99 of samples, in µs.
fn quantiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99))
}

type Op<'a> = Box<dyn Fn(&CacheManager, usize) + 'a>;

fn ops(keys: &[String]) -> Vec<(&'static str, Op<'_>)> {
    let value = json!({"payload": "y".repeat(100)});
    vec![
        (
            "get (hit)",
            Box::new(move |c: &CacheManager, i: usize| {
                c.kv().get(&keys[i % KEYS]).unwrap().expect("a hit");
            }),
        ),
        (
            "set (overwrite)",
            Box::new(move |c: &CacheManager, i: usize| {
                c.kv().set(&keys[i % KEYS], &value).unwrap();
            }),
        ),
        (
            "get_many (100 keys)",
            Box::new(move |c: &CacheManager, i: usize| {
                let start = (i * BATCH) % (KEYS - BATCH);
                let batch: Vec<&str> = keys[start..start + BATCH]
                    .iter()
                    .map(String::as_str)
                    .collect();
                let found = c.kv().get_many(&batch).unwrap();
                assert!(found.iter().all(Option::is_some));
            }),
        ),
        (
            "set_many (100 keys)",
            Box::new(move |c: &CacheManager, i: usize| {
                let value = json!(i);
                let start = (i * BATCH) % (KEYS - BATCH);
                let entries: Vec<(&str, &serde_json::Value)> = keys[start..start + BATCH]
                    .iter()
                    .map(|k| (k.as_str(), &value))
                    .collect();
                c.kv()
                    .set_many(&entries, Duration::from_secs(3600))
                    .unwrap();
            }),
        ),
    ]
}

fn one_against_three() {
    let dbs = Databases::create(4);
    let single = CacheManager::new(base().database_url(dbs.url(0)).build().unwrap()).unwrap();
    let sharded = CacheManager::new(
        base()
            .shard("a", dbs.url(1))
            .shard("b", dbs.url(2))
            .shard("c", dbs.url(3))
            .build()
            .unwrap(),
    )
    .unwrap();
    let keys = keys();
    fill(&single, &keys);
    fill(&sharded, &keys);
    println!("## One database against three shards on the same server (1 thread, µs)");
    println!();
    println!("| operation | one database p50 / p99 | 3 shards p50 / p99 | p50 ratio |");
    println!("|---|---|---|---|");
    for (name, op) in ops(&keys) {
        let mut times = [Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            for (variant, cache) in [&single, &sharded].into_iter().enumerate() {
                for i in 0..PER_ROUND {
                    let started = Instant::now();
                    op(cache, round * PER_ROUND + i);
                    times[variant].push(started.elapsed());
                }
            }
        }
        let (one50, one99) = quantiles(&mut times[0]);
        let (sh50, sh99) = quantiles(&mut times[1]);
        println!(
            "| {name} | {one50:.0} / {one99:.0} | {sh50:.0} / {sh99:.0} | {:.2} |",
            sh50 / one50
        );
    }
    println!();
}

fn shard_down() {
    let dbs = Databases::create(2);
    let scratch = scratch::ScratchCluster::start();
    let cache = CacheManager::new(
        base()
            .shard("a", dbs.url(0))
            .shard("b", dbs.url(1))
            .shard("c", scratch.url())
            .build()
            .unwrap(),
    )
    .unwrap();
    let keys = keys();
    fill(&cache, &keys);
    let on = |shard: &str| -> Vec<String> {
        keys.iter()
            .filter(|k| {
                cache
                    .shard_map()
                    .name_of(&cache.kv().key_digest(k).unwrap())
                    == shard
            })
            .cloned()
            .collect()
    };
    let up: Vec<String> = [on("a"), on("b")].concat();
    let down = on("c");
    // At least `ROUNDS * PER_ROUND` gets and at least `at_least` long.
    let measure = |label: &str, at_least: Duration| {
        let mut times = Vec::new();
        let began = Instant::now();
        let mut i = 0;
        while i < ROUNDS * PER_ROUND || began.elapsed() < at_least {
            let started = Instant::now();
            cache.kv().get(&up[i % up.len()]).unwrap().expect("a hit");
            times.push(started.elapsed());
            i += 1;
        }
        let (p50, p99) = quantiles(&mut times);
        if !label.is_empty() {
            println!("| {label} | {} | {p50:.0} | {p99:.0} |", times.len());
        }
    };
    // Warm every connection and plan first.
    measure("", Duration::ZERO);
    println!("## Gets on shards a and b while shard c is down (1 thread, µs)");
    println!();
    println!("| shard c | gets | p50 | p99 |");
    println!("|---|---|---|---|");
    measure("up", Duration::from_secs(6));
    scratch.stop();
    let failures = std::sync::Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Another thread keeps asking for shard c's keys meanwhile.
        scope.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let error = cache
                    .kv()
                    .get(&down[i % down.len()])
                    .expect_err("shard c is down");
                assert!(error.is_transient(), "{error}");
                failures.lock().unwrap().push(started.elapsed());
                i += 1;
            }
        });
        measure("down, its keys asked for meanwhile", Duration::from_secs(6));
        stop.store(true, Ordering::Relaxed);
    });
    scratch.start_again();
    let back = Instant::now();
    while cache.kv().get(&down[0]).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let recovered = back.elapsed();
    measure("back up", Duration::from_secs(6));
    let mut failures = failures.into_inner().unwrap();
    let (f50, _) = quantiles(&mut failures);
    println!();
    println!(
        "Shard c's keys while it was down: {} gets, each an error after {:.0} ms (p50) to \
         {:.0} ms (max; connection timeout {} ms); served again {:.0} ms after its server \
         was back.",
        failures.len(),
        f50 / 1000.0,
        failures
            .iter()
            .max()
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        cache.config().pool().connection_timeout.as_millis(),
        recovered.as_secs_f64() * 1000.0
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read.
    one_against_three();
    shard_down();
}
