//! `pgcache-bench ops`: the library against the physical limit, side by side in one
//! run.
//!
//! Every operation is a row of [`operations`]: a library closure (through
//! `CacheManager`, its pool and Diesel) and a raw closure (the same statement,
//! hand-written and prepared once, over a plain `postgres` connection on an
//! identically shaped table). Both run in a scratch schema that is dropped
//! afterwards, alternating in slices so background load hits both alike.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use pgcache::{Cache, CacheConfig, CacheConfigBuilder, CacheManager, Durability};
use postgres::types::{to_sql_checked, IsNull, Json, ToSql, Type};
use postgres::{Client, NoTls, Statement};
use serde_json::{json, Value};

mod app_pool;
mod codec;
pub(crate) mod near;
mod pooler;
mod tags;
mod typed;

use crate::BenchResult;

/// Options of `pgcache-bench ops`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Threads for the concurrent pass (library: one pool; raw: one connection each).
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Rows pre-filled into each table before measuring (the typed caches' tables,
    /// whose values are kilobytes, hold at most 500).
    #[arg(long, default_value_t = 10_000)]
    rows: u64,
    /// Seconds each row measures, its sides together (each side gets half, in
    /// alternating slices); set-up and warm-up come on top.
    #[arg(long, default_value_t = 1.2)]
    duration: f64,
    /// Stop each operation after this many iterations per thread (whichever comes
    /// first with `--duration`).
    #[arg(long)]
    iterations: Option<u64>,
    /// `full` (synchronous commit) or `relaxed` (`synchronous_commit = off` on both
    /// sides' connections).
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    durability: Mode,
    /// Make both sides' tables UNLOGGED (no write-ahead log).
    #[arg(long)]
    unlogged: bool,
    /// Also measure Redis GET/SET (e.g. `redis://127.0.0.1:6379`).
    #[arg(long)]
    redis_url: Option<String>,
    /// Also measure kv get and set through this transaction pooler (PgBouncer in
    /// `pool_mode = transaction` in front of the same database), against the
    /// server directly; full durability only.
    #[arg(long)]
    pooler_url: Option<String>,
    /// Entries carrying the tag the `kv invalidate_tag` row invalidates (filled in
    /// one statement before it).
    #[arg(long, default_value_t = 1_000_000)]
    tagged_entries: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Full,
    Relaxed,
}

/// Values written by the set operations: a small profile-like object.
fn sample_value(n: u64) -> Value {
    json!({"id": n, "name": "Ada Lovelace", "plan": if n % 100 == 0 { "pro" } else { "free" },
           "tags": ["a", "b", "c"], "score": 0.75})
}

pub(crate) const TTL: Duration = Duration::from_secs(3600);
const BATCH: usize = 100;
const PLAN_PRO_FILTER: &str = r#"{"plan": "pro"}"#;

/// Per-thread state, kept across operations so `delete` can remove the keys
/// `set new` inserted.
struct Worker {
    thread: usize,
    rows: u64,
    rng: u64,
    iteration: u64,
    inserted: u64,
    value: Value,
    /// What the bytes rows write: about as long as `value`'s JSON.
    blob: Vec<u8>,
    keys: Vec<String>,
    key: String,
    /// A connection held across iterations, for the `_in` rows.
    held: Option<pgcache::PooledConnection>,
    /// Where the measured part of the current iteration ended, if before its end
    /// (see [`Worker::stop_clock`]).
    stopped: Option<Instant>,
}

impl Worker {
    fn new(thread: usize, rows: u64) -> Self {
        Worker {
            thread,
            rows,
            rng: 0x9E37_79B9_7F4A_7C15 ^ (thread as u64 + 1),
            iteration: 0,
            inserted: 0,
            value: sample_value(thread as u64),
            blob: (0..96u8)
                .map(|i| i.wrapping_mul(37) ^ thread as u8)
                .collect(),
            keys: Vec::with_capacity(BATCH),
            key: String::with_capacity(32),
            held: None,
            stopped: None,
        }
    }

    /// Ends the measured part of this iteration: what follows (e.g. storing again
    /// what the operation took away) is neither in its latency nor in the wall time.
    fn stop_clock(&mut self) {
        self.stopped = Some(Instant::now());
    }

