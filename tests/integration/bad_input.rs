//! Bad input on every key/value operation and in the configuration: a clear error
//! naming the problem, nothing stored, the previous value intact.
//! (Single-key `set` cases live in kv.rs, URL basics in config.rs.)

use crate::common;

use std::time::Duration;

use common::TestDb;
use pgcache::{Cache, CacheConfig, CacheManager, Error, MAX_KEY_BYTES};
use serde::Serialize;
use serde_json::json;

fn bad_keys() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), "empty"),
        ("k".repeat(MAX_KEY_BYTES + 1), "at most"),
        ("é".repeat(MAX_KEY_BYTES / 2 + 1), "at most"),
        ("nul\0key".to_owned(), "NUL"),
    ]
}

fn assert_invalid(err: Error, what: &str, needle: &str) {
    let message = err.to_string();
    match err {
        Error::InvalidInput { what: w, .. } => assert_eq!(w, what, "{message}"),
        other => panic!("expected invalid {what}, got {other}"),
    }
    assert!(
        message.contains(needle),
        "{message} should mention {needle}"
    );
}

#[test]
fn every_operation_rejects_a_bad_key_and_leaves_the_cache_untouched() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("good", &json!("old")).unwrap();
    let v = json!("new");
    let ttl = Duration::from_secs(60);
    for (key, needle) in bad_keys() {
        let key = key.as_str();
        assert_invalid(kv.get(key).unwrap_err(), "key", needle);
        assert_invalid(kv.get_many(&["good", key]).unwrap_err(), "key", needle);
        assert_invalid(kv.set_with_ttl(key, &v, ttl).unwrap_err(), "key", needle);
        assert_invalid(
            kv.set_many(&[("good", &v), (key, &v)], ttl).unwrap_err(),
            "key",
            needle,
        );
        assert_invalid(kv.delete(key).unwrap_err(), "key", needle);
        assert_invalid(kv.delete_many(&["good", key]).unwrap_err(), "key", needle);
        assert_invalid(kv.exists(key).unwrap_err(), "key", needle);
        assert_invalid(kv.ttl(key).unwrap_err(), "key", needle);
        assert_invalid(kv.touch(key, ttl).unwrap_err(), "key", needle);
        assert_invalid(kv.key_digest(key).unwrap_err(), "key", needle);
        let mut computed = false;
        let err = kv
            .get_or_compute(key, || {
                computed = true;
                Ok::<_, Error>(json!(1))
            })
            .unwrap_err();
        assert_invalid(err, "key", needle);
        assert!(!computed, "nothing is computed for a bad key");
        if !key.is_empty() {
            assert_invalid(kv.delete_prefix(key).unwrap_err(), "prefix", needle);
        }
    }
    assert_eq!(kv.get("good").unwrap(), Some(json!("old")));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 1);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
}

#[test]
fn bad_ttls_are_rejected_by_every_operation_taking_one() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!("old")).unwrap();
    let v = json!("new");
    for ttl in [
        Duration::ZERO,
        pgcache::MAX_TTL + Duration::from_secs(1),
        Duration::MAX,
    ] {
        assert_invalid(kv.set_many(&[("k", &v)], ttl).unwrap_err(), "ttl", "TTL");
        assert_invalid(kv.touch("k", ttl).unwrap_err(), "ttl", "TTL");
        let err = kv
            .with_default_ttl(ttl)
            .get_or_compute("new", || Ok::<_, Error>(json!(1)))
            .unwrap_err();
        assert_invalid(err, "ttl", "TTL");
    }
    assert_eq!(kv.get("k").unwrap(), Some(json!("old")));
    assert!(kv.ttl("k").unwrap().unwrap() > Duration::from_secs(60));
    assert_eq!(kv.get("new").unwrap(), None);
}

#[test]
fn a_ttl_under_one_microsecond_is_rejected_and_the_live_value_stays() {
    // The database counts TTLs in microseconds: 500 ns would round to zero and
    // replace a live value with an expired one.
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!("live")).unwrap();
    let ttl = Duration::from_nanos(500);
    assert_invalid(
        kv.set_with_ttl("k", &json!("gone"), ttl).unwrap_err(),
        "ttl",
        "at least 1 µs",
    );
    assert_invalid(kv.touch("k", ttl).unwrap_err(), "ttl", "at least 1 µs");
    assert_eq!(kv.get("k").unwrap(), Some(json!("live")));
    kv.set_with_ttl("k", &json!("short"), Duration::from_micros(1))
        .unwrap();
    let err = CacheConfig::builder().ttl_short(ttl).build().unwrap_err();
    assert!(err.to_string().contains("ttl_short"), "{err}");
}

