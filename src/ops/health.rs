//! [`CacheManager::health`](crate::CacheManager::health): alert thresholds on the hit
//! rate, size, query time and cleanup age, evaluated.
//!
//! Query time is judged over a sliding window: the queries of the last 5 minutes
//! (`latency::WINDOW`: the current minute and the four before it), so
//! the `slow_queries` alert fires during a slow spell however long the process has
//! run, and clears about 5 minutes after it.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::engine::Engine;
use crate::error::Result;
use crate::latency::WINDOW;
use crate::ops::stats::{human_bytes, percent, total_size, Lookups};
use crate::watchdog::watched;

/// The thresholds [`CacheManager::health`](crate::CacheManager::health) checks. Every setter consumes and returns
/// the builder; the defaults alert below a 70 % hit rate, above 80 % of the size
/// budget, above a 10 ms p95 query time and on a cleanup more than 2 hours old.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct HealthThresholds {
    min_hit_rate: f64,
    min_lookups: u64,
    size_budget_bytes: Option<u64>,
    max_size_fraction: f64,
    max_p95: Duration,
    min_latency_samples: u64,
    max_cleanup_age: Option<Duration>,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        HealthThresholds {
            min_hit_rate: 0.70,
            min_lookups: 100,
            size_budget_bytes: None,
            max_size_fraction: 0.80,
            max_p95: Duration::from_millis(10),
            min_latency_samples: 100,
            max_cleanup_age: Some(Duration::from_secs(2 * 3600)),
        }
    }
}

impl HealthThresholds {
    /// The defaults (see each setter).
    pub fn new() -> Self {
        Self::default()
    }

    /// Alert when the hit rate over all caches is below `rate` (0.0 to 1.0).
    /// Default: 0.70.
    pub fn min_hit_rate(mut self, rate: f64) -> Self {
        self.min_hit_rate = rate;
        self
    }

    /// Judge the hit rate only after this many lookups, so a fresh deployment does
    /// not alert on its first few misses. Default: 100.
    pub fn min_lookups(mut self, lookups: u64) -> Self {
        self.min_lookups = lookups;
        self
    }

    /// The space allocated to the cache tables, in bytes (all five tables, indexes
    /// and TOAST included). Default: none, and the size check is skipped.
    pub fn size_budget_bytes(mut self, bytes: u64) -> Self {
        self.size_budget_bytes = Some(bytes);
        self
    }

    /// Alert when the cache tables use more than this fraction of the budget.
    /// Default: 0.80.
    pub fn max_size_fraction(mut self, fraction: f64) -> Self {
        self.max_size_fraction = fraction;
        self
    }

    /// Alert when the 95th percentile of this process's cache query time (pool wait
    /// included) over the last 5 minutes is above `p95`. Default: 10 ms.
    pub fn max_p95_query_time(mut self, p95: Duration) -> Self {
        self.max_p95 = p95;
        self
    }

    /// Judge query time only when this process ran this many queries in the last 5
    /// minutes. Default: 100.
    pub fn min_latency_samples(mut self, samples: u64) -> Self {
        self.min_latency_samples = samples;
        self
    }

    /// Alert when the last successful cleanup finished longer ago than `age`, or,
    /// when none ever succeeded, when the cache tables were created (migrated) longer
    /// ago than `age`: a fresh deployment is healthy until its first cleanup is
    /// overdue. Default: 2 hours (an hourly cron job, with slack).
    pub fn max_cleanup_age(mut self, age: Duration) -> Self {
        self.max_cleanup_age = Some(age);
        self
    }

    /// Do not check how long ago cleanup ran (a failed last run still alerts).
    pub fn no_cleanup_age_check(mut self) -> Self {
        self.max_cleanup_age = None;
        self
    }
}

