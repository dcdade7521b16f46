//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: pgcache records,
//! the application's recorder (a Prometheus exporter, StatsD, ...) exports. Without
//! a recorder installed every recording is a no-op of a few nanoseconds: the keys
//! are built once, so nothing is allocated on the request path.
//!
//! This module owns every metric name; nothing else in the crate spells one.
//!
//! | name | type | labels | unit | what |
//! |---|---|---|---|---|
//! | `pgcache_hits_total` | counter | `cache` | keys | lookups (`get`, `get_many`) that found a live entry, near-cache hits included |
//! | `pgcache_misses_total` | counter | `cache` | keys | lookups that found nothing (fail-open misses included) |
//! | `pgcache_sets_total` | counter | `cache` | entries | entries written by `set`, `set_many` and their TTL forms |
//! | `pgcache_deletes_total` | counter | `cache` | keys | keys given to `delete`, `delete_many` (live or not) |
//! | `pgcache_errors_total` | counter | `cache`, `op`, `error` | operations | operations that returned an error; `error` is the [`Error`] variant in snake case (`invalid_input`, `connection`, `database`, `unresponsive`, ...) |
//! | `pgcache_fail_open_total` | counter | `cache`, `op` | operations | operations that failed transiently and were answered as a miss or a skipped write (fail-open mode) |
//! | `pgcache_evictions_total` | counter | `cache` | rows | rows evicted by a size bound (least recently used first) |
//! | `pgcache_cleanup_removed_total` | counter | `cache` | rows | expired rows removed by cleanup |
//! | `pgcache_single_flight_waits_total` | counter | `cache` | calls | `get_or_compute` calls that waited for another caller's computation |
//! | `pgcache_pool_wait_seconds` | histogram | none | seconds | time to check a connection out of the pool (probing a suspect one included), per pooled operation |
//! | `pgcache_query_duration_seconds` | histogram | `cache`, `op` | seconds | an operation's time on the database path: pool wait, catch-up, the statement, a retry (near-cache hits do not reach it) |
//! | `pgcache_database_up` | gauge | `shard` | 1 or 0 | 0 while the database (or shard) is known to be down and operations on it fail at once; 1 once it answers again |
//! | `pgcache_near_cache_lookups_total` | counter | `cache`, `outcome` | reads | near-cache reads: `hit` (answered from memory), `miss` (went to the database), `bypass` (the poller was not current, so the database was asked) |
//! | `pgcache_near_cache_poll_seconds` | histogram | none | seconds | round trip of each poll of the change log: with the 2 ms poll interval, how far behind the near caches run |
//!
//! `shard` is the shard's name, [`DEFAULT_SHARD`](crate::DEFAULT_SHARD) for one
//! database. `cache` is the cache's name ([`CacheKind::name`]: `kv`, `embedding`, ...). `op`
//! is the operation: `get`, `get_many`, `set`, `set_many`, `delete`,
//! `delete_many`, `lease` (single-flight polls), and the key/value cache's own
//! (`exists`, `ttl`, `touch`, `get_touch`, `incr`, `decr`, `set_nx`,
//! `get_del`, `delete_prefix`, `clear`, `find_containing`, `invalidate_tags`), `report` (popularity reports) and `evict`.
//! `incr`, `decr`, `set_nx`, `get_del` and `get_touch` are counted under their own
//! `op` only, never in `pgcache_sets_total`, `pgcache_deletes_total` or the lookups.
//! Operations on a caller's connection (the `*_in` methods) are not counted: they
//! run in the caller's transaction, outside the pool.
//!
//! Call [`describe`] once after installing a recorder to give the exporter each
//! metric's unit and description.

use std::sync::LazyLock;
use std::time::Duration;

use ::metrics::{Key, Label, Level, Metadata, Unit};

use crate::error::Error;
use crate::kind::CacheKind;

