//! The environment: every variable pgcache reads and the setting it feeds
//! ([`VARIABLES`]), and the warning for a misspelt one.

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use super::{CacheConfig, CacheConfigBuilder, Durability, Pooler};
use crate::codec::parse_keys;
use crate::error::{Error, Result};
use crate::kind::CacheKind;

/// The settings whose text holds a password, never kept or shown as given.
pub(super) const SECRET_SETTINGS: [&str; 4] =
    ["database_url", "shards", "direct_url", "encryption_keys"];

/// How an environment variable's text is applied to the builder; given the
/// variable's name for its parse errors.
type Apply =
    Box<dyn Fn(CacheConfigBuilder, &str, &str) -> Result<CacheConfigBuilder> + Send + Sync>;

/// One environment variable and the builder setting it feeds.
pub(super) struct Variable {
    pub(super) name: String,
    /// The setter's name, as errors about builder values give it.
    pub(super) setting: String,
    pub(super) apply: Apply,
}

/// Every environment variable pgcache reads: the one list `from_vars` follows.
pub(super) static VARIABLES: LazyLock<Vec<Variable>> = LazyLock::new(|| {
    fn var(
        name: &str,
        setting: &str,
        apply: impl Fn(CacheConfigBuilder, &str, &str) -> Result<CacheConfigBuilder>
            + Send
            + Sync
            + 'static,
    ) -> Variable {
        Variable {
            name: name.to_owned(),
            setting: setting.to_owned(),
            apply: Box::new(apply),
        }
    }
    let mut variables = vec![
        var("DATABASE_URL", "database_url", |b, _, v| {
            Ok(b.database_url(v))
        }),
        var("PGCACHE_SHARDS", "shards", parse_shards),
        var("ENABLE_CACHING", "enabled", |b, n, v| {
            Ok(b.enabled(parse_bool(n, v)?))
        }),
        var("CACHE_TTL_SHORT", "ttl_short", |b, n, v| {
            Ok(b.ttl_short(parse_secs(n, v)?))
        }),
        var("CACHE_TTL_MEDIUM", "ttl_medium", |b, n, v| {
            Ok(b.ttl_medium(parse_secs(n, v)?))
        }),
        var("CACHE_TTL_LONG", "ttl_long", |b, n, v| {
            Ok(b.ttl_long(parse_secs(n, v)?))
        }),
        var("CACHE_TTL_WEEK", "ttl_week", |b, n, v| {
            Ok(b.ttl_week(parse_secs(n, v)?))
        }),
        var("PGCACHE_POOL_MAX_SIZE", "pool_max_size", |b, n, v| {
            Ok(b.pool_max_size(parse_u32(n, v)?))
        }),
        var("PGCACHE_POOL_MIN_IDLE", "pool_min_idle", |b, n, v| {
            Ok(b.pool_min_idle(parse_u32(n, v)?))
        }),
        var(
            "PGCACHE_POOL_IDLE_TIMEOUT_SECS",
            "pool_idle_timeout",
            |b, n, v| Ok(b.pool_idle_timeout(parse_secs(n, v)?)),
        ),
        var(
            "PGCACHE_POOL_CONNECTION_TIMEOUT_MS",
            "pool_connection_timeout",
            |b, n, v| Ok(b.pool_connection_timeout(parse_millis(n, v)?)),
        ),
        var(
            "PGCACHE_STATEMENT_TIMEOUT_MS",
            "statement_timeout",
            |b, n, v| Ok(b.statement_timeout(parse_millis(n, v)?)),
        ),
        var(
            "PGCACHE_MIGRATION_TIMEOUT_MS",
            "migration_timeout",
            |b, n, v| Ok(b.migration_timeout(parse_millis(n, v)?)),
        ),
        var("PGCACHE_SCHEMA", "schema", |b, _, v| Ok(b.schema(v))),
        var("PGCACHE_RUN_MIGRATIONS", "run_migrations", |b, n, v| {
            Ok(b.run_migrations(parse_bool(n, v)?))
        }),
        var("PGCACHE_DURABILITY", "durability", |b, n, v| {
            Ok(b.durability(Durability::parse(n, v)?))
        }),
        var("PGCACHE_FAIL_OPEN", "fail_open", |b, n, v| {
            Ok(b.fail_open(parse_bool(n, v)?))
        }),
        var("PGCACHE_WATCHDOG", "watchdog", |b, n, v| {
            Ok(b.watchdog(parse_bool(n, v)?))
        }),
        var(
            "PGCACHE_STATS_FLUSH_MS",
            "stats_flush_interval",
            |b, n, v| Ok(b.stats_flush_interval(parse_millis(n, v)?)),
        ),
        var("PGCACHE_LEASE_TTL_MS", "lease_ttl", |b, n, v| {
            Ok(b.lease_ttl(parse_millis(n, v)?))
        }),
        var(
            "PGCACHE_COMPUTE_WAIT_MS",
            "compute_wait_timeout",
            |b, n, v| Ok(b.compute_wait_timeout(parse_millis(n, v)?)),
        ),
        var(
            "PGCACHE_STALE_WHILE_REVALIDATE_MS",
            "stale_while_revalidate",
            stale_window,
        ),
        var(
            "PGCACHE_EARLY_REFRESH_BETA",
            "early_refresh_beta",
            early_refresh_beta,
        ),
        // 0 means off, as unset.
        var(
            "PGCACHE_JANITOR_INTERVAL_SECS",
            "janitor_interval",
            |b, n, v| {
                Ok(match parse_secs(n, v)? {
                    Duration::ZERO => b.no_janitor(),
                    interval => b.janitor_interval(interval),
                })
            },
        ),
        var(
            "PGCACHE_EVICTION_LOW_WATERMARK",
            "eviction_low_watermark",
            |b, n, v| {
                let fraction = parse_f64(n, v, "a fraction between 0 and 1")?;
                Ok(b.eviction_low_watermark(fraction))
            },
        ),
    ];
    variables.push(var("PGCACHE_POOLER", "pooler", |b, n, v| {
        Ok(b.pooler(Pooler::parse(n, v)?))
    }));
    variables.push(var("PGCACHE_DIRECT_URL", "direct_url", |b, _, v| {
        Ok(b.direct_url(v))
    }));
    variables.push(var(
        "PGCACHE_COMPRESSION_THRESHOLD_BYTES",
        "compression_threshold",
        |b, n, v| {
            Ok(match v.trim() {
                "off" => b.compression_threshold(None),
                _ => b.compression_threshold(Some(
                    usize::try_from(parse_u64(n, v, "bytes")?).unwrap_or(usize::MAX),
                )),
            })
        },
    ));
    variables.push(var(
        "PGCACHE_ENCRYPTION_KEYS",
        "encryption_keys",
        |mut b, n, v| {
            // Never the text: it holds the keys.
            b.codec.keys =
                parse_keys(v).map_err(|reason| Error::config(n, "<not shown>", reason))?;
            Ok(b)
        },
    ));
    variables.push(var("PGCACHE_HASH_KV_KEYS", "hash_kv_keys", |b, _, v| {
        let id = v.trim();
        Ok(b.hash_kv_keys((!id.is_empty()).then(|| id.to_owned())))
    }));
    variables.push(var(
        "PGCACHE_NEAR_CACHE_STALENESS_MS",
        "near_cache_staleness",
        |b, n, v| Ok(b.near_cache_staleness(parse_millis(n, v)?)),
    ));
    for cache in CacheKind::ALL {
        let upper = cache.name().to_ascii_uppercase();
        let setting = format!("near_cache({})", cache.name());
        // Either variable turns the near cache on, with the other's default.
        variables.push(var(
            &format!("PGCACHE_{upper}_NEAR_CACHE_BYTES"),
            &setting,
            move |b, n, v| {
                let near = b.config.near_caches[cache.index()].unwrap_or_default();
                Ok(b.near_cache(cache, Some(near.max_bytes(parse_u64(n, v, "bytes")?))))
            },
        ));
        variables.push(var(
            &format!("PGCACHE_{upper}_NEAR_CACHE_MAX_AGE_MS"),
            &setting,
            move |b, n, v| {
                let near = b.config.near_caches[cache.index()].unwrap_or_default();
                Ok(b.near_cache(cache, Some(near.max_age(parse_millis(n, v)?))))
            },
        ));
        // 0 means no bound, as unset.
        variables.push(var(
            &bound_variable(cache, Bound::Entries),
            &bound_setting(cache, Bound::Entries),
            move |b, n, v| {
                let max = parse_u64(n, v, "entries")?;
                Ok(b.max_entries(cache, Some(max).filter(|&n| n > 0)))
            },
        ));
        variables.push(var(
            &bound_variable(cache, Bound::Bytes),
            &bound_setting(cache, Bound::Bytes),
            move |b, n, v| {
                let max = parse_u64(n, v, "bytes")?;
                Ok(b.max_bytes(cache, Some(max).filter(|&n| n > 0)))
            },
        ));
    }
    variables
});