/// One alert that fires.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "alert", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Alert {
    /// The hit rate over all caches is below the threshold.
    LowHitRate {
        /// Measured hit rate, 0.0 to 1.0.
        hit_rate: f64,
        /// The threshold.
        min_hit_rate: f64,
        /// Lookups the rate is based on.
        lookups: u64,
    },
    /// The cache tables use more than the allowed part of their budget.
    SizeOverBudget {
        /// Bytes used by the cache tables.
        size_bytes: u64,
        /// The configured budget.
        budget_bytes: u64,
        /// The allowed fraction of the budget.
        max_fraction: f64,
    },
    /// The 95th percentile of cache query time in this process is too high.
    SlowQueries {
        /// Measured p95, in milliseconds (rounded up to the histogram bucket).
        p95_ms: f64,
        /// The threshold, in milliseconds.
        max_p95_ms: f64,
        /// Queries measured.
        samples: u64,
    },
    /// The most recent cleanup run failed.
    CleanupFailed {
        /// When it finished.
        finished_at: DateTime<Utc>,
        /// Its error.
        error: String,
    },
    /// A shard of a sharded cache did not answer: its keys fail (or miss, failing
    /// open), and the other figures leave it out.
    ShardDown {
        /// The shard's name.
        shard: String,
        /// Why, as the error said it.
        error: String,
    },
    /// No cleanup succeeded within the allowed age (counted from the creation of the
    /// cache tables when none ever succeeded).
    CleanupOverdue {
        /// When the last successful cleanup finished, if ever.
        last_success: Option<DateTime<Utc>>,
        /// The allowed age, in seconds.
        max_age_secs: u64,
    },
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alert::LowHitRate { hit_rate, min_hit_rate, lookups } => write!(
                f,
                "hit rate {} is below {} (over {lookups} lookups)",
                percent(Some(*hit_rate)),
                percent(Some(*min_hit_rate))
            ),
            Alert::SizeOverBudget { size_bytes, budget_bytes, max_fraction } => write!(
                f,
                "cache size {} is {:.1}% of the {} budget (limit {:.0}%)",
                human_bytes(*size_bytes),
                *size_bytes as f64 * 100.0 / *budget_bytes as f64,
                human_bytes(*budget_bytes),
                max_fraction * 100.0
            ),
            Alert::SlowQueries { p95_ms, max_p95_ms, samples } => write!(
                f,
                "p95 cache query time {p95_ms:.1} ms is above {max_p95_ms:.1} ms (over {samples} queries)"
            ),
            Alert::CleanupFailed { finished_at, error } => {
                write!(f, "last cleanup failed at {finished_at}: {error}")
            }
            Alert::ShardDown { shard, error } => write!(f, "shard `{shard}` is down: {error}"),
            Alert::CleanupOverdue { last_success: Some(at), max_age_secs } => write!(
                f,
                "cleanup is overdue: last success at {at}, more than {max_age_secs} s ago"
            ),
            Alert::CleanupOverdue { last_success: None, .. } => {
                write!(
                    f,
                    "cleanup has never run since the cache tables were created: schedule \
                     `pgcache cleanup` or enable the janitor"
                )
            }
        }
    }
}

/// The last recorded cleanup run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CleanupRun {
    /// When it finished.
    pub finished_at: DateTime<Utc>,
    /// Whether it succeeded.
    pub succeeded: bool,
    /// Expired rows it removed.
    pub rows_removed: u64,
    /// Its error, when it failed.
    pub error_message: Option<String>,
}

/// What [`CacheManager::health`](crate::CacheManager::health) measured and which alerts fire.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// Firing alerts; empty when healthy.
    pub alerts: Vec<Alert>,
    /// Hits and misses over all caches (all processes that flushed, plus this one).
    pub lookups: Lookups,
    /// Bytes used by the cache tables.
    pub size_bytes: u64,
    /// The configured budget, if any.
    pub size_budget_bytes: Option<u64>,
    /// p95 of this process's cache query time over the last 5 minutes, in
    /// milliseconds; `None` without queries in that time.
    pub p95_query_ms: Option<f64>,
    /// Cache queries this process ran in the last 5 minutes.
    pub query_samples: u64,
    /// The most recent cleanup run, if any.
    pub last_cleanup: Option<CleanupRun>,
}

impl HealthReport {
    /// True when no alert fires.
    pub fn is_healthy(&self) -> bool {
        self.alerts.is_empty()
    }
}

