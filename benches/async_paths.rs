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

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pgcache::{AsyncCacheManager, Cache, CacheConfig, CacheKind, CacheManager, NearCache};
use serde_json::json;

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

/// Runs `iters` operations split over `tasks` tasks, each running `work(its
/// share)` (its loop inside, so no per-operation clone adds shared-counter
/// traffic); the time it took.
fn timed<F, Fut>(runtime: &tokio::runtime::Runtime, iters: u64, tasks: u64, work: F) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    runtime.block_on(async move {
        let started = Instant::now();
        let handles: Vec<_> = (0..tasks)
            // The iterations spread over the tasks, every one counted once.
            .map(|t| tokio::spawn(work(iters / tasks + u64::from(t < iters % tasks))))
            .collect();
        for handle in handles {
            handle.await.unwrap();
        }
        started.elapsed()
    })
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
    // Read until the near cache serves the key.
    let hits = || near.near_cache_stats()[0].hits;
    for _ in 0..200 {
        near.kv().get(KEY).unwrap();
        if hits() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(hits() > 0, "the near cache never served the key");
    for key in BATCH {
        let value = json!({"key": key});
        near.kv()
            .set_with_ttl(key, &value, Duration::from_secs(3600))
            .unwrap();
        let before = hits();
        near.kv().get(key).unwrap();
        while hits() == before {
            std::thread::sleep(Duration::from_millis(10));
            near.kv().get(key).unwrap();
        }
    }
    let near_async = near.to_async();

    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let redis = runtime.block_on(async {
        let client = redis::Client::open(redis).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("SET")
            .arg(KEY)
            .arg(json!({"id": 42, "name": "Ada"}).to_string())
            .query_async::<()>(&mut conn)
            .await
            .ok()?;
        let mut mset = redis::cmd("MSET");
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
        let cache = near_async.clone();
        group.bench_function(BenchmarkId::new("pgcache async", tasks), |b| {
            b.iter_custom(|iters| {
                let cache = cache.clone();
                timed(&runtime, iters, tasks, |share| {
                    let cache = cache.clone();
                    async move {
                        for _ in 0..share {
                            cache.kv().get(KEY).await.unwrap().unwrap();
                        }
                    }
                })
            })
        });
        let blocking = near.clone();
        group.bench_function(BenchmarkId::new("spawn_blocking", tasks), |b| {
            b.iter_custom(|iters| {
                let blocking = blocking.clone();
                timed(&runtime, iters, tasks, |share| {
                    let blocking = blocking.clone();
                    async move {
                        for _ in 0..share {
                            let blocking = blocking.clone();
                            tokio::task::spawn_blocking(move || blocking.kv().get(KEY))
                                .await
                                .unwrap()
                                .unwrap()
                                .unwrap();
                        }
                    }
                })
            })
        });
        if let Some(conn) = &redis {
            let conn = conn.clone();
            group.bench_function(BenchmarkId::new("redis-rs GET", tasks), |b| {
                b.iter_custom(|iters| {
                    let conn = conn.clone();
                    timed(&runtime, iters, tasks, |share| {
                        let mut conn = conn.clone();
                        async move {
                            for _ in 0..share {
                                redis::cmd("GET")
                                    .arg(KEY)
                                    .query_async::<Option<String>>(&mut conn)
                                    .await
                                    .unwrap()
                                    .unwrap();
                            }
                        }
                    })
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("async near batch");
    group.bench_function("pgcache async get_many", |b| {
        b.iter_custom(|iters| {
            let cache = near_async.clone();
            timed(&runtime, iters, 1, |share| {
                let cache = cache.clone();
                async move {
                    for _ in 0..share {
                        let found = cache.kv().get_many(&BATCH).await.unwrap();
                        assert!(found.iter().all(Option::is_some));
                    }
                }
            })
        })
    });
    let blocking = near.clone();
    group.bench_function("spawn_blocking get_many", |b| {
        b.iter_custom(|iters| {
            let blocking = blocking.clone();
            timed(&runtime, iters, 1, |share| {
                let blocking = blocking.clone();
                async move {
                    for _ in 0..share {
                        let blocking = blocking.clone();
                        let found =
                            tokio::task::spawn_blocking(move || blocking.kv().get_many(&BATCH))
                                .await
                                .unwrap()
                                .unwrap();
                        assert!(found.iter().all(Option::is_some));
                    }
                }
            })
        })
    });
    if let Some(conn) = &redis {
        let conn = conn.clone();
        group.bench_function("redis-rs MGET", |b| {
            b.iter_custom(|iters| {
                let conn = conn.clone();
                timed(&runtime, iters, 1, |share| {
                    let mut conn = conn.clone();
                    async move {
                        for _ in 0..share {
                            let found = redis::cmd("MGET")
                                .arg(&BATCH[..])
                                .query_async::<Vec<Option<String>>>(&mut conn)
                                .await
                                .unwrap();
                            assert!(found.iter().all(Option::is_some));
                        }
                    }
                })
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
    let blocking = far.clone();
    group.bench_function("spawn_blocking get", |b| {
        b.iter_custom(|iters| {
            let blocking = blocking.clone();
            timed(&runtime, iters, 1, |share| {
                let blocking = blocking.clone();
                async move {
                    for _ in 0..share {
                        let blocking = blocking.clone();
                        tokio::task::spawn_blocking(move || blocking.kv().get(KEY))
                            .await
                            .unwrap()
                            .unwrap()
                            .unwrap();
                    }
                }
            })
        })
    });
    group.bench_function("pgcache async get", |b| {
        b.iter_custom(|iters| {
            let cache = far_async.clone();
            timed(&runtime, iters, 1, |share| {
                let cache = cache.clone();
                async move {
                    for _ in 0..share {
                        cache.kv().get(KEY).await.unwrap().unwrap();
                    }
                }
            })
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
