//! Bytes values in the key/value cache: stored and returned byte for byte, kept
//! apart from JSON entries (reading one kind as the other is an error, never a
//! miss), and expiring, cleaned up and near-cached like JSON entries. Also what
//! JSONB does to JSON text, and the exact round trip through bytes.

mod common;
mod near_support;

use std::time::Duration;

use common::TestDb;
use diesel::Connection;
use near_support::{hits_and_misses, kv_stats, wait_current};
use pgcache::{Cache, CacheKind, Error, NearCache};
use serde_json::json;

const TTL: Duration = Duration::from_secs(600);

/// xorshift64*: a seeded, reproducible byte source.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn assert_wrong_type(err: Error, key: &str, stored: &str, requested: &str) {
    match err {
        Error::WrongType {
            key: k,
            stored: s,
            requested: r,
        } => assert_eq!((k.as_str(), s, r), (key, stored, requested)),
        other => panic!("expected WrongType, got {other}"),
    }
}

#[test]
fn random_bytes_of_1_b_to_1_mib_round_trip_exactly() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let mut prng = Prng(0x9E37_79B9_7F4A_7C15);
    let mut sizes = vec![1, 2, 255, 4096, 65_537, 1 << 20];
    sizes.extend((0..10).map(|_| 1 + (prng.next() % (1 << 20)) as usize));
    for (i, size) in sizes.into_iter().enumerate() {
        let mut value = prng.bytes(size);
        // A NUL and bytes that are never valid UTF-8, whatever the PRNG gave.
        value[0] = 0x00;
        if size > 2 {
            value[1] = 0xFF;
            value[2] = 0xC0;
        }
        let key = format!("blob:{i}");
        kv.set_bytes(&key, &value, TTL).unwrap();
        assert_eq!(
            kv.get_bytes(&key).unwrap().as_deref(),
            Some(&value[..]),
            "{size} B"
        );
    }
}

#[test]
fn an_empty_value_is_stored_and_read_back_empty() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_bytes("empty", b"", TTL).unwrap();
    assert_eq!(kv.get_bytes("empty").unwrap(), Some(Vec::new()));
    assert!(kv.exists("empty").unwrap());
    assert_eq!(kv.get_bytes("absent").unwrap(), None);
}

#[test]
fn batches_and_transactions_round_trip_bytes() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_many_bytes(&[("a", b"\x00a"), ("b", b"\xffb"), ("a", b"last")], TTL)
        .unwrap();
    assert_eq!(
        kv.get_many_bytes(&["b", "missing", "a", "b"]).unwrap(),
        vec![
            Some(b"\xffb".to_vec()),
            None,
            Some(b"last".to_vec()),
            Some(b"\xffb".to_vec())
        ]
    );
    let mut conn = db.raw_connection();
    conn.test_transaction::<_, Error, _>(|conn| {
        kv.set_bytes_in(conn, "t", b"\x01\x02", TTL)?;
        assert_eq!(kv.get_bytes_in(conn, "t")?, Some(vec![1, 2]));
        Ok(())
    });
    assert_eq!(kv.get_bytes("t").unwrap(), None);
}

#[test]
fn reading_one_kind_as_the_other_is_an_error_and_leaves_the_entry() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_bytes("b", b"\x00\x01", TTL).unwrap();
    kv.set("j", &json!({"x": 1})).unwrap();

    assert_wrong_type(kv.get("b").unwrap_err(), "b", "bytes", "json");
    assert_wrong_type(kv.get_many(&["j", "b"]).unwrap_err(), "b", "bytes", "json");
    assert_wrong_type(kv.get_del("b").unwrap_err(), "b", "bytes", "json");
    assert_wrong_type(kv.get_touch("b", TTL).unwrap_err(), "b", "bytes", "json");
    assert_wrong_type(kv.incr("b", 1, TTL).unwrap_err(), "b", "bytes", "integer");
    assert_wrong_type(kv.get_bytes("j").unwrap_err(), "j", "json", "bytes");
    assert_wrong_type(
        kv.get_many_bytes(&["b", "j"]).unwrap_err(),
        "j",
        "json",
        "bytes",
    );

    assert_eq!(kv.get_bytes("b").unwrap(), Some(vec![0, 1]));
    assert_eq!(kv.get("j").unwrap(), Some(json!({"x": 1})));
}

#[test]
fn key_operations_work_on_bytes_entries() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_bytes("b", b"v", Duration::from_secs(60)).unwrap();
    assert!(kv.exists("b").unwrap());
    assert!(kv.ttl("b").unwrap().unwrap() <= Duration::from_secs(60));
    assert!(kv.touch("b", Duration::from_secs(3600)).unwrap());
    assert!(kv.ttl("b").unwrap().unwrap() > Duration::from_secs(60));
    assert!(!kv.set_nx("b", &json!(1), TTL).unwrap());
    assert_eq!(kv.get_bytes("b").unwrap(), Some(b"v".to_vec()));
    assert!(kv.delete("b").unwrap());
    assert!(!kv.exists("b").unwrap());
    kv.set_many_bytes(&[("p:1", b"1"), ("p:2", b"2")], TTL)
        .unwrap();
    assert_eq!(kv.delete_prefix("p:").unwrap(), 2);
}

#[test]
fn overwriting_switches_the_kind_both_ways() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("k", &json!([1, 2])).unwrap();
    kv.set_bytes("k", b"raw", TTL).unwrap();
    assert_eq!(kv.get_bytes("k").unwrap(), Some(b"raw".to_vec()));
    kv.set("k", &json!("json again")).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!("json again")));
    assert_eq!(kv.incr("k2", 5, TTL).unwrap(), 5);
    kv.set_bytes("k2", b"x", TTL).unwrap();
    kv.set_many(&[("k2", &json!(7))], TTL).unwrap();
    assert_eq!(kv.incr("k2", 1, TTL).unwrap(), 8);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM cache_entries WHERE num_nonnulls(value, bytes) = 1"),
        2
    );
}

