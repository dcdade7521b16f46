//! Every hot key/value statement is prepared once per connection and reused: the
//! library pays PostgreSQL's parse and plan once, not on every call.

mod common;

use std::time::Duration;

use common::TestDb;
use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl};
use pgcache::Cache;
use serde_json::json;

#[derive(QueryableByName)]
struct Prepared {
    #[diesel(sql_type = Text)]
    statement: String,
}

#[test]
fn kv_hot_paths_prepare_one_statement_per_shape_whatever_the_batch_size() {
    // One pooled connection, so the provided methods and `connection()` share it.
    let db = TestDb::with(|b| b.pool_max_size(1));
    let kv = db.cache.kv();
    let ttl = Duration::from_secs(60);
    for round in 0..5 {
        let n = [1, 2, 7, 100, 3][round];
        let keys: Vec<String> = (0..n).map(|i| format!("k:{round}:{i}")).collect();
        let values: Vec<serde_json::Value> = (0..n).map(|i| json!({"i": i})).collect();
        let entries: Vec<(&str, &serde_json::Value)> =
            keys.iter().map(String::as_str).zip(values.iter()).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();

        kv.set_many(&entries, ttl).unwrap();
        assert_eq!(kv.get_many(&key_refs).unwrap().len(), n);
        kv.set(&keys[0], &json!(round)).unwrap();
        assert_eq!(kv.get(&keys[0]).unwrap(), Some(json!(round)));
        assert!(kv.delete(&keys[0]).unwrap());
        assert_eq!(kv.get(&keys[0]).unwrap(), None);
    }

    let mut conn = db.cache.connection().unwrap();
    let prepared: Vec<Prepared> = diesel::sql_query(
        "SELECT statement FROM pg_prepared_statements \
         WHERE statement LIKE '%cache_entries%' ORDER BY statement",
    )
    .load(&mut *conn)
    .unwrap();
    let statements: Vec<&str> = prepared.iter().map(|p| p.statement.as_str()).collect();
    // get, get_many, set, set_many, delete: five shapes, each prepared exactly once.
    assert_eq!(statements.len(), 5, "{statements:#?}");
    let count = |prefix: &str| {
        statements
            .iter()
            .filter(|s| s.trim_start().starts_with(prefix))
            .count()
    };
    assert_eq!(count("SELECT"), 2, "{statements:#?}");
    assert_eq!(count("INSERT"), 2, "{statements:#?}");
    assert_eq!(count("DELETE"), 1, "{statements:#?}");
}
