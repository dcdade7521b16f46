//! The `pgcache` command: migrations, cleanup, statistics, health checks and clearing
//! caches, for cron jobs, monitors and people.
//!
//! Configuration comes from the same environment variables as the library
//! (`DATABASE_URL`, `PGCACHE_SCHEMA`, ...), which may also be written in a `.env` file
//! in the current directory or a parent (as the diesel CLI reads it; variables already
//! set win); `--database-url` and `--schema` override them. Errors are one line on stderr and exit status 2; `pgcache health` exits 1
//! when an alert fires.

mod progress;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pgcache::{CacheConfigBuilder, CacheKind, CacheManager, HealthThresholds};

/// PostgreSQL as the application cache: maintenance commands.
#[derive(Debug, Parser)]
#[command(
    name = "pgcache",
    version,
    long_about = "PostgreSQL as the application cache: maintenance commands.\n\n\
        Configuration comes from DATABASE_URL, PGCACHE_SCHEMA and the other PGCACHE_* \
        variables, also read from a .env file in the current directory or a parent \
        (variables already set win); --database-url and --schema override them.\n\n\
        Errors are one line on stderr with exit status 2; `pgcache health` exits 1 \
        when an alert fires."
)]
struct Cli {
    /// PostgreSQL URL (default: $DATABASE_URL, else postgres://postgres@localhost:5432/postgres).
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Schema holding the cache tables (default: $PGCACHE_SCHEMA, else `pgcache`).
    #[arg(long, global = true, value_name = "SCHEMA")]
    schema: Option<String>,
    /// Print no report: the exit status tells (errors are still printed on stderr;
    /// --json output, completions and the man page still are too).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update the cache tables (runs pending migrations).
    Migrate {
        /// Then hash-partition every cache table on its key into this many
        /// partitions (for tables of many millions of rows; safe to run again).
        // Checked here, before anything touches the database.
        #[arg(long, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=i64::from(pgcache::MAX_PARTITIONS)))]
        partitions: Option<u32>,
        /// Then make the cache tables UNLOGGED: faster writes, emptied after a crash,
        /// not replicated.
        #[arg(long, conflicts_with = "logged")]
        unlogged: bool,
        /// Then make the cache tables LOGGED again (durable, replicated).
        #[arg(long)]
        logged: bool,
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Delete expired entries from every cache (schedule it: `0 * * * * pgcache cleanup`).
    Cleanup {
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Print entries, sizes, hits, misses and hit rates of every cache.
    Stats {
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Check the alert thresholds; exit 0 when healthy, 1 when an alert fires.
    Health {
        /// Print one JSON document instead of the report.
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
    /// Pre-populate the caches from a JSON file (all or nothing).
    ///
    /// The file holds any of `kv`, `embeddings`, `vector_searches`, `llm_responses`
    /// and `audio_chunks` (arrays) and optional `ttl_secs` and `statement_timeout_ms`;
    /// see "The warmup file" in docs/guide.md.
    Warmup {
        /// The JSON file to load.
        #[arg(value_name = "FILE.json")]
        file: std::path::PathBuf,
        /// Statement timeout of the warmup's transaction, in milliseconds, for a
        /// warmup too large for PGCACHE_STATEMENT_TIMEOUT_MS (overrides the file's
        /// `statement_timeout_ms`).
        #[arg(long, value_name = "MS")]
        statement_timeout_ms: Option<u64>,
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Delete every cache entry that belongs to a user (vector searches, and owned
    /// embeddings, LLM responses and audio chunks).
    InvalidateUser {
        /// The user's id, a UUID.
        #[arg(value_name = "UUID")]
        user_id: String,
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Print the completion script for a shell on stdout.
    ///
    /// For example `pgcache completions bash > ~/.local/share/bash-completion/completions/pgcache`
    /// or `pgcache completions zsh > ~/.zfunc/_pgcache`.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout: `pgcache man > pgcache.1`, or
    /// `pgcache man | man -l -`.
    Man,
    /// Delete every entry of one cache, or of all caches.
    Clear {
        /// The cache to empty (all caches when omitted).
        #[arg(value_parser = cache_kind_parser())]
        cache: Option<CacheKind>,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version`: printed in full on stdout, exit status 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => return fail(&usage_error(&e)),
    };
    // After parsing, so a broken `.env` cannot stop `--help`; before any thread starts,
    // as it sets variables of this process.
    if let Err(message) = load_dotenv() {
        return fail(&message);
    }
    // The library warns through `tracing`, which this command does not print.
    if !matches!(cli.command, Command::Completions { .. } | Command::Man) {
        for unknown in pgcache::CacheConfig::unknown_env_vars() {
            eprintln!("pgcache: warning: {unknown}");
        }
    }
    // A monitor reading `health --json` gets a document also when the check could
    // not run (the database is down): unhealthy, with the error.
    let health_json = matches!(cli.command, Command::Health { json: true, .. });
    match run(cli) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Unhealthy) => ExitCode::from(1),
        Err(message) => {
            if health_json {
                let value = serde_json::json!({ "healthy": false, "error": one_line(&message) });
                if let Ok(text) = to_json(&value) {
                    println!("{text}");
                }
            }
            fail(&message)
        }
    }
}

/// The variables of the nearest `.env` file (in the current directory or a parent)
/// that configure pgcache, `DATABASE_URL`, `ENABLE_CACHING` and `PGCACHE_*`, for those
/// not already set: the environment wins, as with the diesel CLI. Other variables the
/// file may hold for the application are left alone. No file is no error; a malformed
/// one is, named with its path.
fn load_dotenv() -> Result<(), String> {
    let Some(path) = find_dotenv() else {
        return Ok(());
    };
    let malformed = |e: dotenvy::Error| {
        // dotenvy's message quotes the line, which may hold a password: name the
        // variable only.
        let what = match &e {
            dotenvy::Error::LineParse(line, _) => match line.split_once('=') {
                Some((name, _)) if is_variable_name(name.trim()) => {
                    format!("cannot parse the value of {}", name.trim())
                }
                _ => "a line is not NAME=VALUE".to_owned(),
            },
            other => other.to_string(),
        };
        format!("malformed .env file {}: {what}", path.display())
    };
    for item in dotenvy::from_path_iter(&path).map_err(malformed)? {
        let (name, value) = item.map_err(malformed)?;
        let ours =
            name == "DATABASE_URL" || name == "ENABLE_CACHING" || name.starts_with("PGCACHE_");
        if ours && std::env::var_os(&name).is_none() {
            std::env::set_var(name, value);
        }
    }
    Ok(())
}

fn is_variable_name(text: &str) -> bool {
    let text = text.strip_prefix("export ").unwrap_or(text).trim();
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// The `.env` file of the current directory or its nearest parent that has one.
fn find_dotenv() -> Option<std::path::PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|dir| dir.join(".env"))
        .find(|path| path.is_file())
}

/// Reports an error as one line on stderr, whatever the source error looked like,
/// with exit status 2.
fn fail(message: &str) -> ExitCode {
    eprintln!("pgcache: {}", one_line(message));
    ExitCode::from(2)
}

/// `message` as one line: runs of whitespace, newlines included, as one space.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `n` and the noun in the singular or plural: "1 entry", "2 entries".
fn count(n: u64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// clap's usage error in one line: its first line, plus its tip or possible values
/// (the usage synopsis is left to `--help`). An argument that is a connection string
/// (given without `--database-url`) is shown with its password masked.
fn usage_error(error: &clap::Error) -> String {
    use clap::error::ErrorKind;
    if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let commands: Vec<String> = <Cli as clap::CommandFactory>::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect();
        return format!(
            "missing command: one of {} (see pgcache --help)",
            commands.join(", ")
        );
    }
    let rendered = error.render().to_string();
    let mut lines = rendered.lines().map(str::trim);
    let first = lines.next().unwrap_or_default();
    let mut parts = vec![first.strip_prefix("error: ").unwrap_or(first).to_owned()];
    parts.extend(
        lines
            .filter(|l| l.starts_with("tip:") || l.starts_with("[possible values"))
            .map(str::to_owned),
    );
    format!(
        "{} (see pgcache --help)",
        mask_connection_strings(&parts.join("; "))
    )
}

/// `text` with every quoted `'...'` part that parses as a connection string shown
/// redacted.
fn mask_connection_strings(text: &str) -> String {
    text.split('\'')
        .enumerate()
        .map(|(i, part)| match pgcache::DatabaseUrl::parse(part) {
            // Odd parts are the quoted ones.
            Ok(url) if i % 2 == 1 => url.redacted(),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("'")
}

fn run(cli: Cli) -> Result<Outcome, String> {
    // Generated from the argument definitions: no database involved.
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            // Into memory first: the generators panic on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "pgcache", &mut script);
            let mut out = std::io::stdout().lock();
            out.write_all(&script)
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the completions: {e}"))?;
            return Ok(Outcome::Ok);
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command)
                .render(&mut out)
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the manual page: {e}"))?;
            return Ok(Outcome::Ok);
        }
        _ => {}
    }
    let quiet = cli.quiet;
    // Bad arguments are reported before any connection is attempted.
    let warmup = match &cli.command {
        Command::Warmup {
            file,
            statement_timeout_ms,
            ..
        } => {
            let mut warmup = read_warmup(file)?;
            if statement_timeout_ms.is_some() {
                warmup.statement_timeout_ms = *statement_timeout_ms;
            }
            Some(warmup)
        }
        _ => None,
    };
    let user = match &cli.command {
        Command::InvalidateUser { user_id, .. } => Some(parse_user_id(user_id)?),
        _ => None,
    };
    let cache = manager(&cli)?;
    match cli.command {
        Command::Migrate {
            partitions,
            unlogged,
            logged,
            json,
        } => {
            let applied = cache.run_migrations().map_err(|e| e.to_string())?;
            let partitioned = match partitions {
                Some(n) => cache.partition_tables(n).map_err(|e| e.to_string())?,
                None => Vec::new(),
            };
            let switched = unlogged || logged;
            if switched {
                cache.set_tables_logged(logged).map_err(|e| e.to_string())?;
            }
            let value = serde_json::json!({
                "applied": applied,
                "tables_logged": if switched { Some(logged) } else { None },
                "partitioned": partitioned,
            });
            report(json, quiet, &value, || {
                let mut text = if applied.is_empty() {
                    "cache tables are up to date".to_owned()
                } else {
                    format!(
                        "applied {}: {}",
                        count(applied.len() as u64, "migration", "migrations"),
                        applied.join(", ")
                    )
                };
                for p in &partitioned {
                    let what = if p.converted { "now" } else { "already" };
                    text.push_str(&format!(
                        "\n{} {what} has {} hash partitions",
                        p.cache.table(),
                        p.partitions
                    ));
                }
                if switched {
                    let now = if logged { "LOGGED" } else { "UNLOGGED" };
                    text.push_str(&format!("\ncache tables are now {now}"));
                }
                text
            })?;
        }
        Command::Cleanup { json } => {
            let bar = progress::Spinner::new(!quiet);
            let result = cache
                .cleanup_with_progress(|p| bar.update(p))
                .map_err(|e| e.to_string());
            bar.finish();
            let result = result?;
            let mut value = serde_json::to_value(&result).map_err(|e| e.to_string())?;
            value["rows_removed"] = result.rows_removed().into();
            // The unit in the name, as a reader of the JSON needs it.
            rename(&mut value, "elapsed", "elapsed_ms");
            if let Some(tables) = value["tables"].as_array_mut() {
                tables
                    .iter_mut()
                    .for_each(|t| rename(t, "elapsed", "elapsed_ms"));
            }
            report(json, quiet, &value, || result.to_string())?;
        }
        Command::Stats { json } => {
            let stats = cache.stats().map_err(|e| e.to_string())?;
            report(json, quiet, &stats, || stats.to_string())?;
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
            let health = cache.health(&thresholds).map_err(|e| e.to_string())?;
            report(json, quiet, &health, || health.to_string())?;
            if !health.is_healthy() {
                return Ok(Outcome::Unhealthy);
            }
        }
        Command::Warmup { json, .. } => {
            let warmup = warmup.expect("read above");
            let bar = progress::Spinner::new(!quiet);
            bar.message("warming the caches (one transaction)");
            let result = cache.warmup(&warmup).map_err(|e| e.to_string());
            bar.finish();
            let r = result?;
            let value = serde_json::json!({
                "total": r.total(),
                "kv": r.kv,
                "embeddings": r.embeddings,
                "vector_searches": r.vector_searches,
                "llm_responses": r.llm_responses,
                "audio_chunks": r.audio_chunks,
                "skipped_audio_chunks": r.skipped_audio_chunks,
            });
            report(json, quiet, &value, || {
                format!(
                    "warmed {}: {} kv, {}, {}, {}, {} ({} skipped: text over the \
                     maximum length)",
                    count(r.total(), "entry", "entries"),
                    r.kv,
                    count(r.embeddings, "embedding", "embeddings"),
                    count(r.vector_searches, "vector search", "vector searches"),
                    count(r.llm_responses, "LLM response", "LLM responses"),
                    count(r.audio_chunks, "audio chunk", "audio chunks"),
                    r.skipped_audio_chunks
                )
            })?;
        }
        Command::InvalidateUser { json, .. } => {
            let user = user.expect("parsed above");
            let r = cache.invalidate_user(user).map_err(|e| e.to_string())?;
            let value = serde_json::json!({
                "user_id": user,
                "total": r.total(),
                "vector_searches": r.vector_searches,
                "embeddings": r.embeddings,
                "llm_responses": r.llm_responses,
                "audio_chunks": r.audio_chunks,
                "released_paths": r.released_paths,
            });
            report(json, quiet, &value, || {
                let mut text = format!(
                    "user {user}: {} deleted ({}, {}, {}, {})",
                    count(r.total(), "entry", "entries"),
                    count(r.vector_searches, "vector search", "vector searches"),
                    count(r.embeddings, "embedding", "embeddings"),
                    count(r.llm_responses, "LLM response", "LLM responses"),
                    count(r.audio_chunks, "audio chunk", "audio chunks"),
                );
                for path in &r.released_paths {
                    text.push_str(&format!("\nreleased audio file: {path}"));
                }
                text
            })?;
        }
        Command::Completions { .. } | Command::Man => {
            unreachable!("handled before connecting")
        }
        Command::Clear {
            cache: kind,
            yes,
            json,
        } => {
            if !yes && !confirm(&clear_action(&cache, kind)?)? {
                let value = serde_json::json!({ "cleared": false, "deleted": {}, "total": 0 });
                report(json, quiet, &value, || "nothing deleted".to_owned())?;
                return Ok(Outcome::Ok);
            }
            let removed = cache.clear(kind).map_err(|e| e.to_string())?;
            let deleted: serde_json::Map<String, serde_json::Value> = removed
                .iter()
                .map(|(kind, rows)| (kind.name().to_owned(), (*rows).into()))
                .collect();
            let total: u64 = removed.iter().map(|(_, rows)| rows).sum();
            let value = serde_json::json!({ "cleared": true, "deleted": deleted, "total": total });
            report(json, quiet, &value, || {
                removed
                    .iter()
                    .map(|(kind, rows)| {
                        format!("{kind}: {} deleted", count(*rows, "entry", "entries"))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
    }
    Ok(Outcome::Ok)
}

/// Renames `from` to `to` in a JSON object, if it is there.
fn rename(value: &mut serde_json::Value, from: &str, to: &str) {
    if let Some(map) = value.as_object_mut() {
        if let Some(v) = map.remove(from) {
            map.insert(to.to_owned(), v);
        }
    }
}

/// Prints a command's result: `value` as one JSON document with `--json`, else the
/// human report unless `--quiet`.
fn report(
    json: bool,
    quiet: bool,
    value: &impl serde::Serialize,
    human: impl FnOnce() -> String,
) -> Result<(), String> {
    if json {
        println!("{}", to_json(value)?);
    } else if !quiet {
        println!("{}", human());
    }
    Ok(())
}

/// The manager, configured from the environment and the global flags. Only
/// `migrate` creates tables; the other commands report missing ones.
fn manager(cli: &Cli) -> Result<CacheManager, String> {
    let mut config = CacheConfigBuilder::from_env()
        .map_err(|e| e.to_string())?
        .run_migrations(false)
        // One short-lived process needs one connection and no janitor. No idle
        // minimum: the pool would refill it from a background thread, and a process
        // exiting while that thread is inside libpq's connect can die by a signal.
        .pool_min_idle(0)
        .pool_max_size(2)
        .no_janitor()
        // Caching switched off for the services must not stop their maintenance.
        .enabled(true);
    if let Some(url) = &cli.database_url {
        if std::env::var_os("PGCACHE_SHARDS").is_some() {
            // Which one was meant cannot be guessed; the shards would win silently.
            return Err(
                "--database-url names one database but PGCACHE_SHARDS is set: \
                        unset PGCACHE_SHARDS to work on one database"
                    .to_owned(),
            );
        }
        config = config.database_url(url);
    }
    if let Some(schema) = &cli.schema {
        config = config.schema(schema);
    }
    let config = config.build().map_err(flag_error)?;
    CacheManager::new(config).map_err(|e| e.to_string())
}

/// The message of a configuration error, naming the flag the user typed rather than
/// the builder setting it fed (variables from the environment are named as they are).
fn flag_error(error: pgcache::Error) -> String {
    if let pgcache::Error::Config {
        setting,
        value,
        reason,
    } = &error
    {
        let flag = match setting.as_str() {
            "database_url" => "--database-url",
            "schema" => "--schema",
            _ => return error.to_string(),
        };
        return format!("invalid configuration: {flag} `{value}`: {reason}");
    }
    error.to_string()
}

/// Reads and parses a warmup file; a malformed one is reported with its line and
/// column, and nothing is stored.
fn read_warmup(path: &std::path::Path) -> Result<pgcache::Warmup, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read warmup file {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("malformed warmup file {}: {e}", path.display()))
}

fn parse_user_id(text: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(text).map_err(|e| {
        format!("invalid user id `{text}`: expected a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8 ({e})")
    })
}

fn to_json(value: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(value).map_err(|e| e.to_string())
}

/// What `clear` is about to do, for the question: the rows it will delete (expired
/// ones included, counted now), the schema and the database (its password masked),
/// so the answer is given knowing which environment it is about.
fn clear_action(cache: &CacheManager, kind: Option<CacheKind>) -> Result<String, String> {
    let stats = cache.stats().map_err(|e| e.to_string())?;
    let tables: Vec<_> = stats
        .caches
        .iter()
        .filter(|t| kind.is_none_or(|k| t.cache == k))
        .collect();
    let rows: u64 = tables.iter().map(|t| t.entries).sum();
    let entries = count(rows, "entry", "entries");
    let what = match kind {
        Some(kind) => format!("all {entries} of the {kind} cache"),
        None => {
            let each: Vec<String> = tables
                .iter()
                .filter(|t| t.entries > 0)
                .map(|t| format!("{} {}", t.cache, t.entries))
                .collect();
            if each.is_empty() {
                format!("all {entries} of every cache")
            } else {
                format!("all {entries} of every cache ({})", each.join(", "))
            }
        }
    };
    let schema = cache.config().schema();
    Ok(format!(
        "delete {what} in schema \"{schema}\" of {}",
        databases(cache)
    ))
}

/// The database the cache is in, or its shards (passwords masked).
fn databases(cache: &CacheManager) -> String {
    let shards = cache.config().shards();
    if shards.is_empty() {
        return cache.config().database_url().redacted();
    }
    let each: Vec<String> = shards
        .iter()
        .map(|s| format!("{} ({})", s.name(), s.database_url().redacted()))
        .collect();
    format!("{} shards: {}", shards.len(), each.join(", "))
}

/// Asks on the terminal whether to do `action`; refuses when there is none to ask on.
fn confirm(action: &str) -> Result<bool, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(format!(
            "refusing to {action} without confirmation: stdin is not a terminal; \
             pass --yes to clear anyway"
        ));
    }
    let mut question = action.to_owned();
    if let Some(first) = question.get(..1) {
        question.replace_range(..1, &first.to_ascii_uppercase());
    }
    eprint!("{question}? [y/N] ");
    std::io::stderr().flush().map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