/// Lookups that found a live entry.
pub const HITS: &str = "pgcache_hits_total";
/// Lookups that found nothing.
pub const MISSES: &str = "pgcache_misses_total";
/// Entries written.
pub const SETS: &str = "pgcache_sets_total";
/// Keys deleted.
pub const DELETES: &str = "pgcache_deletes_total";
/// Operations that returned an error, by error kind.
pub const ERRORS: &str = "pgcache_errors_total";
/// Operations answered by fail-open mode.
pub const FAIL_OPEN: &str = "pgcache_fail_open_total";
/// Rows evicted by a size bound.
pub const EVICTIONS: &str = "pgcache_evictions_total";
/// Expired rows removed by cleanup.
pub const CLEANUP_REMOVED: &str = "pgcache_cleanup_removed_total";
/// `get_or_compute` calls that waited for another caller.
pub const SINGLE_FLIGHT_WAITS: &str = "pgcache_single_flight_waits_total";
/// Time to check a connection out of the pool.
pub const POOL_WAIT: &str = "pgcache_pool_wait_seconds";
/// Time of an operation on the database path.
pub const QUERY_DURATION: &str = "pgcache_query_duration_seconds";
/// Whether a database (shard) answers.
pub const DATABASE_UP: &str = "pgcache_database_up";
/// Near-cache reads, by outcome.
pub const NEAR_CACHE_LOOKUPS: &str = "pgcache_near_cache_lookups_total";
/// Round trip of a near-cache poll.
pub const NEAR_CACHE_POLL: &str = "pgcache_near_cache_poll_seconds";

/// Every metric pgcache records, for tooling that checks a dashboard or alert
/// against them.
pub const ALL: [&str; 14] = [
    HITS,
    MISSES,
    SETS,
    DELETES,
    ERRORS,
    FAIL_OPEN,
    EVICTIONS,
    CLEANUP_REMOVED,
    SINGLE_FLIGHT_WAITS,
    POOL_WAIT,
    QUERY_DURATION,
    DATABASE_UP,
    NEAR_CACHE_LOOKUPS,
    NEAR_CACHE_POLL,
];

/// The target of pgcache's spans and of its metrics' metadata: what
/// `RUST_LOG=pgcache=trace` selects.
pub const TARGET: &str = "pgcache";

/// Label naming the cache.
const CACHE: &str = "cache";
/// Label naming the operation.
const OP: &str = "op";

/// Gives the installed recorder each metric's unit and description (exporters show
/// them as help text). Call it once after installing the recorder; recording works
/// without it.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(HITS, Unit::Count, "Cache lookups that found a live entry");
    describe_counter!(MISSES, Unit::Count, "Cache lookups that found nothing");
    describe_counter!(SETS, Unit::Count, "Cache entries written");
    describe_counter!(DELETES, Unit::Count, "Cache keys deleted");
    describe_counter!(
        ERRORS,
        Unit::Count,
        "Cache operations that returned an error"
    );
    describe_counter!(
        FAIL_OPEN,
        Unit::Count,
        "Cache operations answered as a miss or skipped write after a transient failure"
    );
    describe_counter!(EVICTIONS, Unit::Count, "Rows evicted by a size bound");
    describe_counter!(
        CLEANUP_REMOVED,
        Unit::Count,
        "Expired rows removed by cleanup"
    );
    describe_counter!(
        SINGLE_FLIGHT_WAITS,
        Unit::Count,
        "get_or_compute calls that waited for another caller's computation"
    );
    describe_histogram!(POOL_WAIT, Unit::Seconds, "Time to check a connection out");
    describe_gauge!(
        DATABASE_UP,
        Unit::Count,
        "1 while the database (shard) answers, 0 while it is known to be down"
    );
    describe_counter!(
        NEAR_CACHE_LOOKUPS,
        Unit::Count,
        "Near-cache reads by outcome: hit, miss or bypass"
    );
    describe_histogram!(
        NEAR_CACHE_POLL,
        Unit::Seconds,
        "Round trip of a poll of the near caches' change log"
    );
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "Time of a cache operation on the database path, pool wait included"
    );
}

