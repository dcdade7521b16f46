//! The key/value cache through the public API.

use crate::common;

use std::time::Duration;

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::Connection;
use pgcache::{Cache, CacheConfig, CacheManager, Error};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
    age: u32,
}

#[test]
fn set_then_get_is_a_hit_and_unknown_key_a_miss() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("user:42:profile:v2", &json!({"name": "Ada"}))
        .unwrap();
    assert_eq!(
        kv.get("user:42:profile:v2").unwrap(),
        Some(json!({"name": "Ada"}))
    );
    assert_eq!(kv.get("user:43:profile:v2").unwrap(), None);
}

#[test]
fn typed_handle_round_trips_a_struct() {
    let db = TestDb::new();
    let profiles = db.cache.kv().typed::<Profile>();
    let ada = Profile {
        name: "Ada".into(),
        age: 36,
    };
    profiles.set("p", &ada).unwrap();
    assert_eq!(profiles.get("p").unwrap(), Some(ada));
}

#[test]
fn reading_a_value_as_the_wrong_type_is_an_error_not_a_miss() {
    let db = TestDb::new();
    db.cache.kv().set("p", &json!("not a profile")).unwrap();
    let err = db.cache.kv().typed::<Profile>().get("p").unwrap_err();
    assert!(matches!(err, Error::Json(_)), "{err}");
}

#[test]
fn overwrite_replaces_value_and_keeps_one_row() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!(1)).unwrap();
    kv.set("k", &json!(2)).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!(2)));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 1);
}

#[test]
fn expired_entries_read_as_misses_before_cleanup() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!(1)).unwrap();
    db.expire_all("cache_entries");
    assert_eq!(kv.get("k").unwrap(), None);
    assert!(!kv.exists("k").unwrap());
    assert_eq!(kv.ttl("k").unwrap(), None);
    assert_eq!(kv.get_many(&["k"]).unwrap(), vec![None]);
    // The row is still there: only cleanup removes it.
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 1);
}

#[test]
fn short_ttl_expires_by_database_clock() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_with_ttl("k", &json!(1), Duration::from_millis(300))
        .unwrap();
    assert!(kv.exists("k").unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(kv.get("k").unwrap(), None);
}

#[test]
fn ttl_reports_remaining_time_and_touch_extends_it() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_with_ttl("k", &json!(1), Duration::from_secs(60))
        .unwrap();
    let left = kv.ttl("k").unwrap().unwrap();
    assert!(
        left > Duration::from_secs(55) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    assert!(kv.touch("k", Duration::from_secs(3600)).unwrap());
    assert!(kv.ttl("k").unwrap().unwrap() > Duration::from_secs(3500));
    assert!(!kv.touch("missing", Duration::from_secs(10)).unwrap());
}

#[test]
fn delete_removes_and_reports_whether_a_live_entry_existed() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!(1)).unwrap();
    assert!(kv.delete("k").unwrap());
    assert!(!kv.delete("k").unwrap());
    assert_eq!(kv.get("k").unwrap(), None);
}

#[test]
fn batch_operations_work_in_key_order() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let (one, two, three) = (json!(1), json!(2), json!(3));
    kv.set_many(
        &[("a", &one), ("b", &two), ("c", &three)],
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(
        kv.get_many(&["c", "missing", "a", "c"]).unwrap(),
        vec![Some(json!(3)), None, Some(json!(1)), Some(json!(3))]
    );
    assert_eq!(kv.delete_many(&["a", "b", "missing"]).unwrap(), 2);
    assert_eq!(
        kv.get_many(&["a", "b", "c"]).unwrap(),
        vec![None, None, Some(json!(3))]
    );
}

#[test]
fn set_many_with_a_repeated_key_keeps_the_last_value() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let (one, two) = (json!(1), json!(2));
    kv.set_many(&[("a", &one), ("a", &two)], Duration::from_secs(60))
        .unwrap();
    assert_eq!(kv.get("a").unwrap(), Some(json!(2)));
}

#[test]
fn set_many_with_one_bad_entry_stores_nothing() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let (good, bad) = (json!(1), json!("nul\u{0}inside"));
    let err = kv
        .set_many(&[("good", &good), ("bad", &bad)], Duration::from_secs(60))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "value", .. }),
        "{err}"
    );
    assert_eq!(kv.get("good").unwrap(), None);
}