impl fmt::Display for HealthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_healthy() {
            writeln!(f, "healthy")?;
        } else {
            writeln!(f, "UNHEALTHY: {} alert(s)", self.alerts.len())?;
            for alert in &self.alerts {
                writeln!(f, "  ALERT {alert}")?;
            }
        }
        writeln!(
            f,
            "  hit rate: {} ({} hits, {} misses)",
            percent(self.lookups.hit_rate()),
            self.lookups.hits,
            self.lookups.misses
        )?;
        match self.size_budget_bytes {
            Some(budget) => writeln!(
                f,
                "  size: {} of {} budget",
                human_bytes(self.size_bytes),
                human_bytes(budget)
            )?,
            None => writeln!(
                f,
                "  size: {} (no budget set)",
                human_bytes(self.size_bytes)
            )?,
        }
        match self.p95_query_ms {
            Some(p95) => writeln!(
                f,
                "  p95 query time: {p95:.2} ms over {} queries in this process in the last {} min",
                self.query_samples,
                WINDOW.as_secs() / 60
            )?,
            None => writeln!(
                f,
                "  p95 query time: n/a (no queries in this process in the last {} min)",
                WINDOW.as_secs() / 60
            )?,
        }
        match &self.last_cleanup {
            Some(run) => write!(
                f,
                "  last cleanup: {} at {}, {} rows removed",
                if run.succeeded { "succeeded" } else { "FAILED" },
                run.finished_at,
                run.rows_removed
            ),
            None => write!(f, "  last cleanup: never"),
        }
    }
}

/// What one shard tells about its health.
struct ShardFacts {
    lookups: Lookups,
    size_bytes: u64,
    cleanup: CleanupFacts,
}

/// One shard's cleanup history, as the cleanup checks judge it.
struct CleanupFacts {
    last: Option<CleanupRun>,
    last_success: Option<DateTime<Utc>>,
    /// When its last successful cleanup finished, else when its tables were made.
    since: Option<DateTime<Utc>>,
    /// The database's time of the reading.
    now: DateTime<Utc>,
}

impl CleanupFacts {
    /// Reads the last run, the last success and the database's time in one
    /// statement.
    fn read(engine: &Engine, conn: &mut PgConnection) -> Result<Self> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = Nullable<Timestamptz>)]
            finished_at: Option<DateTime<Utc>>,
            #[diesel(sql_type = Nullable<Bool>)]
            succeeded: Option<bool>,
            #[diesel(sql_type = Nullable<BigInt>)]
            rows_removed: Option<i64>,
            #[diesel(sql_type = Nullable<Text>)]
            error_message: Option<String>,
            #[diesel(sql_type = Nullable<Timestamptz>)]
            last_success: Option<DateTime<Utc>>,
            #[diesel(sql_type = Timestamptz)]
            now: DateTime<Utc>,
        }
        let runs = engine.tables().cleanup_runs();
        let row: Row = diesel::sql_query(format!(
            "SELECT last.finished_at, last.succeeded, last.rows_removed, last.error_message, \
             (SELECT max(finished_at) FROM {runs} WHERE succeeded) AS last_success, \
             statement_timestamp() AS now \
             FROM (SELECT) AS one LEFT JOIN LATERAL (SELECT * FROM {runs} \
             ORDER BY id DESC LIMIT 1) AS last ON true"
        ))
        .get_result(conn)?;
        let last = match (row.finished_at, row.succeeded, row.rows_removed) {
            (Some(finished_at), Some(succeeded), Some(rows_removed)) => Some(CleanupRun {
                finished_at,
                succeeded,
                rows_removed: rows_removed.unsigned_abs(),
                error_message: row.error_message,
            }),
            _ => None,
        };
        // Without any successful cleanup, the tables' age is the reference: a freshly
        // migrated schema has not missed a cleanup yet.
        let since = match row.last_success {
            Some(at) => Some(at),
            None => crate::migrations::migrated_at(conn, engine.config().schema())?,
        };
        Ok(CleanupFacts {
            last,
            last_success: row.last_success,
            since,
            now: row.now,
        })
    }

    /// Whether the last success (or, without one, the tables' creation) is more
    /// than `max_age` ago; unknown counts as overdue.
    fn overdue(&self, max_age: Duration) -> bool {
        self.since
            .is_none_or(|at| (self.now - at).to_std().unwrap_or(Duration::ZERO) > max_age)
    }
}