macro_rules! ops {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)+) => {
        /// A cache operation, the `op` label of metrics and spans.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Op {
            $($(#[$doc])* $variant,)+
        }

        impl Op {
            const ALL: [Op; [$(Op::$variant),+].len()] = [$(Op::$variant),+];

            /// The `op` label.
            pub(crate) fn name(self) -> &'static str {
                match self {
                    $(Op::$variant => $name,)+
                }
            }
        }
    };
}

ops! {
    Get = "get",
    GetMany = "get_many",
    Set = "set",
    SetMany = "set_many",
    Delete = "delete",
    DeleteMany = "delete_many",
    /// A single-flight lease: poll, hand-over or release.
    Lease = "lease",
    Exists = "exists",
    Ttl = "ttl",
    Touch = "touch",
    GetTouch = "get_touch",
    Incr = "incr",
    Decr = "decr",
    SetNx = "set_nx",
    GetDel = "get_del",
    DeletePrefix = "delete_prefix",
    Clear = "clear",
    FindContaining = "find_containing",
    /// A key/value tag invalidation, of one tag or several.
    InvalidateTags = "invalidate_tags",
    /// A popularity report.
    Report = "report",
    /// Eviction to a budget asked for by the caller.
    Evict = "evict",
}

/// The keys of the hot path, built once: recording then allocates nothing.
struct Keys {
    hits: [Key; CacheKind::COUNT],
    misses: [Key; CacheKind::COUNT],
    sets: [Key; CacheKind::COUNT],
    deletes: [Key; CacheKind::COUNT],
    /// Per cache, by [`NearOutcome`].
    near: [[Key; 3]; CacheKind::COUNT],
    /// Indexed by `kind.index() * Op::ALL.len() + op`.
    duration: Vec<Key>,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let per_cache = |name: &'static str| {
        CacheKind::ALL.map(|kind| Key::from_parts(name, vec![Label::new(CACHE, kind.name())]))
    };
    Keys {
        hits: per_cache(HITS),
        misses: per_cache(MISSES),
        sets: per_cache(SETS),
        deletes: per_cache(DELETES),
        near: CacheKind::ALL.map(|kind| {
            NearOutcome::ALL.map(|outcome| {
                Key::from_parts(
                    NEAR_CACHE_LOOKUPS,
                    vec![
                        Label::new(CACHE, kind.name()),
                        Label::new("outcome", outcome.name()),
                    ],
                )
            })
        }),
        duration: CacheKind::ALL
            .into_iter()
            .flat_map(|kind| {
                Op::ALL.map(|op| {
                    Key::from_parts(
                        QUERY_DURATION,
                        vec![Label::new(CACHE, kind.name()), Label::new(OP, op.name())],
                    )
                })
            })
            .collect(),
    }
});

static POOL_WAIT_KEY: Key = Key::from_static_name(POOL_WAIT);

static METADATA: Metadata<'static> = Metadata::new(TARGET, Level::INFO, Some(module_path!()));

fn count(key: &Key, n: u64) {
    if n > 0 {
        ::metrics::with_recorder(|r| r.register_counter(key, &METADATA).increment(n));
    }
}

fn observe(key: &Key, elapsed: Duration) {
    ::metrics::with_recorder(|r| {
        r.register_histogram(key, &METADATA)
            .record(elapsed.as_secs_f64())
    });
}

pub(crate) fn lookups(kind: CacheKind, hits: u64, misses: u64) {
    let keys = &*KEYS;
    count(&keys.hits[kind.index()], hits);
    count(&keys.misses[kind.index()], misses);
}

pub(crate) fn sets(kind: CacheKind, entries: u64) {
    count(&KEYS.sets[kind.index()], entries);
}

pub(crate) fn deletes(kind: CacheKind, keys: u64) {
    count(&KEYS.deletes[kind.index()], keys);
}

pub(crate) fn duration(kind: CacheKind, op: Op, elapsed: Duration) {
    let index = kind.index() * Op::ALL.len() + op as usize;
    observe(&KEYS.duration[index], elapsed);
}

pub(crate) fn pool_wait(elapsed: Duration) {
    observe(&POOL_WAIT_KEY, elapsed);
}

