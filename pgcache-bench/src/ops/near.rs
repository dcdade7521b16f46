//! The near-cache rows of `pgcache-bench ops`: kv gets served from memory next to Redis
//! GET of the same value in the same run, and what the invalidation triggers cost
//! writers (overwrites with the near cache on against off, alternating slices).

use std::time::{Duration, Instant};

use pgcache::{Cache, CacheKind, CacheManager, LlmPrompt, NearCache};
use serde_json::{json, Value};

use super::{
    bench_config, run_slice, BenchResult, Budget, Results, Samples, Scratch, Worker, TTL, WARMUP,
};

/// Hot keys per value size.
const KEYS: u64 = 1000;

/// How many times finer the writer-cost rows alternate their sides.
const WRITE_SLICING: u32 = 4;

/// The value sizes measured: a small object and a 10 kB one.
const SIZES: [(&str, usize); 2] = [("100 B", 100), ("10 kB", 10_000)];

/// A JSON value of about `bytes` bytes.
fn value_of(bytes: usize) -> Value {
    json!({ "id": 1, "payload": "x".repeat(bytes.saturating_sub(20)) })
}

fn key(size: &str, n: u64) -> String {
    format!("near:{size}:{n}")
}

/// The hot LLM prompts of the writer-cost rows.
fn prompt(n: u64) -> LlmPrompt {
    LlmPrompt::new(format!("near prompt {n}"), "bench")
}

