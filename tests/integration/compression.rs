//! Compression at rest: values over the threshold (1 KiB unless configured) are
//! stored as zstd envelopes, JSON in `packed` and bytes in `bytes` marked
//! `bytes_packed`, and read back as written; small values, and every value with
//! compression off, are stored plain; entries stored plain (before compression, or
//! by another configuration) still read. Checked through SQL on the raw rows.

use crate::common;
use crate::near_support;

use std::time::{Duration, Instant};

use common::TestDb;
use near_support::{assert_held, wait_current, wait_polled_since};
use pgcache::{Cache, CacheKind, Error, LlmPrompt, NearCache};
use serde_json::{json, Value};

const TTL: Duration = Duration::from_secs(600);

/// A JSON document of about `len` bytes of text that reads like a real one: an
/// array of orders, with names, amounts and free text drawn from a seeded sequence.
pub fn document(len: usize) -> Value {
    let words = [
        "invoice",
        "shipped",
        "pending",
        "customer",
        "warehouse",
        "express",
        "refund",
        "priority",
        "Lisbon",
        "Osaka",
        "Toronto",
        "Nairobi",
        "blue",
        "large",
        "gift",
    ];
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut orders = Vec::new();
    while serde_json::to_string(&orders).unwrap().len() < len {
        let n = next();
        let note: Vec<&str> = (0..6)
            .map(|i| words[((n >> (i * 5)) % 15) as usize])
            .collect();
        orders.push(json!({
            "id": n % 1_000_000,
            "customer": format!("customer-{}", n % 977),
            "status": words[(n % 7) as usize],
            "amount_cents": n % 100_000,
            "note": note.join(" "),
        }));
    }
    Value::Array(orders)
}

/// Text of `len` bytes with a prose's redundancy (not one repeated character).
pub fn prose(len: usize) -> String {
    let doc = document(len * 2).to_string();
    doc.chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ')
        .take(len)
        .collect()
}

/// `(value IS NULL, packed IS NULL, bytes_packed, stored payload bytes)` of `key`'s row.
fn stored_form(db: &TestDb, key: &str) -> (bool, bool, bool, i64) {
    let q = |expr: &str| {
        db.count(&format!(
            "SELECT ({expr})::int8 AS n FROM cache_entries WHERE key = '{key}'"
        ))
    };
    (
        q("(value IS NULL)::int") == 1,
        q("(packed IS NULL)::int") == 1,
        q("bytes_packed::int") == 1,
        q("coalesce(octet_length(value::text), octet_length(bytes), octet_length(packed))"),
    )
}

#[test]
fn a_large_json_value_is_stored_compressed_and_reads_back() {
    let db = TestDb::new();
    let doc = document(10_000);
    let text_len = doc.to_string().len() as i64;
    db.cache.kv().set_with_ttl("doc", &doc, TTL).unwrap();
    let (value_null, packed_null, _, size) = stored_form(&db, "doc");
    assert!(value_null && !packed_null, "stored in `packed`, not JSONB");
    assert!(
        size * 2 < text_len,
        "{size} bytes stored for {text_len} of JSON"
    );
    assert_eq!(db.cache.kv().get("doc").unwrap(), Some(doc.clone()));
    assert_eq!(
        db.cache.kv().get_many(&["doc", "missing"]).unwrap(),
        vec![Some(doc.clone()), None]
    );
    // Another process reads it the same.
    assert_eq!(db.another_manager().kv().get("doc").unwrap(), Some(doc));
}

#[test]
fn a_large_bytes_value_is_stored_compressed_and_reads_back_exactly() {
    let db = TestDb::new();
    let bytes = prose(4096).into_bytes();
    db.cache.kv().set_bytes("blob", &bytes, TTL).unwrap();
    let (_, packed_null, bytes_packed, size) = stored_form(&db, "blob");
    assert!(packed_null && bytes_packed, "an envelope in `bytes`");
    assert!(
        size * 2 < bytes.len() as i64,
        "{size} bytes stored for {}",
        bytes.len()
    );
    assert_eq!(
        db.cache.kv().get_bytes("blob").unwrap(),
        Some(bytes.clone())
    );
    assert_eq!(
        db.cache.kv().get_many_bytes(&["blob"]).unwrap(),
        vec![Some(bytes)]
    );
}

