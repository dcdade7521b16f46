//! Encryption at rest: with keys configured, values are sealed (compressed first
//! when large) with the primary key and read with whichever key sealed them; a
//! value the configured keys cannot open (key missing, other material under its
//! id, copied from another entry) reads as a miss with a warning naming the key id;
//! key/value keys can be stored as keyed hashes, with prefix operations refused;
//! LLM responses are sealed too; no key ever shows in `Debug`, messages or logs.
//! Checked through SQL on the raw rows.

use crate::common;
use crate::compression::{document, prose};
use crate::near_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::TestDb;
use near_support::{assert_held, wait_current, wait_polled_since};
use pgcache::{
    AudioChunk, AudioChunkKey, AudioData, Cache, CacheConfig, CacheConfigBuilder, CacheKind,
    EmbeddingKey, Error, LlmPrompt, NearCache, VectorSearchQuery,
};
use serde_json::json;

const TTL: Duration = Duration::from_secs(600);

/// Two keys whose bytes are easy to spot: 0xA7 (167) and 0xB3 (179) repeated.
const K1: [u8; 32] = [0xA7; 32];
const K2: [u8; 32] = [0xB3; 32];
/// How `K1`'s bytes read when printed as numbers (`Debug` of the array): a lone
/// "167" may be any number in a message (a schema name's digits, a process id).
const KEY_BYTES_SHOWN: &str = "167, 167";
/// `K1`'s bytes in hexadecimal.
const KEY_HEX_SHOWN: &str = "a7a7a7a7";

fn sealed(b: CacheConfigBuilder) -> CacheConfigBuilder {
    b.encryption_key("k1", K1)
}

fn hashed(b: CacheConfigBuilder) -> CacheConfigBuilder {
    sealed(b).hash_kv_keys(Some("k1".to_owned()))
}

/// A manager on `db`'s schema with `tweak` applied.
fn manager(
    db: &TestDb,
    tweak: impl FnOnce(CacheConfigBuilder) -> CacheConfigBuilder,
) -> pgcache::CacheManager {
    pgcache::CacheManager::new(tweak(db.config()).build().unwrap()).unwrap()
}

/// Rows of `table` holding `needle` (ASCII, no quote) in a text column or among
/// the bytes of a binary one.
fn rows_containing(db: &TestDb, table: &str, needle: &str) -> i64 {
    let (text, bytes) = match table {
        "cache_entries" => (
            "key || coalesce(value::text, '')",
            "coalesce(packed, bytes, '')",
        ),
        "llm_response_cache" => (
            "provider || coalesce(model, '') || coalesce(response, '')",
            "coalesce(packed, '')",
        ),
        "vector_search_cache" => (
            "coalesce(filters::text, '') || coalesce(results::text, '')",
            "coalesce(packed, '')",
        ),
        other => panic!("no columns known for {other}"),
    };
    db.count(&format!(
        "SELECT count(*) AS n FROM {table} WHERE strpos({text}, '{needle}') > 0 \
         OR position(convert_to('{needle}', 'UTF8') IN {bytes}) > 0"
    ))
}

/// The id (one digit) of the key `key`'s JSON value is sealed with, from its
/// envelope: the byte after the flags and the id's length.
fn sealed_with(db: &TestDb, key: &str) -> i64 {
    db.count(&format!(
        "SELECT (get_byte(packed, 2) - ascii('0'))::int8 AS n FROM cache_entries \
         WHERE key = '{key}' AND get_byte(packed, 1) = 1"
    ))
}

/// Warnings logged on this thread while `run` runs.
fn warnings_during<T>(run: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::default());
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        // No timestamps: their digits could pass for a key's bytes.
        .without_time()
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, run);
    let logged = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    (out, logged)
}

