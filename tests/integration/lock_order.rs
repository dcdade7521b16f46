//! Multi-row deletes lock rows in key order, the order `set_many` takes them, so
//! the two cannot deadlock whatever plan the delete gets.
//!
//! Deterministic: a delete of `["b", "a"]` (with `b` stored first, and a plan that
//! visits rows in physical order) meets row `a` locked by another transaction. In
//! key order it waits for `a` before touching `b`, so `b` stays free; in physical
//! order it would hold `b` while waiting, which is half of a deadlock.

use crate::common;

use std::time::Duration;

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::PgConnection;
use pgcache::{Cache, LlmPrompt};
use serde_json::json;

/// Waits until a session of this test's schema is blocked on a lock.
fn wait_until_blocked(db: &TestDb) {
    for _ in 0..500 {
        let blocked = db.count(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%DELETE%' \
             AND application_name = 'lock-order-{}'",
            db.schema
        ));
        if blocked > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the delete never blocked");
}

/// A plain connection that scans in physical order, as a bitmap or sequential scan
/// would.
fn physical_order_connection(db: &TestDb) -> PgConnection {
    let mut conn = db.raw_connection();
    conn.batch_execute(&format!(
        "SET application_name = 'lock-order-{}'; SET enable_indexscan = off; \
         SET enable_indexonlyscan = off;",
        db.schema
    ))
    .unwrap();
    conn
}

/// Locks the row matched by `row_filter` of `table` in a transaction of its own,
/// runs `delete` on another connection, and reports whether the row matched by
/// `other_filter` stayed free while the delete waited.
fn other_row_stays_free(
    db: &TestDb,
    table: &str,
    row_filter: &str,
    other_filter: &str,
    delete: impl FnOnce(&mut PgConnection) + Send + 'static,
) -> bool {
    let mut holder = db.raw_connection();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM {table} WHERE {row_filter} FOR UPDATE"
        ))
        .unwrap();
    let mut conn = physical_order_connection(db);
    let deleter = std::thread::spawn(move || delete(&mut conn));
    wait_until_blocked(db);
    let mut probe = db.raw_connection();
    let free = probe
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM {table} WHERE {other_filter} FOR UPDATE NOWAIT; ROLLBACK"
        ))
        .is_ok();
    holder.batch_execute("ROLLBACK").unwrap();
    deleter.join().unwrap();
    free
}

#[test]
fn kv_delete_many_locks_rows_in_key_order() {
    let db = TestDb::new();
    db.cache.kv().set("b", &json!(1)).unwrap();
    db.cache.kv().set("a", &json!(1)).unwrap();
    let cache = db.cache.clone();
    let free = other_row_stays_free(
        &db,
        "cache_entries",
        "key = 'a'",
        "key = 'b'",
        move |conn| {
            assert_eq!(cache.kv().delete_many_in(conn, &["b", "a"]).unwrap(), 2);
        },
    );
    assert!(free, "the delete locked `b` before `a`");
}

#[test]
fn typed_delete_many_locks_rows_in_key_order() {
    let db = TestDb::new();
    let (x, y) = (LlmPrompt::new("x", "p"), LlmPrompt::new("y", "p"));
    let mut digests = [x.digest().unwrap(), y.digest().unwrap()];
    digests.sort();
    // The larger digest stored first, so physical order is the reverse of key order.
    let (first, second) = if x.digest().unwrap() == digests[0] {
        (x, y)
    } else {
        (y, x)
    };
    let llm = db.cache.llm_response();
    llm.set(&second, &"r".to_owned()).unwrap();
    llm.set(&first, &"r".to_owned()).unwrap();
    let hex = |i: usize| hex::encode(digests[i].as_bytes());
    let cache = db.cache.clone();
    let free = other_row_stays_free(
        &db,
        "llm_response_cache",
        &format!("key_hash = '\\x{}'", hex(0)),
        &format!("key_hash = '\\x{}'", hex(1)),
        move |conn| {
            let removed = cache
                .llm_response()
                .delete_many_in(conn, &[&second, &first])
                .unwrap();
            assert_eq!(removed, 2);
        },
    );
    assert!(free, "the delete locked the larger digest first");
}