#[test]
fn small_values_and_values_that_do_not_shrink_are_stored_plain() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let small = document(900);
    kv.set_with_ttl("small", &small, TTL).unwrap();
    kv.set_bytes("small-bytes", b"tiny", TTL).unwrap();
    // Random bytes: over the threshold, but nothing for zstd to find.
    let noise: Vec<u8> = (0..512)
        .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
        .collect();
    kv.set_bytes("noise", &noise, TTL).unwrap();
    assert!(!stored_form(&db, "small").0, "small JSON stays JSONB");
    assert!(!stored_form(&db, "small-bytes").2);
    assert!(
        !stored_form(&db, "noise").2,
        "incompressible bytes stay plain"
    );
    assert_eq!(kv.get("small").unwrap(), Some(small));
    assert_eq!(
        kv.get_bytes("small-bytes").unwrap().as_deref(),
        Some(&b"tiny"[..])
    );
    assert_eq!(kv.get_bytes("noise").unwrap(), Some(noise));
}

#[test]
fn with_compression_off_large_values_are_stored_plain() {
    let db = TestDb::with(|b| b.compression_threshold(None));
    let doc = document(10_000);
    db.cache.kv().set_with_ttl("doc", &doc, TTL).unwrap();
    db.cache
        .kv()
        .set_bytes("blob", prose(4096).as_bytes(), TTL)
        .unwrap();
    assert!(!stored_form(&db, "doc").0, "JSONB");
    assert!(!stored_form(&db, "blob").2, "plain bytes");
    assert_eq!(db.cache.config().compression_threshold(), None);
}

#[test]
fn a_lower_threshold_compresses_smaller_values() {
    let db = TestDb::with(|b| b.compression_threshold(Some(100)));
    db.cache
        .kv()
        .set_with_ttl("doc", &document(600), TTL)
        .unwrap();
    assert!(!stored_form(&db, "doc").1, "in `packed`");
}

#[test]
fn entries_stored_plain_still_read_with_compression_on() {
    let db = TestDb::new();
    let doc = document(10_000);
    let blob = prose(4096).into_bytes();
    // Written plain by a manager with compression off (as by an older version) ...
    let off = pgcache::CacheManager::new(db.config().compression_threshold(None).build().unwrap())
        .unwrap();
    off.kv().set_with_ttl("doc", &doc, TTL).unwrap();
    off.kv().set_bytes("blob", &blob, TTL).unwrap();
    // ... and straight into the table, as before the migration.
    db.exec(&format!(
        "INSERT INTO cache_entries (key, value, expires_at) \
         VALUES ('raw', '{}'::jsonb, now() + interval '1 hour')",
        doc.to_string().replace('\'', "''")
    ));
    assert!(!stored_form(&db, "doc").0);
    let kv = db.cache.kv();
    assert_eq!(kv.get("doc").unwrap(), Some(doc.clone()));
    assert_eq!(kv.get("raw").unwrap(), Some(doc.clone()));
    assert_eq!(kv.get_bytes("blob").unwrap(), Some(blob));
    // And compressed entries read with compression off: reading needs no setting.
    kv.set_with_ttl("new", &doc, TTL).unwrap();
    assert_eq!(off.kv().get("new").unwrap(), Some(doc));
}

#[test]
fn redis_style_reads_of_compressed_values_open_them() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let doc = document(5000);
    kv.set_with_ttl("a", &doc, TTL).unwrap();
    kv.set_with_ttl("b", &doc, TTL).unwrap();
    assert_eq!(kv.get_touch("a", TTL).unwrap(), Some(doc.clone()));
    assert_eq!(kv.get_del("b").unwrap(), Some(doc.clone()));
    assert_eq!(kv.get("b").unwrap(), None);
    assert!(kv.exists("a").unwrap());
    assert!(!kv.set_nx("a", &json!(1), TTL).unwrap());
    // set_nx over an expired entry stores its own value, compressed or not.
    db.expire_all("cache_entries");
    assert!(kv.set_nx("a", &doc, TTL).unwrap());
    assert!(!stored_form(&db, "a").1, "set_nx compresses too");
    assert_eq!(kv.get("a").unwrap(), Some(doc));
}

