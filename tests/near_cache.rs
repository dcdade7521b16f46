//! The near cache against the real database: served from memory, evicted by every
//! writer (this manager, another manager, plain SQL), bypassed while its poller is
//! not current, and silent for writers of immutable caches.

mod common;
mod near_support;
mod proxy;

use near_support::{assert_held, hits_and_misses, wait_current, wait_polled_since};
use std::time::{Duration, Instant};

use common::TestDb;
use diesel::connection::SimpleConnection;
use pgcache::{Cache, CacheKind, CacheManager, LlmPrompt, NearCache};
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
            .near_cache(CacheKind::LlmResponse, Some(NearCache::new()))
            .near_cache_staleness(BOUND)
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// A near-cached manager and another on the same tables (another process), both
/// current.
fn two_managers() -> (TestDb, CacheManager) {
    let db = near_db();
    let other = near_manager(&db);
    wait_current(&db.cache);
    wait_current(&other);
    (db, other)
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
    let (hits, _) = hits_and_misses(&db.cache, CacheKind::Kv, || {
        for _ in 0..10 {
            assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!({"v": 1})));
        }
    });
    assert_eq!(hits, 10);
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
    let (db, other) = two_managers();
    db.cache.kv().set("k", &json!("old")).unwrap();
    assert_eq!(warm(&other, "k"), Some(json!("old")));
    db.cache.kv().set("k", &json!("new")).unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(other.kv().get("k").unwrap(), Some(json!("new")));
}

#[test]
fn a_batch_read_fills_the_near_cache_and_a_later_write_evicts_what_it_filled() {
    let db = near_db();
    wait_current(&db.cache);
    let kv = db.cache.kv();
    kv.set("a", &json!(1)).unwrap();
    kv.set("b", &json!(2)).unwrap();
    let asked = ["a", "missing", "a", "b"];
    let expected = vec![Some(json!(1)), None, Some(json!(1)), Some(json!(2))];
    assert_eq!(kv.get_many(&asked).unwrap(), expected);
    // The next batch and a single get find them in memory; a miss is never kept.
    let (hits, misses) = hits_and_misses(&db.cache, CacheKind::Kv, || {
        assert_eq!(kv.get_many(&asked).unwrap(), expected);
        assert_eq!(kv.get("b").unwrap(), Some(json!(2)));
    });
    assert_eq!((hits, misses), (4, 1));
    // Another program's update evicts what the batch put there.
    db.exec("UPDATE cache_entries SET value = '3' WHERE key = 'a'");
    std::thread::sleep(BOUND);
    assert_eq!(
        kv.get_many(&["a", "b"]).unwrap(),
        vec![Some(json!(3)), Some(json!(2))]
    );
}

#[test]
fn a_typed_batch_read_fills_the_near_cache() {
    let db = near_db();
    wait_current(&db.cache);
    let llm = db.cache.llm_response();
    let (q, r) = (LlmPrompt::new("q", "p"), LlmPrompt::new("r", "p"));
    llm.set(&q, &"answer".to_owned()).unwrap();
    let responses = || -> Vec<Option<String>> {
        llm.get_many(&[&q, &r])
            .unwrap()
            .into_iter()
            .map(|found| found.map(|entry| entry.response))
            .collect()
    };
    assert_eq!(responses(), vec![Some("answer".to_owned()), None]);
    let (hits, _) = hits_and_misses(&db.cache, CacheKind::LlmResponse, || {
        assert_eq!(responses(), vec![Some("answer".to_owned()), None]);
    });
    assert_eq!(hits, 1);
}

