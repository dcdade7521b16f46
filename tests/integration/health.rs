//! Health checks: each alert fires when provoked, and a healthy cache fires none.

use crate::common;
use crate::ops_support;

use std::time::Duration;

use common::TestDb;
use diesel::connection::SimpleConnection;
use ops_support::fill;
use pgcache::{Alert, Cache, HealthReport, HealthThresholds};
use serde_json::json;

/// The names of the firing alerts, as they appear in JSON.
fn fired(report: &HealthReport) -> Vec<String> {
    report
        .alerts
        .iter()
        .map(|a| {
            serde_json::to_value(a).unwrap()["alert"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// `n` lookups of the key/value cache, `hits` of them hits, in one round trip.
fn lookups(db: &TestDb, n: usize, hits: usize) {
    let kv = db.cache.kv();
    let value = json!(1);
    let present: Vec<String> = (0..hits).map(|i| format!("present:{i}")).collect();
    let rows: Vec<(&str, &serde_json::Value)> =
        present.iter().map(|k| (k.as_str(), &value)).collect();
    kv.set_many(&rows, Duration::from_secs(3600)).unwrap();
    let keys: Vec<String> = (0..n)
        .map(|i| {
            if i < hits {
                format!("present:{i}")
            } else {
                format!("absent:{i}")
            }
        })
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    kv.get_many(&keys).unwrap();
}

#[test]
fn healthy_cache_fires_no_alert() {
    let db = TestDb::new();
    lookups(&db, 100, 90);
    db.cache.cleanup().unwrap();
    let report = db
        .cache
        .health(&HealthThresholds::new().size_budget_bytes(1 << 30))
        .unwrap();
    assert!(report.is_healthy(), "{report}");
    assert_eq!(report.lookups.hit_rate(), Some(0.9));
    assert!(report.size_bytes > 0);
    assert!(report.last_cleanup.as_ref().unwrap().succeeded);
    assert!(report.to_string().starts_with("healthy"), "{report}");
}

#[test]
fn low_hit_rate_fires_after_enough_lookups() {
    let db = TestDb::new();
    db.cache.cleanup().unwrap();
    lookups(&db, 60, 10);
    // 60 lookups: below the default minimum of 100, not judged yet.
    assert!(db
        .cache
        .health(&HealthThresholds::new())
        .unwrap()
        .is_healthy());

    lookups(&db, 60, 10);
    let report = db.cache.health(&HealthThresholds::new()).unwrap();
    assert_eq!(fired(&report), ["low_hit_rate"]);
    match &report.alerts[0] {
        Alert::LowHitRate {
            hit_rate,
            min_hit_rate,
            lookups,
        } => {
            assert!((hit_rate - 20.0 / 120.0).abs() < 1e-9);
            assert_eq!((*min_hit_rate, *lookups), (0.7, 120));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        report.to_string().contains("hit rate 16.7% is below 70.0%"),
        "{report}"
    );
}

#[test]
fn size_over_budget_fires() {
    let db = TestDb::new();
    db.cache.cleanup().unwrap();
    fill(&db, "cache_entries", "bulk", 20_000, "1 hour");
    let budget = 1 << 20;
    let report = db
        .cache
        .health(&HealthThresholds::new().size_budget_bytes(budget))
        .unwrap();
    assert_eq!(fired(&report), ["size_over_budget"]);
    assert!(report.size_bytes as f64 > budget as f64 * 0.8);
    // The same size within a larger budget is fine.
    let roomy = HealthThresholds::new().size_budget_bytes(report.size_bytes * 2);
    assert!(db.cache.health(&roomy).unwrap().is_healthy());
}

#[test]
fn slow_queries_fire_when_p95_is_above_threshold() {
    let db = TestDb::new();
    db.cache.cleanup().unwrap();
    // Hold a lock that every read of the key/value table waits for.
    let mut locker = db.raw_connection();
    locker
        .batch_execute("BEGIN; LOCK TABLE cache_entries IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let cache = db.cache.clone();
            std::thread::spawn(move || cache.kv().get("k").map(|_| ()))
        })
        .collect();
    let waiting = format!(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE application_name = 'pgcache-test-{}' AND wait_event_type = 'Lock'",
        db.schema
    );
    assert!(
        (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            db.count(&waiting) == 4
        }),
        "readers never blocked"
    );
    // Every reader is now blocked; each waits at least this long.
    std::thread::sleep(Duration::from_millis(30));
    locker.batch_execute("COMMIT").unwrap();
    for reader in readers {
        reader.join().unwrap().unwrap();
    }

    // Too few samples for the default minimum: not judged.
    assert!(db
        .cache
        .health(&HealthThresholds::new())
        .unwrap()
        .is_healthy());

    let report = db
        .cache
        .health(&HealthThresholds::new().min_latency_samples(4))
        .unwrap();
    assert_eq!(fired(&report), ["slow_queries"]);
    match &report.alerts[0] {
        Alert::SlowQueries {
            p95_ms,
            max_p95_ms,
            samples,
        } => {
            assert!(*p95_ms >= 30.0, "{p95_ms}");
            assert_eq!((*max_p95_ms, *samples), (10.0, 4));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn failed_cleanup_fires_until_a_cleanup_succeeds() {
    let db = TestDb::new();
    db.exec("ALTER TABLE audio_chunk_cache RENAME TO audio_chunk_cache_away");
    assert!(db.cache.cleanup().is_err());
    db.exec("ALTER TABLE audio_chunk_cache_away RENAME TO audio_chunk_cache");

    let thresholds = HealthThresholds::new().no_cleanup_age_check();
    let report = db.cache.health(&thresholds).unwrap();
    assert_eq!(fired(&report), ["cleanup_failed"]);
    match &report.alerts[0] {
        Alert::CleanupFailed { error, .. } => {
            assert!(error.contains("audio_chunk_cache"), "{error}")
        }
        other => panic!("{other:?}"),
    }

    db.cache.cleanup().unwrap();
    assert!(db.cache.health(&thresholds).unwrap().is_healthy());
}

/// Makes the cache tables look migrated `hours` ago.
fn migrated_hours_ago(db: &TestDb, hours: u32) {
    db.exec(&format!(
        "UPDATE __diesel_schema_migrations SET run_on = run_on - interval '{hours} hours'"
    ));
}

#[test]
fn a_fresh_schema_is_healthy_until_it_outlives_the_cleanup_age_without_a_cleanup() {
    let db = TestDb::new();
    let report = db.cache.health(&HealthThresholds::new()).unwrap();
    assert!(report.is_healthy(), "{report}");

    migrated_hours_ago(&db, 1);
    assert!(db
        .cache
        .health(&HealthThresholds::new())
        .unwrap()
        .is_healthy());
    migrated_hours_ago(&db, 2);
    let report = db.cache.health(&HealthThresholds::new()).unwrap();
    assert_eq!(fired(&report), ["cleanup_overdue"]);
    assert!(
        report.to_string().contains("cleanup has never run"),
        "{report}"
    );
}

#[test]
fn cleanup_never_run_or_too_long_ago_fires_overdue() {
    let db = TestDb::new();
    migrated_hours_ago(&db, 3);
    let report = db.cache.health(&HealthThresholds::new()).unwrap();
    assert_eq!(fired(&report), ["cleanup_overdue"]);
    assert!(
        report.to_string().contains("cleanup has never run"),
        "{report}"
    );

    db.exec(
        "INSERT INTO cache_cleanup_runs (started_at, finished_at, succeeded) \
         VALUES (now() - interval '3 hours', now() - interval '3 hours', true)",
    );
    let hour = HealthThresholds::new().max_cleanup_age(Duration::from_secs(3600));
    let report = db.cache.health(&hour).unwrap();
    assert_eq!(fired(&report), ["cleanup_overdue"]);
    assert!(matches!(
        report.alerts[0],
        Alert::CleanupOverdue {
            last_success: Some(_),
            max_age_secs: 3600
        }
    ));
    let day = HealthThresholds::new().max_cleanup_age(Duration::from_secs(86_400));
    assert!(db.cache.health(&day).unwrap().is_healthy());
    let unchecked = HealthThresholds::new().no_cleanup_age_check();
    assert!(db.cache.health(&unchecked).unwrap().is_healthy());
}

#[test]
fn health_report_serializes_alerts_with_their_values() {
    let db = TestDb::new();
    migrated_hours_ago(&db, 3);
    let value = serde_json::to_value(db.cache.health(&HealthThresholds::new()).unwrap()).unwrap();
    assert_eq!(value["alerts"][0]["alert"], "cleanup_overdue");
    assert_eq!(value["alerts"][0]["max_age_secs"], 7200);
    assert!(value["alerts"][0]["last_success"].is_null());
    assert!(value["size_bytes"].as_u64().unwrap() > 0);
}
