//! Every error message says what to do about it: the setting to raise, the command
//! to run, where a missing table was looked for.

mod common;

use std::time::Duration;

use common::TestDb;
use diesel::{Connection, PgConnection, RunQueryDsl};
use pgcache::{Cache, Error};

#[test]
fn compute_timeout_names_its_setting_and_variable() {
    let message = Error::ComputeTimeout { waited_ms: 60_000 }.to_string();
    assert!(message.contains("60000 ms"), "{message}");
    assert!(message.contains("PGCACHE_COMPUTE_WAIT_MS"), "{message}");
    assert!(message.contains("compute_wait_timeout"), "{message}");
}

#[test]
fn unresponsive_names_the_statement_timeout() {
    let message = Error::Unresponsive { waited_ms: 6_000 }.to_string();
    assert!(message.contains("6000 ms"), "{message}");
    assert!(
        message.contains("PGCACHE_STATEMENT_TIMEOUT_MS"),
        "{message}"
    );
    assert!(message.contains("statement_timeout"), "{message}");
}

#[test]
fn a_table_missing_from_the_caches_schema_says_to_migrate() {
    let db = TestDb::new();
    db.exec("DROP TABLE cache_entries");
    let error = db.cache.kv().get("k").unwrap_err();
    assert!(matches!(error, Error::MissingTable { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(&format!("{}.cache_entries", db.schema)),
        "{message}"
    );
    assert!(message.contains("not migrated"), "{message}");
    assert!(message.contains("pgcache migrate"), "{message}");
}

#[test]
fn a_table_off_the_search_path_says_so_rather_than_to_migrate() {
    let db = TestDb::new();
    // SQL of the application's own, unqualified, on a connection whose search path
    // does not hold the cache's schema.
    let mut conn = PgConnection::establish(&common::database_url()).unwrap();
    let error = Error::from(
        diesel::sql_query("SELECT key FROM cache_entries")
            .execute(&mut conn)
            .unwrap_err(),
    );
    assert!(matches!(error, Error::MissingTable { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("search path"), "{message}");
    assert!(!message.contains("not migrated"), "{message}");
    // The tables are there all along.
    db.cache.kv().set("k", &serde_json::json!(1)).unwrap();
}

#[test]
fn a_connection_error_joins_libpqs_lines_with_semicolons() {
    use diesel::r2d2::{ConnectionManager, Pool};
    let pool = Pool::builder()
        .connection_timeout(Duration::from_millis(200))
        .build_unchecked(ConnectionManager::<PgConnection>::new(
            "postgres://app@127.0.0.1:1/app",
        ));
    let error = Error::from(pool.get().map(drop).unwrap_err());
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message}");
    // libpq: "... Connection refused\n\tIs the server running on that host ...?"
    assert!(
        message.contains("Connection refused; Is the server running"),
        "{message}"
    );
}

#[test]
fn warmup_timeout_names_the_setting_to_raise() {
    let message = Error::WarmupTimeout { timeout_ms: 500 }.to_string();
    assert!(message.contains("statement_timeout_ms"), "{message}");
    assert!(message.contains("--statement-timeout-ms"), "{message}");
}
