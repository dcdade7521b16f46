//! Metrics through the `metrics` facade and the in-process counter snapshot, for
//! real operations against the database. Each test installs its own recorder for
//! its own thread (`with_local_recorder`), so tests running in parallel do not see
//! each other's metrics.

mod common;
mod scratch;

use std::time::Duration;

use common::TestDb;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use pgcache::metrics::{
    CLEANUP_REMOVED, DATABASE_UP, DELETES, ERRORS, FAIL_OPEN, HITS, MISSES, NEAR_CACHE_LOOKUPS,
    NEAR_CACHE_POLL, POOL_WAIT, QUERY_DURATION, SETS,
};
use pgcache::{Cache, CacheConfig, CacheKind, CacheManager};
use serde_json::json;

/// One metric a recorder saw: kind, name, labels, value.
type Metric = (MetricKind, String, Vec<(String, String)>, DebugValue);

/// What a recorder saw.
struct Seen(Vec<Metric>);

impl Seen {
    fn of(recorder: &DebuggingRecorder) -> Self {
        Self::from(&recorder.snapshotter())
    }

    fn from(snapshotter: &Snapshotter) -> Self {
        Seen(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| {
                    let labels = key
                        .key()
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    (key.kind(), key.key().name().to_owned(), labels, value)
                })
                .collect(),
        )
    }

    fn value(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        self.0
            .iter()
            .find(|(k, n, l, _)| {
                *k == kind
                    && n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(lk, lv)| l.iter().any(|(k, v)| k == lk && v == lv))
            })
            .map(|(_, _, _, v)| v)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.value(MetricKind::Counter, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            _ => 0,
        }
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.value(MetricKind::Gauge, name, labels) {
            Some(DebugValue::Gauge(value)) => Some(value.into_inner()),
            _ => None,
        }
    }

    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        match self.value(MetricKind::Histogram, name, labels) {
            Some(DebugValue::Histogram(samples)) => samples.len(),
            _ => 0,
        }
    }
}

#[test]
fn kv_operations_move_counters_and_histograms() {
    let db = TestDb::new();
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let kv = db.cache.kv();
        kv.set("a", &json!(1)).unwrap();
        kv.set_many(
            &[("b", &json!(2)), ("c", &json!(3))],
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(kv.get("a").unwrap(), Some(json!(1)));
        assert_eq!(kv.get("nope").unwrap(), None);
        assert_eq!(
            kv.get_many(&["b", "gone"]).unwrap(),
            vec![Some(json!(2)), None]
        );
        assert!(kv.delete("a").unwrap());
        assert!(kv.get("").is_err(), "an empty key is rejected");
    });
    let seen = Seen::of(&recorder);
    let kv = [("cache", "kv")];
    assert_eq!(seen.counter(HITS, &kv), 2);
    assert_eq!(seen.counter(MISSES, &kv), 2);
    assert_eq!(seen.counter(SETS, &kv), 3);
    assert_eq!(seen.counter(DELETES, &kv), 1);
    let invalid = [("cache", "kv"), ("op", "get"), ("error", "invalid_input")];
    assert_eq!(seen.counter(ERRORS, &invalid), 1);
    assert_eq!(
        seen.samples(QUERY_DURATION, &[("cache", "kv"), ("op", "get")]),
        2
    );
    assert_eq!(
        seen.samples(QUERY_DURATION, &[("cache", "kv"), ("op", "set")]),
        1
    );
    assert_eq!(
        seen.samples(QUERY_DURATION, &[("cache", "kv"), ("op", "set_many")]),
        1
    );
    assert_eq!(
        seen.samples(QUERY_DURATION, &[("cache", "kv"), ("op", "get_many")]),
        1
    );
    assert_eq!(
        seen.samples(QUERY_DURATION, &[("cache", "kv"), ("op", "delete")]),
        1
    );
    assert!(seen.samples(POOL_WAIT, &[]) >= 5);

    let counters = *db.cache.counters().cache(CacheKind::Kv);
    assert_eq!(
        (
            counters.hits,
            counters.misses,
            counters.sets,
            counters.deletes
        ),
        (2, 2, 3, 1)
    );
    assert_eq!((counters.errors, counters.fail_open_skips), (1, 0));
    assert_eq!(db.cache.counters().cache(CacheKind::Embedding).hits, 0);
}

