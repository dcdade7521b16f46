//! `pgcache-bench refresh`: one hot key under `get_or_compute` in two processes
//! (this binary runs itself again as the second): stale-while-revalidate alone,
//! with XFetch, and early refresh off, one after the other in one run.
//!
//! Each thread of each process asks for the hot key and then reads a warm key
//! (a plain hit) in turn until the mode's time is up. A computation sleeps, then
//! records in the scratch schema the generation of the value it replaces and when
//! it ran: two computations of one generation are one expiry computed twice, and
//! a call that overlapped a computation is a call "across an expiry". Reported per
//! mode: computations per generation and per TTL of elapsed time, the latency of
//! every `get_or_compute`, of those across expiries, and of the plain hits.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use pgcache::{Cache, CacheManager};
use serde_json::{json, Value};

use crate::ops::{bench_config, Scratch};
use crate::BenchResult;

/// What the child prints once its manager is up; it then waits for a line.
const READY: &str = "ready";

/// How long both processes ask before what they ask is recorded: their pools open
/// their connections, which is not the key expiring.
const WARMUP: Duration = Duration::from_millis(500);

/// The modes measured, in order: stale-while-revalidate alone, with XFetch, and
/// early refresh off (today's single flight: every caller waits for the one
/// computation).
const MODES: [&str; 3] = ["stale", "xfetch", "off"];

/// Options of `pgcache-bench refresh`.
#[derive(Debug, Clone, clap::Args)]
pub struct RefreshArgs {
    /// Seconds each mode runs.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// The hot key's TTL, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    ttl_ms: u64,
    /// How long one computation takes (a sleep), in milliseconds.
    #[arg(long, default_value_t = 50)]
    compute_ms: u64,
    /// Threads in each of the two processes.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// The stale window of the early-refresh modes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    stale_ms: u64,
    /// XFetch's beta in the `xfetch` mode.
    #[arg(long, default_value_t = 1.0)]
    beta: f64,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Internal: run as the second process on this scratch schema.
    #[arg(long, hide = true)]
    child: Option<String>,
    /// Internal: the mode the second process runs.
    #[arg(long, hide = true, default_value = "stale")]
    mode: String,
}

impl RefreshArgs {
    /// The manager settings of `mode`.
    fn config(&self, url: &str, schema: &str, mode: &str) -> pgcache::CacheConfigBuilder {
        let config = bench_config(url, schema, self.threads + 1, false);
        match mode {
            "stale" => config
                .stale_while_revalidate(Duration::from_millis(self.stale_ms))
                .early_refresh_beta(0.0),
            "xfetch" => config
                .stale_while_revalidate(Duration::from_millis(self.stale_ms))
                .early_refresh_beta(self.beta),
            _ => config
                .stale_while_revalidate(Duration::ZERO)
                .early_refresh_beta(0.0),
        }
    }
}

/// One process's samples of one mode: each `get_or_compute` (its start in
/// microseconds since the epoch, its duration in microseconds) and each plain hit's
/// duration.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Calls {
    asked: Vec<(u64, u64)>,
    hits: Vec<u64>,
}

