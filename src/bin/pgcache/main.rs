//! The `pgcache` command: migrations, cleanup, statistics, health checks and clearing
//! caches, for cron jobs, monitors and people.
//!
//! Configuration comes from the same environment variables as the library
//! (`DATABASE_URL`, `PGCACHE_SCHEMA`, ...); `--database-url` and `--schema` override
//! them. Errors are one line on stderr and exit status 2; `pgcache health` exits 1
//! when an alert fires.

mod progress;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pgcache::{CacheConfig, CacheKind, CacheManager, HealthThresholds};

/// PostgreSQL as the application cache: maintenance commands.
#[derive(Debug, Parser)]
#[command(name = "pgcache", version)]
struct Cli {
    /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@localhost:5432/postgres).
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Schema holding the cache tables (default: $PGCACHE_SCHEMA, else the search path).
    #[arg(long, global = true, value_name = "SCHEMA")]
    schema: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update the cache tables (runs pending migrations).
    Migrate {
        /// Then make the cache tables UNLOGGED: faster writes, emptied after a crash,
        /// not replicated.
        #[arg(long, conflicts_with = "logged")]
        unlogged: bool,
        /// Then make the cache tables LOGGED again (durable, replicated).
        #[arg(long)]
        logged: bool,
    },
    /// Delete expired entries from every cache (schedule it: `0 * * * * pgcache cleanup`).
    Cleanup,
    /// Print entries, sizes, hits, misses and hit rates of every cache.
    Stats {
        /// Print JSON instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Check the alert thresholds; exit 0 when healthy, 1 when an alert fires.
    Health {
        /// Print JSON instead of the report.
        #[arg(long)]
        json: bool,
        /// Lowest acceptable hit rate, 0 to 1.
        #[arg(long, default_value_t = 0.70, value_name = "RATE")]
        min_hit_rate: f64,
        /// Judge the hit rate only after this many lookups.
        #[arg(long, default_value_t = 100, value_name = "N")]
        min_lookups: u64,
        /// Space allocated to the cache tables, in MiB (size check skipped without it).
        #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
        size_budget_mb: Option<u64>,
        /// Alert when the cache tables use more than this fraction of the budget.
        #[arg(long, default_value_t = 0.80, value_name = "FRACTION")]
        max_size_fraction: f64,
        /// Alert when the last successful cleanup is older than this many seconds
        /// (0 turns the check off).
        #[arg(long, default_value_t = 7200, value_name = "SECS")]
        max_cleanup_age_secs: u64,
    },
    /// Delete every entry of one cache, or of all caches.
    Clear {
        /// The cache to empty (all caches when omitted).
        #[arg(value_parser = cache_kind_parser())]
        cache: Option<CacheKind>,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

fn cache_kind_parser() -> impl clap::builder::TypedValueParser<Value = CacheKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(CacheKind::ALL.map(CacheKind::name))
        .map(|name| CacheKind::from_name(&name).expect("clap checked the name"))
}

/// How a command ended, when it did not fail.
enum Outcome {
    Ok,
    Unhealthy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Unhealthy) => ExitCode::from(1),
        Err(message) => {
            // One line, whatever the source error looked like.
            let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("pgcache: {line}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<Outcome, String> {
    let cache = manager(&cli)?;
    match cli.command {
        Command::Migrate { unlogged, logged } => {
            let applied = cache.run_migrations().map_err(|e| e.to_string())?;
            if applied.is_empty() {
                println!("cache tables are up to date");
            } else {
                println!(
                    "applied {} migration(s): {}",
                    applied.len(),
                    applied.join(", ")
                );
            }
            if unlogged || logged {
                cache.set_tables_logged(logged).map_err(|e| e.to_string())?;
                println!(
                    "cache tables are now {}",
                    if logged { "LOGGED" } else { "UNLOGGED" }
                );
            }
        }
        Command::Cleanup => {
            let bar = progress::Spinner::new();
            let report = cache
                .cleanup_with_progress(|p| bar.update(p))
                .map_err(|e| e.to_string());
            bar.finish();
            println!("{}", report?);
        }
        Command::Stats { json } => {
            let stats = cache.stats().map_err(|e| e.to_string())?;
            if json {
                println!("{}", to_json(&stats)?);
            } else {
                println!("{stats}");
            }
        }
        Command::Health {
            json,
            min_hit_rate,
            min_lookups,
            size_budget_mb,
            max_size_fraction,
            max_cleanup_age_secs,
        } => {
            let mut thresholds = HealthThresholds::new()
                .min_hit_rate(min_hit_rate)
                .min_lookups(min_lookups)
                .max_size_fraction(max_size_fraction);
            if let Some(mib) = size_budget_mb {
                thresholds = thresholds.size_budget_bytes(mib.saturating_mul(1 << 20));
            }
            thresholds = match max_cleanup_age_secs {
                0 => thresholds.no_cleanup_age_check(),
                secs => thresholds.max_cleanup_age(Duration::from_secs(secs)),
            };
            let report = cache.health(&thresholds).map_err(|e| e.to_string())?;
            if json {
                println!("{}", to_json(&report)?);
            } else {
                println!("{report}");
            }
            if !report.is_healthy() {
                return Ok(Outcome::Unhealthy);
            }
        }
        Command::Clear { cache: kind, yes } => {
            let what = kind.map_or_else(|| "every cache".to_owned(), |k| format!("the {k} cache"));
            if !yes && !confirm(&format!("Delete every entry of {what}?"))? {
                println!("nothing deleted");
                return Ok(Outcome::Ok);
            }
            let removed = cache.clear(kind).map_err(|e| e.to_string())?;
            for (kind, rows) in removed {
                println!("{kind}: {rows} entries deleted");
            }
        }
    }
    Ok(Outcome::Ok)
}

/// The manager, configured from the environment and the global flags. Only
/// `migrate` creates tables; the other commands report missing ones.
fn manager(cli: &Cli) -> Result<CacheManager, String> {
    let overrides = [
        ("DATABASE_URL", cli.database_url.clone()),
        ("PGCACHE_SCHEMA", cli.schema.clone()),
        ("PGCACHE_RUN_MIGRATIONS", Some("false".to_owned())),
        // One short-lived process needs one connection and no janitor. No idle
        // minimum: the pool would refill it from a background thread, and a process
        // exiting while that thread is inside libpq's connect can die by a signal.
        ("PGCACHE_POOL_MIN_IDLE", Some("0".to_owned())),
        ("PGCACHE_POOL_MAX_SIZE", Some("2".to_owned())),
        ("PGCACHE_JANITOR_INTERVAL_SECS", Some("0".to_owned())),
        // Caching switched off for the services must not stop their maintenance.
        ("ENABLE_CACHING", Some("true".to_owned())),
    ];
    let overrides: Vec<(String, String)> = overrides
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name.to_owned(), v)))
        .collect();
    let vars: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| !overrides.iter().any(|(o, _)| o == name))
        .chain(overrides.iter().cloned())
        .collect();
    let config = CacheConfig::from_vars(vars).map_err(|e| e.to_string())?;
    CacheManager::new(config).map_err(|e| e.to_string())
}

fn to_json(value: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(value).map_err(|e| e.to_string())
}

/// Asks on the terminal; refuses when there is none to ask on.
fn confirm(question: &str) -> Result<bool, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(
            "refusing to clear without confirmation: stdin is not a terminal; \
                    pass --yes to clear anyway"
                .to_owned(),
        );
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