#[test]
fn incr_refuses_a_compressed_value_and_leaves_it_as_it_was() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let doc = document(5000);
    kv.set_with_ttl("k", &doc, TTL).unwrap();
    let err = kv.incr("k", 1, TTL).unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "value", .. }),
        "{err}"
    );
    assert_eq!(kv.get("k").unwrap(), Some(doc));
    // Counters themselves are small numbers, never compressed.
    assert_eq!(kv.incr("n", 5, TTL).unwrap(), 5);
    assert_eq!(kv.incr("n", 1, TTL).unwrap(), 6);
}

#[test]
fn find_containing_sees_values_stored_as_jsonb_only() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_with_ttl("small", &json!({"plan": "pro"}), TTL)
        .unwrap();
    let mut large = document(5000);
    large = json!({"plan": "pro", "orders": large});
    kv.set_with_ttl("large", &large, TTL).unwrap();
    let found: Vec<String> = kv
        .find_containing(&json!({"plan": "pro"}), 10)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(found, vec!["small".to_owned()], "as documented");
}

#[test]
fn a_large_llm_response_is_stored_compressed_and_reads_back() {
    let db = TestDb::new();
    let cache = db.cache.llm_response();
    let long = prose(4096);
    let short = "A short answer.".to_owned();
    let (p1, p2) = (
        LlmPrompt::new("explain", "gemini-flash"),
        LlmPrompt::new("briefly", "gemini-flash"),
    );
    cache.set(&p1, &long).unwrap();
    cache.set(&p2, &short).unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM llm_response_cache \
             WHERE response IS NULL AND octet_length(packed) * 2 < 4096"
        ),
        1
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM llm_response_cache WHERE response IS NOT NULL"),
        1
    );
    assert_eq!(cache.get(&p1).unwrap().unwrap().response, long);
    assert_eq!(cache.get(&p2).unwrap().unwrap().response, short);
    assert_eq!(
        cache
            .get_many(&[&p1, &p2])
            .unwrap()
            .into_iter()
            .map(|e| e.unwrap().response)
            .collect::<Vec<_>>(),
        vec![long, short]
    );
}

#[test]
fn the_near_cache_keeps_compressed_entries_decoded_and_hears_of_their_changes() {
    let near = |b: pgcache::CacheConfigBuilder| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_millis(100))
    };
    let db = TestDb::with(near);
    wait_current(&db.cache);
    let kv = db.cache.kv();
    let (old, new) = (document(5000), document(6000));
    kv.set_with_ttl("doc", &old, TTL).unwrap();
    assert_held(&db.cache, CacheKind::Kv, 1, || {
        assert_eq!(kv.get("doc").unwrap(), Some(old.clone()));
    });
    let writer = db.another_manager();
    writer.kv().set_with_ttl("doc", &new, TTL).unwrap();
    // Committed: once the reader has polled, it may not serve the old value.
    wait_polled_since(&db.cache, CacheKind::Kv, Instant::now());
    assert_eq!(kv.get("doc").unwrap(), Some(new));
}

#[test]
fn partitioned_tables_store_and_read_compressed_entries() {
    let db = TestDb::new();
    db.cache.partition_tables(4).unwrap();
    let doc = document(5000);
    let kv = db.cache.kv();
    kv.set_with_ttl("doc", &doc, TTL).unwrap();
    kv.set_bytes("blob", prose(3000).as_bytes(), TTL).unwrap();
    assert!(!stored_form(&db, "doc").1);
    assert!(stored_form(&db, "blob").2);
    assert_eq!(kv.get("doc").unwrap(), Some(doc));
    assert_eq!(kv.get_bytes("blob").unwrap().map(|b| b.len()), Some(3000));
}