/// One shard's facts: every statement on one live connection, under the watchdog,
/// so a server that freezes during the call fails it within the statement limit.
fn shard_facts(engine: &Engine) -> Result<ShardFacts> {
    super::stats::flush_before_reading(engine)?;
    let mut conn = engine.live_connection()?;
    watched(&mut conn, |conn| {
        Ok(ShardFacts {
            lookups: super::stats::lookups(engine, conn)?
                .into_iter()
                .map(|(_, l)| l)
                .sum(),
            size_bytes: total_size(conn, engine.tables())?,
            cleanup: CleanupFacts::read(engine, conn)?,
        })
    })
}

/// [`CacheManager::health`](crate::CacheManager::health): every shard at once, the
/// thresholds judged on their totals; with several shards, one that does not answer
/// is an alert instead of an error.
pub(crate) fn health(cluster: &Cluster, thresholds: &HealthThresholds) -> Result<HealthReport> {
    let t = thresholds;
    let mut alerts = Vec::new();
    let mut shards = Vec::new();
    for (name, facts) in cluster.each(shard_facts) {
        match facts {
            Ok(facts) => shards.push((name, facts)),
            Err(error) if cluster.single().is_some() => return Err(error),
            Err(error) => alerts.push(Alert::ShardDown {
                shard: name.to_owned(),
                error: error.to_string(),
            }),
        }
    }
    let lookups: Lookups = shards.iter().map(|(_, facts)| facts.lookups).sum();
    let size_bytes: u64 = shards.iter().map(|(_, facts)| facts.size_bytes).sum();
    let mut latency = cluster.front().latency().histogram();
    for (_, engine) in cluster.shards().skip(1) {
        latency.add(&engine.latency().histogram());
    }
    let query_samples = latency.samples();
    let p95 = latency.quantile(0.95);

    if let Some(rate) = lookups.hit_rate() {
        if lookups.total() >= t.min_lookups && rate < t.min_hit_rate {
            alerts.push(Alert::LowHitRate {
                hit_rate: rate,
                min_hit_rate: t.min_hit_rate,
                lookups: lookups.total(),
            });
        }
    }
    if let Some(budget) = t.size_budget_bytes {
        if size_bytes as f64 > budget as f64 * t.max_size_fraction {
            alerts.push(Alert::SizeOverBudget {
                size_bytes,
                budget_bytes: budget,
                max_fraction: t.max_size_fraction,
            });
        }
    }
    if let Some(p95) = p95 {
        if query_samples >= t.min_latency_samples && p95 > t.max_p95 {
            alerts.push(Alert::SlowQueries {
                p95_ms: millis(p95),
                max_p95_ms: millis(t.max_p95),
                samples: query_samples,
            });
        }
    }
    for (name, facts) in &shards {
        if let Some(run) = facts.cleanup.last.as_ref().filter(|r| !r.succeeded) {
            let error = run.error_message.clone().unwrap_or_default();
            alerts.push(Alert::CleanupFailed {
                finished_at: run.finished_at,
                error: match cluster.single() {
                    Some(_) => error,
                    None => format!("shard `{name}`: {error}"),
                },
            });
        }
    }
    if let Some(max_age) = t.max_cleanup_age {
        // The shard cleaned longest ago decides.
        let oldest = shards
            .iter()
            .map(|(_, f)| &f.cleanup)
            .min_by_key(|c| c.since);
        if let Some(cleanup) = oldest.filter(|c| c.overdue(max_age)) {
            alerts.push(Alert::CleanupOverdue {
                last_success: cleanup.last_success,
                max_age_secs: max_age.as_secs(),
            });
        }
    }
    // The most recent run of any shard.
    let last_cleanup = shards
        .into_iter()
        .filter_map(|(_, f)| f.cleanup.last)
        .max_by_key(|run| run.finished_at);
    Ok(HealthReport {
        alerts,
        lookups,
        size_bytes,
        size_budget_bytes: t.size_budget_bytes,
        p95_query_ms: p95.map(millis),
        query_samples,
        last_cleanup,
    })
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
