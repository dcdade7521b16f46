//! The near caches' logging invariant: every row of a cache table that a write
//! operation of pgcache changes in a way a near cache could hold (a live row
//! deleted; a live row whose content changed or whose expiry came earlier) is
//! logged, in the writer's transaction, by the change log (`cache_changes`,
//! the triggers') or by a stamp (`changed_xid` set to that transaction).
//!
//! A witness trigger of the test's own, on every cache table, records each row an
//! UPDATE or DELETE touches, whether it needed logging (judged from the whole row
//! apart from bookkeeping columns, not from pgcache's notion of a payload) and
//! whether the statement stamped it. After each operation, every row that needed
//! logging must be stamped or named in the change log under the same transaction.

use crate::common;
use crate::near_support;

use std::time::Duration;

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use near_support::wait_current;
use pgcache::{
    AudioChunk, AudioChunkKey, Cache, CacheKind, CacheManager, EmbeddingKey, LlmPrompt, NearCache,
    VectorSearchQuery,
};
use serde_json::json;
use uuid::Uuid;

/// The witness: a row per row updated or deleted in a cache table, with what the
/// invariant needs to judge it. Bookkeeping columns (hit counts, last access,
/// write time, expiry, the stamp) are left out of the comparison; an expiry is a
/// change only when it comes earlier.
const WITNESS: &str = r#"
CREATE TABLE witness (
    id        bigserial PRIMARY KEY,
    xid       bigint NOT NULL DEFAULT pg_current_xact_id()::text::int8,
    cache     text NOT NULL,
    op        text NOT NULL,
    key       text NOT NULL,
    must_log  boolean NOT NULL,
    stamped   boolean NOT NULL
);
CREATE FUNCTION witness() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    -- Early refresh's facts too: written only in the transaction that writes the
    -- row's value, and a later freshness, like a later expiry, is no change.
    bookkeeping text[] := ARRAY['hit_count', 'last_accessed_at', 'created_at', 'expires_at', 'changed_xid',
                                'fresh_until', 'fresh_expiry', 'compute_us'];
    old_key text;
    live boolean := OLD.expires_at > statement_timestamp();
BEGIN
    -- Keys as the change log names them: key/value keys as they are, digests as hex.
    old_key := CASE WHEN TG_ARGV[0] = 'kv' THEN to_jsonb(OLD) ->> 'key'
                    ELSE substr(to_jsonb(OLD) ->> 'key_hash', 3) END;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO witness (cache, op, key, must_log, stamped)
        VALUES (TG_ARGV[0], TG_OP, old_key, live, false);
        RETURN OLD;
    END IF;
    INSERT INTO witness (cache, op, key, must_log, stamped)
    VALUES (TG_ARGV[0], TG_OP, old_key,
            live AND ((to_jsonb(OLD) - bookkeeping) IS DISTINCT FROM (to_jsonb(NEW) - bookkeeping)
                      OR NEW.expires_at < OLD.expires_at),
            NEW.changed_xid IS NOT DISTINCT FROM pg_current_xact_id()::text::int8);
    RETURN NEW;
END
$fn$;
"#;

/// Rows the witness saw since `after`: (needed logging, needed logging and were not
/// logged, the unlogged ones described).
#[derive(QueryableByName)]
struct Verdict {
    #[diesel(sql_type = BigInt)]
    last: i64,
    #[diesel(sql_type = BigInt)]
    must_log: i64,
    #[diesel(sql_type = Text)]
    unlogged: String,
}

const VERDICT: &str = "SELECT coalesce(max(w.id), $1) AS last, \
       count(*) FILTER (WHERE w.must_log) AS must_log, \
       coalesce(string_agg(w.op || ' ' || w.cache || ' ' || w.key, ', ') FILTER ( \
         WHERE w.must_log AND NOT w.stamped AND NOT EXISTS ( \
           SELECT 1 FROM cache_changes c WHERE c.xid = w.xid AND c.cache_name = w.cache \
             AND (c.keys IS NULL OR w.key = ANY(c.keys)))), '') AS unlogged \
     FROM witness w WHERE w.id > $1";