/// A `PGCACHE_*` environment variable pgcache does not read: most likely a
/// misspelling, which would otherwise pass silently for the default. Its `Display`
/// is the warning: `unknown environment variable PGCACHE_STATMENT_TIMEOUT_MS
/// ignored; did you mean PGCACHE_STATEMENT_TIMEOUT_MS?`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnknownVariable {
    /// The name as set.
    pub name: String,
    /// The closest known name, when one is within three edits.
    pub closest: Option<&'static str>,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown environment variable {} ignored", self.name)?;
        match self.closest {
            Some(closest) => write!(f, "; did you mean {closest}?"),
            None => Ok(()),
        }
    }
}

impl CacheConfig {
    /// The `PGCACHE_*` variables of the process environment that pgcache does not
    /// read, each with the closest known name: what [`Self::from_env`] warns about
    /// through `tracing`, for a program that reports it another way.
    pub fn unknown_env_vars() -> Vec<UnknownVariable> {
        std::env::vars_os()
            .filter_map(|(name, _)| {
                let name = name.into_string().ok()?;
                let closest = unknown_variable(&name)?;
                Some(UnknownVariable { name, closest })
            })
            .collect()
    }
}

/// Warns about a `PGCACHE_*` variable pgcache does not read (see [`UnknownVariable`]).
pub(super) fn warn_if_misspelt(name: &str) {
    if let Some(closest) = unknown_variable(name) {
        let unknown = UnknownVariable {
            name: name.to_owned(),
            closest,
        };
        tracing::warn!(variable = name, "pgcache: {unknown}");
    }
}