#[test]
fn sealed_entries_reveal_neither_the_value_nor_the_key_text() {
    let secret = "ssn-078-05-1120";
    let write = |db: &TestDb| {
        let kv = db.cache.kv();
        kv.set_with_ttl("user:ada@example.com", &json!({"ssn": secret}), TTL)
            .unwrap();
        let mut doc = document(4000);
        doc[0]["note"] = json!(secret);
        kv.set_with_ttl("user:ada@example.com:orders", &doc, TTL)
            .unwrap();
        kv.set_bytes("user:ada@example.com:raw", secret.as_bytes(), TTL)
            .unwrap();
    };
    // The check finds both in a table written plain ...
    let plain = TestDb::with(|b| b.compression_threshold(None));
    write(&plain);
    assert_eq!(rows_containing(&plain, "cache_entries", secret), 3);
    assert_eq!(rows_containing(&plain, "cache_entries", "ada@example"), 3);
    // ... and neither with it.
    let db = TestDb::with(hashed);
    write(&db);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 3);
    assert_eq!(rows_containing(&db, "cache_entries", secret), 0);
    assert_eq!(rows_containing(&db, "cache_entries", "ada@example"), 0);
    let kv = db.cache.kv();
    assert_eq!(
        kv.get("user:ada@example.com").unwrap(),
        Some(json!({"ssn": secret}))
    );
    assert_eq!(
        kv.get_bytes("user:ada@example.com:raw").unwrap().as_deref(),
        Some(secret.as_bytes())
    );
}

#[test]
fn a_rotated_key_still_reads_old_entries_and_new_writes_use_the_new_key() {
    let db = TestDb::with(|b| b.encryption_key("1", K1));
    db.cache
        .kv()
        .set_with_ttl("old", &json!("before"), TTL)
        .unwrap();
    db.cache
        .kv()
        .set_bytes("old-bytes", b"before", TTL)
        .unwrap();
    assert_eq!(sealed_with(&db, "old"), 1);
    // Rotation: the new key first, the old one kept for reading.
    let rotated = manager(&db, |b| b.encryption_key("2", K2).encryption_key("1", K1));
    assert_eq!(rotated.config().encryption_key_ids(), vec!["2", "1"]);
    assert_eq!(rotated.kv().get("old").unwrap(), Some(json!("before")));
    assert_eq!(
        rotated.kv().get_bytes("old-bytes").unwrap().as_deref(),
        Some(&b"before"[..])
    );
    rotated
        .kv()
        .set_with_ttl("new", &json!("after"), TTL)
        .unwrap();
    rotated
        .kv()
        .set_with_ttl("old", &json!("rewritten"), TTL)
        .unwrap();
    assert_eq!(sealed_with(&db, "new"), 2);
    assert_eq!(sealed_with(&db, "old"), 2, "an overwrite is sealed anew");
    // Once key 1 is retired, what it sealed is gone; key 2's entries read.
    let retired = manager(&db, |b| b.encryption_key("2", K2));
    assert_eq!(retired.kv().get("old").unwrap(), Some(json!("rewritten")));
    assert_eq!(retired.kv().get_bytes("old-bytes").unwrap(), None);
}

