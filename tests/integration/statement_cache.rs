//! Every hot key/value statement is prepared once per connection and reused: the
//! library pays PostgreSQL's parse and plan once, not on every call.

use crate::common;

use std::time::Duration;

use common::TestDb;
use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl};
use pgcache::{
    AudioChunk, AudioChunkKey, Cache, CacheKind, EmbeddingKey, LlmPrompt, VectorSearchQuery,
};
use serde_json::json;
use uuid::Uuid;

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

    let prepared = prepared_statements(&db, CacheKind::Kv);
    let statements: Vec<&str> = prepared.iter().map(String::as_str).collect();
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

#[test]
fn kv_redis_style_operations_prepare_one_statement_each() {
    let db = TestDb::with(|b| b.pool_max_size(1));
    let kv = db.cache.kv();
    let ttl = Duration::from_secs(60);
    for round in 0..3 {
        let key = format!("k{round}");
        kv.incr(&key, 1, ttl).unwrap();
        assert!(!kv.set_nx(&key, &json!(1), ttl).unwrap());
        assert!(kv.get_touch(&key, ttl).unwrap().is_some());
        assert!(kv.touch(&key, ttl).unwrap());
        assert!(kv.get_del(&key).unwrap().is_some());
        kv.set_bytes(&key, b"x", ttl).unwrap();
        assert!(kv.get_bytes(&key).unwrap().is_some());
    }
    let statements = prepared_statements(&db, CacheKind::Kv);
    let count = |prefix: &str| {
        statements
            .iter()
            .filter(|s| s.trim_start().starts_with(prefix))
            .count()
    };
    // incr and set_bytes (INSERT), set_nx (WITH), get_touch and touch (UPDATE),
    // get_del (DELETE), get_bytes (SELECT): one each, whatever the round.
    assert_eq!(count("INSERT"), 2, "{statements:#?}");
    assert_eq!(count("WITH"), 1, "{statements:#?}");
    assert_eq!(count("UPDATE"), 2, "{statements:#?}");
    assert_eq!(count("DELETE"), 1, "{statements:#?}");
    assert_eq!(count("SELECT"), 1, "{statements:#?}");
    assert_eq!(statements.len(), 7, "{statements:#?}");
}

/// The statements prepared on the (single) pooled connection that mention `kind`'s
/// table.
fn prepared_statements(db: &TestDb, kind: CacheKind) -> Vec<String> {
    let mut conn = db.cache.connection().unwrap();
    let prepared: Vec<Prepared> = diesel::sql_query(format!(
        "SELECT statement FROM pg_prepared_statements \
         WHERE statement LIKE '%{}%' ORDER BY statement",
        kind.table()
    ))
    .load(&mut *conn)
    .unwrap();
    prepared.into_iter().map(|p| p.statement).collect()
}

/// Runs a typed cache's hot paths with batches of several sizes, then checks that
/// each shape was prepared once: get (`key_hash = $1`), get_many (`= ANY`) and one
/// upsert shared by set and set_many of any size.
fn typed_statements_are_prepared_once<C: Cache>(
    db: &TestDb,
    cache: &C,
    key: impl Fn(usize) -> C::Key,
    value: &C::Value,
) where
    C::Key: Sized,
{
    let ttl = Duration::from_secs(60);
    let mut next = 0;
    for n in [1, 2, 7, 100, 3] {
        let keys: Vec<C::Key> = (next..next + n).map(&key).collect();
        next += n;
        let refs: Vec<&C::Key> = keys.iter().collect();
        let entries: Vec<(&C::Key, &C::Value)> = keys.iter().map(|k| (k, value)).collect();
        cache.set_many(&entries, ttl).unwrap();
        assert!(cache.get_many(&refs).unwrap().iter().all(Option::is_some));
        cache.set(&keys[0], value).unwrap();
        assert!(cache.get(&keys[0]).unwrap().is_some());
        assert!(cache.get(&key(usize::MAX)).unwrap().is_none());
    }
    let statements = prepared_statements(db, C::KIND);
    let count = |prefix: &str| {
        statements
            .iter()
            .filter(|s| s.trim_start().starts_with(prefix))
            .count()
    };
    assert_eq!(count("SELECT"), 2, "{statements:#?}");
    assert_eq!(count("INSERT"), 1, "{statements:#?}");
    assert_eq!(statements.len(), 3, "{statements:#?}");
    assert!(
        statements
            .iter()
            .any(|s| s.replace('"', "").contains("key_hash = $1")),
        "{statements:#?}"
    );
}

#[test]
fn typed_cache_gets_and_sets_prepare_one_statement_per_shape_whatever_the_batch_size() {
    let db = TestDb::with(|b| b.pool_max_size(1));
    typed_statements_are_prepared_once(
        &db,
        &db.cache.llm_response(),
        |n| LlmPrompt::new(format!("prompt {n}"), "gemini-flash"),
        &"answer".to_owned(),
    );
    typed_statements_are_prepared_once(
        &db,
        &db.cache.embedding(),
        |n| EmbeddingKey::new(format!("text {n}"), "model"),
        &vec![0.5; 8],
    );
    typed_statements_are_prepared_once(
        &db,
        &db.cache.audio_chunk(),
        |n| AudioChunkKey::new(format!("text {n}"), "voice", "tts"),
        &AudioChunk::inline(vec![7; 64], "opus"),
    );
    let user = Uuid::new_v4();
    typed_statements_are_prepared_once(
        &db,
        &db.cache.vector_search(),
        |n| VectorSearchQuery::new(user, vec![n as f32, 1.0], 5),
        &json!([{"id": 1}]),
    );
}