/// For a `PGCACHE_*` name that is not a known variable, `Some`, with the closest
/// known name when one is within three edits; `None` for known and foreign names.
fn unknown_variable(name: &str) -> Option<Option<&'static str>> {
    if !name.starts_with("PGCACHE_") || VARIABLES.iter().any(|v| v.name == name) {
        return None;
    }
    let closest = VARIABLES
        .iter()
        .map(|v| (edit_distance(name, &v.name), v.name.as_str()))
        .min()
        .filter(|&(distance, _)| distance <= 3)
        .map(|(_, closest)| closest);
    Some(closest)
}

/// Levenshtein distance (names are short ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.as_bytes().iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The two bounds a cache may have.
#[derive(Clone, Copy)]
pub(super) enum Bound {
    Entries,
    Bytes,
}

/// The environment variable setting `bound` of `cache`, e.g. `PGCACHE_KV_MAX_BYTES`.
fn bound_variable(cache: CacheKind, bound: Bound) -> String {
    let suffix = match bound {
        Bound::Entries => "MAX_ENTRIES",
        Bound::Bytes => "MAX_BYTES",
    };
    format!("PGCACHE_{}_{suffix}", cache.name().to_ascii_uppercase())
}

/// The builder setting of `bound` of `cache`, e.g. `max_bytes(kv)`.
pub(super) fn bound_setting(cache: CacheKind, bound: Bound) -> String {
    let setter = match bound {
        Bound::Entries => "max_entries",
        Bound::Bytes => "max_bytes",
    };
    format!("{setter}({})", cache.name())
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(name, value, "expected true or false")),
    }
}

fn parse_u64(name: &str, value: &str, unit: &str) -> Result<u64> {
    value.trim().parse::<u64>().map_err(|_| {
        Error::config(
            name,
            value,
            format!("expected a whole, non-negative number of {unit}"),
        )
    })
}

fn parse_secs(name: &str, value: &str) -> Result<Duration> {
    parse_u64(name, value, "seconds").map(Duration::from_secs)
}

