//! Memoised functions: the `cached` crate's `#[concurrent_cached]` macro storing a
//! function's results in the key/value cache, and `Memo::get_or_compute` for single
//! flight, against the local PostgreSQL.
//!
//! ```text
//! cargo run --example memoize --features cached
//! ```
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@localhost:5432/postgres`) and
//! keeps its tables in the schema `pgcache_memoize` unless `PGCACHE_SCHEMA` says
//! otherwise.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cached::macros::concurrent_cached;
use pgcache::{CacheConfig, CacheManager, Error, Memo};
use serde::{Deserialize, Serialize};

/// The manager the memoised functions store into, opened by `run`.
static CACHE: OnceLock<CacheManager> = OnceLock::new();

fn cache() -> &'static CacheManager {
    CACHE.get().expect("opened before the first call")
}

/// How many times `forecast`'s body ran.
static COMPUTED: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Forecast {
    city: u64,
    celsius: f64,
}

/// A slow lookup, memoised for five minutes as the kv entries `forecast:v1:<city>`.
#[concurrent_cached(
    ty = "Memo<u64, Forecast>",
    create = r#"{ cache().memo("forecast:v1", Duration::from_secs(300)).expect("a valid memo") }"#,
    map_error = r#"|e| e"#
)]
fn forecast(city: u64) -> Result<Forecast, Error> {
    COMPUTED.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    Ok(Forecast {
        city,
        celsius: 12.5 + city as f64,
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Connection(reason)) => {
            let url = CacheConfig::from_env()
                .map(|c| c.database_url().to_string())
                .unwrap_or_default();
            eprintln!(
                "memoize: cannot reach PostgreSQL at {url} ({reason}); start it \
                 (e.g. `pg_ctlcluster <version> main start`) or set DATABASE_URL"
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("memoize: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if !vars.iter().any(|(k, _)| k == "PGCACHE_SCHEMA") {
        vars.push(("PGCACHE_SCHEMA".into(), "pgcache_memoize".into()));
    }
    let config = CacheConfig::from_vars(vars)?;
    println!(
        "connecting to {} (schema {})",
        config.database_url(),
        config.schema()
    );
    let manager = CacheManager::new(config)?;
    let cache = CACHE.get_or_init(|| manager);
    // Start from nothing, so a second run computes again too.
    cache
        .memo::<u64, Forecast>("forecast:v1", Duration::from_secs(300))?
        .clear()?;

    for city in [7, 7, 8, 7] {
        let started = Instant::now();
        let result = forecast(city)?;
        println!(
            "forecast({city}) = {:.1} °C in {:>5.1} ms",
            result.celsius,
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    println!(
        "#[concurrent_cached] forecast x4 (cities 7, 7, 8, 7) -> body ran {} time(s)",
        COMPUTED.load(Ordering::SeqCst)
    );

    // Single flight: eight threads miss on one key at once, one computes.
    let memo: Memo<&str, u64> = cache.memo("report:v1", Duration::from_secs(60))?;
    memo.clear()?;
    let computed = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let callers: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    memo.get_or_compute(&"daily", || {
                        computed.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(200));
                        Ok::<_, Error>(1234)
                    })
                })
            })
            .collect();
        callers
            .into_iter()
            .try_for_each(|caller| caller.join().expect("no panic").map(drop))
    })?;
    println!(
        "Memo::get_or_compute report:v1:daily from 8 threads -> computed {} time(s)",
        computed.load(Ordering::SeqCst)
    );
    Ok(())
}
