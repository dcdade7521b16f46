//! Cleanup of expired rows, the background janitor and clearing caches.

use crate::common;
use crate::ops_support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::TestDb;
use ops_support::{expired, fill, live, TABLES};
use pgcache::{CacheConfig, CacheKind, CacheManager, Error, CLEANUP_BATCH_SIZE};

/// Fills every table with `expired_rows` expired and `live_rows` live rows.
fn fill_all(db: &TestDb, expired_rows: u32, live_rows: u32) {
    for table in TABLES {
        fill(db, table, "old", expired_rows, "-1 minute");
        fill(db, table, "new", live_rows, "1 hour");
    }
}

#[test]
fn cleanup_removes_exactly_the_expired_rows_of_every_table() {
    let db = TestDb::new();
    fill_all(&db, 30, 20);
    // More than one batch in one table.
    let many = CLEANUP_BATCH_SIZE as u32 * 2 + 7;
    fill(&db, "cache_entries", "many", many, "-1 second");

    let report = db.cache.cleanup().unwrap();

    for table in TABLES {
        assert_eq!(expired(&db, table), 0, "{table} still has expired rows");
        assert_eq!(live(&db, table), 20, "{table} lost live rows");
    }
    let removed: Vec<(CacheKind, u64)> = report
        .tables
        .iter()
        .map(|t| (t.cache, t.rows_removed))
        .collect();
    assert_eq!(
        removed,
        vec![
            (CacheKind::Kv, 30 + u64::from(many)),
            (CacheKind::Embedding, 30),
            (CacheKind::VectorSearch, 30),
            (CacheKind::LlmResponse, 30),
            (CacheKind::AudioChunk, 30),
        ]
    );
    assert_eq!(report.leases_removed, 30);
    assert_eq!(report.rows_removed(), 4 * 30 + 30 + u64::from(many));
}

#[test]
fn cleanup_with_nothing_expired_removes_nothing() {
    let db = TestDb::new();
    fill_all(&db, 0, 5);
    let report = db.cache.cleanup().unwrap();
    assert_eq!(report.rows_removed(), 0);
    assert_eq!(report.leases_removed, 0);
    for table in TABLES {
        assert_eq!(live(&db, table), 5, "{table}");
    }
}

#[test]
fn two_concurrent_cleanups_share_the_work_without_error() {
    let db = TestDb::new();
    let expired_kv = CLEANUP_BATCH_SIZE as u32 * 6;
    fill(&db, "cache_entries", "bulk", expired_kv, "-1 minute");
    fill_all(&db, 500, 10);
    let start = Arc::new(Barrier::new(2));
    let cleaners: Vec<_> = [db.cache.clone(), db.another_manager()]
        .into_iter()
        .map(|cache| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                cache.cleanup()
            })
        })
        .collect();
    let reports: Vec<_> = cleaners
        .into_iter()
        .map(|c| c.join().unwrap().expect("a cleanup failed"))
        .collect();

    let total: u64 = reports.iter().map(|r| r.rows_removed()).sum();
    assert_eq!(
        total,
        u64::from(expired_kv) + 5 * 500,
        "rows removed twice or missed"
    );
    for table in TABLES {
        assert_eq!(expired(&db, table), 0, "{table}");
        assert_eq!(live(&db, table), 10, "{table}");
    }
    assert_eq!(
        db.count("SELECT count(*) AS n FROM cache_cleanup_runs WHERE succeeded"),
        2
    );
}

#[test]
fn cleanup_run_is_recorded() {
    let db = TestDb::new();
    fill(&db, "llm_response_cache", "old", 12, "-1 minute");
    db.cache.cleanup().unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM cache_cleanup_runs \
             WHERE succeeded AND rows_removed = 12 AND error_message IS NULL \
             AND started_at <= finished_at"
        ),
        1
    );
}

#[test]
fn failed_cleanup_is_returned_and_recorded() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "old", 3, "-1 minute");
    db.exec("DROP TABLE vector_search_cache");
    let err = db.cache.cleanup().unwrap_err();
    assert!(
        matches!(&err, Error::MissingTable { table } if table.ends_with(".vector_search_cache")),
        "{err}"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM cache_cleanup_runs WHERE NOT succeeded \
             AND rows_removed = 3 AND error_message LIKE '%vector_search_cache%'"
        ),
        1
    );
}

