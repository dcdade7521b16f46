//! Regression benches of the key/value hot paths, each next to the same statement as
//! hand-written prepared SQL (the physical limit) in the same group.
//!
//! `instrumentation, no recorder` is what metrics and tracing add to a `get` hit
//! when the application installed no recorder and no subscriber: the span, the
//! recordings and the pool-wait clock reads a `get` makes, without the query. Its
//! time over `kv get hit/pgcache` is the overhead (budget: 2 %).
//!
//! Needs PostgreSQL at `DATABASE_URL` (default: local). Tables go in a scratch
//! schema, dropped at the end. `cargo bench --bench hot_paths`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pgcache::{Cache, CacheConfig, CacheManager};
use postgres::{Client, NoTls};
use serde_json::{json, Value};

const ROWS: u64 = 10_000;

struct Scratch {
    url: String,
    schema: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&self.url, NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ));
        }
    }
}

fn hot_paths(c: &mut Criterion) {
    let base =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| pgcache::DEFAULT_DATABASE_URL.to_owned());
    // Both sides without TLS, so only the code paths differ.
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}sslmode=disable");
    let scratch = Scratch {
        url: url.clone(),
        schema: format!("pgcache_bench_{}", uuid::Uuid::new_v4().simple()),
    };
    let cache = CacheManager::new(
        CacheConfig::builder()
            .database_url(url.clone())
            .schema(scratch.schema.clone())
            .build()
            .expect("valid config"),
    )
    .expect("PostgreSQL is reachable");
    let mut raw = Client::connect(&url, NoTls).expect("PostgreSQL is reachable");
    raw.batch_execute(&format!(
        "SET search_path TO \"{schema}\";
         CREATE TABLE raw_entries (LIKE cache_entries INCLUDING ALL);
         INSERT INTO cache_entries (key, value, expires_at)
           SELECT 'k:' || g, jsonb_build_object('id', g, 'name', 'Ada'), now() + interval '1 day'
           FROM generate_series(0, {last}) g;
         INSERT INTO raw_entries SELECT * FROM cache_entries;",
        schema = scratch.schema,
        last = ROWS - 1
    ))
    .expect("scratch tables");
    let get = raw
        .prepare("SELECT value FROM raw_entries WHERE key = $1 AND expires_at > now()")
        .unwrap();
    let get_many = raw
        .prepare("SELECT key, value FROM raw_entries WHERE key = ANY($1) AND expires_at > now()")
        .unwrap();
    let upsert = raw
        .prepare(
            "INSERT INTO raw_entries (key, value, expires_at) \
             VALUES ($1, $2, now() + make_interval(secs => $3)) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             expires_at = excluded.expires_at, created_at = now()",
        )
        .unwrap();

    let kv = cache.kv();
    let value = json!({"id": 1, "name": "Ada", "tags": ["a", "b"]});
    let mut n = 0u64;
    let mut next = move || {
        n = (n + 7919) % ROWS;
        format!("k:{n}")
    };
    let batch: Vec<String> = (0..100).map(|i| format!("k:{i}")).collect();
    let batch_refs: Vec<&str> = batch.iter().map(String::as_str).collect();

    let mut group = c.benchmark_group("kv get hit");
    group.bench_function("pgcache", |b| b.iter(|| kv.get(&next()).unwrap()));
    group.bench_function("raw", |b| {
        b.iter(|| {
            raw.query_opt(&get, &[&next()])
                .unwrap()
                .map(|r| r.get::<_, Value>(0))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("kv get miss");
    group.bench_function("pgcache", |b| b.iter(|| kv.get("missing").unwrap()));
    group.bench_function("raw", |b| {
        b.iter(|| {
            raw.query_opt(&get, &[&"missing"])
                .unwrap()
                .map(|r| r.get::<_, Value>(0))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("kv set overwrite");
    let ttl = Duration::from_secs(3600);
    group.bench_function("pgcache", |b| {
        b.iter(|| kv.set_with_ttl(&next(), &value, ttl).unwrap())
    });
    group.bench_function("raw", |b| {
        b.iter(|| {
            raw.execute(
                &upsert,
                &[&next(), &postgres::types::Json(&value), &3600f64],
            )
            .unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("kv get_many(100)");
    group.bench_function("pgcache", |b| b.iter(|| kv.get_many(&batch_refs).unwrap()));
    group.bench_function("raw", |b| {
        b.iter(|| {
            let rows = raw.query(&get_many, &[&batch]).unwrap();
            let by_key: std::collections::HashMap<String, Value> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            batch
                .iter()
                .map(|k| by_key.get(k).cloned())
                .collect::<Vec<_>>()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("instrumentation, no recorder");
    group.bench_function("recordings of one get", |b| {
        b.iter(pgcache::metrics::recordings_of_one_get)
    });
    group.finish();

    drop(cache);
    drop(scratch);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = hot_paths
}
criterion_main!(benches);