#[test]
fn an_entry_sealed_with_a_missing_key_reads_as_a_miss_with_a_warning() {
    let db = TestDb::with(sealed);
    db.cache.kv().set_with_ttl("k", &json!("v"), TTL).unwrap();
    db.cache
        .kv()
        .set_with_ttl("big", &document(5000), TTL)
        .unwrap();
    let other = manager(&db, |b| b.encryption_key("k2", K2));
    let (found, logged) = warnings_during(|| other.kv().get_many(&["k", "big"]).unwrap());
    assert_eq!(found, vec![None, None]);
    assert!(logged.contains("k1"), "names the key id: {logged}");
    assert!(logged.contains("miss"), "{logged}");
    let none = manager(&db, |b| b);
    let (found, logged) = warnings_during(|| none.kv().get("k").unwrap());
    assert_eq!(found, None);
    assert!(
        logged.contains("no encryption keys are configured"),
        "{logged}"
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(K1);
    assert!(
        !logged.contains(&encoded)
            && !logged.contains(KEY_BYTES_SHOWN)
            && !logged.to_lowercase().contains(KEY_HEX_SHOWN),
        "{logged}"
    );
}

#[test]
fn a_wrong_key_under_the_same_id_reads_as_a_miss() {
    let db = TestDb::with(sealed);
    db.cache.kv().set_with_ttl("k", &json!("v"), TTL).unwrap();
    db.cache.kv().set_bytes("b", b"bytes", TTL).unwrap();
    let impostor = manager(&db, |b| b.encryption_key("k1", K2));
    let (found, logged) = warnings_during(|| {
        (
            impostor.kv().get("k").unwrap(),
            impostor.kv().get_bytes("b").unwrap(),
        )
    });
    assert_eq!(found, (None, None));
    assert!(logged.contains("does not open it"), "{logged}");
}

#[test]
fn a_sealed_value_copied_to_another_key_does_not_open() {
    let db = TestDb::with(sealed);
    let kv = db.cache.kv();
    kv.set_with_ttl("alice", &json!({"balance": 100}), TTL)
        .unwrap();
    kv.set_with_ttl("mallory", &json!({"balance": 0}), TTL)
        .unwrap();
    kv.set_bytes("alice-b", b"alice's", TTL).unwrap();
    kv.set_bytes("mallory-b", b"mallory's", TTL).unwrap();
    db.exec(
        "UPDATE cache_entries SET packed = (SELECT packed FROM cache_entries WHERE key = 'alice') \
         WHERE key = 'mallory'; \
         UPDATE cache_entries SET bytes = (SELECT bytes FROM cache_entries WHERE key = 'alice-b') \
         WHERE key = 'mallory-b'",
    );
    assert_eq!(kv.get("mallory").unwrap(), None);
    assert_eq!(kv.get_bytes("mallory-b").unwrap(), None);
    assert_eq!(kv.get("alice").unwrap(), Some(json!({"balance": 100})));
}

#[test]
fn hashed_keys_serve_every_key_operation_and_hide_the_key_text() {
    let db = TestDb::with(hashed);
    let kv = db.cache.kv();
    kv.set_with_ttl("user:1", &json!("one"), TTL).unwrap();
    kv.set_many(
        &[("user:2", &json!("two")), ("user:3", &json!("three"))],
        TTL,
    )
    .unwrap();
    assert_eq!(kv.get("user:1").unwrap(), Some(json!("one")));
    assert_eq!(
        kv.get_many(&["user:3", "user:9", "user:2"]).unwrap(),
        vec![Some(json!("three")), None, Some(json!("two"))]
    );
    assert!(kv.exists("user:2").unwrap());
    assert!(kv.ttl("user:2").unwrap().is_some());
    assert!(kv.touch("user:2", TTL).unwrap());
    assert_eq!(kv.get_touch("user:2", TTL).unwrap(), Some(json!("two")));
    assert_eq!(kv.incr("counter", 2, TTL).unwrap(), 2);
    assert_eq!(kv.incr("counter", 3, TTL).unwrap(), 5);
    assert!(kv.set_nx("lock", &json!(1), TTL).unwrap());
    assert!(!kv.set_nx("lock", &json!(2), TTL).unwrap());
    assert_eq!(kv.get_del("user:3").unwrap(), Some(json!("three")));
    assert!(kv.delete("user:1").unwrap());
    assert_eq!(kv.get("user:1").unwrap(), None);
    kv.set_bytes("bytes", b"raw", TTL).unwrap();
    assert!(matches!(
        kv.get("bytes").unwrap_err(),
        Error::WrongType { ref key, .. } if key == "bytes"
    ));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM cache_entries WHERE key ~ '^[0-9a-f]{64}$'"),
        db.count("SELECT count(*) AS n FROM cache_entries")
    );
    for text in ["user", "counter", "lock", "bytes"] {
        assert_eq!(rows_containing(&db, "cache_entries", text), 0, "{text}");
    }
    // Another process with the same keys finds them.
    assert_eq!(
        manager(&db, hashed).kv().get("user:2").unwrap(),
        Some(json!("two"))
    );
}

#[test]
fn prefix_operations_are_refused_with_hashed_keys() {
    let db = TestDb::with(hashed);
    let kv = db.cache.kv();
    kv.set_with_ttl("user:1", &json!(1), TTL).unwrap();
    let refused = |err: Error, operation: &str| match err {
        Error::Unsupported {
            operation: op,
            reason,
        } => {
            assert_eq!(op, operation);
            assert!(reason.contains("keyed hashes"), "{reason}");
        }
        other => panic!("expected Unsupported, got {other}"),
    };
    refused(kv.delete_prefix("user:").unwrap_err(), "delete_prefix");
    let mut conn = db.raw_connection();
    refused(
        kv.delete_prefix_in(&mut conn, "user:").unwrap_err(),
        "delete_prefix",
    );
    refused(
        kv.find_containing(&json!(1), 10).unwrap_err(),
        "find_containing",
    );
    assert_eq!(kv.get("user:1").unwrap(), Some(json!(1)), "nothing deleted");
    // Sealed values without hashed keys: the containment query alone is refused.
    let sealed_only = TestDb::with(sealed);
    assert!(matches!(
        sealed_only
            .cache
            .kv()
            .find_containing(&json!(1), 10)
            .unwrap_err(),
        Error::Unsupported {
            operation: "find_containing",
            ..
        }
    ));
    assert_eq!(sealed_only.cache.kv().delete_prefix("user:").unwrap(), 0);
}