#[test]
fn expired_bytes_read_as_misses_and_cleanup_removes_them() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_bytes("b", b"gone", TTL).unwrap();
    db.expire_all("cache_entries");
    assert_eq!(kv.get_bytes("b").unwrap(), None);
    assert!(!kv.exists("b").unwrap());
    // An expired bytes entry is replaced by a JSON write, an increment or set_nx.
    assert_eq!(kv.incr("b", 2, TTL).unwrap(), 2);
    kv.set_bytes("c", b"gone too", TTL).unwrap();
    db.expire_all("cache_entries");
    assert!(kv.set_nx("c", &json!("new"), TTL).unwrap());
    assert_eq!(kv.get("c").unwrap(), Some(json!("new")));
    kv.set_bytes("d", b"old", TTL).unwrap();
    db.expire_all("cache_entries");
    let report = db.cache.cleanup().unwrap();
    assert_eq!(report.rows_removed(), 3);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 0);
}

#[test]
fn bad_keys_and_ttls_are_rejected_before_anything_is_stored() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    for err in [
        kv.set_bytes("", b"v", TTL).unwrap_err(),
        kv.set_bytes("nul\0", b"v", TTL).unwrap_err(),
        kv.set_bytes("k", b"v", Duration::ZERO).unwrap_err(),
        kv.set_many_bytes(&[("ok", b"v"), ("", b"v")], TTL)
            .unwrap_err(),
        kv.get_bytes("").unwrap_err(),
    ] {
        assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    }
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 0);
}

/// What JSONB does to JSON text (documented in docs/guide.md, "Values: JSON or
/// bytes"), and that bytes keep it as written.
#[test]
fn jsonb_normalises_json_text_and_bytes_keep_it_exactly() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ordered {
        zebra: u8,
        a: u8,
    }
    let db = TestDb::new();
    let kv = db.cache.kv();
    let as_read = |key: &str| serde_json::to_string(&kv.get(key).unwrap().unwrap()).unwrap();

    kv.set("big", &json!(1e16)).unwrap();
    assert_eq!(serde_json::to_string(&json!(1e16)).unwrap(), "1e+16");
    assert_eq!(as_read("big"), "10000000000000000");
    kv.set("zero", &json!(-0.0)).unwrap();
    assert_eq!(serde_json::to_string(&json!(-0.0)).unwrap(), "-0.0");
    assert_eq!(as_read("zero"), "0.0");
    kv.typed::<Ordered>()
        .set("order", &Ordered { zebra: 1, a: 2 })
        .unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM cache_entries \
             WHERE key = 'order' AND value::text = '{\"a\": 2, \"zebra\": 1}'"
        ),
        1
    );

    let text = r#"{"zebra": 1e16, "a": -0.0,  "a": 1.50}"#;
    kv.set_bytes("exact", text.as_bytes(), TTL).unwrap();
    let back = kv.get_bytes("exact").unwrap().unwrap();
    assert_eq!(String::from_utf8(back).unwrap(), text);
}

#[test]
fn containment_queries_see_only_json_entries() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("j", &json!({"plan": "pro"})).unwrap();
    kv.set_bytes("b", br#"{"plan": "pro"}"#, TTL).unwrap();
    let found = kv.find_containing(&json!({"plan": "pro"}), 10).unwrap();
    assert_eq!(found, vec![("j".to_owned(), json!({"plan": "pro"}))]);
}

fn near_db() -> TestDb {
    TestDb::with(|b| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_millis(100))
    })
}

#[test]
fn near_cache_serves_bytes_and_counts_their_weight() {
    let db = near_db();
    wait_current(&db.cache);
    let kv = db.cache.kv();
    let value = Prng(7).bytes(10_000);
    kv.set_bytes("b", &value, TTL).unwrap();
    assert_eq!(kv.get_bytes("b").unwrap().as_deref(), Some(&value[..]));
    let before = kv_stats(&db.cache);
    assert!(before.bytes >= 10_000, "{before:?}");
    let (hits, _) = hits_and_misses(&db.cache, CacheKind::Kv, || {
        assert_eq!(kv.get_bytes("b").unwrap().as_deref(), Some(&value[..]));
    });
    assert_eq!(hits, 1);
    // Held in memory as bytes, still refused as JSON.
    assert_wrong_type(kv.get("b").unwrap_err(), "b", "bytes", "json");
}

#[test]
fn near_cached_bytes_are_evicted_by_every_writer() {
    let db = near_db();
    let other = db.another_manager();
    wait_current(&db.cache);
    let kv = db.cache.kv();
    kv.set_bytes("b", b"old", TTL).unwrap();
    kv.get_bytes("b").unwrap();
    // Another process replaces the bytes: the trigger names the key.
    other.kv().set_bytes("b", b"new", TTL).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(kv.get_bytes("b").unwrap(), Some(b"new".to_vec()));
    // A plain SQL update of the bytes column.
    db.exec("UPDATE cache_entries SET bytes = '\\x01' WHERE key = 'b'");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(kv.get_bytes("b").unwrap(), Some(vec![1]));
    // This process switching the key to JSON.
    kv.set("b", &json!(1)).unwrap();
    assert_wrong_type(kv.get_bytes("b").unwrap_err(), "b", "json", "bytes");
    assert_eq!(kv.get("b").unwrap(), Some(json!(1)));
}
