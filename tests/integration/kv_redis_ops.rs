//! The Redis operations people reach for after get/set/del: INCRBY/DECRBY, SET NX and
//! GETDEL, atomic under concurrency.

use crate::common;

use std::time::Duration;

use common::TestDb;
use pgcache::{Cache, Error};
use serde_json::{json, Value};

const TTL: Duration = Duration::from_secs(60);

#[test]
fn concurrent_increments_all_count() {
    let db = TestDb::new();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..1000 {
                    db.cache.kv().incr("hits", 1, TTL).unwrap();
                }
            });
        }
    });
    assert_eq!(db.cache.kv().get("hits").unwrap(), Some(json!(8000)));
    assert_eq!(db.cache.kv().incr("hits", 0, TTL).unwrap(), 8000);
}

#[test]
fn an_absent_or_expired_counter_starts_from_zero_and_a_live_one_keeps_its_expiry() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    assert_eq!(kv.incr("n", 5, Duration::from_secs(3600)).unwrap(), 5);
    assert_eq!(kv.decr("n", 7, Duration::from_secs(5)).unwrap(), -2);
    let ttl = kv.ttl("n").unwrap().unwrap();
    assert!(ttl > Duration::from_secs(3000), "kept its expiry: {ttl:?}");
    db.expire_all("cache_entries");
    assert_eq!(kv.incr("n", 3, Duration::from_secs(5)).unwrap(), 3);
    assert!(kv.ttl("n").unwrap().unwrap() <= Duration::from_secs(5));
}

#[test]
fn incrementing_a_non_integer_or_past_i64_is_refused_and_changes_nothing() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    for (key, value) in [
        ("text", json!("abc")),
        ("float", json!(1.5)),
        ("object", json!({"a": 1})),
    ] {
        kv.set(key, &value).unwrap();
        let error = kv.incr(key, 1, TTL).unwrap_err();
        assert!(
            matches!(error, Error::InvalidInput { .. }),
            "{key}: {error}"
        );
        assert!(error.to_string().contains("not an integer"), "{error}");
        assert_eq!(kv.get(key).unwrap(), Some(value), "{key} unchanged");
    }
    kv.set("big", &json!(i64::MAX)).unwrap();
    assert!(matches!(
        kv.incr("big", 1, TTL),
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(kv.get("big").unwrap(), Some(json!(i64::MAX)));
    assert_eq!(kv.incr("big", -1, TTL).unwrap(), i64::MAX - 1);
    assert!(matches!(
        kv.decr("big", i64::MIN, TTL),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn of_racing_set_nx_callers_exactly_one_stores() {
    let db = TestDb::new();
    let winners: usize = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let db = &db;
                scope.spawn(move || db.cache.kv().set_nx("lock", &json!(i), TTL).unwrap())
            })
            .collect();
        racers
            .into_iter()
            .map(|r| usize::from(r.join().unwrap()))
            .sum()
    });
    assert_eq!(winners, 1);
    let holder: Value = db.cache.kv().get("lock").unwrap().unwrap();
    assert!(!db.cache.kv().set_nx("lock", &json!("late"), TTL).unwrap());
    assert_eq!(
        db.cache.kv().get("lock").unwrap(),
        Some(holder),
        "the winner's value stays"
    );
    db.expire_all("cache_entries");
    assert!(db
        .cache
        .kv()
        .set_nx("lock", &json!("after expiry"), TTL)
        .unwrap());
    assert_eq!(
        db.cache.kv().get("lock").unwrap(),
        Some(json!("after expiry"))
    );
}

#[test]
fn get_del_hands_a_live_value_to_exactly_one_caller() {
    let db = TestDb::new();
    db.cache.kv().set("job", &json!({"id": 7})).unwrap();
    let taken: Vec<Option<Value>> = std::thread::scope(|scope| {
        let takers: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| db.cache.kv().get_del("job").unwrap()))
            .collect();
        takers.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let got: Vec<&Value> = taken.iter().flatten().collect();
    assert_eq!(got, vec![&json!({"id": 7})]);
    assert_eq!(db.cache.kv().get("job").unwrap(), None);
    db.cache.kv().set("old", &json!(1)).unwrap();
    db.expire_all("cache_entries");
    assert_eq!(
        db.cache.kv().get_del("old").unwrap(),
        None,
        "expired is absent"
    );
}

#[test]
fn get_touch_reads_a_live_entry_and_slides_its_expiry() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_with_ttl("session", &json!({"user": 42}), Duration::from_secs(5))
        .unwrap();
    let hour = Duration::from_secs(3600);
    assert_eq!(
        kv.get_touch("session", hour).unwrap(),
        Some(json!({"user": 42}))
    );
    let ttl = kv.ttl("session").unwrap().unwrap();
    assert!(ttl > Duration::from_secs(3000), "slid: {ttl:?}");
    assert_eq!(kv.get_touch("absent", hour).unwrap(), None);
    db.expire_all("cache_entries");
    assert_eq!(kv.get_touch("session", hour).unwrap(), None);
    assert_eq!(
        kv.get("session").unwrap(),
        None,
        "an expired entry is not revived"
    );
}