#[test]
fn llm_responses_are_sealed_and_prompts_never_stored() {
    let db = TestDb::with(sealed);
    let cache = db.cache.llm_response();
    let prompt = LlmPrompt::new("my card number is 4111-1111", "gemini-flash");
    let long = LlmPrompt::new("write an essay", "gemini-flash");
    let essay = prose(4096);
    cache
        .set(&prompt, &"Never share 4111-1111 with anyone.".to_owned())
        .unwrap();
    cache.set(&long, &essay).unwrap();
    assert_eq!(
        db.count("SELECT count(*) AS n FROM llm_response_cache WHERE response IS NULL AND packed IS NOT NULL"),
        2
    );
    assert_eq!(rows_containing(&db, "llm_response_cache", "4111"), 0);
    assert_eq!(rows_containing(&db, "llm_response_cache", "card"), 0);
    assert_eq!(rows_containing(&db, "llm_response_cache", &essay[..40]), 0);
    let essay_stored =
        db.count("SELECT max(octet_length(packed))::int8 AS n FROM llm_response_cache");
    assert!(
        essay_stored * 2 < 4096,
        "compressed, then sealed: {essay_stored} B"
    );
    assert_eq!(
        cache.get(&prompt).unwrap().unwrap().response,
        "Never share 4111-1111 with anyone."
    );
    assert_eq!(cache.get(&long).unwrap().unwrap().response, essay);
    let stranger = manager(&db, |b| b.encryption_key("k1", K2));
    assert!(stranger.llm_response().get(&prompt).unwrap().is_none());
}

#[test]
fn inline_audio_is_sealed_and_a_storage_path_is_not() {
    let db = TestDb::with(sealed);
    let audio = db.cache.audio_chunk();
    let (spoken, elsewhere) = (
        AudioChunkKey::new("your PIN is 4321", "voice-1", "xtts"),
        AudioChunkKey::new("welcome back", "voice-1", "xtts"),
    );
    let speech = b"RIFF-speech-samples-4321".to_vec();
    audio
        .set(&spoken, &AudioChunk::inline(speech.clone(), "wav"))
        .unwrap();
    audio
        .set(
            &elsewhere,
            &AudioChunk::stored("s3://bucket/welcome.wav", 9000, "wav"),
        )
        .unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM audio_chunk_cache WHERE audio_data IS NULL \
             AND packed IS NOT NULL AND position('speech'::bytea IN packed) = 0"
        ),
        1
    );
    let hit = audio.get(&spoken).unwrap().unwrap();
    assert_eq!(hit.chunk.data, AudioData::Inline(speech.clone()));
    assert_eq!(hit.chunk.byte_size(), speech.len() as u64);
    assert!(matches!(
        audio.get(&elsewhere).unwrap().unwrap().chunk.data,
        AudioData::Stored { .. }
    ));
    let stranger = manager(&db, |b| b.encryption_key("k1", K2));
    assert!(stranger.audio_chunk().get(&spoken).unwrap().is_none());
}

