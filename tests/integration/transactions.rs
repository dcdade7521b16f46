//! Cache operations inside a caller's transaction judge expiry by the statement's
//! time, not the transaction's start.

use crate::common;

use std::time::Duration;

use common::TestDb;
use diesel::Connection;
use pgcache::{Cache, Error};
use serde_json::json;

#[test]
fn an_entry_that_expires_during_a_long_transaction_reads_as_a_miss_in_it() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let mut conn = db.cache.connection().unwrap();
    conn.transaction(|conn| {
        kv.set_in(conn, "k", &json!(1), Duration::from_millis(300))?;
        assert_eq!(kv.get_in(conn, "k")?, Some(json!(1)));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(kv.get_in(conn, "k")?, None, "expired 200 ms ago");
        Ok::<_, Error>(())
    })
    .unwrap();
}

#[test]
fn an_entry_written_late_in_a_long_transaction_gets_its_whole_ttl() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let mut conn = db.cache.connection().unwrap();
    conn.transaction(|conn| {
        std::thread::sleep(Duration::from_millis(400));
        kv.set_in(conn, "k", &json!(1), Duration::from_millis(300))?;
        assert_eq!(kv.get_in(conn, "k")?, Some(json!(1)), "written just now");
        Ok::<_, Error>(())
    })
    .unwrap();
    // Committed about 400 ms after the transaction began: still 300 ms to live.
    assert_eq!(kv.get("k").unwrap(), Some(json!(1)));
}