/// Microseconds since the epoch: one clock for both processes (same machine).
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Runs `threads` threads asking for the hot key of `mode` and reading the warm key
/// for [`WARMUP`], then for `duration`, recorded.
fn ask(cache: &CacheManager, args: &RefreshArgs, mode: &str) -> BenchResult<Calls> {
    let key = format!("hot:{mode}");
    let ttl = Duration::from_millis(args.ttl_ms);
    let compute = Duration::from_millis(args.compute_ms);
    let record_from = Instant::now() + WARMUP;
    let until = record_from + Duration::from_secs_f64(args.duration);
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|_| {
                let key = &key;
                s.spawn(move || -> Result<Calls, String> {
                    let mut calls = Calls::default();
                    while Instant::now() < until {
                        let (at, asked_at) = (now_us(), Instant::now());
                        cache
                            .kv()
                            .get_or_compute_with_ttl(key, ttl, || {
                                computation(cache, key, mode, compute)
                            })
                            .map_err(|e| e.to_string())?;
                        let asked = asked_at.elapsed().as_micros() as u64;
                        let started = Instant::now();
                        cache.kv().get("warm").map_err(|e| e.to_string())?;
                        if asked_at >= record_from {
                            calls.asked.push((at, asked));
                            calls.hits.push(started.elapsed().as_micros() as u64);
                        }
                    }
                    Ok(calls)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut calls = Calls::default();
    for part in parts {
        calls.asked.extend(part.asked);
        calls.hits.extend(part.hits);
    }
    Ok(calls)
}

/// One computation of the hot key: notes the generation it replaces, sleeps, and
/// records itself.
fn computation(
    cache: &CacheManager,
    key: &str,
    mode: &str,
    takes: Duration,
) -> Result<Value, pgcache::Error> {
    #[derive(QueryableByName)]
    struct Generation {
        #[diesel(sql_type = Integer)]
        generation: i32,
    }
    let started = now_us();
    let replaced: Generation = diesel::sql_query(
        "SELECT coalesce((SELECT (value->>'generation')::int FROM cache_entries \
         WHERE key = $1), 0) AS generation",
    )
    .bind::<Text, _>(key)
    .get_result(&mut cache.connection()?)?;
    std::thread::sleep(takes);
    diesel::sql_query(
        "INSERT INTO refresh_computations (mode, generation, started_us, finished_us) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind::<Text, _>(mode)
    .bind::<Integer, _>(replaced.generation)
    .bind::<BigInt, _>(started as i64)
    .bind::<BigInt, _>(now_us() as i64)
    .execute(&mut cache.connection()?)?;
    Ok(json!({"generation": replaced.generation + 1}))
}

/// The second process: its manager on the parent's scratch schema, started when the
/// parent says so; its samples printed as JSON.
fn child(args: &RefreshArgs, url: &str, schema: &str) -> BenchResult<()> {
    let cache = CacheManager::new(
        args.config(url, schema, &args.mode)
            .run_migrations(false)
            .build()?,
    )?;
    println!("{READY}");
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    let calls = ask(&cache, args, &args.mode)?;
    println!("{}", serde_json::to_string(&calls)?);
    Ok(())
}

/// Starts the second process on `mode`, waits until it is ready; it starts asking
/// on the line the caller writes to its stdin.
fn spawn_child(
    args: &RefreshArgs,
    url: &str,
    schema: &str,
    mode: &str,
) -> BenchResult<(std::process::Child, BufReader<std::process::ChildStdout>)> {
    // The URL through the environment: never on a command line others can list.
    let mut child = Process::new(std::env::current_exe()?)
        .env("DATABASE_URL", url)
        .env_remove("PGCACHE_SHARDS")
        .args(["-q", "refresh", "--child", schema, "--mode", mode])
        .args(["--duration", &args.duration.to_string()])
        .args(["--ttl-ms", &args.ttl_ms.to_string()])
        .args(["--compute-ms", &args.compute_ms.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--stale-ms", &args.stale_ms.to_string()])
        .args(["--beta", &args.beta.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no child stdout")?);
    let mut line = String::new();
    while out.read_line(&mut line)? > 0 && line.trim() != READY {
        line.clear();
    }
    if line.trim() != READY {
        return Err("the second process did not start".into());
    }
    Ok((child, out))
}

/// Quantile `q` of sorted `samples`, in microseconds.
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((last as f64) * q).round() as usize])
}

/// p50 and p99 of `samples`.
fn latency(mut samples: Vec<u64>) -> Value {
    samples.sort_unstable();
    json!({
        "p50_us": quantile(&samples, 0.50),
        "p99_us": quantile(&samples, 0.99),
        "samples": samples.len(),
    })
}

/// Measures one mode: both processes asking at once, then the figures.
fn measure(args: &RefreshArgs, url: &str, schema: &str, mode: &str) -> BenchResult<Value> {
    let cache = CacheManager::new(args.config(url, schema, mode).build()?)?;
    cache
        .kv()
        .set_with_ttl("warm", &json!({"plain": "hit"}), Duration::from_secs(3600))?;
    // The first computation (a miss, with no old value to serve) before the run:
    // what is measured is the key expiring, not starting cold.
    let key = format!("hot:{mode}");
    cache
        .kv()
        .get_or_compute_with_ttl(&key, Duration::from_millis(args.ttl_ms), || {
            computation(&cache, &key, mode, Duration::from_millis(args.compute_ms))
        })?;
    let (mut process, mut out) = spawn_child(args, url, schema, mode)?;
    let (started, from_us) = (
        Instant::now() + WARMUP,
        now_us() + WARMUP.as_micros() as u64,
    );
    writeln!(process.stdin.take().ok_or("no child stdin")?)?;
    let mut calls = ask(&cache, args, mode)?;
    let mut theirs = String::new();
    out.read_line(&mut theirs)?;
    if !process.wait()?.success() {
        return Err("the second process failed".into());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let theirs: Calls = serde_json::from_str(&theirs)?;
    calls.asked.extend(theirs.asked);
    calls.hits.extend(theirs.hits);

    #[derive(QueryableByName)]
    struct Window {
        #[diesel(sql_type = Integer)]
        generation: i32,
        #[diesel(sql_type = BigInt)]
        started_us: i64,
        #[diesel(sql_type = BigInt)]
        finished_us: i64,
    }
    let windows: Vec<Window> = diesel::sql_query(
        "SELECT generation, started_us, finished_us FROM refresh_computations \
         WHERE mode = $1 AND started_us >= $2 ORDER BY started_us",
    )
    .bind::<Text, _>(mode)
    .bind::<BigInt, _>(from_us as i64)
    .load(&mut cache.connection()?)?;
    let computations = windows.len();
    let mut generations: Vec<i32> = windows.iter().map(|w| w.generation).collect();
    generations.sort_unstable();
    generations.dedup();
    // A call across an expiry: one that overlapped a computation.
    let across: Vec<u64> = calls
        .asked
        .iter()
        .filter(|(at, took)| {
            let (from, to) = (*at as i64, (*at + *took) as i64);
            windows
                .iter()
                .any(|w| from <= w.finished_us && to >= w.started_us)
        })
        .map(|(_, took)| *took)
        .collect();
    let expiries_by_time = elapsed * 1000.0 / args.ttl_ms as f64;
    let hits = latency(calls.hits);
    let all = latency(calls.asked.iter().map(|(_, took)| *took).collect());
    let across = latency(across);
    let ratio = |figures: &Value| -> Option<f64> {
        Some(figures["p99_us"].as_f64()? / hits["p99_us"].as_f64()?.max(1.0))
    };
    let (across_ratio, all_ratio) = (ratio(&across), ratio(&all));
    Ok(json!({
        "mode": mode,
        "seconds": elapsed,
        "computations": computations,
        "generations": generations.len(),
        "computations_per_generation": computations as f64 / generations.len().max(1) as f64,
        "computations_per_ttl": computations as f64 / expiries_by_time.max(1e-9),
        "get_or_compute": all,
        "across_expiries": across,
        "hits": hits,
        "p99_across_expiries_over_hit_p99": across_ratio,
        "p99_all_over_hit_p99": all_ratio,
    }))
}

/// Entry point of `pgcache-bench refresh`.
///
/// # Errors
/// Configuration, connection, database and child-process errors.
pub fn run(args: &RefreshArgs, database_url: Option<&str>, quiet: bool) -> BenchResult<()> {
    let (url, shown) = crate::database_url(database_url, "pgcache-bench refresh")?;
    if let Some(schema) = &args.child {
        return child(args, &url, schema);
    }
    let scratch = Scratch {
        url: url.clone(),
        schema: format!("pgcache_bench_{}", uuid::Uuid::new_v4().simple()),
    };
    if !quiet {
        eprintln!(
            "pgcache-bench refresh on {shown}: 2 processes x {} threads, TTL {} ms, \
             computation {} ms, {} s per mode",
            args.threads, args.ttl_ms, args.compute_ms, args.duration
        );
    }
    {
        // Migrations into the scratch schema, and the computations' log beside them.
        let cache = CacheManager::new(args.config(&url, &scratch.schema, "off").build()?)?;
        diesel::sql_query(
            "CREATE TABLE refresh_computations (mode TEXT NOT NULL, generation INT NOT NULL, \
             started_us BIGINT NOT NULL, finished_us BIGINT NOT NULL)",
        )
        .execute(&mut cache.connection()?)?;
    }
    let mut results = Vec::new();
    for mode in MODES {
        let result = measure(args, &url, &scratch.schema, mode)?;
        if !quiet {
            eprintln!(
                "{mode:>6}: {} computations of {} generations ({:.3} per generation, {:.3} per TTL); \
                 get_or_compute p50/p99 {}/{} us, across expiries {}/{} us ({} calls), hits {}/{} us; \
                 p99 across expiries / hit p99 = {:.2}",
                result["computations"],
                result["generations"],
                result["computations_per_generation"].as_f64().unwrap_or(f64::NAN),
                result["computations_per_ttl"].as_f64().unwrap_or(f64::NAN),
                result["get_or_compute"]["p50_us"],
                result["get_or_compute"]["p99_us"],
                result["across_expiries"]["p50_us"],
                result["across_expiries"]["p99_us"],
                result["across_expiries"]["samples"],
                result["hits"]["p50_us"],
                result["hits"]["p99_us"],
                result["p99_across_expiries_over_hit_p99"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
        }
        results.push(result);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "threads_per_process": args.threads,
                "processes": 2,
                "ttl_ms": args.ttl_ms,
                "compute_ms": args.compute_ms,
                "stale_ms": args.stale_ms,
                "beta": args.beta,
                "results": results,
            }))?
        );
    }
    Ok(())
}