    fn random(&mut self) -> u64 {
        // xorshift64: cheap and identical for both sides.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// A pre-filled key, at random.
    fn existing_key(&mut self) -> &str {
        let n = self.random() % self.rows;
        self.set_key(format_args!("k:{n}"))
    }

    /// A key pre-filled with bytes, at random.
    fn bytes_key(&mut self) -> &str {
        let n = self.random() % self.rows;
        self.set_key(format_args!("b:{n}"))
    }

    fn missing_key(&mut self) -> &str {
        let n = self.random();
        self.set_key(format_args!("missing:{n}"))
    }

    /// The next key `set new` inserts (and `delete` later removes).
    fn new_key(&mut self, n: u64) -> &str {
        let t = self.thread;
        self.set_key(format_args!("n:{t}:{n}"))
    }

    fn set_key(&mut self, args: std::fmt::Arguments<'_>) -> &str {
        self.key.clear();
        let _ = self.key.write_fmt(args);
        &self.key
    }

    /// `BATCH` distinct pre-filled keys from a random start.
    fn batch_keys(&mut self) {
        let start = self.random() % self.rows;
        self.keys.clear();
        for i in 0..BATCH as u64 {
            self.keys.push(format!("k:{}", (start + i) % self.rows));
        }
    }
}

/// One side's connection to the raw baseline: statements prepared once.
struct Raw {
    client: Client,
    get: Statement,
    get_many: Statement,
    upsert: Statement,
    upsert_many: Statement,
    delete: Statement,
    find: Statement,
    incr: Statement,
    set_nx: Statement,
    get_touch: Statement,
    get_bytes: Statement,
    upsert_bytes: Statement,
    get_del: Statement,
    touch_data: Statement,
    typed: typed::RawTyped,
}

impl Raw {
    fn connect(url: &str, schema: &str, relaxed: bool) -> BenchResult<Self> {
        let mut client = Client::connect(url, NoTls)?;
        let mut setup = format!("SET search_path TO \"{schema}\";");
        if relaxed {
            setup.push_str(" SET synchronous_commit = off;");
        }
        client.batch_execute(&setup)?;
        const OVERWRITE: &str = " ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             expires_at = excluded.expires_at, created_at = now()";
        let get = client
            .prepare("SELECT value FROM raw_entries WHERE key = $1 AND expires_at > now()")?;
        let get_many = client.prepare(
            "SELECT key, value FROM raw_entries WHERE key = ANY($1) AND expires_at > now()",
        )?;
        let upsert = client.prepare(&format!(
            "INSERT INTO raw_entries (key, value, expires_at) VALUES ($1, $2, now() + $3){OVERWRITE}"
        ))?;
        let upsert_many = client.prepare(&format!(
            "INSERT INTO raw_entries (key, value, expires_at) SELECT u.k, u.v, now() + $3 \
             FROM unnest($1::text[], $2::jsonb[]) AS u(k, v){OVERWRITE}"
        ))?;
        let delete = client
            .prepare("DELETE FROM raw_entries WHERE key = $1 RETURNING expires_at > now()")?;
        let find = client.prepare(
            "SELECT key, value FROM raw_entries WHERE value @> $1 AND expires_at > now() \
             ORDER BY key LIMIT $2",
        )?;
        // What a hand-written counter and insert-if-absent look like.
        let incr = client.prepare(
            "INSERT INTO raw_entries AS c (key, value, expires_at) \
             VALUES ($1, to_jsonb($2::int8), now() + $3) \
             ON CONFLICT (key) DO UPDATE SET value = to_jsonb((c.value #>> '{}')::int8 + $2) \
             RETURNING (value #>> '{}')::int8",
        )?;
        let set_nx = client.prepare(
            "INSERT INTO raw_entries (key, value, expires_at) VALUES ($1, $2, now() + $3) \
             ON CONFLICT (key) DO NOTHING RETURNING true",
        )?;
        let get_touch = client.prepare(
            "UPDATE raw_entries SET expires_at = now() + $2 \
             WHERE key = $1 AND expires_at > now() RETURNING value",
        )?;
        let get_bytes = client
            .prepare("SELECT bytes FROM raw_entries WHERE key = $1 AND expires_at > now()")?;
        let upsert_bytes = client.prepare(
            "INSERT INTO raw_entries (key, bytes, expires_at) VALUES ($1, $2, now() + $3) \
             ON CONFLICT (key) DO UPDATE SET bytes = excluded.bytes, \
             expires_at = excluded.expires_at, created_at = now()",
        )?;
        let get_del = client.prepare(
            "DELETE FROM raw_entries WHERE key = $1 RETURNING value, expires_at > now()",
        )?;
        let touch_data =
            client.prepare("UPDATE bench_data SET version = version + 1 WHERE id = $1")?;
        let typed = typed::RawTyped::prepare(&mut client)?;
        Ok(Raw {
            client,
            get,
            get_many,
            upsert,
            upsert_many,
            delete,
            find,
            incr,
            set_nx,
            get_touch,
            get_bytes,
            upsert_bytes,
            get_del,
            touch_data,
            typed,
        })
    }
}

/// A TTL bound as `interval` (microseconds, days, months), as Diesel binds it.
#[derive(Debug)]
pub(crate) struct Interval(pub(crate) Duration);

impl ToSql for Interval {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&(self.0.as_micros() as i64).to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INTERVAL
    }

    to_sql_checked!();
}

/// The application's own data table, for the transactional invalidation.
mod data {
    diesel::table! {
        bench_data (id) {
            id -> Int8,
            version -> Int8,
        }
    }
}

/// What one iteration of an operation does; `Ok(false)` means there is nothing left
/// to do (e.g. `delete` ran out of inserted keys).
type LibFn = fn(&CacheManager, &mut Worker) -> BenchResult<bool>;
type RawFn = fn(&mut Raw, &mut Worker) -> BenchResult<bool>;

/// A named operation measured on both sides.
struct Operation {
    name: &'static str,
    lib: LibFn,
    raw: RawFn,
}

fn operations() -> Vec<Operation> {
    let mut operations = kv_operations();
    operations.extend(typed::operations());
    operations
}