#[test]
fn every_kv_update_another_manager_makes_is_seen_within_the_bound() {
    // The writer's updates stamp their rows (no trigger); each kind must evict.
    let (db, reader) = two_managers();
    let kv = db.cache.kv();
    let ttl = Duration::from_secs(600);
    type Update<'a> = Box<dyn Fn() + 'a>;
    let updates: Vec<(&str, Update<'_>, Option<Value>)> = vec![
        (
            "set",
            Box::new(|| kv.set("k", &json!(5)).unwrap()),
            Some(json!(5)),
        ),
        (
            "incr",
            Box::new(|| assert_eq!(kv.incr("k", 1, ttl).unwrap(), 6)),
            Some(json!(6)),
        ),
        (
            "touch to a shorter TTL",
            Box::new(|| assert!(kv.touch("k", Duration::from_millis(1)).unwrap())),
            None,
        ),
        (
            "get_touch to a shorter TTL",
            Box::new(|| drop(kv.get_touch("k", Duration::from_millis(1)).unwrap())),
            None,
        ),
        (
            "set_many",
            Box::new(|| {
                kv.set_many(&[("k", &json!(7)), ("other", &json!(0))], ttl)
                    .unwrap()
            }),
            Some(json!(7)),
        ),
    ];
    for (what, update, expected) in updates {
        kv.set("k", &json!(5)).unwrap();
        std::thread::sleep(BOUND);
        assert_eq!(warm(&reader, "k"), Some(json!(5)), "{what}");
        update();
        // The entries touched to 1 ms have expired by now, whatever the near cache
        // held: only an eviction makes the reader miss.
        std::thread::sleep(BOUND + Duration::from_millis(20));
        assert_eq!(reader.kv().get("k").unwrap(), expected, "{what}");
    }
}

#[test]
fn a_callers_own_update_on_a_cache_connection_evicts() {
    let (db, reader) = two_managers();
    db.cache.kv().set("k", &json!("cached")).unwrap();
    assert_eq!(warm(&reader, "k"), Some(json!("cached")));
    // The cache's own connections skip the trigger for what they stamp themselves;
    // one handed to the caller does not.
    db.cache
        .connection()
        .unwrap()
        .batch_execute("UPDATE cache_entries SET value = '\"mine\"' WHERE key = 'k'")
        .unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(reader.kv().get("k").unwrap(), Some(json!("mine")));
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
fn an_update_of_a_key_itself_evicts_the_old_key_in_other_processes() {
    let (db, reader) = two_managers();
    db.cache.kv().set("k", &json!("old")).unwrap();
    assert_held(&reader, CacheKind::Kv, 1, || {
        assert_eq!(reader.kv().get("k").unwrap(), Some(json!("old")));
    });
    db.exec("UPDATE cache_entries SET key = 'other' WHERE key = 'k'");
    // Committed: once the reader has polled, it may not serve `k` from memory.
    wait_polled_since(&reader, CacheKind::Kv, Instant::now());
    let (_, misses) = hits_and_misses(&reader, CacheKind::Kv, || {
        assert_eq!(reader.kv().get("k").unwrap(), None);
    });
    assert_eq!(misses, 1, "read through the near cache");
    assert_eq!(reader.kv().get("other").unwrap(), Some(json!("old")));
}

#[test]
fn an_update_of_a_typed_entrys_digest_evicts_it_in_other_processes() {
    let (db, reader) = two_managers();
    let prompt = LlmPrompt::new("q", "p");
    let response = || {
        reader
            .llm_response()
            .get(&prompt)
            .unwrap()
            .map(|r| r.response)
    };
    db.cache
        .llm_response()
        .set(&prompt, &"a".to_owned())
        .unwrap();
    assert_held(&reader, CacheKind::LlmResponse, 1, || {
        assert_eq!(response(), Some("a".to_owned()));
    });
    db.exec("UPDATE llm_response_cache SET key_hash = sha256(key_hash)");
    wait_polled_since(&reader, CacheKind::LlmResponse, Instant::now());
    let (_, misses) = hits_and_misses(&reader, CacheKind::LlmResponse, || {
        assert_eq!(response(), None);
    });
    assert_eq!(misses, 1, "read through the near cache");
}

#[test]
fn a_writer_with_another_search_path_evicts() {
    let db = near_db();
    wait_current(&db.cache);
    db.cache.kv().set("k", &json!("old")).unwrap();
    assert_eq!(warm(&db.cache, "k"), Some(json!("old")));
    // A connection on the default search path, naming the table by its schema.
    let mut conn = {
        use diesel::Connection;
        diesel::PgConnection::establish(&common::database_url()).unwrap()
    };
    conn.batch_execute(&format!(
        "UPDATE \"{}\".cache_entries SET value = '\"new\"' WHERE key = 'k'",
        db.schema
    ))
    .unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("new")));
}