/// A number; `expected` says what kind in the error.
fn parse_f64(name: &str, value: &str, expected: &str) -> Result<f64> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::config(name, value, format!("expected {expected}")))
}

/// `PGCACHE_STALE_WHILE_REVALIDATE_MS`.
fn stale_window(b: CacheConfigBuilder, name: &str, value: &str) -> Result<CacheConfigBuilder> {
    Ok(b.stale_while_revalidate(parse_millis(name, value)?))
}

/// `PGCACHE_EARLY_REFRESH_BETA`: a number here, its range checked by the builder.
fn early_refresh_beta(
    b: CacheConfigBuilder,
    name: &str,
    value: &str,
) -> Result<CacheConfigBuilder> {
    Ok(b.early_refresh_beta(parse_f64(name, value, "a number, zero or more")?))
}

fn parse_millis(name: &str, value: &str) -> Result<Duration> {
    parse_u64(name, value, "milliseconds").map(Duration::from_millis)
}

fn parse_u32(name: &str, value: &str) -> Result<u32> {
    value
        .trim()
        .parse::<u32>()
        .map_err(|_| Error::config(name, value, "expected a whole, non-negative number"))
}

/// `PGCACHE_SHARDS`: `name=url` pairs separated by commas (a URL's own first `=`
/// ends the name, so libpq's `key=value` form works: `a=host=db1 port=5432`).
fn parse_shards(
    mut b: CacheConfigBuilder,
    variable: &str,
    text: &str,
) -> Result<CacheConfigBuilder> {
    b.shards.clear();
    let pairs = text.split(',').map(str::trim).filter(|p| !p.is_empty());
    for (i, pair) in pairs.enumerate() {
        let Some((name, url)) = pair.split_once('=') else {
            // The pair may be a bare URL with a password: not shown.
            return Err(Error::config(
                variable,
                format!("<pair {}, not shown>", i + 1),
                "each shard is `name=url` (e.g. `a=postgres://db1/cache,b=postgres://db2/cache`)",
            ));
        };
        b = b.shard(name.trim(), url.trim());
    }
    if b.shards.is_empty() {
        return Err(Error::config(
            variable,
            "",
            "at least one `name=url` pair is needed; unset it for one database",
        ));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_variable_is_reported_with_the_closest_name() {
        assert_eq!(
            unknown_variable("PGCACHE_POOL_MAX_SIZ"),
            Some(Some("PGCACHE_POOL_MAX_SIZE"))
        );
        assert_eq!(
            unknown_variable("PGCACHE_KV_MAX_ENTRY"),
            Some(Some("PGCACHE_KV_MAX_ENTRIES"))
        );
        assert_eq!(
            unknown_variable("PGCACHE_SOMETHING_ELSE_ENTIRELY"),
            Some(None)
        );
    }

    #[test]
    fn known_and_foreign_variables_are_not_reported() {
        assert_eq!(unknown_variable("PGCACHE_POOL_MAX_SIZE"), None);
        assert_eq!(unknown_variable("PGCACHE_AUDIO_CHUNK_MAX_BYTES"), None);
        assert_eq!(unknown_variable("PATH"), None);
        assert_eq!(unknown_variable("CACHE_TTL_SHORT"), None);
    }

    /// The tables in docs/reference/configuration.md and in `from_vars`'s
    /// documentation are written by hand: each must name every variable of the list
    /// (the bounds once, for all caches).
    #[test]
    fn the_documented_tables_name_every_variable() {
        let readme = include_str!("../../docs/reference/configuration.md");
        let rustdoc: String = include_str!("mod.rs")
            .lines()
            .filter(|line| line.trim_start().starts_with("/// | `"))
            .collect();
        for variable in VARIABLES.iter() {
            let mut name = variable.name.clone();
            for cache in CacheKind::ALL {
                let prefix = format!("PGCACHE_{}_", cache.name().to_ascii_uppercase());
                name = name.replace(&prefix, "PGCACHE_<CACHE>_");
            }
            let name = name.replace("CACHE_TTL_", "");
            for (doc, text) in [("configuration.md", readme), ("rustdoc", rustdoc.as_str())] {
                assert!(
                    text.contains(&name),
                    "{doc} does not name {}",
                    variable.name
                );
            }
        }
    }
}
