//! The near cache against the real database: served from memory, evicted by every
//! writer (this manager, another manager, plain SQL), bypassed while its channel is
//! not current, and cheap for writers of immutable caches.

mod common;

use std::time::{Duration, Instant};

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::PgConnection;
use pgcache::{Cache, CacheKind, CacheManager, LlmPrompt, NearCache, NearCacheStats};
use serde_json::{json, Value};

/// The staleness bound the tests run with.
const BOUND: Duration = Duration::from_millis(100);

fn near_db() -> TestDb {
    TestDb::with(|b| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache(CacheKind::LlmResponse, Some(NearCache::new()))
            .near_cache_staleness(BOUND)
    })
}

fn near_manager(db: &TestDb) -> CacheManager {
    CacheManager::new(
        db.config()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(BOUND)
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn kv_stats(cache: &CacheManager) -> NearCacheStats {
    cache
        .near_cache_stats()
        .into_iter()
        .find(|s| s.cache == CacheKind::Kv)
        .expect("kv has a near cache")
}

/// Waits until the near cache's channel is current (the listener connected and its
/// heartbeat came back), at most 5 s.
fn wait_current(cache: &CacheManager) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while kv_stats(cache).channel_lag_ms.is_none() {
        assert!(
            Instant::now() < deadline,
            "the near cache never became current"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads `key` twice so the second read can come from memory; returns the value.
fn warm(cache: &CacheManager, key: &str) -> Option<Value> {
    cache.kv().get(key).unwrap();
    cache.kv().get(key).unwrap()
}

#[test]
fn repeated_gets_are_served_from_memory() {
    let db = near_db();
    wait_current(&db.cache);
    db.cache.kv().set("k", &json!({"v": 1})).unwrap();
    assert_eq!(warm(&db.cache, "k"), Some(json!({"v": 1})));
    let before = kv_stats(&db.cache).hits;
    for _ in 0..10 {
        assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!({"v": 1})));
    }
    assert_eq!(kv_stats(&db.cache).hits, before + 10);
}

#[test]
fn this_managers_writes_are_read_back_at_once() {
    let db = near_db();
    wait_current(&db.cache);
    db.cache.kv().set("k", &json!(1)).unwrap();
    warm(&db.cache, "k");
    db.cache.kv().set("k", &json!(2)).unwrap();
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!(2)));
    db.cache.kv().delete("k").unwrap();
    assert_eq!(db.cache.kv().get("k").unwrap(), None);
}

#[test]
fn another_managers_write_is_seen_within_the_bound() {
    let db = near_db();
    let other = near_manager(&db);
    wait_current(&db.cache);
    wait_current(&other);
    db.cache.kv().set("k", &json!("old")).unwrap();
    assert_eq!(warm(&other, "k"), Some(json!("old")));
    db.cache.kv().set("k", &json!("new")).unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(other.kv().get("k").unwrap(), Some(json!("new")));
}

#[test]
fn plain_sql_writers_evict() {
    let db = near_db();
    wait_current(&db.cache);
    let statements = [
        ("UPDATE cache_entries SET value = '\"updated\"' WHERE key = 'k'", Some(json!("updated"))),
        (
            "INSERT INTO cache_entries (key, value, expires_at) VALUES ('k', '\"upserted\"', now() + interval '1 hour') \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            Some(json!("upserted")),
        ),
        ("DELETE FROM cache_entries WHERE key = 'k'", None),
        ("TRUNCATE cache_entries", None),
    ];
    for (sql, expected) in statements {
        db.cache.kv().set("k", &json!("cached")).unwrap();
        assert_eq!(warm(&db.cache, "k"), Some(json!("cached")), "{sql}");
        db.exec(sql);
        std::thread::sleep(BOUND);
        assert_eq!(db.cache.kv().get("k").unwrap(), expected, "{sql}");
    }
}