#[test]
fn delete_prefix_treats_wildcards_literally() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let v = json!(true);
    for key in [
        "user:1%:a",
        "user:1%:b",
        "user:10:a",
        "user:1_:a",
        "user:1x:a",
        "user:2:a",
    ] {
        kv.set(key, &v).unwrap();
    }
    assert_eq!(kv.delete_prefix("user:1%").unwrap(), 2);
    assert_eq!(kv.delete_prefix("user:1_").unwrap(), 1);
    let left = kv
        .get_many(&[
            "user:1%:a",
            "user:1%:b",
            "user:10:a",
            "user:1_:a",
            "user:1x:a",
            "user:2:a",
        ])
        .unwrap();
    assert_eq!(
        left,
        vec![None, None, Some(v.clone()), None, Some(v.clone()), Some(v)]
    );
}

#[test]
fn delete_prefix_uses_the_key_index() {
    let db = TestDb::new();
    let mut conn = db.raw_connection();
    conn.batch_execute(
        "INSERT INTO cache_entries (key, value, expires_at) \
         SELECT 'k:' || g, '1', now() + interval '1 hour' FROM generate_series(1, 5000) g; \
         ANALYZE cache_entries;",
    )
    .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Plan {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        line: String,
    }
    use diesel::RunQueryDsl;
    let plan: Vec<Plan> =
        diesel::sql_query("EXPLAIN DELETE FROM cache_entries WHERE key >= 'k:12' AND key < 'k:13'")
            .load(&mut conn)
            .unwrap();
    let plan: String = plan.into_iter().map(|p| p.line + "\n").collect();
    assert!(plan.contains("cache_entries_pkey"), "{plan}");
    assert_eq!(db.cache.kv().delete_prefix("k:12").unwrap(), 111);
}

#[test]
fn clear_removes_everything() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("a", &json!(1)).unwrap();
    kv.set("b", &json!(2)).unwrap();
    assert_eq!(kv.clear().unwrap(), 2);
    assert_eq!(kv.get("a").unwrap(), None);
}

#[test]
fn get_or_set_computes_once_then_hits() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let mut calls = 0;
    for _ in 0..3 {
        let v = kv
            .get_or_set("k", Duration::from_secs(60), || {
                calls += 1;
                Ok::<_, Error>(json!("computed"))
            })
            .unwrap();
        assert_eq!(v, json!("computed"));
    }
    assert_eq!(calls, 1);
}

#[test]
fn get_or_set_error_is_returned_and_not_cached() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    #[derive(Debug, PartialEq)]
    enum AppError {
        Source,
        Cache,
    }
    impl From<Error> for AppError {
        fn from(_: Error) -> Self {
            AppError::Cache
        }
    }
    let result = kv.get_or_set("k", Duration::from_secs(60), || Err(AppError::Source));
    assert_eq!(result, Err(AppError::Source));
    assert_eq!(kv.get("k").unwrap(), None);
}

#[test]
fn bad_keys_are_rejected_and_name_the_problem() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let v = json!(1);
    let long = "x".repeat(pgcache::MAX_KEY_BYTES + 1);
    for (key, needle) in [("", "empty"), (long.as_str(), "at most"), ("a\0b", "NUL")] {
        let err = kv.set(key, &v).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { what: "key", .. }),
            "{err}"
        );
        assert!(err.to_string().contains(needle), "{err}");
        assert!(kv.get(key).is_err());
    }
    assert!(kv.set(&"x".repeat(pgcache::MAX_KEY_BYTES), &v).is_ok());
    assert!(matches!(
        kv.delete_prefix("").unwrap_err(),
        Error::InvalidInput { what: "prefix", .. }
    ));
}

#[test]
fn bad_ttls_are_rejected_and_nothing_is_stored() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!("old")).unwrap();
    for ttl in [
        Duration::ZERO,
        pgcache::MAX_TTL + Duration::from_secs(1),
        Duration::MAX,
    ] {
        let err = kv.set_with_ttl("k", &json!("new"), ttl).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { what: "ttl", .. }),
            "{err}"
        );
    }
    assert_eq!(kv.get("k").unwrap(), Some(json!("old")));
}

#[test]
fn nul_in_a_json_value_is_rejected_and_old_value_kept() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!("old")).unwrap();
    for bad in [
        json!("a\u{0}"),
        json!({"a\u{0}": 1}),
        json!([[{"x": "\u{0}"}]]),
    ] {
        let err = kv.set("k", &bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { what: "value", .. }),
            "{err}"
        );
    }
    assert_eq!(kv.get("k").unwrap(), Some(json!("old")));
}