/// A near-cached manager (every cache: every table carries the triggers, and the
/// pool stamps) with the witness on every cache table.
struct Harness {
    db: TestDb,
    conn: PgConnection,
    seen: i64,
}

impl Harness {
    fn new() -> Self {
        Self::partitioned(None)
    }

    /// With the cache tables hash-partitioned into `partitions`, when given: the
    /// witness, on each partitioned table, then fires for every partition.
    fn partitioned(partitions: Option<u32>) -> Self {
        let db = TestDb::with(|mut b| {
            for kind in CacheKind::ALL {
                b = b.near_cache(kind, Some(NearCache::new()));
            }
            b
        });
        if let Some(partitions) = partitions {
            db.cache.partition_tables(partitions).unwrap();
        }
        wait_current(&db.cache);
        let mut conn = db.raw_connection();
        conn.batch_execute(WITNESS).unwrap();
        for kind in CacheKind::ALL {
            conn.batch_execute(&format!(
                "CREATE TRIGGER witness AFTER UPDATE OR DELETE ON {} \
                 FOR EACH ROW EXECUTE FUNCTION witness('{}')",
                kind.table(),
                kind.name()
            ))
            .unwrap();
        }
        Harness { db, conn, seen: 0 }
    }

    /// Runs `op`, then fails if a row it changed went unlogged; `changes` says
    /// whether it is meant to change a live row (so the check is not empty).
    fn check(&mut self, name: &str, changes: bool, op: impl FnOnce(&CacheManager)) {
        op(&self.db.cache);
        self.judge(name, changes);
    }

    /// Fails if a row changed since the last judgement went unlogged, or if
    /// `changes` and no live row changed.
    fn judge(&mut self, name: &str, changes: bool) {
        let verdict: Verdict = diesel::sql_query(VERDICT)
            .bind::<BigInt, _>(self.seen)
            .get_result(&mut self.conn)
            .unwrap();
        self.seen = verdict.last;
        assert!(
            verdict.unlogged.is_empty(),
            "{name} changed rows no near cache hears of: {}",
            verdict.unlogged
        );
        assert_eq!(
            verdict.must_log > 0,
            changes,
            "{name}: {} changed live rows",
            verdict.must_log
        );
    }