#[test]
fn a_rolled_back_write_evicts_nothing_wrong_and_a_committed_one_evicts() {
    let db = near_db();
    wait_current(&db.cache);
    db.cache.kv().set("k", &json!("committed")).unwrap();
    let mut conn = db.raw_connection();
    let set_in = |conn: &mut diesel::PgConnection, value: Value| {
        db.cache
            .kv()
            .set_in(conn, "k", &value, Duration::from_secs(60))
            .unwrap();
    };
    conn.batch_execute("BEGIN").unwrap();
    set_in(&mut conn, json!("rolled back"));
    conn.batch_execute("ROLLBACK").unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(warm(&db.cache, "k"), Some(json!("committed")));
    conn.batch_execute("BEGIN").unwrap();
    set_in(&mut conn, json!("in transaction"));
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
    // Kill the poller, then write while it is gone: no change can reach this
    // process, and it must not serve the old value.
    db.exec(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'pgcache-test-{}' AND query LIKE '%pg_current_snapshot%'",
        db.schema
    ));
    db.exec("UPDATE cache_entries SET value = '\"new\"' WHERE key = 'k'");
    std::thread::sleep(BOUND);
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("new")));
    // Back within the recovery bound, serving from memory again.
    let back = Instant::now();
    wait_current(&db.cache);
    let back = back.elapsed();
    let limit = near_support::recovery_limit(&common::database_url());
    assert!(back < limit, "back after {back:?}, limit {limit:?}");
    warm(&db.cache, "k");
    let (hits, _) = hits_and_misses(&db.cache, CacheKind::Kv, || {
        assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("new")));
    });
    assert_eq!(hits, 1);
}

/// Changes logged for the near caches: the change log's rows, taken out of the log
/// (the pollers then miss them, which these tests do not look at), and the rows the
/// cache's own updates stamped, one change per table and transaction.
struct ChangeLog<'a> {
    db: &'a TestDb,
    /// The newest stamp already reported.
    stamped: i64,
}

#[derive(diesel::QueryableByName)]
struct Change {
    #[diesel(sql_type = diesel::sql_types::Text)]
    cache_name: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    stamp: i64,
}

impl<'a> ChangeLog<'a> {
    fn new(db: &'a TestDb) -> Self {
        let mut log = ChangeLog { db, stamped: 0 };
        log.changes();
        log
    }

    /// The changes logged since the last call: the cache and how many keys (-1:
    /// all of them).
    fn changes(&mut self) -> Vec<(String, i64)> {
        use diesel::RunQueryDsl;
        let mut conn = self.db.raw_connection();
        let mut changes: Vec<Change> = diesel::sql_query(
            "DELETE FROM cache_changes \
             RETURNING cache_name, coalesce(cardinality(keys), -1)::int8 AS keys, 0::int8 AS stamp",
        )
        .load(&mut conn)
        .unwrap();
        let stamped: Vec<Change> = diesel::sql_query(
            "SELECT cache_name, count(*) AS keys, changed_xid AS stamp FROM ( \
               SELECT 'kv' AS cache_name, changed_xid FROM cache_entries \
               UNION ALL SELECT 'embedding', changed_xid FROM embedding_cache \
               UNION ALL SELECT 'vector_search', changed_xid FROM vector_search_cache \
               UNION ALL SELECT 'llm_response', changed_xid FROM llm_response_cache \
               UNION ALL SELECT 'audio_chunk', changed_xid FROM audio_chunk_cache) s \
             WHERE changed_xid > $1 GROUP BY cache_name, changed_xid ORDER BY changed_xid",
        )
        .bind::<diesel::sql_types::BigInt, _>(self.stamped)
        .load(&mut conn)
        .unwrap();
        self.stamped = stamped
            .iter()
            .map(|c| c.stamp)
            .max()
            .unwrap_or(self.stamped);
        changes.extend(stamped);
        changes
            .into_iter()
            .map(|c| (c.cache_name, c.keys))
            .collect()
    }
}