#[test]
fn the_longest_ttl_is_accepted_without_overflow() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_with_ttl("k", &json!(1), pgcache::MAX_TTL).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!(1)));
}

#[test]
fn nul_in_a_typed_value_or_a_batch_is_rejected_and_old_values_kept() {
    #[derive(Debug, Serialize, serde::Deserialize)]
    struct Note {
        title: String,
        tags: Vec<String>,
    }
    let db = TestDb::new();
    let notes = db.cache.kv().typed::<Note>();
    let good = Note {
        title: "ok".into(),
        tags: vec![],
    };
    notes.set("n", &good).unwrap();
    let bad = Note {
        title: "ok".into(),
        tags: vec!["x\0y".into()],
    };
    assert_invalid(notes.set("n", &bad).unwrap_err(), "value", "NUL");
    assert_invalid(
        notes
            .set_many(&[("m", &good), ("n", &bad)], Duration::from_secs(60))
            .unwrap_err(),
        "value",
        "NUL",
    );
    let err = notes
        .get_or_compute("fresh", || {
            Ok::<_, Error>(Note {
                title: "\0".into(),
                tags: vec![],
            })
        })
        .unwrap_err();
    assert_invalid(err, "value", "NUL");
    assert_eq!(notes.get("n").unwrap().unwrap().tags, Vec::<String>::new());
    assert!(notes.get("m").unwrap().is_none());
    assert!(notes.get("fresh").unwrap().is_none());
    // The refused key's lease is handed to the nil holder (callers compute without
    // waiting until it lapses); no caller holds one.
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM cache_leases \
             WHERE holder <> '00000000-0000-0000-0000-000000000000'"
        ),
        0
    );
}

#[test]
fn malformed_database_urls_name_the_setting_and_hide_the_password() {
    for url in [
        "",
        "not a url",
        "postgres//app:Sekr1t@db/app",
        "http://app:Sekr1t@db/app",
        "postgres://app:Sekr1t@[::1/app",
        "postgres://app:Sekr1t@db:99999/app",
    ] {
        let err = CacheConfig::builder()
            .database_url(url)
            .build()
            .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{url}: {message}");
        assert!(message.contains("database_url"), "{message}");
        assert!(!message.contains("Sekr1t"), "{message}");
        assert!(!format!("{err:?}").contains("Sekr1t"), "{err:?}");
    }
}

#[test]
fn unreachable_database_with_a_password_never_shows_it() {
    let config = CacheConfig::builder()
        .database_url("postgres://app:Sekr1t@127.0.0.1:1/app")
        .pool_min_idle(0)
        .pool_connection_timeout(Duration::from_millis(200))
        .run_migrations(false)
        .build()
        .unwrap();
    assert!(!format!("{config:?}").contains("Sekr1t"));
    // Start-up checks the connection, so the error comes from `new`.
    let err = CacheManager::new(config).unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
    assert!(!err.to_string().contains("Sekr1t"), "{err}");
    assert!(!format!("{err:?}").contains("Sekr1t"), "{err:?}");
}

#[test]
fn single_flight_settings_are_read_and_checked() {
    let c = CacheConfig::from_vars([
        ("PGCACHE_LEASE_TTL_MS", "1500"),
        ("PGCACHE_COMPUTE_WAIT_MS", "2500"),
    ])
    .unwrap();
    assert_eq!(c.lease_ttl(), Duration::from_millis(1500));
    assert_eq!(c.compute_wait_timeout(), Duration::from_millis(2500));
    let defaults = CacheConfig::from_vars(Vec::<(String, String)>::new()).unwrap();
    assert_eq!(defaults.lease_ttl(), Duration::from_secs(30));
    assert_eq!(defaults.compute_wait_timeout(), Duration::from_secs(60));
    for (name, value) in [
        ("PGCACHE_LEASE_TTL_MS", "0"),
        ("PGCACHE_LEASE_TTL_MS", "soon"),
        ("PGCACHE_COMPUTE_WAIT_MS", "0"),
        ("PGCACHE_COMPUTE_WAIT_MS", "-5"),
    ] {
        let err = CacheConfig::from_vars([(name, value)]).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}