// The rarer events build their key when they happen.

pub(crate) fn error(kind: CacheKind, op: Op, error: &Error) {
    ::metrics::counter!(ERRORS, CACHE => kind.name(), OP => op.name(), "error" => error.kind_name())
        .increment(1);
}

pub(crate) fn fail_open(kind: CacheKind, op: Op) {
    ::metrics::counter!(FAIL_OPEN, CACHE => kind.name(), OP => op.name()).increment(1);
}

pub(crate) fn database_up(shard: &str, up: bool) {
    ::metrics::gauge!(DATABASE_UP, "shard" => shard.to_owned()).set(if up { 1.0 } else { 0.0 });
}

pub(crate) fn single_flight_wait(kind: CacheKind) {
    ::metrics::counter!(SINGLE_FLIGHT_WAITS, CACHE => kind.name()).increment(1);
}

pub(crate) fn cleaned(kind: CacheKind, expired: u64, evicted: u64) {
    if expired > 0 {
        ::metrics::counter!(CLEANUP_REMOVED, CACHE => kind.name()).increment(expired);
    }
    evictions(kind, evicted);
}

/// How a near-cache read ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NearOutcome {
    /// Answered from memory.
    Hit,
    /// Not held: the database was asked.
    Miss,
    /// The poller was not current: the database was asked.
    Bypass,
}

impl NearOutcome {
    const ALL: [NearOutcome; 3] = [NearOutcome::Hit, NearOutcome::Miss, NearOutcome::Bypass];

    fn name(self) -> &'static str {
        match self {
            NearOutcome::Hit => "hit",
            NearOutcome::Miss => "miss",
            NearOutcome::Bypass => "bypass",
        }
    }
}

/// A near-cache read (the near cache's hot path: its keys are built once).
pub(crate) fn near_cache_lookup(kind: CacheKind, outcome: NearOutcome) {
    count(&KEYS.near[kind.index()][outcome as usize], 1);
}

pub(crate) fn near_cache_poll(elapsed: Duration) {
    ::metrics::histogram!(NEAR_CACHE_POLL).record(elapsed.as_secs_f64());
}

pub(crate) fn evictions(kind: CacheKind, rows: u64) {
    if rows > 0 {
        ::metrics::counter!(EVICTIONS, CACHE => kind.name()).increment(rows);
    }
}

/// The span of one cache operation: TRACE, so it is silent unless asked for (one
/// per cache operation is too many for a service's usual DEBUG output). Fields:
/// `cache`, `op`, and once known `hit` (a single-key lookup) and `rows` (keys looked
/// up, entries written or keys deleted). Disabled, it costs a level check.
pub(crate) fn operation_span(kind: CacheKind, op: Op) -> tracing::Span {
    tracing::trace_span!(
        target: TARGET,
        "pgcache",
        cache = kind.name(),
        op = op.name(),
        hit = tracing::field::Empty,
        rows = tracing::field::Empty,
    )
}

/// For the overhead benchmark only: exactly the recordings (and the disabled span) a
/// `get` hit on the database path makes, so their cost can be measured apart from
/// the query. Not part of the API.
#[doc(hidden)]
pub fn recordings_of_one_get() {
    let kind = CacheKind::Kv;
    let span = operation_span(kind, Op::Get);
    let _entered = span.enter();
    // The clock read that ends the pool wait is part of the cost; the one that
    // starts it also starts the operation's duration, as it did before metrics.
    static STARTED: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    pool_wait(STARTED.elapsed());
    duration(kind, Op::Get, Duration::from_micros(80));
    lookups(kind, 1, 0);
    span.record("hit", true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_its_duration_key() {
        for kind in CacheKind::ALL {
            for op in Op::ALL {
                let key = &KEYS.duration[kind.index() * Op::ALL.len() + op as usize];
                let labels: Vec<_> = key.labels().map(|l| l.value()).collect();
                assert_eq!(labels, [kind.name(), op.name()]);
            }
        }
    }
}