#[test]
fn embeddings_and_vector_searches_are_sealed() {
    let db = TestDb::with(sealed);
    let key = EmbeddingKey::new("ada's diagnosis", "text-embedding-3-small");
    let vector = vec![0.25_f32, -1.5, 3.0];
    db.cache.embedding().set(&key, &vector).unwrap();
    let user = uuid::Uuid::new_v4();
    let query = VectorSearchQuery::new(user, vector.clone(), 3)
        .with_filters(json!({"patient": "ada@example.com"}));
    let results = json!([{"title": "oncology-report-17"}]);
    db.cache.vector_search().set(&query, &results).unwrap();
    assert_eq!(
        db.count("SELECT count(*) AS n FROM embedding_cache WHERE embedding IS NULL AND packed IS NOT NULL"),
        1
    );
    // The vector's bytes (0.25 is 00 00 80 3e) are nowhere in the row.
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM embedding_cache \
             WHERE position('\\x0000803e'::bytea IN packed) > 0"
        ),
        0
    );
    assert_eq!(
        rows_containing(&db, "vector_search_cache", "ada@example"),
        0
    );
    assert_eq!(rows_containing(&db, "vector_search_cache", "oncology"), 0);
    assert_eq!(
        db.cache.embedding().get(&key).unwrap().unwrap().embedding,
        vector
    );
    let hit = db.cache.vector_search().get(&query).unwrap().unwrap();
    assert_eq!(hit.results, results);
    assert_eq!(hit.filters, json!({"patient": "ada@example.com"}));
    let stranger = manager(&db, |b| b.encryption_key("k1", K2));
    assert!(stranger.embedding().get(&key).unwrap().is_none());
    assert!(stranger.vector_search().get(&query).unwrap().is_none());
    // Without encryption they stay plain, as before.
    let plain = TestDb::new();
    plain.cache.embedding().set(&key, &vector).unwrap();
    plain.cache.vector_search().set(&query, &results).unwrap();
    assert_eq!(
        rows_containing(&plain, "vector_search_cache", "oncology"),
        1
    );
    assert_eq!(
        plain.count("SELECT count(*) AS n FROM embedding_cache WHERE packed IS NULL"),
        1
    );
}

#[test]
fn the_near_cache_serves_sealed_entries_and_hears_of_their_changes() {
    let near = |b: CacheConfigBuilder| {
        hashed(b)
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_millis(100))
    };
    let db = TestDb::with(near);
    wait_current(&db.cache);
    let kv = db.cache.kv();
    kv.set_with_ttl("k", &json!("old"), TTL).unwrap();
    assert_held(&db.cache, CacheKind::Kv, 1, || {
        assert_eq!(kv.get("k").unwrap(), Some(json!("old")));
    });
    let writer = manager(&db, hashed);
    writer.kv().set_with_ttl("k", &json!("new"), TTL).unwrap();
    // Committed: once the reader has polled, it may not serve the old value.
    wait_polled_since(&db.cache, CacheKind::Kv, Instant::now());
    assert_eq!(kv.get("k").unwrap(), Some(json!("new")));
}

#[test]
fn no_key_material_shows_in_debug_or_errors() {
    let encoded = base64::engine::general_purpose::STANDARD.encode(K1);
    let builder = CacheConfig::builder()
        .encryption_key("k1", K1)
        .hash_kv_keys(Some("k1".to_owned()));
    let config = builder.clone().build().unwrap();
    let from_env = CacheConfigBuilder::from_vars([(
        "PGCACHE_ENCRYPTION_KEYS",
        format!(
            "k2:{},k1:{encoded}",
            base64::engine::general_purpose::STANDARD.encode(K2)
        ),
    )])
    .unwrap();
    assert_eq!(
        from_env.clone().build().unwrap().encryption_key_ids(),
        vec!["k2", "k1"]
    );
    for shown in [
        format!("{builder:?}"),
        format!("{config:?}"),
        format!("{from_env:?}"),
    ] {
        assert!(shown.contains("k1"), "the ids show: {shown}");
        assert!(
            !shown.contains(KEY_BYTES_SHOWN)
                && !shown.to_lowercase().contains(KEY_HEX_SHOWN)
                && !shown.contains(&encoded),
            "{shown}"
        );
        assert!(!shown.contains("179, 179"), "{shown}");
    }
    // A bad key is named by its id; the text of the variable is never shown.
    let short = base64::engine::general_purpose::STANDARD.encode([0xA7; 16]);
    let err = CacheConfig::from_vars([("PGCACHE_ENCRYPTION_KEYS", format!("short:{short}"))])
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("PGCACHE_ENCRYPTION_KEYS") && message.contains("short"),
        "{message}"
    );
    assert!(!message.contains(&short), "{message}");
    let err = CacheConfig::from_vars([("PGCACHE_ENCRYPTION_KEYS", "k1:not*base64")]).unwrap_err();
    assert!(!err.to_string().contains("not*base64"), "{err}");
    let err = CacheConfig::builder()
        .encryption_key("k1", K1)
        .hash_kv_keys(Some("k9".to_owned()))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("hash_kv_keys"), "{err}");
}
