//! JSONB queries over the key/value cache.

use crate::common;

use common::TestDb;
use pgcache::Cache;
use serde_json::json;

#[test]
fn find_containing_returns_live_matches_in_key_order_up_to_the_limit() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("c", &json!({"plan": "pro", "n": 3})).unwrap();
    kv.set("a", &json!({"plan": "pro", "n": 1})).unwrap();
    kv.set("b", &json!({"plan": "free"})).unwrap();
    kv.set("d", &json!({"plan": "pro", "n": 4})).unwrap();
    db.exec("UPDATE cache_entries SET expires_at = now() - interval '1 second' WHERE key = 'd'");

    let found = kv.find_containing(&json!({"plan": "pro"}), 10).unwrap();
    let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "c"]);
    assert_eq!(found[0].1, json!({"plan": "pro", "n": 1}));
    assert_eq!(
        kv.find_containing(&json!({"plan": "pro"}), 1)
            .unwrap()
            .len(),
        1
    );
    assert!(kv
        .find_containing(&json!({"plan": "x"}), 10)
        .unwrap()
        .is_empty());
}

#[test]
fn find_containing_rejects_a_nul_filter() {
    let db = TestDb::new();
    let err = db
        .cache
        .kv()
        .find_containing(&json!({"a": "\u{0}"}), 1)
        .unwrap_err();
    assert!(err.to_string().contains("filter"), "{err}");
}