#[test]
fn a_rolled_back_write_evicts_nothing_wrong_and_a_committed_one_evicts() {
    let db = near_db();
    wait_current(&db.cache);
    db.cache.kv().set("k", &json!("committed")).unwrap();
    let mut conn = db.raw_connection();
    conn.batch_execute("BEGIN").unwrap();
    db.cache
        .kv()
        .set_in(
            &mut conn,
            "k",
            &json!("rolled back"),
            Duration::from_secs(60),
        )
        .unwrap();
    conn.batch_execute("ROLLBACK").unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(warm(&db.cache, "k"), Some(json!("committed")));
    conn.batch_execute("BEGIN").unwrap();
    db.cache
        .kv()
        .set_in(
            &mut conn,
            "k",
            &json!("in transaction"),
            Duration::from_secs(60),
        )
        .unwrap();
    // Until the commit, every reader (this one included) sees the committed value.
    assert_eq!(warm(&db.cache, "k"), Some(json!("committed")));
    conn.batch_execute("COMMIT").unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(
        db.cache.kv().get("k").unwrap(),
        Some(json!("in transaction"))
    );
}

#[test]
fn a_killed_listener_turns_the_near_cache_off_until_it_is_back() {
    let db = near_db();
    wait_current(&db.cache);
    db.cache.kv().set("k", &json!("old")).unwrap();
    warm(&db.cache, "k");
    // Kill the listener, then write while it is gone: no notification can reach
    // this process, and it must not serve the old value.
    db.exec(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'pgcache-test-{}' AND query LIKE '%pg_notify%'",
        db.schema
    ));
    db.exec("UPDATE cache_entries SET value = '\"new\"' WHERE key = 'k'");
    std::thread::sleep(BOUND);
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("new")));
    // Back within a second, serving from memory again.
    let back = Instant::now();
    wait_current(&db.cache);
    assert!(
        back.elapsed() < Duration::from_secs(1),
        "{:?}",
        back.elapsed()
    );
    warm(&db.cache, "k");
    let hits = kv_stats(&db.cache).hits;
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("new")));
    assert_eq!(kv_stats(&db.cache).hits, hits + 1);
}

/// Notifications on this test's channel, received on a plain connection.
struct ChannelSpy(PgConnection);

impl ChannelSpy {
    fn new(db: &TestDb) -> Self {
        let mut conn = db.raw_connection();
        conn.batch_execute(&format!("LISTEN \"pgcache.{}\"", db.schema))
            .unwrap();
        ChannelSpy(conn)
    }

    /// Invalidations (not heartbeats) received so far.
    fn invalidations(&mut self) -> Vec<String> {
        self.0.batch_execute("SELECT 1").unwrap();
        self.0
            .notifications_iter()
            .map(|n| n.unwrap().payload)
            .filter(|p| !p.starts_with("hb "))
            .collect()
    }
}

#[test]
fn immutable_caches_send_no_message_per_set_and_a_batch_sends_one() {
    let db = near_db();
    wait_current(&db.cache);
    let mut spy = ChannelSpy::new(&db);
    let prompt = LlmPrompt::new("q", "p");
    db.cache
        .llm_response()
        .set(&prompt, &"a".to_owned())
        .unwrap();
    db.cache
        .llm_response()
        .set(&prompt, &"a".to_owned())
        .unwrap();
    db.cache.llm_response().get(&prompt).unwrap();
    db.cache.flush_stats().unwrap();
    assert_eq!(
        spy.invalidations(),
        Vec::<String>::new(),
        "same response, hit counts"
    );
    db.cache
        .llm_response()
        .set(&prompt, &"b".to_owned())
        .unwrap();
    let messages = spy.invalidations();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(messages[0].starts_with("llm_response [\""), "{messages:?}");

    let keys: Vec<String> = (0..100).map(|i| format!("key:{i}")).collect();
    let entries: Vec<(&str, &Value)> = keys.iter().map(|k| (k.as_str(), &Value::Null)).collect();
    db.cache
        .kv()
        .set_many(&entries, Duration::from_secs(60))
        .unwrap();
    assert_eq!(spy.invalidations(), Vec::<String>::new(), "first inserts");
    db.cache
        .kv()
        .set_many(&entries, Duration::from_secs(60))
        .unwrap();
    let messages = spy.invalidations();
    assert_eq!(messages.len(), 1, "one message for the batch: {messages:?}");
    assert_eq!(messages[0].matches("key:").count(), 100);
}

#[test]
fn without_a_near_cache_no_trigger_is_installed() {
    let db = TestDb::new();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace s ON s.oid = c.relnamespace \
             WHERE s.nspname = '{}' AND t.tgname LIKE 'pgcache_near_%'",
            db.schema
        )),
        0
    );
}