    /// An update of live rows by another program (on a connection that does not
    /// stamp), judged like pgcache's own.
    fn exec(&mut self, sql: &str) {
        self.conn.batch_execute(sql).unwrap();
        self.judge(sql, true);
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn every_key_value_write_is_logged() {
    let mut h = Harness::new();
    h.check("set of new keys", false, |c| {
        c.kv().set_with_ttl("a", &json!(1), HOUR).unwrap();
        c.kv()
            .set_many(&[("b", &json!(1)), ("c", &json!(1))], HOUR)
            .unwrap();
    });
    h.check("set", true, |c| {
        c.kv().set_with_ttl("a", &json!(2), HOUR).unwrap()
    });
    h.check("set of the same value, later expiry", false, |c| {
        c.kv().set_with_ttl("a", &json!(2), HOUR).unwrap()
    });
    h.check("set with an earlier expiry", true, |c| {
        c.kv().set_with_ttl("a", &json!(2), MINUTE).unwrap()
    });
    h.check("set_many", true, |c| {
        c.kv()
            .set_many(&[("b", &json!(2)), ("c", &json!(2))], HOUR)
            .unwrap()
    });
    h.check("set_nx of a live key", false, |c| {
        assert!(!c.kv().set_nx("a", &json!(3), HOUR).unwrap());
    });
    h.exec("UPDATE cache_entries SET expires_at = now() - interval '1 second' WHERE key = 'a'");
    h.check("set_nx of an expired key", false, |c| {
        assert!(c.kv().set_nx("a", &json!(3), HOUR).unwrap());
    });
    h.check("incr of a new key", false, |c| {
        c.kv().incr("n", 1, HOUR).unwrap();
    });
    h.check("incr", true, |c| {
        c.kv().incr("n", 1, HOUR).unwrap();
    });
    h.check("decr", true, |c| {
        c.kv().decr("n", 5, HOUR).unwrap();
    });
    h.check("touch to an earlier expiry", true, |c| {
        assert!(c.kv().touch("b", MINUTE).unwrap());
    });
    h.check("get_touch to an earlier expiry", true, |c| {
        assert!(c.kv().get_touch("c", MINUTE).unwrap().is_some());
    });
    h.check("get_del", true, |c| {
        assert!(c.kv().get_del("a").unwrap().is_some());
    });
    h.check("delete", true, |c| assert!(c.kv().delete("b").unwrap()));
    h.check("delete_many", true, |c| {
        assert_eq!(c.kv().delete_many(&["c", "n"]).unwrap(), 2);
    });
    h.check("set_bytes of a new key", false, |c| {
        c.kv().set_bytes("x", b"1", HOUR).unwrap();
    });
    h.check("set_bytes", true, |c| {
        c.kv().set_bytes("x", b"2", HOUR).unwrap()
    });
    h.check("set_many_bytes over json", true, |c| {
        c.kv().set("j", &json!(1)).unwrap();
        c.kv()
            .set_many_bytes(&[("j", &b"1"[..]), ("x", &b"3"[..])], HOUR)
            .unwrap();
    });
    h.check("delete_prefix", true, |c| {
        c.kv()
            .set_many(&[("p:1", &json!(1)), ("p:2", &json!(1))], HOUR)
            .unwrap();
        assert_eq!(c.kv().delete_prefix("p:").unwrap(), 2);
    });
    h.check("clear", true, |c| {
        assert!(c.kv().clear().unwrap() >= 2);
    });
}

#[test]
fn tagged_writes_and_the_sweep_of_invalidated_entries_are_logged() {
    let mut h = Harness::partitioned(Some(4));
    let tagged: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    h.check("tagged sets of new keys", false, |c| {
        for key in &tagged {
            c.kv().set_tagged(key, &json!(1), &["a"]).unwrap();
        }
        c.kv().tagged(&["a"]).set_bytes("b", b"1", HOUR).unwrap();
        assert!(c.kv().tagged(&["a"]).set_nx("nx", &json!(1), HOUR).unwrap());
    });
    h.check("a set changing only the tags", true, |c| {
        c.kv().set_tagged("t0", &json!(1), &["b"]).unwrap();
    });
    h.check("an untagged set over a tagged entry", true, |c| {
        c.kv().set("t1", &json!(1)).unwrap();
    });
    h.check("incr of a tagged entry", true, |c| {
        assert_eq!(c.kv().incr("t2", 1, HOUR).unwrap(), 2);
    });
    h.check("an invalidation (no cache row changes)", false, |c| {
        c.kv().invalidate_tag("a").unwrap();
    });
    h.check("set_nx over an invalidated entry", true, |c| {
        assert!(c.kv().set_nx("nx", &json!(2), HOUR).unwrap());
    });
    h.check("incr over an invalidated entry", true, |c| {
        assert_eq!(c.kv().incr("t3", 1, HOUR).unwrap(), 1);
    });
    h.check(
        "the sweep of invalidated entries, per partition",
        true,
        |c| {
            c.cleanup().unwrap();
        },
    );
}

#[test]
fn get_or_compute_and_its_early_refresh_are_logged() {
    let mut h = Harness::new();
    let key = EmbeddingKey::new("hello", "m");
    h.check("get_or_compute of new keys", false, |c| {
        c.kv()
            .get_or_compute_with_ttl("g", HOUR, || Ok::<_, pgcache::Error>(json!(1)))
            .unwrap();
        c.embedding()
            .get_or_compute_with_ttl(&key, HOUR, || Ok::<_, pgcache::Error>(vec![1.0]))
            .unwrap();
    });
    // The last computations seem to have taken years: XFetch refreshes at once.
    h.conn
        .batch_execute(
            "UPDATE cache_entries SET compute_us = 1000000000000000; \
             UPDATE embedding_cache SET compute_us = 1000000000000000",
        )
        .unwrap();
    h.judge("a longer computation time", false);
    h.check("an early refresh", true, |c| {
        let refreshed = c
            .kv()
            .get_or_compute_with_ttl("g", HOUR, || Ok::<_, pgcache::Error>(json!(2)))
            .unwrap();
        assert_eq!(refreshed, json!(2));
        let refreshed = c
            .embedding()
            .get_or_compute_with_ttl(&key, HOUR, || Ok::<_, pgcache::Error>(vec![2.0]))
            .unwrap();
        assert_eq!(refreshed, vec![2.0]);
    });
}

#[test]
fn every_key_value_write_on_a_callers_connection_is_logged() {
    let mut h = Harness::new();
    let mut conn = h.db.raw_connection();
    h.check("set_in of new keys", false, |c| {
        c.kv()
            .set_many_in(&mut conn, &[("a", &json!(1)), ("p:1", &json!(1))], HOUR)
            .unwrap();
    });
    h.check("set_in", true, |c| {
        c.kv().set_in(&mut conn, "a", &json!(2), HOUR).unwrap()
    });
    h.check("set_bytes_in over json", true, |c| {
        c.kv().set_bytes_in(&mut conn, "a", b"1", HOUR).unwrap()
    });
    h.check("delete_in", true, |c| {
        assert!(c.kv().delete_in(&mut conn, "a").unwrap())
    });
    h.check("delete_prefix_in", true, |c| {
        assert_eq!(c.kv().delete_prefix_in(&mut conn, "p:").unwrap(), 1);
    });
}

#[test]
fn every_typed_cache_write_is_logged() {
    let mut h = Harness::new();
    let user = Uuid::new_v4();
    let text = EmbeddingKey::new("hello", "m").owned_by(user);
    let search = VectorSearchQuery::new(user, vec![1.0, 2.0], 3);
    let prompt = LlmPrompt::new("prompt", "provider").owned_by(user);
    let speech = AudioChunkKey::new("words", "voice", "provider");
    h.check("sets of new keys", false, |c| {
        c.embedding().set(&text, &vec![1.0, 2.0]).unwrap();
        c.vector_search().set(&search, &json!(["a"])).unwrap();
        c.llm_response().set(&prompt, &"one".to_owned()).unwrap();
        c.audio_chunk()
            .set(&speech, &AudioChunk::inline(vec![1, 2], "opus"))
            .unwrap();
    });
    h.check("sets of the same values", false, |c| {
        c.embedding().set(&text, &vec![1.0, 2.0]).unwrap();
        c.vector_search().set(&search, &json!(["a"])).unwrap();
        c.llm_response().set(&prompt, &"one".to_owned()).unwrap();
        c.audio_chunk()
            .set(&speech, &AudioChunk::inline(vec![1, 2], "opus"))
            .unwrap();
    });
    h.check("hits counted", false, |c| {
        c.llm_response().get(&prompt).unwrap().unwrap();
        c.audio_chunk().get(&speech).unwrap().unwrap();
        c.flush_stats().unwrap();
    });
    h.check("embedding set", true, |c| {
        c.embedding().set(&text, &vec![3.0, 4.0]).unwrap()
    });
    h.check("vector_search set", true, |c| {
        c.vector_search().set(&search, &json!(["b"])).unwrap()
    });
    h.check("llm_response set", true, |c| {
        c.llm_response().set(&prompt, &"two".to_owned()).unwrap()
    });
    h.check("audio_chunk set", true, |c| {
        c.audio_chunk()
            .set(&speech, &AudioChunk::stored("/a.opus", 2, "opus"))
            .unwrap()
    });
    h.check("set with an earlier expiry", true, |c| {
        c.embedding()
            .set_with_ttl(&text, &vec![3.0, 4.0], MINUTE)
            .unwrap()
    });
    h.check("set_many", true, |c| {
        let other = EmbeddingKey::new("other", "m");
        c.embedding()
            .set_many(&[(&text, &vec![5.0, 6.0]), (&other, &vec![1.0])], HOUR)
            .unwrap()
    });
    h.check("delete", true, |c| {
        assert!(c.vector_search().delete(&search).unwrap())
    });
    h.check("invalidate_user", true, |c| {
        c.invalidate_user(user).unwrap();
    });
    h.check("invalidate_model", true, |c| {
        assert!(c.invalidate_model("m").unwrap() >= 1);
    });
    h.check("audio evict_to_budget", true, |c| {
        c.audio_chunk()
            .set(&speech, &AudioChunk::inline(vec![1, 2, 3], "opus"))
            .unwrap();
        c.audio_chunk().evict_to_budget(0, 0.0).unwrap();
    });
}

#[test]
fn a_warmup_over_every_cache_is_logged() {
    let mut h = Harness::new();
    let warmup = |value: &str, response: &str| -> pgcache::Warmup {
        serde_json::from_value(json!({
            "kv": [{"key": "config:v1", "value": {"theme": value}}],
            "embeddings": [{"text": "t", "model": "m", "embedding": [0.1, 0.2]}],
            "vector_searches": [{
                "user_id": "00000000-0000-0000-0000-000000000001",
                "embedding": [0.1, 0.2], "top_k": 5, "results": [{"id": value}]
            }],
            "llm_responses": [{"prompt": "p", "provider": "q", "response": response}],
            "audio_chunks": [{
                "text": "Hello", "voice_model_id": "v1", "provider": "x",
                "data": {"stored": {"path": value, "byte_size": 1200}}, "format": "opus"
            }]
        }))
        .unwrap()
    };
    h.check("warmup of new keys", false, |c| {
        c.warmup(&warmup("dark", "a")).unwrap();
    });
    h.check("warmup over every cache", true, |c| {
        c.warmup(&warmup("light", "b")).unwrap();
    });
}

#[test]
fn writes_and_per_partition_deletes_on_partitioned_tables_are_logged() {
    let mut h = Harness::partitioned(Some(4));
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let speech: Vec<AudioChunkKey> = (0..20)
        .map(|i| AudioChunkKey::new(format!("words {i}"), "voice", "provider"))
        .collect();
    let audio = AudioChunk::inline(vec![1, 2, 3], "opus");
    let (one, two) = (json!(1), json!(2));
    h.check("sets of new keys", false, |c| {
        let entries: Vec<(&str, &serde_json::Value)> =
            keys.iter().map(|k| (k.as_str(), &one)).collect();
        c.kv().set_many(&entries, HOUR).unwrap();
        let chunks: Vec<(&AudioChunkKey, &AudioChunk)> =
            speech.iter().map(|k| (k, &audio)).collect();
        c.audio_chunk().set_many(&chunks, HOUR).unwrap();
    });
    h.check("set_many across partitions", true, |c| {
        let entries: Vec<(&str, &serde_json::Value)> =
            keys.iter().map(|k| (k.as_str(), &two)).collect();
        c.kv().set_many(&entries, HOUR).unwrap();
    });
    h.check("touch", true, |c| {
        assert!(c.kv().touch("k1", MINUTE).unwrap());
    });
    h.check("delete_prefix across partitions", true, |c| {
        assert_eq!(c.kv().delete_prefix("k1").unwrap(), 11);
    });
    h.exec("UPDATE cache_entries SET expires_at = now() - interval '1 second' WHERE key = 'k2'");
    h.check("cleanup, per partition", false, |c| {
        c.cleanup().unwrap();
    });
    h.check("eviction, per partition", true, |c| {
        assert!(
            c.audio_chunk()
                .evict_to_budget(0, 0.0)
                .unwrap()
                .rows_removed
                > 0
        );
    });
}

#[test]
fn cleanup_and_clear_are_logged() {
    let mut h = Harness::new();
    h.check("sets", false, |c| {
        c.kv().set("live", &json!(1)).unwrap();
        c.kv().set("old", &json!(1)).unwrap();
        c.embedding()
            .set(&EmbeddingKey::new("t", "m"), &vec![1.0])
            .unwrap();
    });
    h.exec("UPDATE cache_entries SET expires_at = now() - interval '1 second' WHERE key = 'old'");
    h.check("cleanup of expired rows", false, |c| {
        c.cleanup().unwrap();
    });
    h.check("clear", true, |c| {
        c.clear(None).unwrap();
    });
}