#[test]
fn a_database_error_is_counted_by_its_kind() {
    let db = TestDb::new();
    db.exec("DROP TABLE cache_entries CASCADE");
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        assert!(matches!(
            db.cache.kv().get("k"),
            Err(pgcache::Error::MissingTable { .. })
        ));
    });
    let labels = [("cache", "kv"), ("op", "get"), ("error", "missing_table")];
    assert_eq!(Seen::of(&recorder).counter(ERRORS, &labels), 1);
    assert_eq!(db.cache.counters().cache(CacheKind::Kv).errors, 1);
}

#[test]
fn counts_survive_a_flush_to_the_database() {
    let db = TestDb::new();
    db.cache.kv().get("k").unwrap();
    db.cache.flush_stats().unwrap();
    db.cache.kv().get("k").unwrap();
    // The snapshot counts since start; the database got the first miss only.
    assert_eq!(db.cache.counters().cache(CacheKind::Kv).misses, 2);
    let flushed = db.count("SELECT misses AS n FROM cache_counters WHERE cache_name = 'kv'");
    assert_eq!(flushed, 1);
    db.cache.flush_stats().unwrap();
    let flushed = db.count("SELECT misses AS n FROM cache_counters WHERE cache_name = 'kv'");
    assert_eq!(flushed, 2);
}

#[test]
fn fail_open_skips_are_counted() {
    let config = CacheConfig::builder()
        .database_url("postgres://postgres@127.0.0.1:1/postgres")
        .pool_min_idle(0)
        .pool_connection_timeout(Duration::from_millis(200))
        .run_migrations(false)
        .fail_open(true)
        .build()
        .unwrap();
    let cache = CacheManager::new(config).unwrap();
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        assert_eq!(cache.kv().get("k").unwrap(), None);
        cache.kv().set("k", &json!(1)).unwrap();
    });
    let seen = Seen::of(&recorder);
    assert_eq!(
        seen.counter(FAIL_OPEN, &[("cache", "kv"), ("op", "get")]),
        1
    );
    assert_eq!(
        seen.counter(FAIL_OPEN, &[("cache", "kv"), ("op", "set")]),
        1
    );
    assert_eq!(seen.counter(MISSES, &[("cache", "kv")]), 1);
    assert_eq!(seen.counter(SETS, &[("cache", "kv")]), 0, "a skipped write");
    let counters = *cache.counters().cache(CacheKind::Kv);
    assert_eq!((counters.fail_open_skips, counters.sets), (2, 0));
    assert_eq!(cache.failed_open_count(), 2);
}

#[test]
fn cleanup_counts_the_expired_rows_it_removes() {
    let db = TestDb::new();
    db.cache.kv().set("old", &json!(1)).unwrap();
    db.cache
        .embedding()
        .set(&pgcache::EmbeddingKey::new("m", "t"), &vec![0.5])
        .unwrap();
    db.expire_all("cache_entries");
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || db.cache.cleanup().unwrap());
    let seen = Seen::of(&recorder);
    assert_eq!(seen.counter(CLEANUP_REMOVED, &[("cache", "kv")]), 1);
    assert_eq!(seen.counter(CLEANUP_REMOVED, &[("cache", "embedding")]), 0);
}

