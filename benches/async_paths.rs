//! The async face's paths (feature `tokio`), each next to what an async service
//! would otherwise run, in one run:
//!
//! - `async near hit`: a near-cache hit through `AsyncCacheManager` (answered on the
//!   task), the same hit through `spawn_blocking` and the blocking API, and redis-rs
//!   `GET` on a multiplexed async connection; with 1 task, and with 64 tasks sharing
//!   the work (the time per operation is then the inverse of the throughput).
//! - `async near batch`: `get_many` of 10 keys the near cache holds, async (answered
//!   on the task), through `spawn_blocking`, and redis-rs `MGET` of the same keys.
//! - `async database read`: a get the database answers (no near cache), async
//!   against the blocking get, with and without the hop to a blocking thread.
//!
//! Needs PostgreSQL at `DATABASE_URL` (default: local) and Redis at `REDIS_URL`
//! (default `redis://127.0.0.1:6379/`; its rows are left out when it does not
//! answer). Tables go in scratch schemas, dropped at the end.
//! `cargo bench --bench async_paths --features tokio`.

use std::future::Future;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Bencher, BenchmarkId, Criterion};
use pgcache::{AsyncCacheManager, Cache, CacheConfig, CacheKind, CacheManager, NearCache};
use serde_json::json;
use tokio::runtime::Runtime;

const KEY: &str = "user:42:profile:v2";

/// The keys of the batch rows.
const BATCH: [&str; 10] = [
    "batch:0", "batch:1", "batch:2", "batch:3", "batch:4", "batch:5", "batch:6", "batch:7",
    "batch:8", "batch:9",
];

struct Scratch {
    url: String,
    schema: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ));
        }
    }
}

fn manager(url: &str, near: bool) -> (CacheManager, Scratch) {
    let scratch = Scratch {
        url: url.to_owned(),
        schema: format!("pgcache_bench_{}", uuid::Uuid::new_v4().simple()),
    };
    let near = near.then(NearCache::new);
    let cache = CacheManager::new(
        CacheConfig::builder()
            .database_url(url)
            .schema(scratch.schema.clone())
            .near_cache(CacheKind::Kv, near)
            .build()
            .expect("valid config"),
    )
    .expect("PostgreSQL is reachable");
    cache
        .kv()
        .set_with_ttl(
            KEY,
            &json!({"id": 42, "name": "Ada"}),
            Duration::from_secs(3600),
        )
        .expect("stored");
    (cache, scratch)
}

