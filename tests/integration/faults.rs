//! Faults under the cache: stuck statements, an exhausted pool, killed connections,
//! an unreachable database, and fail-open mode.
//!
//! Connections are only ever killed by this test's own `application_name`, so tests
//! running in parallel are not disturbed.

use crate::common;

use std::time::{Duration, Instant};

use common::TestDb;
use diesel::connection::SimpleConnection;
use pgcache::{Cache, CacheConfig, CacheManager, Error};
use serde_json::json;

/// Terminates every backend of this test's cache; returns how many.
fn kill_cache_backends(db: &TestDb) -> i64 {
    db.count(&format!(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n \
         FROM pg_stat_activity WHERE application_name = 'pgcache-test-{}'",
        db.schema
    ))
}

/// Checks out `n` connections at once so the pool holds `n` open connections.
fn fill_pool(cache: &CacheManager, n: usize) {
    let held: Vec<_> = (0..n).map(|_| cache.connection().unwrap()).collect();
    drop(held);
}

#[test]
fn statement_timeout_cuts_a_stuck_statement_with_a_clear_error() {
    let db = TestDb::with(|b| b.statement_timeout(Duration::from_millis(300)));
    db.cache.kv().set("k", &json!("old")).unwrap();
    let mut locker = db.raw_connection();
    locker
        .batch_execute("BEGIN; SELECT * FROM cache_entries WHERE key = 'k' FOR UPDATE")
        .unwrap();
    let started = Instant::now();
    let err = db.cache.kv().set("k", &json!("new")).unwrap_err();
    assert!(err.to_string().contains("statement timeout"), "{err}");
    assert!(err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    locker.batch_execute("ROLLBACK").unwrap();
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("old")));
}

#[test]
fn exhausted_pool_is_an_error_after_the_connection_timeout_not_a_hang() {
    let db = TestDb::with(|b| {
        b.pool_max_size(2)
            .pool_connection_timeout(Duration::from_millis(300))
    });
    let held: Vec<_> = (0..2).map(|_| db.cache.connection().unwrap()).collect();
    let started = Instant::now();
    let err = db.cache.kv().get("k").unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(held);
    assert_eq!(db.cache.kv().get("k").unwrap(), None);
}

#[test]
fn after_killing_every_cache_connection_the_next_operations_succeed() {
    let db = TestDb::with(|b| b.pool_max_size(4));
    let kv = db.cache.kv();
    kv.set("k", &json!(1)).unwrap();
    fill_pool(&db.cache, 4);
    assert_eq!(kill_cache_backends(&db), 4);
    // Every pooled connection is dead; none of these may fail.
    for i in 0..20 {
        assert_eq!(kv.get("k").unwrap(), Some(json!(1)), "operation {i}");
        kv.set(&format!("k{i}"), &json!(i)).unwrap();
    }
    assert_eq!(
        kv.get_many(&["k", "k19"]).unwrap(),
        vec![Some(json!(1)), Some(json!(19))]
    );
    // The dead connections were discarded, not kept in the pool: every connection
    // it holds answers. (How many it holds depends on how fast connections open
    // while the operations wait: more on a busy machine.)
    let mut held: Vec<_> = (0..4).map(|_| db.cache.connection().unwrap()).collect();
    for (i, conn) in held.iter_mut().enumerate() {
        conn.batch_execute("SELECT 1")
            .unwrap_or_else(|e| panic!("pooled connection {i} is dead: {e}"));
    }
}