#[test]
fn writes_in_a_committed_transaction_are_visible() {
    let db = TestDb::new();
    db.exec("CREATE TABLE profiles (id INT PRIMARY KEY, name TEXT)");
    db.cache
        .kv()
        .set("user:1:profile", &json!("stale"))
        .unwrap();
    let mut conn = db.cache.connection().unwrap();
    conn.transaction(|conn| {
        conn.batch_execute("INSERT INTO profiles VALUES (1, 'Ada')")?;
        db.cache
            .kv()
            .delete_in(conn, "user:1:profile")
            .map_err(|_| diesel::result::Error::RollbackTransaction)?;
        db.cache
            .kv()
            .set_in(conn, "user:1:name", &json!("Ada"), Duration::from_secs(60))
            .map_err(|_| diesel::result::Error::RollbackTransaction)?;
        Ok::<_, diesel::result::Error>(())
    })
    .unwrap();
    assert_eq!(db.cache.kv().get("user:1:profile").unwrap(), None);
    assert_eq!(
        db.cache.kv().get("user:1:name").unwrap(),
        Some(json!("Ada"))
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM profiles"), 1);
}

#[test]
fn writes_in_a_rolled_back_transaction_are_undone() {
    let db = TestDb::new();
    db.exec("CREATE TABLE profiles (id INT PRIMARY KEY, name TEXT)");
    db.cache
        .kv()
        .set("user:1:profile", &json!("cached"))
        .unwrap();
    let mut conn = db.cache.connection().unwrap();
    let result = conn.transaction(|conn| {
        conn.batch_execute("INSERT INTO profiles VALUES (1, 'Ada')")?;
        db.cache.kv().delete_in(conn, "user:1:profile").unwrap();
        db.cache.kv().delete_prefix_in(conn, "user:").unwrap();
        db.cache
            .kv()
            .set_in(conn, "user:1:name", &json!("Ada"), Duration::from_secs(60))
            .unwrap();
        // Inside the transaction the invalidation is visible...
        assert_eq!(db.cache.kv().get_in(conn, "user:1:profile").unwrap(), None);
        Err::<(), _>(diesel::result::Error::RollbackTransaction)
    });
    assert!(result.is_err());
    // ...and after the rollback everything is as before.
    assert_eq!(
        db.cache.kv().get("user:1:profile").unwrap(),
        Some(json!("cached"))
    );
    assert_eq!(db.cache.kv().get("user:1:name").unwrap(), None);
    assert_eq!(db.count("SELECT count(*) AS n FROM profiles"), 0);
}

#[test]
fn disabled_caching_misses_skips_writes_and_opens_no_connection() {
    // An unreachable server proves nothing is ever connected to.
    let config = CacheConfig::builder()
        .database_url("postgres://nobody@127.0.0.1:1/nothing")
        .enabled(false)
        .build()
        .unwrap();
    let cache = CacheManager::new(config).unwrap();
    assert!(!cache.is_enabled());
    let kv = cache.kv();
    kv.set("k", &json!(1)).unwrap();
    assert_eq!(kv.get("k").unwrap(), None);
    assert_eq!(kv.get_many(&["k", "j"]).unwrap(), vec![None, None]);
    assert!(!kv.delete("k").unwrap());
    assert!(!kv.exists("k").unwrap());
    let mut calls = 0;
    for _ in 0..2 {
        kv.get_or_compute("k", || {
            calls += 1;
            Ok::<_, Error>(json!(1))
        })
        .unwrap();
    }
    assert_eq!(calls, 2, "with caching off every call computes");
    // Only a connection asked for is opened: here, to a server that is not there.
    assert!(cache.connection().is_err());
}

#[test]
fn two_managers_on_one_schema_see_each_others_writes() {
    let db = TestDb::new();
    let other = db.another_manager();
    db.cache.kv().set("shared", &json!("from A")).unwrap();
    assert_eq!(other.kv().get("shared").unwrap(), Some(json!("from A")));
}

#[test]
fn manager_is_send_sync_and_cheap_to_clone() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<CacheManager>();
    let db = TestDb::new();
    let clone = db.cache.clone();
    std::thread::spawn(move || clone.kv().set("t", &json!(1)).unwrap())
        .join()
        .unwrap();
    assert_eq!(db.cache.kv().get("t").unwrap(), Some(json!(1)));
}