/// Runs the near-cache rows for each thread count in `passes`, in a schema next to
/// the bench's (`bench`). `plain` is the bench's manager (its schema has no
/// near-cache triggers): the "off" side of the writer-cost rows.
pub(super) fn rows(
    bench: &Scratch,
    relaxed: bool,
    passes: &[usize],
    budget: Budget,
    redis_url: Option<&str>,
    plain: &CacheManager,
    results: &mut Results,
) -> BenchResult<()> {
    let url = bench.url.as_str();
    let scratch = Scratch {
        url: url.to_owned(),
        schema: format!("{}_near", bench.schema),
    };
    let max_threads = passes.iter().copied().max().unwrap_or(1);
    let near = CacheManager::new(
        bench_config(url, &scratch.schema, max_threads, relaxed)
            .application_name("pgcache-bench-near")
            .near_cache(CacheKind::Kv, Some(NearCache::new().max_bytes(256 << 20)))
            .near_cache(CacheKind::LlmResponse, Some(NearCache::new()))
            .build()?,
    )?;
    let mut redis = redis_url.map(Redis::connect).transpose()?;
    for (size, bytes) in SIZES {
        let value = value_of(bytes);
        let keys: Vec<String> = (0..KEYS).map(|n| key(size, n)).collect();
        let entries: Vec<(&str, &Value)> = keys.iter().map(|k| (k.as_str(), &value)).collect();
        for chunk in entries.chunks(100) {
            near.kv().set_many(chunk, TTL)?;
            plain.kv().set_many(chunk, TTL)?;
        }
        if let Some(redis) = &mut redis {
            redis.fill(size, &serde_json::to_string(&value)?)?;
        }
    }
    let prompts: Vec<LlmPrompt> = (0..KEYS).map(prompt).collect();
    let response = "a response of about a hundred bytes, as an LLM would give one".repeat(2);
    let responses: Vec<(&LlmPrompt, &String)> = prompts.iter().map(|p| (p, &response)).collect();
    for chunk in responses.chunks(100) {
        near.llm_response().set_many(chunk, TTL)?;
        plain.llm_response().set_many(chunk, TTL)?;
    }
    wait_current(&near)?;
    results.mark("near cache: manager, fill, listener");

    for &threads in passes {
        for (size, _) in SIZES {
            let get = |cache: &mut &CacheManager, w: &mut Worker| -> BenchResult<bool> {
                let n = w.random() % KEYS;
                Ok(cache.kv().get(&key(size, n))?.is_some())
            };
            let mut near_workers: Vec<Worker> =
                (0..threads).map(|t| Worker::new(t, KEYS)).collect();
            let mut near_ctx = vec![&near; threads];
            // Fills the near cache: every key read at least once.
            for n in 0..KEYS {
                near.kv().get(&key(size, n))?;
            }
            results.mark("near cache: first reads");
            let (mut on, mut other) = (Samples::default(), Samples::default());
            match &mut redis {
                Some(redis) => {
                    let mut conns = redis.conns(threads)?;
                    results.mark("redis connections");
                    let mut redis_workers: Vec<Worker> =
                        (0..threads).map(|t| Worker::new(t, KEYS)).collect();
                    let redis_get =
                        |c: &mut redis::Connection, w: &mut Worker| -> BenchResult<bool> {
                            use redis::Commands;
                            let n = w.random() % KEYS;
                            let found: Option<String> = c.get(key(size, n))?;
                            Ok(found
                                .map(|s| serde_json::from_str::<Value>(&s))
                                .transpose()?
                                .is_some())
                        };
                    for _ in 0..budget.slices {
                        run_slice(&mut near_ctx, &mut near_workers, budget, &mut on, &get)?;
                        run_slice(
                            &mut conns,
                            &mut redis_workers,
                            budget,
                            &mut other,
                            &redis_get,
                        )?;
                    }
                    results.record(
                        &format!("near get {size} (vs redis GET)"),
                        threads,
                        on,
                        Some(other),
                    );
                }
                None => {
                    for _ in 0..budget.slices {
                        run_slice(&mut near_ctx, &mut near_workers, budget, &mut on, &get)?;
                    }
                    results.record(&format!("near get {size}"), threads, on, None);
                }
            }
        }

        // Writer cost: overwrites of hot keys, near cache on (stamps, triggers,
        // poller) against off (the plain schema), alternating slices. A new value
        // each time, and the same value again; for an AI cache, a new response
        // each time (an unchanged one is not stamped).
        let same = value_of(SIZES[0].1);
        let changed = |cache: &mut &CacheManager, w: &mut Worker| -> BenchResult<bool> {
            let n = w.random() % KEYS;
            let value = json!({ "id": n, "version": w.iteration, "payload": "x".repeat(64) });
            cache.kv().set_with_ttl(&key(SIZES[0].0, n), &value, TTL)?;
            Ok(true)
        };
        let unchanged = |cache: &mut &CacheManager, w: &mut Worker| -> BenchResult<bool> {
            let n = w.random() % KEYS;
            cache.kv().set_with_ttl(&key(SIZES[0].0, n), &same, TTL)?;
            Ok(true)
        };
        let new_response = |cache: &mut &CacheManager, w: &mut Worker| -> BenchResult<bool> {
            let n = w.random() % KEYS;
            let text = format!(
                "response {} of thread {}: {}",
                w.iteration,
                w.thread,
                "x".repeat(64)
            );
            cache.llm_response().set_with_ttl(&prompt(n), &text, TTL)?;
            Ok(true)
        };
        for (name, set) in [
            (
                "overwrite new value, near on/off",
                &changed as &(dyn Fn(&mut &CacheManager, &mut Worker) -> BenchResult<bool> + Sync),
            ),
            ("overwrite same value, near on/off", &unchanged),
            ("llm set new response, near on/off", &new_response),
        ] {
            let mut on_ctx = vec![&near; threads];
            let mut off_ctx = vec![plain; threads];
            let mut on_workers: Vec<Worker> = (0..threads).map(|t| Worker::new(t, KEYS)).collect();
            let mut off_workers: Vec<Worker> = (0..threads).map(|t| Worker::new(t, KEYS)).collect();
            let warm = Budget {
                slices: 1,
                iterations: Some(WARMUP),
                ..budget
            };
            run_slice(
                &mut on_ctx,
                &mut on_workers,
                warm,
                &mut Samples::default(),
                set,
            )?;
            run_slice(
                &mut off_ctx,
                &mut off_workers,
                warm,
                &mut Samples::default(),
                set,
            )?;
            // Four times as many slices, each a quarter as long: a durable write's
            // throughput follows the WAL flushes and checkpoints, whose stalls last
            // long enough to land on one side's slice and swing the ratio by a
            // quarter either way.
            let writes = Budget {
                slice: budget.slice / WRITE_SLICING,
                slices: budget.slices * WRITE_SLICING,
                ..budget
            };
            let (mut on, mut off) = (Samples::default(), Samples::default());
            for _ in 0..writes.slices {
                run_slice(&mut on_ctx, &mut on_workers, writes, &mut on, set)?;
                run_slice(&mut off_ctx, &mut off_workers, writes, &mut off, set)?;
            }
            results.record(name, threads, on, Some(off));
        }
    }
    if let Some(redis) = &mut redis {
        redis.clear()?;
    }
    drop(near);
    drop(scratch);
    Ok(())
}

/// Waits until the near cache's invalidation channel is current (at most 10 s).
pub(crate) fn wait_current(cache: &CacheManager) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache
        .near_cache_stats()
        .iter()
        .all(|s| s.poll_lag_ms.is_none())
    {
        if Instant::now() > deadline {
            return Err("the near cache's listener did not become current within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The Redis side: the same keys and values.
struct Redis {
    client: redis::Client,
    first: redis::Connection,
}

impl Redis {
    fn connect(url: &str) -> BenchResult<Self> {
        let client = redis::Client::open(url)?;
        let first = client.get_connection()?;
        Ok(Redis { client, first })
    }

    fn conns(&self, n: usize) -> BenchResult<Vec<redis::Connection>> {
        Ok((0..n)
            .map(|_| self.client.get_connection())
            .collect::<Result<_, _>>()?)
    }

    fn fill(&mut self, size: &str, text: &str) -> BenchResult<()> {
        use redis::Commands;
        for n in 0..KEYS {
            let _: () = self.first.set_ex(key(size, n), text, TTL.as_secs())?;
        }
        Ok(())
    }

    fn clear(&mut self) -> BenchResult<()> {
        use redis::Commands;
        for (size, _) in SIZES {
            let keys: Vec<String> = (0..KEYS).map(|n| key(size, n)).collect();
            let _: () = self.first.del(keys)?;
        }
        Ok(())
    }
}