#[test]
fn work_in_flight_on_a_killed_connection_fails_clearly_and_the_next_succeeds() {
    let db = TestDb::new();
    let mut conn = db.cache.connection().unwrap();
    let in_flight = std::thread::spawn(move || {
        let result = conn.batch_execute("SELECT pg_sleep(30)");
        (result, conn)
    });
    // Wait for the sleep to start, then kill it.
    while db.count(&format!(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE application_name = 'pgcache-test-{}' AND query LIKE '%pg_sleep(30)%'",
        db.schema
    )) == 0
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(kill_cache_backends(&db) >= 1);
    let (result, conn) = in_flight.join().unwrap();
    let err = Error::from(result.unwrap_err());
    assert!(err.is_transient(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("terminating connection") || message.contains("closed"),
        "{message}"
    );
    drop(conn);
    db.cache.kv().set("after", &json!(true)).unwrap();
    assert_eq!(db.cache.kv().get("after").unwrap(), Some(json!(true)));
}

fn unreachable(fail_open: bool) -> Result<CacheManager, Error> {
    let config = CacheConfig::builder()
        .database_url("postgres://postgres@127.0.0.1:1/postgres")
        .pool_min_idle(0)
        .pool_connection_timeout(Duration::from_millis(200))
        .run_migrations(false)
        .fail_open(fail_open)
        .build()
        .unwrap();
    CacheManager::new(config)
}

#[test]
fn fail_open_turns_an_unreachable_database_into_misses_and_skipped_writes() {
    // Fail-open services start while the database is down.
    let cache = unreachable(true).unwrap();
    let kv = cache.kv();
    assert_eq!(kv.get("k").unwrap(), None);
    assert_eq!(kv.get_many(&["a", "b"]).unwrap(), vec![None, None]);
    kv.set("k", &json!(1)).unwrap();
    assert!(!kv.delete("k").unwrap());
    let v = kv.get_or_compute("k", || Ok::<_, Error>(json!("computed")));
    assert_eq!(v.unwrap(), json!("computed"));
    assert!(
        cache.failed_open_count() >= 5,
        "{}",
        cache.failed_open_count()
    );
}

#[test]
fn without_fail_open_an_unreachable_database_is_an_error() {
    // Start-up checks the connection, so the error comes from `new`.
    let err = unreachable(false).unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
    assert!(err.is_transient());
}

#[test]
fn fail_open_turns_a_statement_timeout_into_a_miss() {
    let db = TestDb::with(|b| {
        b.fail_open(true)
            .statement_timeout(Duration::from_millis(200))
    });
    db.cache.kv().set("k", &json!(1)).unwrap();
    let mut locker = db.raw_connection();
    locker
        .batch_execute("BEGIN; LOCK TABLE cache_entries IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    assert_eq!(db.cache.kv().get("k").unwrap(), None);
    db.cache.kv().set("k", &json!(2)).unwrap();
    assert_eq!(db.cache.failed_open_count(), 2);
    locker.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        db.cache.kv().get("k").unwrap(),
        None,
        "the write was skipped, and undone once the table answered: the old value \
         is not served"
    );
}

#[test]
fn skipped_writes_waiting_on_a_locked_table_do_not_hold_up_other_caches() {
    let db = TestDb::with(|b| {
        b.fail_open(true)
            .statement_timeout(Duration::from_millis(1000))
    });
    let prompt = pgcache::LlmPrompt::new("p", "provider");
    db.cache
        .llm_response()
        .set(&prompt, &"answer".to_owned())
        .unwrap();
    db.cache.kv().set("k", &json!("old")).unwrap();
    let mut locker = db.raw_connection();
    locker
        .batch_execute("BEGIN; LOCK TABLE cache_entries IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    // Many keys whose writes are skipped (the table does not answer in time): their
    // deletes wait for the lock.
    let keys: Vec<String> = (0..5_000).map(|i| format!("bulk:{i}")).collect();
    let value = json!(1);
    let mut entries: Vec<(&str, &serde_json::Value)> =
        keys.iter().map(|k| (k.as_str(), &value)).collect();
    let new = json!("new");
    entries.push(("k", &new));
    db.cache
        .kv()
        .set_many(&entries, Duration::from_secs(600))
        .unwrap();
    let failed_open = db.cache.failed_open_count();
    assert_eq!(failed_open, 1, "skipped");

    // While the table stays locked, another cache answers from the database: it
    // does not wait for (nor time out behind) the deletes still to replay.
    for _ in 0..3 {
        assert_eq!(
            db.cache
                .llm_response()
                .get(&prompt)
                .unwrap()
                .map(|e| e.response),
            Some("answer".to_owned())
        );
    }
    assert_eq!(
        db.cache.failed_open_count(),
        failed_open,
        "nothing failed open"
    );
    // And the locked cache's skipped key is a miss, never its old value.
    assert_eq!(db.cache.kv().get("k").unwrap(), None);

    locker.batch_execute("ROLLBACK").unwrap();
    db.cache.kv().set("after", &json!(1)).unwrap();
    assert_eq!(db.cache.kv().get("after").unwrap(), Some(json!(1)));
    assert_eq!(db.cache.kv().get("k").unwrap(), None, "replayed");
    assert_eq!(db.cache.kv().get("bulk:0").unwrap(), None, "replayed");
}

#[test]
fn fail_open_still_reports_bad_input_missing_tables_and_configuration_errors() {
    let db = TestDb::with(|b| b.fail_open(true));
    let err = db.cache.kv().get("").unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    let err = db.cache.kv().set("k", &json!("\u{0}")).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");

    let empty_schema = db
        .config()
        .schema(format!("{}_empty", db.schema))
        .run_migrations(false)
        .fail_open(true)
        .build()
        .unwrap();
    let cache = CacheManager::new(empty_schema).unwrap();
    let err = cache.kv().get("k").unwrap_err();
    assert!(matches!(err, Error::MissingTable { .. }), "{err}");

    let unknown_database = CacheConfig::builder()
        .database_url(format!(
            "{}_no_such_database",
            common::database_url().trim_end_matches('/')
        ))
        .pool_min_idle(0)
        .pool_connection_timeout(Duration::from_millis(500))
        .run_migrations(false)
        .fail_open(true)
        .build()
        .unwrap();
    // A misconfiguration is not an outage: fail-open mode does not start on it.
    let err = CacheManager::new(unknown_database).unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(db.cache.failed_open_count(), 0);
}

#[test]
fn transient_and_permanent_errors_are_told_apart() {
    for message in [
        "connection refused",
        "timed out waiting for connection",
        "server closed the connection unexpectedly",
    ] {
        assert!(
            Error::Connection(message.into()).is_transient(),
            "{message}"
        );
    }
    for message in [
        "FATAL: password authentication failed for user \"app\"",
        "FATAL: database \"x\" does not exist",
        "FATAL: role \"x\" does not exist",
        "FATAL: no pg_hba.conf entry for host",
    ] {
        assert!(
            !Error::Connection(message.into()).is_transient(),
            "{message}"
        );
    }
    assert!(!Error::MissingTable { table: "t".into() }.is_transient());
    assert!(!Error::ComputeTimeout { waited_ms: 1 }.is_transient());
}

#[test]
fn more_threads_than_connections_are_all_served() {
    // Each thread keeps its last connection parked for its next operation; the
    // others must still get theirs (taken from the slot, or given back to the pool
    // while they wait), not time out.
    let db = TestDb::with(|b| {
        b.pool_max_size(2)
            .pool_connection_timeout(Duration::from_secs(10))
    });
    std::thread::scope(|s| {
        for t in 0..8 {
            let kv = db.cache.kv();
            s.spawn(move || {
                for i in 0..100 {
                    let key = format!("t{t}:{}", i % 5);
                    kv.set(&key, &json!(i)).unwrap();
                    assert_eq!(kv.get(&key).unwrap(), Some(json!(i)));
                }
            });
        }
    });
    // The connections parked by the threads above serve a caller of the pool's own.
    let held: Vec<_> = (0..2).map(|_| db.cache.connection().unwrap()).collect();
    assert_eq!(held.len(), 2);
}