#[test]
fn immutable_caches_log_nothing_per_set_and_a_batch_logs_one_change() {
    let db = near_db();
    wait_current(&db.cache);
    let mut log = ChangeLog::new(&db);
    let llm = db.cache.llm_response();
    let prompt = LlmPrompt::new("q", "p");
    llm.set(&prompt, &"a".to_owned()).unwrap();
    llm.set(&prompt, &"a".to_owned()).unwrap();
    llm.get(&prompt).unwrap();
    db.cache.flush_stats().unwrap();
    assert_eq!(log.changes(), vec![], "same response, hit counts");
    llm.set(&prompt, &"b".to_owned()).unwrap();
    assert_eq!(log.changes(), vec![("llm_response".to_owned(), 1)]);

    let keys: Vec<String> = (0..100).map(|i| format!("key:{i}")).collect();
    let entries = |value: &'static Value| -> Vec<(&str, &Value)> {
        keys.iter().map(|k| (k.as_str(), value)).collect()
    };
    let ttl = Duration::from_secs(60);
    db.cache.kv().set_many(&entries(&Value::Null), ttl).unwrap();
    assert_eq!(log.changes(), vec![], "first inserts");
    // The key/value cache's own updates stamp the rows they update (cheaper for
    // writers than the trigger), without looking at the old row: every key updated
    // is named, changed or not. Other writers go through the trigger, which names
    // only what changed.
    db.cache.kv().set_many(&entries(&Value::Null), ttl).unwrap();
    assert_eq!(
        log.changes(),
        vec![("kv".to_owned(), 100)],
        "the same values, by this manager"
    );
    db.exec(
        "INSERT INTO cache_entries (key, value, expires_at) \
         SELECT 'key:' || i, 'null', now() + interval '2 minutes' FROM generate_series(0, 99) i \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
    );
    assert_eq!(
        log.changes(),
        vec![],
        "the same values, expiring later, by another writer"
    );
    static TRUE: Value = Value::Bool(true);
    db.cache.kv().set_many(&entries(&TRUE), ttl).unwrap();
    assert_eq!(
        log.changes(),
        vec![("kv".to_owned(), 100)],
        "one change for the batch"
    );
    db.exec("TRUNCATE cache_entries");
    assert_eq!(log.changes(), vec![("kv".to_owned(), -1)], "all of it");
}

#[test]
fn an_update_of_keys_logs_the_keys_on_both_sides() {
    let db = near_db();
    wait_current(&db.cache);
    let mut log = ChangeLog::new(&db);
    db.cache.kv().set("k", &json!(1)).unwrap();
    assert_eq!(log.changes(), vec![], "a first insert");
    db.exec("UPDATE cache_entries SET key = 'other' WHERE key = 'k'");
    assert_eq!(
        log.changes(),
        vec![("kv".to_owned(), 2)],
        "the key that went and the one that came"
    );
    db.exec("UPDATE cache_entries SET expires_at = now() - interval '1 second'");
    assert_eq!(log.changes(), vec![("kv".to_owned(), 1)], "expired early");
    db.exec("UPDATE cache_entries SET key = 'third' WHERE key = 'other'");
    assert_eq!(
        log.changes(),
        vec![("kv".to_owned(), 1)],
        "an expired key that went is not named, the one that came is"
    );
    db.cache
        .llm_response()
        .set(&LlmPrompt::new("q", "p"), &"a".to_owned())
        .unwrap();
    db.exec("UPDATE llm_response_cache SET key_hash = sha256(key_hash)");
    assert_eq!(log.changes(), vec![("llm_response".to_owned(), 2)]);
}

#[test]
fn only_near_cache_managers_stamp_their_updates_the_others_go_through_the_trigger() {
    let db = near_db();
    wait_current(&db.cache);
    let plain = CacheManager::new(db.config().build().unwrap()).unwrap();
    let mut log = ChangeLog::new(&db);
    let stamped =
        || db.count("SELECT count(*) AS n FROM cache_entries WHERE changed_xid IS NOT NULL");
    plain.kv().set("k", &json!(1)).unwrap();
    plain.kv().set("k", &json!(2)).unwrap();
    assert_eq!(
        stamped(),
        0,
        "no stamp (and no index entry) without a near cache"
    );
    assert_eq!(
        log.changes(),
        vec![("kv".to_owned(), 1)],
        "the trigger logged it"
    );
    db.cache.kv().set("k", &json!(3)).unwrap();
    assert_eq!(stamped(), 1);
    assert_eq!(
        log.changes(),
        vec![("kv".to_owned(), 1)],
        "stamped, not logged"
    );
    plain.kv().set("k", &json!(4)).unwrap();
    assert_eq!(
        log.changes(),
        vec![("kv".to_owned(), 1)],
        "logged by the trigger"
    );
    assert_eq!(stamped(), 1, "the stamp is kept");
}