/// Benchmarks `op` run `iters` times split over `tasks` tasks: each task takes its
/// own clone of `state` and runs its share in a loop, handing the state from one
/// operation to the next (so no per-operation clone adds shared-counter traffic).
fn bench_tasks<S, F, Fut>(b: &mut Bencher<'_>, runtime: &Runtime, tasks: u64, state: &S, op: F)
where
    S: Clone + Send + 'static,
    F: Fn(S) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = S> + Send,
{
    b.iter_custom(|iters| {
        runtime.block_on(async {
            let started = Instant::now();
            let handles: Vec<_> = (0..tasks)
                .map(|t| {
                    // The iterations spread over the tasks, every one counted once.
                    let share = iters / tasks + u64::from(t < iters % tasks);
                    let (mut state, op) = (state.clone(), op.clone());
                    tokio::spawn(async move {
                        for _ in 0..share {
                            state = op(state).await;
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.await.unwrap();
            }
            started.elapsed()
        })
    });
}

/// `work` on the blocking API through `spawn_blocking`, as a service without the
/// async face would run it.
async fn hop<R: Send + 'static>(
    cache: &CacheManager,
    work: impl FnOnce(CacheManager) -> R + Send + 'static,
) -> R {
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || work(cache))
        .await
        .unwrap()
}

fn async_paths(c: &mut Criterion) {
    let base =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| pgcache::DEFAULT_DATABASE_URL.to_owned());
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}sslmode=disable");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let (near, _near_scratch) = manager(&url, true);
    // Read each key until the near cache serves it.
    let hits = || near.near_cache_stats()[0].hits;
    for key in std::iter::once(KEY).chain(BATCH) {
        if key != KEY {
            let value = json!({"key": key});
            near.kv()
                .set_with_ttl(key, &value, Duration::from_secs(3600))
                .unwrap();
        }
        let before = hits();
        let started = Instant::now();
        while hits() == before {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the near cache never served {key}"
            );
            near.kv().get(key).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let near_async = near.to_async();

    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let redis = runtime.block_on(async {
        let client = redis::Client::open(redis).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let mut mset = redis::cmd("MSET");
        mset.arg(KEY)
            .arg(json!({"id": 42, "name": "Ada"}).to_string());
        for key in BATCH {
            mset.arg(key).arg(json!({"key": key}).to_string());
        }
        mset.query_async::<()>(&mut conn).await.ok()?;
        Some(conn)
    });
    if redis.is_none() {
        eprintln!("Redis does not answer: its rows are left out");
    }

    let mut group = c.benchmark_group("async near hit");
    for tasks in [1u64, 64] {
        group.bench_function(BenchmarkId::new("pgcache async", tasks), |b| {
            bench_tasks(b, &runtime, tasks, &near_async, |cache| async move {
                cache.kv().get(KEY).await.unwrap().unwrap();
                cache
            })
        });
        group.bench_function(BenchmarkId::new("spawn_blocking", tasks), |b| {
            bench_tasks(b, &runtime, tasks, &near, |cache| async move {
                hop(&cache, |c| c.kv().get(KEY)).await.unwrap().unwrap();
                cache
            })
        });
        if let Some(conn) = &redis {
            group.bench_function(BenchmarkId::new("redis-rs GET", tasks), |b| {
                bench_tasks(b, &runtime, tasks, conn, |mut conn| async move {
                    redis::cmd("GET")
                        .arg(KEY)
                        .query_async::<Option<String>>(&mut conn)
                        .await
                        .unwrap()
                        .unwrap();
                    conn
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("async near batch");
    group.bench_function("pgcache async get_many", |b| {
        bench_tasks(b, &runtime, 1, &near_async, |cache| async move {
            let found = cache.kv().get_many(&BATCH).await.unwrap();
            assert!(found.iter().all(Option::is_some));
            cache
        })
    });
    group.bench_function("spawn_blocking get_many", |b| {
        bench_tasks(b, &runtime, 1, &near, |cache| async move {
            let found = hop(&cache, |c| c.kv().get_many(&BATCH)).await.unwrap();
            assert!(found.iter().all(Option::is_some));
            cache
        })
    });
    if let Some(conn) = &redis {
        group.bench_function("redis-rs MGET", |b| {
            bench_tasks(b, &runtime, 1, conn, |mut conn| async move {
                let found = redis::cmd("MGET")
                    .arg(&BATCH[..])
                    .query_async::<Vec<Option<String>>>(&mut conn)
                    .await
                    .unwrap();
                assert!(found.iter().all(Option::is_some));
                conn
            })
        });
    }
    group.finish();

    let (far, _far_scratch) = manager(&url, false);
    let far_async: AsyncCacheManager = far.to_async();
    let mut group = c.benchmark_group("async database read");
    group.bench_function("blocking get", |b| {
        b.iter(|| far.kv().get(KEY).unwrap().unwrap())
    });
    group.bench_function("spawn_blocking get", |b| {
        bench_tasks(b, &runtime, 1, &far, |cache| async move {
            hop(&cache, |c| c.kv().get(KEY)).await.unwrap().unwrap();
            cache
        })
    });
    group.bench_function("pgcache async get", |b| {
        bench_tasks(b, &runtime, 1, &far_async, |cache| async move {
            cache.kv().get(KEY).await.unwrap().unwrap();
            cache
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = async_paths
}
criterion_main!(benches);