fn kv_operations() -> Vec<Operation> {
    vec![
        Operation {
            name: "kv get hit",
            lib: |cache, w| Ok(cache.kv().get(w.existing_key())?.is_some()),
            raw: |raw, w| {
                let key = w.existing_key();
                let row = raw.client.query_opt(&raw.get, &[&key])?;
                Ok(row.map(|r| r.get::<_, Value>(0)).is_some())
            },
        },
        Operation {
            // What the pool checkout adds: the same read on a connection held by the
            // caller.
            name: "kv get_in hit (held conn)",
            lib: |cache, w| {
                let mut conn = match w.held.take() {
                    Some(conn) => conn,
                    None => cache.connection()?,
                };
                let found = cache.kv().get_in(&mut conn, w.existing_key())?;
                w.held = Some(conn);
                Ok(found.is_some())
            },
            raw: |raw, w| {
                let key = w.existing_key();
                let row = raw.client.query_opt(&raw.get, &[&key])?;
                Ok(row.map(|r| r.get::<_, Value>(0)).is_some())
            },
        },
        Operation {
            name: "kv get miss",
            lib: |cache, w| Ok(cache.kv().get(w.missing_key())?.is_none()),
            raw: |raw, w| {
                let key = w.missing_key();
                let row = raw.client.query_opt(&raw.get, &[&key])?;
                Ok(row.map(|r| r.get::<_, Value>(0)).is_none())
            },
        },
        Operation {
            name: "kv set new",
            lib: |cache, w| {
                let n = w.inserted;
                w.inserted += 1;
                let value = w.value.clone();
                cache.kv().set_with_ttl(w.new_key(n), &value, TTL)?;
                Ok(true)
            },
            raw: |raw, w| {
                let n = w.inserted;
                w.inserted += 1;
                let value = w.value.clone();
                let key = w.new_key(n);
                raw.client
                    .execute(&raw.upsert, &[&key, &Json(&value), &Interval(TTL)])?;
                Ok(true)
            },
        },
        Operation {
            name: "kv set overwrite",
            lib: |cache, w| {
                let value = w.value.clone();
                cache.kv().set_with_ttl(w.existing_key(), &value, TTL)?;
                Ok(true)
            },
            raw: |raw, w| {
                let value = w.value.clone();
                let key = w.existing_key();
                raw.client
                    .execute(&raw.upsert, &[&key, &Json(&value), &Interval(TTL)])?;
                Ok(true)
            },
        },
        Operation {
            name: "kv incr",
            lib: |cache, w| {
                let n = w.random() % 1000;
                let key = w.set_key(format_args!("counter:{n}"));
                Ok(cache.kv().incr(key, 1, TTL)? > 0)
            },
            raw: |raw, w| {
                let n = w.random() % 1000;
                let key = w.set_key(format_args!("counter:{n}"));
                let row = raw
                    .client
                    .query_one(&raw.incr, &[&key, &1i64, &Interval(TTL)])?;
                Ok(row.get::<_, i64>(0) > 0)
            },
        },
        Operation {
            // The contended case of a lock or idempotency key: already taken.
            name: "kv set_nx (taken)",
            lib: |cache, w| {
                let value = w.value.clone();
                Ok(!cache.kv().set_nx(w.existing_key(), &value, TTL)?)
            },
            raw: |raw, w| {
                let value = w.value.clone();
                let key = w.existing_key();
                let row = raw
                    .client
                    .query_opt(&raw.set_nx, &[&key, &Json(&value), &Interval(TTL)])?;
                Ok(row.is_none())
            },
        },
        Operation {
            name: "kv get_touch (sliding)",
            lib: |cache, w| Ok(cache.kv().get_touch(w.existing_key(), TTL)?.is_some()),
            raw: |raw, w| {
                let key = w.existing_key();
                let row = raw
                    .client
                    .query_opt(&raw.get_touch, &[&key, &Interval(TTL)])?;
                Ok(row.map(|r| r.get::<_, Value>(0)).is_some())
            },
        },
        Operation {
            // Take a pre-filled entry, then (unmeasured) store it again, each side
            // with its own set, so every iteration takes a live entry.
            name: "kv get_del (hit)",
            lib: |cache, w| {
                let taken = cache.kv().get_del(w.existing_key())?;
                w.stop_clock();
                let value = w.value.clone();
                cache.kv().set_with_ttl(&w.key, &value, TTL)?;
                Ok(taken.is_some())
            },
            raw: |raw, w| {
                let key = w.existing_key();
                let row = raw.client.query_opt(&raw.get_del, &[&key])?;
                let taken = row.and_then(|r| r.get::<_, bool>(1).then(|| r.get::<_, Value>(0)));
                w.stop_clock();
                let value = w.value.clone();
                raw.client
                    .execute(&raw.upsert, &[&w.key, &Json(&value), &Interval(TTL)])?;
                Ok(taken.is_some())
            },
        },
        Operation {
            name: "kv delete",
            lib: |cache, w| {
                let Some(n) = w.next_inserted() else {
                    return Ok(false);
                };
                cache.kv().delete(w.new_key(n))?;
                Ok(true)
            },
            raw: |raw, w| {
                let Some(n) = w.next_inserted() else {
                    return Ok(false);
                };
                let key = w.new_key(n);
                raw.client.query_opt(&raw.delete, &[&key])?;
                Ok(true)
            },
        },
        Operation {
            name: "kv get_many(100)",
            lib: |cache, w| {
                w.batch_keys();
                let keys: Vec<&str> = w.keys.iter().map(String::as_str).collect();
                Ok(cache.kv().get_many(&keys)?.len() == BATCH)
            },
            raw: |raw, w| {
                w.batch_keys();
                let rows = raw.client.query(&raw.get_many, &[&w.keys])?;
                let by_key: HashMap<&str, Value> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                let found: Vec<Option<&Value>> =
                    w.keys.iter().map(|k| by_key.get(k.as_str())).collect();
                Ok(found.len() == BATCH)
            },
        },
        Operation {
            name: "kv set_many(100)",
            lib: |cache, w| {
                w.batch_keys();
                let value = w.value.clone();
                let entries: Vec<(&str, &Value)> =
                    w.keys.iter().map(|k| (k.as_str(), &value)).collect();
                cache.kv().set_many(&entries, TTL)?;
                Ok(true)
            },
            raw: |raw, w| {
                w.batch_keys();
                let value = w.value.clone();
                let values: Vec<Json<&Value>> = w.keys.iter().map(|_| Json(&value)).collect();
                raw.client
                    .execute(&raw.upsert_many, &[&w.keys, &values, &Interval(TTL)])?;
                Ok(true)
            },
        },
        Operation {
            name: "kv get_bytes",
            lib: |cache, w| Ok(cache.kv().get_bytes(w.bytes_key())?.is_some()),
            raw: |raw, w| {
                let key = w.bytes_key();
                let row = raw.client.query_opt(&raw.get_bytes, &[&key])?;
                Ok(row.map(|r| r.get::<_, Vec<u8>>(0)).is_some())
            },
        },
        Operation {
            name: "kv set_bytes",
            lib: |cache, w| {
                let blob = std::mem::take(&mut w.blob);
                cache.kv().set_bytes(w.bytes_key(), &blob, TTL)?;
                w.blob = blob;
                Ok(true)
            },
            raw: |raw, w| {
                let blob = std::mem::take(&mut w.blob);
                let key = w.bytes_key();
                raw.client
                    .execute(&raw.upsert_bytes, &[&key, &blob, &Interval(TTL)])?;
                w.blob = blob;
                Ok(true)
            },
        },
        Operation {
            name: "kv jsonb query",
            lib: |cache, _| {
                let filter: Value = serde_json::from_str(PLAN_PRO_FILTER)?;
                Ok(!cache.kv().find_containing(&filter, 10)?.is_empty())
            },
            raw: |raw, _| {
                let filter: Value = serde_json::from_str(PLAN_PRO_FILTER)?;
                let rows = raw.client.query(&raw.find, &[&Json(&filter), &10i64])?;
                let found: Vec<(String, Value)> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                Ok(!found.is_empty())
            },
        },
        Operation {
            name: "transactional invalidation",
            lib: |cache, w| {
                let id = (w.random() % w.rows) as i64;
                let key = w.set_key(format_args!("u:{id}:profile")).to_owned();
                let mut conn = cache.connection()?;
                conn.transaction(|conn| {
                    diesel::update(data::bench_data::table.find(id))
                        .set(data::bench_data::version.eq(data::bench_data::version + 1))
                        .execute(conn)?;
                    cache.kv().delete_in(conn, &key)?;
                    Ok::<_, pgcache::Error>(())
                })?;
                Ok(true)
            },
            raw: |raw, w| {
                let id = (w.random() % w.rows) as i64;
                let key = w.set_key(format_args!("u:{id}:profile")).to_owned();
                let mut tx = raw.client.transaction()?;
                tx.execute(&raw.touch_data, &[&id])?;
                tx.query_opt(&raw.delete, &[&key])?;
                tx.commit()?;
                Ok(true)
            },
        },
    ]
}

impl Worker {
    /// The next key inserted by `set new` that `delete` has not removed yet.
    fn next_inserted(&mut self) -> Option<u64> {
        (self.iteration < self.inserted).then_some(self.iteration)
    }
}