#[test]
fn an_unlogged_update_after_a_stamped_one_does_not_hide_it() {
    // A stamped change, then, before any poll has read it, an update by a pgcache
    // connection that does not stamp (no near cache) which the trigger does not
    // log (the same value, expiring later): the stamp must survive it. Both in one
    // transaction, so no poll can come between them.
    let (db, reader) = two_managers();
    db.cache.kv().set("k", &json!("old")).unwrap();
    assert_eq!(warm(&reader, "k"), Some(json!("old")));
    let mut conn = db.raw_connection();
    conn.batch_execute("BEGIN; SET LOCAL pgcache.stamps_changes = 'on'")
        .unwrap();
    db.cache
        .kv()
        .set_in(&mut conn, "k", &json!("new"), Duration::from_secs(60))
        .unwrap();
    conn.batch_execute("SET LOCAL pgcache.stamps_changes = 'off'")
        .unwrap();
    db.cache
        .kv()
        .set_in(&mut conn, "k", &json!("new"), Duration::from_secs(120))
        .unwrap();
    conn.batch_execute("COMMIT").unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(reader.kv().get("k").unwrap(), Some(json!("new")));
}

#[test]
fn update_triggers_of_earlier_versions_are_replaced_at_start() {
    let db = near_db();
    wait_current(&db.cache);
    // As earlier versions installed them: on the LLM table with no WHEN (it would
    // log the cache's own updates a second time), on the key/value table with a
    // WHEN on a setting nothing sets any more (it would log every update again).
    // One table per transaction, as the library does: the poller's statement reads
    // both tables, and a transaction locking both in the other order deadlocks it.
    db.exec(
        "DROP TRIGGER pgcache_near_update ON llm_response_cache; \
         CREATE TRIGGER pgcache_near_update AFTER UPDATE ON llm_response_cache \
           REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows \
           FOR EACH STATEMENT EXECUTE FUNCTION pgcache_near_invalidate('llm_response')",
    );
    db.exec(
        "DROP TRIGGER pgcache_near_update ON cache_entries; \
         CREATE TRIGGER pgcache_near_update AFTER UPDATE ON cache_entries \
           REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows \
           FOR EACH STATEMENT WHEN (current_setting('pgcache.kv_self_logged', true) IS DISTINCT FROM 'on') \
           EXECUTE FUNCTION pgcache_near_invalidate('kv')",
    );
    let current = |db: &TestDb| {
        db.count(
            "SELECT count(*) AS n FROM pg_trigger \
             WHERE tgrelid IN ('cache_entries'::regclass, 'llm_response_cache'::regclass) \
               AND tgname = 'pgcache_near_update' \
               AND pg_get_triggerdef(oid) LIKE '%pgcache.stamps_changes%'",
        )
    };
    assert_eq!(current(&db), 0);
    let other = CacheManager::new(
        db.config()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache(CacheKind::LlmResponse, Some(NearCache::new()))
            .build()
            .unwrap(),
    )
    .unwrap();
    wait_current(&other);
    assert_eq!(current(&db), 2, "replaced");
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_trigger \
             WHERE tgrelid IN ('cache_entries'::regclass, 'llm_response_cache'::regclass) \
               AND tgname LIKE 'pgcache_near_%'"
        ),
        6
    );
}

#[test]
fn an_ai_cache_change_by_another_manager_is_seen_and_an_unchanged_set_evicts_nothing() {
    let db = near_db();
    let other = CacheManager::new(
        db.config()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache(CacheKind::LlmResponse, Some(NearCache::new()))
            .near_cache_staleness(BOUND)
            .build()
            .unwrap(),
    )
    .unwrap();
    wait_current(&db.cache);
    wait_current(&other);
    let prompt = LlmPrompt::new("q", "p");
    let response = |cache: &CacheManager| {
        cache
            .llm_response()
            .get(&prompt)
            .unwrap()
            .map(|r| r.response)
    };
    db.cache
        .llm_response()
        .set(&prompt, &"a".to_owned())
        .unwrap();
    response(&other);
    assert_eq!(response(&other), Some("a".to_owned()));
    // The same response again: not stamped, still served from memory.
    db.cache
        .llm_response()
        .set(&prompt, &"a".to_owned())
        .unwrap();
    std::thread::sleep(BOUND);
    let (hits, _) = hits_and_misses(&other, CacheKind::LlmResponse, || {
        assert_eq!(response(&other), Some("a".to_owned()));
    });
    assert_eq!(hits, 1, "still in memory");
    // A changed one: stamped, evicted.
    db.cache
        .llm_response()
        .set(&prompt, &"b".to_owned())
        .unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(response(&other), Some("b".to_owned()));
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

#[test]
fn a_new_managers_first_reads_are_kept() {
    // No wait here: start-up waited for the poller. A long bound, so a poll made
    // late by a loaded machine cannot turn the near cache off (a bypass) either.
    let db = TestDb::with(|b| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_secs(10))
    });
    db.cache.kv().set("k", &json!(1)).unwrap();
    assert_eq!(warm(&db.cache, "k"), Some(json!(1)));
    let stats = near_support::kv_stats(&db.cache);
    assert_eq!(
        (stats.hits, stats.misses, stats.bypasses),
        (1, 1, 0),
        "{stats:?}"
    );
}