#[test]
fn redis_style_operations_are_counted_under_their_own_op_never_as_sets() {
    let db = TestDb::new();
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let kv = db.cache.kv();
        kv.incr("n", 1, Duration::from_secs(60)).unwrap();
        kv.decr("n", 3, Duration::from_secs(60)).unwrap();
        assert!(kv
            .set_nx("lock", &json!(1), Duration::from_secs(60))
            .unwrap());
        assert!(!kv
            .set_nx("lock", &json!(2), Duration::from_secs(60))
            .unwrap());
        assert_eq!(
            kv.get_touch("lock", Duration::from_secs(60)).unwrap(),
            Some(json!(1))
        );
        assert_eq!(kv.get_del("lock").unwrap(), Some(json!(1)));
        kv.set_bytes("raw", b"x", Duration::from_secs(60)).unwrap();
        assert!(kv.incr("raw", 1, Duration::from_secs(60)).is_err());
    });
    let seen = Seen::of(&recorder);
    let kv = [("cache", "kv")];
    for (op, calls) in [
        ("incr", 2),
        ("decr", 1),
        ("set_nx", 2),
        ("get_touch", 1),
        ("get_del", 1),
    ] {
        assert_eq!(
            seen.samples(QUERY_DURATION, &[("cache", "kv"), ("op", op)]),
            calls,
            "{op} timed under its own label"
        );
    }
    for op in ["set", "get", "delete"] {
        assert_eq!(
            seen.samples(QUERY_DURATION, &[("cache", "kv"), ("op", op)]),
            0,
            "nothing timed as {op}"
        );
    }
    assert_eq!(seen.counter(SETS, &kv), 1, "set_bytes alone is a set");
    assert_eq!(seen.counter(DELETES, &kv), 0, "get_del is not a delete");
    assert_eq!(
        (seen.counter(HITS, &kv), seen.counter(MISSES, &kv)),
        (0, 0),
        "get_touch and get_del are not lookups"
    );
    assert_eq!(db.cache.counters().cache(CacheKind::Kv).sets, 1);
    assert_eq!(
        seen.counter(
            ERRORS,
            &[("cache", "kv"), ("op", "incr"), ("error", "wrong_type")]
        ),
        1
    );
}

#[test]
fn a_database_known_down_sets_its_gauge_to_zero() {
    let cluster = scratch::ScratchCluster::start();
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let cache = CacheManager::new(
            CacheConfig::builder()
                .database_url(cluster.url())
                .pool_connection_timeout(Duration::from_millis(300))
                .build()
                .unwrap(),
        )
        .unwrap();
        let up = |recorder: &DebuggingRecorder| {
            Seen::of(recorder).gauge(DATABASE_UP, &[("shard", pgcache::DEFAULT_SHARD)])
        };
        assert_eq!(up(&recorder), Some(1.0));
        cluster.stop();
        assert!(cache.kv().get("k").is_err());
        assert_eq!(up(&recorder), Some(0.0), "known down after one failure");
    });
}

/// What the process-wide recorder saw: for metrics recorded by the cache's own
/// threads, which a test's local recorder does not see. Installed once; other
/// tests' background threads record there too, so a test reads only series
/// labelled with names of its own.
fn global() -> &'static Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<Snapshotter> = std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::set_global_recorder(recorder).expect("no other global recorder");
        snapshotter
    })
}

#[test]
fn the_database_up_gauge_reads_one_once_the_database_is_back_without_any_call() {
    let cluster = scratch::ScratchCluster::start();
    let snapshotter = global();
    // One shard of a name of this test's own, for a gauge series no other test
    // touches.
    let shard = format!("recovering{}", cluster.port);
    let cache = CacheManager::new(
        CacheConfig::builder()
            .shard(shard.clone(), cluster.url())
            .pool_connection_timeout(Duration::from_millis(300))
            .build()
            .unwrap(),
    )
    .unwrap();
    let up = || Seen::from(snapshotter).gauge(DATABASE_UP, &[("shard", shard.as_str())]);
    cache.kv().set("k", &json!(1)).unwrap();
    assert_eq!(up(), Some(1.0));
    cluster.stop();
    assert!(cache.kv().get("k").is_err());
    assert_eq!(up(), Some(0.0), "known down after one failure");

    cluster.start_again();
    // No call: the cache learns it on its own (it retries every 500 ms).
    let started = std::time::Instant::now();
    while up() != Some(1.0) {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the gauge still reads {:?} after {:?}",
            up(),
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("up again {:?} after the server was back", started.elapsed());
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)));
}

