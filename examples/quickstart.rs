//! The quickstart: a tour of the key/value cache against the local PostgreSQL.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@localhost:5432/postgres`) and
//! keeps its tables in the schema `pgcache_quickstart` unless `PGCACHE_SCHEMA` says
//! otherwise.

use std::process::ExitCode;
use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use pgcache::{Cache, CacheConfig, CacheManager, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Profile {
    name: String,
    plan: String,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Connection(reason)) => {
            let url = CacheConfig::from_env()
                .map(|c| c.database_url().to_string())
                .unwrap_or_default();
            eprintln!(
                "quickstart: cannot reach PostgreSQL at {url} ({reason}); start it \
                 (e.g. `pg_ctlcluster <version> main start`) or set DATABASE_URL"
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("quickstart: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if !vars.iter().any(|(k, _)| k == "PGCACHE_SCHEMA") {
        vars.push(("PGCACHE_SCHEMA".into(), "pgcache_quickstart".into()));
    }
    let config = CacheConfig::from_vars(vars)?;
    println!(
        "connecting to {} (schema {})",
        config.database_url(),
        config.schema()
    );
    let cache = CacheManager::new(config)?;

    let profiles = cache.kv().typed::<Profile>();
    let ada = Profile {
        name: "Ada".into(),
        plan: "pro".into(),
    };
    profiles.set_with_ttl("user:42:profile:v2", &ada, Duration::from_secs(3600))?;
    println!("set   user:42:profile:v2 = {ada:?} (ttl 1 h)");

    let hit = profiles.get("user:42:profile:v2")?;
    println!("get   user:42:profile:v2 -> hit: {hit:?}");
    let miss = profiles.get("user:43:profile:v2")?;
    println!("get   user:43:profile:v2 -> miss: {miss:?}");

    let kv = cache.kv();
    let (a, b) = (serde_json::json!({"n": 1}), serde_json::json!({"n": 2}));
    kv.set_many(
        &[("session:a", &a), ("session:b", &b)],
        Duration::from_secs(300),
    )?;
    let many = kv.get_many(&["session:a", "session:b", "session:c"])?;
    println!(
        "get_many session:a,b,c -> {} hits, {} miss",
        many.iter().filter(|v| v.is_some()).count(),
        many.iter().filter(|v| v.is_none()).count()
    );

    let mut computed = 0;
    for _ in 0..3 {
        kv.get_or_set("report:daily", Duration::from_secs(60), || {
            computed += 1;
            Ok::<_, Error>(serde_json::json!({"total": 1234}))
        })?;
    }
    println!("get_or_set report:daily x3 -> computed {computed} time(s)");

    let removed = kv.delete_prefix("session:")?;
    println!("delete_prefix session: -> {removed} removed");

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let rows =
        diesel::sql_query("SELECT count(*) AS n FROM cache_entries WHERE expires_at > now()")
            .get_result::<Count>(&mut *cache.connection()?)?
            .n;
    println!("stored rows in cache_entries: {rows}");
    cache.flush_stats()?;
    Ok(())
}