/// Latency samples (nanoseconds) and wall time of one side of one operation.
#[derive(Default)]
struct Samples {
    nanos: Vec<u64>,
    wall: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    ops_per_sec: f64,
    samples: usize,
}

impl Samples {
    /// The figures, or `None` without a single sample (an operation that had
    /// nothing to do, such as `delete` with no inserted key left).
    fn figures(mut self) -> Option<Figures> {
        if self.nanos.is_empty() {
            return None;
        }
        self.nanos.sort_unstable();
        let pick = |q: f64| -> f64 {
            let i = ((self.nanos.len() - 1) as f64 * q).round() as usize;
            self.nanos[i] as f64 / 1000.0
        };
        Some(Figures {
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            ops_per_sec: self.nanos.len() as f64 / self.wall.as_secs_f64().max(1e-9),
            samples: self.nanos.len(),
        })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    operation: String,
    threads: usize,
    pgcache: Figures,
    raw: Option<Figures>,
    /// pgcache p50 / raw p50.
    p50_ratio: Option<f64>,
    /// pgcache ops/s / raw ops/s.
    throughput_ratio: Option<f64>,
    /// Wall time the row took, warm-up included.
    seconds: f64,
}

/// How long and how often each side of an operation runs.
#[derive(Clone, Copy)]
struct Budget {
    slice: Duration,
    slices: u32,
    iterations: Option<u64>,
}

/// Alternating slices of each side, so a burst of background load hits both.
const SLICES: u32 = 4;
const WARMUP: u64 = 30;

/// Runs `step` on `threads` workers for one slice and appends the latencies.
fn run_slice<C: Send>(
    contexts: &mut [C],
    workers: &mut [Worker],
    budget: Budget,
    out: &mut Samples,
    step: &(dyn Fn(&mut C, &mut Worker) -> BenchResult<bool> + Sync),
) -> BenchResult<()> {
    let per_slice = budget
        .iterations
        .map(|n| n.div_ceil(u64::from(budget.slices)));
    let started = Instant::now();
    let results: Vec<BenchResult<(Vec<u64>, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = contexts
            .iter_mut()
            .zip(workers.iter_mut())
            .map(|(ctx, w)| {
                scope.spawn(move || {
                    let mut nanos = Vec::with_capacity(4096);
                    let mut untimed = Duration::ZERO;
                    let begin = Instant::now();
                    while begin.elapsed() < budget.slice + untimed
                        && per_slice.is_none_or(|n| (nanos.len() as u64) < n)
                    {
                        let t = Instant::now();
                        let more = step(ctx, w)?;
                        let end = Instant::now();
                        let stopped = w.stopped.take().unwrap_or(end);
                        untimed += end - stopped;
                        w.iteration += 1;
                        if !more {
                            break;
                        }
                        nanos.push((stopped - t).as_nanos() as u64);
                    }
                    Ok((nanos, untimed))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    let mut untimed = Duration::ZERO;
    for r in results {
        let (nanos, unmeasured) = r?;
        out.nanos.extend(nanos);
        untimed += unmeasured;
    }
    // The threads ran side by side: their mean unmeasured time is the wall's share.
    out.wall += started
        .elapsed()
        .saturating_sub(untimed / contexts.len().max(1) as u32);
    Ok(())
}

/// A row of two managers side by side: `step` on `sides[0]` (the "pgcache"
/// columns) and on `sides[1]` (the "raw" ones), in alternating slices after a
/// warm-up on each, for each thread count of `passes`.
fn side_by_side(
    name: &str,
    sides: [&CacheManager; 2],
    passes: &[usize],
    budget: Budget,
    results: &mut Results,
    step: &(dyn Fn(&CacheManager, &mut Worker) -> BenchResult<bool> + Sync),
) -> BenchResult<()> {
    let step = |cache: &mut &CacheManager, w: &mut Worker| step(cache, w);
    for &threads in passes {
        let contexts = sides.map(|cache| vec![cache; threads]);
        let [first, second] = alternate(contexts, 2000, 1000, budget, &step)?;
        results.record(name, threads, first, Some(second));
    }
    Ok(())
}

struct Sides<'a> {
    cache: &'a CacheManager,
    lib_workers: Vec<Worker>,
    raws: Vec<Raw>,
    raw_workers: Vec<Worker>,
}

fn measure(
    sides: &mut Sides<'_>,
    op: &Operation,
    budget: Budget,
) -> BenchResult<(Samples, Samples)> {
    let threads = sides.raws.len();
    let mut caches = vec![sides.cache; threads];
    let lib_step = |cache: &mut &CacheManager, w: &mut Worker| (op.lib)(cache, w);
    let raw_step = |raw: &mut Raw, w: &mut Worker| (op.raw)(raw, w);
    for w in sides
        .lib_workers
        .iter_mut()
        .chain(sides.raw_workers.iter_mut())
    {
        w.iteration = 0;
    }
    // Warm-up: prepares statements on every connection involved.
    let warm = Budget {
        slice: budget.slice,
        slices: 1,
        iterations: Some(WARMUP),
    };
    run_slice(
        &mut caches,
        &mut sides.lib_workers,
        warm,
        &mut Samples::default(),
        &lib_step,
    )?;
    run_slice(
        &mut sides.raws,
        &mut sides.raw_workers,
        warm,
        &mut Samples::default(),
        &raw_step,
    )?;
    let (mut lib, mut raw) = (Samples::default(), Samples::default());
    for _ in 0..budget.slices {
        run_slice(
            &mut caches,
            &mut sides.lib_workers,
            budget,
            &mut lib,
            &lib_step,
        )?;
        run_slice(
            &mut sides.raws,
            &mut sides.raw_workers,
            budget,
            &mut raw,
            &raw_step,
        )?;
    }
    // Give held connections back, or the next operations would share fewer.
    for w in &mut sides.lib_workers {
        w.held = None;
    }
    Ok((lib, raw))
}

/// Runs `step` on two sides, each with its contexts (one per thread) and workers
/// numbered from `first_worker` (over `rows` keys), alternating slices after a
/// warm-up that prepares the statements on every connection: each side's samples.
/// For rows that compare two library set-ups instead of the library and raw SQL.
fn alternate<C: Send>(
    mut contexts: [Vec<C>; 2],
    first_worker: usize,
    rows: u64,
    budget: Budget,
    step: &(dyn Fn(&mut C, &mut Worker) -> BenchResult<bool> + Sync),
) -> BenchResult<[Samples; 2]> {
    let mut workers: [Vec<Worker>; 2] = [0, 1].map(|side| {
        (0..contexts[side].len())
            .map(|t| Worker::new(first_worker + side * 100 + t, rows))
            .collect()
    });
    let warm = Budget {
        slices: 1,
        iterations: Some(WARMUP),
        ..budget
    };
    let mut samples = [Samples::default(), Samples::default()];
    for (ctx, w) in contexts.iter_mut().zip(&mut workers) {
        run_slice(ctx, w, warm, &mut Samples::default(), step)?;
    }
    for _ in 0..budget.slices {
        for ((ctx, w), out) in contexts.iter_mut().zip(&mut workers).zip(&mut samples) {
            run_slice(ctx, w, budget, out, step)?;
        }
    }
    Ok(samples)
}

/// The library side's settings: `threads` callers on `schema`, at the run's
/// durability, values stored as given (no compression), as the raw statements
/// they are compared with store them and read them back from the same tables; the
/// codec's rows turn compression on themselves.
pub(crate) fn bench_config(
    url: &str,
    schema: &str,
    threads: usize,
    relaxed: bool,
) -> CacheConfigBuilder {
    CacheConfig::builder()
        .database_url(url)
        .schema(schema)
        .pool_max_size(threads as u32 + 1)
        .compression_threshold(None)
        .durability(if relaxed {
            Durability::Relaxed
        } else {
            Durability::Full
        })
}

/// The scratch schema, dropped however the run ends.
pub(crate) struct Scratch {
    pub(crate) url: String,
    pub(crate) schema: String,
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

/// Entry point of `pgcache-bench ops`: measures the database at `database_url`
/// (default: `DATABASE_URL` and the other `CacheConfig` variables), in a scratch
/// schema dropped afterwards. `quiet` prints nothing but JSON (when asked for) and
/// errors.
///
/// # Errors
/// Configuration, connection and database errors, with what failed.
pub fn run(args: &BenchArgs, database_url: Option<&str>, quiet: bool) -> BenchResult<()> {
    let started = Instant::now();
    let threads = args.threads.max(1);
    let rows = args.rows.max(BATCH as u64);
    let (url, shown) = crate::database_url(database_url, "pgcache-bench ops")?;
    let scratch = Scratch {
        url: url.clone(),
        schema: format!("pgcache_bench_{}", uuid::Uuid::new_v4().simple()),
    };
    let relaxed = args.durability == Mode::Relaxed;
    if relaxed && args.pooler_url.is_some() {
        return Err(
            "--pooler-url measures full durability only: relaxed durability \
                    is a session setting a transaction pooler would leak"
                .into(),
        );
    }
    let config = bench_config(&url, &scratch.schema, threads, relaxed)
        .application_name("pgcache-bench")
        .build()?;
    // `--quiet`: the run's description is not an error.
    if !quiet {
        eprintln!(
            "pgcache-bench ops: {} rows, {} thread(s), {}{}, {:.2} s per row, on {} (no TLS)",
            rows,
            threads,
            if relaxed { "relaxed" } else { "full" },
            if args.unlogged { " + unlogged" } else { "" },
            args.duration,
            shown
        );
    }
    let mut results = Results::new(if args.json && !quiet {
        Echo::Stderr
    } else if args.json || quiet {
        Echo::Nothing
    } else {
        Echo::Stdout
    });
    results.last = started;
    let cache = CacheManager::new(config)?;
    if args.unlogged {
        cache.set_tables_logged(false)?;
    }
    results.mark("manager and migrations");
    prepare_tables(
        &cache,
        &url,
        &scratch.schema,
        rows,
        args.unlogged,
        &mut results,
    )?;

    let disabled_get_ns = disabled_get_cost()?;
    results.mark("ENABLE_CACHING=false get cost");
    // A row's two sides share its duration.
    let slice = Duration::from_secs_f64(args.duration.max(0.01) / f64::from(2 * SLICES));
    let budget = Budget {
        slice,
        slices: SLICES,
        iterations: args.iterations,
    };
    let passes = if threads == 1 {
        vec![1]
    } else {
        vec![1, threads]
    };
    for (pass, n) in passes.iter().copied().enumerate() {
        // Each pass inserts its own new keys (`n:<thread>:<i>`).
        let ids = move |t: usize| pass * 1000 + t;
        let mut sides = Sides {
            cache: &cache,
            lib_workers: (0..n).map(|t| Worker::new(ids(t), rows)).collect(),
            raws: (0..n)
                .map(|_| Raw::connect(&url, &scratch.schema, relaxed))
                .collect::<BenchResult<_>>()?,
            raw_workers: (0..n).map(|t| Worker::new(ids(t), rows)).collect(),
        };
        results.mark("raw connections");
        for op in operations() {
            let (lib, raw) = measure(&mut sides, &op, budget)?;
            results.record(op.name, n, lib, Some(raw));
        }
        if let Some(redis_url) = &args.redis_url {
            redis_rows(redis_url, n, budget, &mut results)?;
        }
    }
    if let Some(pooler_url) = &args.pooler_url {
        pooler::rows(
            &scratch,
            &plaintext(pooler_url)?,
            rows,
            &passes,
            budget,
            &cache,
            &mut results,
        )?;
    }
    app_pool::rows(&url, &scratch.schema, &passes, budget, &mut results)?;
    tags::rows(
        &url,
        &scratch.schema,
        args.tagged_entries,
        &passes,
        budget,
        &cache,
        &mut results,
    )?;
    codec::rows(&url, &scratch.schema, &passes, budget, &mut results)?;
    // Last: its triggers live in a schema of their own, so no row above pays them.
    near::rows(
        &scratch,
        relaxed,
        &passes,
        budget,
        args.redis_url.as_deref(),
        &cache,
        &mut results,
    )?;
    drop(cache);
    drop(scratch);

    let report = Report {
        rows,
        threads,
        durability: if relaxed { "relaxed" } else { "full" },
        unlogged: args.unlogged,
        disabled_get_ns,
        duration: args.duration,
        wall_seconds: started.elapsed().as_secs_f64(),
        setup_seconds: results.setup.as_secs_f64(),
        setup: results.phases,
        results: results.rows,
        unmeasured: results.unmeasured,
        notes: results.notes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !quiet {
        print!("{}", report.render());
    }
    Ok(())
}

/// The URL with `sslmode=disable` unless it names an sslmode: libpq's default
/// (`prefer`) would encrypt the library's connections while the raw side's are
/// plain, and TLS costs more per round trip than everything pgcache does. The raw
/// client has no TLS, so a URL requiring it cannot be measured.
pub(crate) fn plaintext(url: &str) -> BenchResult<String> {
    let mut parsed = url::Url::parse(url)?;
    match parsed.query_pairs().find(|(k, _)| k == "sslmode") {
        Some((_, mode)) if !matches!(&*mode, "disable" | "allow" | "prefer") => Err(format!(
            "sslmode={mode}: the raw baseline connects without TLS, so it cannot be compared"
        )
        .into()),
        Some(_) => Ok(url.to_owned()),
        None => {
            parsed.query_pairs_mut().append_pair("sslmode", "disable");
            Ok(parsed.to_string())
        }
    }
}

/// Pre-fills each cache table and its raw twin with the same rows and creates the
/// application data table.
fn prepare_tables(
    cache: &CacheManager,
    url: &str,
    schema: &str,
    rows: u64,
    unlogged: bool,
    results: &mut Results,
) -> BenchResult<()> {
    let mut client = Client::connect(url, NoTls)?;
    client.batch_execute(&format!("SET search_path TO \"{schema}\""))?;
    let unlogged = if unlogged { "UNLOGGED " } else { "" };
    // `LIKE ... INCLUDING ALL` copies columns, defaults, checks and indexes but not
    // the storage options (fillfactor, autovacuum), so those are copied by hand.
    let create_like = |client: &mut Client, table: &str, raw: &str| -> BenchResult<()> {
        let options: Option<String> = client
            .query_one(
                "SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = $1::text::regclass",
                &[&table],
            )?
            .get(0);
        let with = options.map(|o| format!(" WITH ({o})")).unwrap_or_default();
        client.batch_execute(&format!(
            "CREATE {unlogged}TABLE {raw} (LIKE {table} INCLUDING ALL){with}"
        ))?;
        Ok(())
    };
    create_like(&mut client, "cache_entries", "raw_entries")?;
    let value_sql = "jsonb_build_object('id', g, 'name', 'Ada Lovelace', \
         'plan', CASE WHEN g % 100 = 0 THEN 'pro' ELSE 'free' END, \
         'tags', jsonb_build_array('a', 'b', 'c'), 'score', 0.75)";
    client.batch_execute(&format!(
        "CREATE {unlogged}TABLE bench_data (id BIGINT PRIMARY KEY, version BIGINT NOT NULL DEFAULT 0);
         INSERT INTO bench_data (id) SELECT g FROM generate_series(0, {last}) g;
         INSERT INTO cache_entries (key, value, expires_at)
           SELECT 'k:' || g, {value_sql}, now() + interval '1 day' FROM generate_series(0, {last}) g;
         INSERT INTO cache_entries (key, bytes, expires_at)
           SELECT 'b:' || g, decode(repeat(md5(g::text), 6), 'hex'), now() + interval '1 day'
           FROM generate_series(0, {last}) g;
         INSERT INTO raw_entries SELECT * FROM cache_entries;",
        last = rows - 1
    ))?;
    results.mark("kv tables filled");
    typed::prepare_tables(cache, &mut client, rows, create_like)?;
    results.mark("typed tables filled");
    // Separately: VACUUM cannot run in the implicit transaction of a multi-statement
    // query.
    let tables = ["cache_entries", "raw_entries", "bench_data"]
        .into_iter()
        .map(str::to_owned)
        .chain(typed::tables());
    for table in tables {
        client.batch_execute(&format!("VACUUM ANALYZE {table}"))?;
    }
    results.mark("vacuum analyze");
    Ok(())
}

/// Nanoseconds per `kv().get` with `ENABLE_CACHING=false`.
fn disabled_get_cost() -> BenchResult<f64> {
    let cache = CacheManager::new(CacheConfig::builder().enabled(false).build()?)?;
    let kv = cache.kv();
    const N: u32 = 1_000_000;
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(kv.get(std::hint::black_box("user:42:profile:v2"))?);
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(N))
}

fn redis_rows(url: &str, threads: usize, budget: Budget, results: &mut Results) -> BenchResult<()> {
    use redis::Commands;
    let client = redis::Client::open(url)?;
    let mut conns: Vec<redis::Connection> = (0..threads)
        .map(|_| client.get_connection())
        .collect::<Result<_, _>>()?;
    let text = serde_json::to_string(&sample_value(0))?;
    for i in 0..1000u64 {
        let _: () = conns[0].set_ex(format!("pgcache_bench:k:{i}"), &text, 3600)?;
    }
    results.mark("redis fill");
    let get = |c: &mut redis::Connection, w: &mut Worker| -> BenchResult<bool> {
        let n = w.random() % 1000;
        let key = w.set_key(format_args!("pgcache_bench:k:{n}"));
        let found: Option<String> = c.get(key)?;
        Ok(found
            .map(|s| serde_json::from_str::<Value>(&s))
            .transpose()?
            .is_some())
    };
    let set = |c: &mut redis::Connection, w: &mut Worker| -> BenchResult<bool> {
        let n = w.random() % 1000;
        let text = serde_json::to_string(&w.value)?;
        let key = w.set_key(format_args!("pgcache_bench:k:{n}"));
        let _: () = c.set_ex(key, text, 3600)?;
        Ok(true)
    };
    for (name, step) in [
        (
            "redis GET",
            &get as &(dyn Fn(&mut redis::Connection, &mut Worker) -> BenchResult<bool> + Sync),
        ),
        ("redis SET", &set),
    ] {
        let mut workers: Vec<Worker> = (0..threads).map(|t| Worker::new(t, 1000)).collect();
        let mut samples = Samples::default();
        for _ in 0..budget.slices {
            run_slice(&mut conns, &mut workers, budget, &mut samples, step)?;
        }
        results.record(name, threads, samples, None);
    }
    let keys: Vec<String> = (0..1000).map(|i| format!("pgcache_bench:k:{i}")).collect();
    let _: () = conns[0].del(keys)?;
    Ok(())
}

impl Row {
    /// The row as a line of the table.
    fn line(&self) -> String {
        let mut out = format!(
            "{:<28} {:>3} | {:>9.1} {:>9.1} {:>9.0} |",
            self.operation,
            self.threads,
            self.pgcache.p50_us,
            self.pgcache.p99_us,
            self.pgcache.ops_per_sec
        );
        let _ = match (&self.raw, self.p50_ratio, self.throughput_ratio) {
            (Some(raw), Some(p), Some(t)) => write!(
                out,
                " {:>9.1} {:>9.1} {:>9.0} | {:>6.2} {:>6.2}",
                raw.p50_us, raw.p99_us, raw.ops_per_sec, p, t
            ),
            _ => write!(
                out,
                " {:>9} {:>9} {:>9} | {:>6} {:>6}",
                "-", "-", "-", "-", "-"
            ),
        };
        out
    }

    fn new(
        operation: &str,
        threads: usize,
        pgcache: Figures,
        raw: Option<Figures>,
        seconds: f64,
    ) -> Self {
        let p50_ratio = raw.as_ref().map(|r| pgcache.p50_us / r.p50_us);
        let throughput_ratio = raw.as_ref().map(|r| pgcache.ops_per_sec / r.ops_per_sec);
        Row {
            operation: operation.to_owned(),
            threads,
            pgcache,
            raw,
            p50_ratio,
            throughput_ratio,
            seconds,
        }
    }
}

/// The rows measured so far, each shown as soon as it is measured (a full run takes
/// about a minute): the table on stdout, or on stderr with `--json` (whose stdout is
/// the final document), or nowhere with `--quiet`.
struct Results {
    rows: Vec<Row>,
    /// Figures that are not latencies (e.g. the codec's stored sizes).
    notes: Vec<String>,
    /// Rows with no sample on a side, and why.
    unmeasured: Vec<Unmeasured>,
    echo: Echo,
    /// When the last row was recorded or set-up ended ([`Results::mark`]).
    last: Instant,
    /// Time spent outside rows: tables, managers, connections, fills.
    setup: Duration,
    /// The same, phase by phase.
    phases: Vec<Phase>,
}

/// A stretch of set-up and how long it took.
#[derive(Debug, serde::Serialize)]
struct Phase {
    phase: &'static str,
    seconds: f64,
}

/// A row left out of the results: one of its sides ran no iteration.
#[derive(Debug, serde::Serialize)]
struct Unmeasured {
    operation: String,
    threads: usize,
    reason: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Echo {
    Stdout,
    Stderr,
    Nothing,
}

impl Results {
    /// No rows yet; shows the table's header.
    fn new(echo: Echo) -> Self {
        let results = Results {
            rows: Vec::new(),
            notes: Vec::new(),
            unmeasured: Vec::new(),
            echo,
            last: Instant::now(),
            setup: Duration::ZERO,
            phases: Vec::new(),
        };
        let header = format!(
            "\n{:<28} {:>3} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>6} {:>6}\n{}",
            "operation",
            "thr",
            "p50 us",
            "p99 us",
            "ops/s",
            "raw p50",
            "raw p99",
            "raw ops/s",
            "p50 x",
            "ops x",
            "-".repeat(118)
        );
        results.show(&header);
        results
    }

    /// Ends a stretch of set-up: the time since the last row is not the next row's.
    fn mark(&mut self, phase: &'static str) {
        let took = self.last.elapsed();
        self.setup += took;
        self.phases.push(Phase {
            phase,
            seconds: took.as_secs_f64(),
        });
        self.last = Instant::now();
    }

    /// Records a row from both sides' samples; a row with no sample on a side is
    /// left out of the table and listed, with the reason, under it.
    fn record(&mut self, operation: &str, threads: usize, pgcache: Samples, raw: Option<Samples>) {
        let seconds = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let raw_side = raw.map(Samples::figures);
        match (pgcache.figures(), raw_side) {
            (Some(pgcache), None) => {
                self.push(Row::new(operation, threads, pgcache, None, seconds))
            }
            (Some(pgcache), Some(Some(raw))) => {
                self.push(Row::new(operation, threads, pgcache, Some(raw), seconds))
            }
            (lib, raw) => {
                let side = if lib.is_none() { "first" } else { "second" };
                let reason = if raw.is_some_and(|r| r.is_none()) && lib.is_none() {
                    "no sample on either side".to_owned()
                } else {
                    format!("no sample on the {side} side")
                };
                let reason = format!(
                    "{reason}: it had nothing to do in its time (e.g. no key left to delete)"
                );
                self.show(&format!(
                    "{operation:<28} {threads:>3} | not measured: {reason}"
                ));
                self.unmeasured.push(Unmeasured {
                    operation: operation.to_owned(),
                    threads,
                    reason,
                });
            }
        }
    }

    /// Records a figure that is not a latency.
    fn note(&mut self, note: String) {
        self.show(&note);
        self.notes.push(note);
    }

    fn push(&mut self, row: Row) {
        self.show(&row.line());
        self.rows.push(row);
    }

    fn show(&self, line: &str) {
        match self.echo {
            Echo::Stdout => {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                // A closed pipe only loses the view; the run goes on.
                let _ = writeln!(out, "{line}").and_then(|()| out.flush());
            }
            Echo::Stderr => eprintln!("{line}"),
            Echo::Nothing => {}
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Report {
    rows: u64,
    threads: usize,
    durability: &'static str,
    unlogged: bool,
    /// Nanoseconds per get with caching disabled.
    disabled_get_ns: f64,
    /// Seconds each row measured (its sides together).
    duration: f64,
    /// Wall time of the whole run, and the part of it outside rows.
    wall_seconds: f64,
    setup_seconds: f64,
    /// Where the set-up time went.
    setup: Vec<Phase>,
    results: Vec<Row>,
    /// Rows left out for want of samples, and why.
    unmeasured: Vec<Unmeasured>,
    /// Figures that are not latencies.
    notes: Vec<String>,
}

/// The Node package's estimated "Performance Characteristics" (the design pgcache
/// replaces) and the operation measuring each.
const ESTIMATES: [(&str, &str, &str, &str); 4] = [
    ("Simple GET", "~1-2ms", "~0.5-1ms", "kv get hit"),
    (
        "Complex Query",
        "~2-5ms",
        "N/A (requires app logic)",
        "kv get_many(100)",
    ),
    ("JSONB Query", "~2-3ms", "N/A", "kv jsonb query"),
    ("Transactional", "Yes", "No", "transactional invalidation"),
];

impl Report {
    fn find(&self, operation: &str, threads: usize) -> Option<&Row> {
        self.results
            .iter()
            .find(|r| r.operation == operation && r.threads == threads)
    }

    /// What follows the table of rows: the disabled-cache cost, the estimates and
    /// the targets.
    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nENABLE_CACHING=false: kv get costs {:.1} ns and opens no connection",
            self.disabled_get_ns
        );

        let _ = writeln!(
            out,
            "\nThe Node package's estimated Performance Characteristics, measured (1 thread, p50):"
        );
        let _ = writeln!(
            out,
            "{:<14} | {:<10} | {:<24} | {:<22} | {:<10} | {:<14}",
            "Operation", "est. PG", "est. Redis", "pgcache measured", "raw SQL", "Redis measured"
        );
        let redis_get = self
            .find("redis GET", 1)
            .map(|r| format!("{:.3} ms", r.pgcache.p50_us / 1000.0));
        for (name, estimated_pg, estimated_redis, op) in ESTIMATES {
            let row = self.find(op, 1);
            let ms = |f: Option<&Figures>| {
                f.map_or("-".to_owned(), |f| format!("{:.3} ms", f.p50_us / 1000.0))
            };
            let measured = ms(row.map(|r| &r.pgcache));
            let measured = if name == "Transactional" {
                format!("Yes, {measured}")
            } else {
                measured
            };
            let redis = if name == "Simple GET" {
                redis_get.clone().unwrap_or("-".into())
            } else {
                "N/A".into()
            };
            let _ = writeln!(
                out,
                "{:<14} | {:<10} | {:<24} | {:<22} | {:<10} | {:<14}",
                name,
                estimated_pg,
                estimated_redis,
                measured,
                ms(row.and_then(|r| r.raw.as_ref())),
                redis
            );
        }

        let _ = writeln!(out, "\nTargets:");
        for line in self.targets() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    /// The targets of the performance issue, each judged on this run.
    fn targets(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut check = |what: String, value: Option<f64>, limit: f64| {
            if let Some(v) = value {
                let verdict = if v <= limit { "met" } else { "NOT met" };
                let limit = readable(limit);
                lines.push(format!("{what}: {v:.2} (target <= {limit}) {verdict}"));
            }
        };
        for op in [
            "kv get hit",
            "kv get miss",
            "kv set new",
            "kv set overwrite",
            "kv incr",
            "kv set_nx (taken)",
            "kv get_touch (sliding)",
            "kv get_del (hit)",
        ] {
            check(
                format!("{op} p50 / raw"),
                self.find(op, 1).and_then(|r| r.p50_ratio),
                1.25,
            );
        }
        check(
            format!("{} p50 ratio", app_pool::NAME),
            self.find(app_pool::NAME, 1).and_then(|r| r.p50_ratio),
            1.25,
        );
        let single = self.find("kv get hit", 1).map(|r| r.pgcache.p50_us);
        let many = self.find("kv get_many(100)", 1).map(|r| r.pgcache.p50_us);
        check(
            "kv get_many(100) p50 / kv get hit p50".to_owned(),
            many.zip(single).map(|(m, s)| m / s),
            4.0,
        );
        if self.threads > 1 {
            // Throughput ratio must be at least 0.75: judged as its inverse.
            check(
                format!(
                    "raw / pgcache kv get hit throughput, {} threads",
                    self.threads
                ),
                self.find("kv get hit", self.threads)
                    .and_then(|r| r.throughput_ratio)
                    .map(|t| 1.0 / t),
                1.0 / 0.75,
            );
        }
        let llm = self
            .find("llm get hit (hit tracking)", 1)
            .map(|r| r.pgcache.p50_us);
        check(
            "LLM response get (hit tracking) p50 / kv get hit p50".to_owned(),
            llm.zip(single).map(|(l, s)| l / s),
            1.5,
        );
        check(
            "ENABLE_CACHING=false get, microseconds".to_owned(),
            Some(self.disabled_get_ns / 1000.0),
            1.0,
        );
        for size in ["100 B", "10 kB"] {
            let name = format!("near get {size} (vs redis GET)");
            check(
                format!("near get {size} p50 / redis GET p50, 1 thread"),
                self.find(&name, 1).and_then(|r| r.p50_ratio),
                0.1,
            );
            if self.threads > 1 {
                // At least 10x Redis's throughput: judged as its inverse.
                check(
                    format!(
                        "redis GET / near get {size} throughput, {} threads",
                        self.threads
                    ),
                    self.find(&name, self.threads)
                        .and_then(|r| r.throughput_ratio)
                        .map(|t| 1.0 / t),
                    0.1,
                );
            }
        }
        for name in tags::READ_ROW_NAMES {
            check(
                format!("{name} p50 ratio"),
                self.find(name, 1).and_then(|r| r.p50_ratio),
                1.25,
            );
        }
        check(
            "kv invalidate_tag over the tagged entries p50, milliseconds".to_owned(),
            self.results
                .iter()
                .find(|r| r.operation.starts_with(tags::INVALIDATE_ROW))
                .map(|r| r.pgcache.p50_us / 1000.0),
            10.0,
        );
        // Writers keep at least 0.8x their throughput: judged as its inverse.
        for name in [
            "overwrite new value",
            "overwrite same value",
            "llm set new response",
        ] {
            check(
                format!("near off / on {name} throughput, {} threads", self.threads),
                self.find(&format!("{name}, near on/off"), self.threads)
                    .and_then(|r| r.throughput_ratio)
                    .map(|t| 1.0 / t),
                1.0 / 0.8,
            );
        }
        lines
    }
}

/// A target for people: at most two decimals, without trailing zeros (`1.33` for
/// 1/0.75, `4` for 4.0, `0.1`). The verdict still compares the exact value.
fn readable(x: f64) -> String {
    let text = format!("{x:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::{readable, Echo, Results, Samples};
    use std::time::Duration;

    fn samples(nanos: &[u64]) -> Samples {
        Samples {
            nanos: nanos.to_vec(),
            wall: Duration::from_millis(10),
        }
    }

    #[test]
    fn a_row_without_samples_is_listed_with_its_reason_not_shown_as_nan() {
        let mut results = Results::new(Echo::Nothing);
        results.record(
            "kv get hit",
            1,
            samples(&[1000, 2000]),
            Some(samples(&[900])),
        );
        results.record("kv delete", 4, samples(&[]), Some(samples(&[1000])));
        results.record("redis GET", 1, samples(&[]), None);
        assert_eq!(results.rows.len(), 1);
        let row = &results.rows[0];
        assert!(row.pgcache.p50_us.is_finite() && row.pgcache.ops_per_sec > 0.0);
        assert!(!row.line().contains("NaN"), "{}", row.line());
        let unmeasured: Vec<(&str, usize)> = results
            .unmeasured
            .iter()
            .map(|u| (u.operation.as_str(), u.threads))
            .collect();
        assert_eq!(unmeasured, [("kv delete", 4), ("redis GET", 1)]);
        assert!(results.unmeasured[0]
            .reason
            .contains("no sample on the first side"));
    }

    #[test]
    fn targets_are_readable() {
        assert_eq!(readable(1.0 / 0.75), "1.33");
        assert_eq!(readable(1.0 / 0.8), "1.25");
        assert_eq!(readable(4.0), "4");
        assert_eq!(readable(1.5), "1.5");
        assert_eq!(readable(0.1), "0.1");
        assert_eq!(readable(10.0), "10");
    }
}