#[test]
fn progress_reports_every_table_and_the_running_total() {
    let db = TestDb::new();
    fill_all(&db, 4, 0);
    let mut seen = Vec::new();
    let report = db
        .cache
        .cleanup_with_progress(|p| seen.push((p.table, p.table_rows_removed, p.rows_removed)))
        .unwrap();
    for table in TABLES {
        assert!(
            seen.contains(&(table, 0, seen_total_before(&seen, table))),
            "{table} not started"
        );
        assert!(
            seen.iter().any(|(t, n, _)| *t == table && *n == 4),
            "{table} not reported"
        );
    }
    assert_eq!(
        seen.last().unwrap().2,
        report.rows_removed() + report.leases_removed
    );
}

/// The running total when `table` was started.
fn seen_total_before(seen: &[(&str, u64, u64)], table: &str) -> u64 {
    seen.iter().find(|(t, ..)| *t == table).unwrap().2
}

/// Waits (up to a generous limit) until `table` has no expired rows.
fn wait_until_clean(db: &TestDb, table: &str) -> bool {
    (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        expired(db, table) == 0
    })
}

#[test]
fn janitor_cleans_in_background_until_the_last_clone_drops() {
    let db = TestDb::new();
    let janitor = CacheManager::new(
        db.config()
            .janitor_interval(Duration::from_millis(50))
            .build()
            .unwrap(),
    )
    .unwrap();
    let clone = janitor.clone();

    fill(&db, "cache_entries", "a", 10, "-1 minute");
    assert!(
        wait_until_clean(&db, "cache_entries"),
        "janitor never cleaned"
    );

    drop(janitor);
    fill(&db, "cache_entries", "b", 10, "-1 minute");
    assert!(
        wait_until_clean(&db, "cache_entries"),
        "janitor stopped while a clone was alive"
    );

    drop(clone);
    // A run already under way when the last clone went may still finish.
    std::thread::sleep(Duration::from_millis(200));
    let runs = db.count("SELECT count(*) AS n FROM cache_cleanup_runs");
    fill(&db, "cache_entries", "c", 10, "-1 minute");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        expired(&db, "cache_entries"),
        10,
        "janitor outlived the manager"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM cache_cleanup_runs"),
        runs
    );
}

#[test]
fn clear_one_cache_leaves_the_others() {
    let db = TestDb::new();
    fill_all(&db, 2, 3);
    let removed = db.cache.clear(Some(CacheKind::LlmResponse)).unwrap();
    assert_eq!(removed, vec![(CacheKind::LlmResponse, 5)]);
    assert_eq!(db.count("SELECT count(*) AS n FROM llm_response_cache"), 0);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 5);
    assert_eq!(db.count("SELECT count(*) AS n FROM audio_chunk_cache"), 5);
}

#[test]
fn clear_all_empties_every_cache() {
    let db = TestDb::new();
    fill_all(&db, 2, 3);
    let removed = db.cache.clear(None).unwrap();
    assert_eq!(removed.len(), CacheKind::ALL.len());
    assert!(removed.iter().all(|(_, n)| *n == 5), "{removed:?}");
    for kind in CacheKind::ALL {
        assert_eq!(
            db.count(&format!("SELECT count(*) AS n FROM {}", kind.table())),
            0
        );
    }
}

#[test]
fn janitor_interval_is_read_from_the_environment_and_off_by_default() {
    let from = |value: &str| CacheConfig::from_vars([("PGCACHE_JANITOR_INTERVAL_SECS", value)]);
    assert_eq!(
        from("60").unwrap().janitor_interval(),
        Some(Duration::from_secs(60))
    );
    assert_eq!(from("0").unwrap().janitor_interval(), None);
    assert_eq!(
        CacheConfig::builder().build().unwrap().janitor_interval(),
        None
    );
    let err = from("hourly").unwrap_err();
    assert!(
        err.to_string().contains("PGCACHE_JANITOR_INTERVAL_SECS"),
        "{err}"
    );
}
