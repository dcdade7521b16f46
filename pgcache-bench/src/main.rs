//! `pgcache-bench`: measurements of pgcache on a real database.
//!
//! - `ops`: every operation of the library against the same statement hand-written
//!   and prepared (and Redis, and the near cache), side by side in one run.
//! - `ycsb`: the YCSB core workloads (A, B, C, D, F) on pgcache with and without the
//!   near cache, raw prepared SQL, Redis and an in-process cache.
//! - `refresh`: one hot key under `get_or_compute` in two processes, early refresh
//!   on (stale-while-revalidate, then with XFetch) and off.
//!
//! Both work in scratch schemas dropped afterwards. Errors are one line on stderr
//! with exit status 2.

mod ops;
mod refresh;
mod ycsb;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Measures pgcache against raw prepared SQL, Redis and an in-process cache, in
/// scratch schemas dropped afterwards.
#[derive(Debug, Parser)]
#[command(name = "pgcache-bench", version)]
struct Cli {
    /// PostgreSQL URL (default: $DATABASE_URL and the other PGCACHE_* variables, as
    /// the library reads them).
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Print nothing but the JSON asked for and errors.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every operation against the same statement hand-written (and Redis GET/SET,
    /// and the near cache), 1 thread then `--threads`.
    Ops(ops::BenchArgs),
    /// The YCSB core workloads on every system, at each thread count.
    Ycsb(ycsb::YcsbArgs),
    /// One hot key expiring under `get_or_compute` in two processes (this binary
    /// runs itself again), early refresh on (two ways), then off.
    Refresh(refresh::RefreshArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let url = cli.database_url.as_deref();
    let result = match &cli.command {
        Command::Ops(args) => ops::run(args, url, cli.quiet),
        Command::Ycsb(args) => ycsb::run(args, url, cli.quiet),
        Command::Refresh(args) => refresh::run(args, url, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcache-bench: {}", error_chain(&*e));
            ExitCode::from(2)
        }
    }
}

/// An error with its causes: some clients' errors say little until their cause.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// The database to measure, `--database-url`, else what the library reads from the
/// environment, without TLS (see [`ops::plaintext`]); and the same with its password
/// masked, to show. Refused when the cache is sharded and no URL names the shard.
fn database_url(database_url: Option<&str>, what: &str) -> BenchResult<(String, String)> {
    let mut env = pgcache::CacheConfigBuilder::from_env()?;
    if let Some(url) = database_url {
        env = env.database_url(url);
    }
    let env = env.build()?;
    if !env.shards().is_empty() && database_url.is_none() {
        // DATABASE_URL would be measured while the cache lives on the shards.
        return Err(format!(
            "{what} measures one database and PGCACHE_SHARDS is set: \
             pass --database-url with the URL of the shard to measure"
        )
        .into());
    }
    let url = ops::plaintext(env.database_url().expose())?;
    Ok((url, env.database_url().to_string()))
}