#[test]
fn near_cache_reads_are_counted_by_outcome_and_polls_timed() {
    let snapshotter = global();
    let db = TestDb::with(|b| b.near_cache(CacheKind::Kv, Some(pgcache::NearCache::new())));
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let kv = db.cache.kv();
        kv.set("hot", &json!(1)).unwrap();
        // The first read fills the near cache, the second is answered by it.
        assert_eq!(kv.get("hot").unwrap(), Some(json!(1)));
        assert_eq!(kv.get("hot").unwrap(), Some(json!(1)));
    });
    let seen = Seen::of(&recorder);
    let outcome = |o| seen.counter(NEAR_CACHE_LOOKUPS, &[("cache", "kv"), ("outcome", o)]);
    assert_eq!(outcome("hit") + outcome("miss") + outcome("bypass"), 2);
    assert!(outcome("hit") >= 1, "the second read is a near-cache hit");
    // The poller runs on a thread of its own: the process-wide recorder sees it.
    let started = std::time::Instant::now();
    while Seen::from(snapshotter).samples(NEAR_CACHE_POLL, &[]) == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no poll timed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every span a subscriber was asked to open: target, name and the `op` field.
#[derive(Default)]
struct Spans(std::sync::Mutex<Vec<(String, String, String)>>);

impl tracing::Subscriber for Spans {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        struct Op(String);
        impl tracing::field::Visit for Op {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "op" {
                    self.0 = format!("{value:?}").trim_matches('"').to_owned();
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "op" {
                    self.0 = value.to_owned();
                }
            }
        }
        let mut op = Op(String::new());
        span.record(&mut op);
        let mut spans = self.0.lock().unwrap();
        let meta = span.metadata();
        spans.push((meta.target().to_owned(), meta.name().to_owned(), op.0));
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn operation_spans_have_the_target_pgcache_and_their_own_op() {
    let db = TestDb::new();
    let spans = std::sync::Arc::new(Spans::default());
    tracing::subscriber::with_default(spans.clone(), || {
        let kv = db.cache.kv();
        kv.set("k", &json!(1)).unwrap();
        kv.get("k").unwrap();
        kv.incr("n", 1, Duration::from_secs(60)).unwrap();
        kv.decr("n", 1, Duration::from_secs(60)).unwrap();
    });
    let spans = spans.0.lock().unwrap();
    let ops: Vec<&str> = spans
        .iter()
        .filter(|(_, name, _)| name == "pgcache")
        .map(|(target, _, op)| {
            assert_eq!(target, pgcache::metrics::TARGET, "span of {op}");
            op.as_str()
        })
        .collect();
    assert_eq!(ops, ["set", "get", "incr", "decr"]);
    assert_eq!(pgcache::metrics::TARGET, "pgcache");
}

/// The metric names a Prometheus query uses: `pgcache_...`, without the suffixes
/// the exporter adds to a histogram's series.
fn queried_metrics(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pgcache_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.push(name.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_one_pgcache_records() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/pgcache.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk<'a>(value: &'a serde_json::Value, exprs: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => exprs.push(e),
                        _ => walk(v, exprs),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, exprs)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard's panels query metrics");
    let mut queried: Vec<String> = exprs.iter().flat_map(|e| queried_metrics(e)).collect();
    queried.sort();
    queried.dedup();
    for name in &queried {
        assert!(
            pgcache::metrics::ALL.contains(&name.as_str()),
            "the dashboard queries `{name}`, which pgcache does not record"
        );
    }
    for wanted in [
        HITS,
        QUERY_DURATION,
        NEAR_CACHE_LOOKUPS,
        NEAR_CACHE_POLL,
        POOL_WAIT,
        DATABASE_UP,
        CLEANUP_REMOVED,
    ] {
        assert!(
            queried.iter().any(|q| q == wanted),
            "no panel shows {wanted}"
        );
    }
}