#[test]
fn entries_never_outlive_their_expiry_when_poll_replies_come_late() {
    // Every reply to the reader, its polls' included, arrives 60 ms late: the
    // database read its clock long before the reply came. The database and this
    // test share the machine's clock, so an answer given after the entry's
    // `expires_at` by that clock is an entry outliving its expiry.
    let db = near_db();
    let url = common::database_url();
    let proxy = proxy::DelayProxy::start(&url, Duration::from_millis(60));
    let reader = CacheManager::new(
        db.config()
            .database_url(proxy.url(&url))
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            // Polls take a round trip of 60 ms or more: a bound they always meet.
            .near_cache_staleness(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .unwrap();
    wait_current(&reader);
    let now_us = || chrono::Utc::now().timestamp_micros();
    let hits_before = near_support::kv_stats(&reader).hits;
    // How long after its expiry an entry was still answered at worst (negative: the
    // last answer came before the expiry).
    let mut worst_us = i64::MIN;
    for round in 0..3 {
        let key = format!("expiring-{round}");
        db.cache
            .kv()
            .set_with_ttl(&key, &json!(round), Duration::from_millis(700))
            .unwrap();
        let expires_us = db.count(&format!(
            "SELECT (extract(epoch FROM expires_at) * 1000000)::int8 AS n \
             FROM cache_entries WHERE key = '{key}'"
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let asked_us = now_us();
            if reader.kv().get(&key).unwrap().is_none() {
                break;
            }
            worst_us = worst_us.max(asked_us - expires_us);
            assert!(Instant::now() < deadline, "the entry never expired");
        }
    }
    assert!(worst_us < 0, "served {worst_us} us after its expiry");
    assert!(
        near_support::kv_stats(&reader).hits > hits_before,
        "the reads came from the near cache"
    );
}

#[test]
fn an_idle_manager_polls_at_most_three_times_per_bound() {
    let db = near_db();
    wait_current(&db.cache);
    // Past the backoff from 2 ms to its slowest, a third of the bound.
    std::thread::sleep(BOUND);
    let before = near_support::kv_stats(&db.cache).polls;
    let span = 20 * BOUND;
    std::thread::sleep(span);
    let polls = near_support::kv_stats(&db.cache).polls - before;
    // Three polls per bound while idle (60 here), doubled for slack; a poller that
    // did not back off would make a thousand.
    assert!(polls <= 2 * 3 * 20, "{polls} polls in {span:?} of idling");
    assert!(polls > 0, "an idle poller polls all the same");
    // And it keeps the near cache current: entries are still served from memory.
    db.cache.kv().set("k", &json!(1)).unwrap();
    assert_held(&db.cache, CacheKind::Kv, 1, || {
        db.cache.kv().get("k").unwrap();
    });
}

#[test]
fn the_first_change_after_idling_is_seen_within_the_bound() {
    let (db, other) = two_managers();
    db.cache.kv().set("k", &json!("old")).unwrap();
    assert_held(&other, CacheKind::Kv, 1, || {
        assert_eq!(other.kv().get("k").unwrap(), Some(json!("old")));
    });
    // Both pollers idle at their slowest.
    std::thread::sleep(4 * BOUND);
    let invalidated = near_support::kv_stats(&other).invalidations;
    let written = Instant::now();
    db.cache.kv().set("k", &json!("new")).unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(other.kv().get("k").unwrap(), Some(json!("new")));
    // Read by the idle poller, not only hidden by the bound.
    wait_polled_since(&other, CacheKind::Kv, written);
    assert!(near_support::kv_stats(&other).invalidations > invalidated);
}
