//! Tags on key/value entries: after an invalidation commits, no read returns an
//! entry written before it with that tag (the table, batch reads, the Redis-style
//! reads, another process's near cache after the staleness bound), while entries
//! written after it, and other tags' entries, are served; a rolled-back
//! invalidation changes nothing; bad tags store nothing; cleanup removes the
//! invalidated rows.

use crate::common;
use crate::near_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::TestDb;
use diesel::Connection;
use near_support::{assert_held, wait_current};
use pgcache::{
    Cache, CacheConfig, CacheKind, CacheManager, Error, NearCache, MAX_TAGS_PER_ENTRY,
    MAX_TAG_BYTES,
};
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

/// The staleness bound of the near-cache tests.
const BOUND: Duration = Duration::from_millis(100);

fn near(builder: pgcache::CacheConfigBuilder) -> pgcache::CacheConfigBuilder {
    builder
        .near_cache(CacheKind::Kv, Some(NearCache::new()))
        .near_cache_staleness(BOUND)
}

fn rows(db: &TestDb) -> i64 {
    db.count("SELECT count(*) AS n FROM cache_entries")
}

#[test]
fn invalidated_entries_read_as_misses_in_every_read() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_tagged("json", &json!(1), &["user:42"]).unwrap();
    let tagged = kv.tagged(&["user:42"]);
    tagged
        .set_many(&[("a", &json!(2)), ("b", &json!(3))], HOUR)
        .unwrap();
    tagged.set_bytes("bytes", b"raw", HOUR).unwrap();
    kv.set("untagged", &json!(4)).unwrap();
    assert_eq!(kv.get("json").unwrap(), Some(json!(1)), "live before");

    kv.invalidate_tag("user:42").unwrap();
    assert_eq!(kv.get("json").unwrap(), None);
    assert_eq!(
        kv.get_many(&["json", "a", "b", "untagged"]).unwrap(),
        vec![None, None, None, Some(json!(4))]
    );
    assert_eq!(kv.get_bytes("bytes").unwrap(), None);
    assert_eq!(kv.get_many_bytes(&["bytes"]).unwrap(), vec![None]);
    let mut conn = db.cache.connection().unwrap();
    assert_eq!(kv.get_in(&mut conn, "json").unwrap(), None);
    assert_eq!(kv.get_bytes_in(&mut conn, "bytes").unwrap(), None);
    assert_eq!(kv.get_many_in(&mut conn, &["a"]).unwrap(), vec![None]);
}

#[test]
fn redis_style_operations_treat_an_invalidated_entry_as_absent() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    for key in [
        "exists",
        "ttl",
        "touch",
        "get_touch",
        "get_del",
        "find",
        "nx",
    ] {
        kv.set_tagged(key, &json!({"plan": "pro", "key": key}), &["t"])
            .unwrap();
    }
    kv.tagged(&["t"])
        .set_with_ttl("counter", &json!(10), HOUR)
        .unwrap();
    kv.invalidate_tag("t").unwrap();
    assert!(!kv.exists("exists").unwrap());
    assert_eq!(kv.ttl("ttl").unwrap(), None);
    assert!(!kv.touch("touch", HOUR).unwrap());
    assert_eq!(kv.get_touch("get_touch", HOUR).unwrap(), None);
    assert_eq!(kv.get_del("get_del").unwrap(), None);
    assert!(kv
        .find_containing(&json!({"plan": "pro"}), 10)
        .unwrap()
        .is_empty());
    // Writes that only fill an absent key do so, and the new entry is untagged.
    assert_eq!(kv.incr("counter", 1, HOUR).unwrap(), 1, "started over");
    assert!(kv.set_nx("nx", &json!("new"), HOUR).unwrap());
    kv.invalidate_tag("t").unwrap();
    assert_eq!(kv.get("counter").unwrap(), Some(json!(1)));
    assert_eq!(kv.get("nx").unwrap(), Some(json!("new")));
}

#[test]
fn a_tagged_set_nx_stores_its_tags_and_replaces_an_invalidated_entry() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let tagged = kv.tagged(&["t", "u"]);
    assert!(tagged.set_nx("lock", &json!(1), HOUR).unwrap());
    assert!(
        !tagged.set_nx("lock", &json!(2), HOUR).unwrap(),
        "live: taken"
    );
    assert!(kv.set_nx("untagged", &json!(1), HOUR).unwrap());

    kv.invalidate_tag("u").unwrap();
    assert_eq!(kv.get("lock").unwrap(), None);
    assert!(
        tagged.set_nx("lock", &json!(3), HOUR).unwrap(),
        "invalidated: free"
    );
    assert_eq!(kv.get("lock").unwrap(), Some(json!(3)));

    // The replacing entry carries the tags too; the untagged one none.
    kv.invalidate_tag("t").unwrap();
    assert_eq!(kv.get("lock").unwrap(), None);
    assert_eq!(kv.get("untagged").unwrap(), Some(json!(1)));
}

#[test]
fn a_counter_keeps_its_tags_while_live() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_tagged("n", &json!(1), &["t"]).unwrap();
    assert_eq!(kv.incr("n", 1, HOUR).unwrap(), 2);
    assert!(kv.touch("n", HOUR).unwrap());
    kv.invalidate_tag("t").unwrap();
    assert_eq!(kv.get("n").unwrap(), None);
}

#[test]
fn entries_written_after_the_invalidation_are_served() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_tagged("k", &json!("old"), &["t"]).unwrap();
    kv.invalidate_tag("t").unwrap();
    kv.set_tagged("k", &json!("new"), &["t"]).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!("new")));
    // And through get_or_compute on a tagged handle: stored with the tag.
    let computed: Value = kv
        .tagged(&["t"])
        .get_or_compute("c", || Ok::<_, Error>(json!("computed")))
        .unwrap();
    assert_eq!(computed, json!("computed"));
    assert_eq!(kv.get("c").unwrap(), Some(json!("computed")));
    kv.invalidate_tag("t").unwrap();
    assert_eq!(kv.get_many(&["k", "c"]).unwrap(), vec![None, None]);
}

#[test]
fn an_entry_with_several_tags_is_dropped_by_any_one_of_them() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    for tag in ["user:42", "product:7", "page"] {
        kv.set_tagged("k", &json!(1), &["user:42", "product:7", "page"])
            .unwrap();
        assert_eq!(kv.get("k").unwrap(), Some(json!(1)));
        kv.invalidate_tag(tag).unwrap();
        assert_eq!(kv.get("k").unwrap(), None, "{tag}");
    }
    kv.set_tagged("k", &json!(1), &["a", "b"]).unwrap();
    kv.invalidate_tags(&["x", "b"]).unwrap();
    assert_eq!(kv.get("k").unwrap(), None, "one of several at once");
}

#[test]
fn invalidation_leaves_other_tags_entries_alone() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_tagged("mine", &json!(1), &["user:42"]).unwrap();
    kv.set_tagged("theirs", &json!(2), &["user:43", "user:420"])
        .unwrap();
    kv.set("untagged", &json!(3)).unwrap();
    kv.invalidate_tag("user:42").unwrap();
    assert_eq!(
        kv.get_many(&["mine", "theirs", "untagged"]).unwrap(),
        vec![None, Some(json!(2)), Some(json!(3))]
    );
}

#[test]
fn an_untagged_overwrite_drops_the_old_tags() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_tagged("k", &json!(1), &["t"]).unwrap();
    kv.set("k", &json!(2)).unwrap();
    kv.invalidate_tag("t").unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!(2)));
}

#[test]
fn a_rolled_back_tag_invalidation_changes_nothing() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set_tagged("k", &json!(1), &["t"]).unwrap();
    let mut conn = db.cache.connection().unwrap();
    let rolled_back = conn.transaction(|conn| {
        kv.invalidate_tags_in(conn, &["t"]).unwrap();
        assert_eq!(kv.get_in(conn, "k").unwrap(), None, "invalidated inside");
        Err::<(), _>(diesel::result::Error::RollbackTransaction)
    });
    assert!(rolled_back.is_err());
    assert_eq!(kv.get("k").unwrap(), Some(json!(1)));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM cache_tags"),
        0,
        "no generation moved"
    );
}

#[test]
fn a_tag_invalidated_in_a_committed_app_transaction_takes_effect_at_its_commit() {
    let db = TestDb::new();
    db.exec("CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL); INSERT INTO users VALUES (42, 'Ada')");
    let kv = db.cache.kv();
    kv.set_tagged("profile", &json!("Ada"), &["user:42"])
        .unwrap();
    let mut conn = db.cache.connection().unwrap();
    conn.transaction(|conn| {
        diesel::RunQueryDsl::execute(
            diesel::sql_query(format!(
                "UPDATE \"{}\".users SET name = 'Ada L.' WHERE id = 42",
                db.schema
            )),
            conn,
        )?;
        kv.invalidate_tag_in(conn, "user:42")?;
        // Not committed yet: everyone else still reads the entry.
        assert_eq!(kv.get("profile")?, Some(json!("Ada")));
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(kv.get("profile").unwrap(), None);
}

#[test]
fn a_write_that_read_the_generations_before_an_invalidation_committed_is_stale() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let mut conn = db.cache.connection().unwrap();
    conn.transaction(|conn| {
        kv.invalidate_tag_in(conn, "t")?;
        // Another connection writes while the invalidation is in flight: it
        // reads the generation from before it.
        kv.set_tagged("k", &json!(1), &["t"])?;
        assert_eq!(kv.get("k")?, Some(json!(1)));
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(kv.get("k").unwrap(), None, "the invalidation came after");
}

#[test]
fn bad_tags_are_refused_naming_the_tag_and_store_nothing() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    kv.set("kept", &json!("old")).unwrap();
    let long = "x".repeat(MAX_TAG_BYTES + 1);
    let long = [long.as_str()];
    let many: Vec<String> = (0..=MAX_TAGS_PER_ENTRY).map(|i| format!("t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let cases: [(&[&str], &str); 4] = [
        (&["ok", ""], "must not be empty"),
        (&["ok", "a\0b"], r#""a\0b""#),
        (&long, "xxxxxxxx"),
        (&many, "at most 64 tags"),
    ];
    for (tags, named) in cases {
        let refused = [
            kv.set_tagged("kept", &json!("new"), tags),
            kv.set_tagged("new", &json!("new"), tags),
            kv.tagged(tags).set_bytes("kept", b"new", HOUR),
            kv.tagged(tags).set_many(&[("new", &json!(1))], HOUR),
            kv.tagged(tags).set_nx("new", &json!(1), HOUR).map(|_| ()),
        ];
        for result in refused {
            match result {
                Err(Error::InvalidInput { reason, .. }) => {
                    assert!(reason.contains(named), "{reason}")
                }
                other => panic!("{tags:?}: {other:?}"),
            }
        }
    }
    assert_eq!(kv.get("kept").unwrap(), Some(json!("old")));
    assert_eq!(kv.get("new").unwrap(), None);
    match kv.invalidate_tags(&["fine", "a\0b"]) {
        Err(Error::InvalidInput { what, reason }) => {
            assert_eq!(what, "tag");
            assert!(reason.contains(r#""a\0b""#), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_tags"), 0);
}

#[test]
fn cleanup_removes_invalidated_rows_and_only_those() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    for i in 0..3 {
        kv.set_tagged(&format!("gone:{i}"), &json!(i), &["t1", "x"])
            .unwrap();
    }
    kv.set_tagged("other", &json!(0), &["t2"]).unwrap();
    kv.set("untagged", &json!(0)).unwrap();
    kv.invalidate_tag("t1").unwrap();
    kv.set_tagged("rewritten", &json!(0), &["t1"]).unwrap();
    assert_eq!(rows(&db), 6);
    let report = db.cache.cleanup().unwrap();
    let removed = |report: &pgcache::CleanupReport| {
        report
            .tables
            .iter()
            .find(|t| t.cache == CacheKind::Kv)
            .unwrap()
            .rows_removed
    };
    assert_eq!(removed(&report), 3);
    assert_eq!(rows(&db), 3);
    assert_eq!(
        kv.get_many(&["other", "untagged", "rewritten"]).unwrap(),
        vec![Some(json!(0)); 3]
    );
    assert_eq!(removed(&db.cache.cleanup().unwrap()), 0, "swept once");
    kv.invalidate_tag("t1").unwrap();
    assert_eq!(
        removed(&db.cache.cleanup().unwrap()),
        1,
        "invalidated again"
    );
}

#[test]
fn tags_work_on_a_hash_partitioned_table() {
    let db = TestDb::new();
    db.cache.partition_tables(4).unwrap();
    let kv = db.cache.kv();
    let keys: Vec<String> = (0..20).map(|i| format!("k:{i}")).collect();
    for key in &keys {
        kv.set_tagged(key, &json!(1), &["t"]).unwrap();
    }
    kv.tagged(&["u"]).set_bytes("b", b"1", HOUR).unwrap();
    kv.invalidate_tag("t").unwrap();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert!(kv.get_many(&keys).unwrap().iter().all(Option::is_none));
    assert_eq!(kv.get_bytes("b").unwrap(), Some(b"1".to_vec()));
    db.cache.cleanup().unwrap();
    assert_eq!(rows(&db), 1);
}

#[test]
fn a_near_cached_tagged_entry_in_another_manager_stops_being_served_within_the_bound() {
    let db = TestDb::with(near);
    let reader = CacheManager::new(near(db.config()).build().unwrap()).unwrap();
    wait_current(&db.cache);
    wait_current(&reader);
    db.cache
        .kv()
        .set_tagged("k", &json!("cached"), &["user:42", "page"])
        .unwrap();
    db.cache
        .kv()
        .set_tagged("other", &json!(1), &["user:43"])
        .unwrap();
    assert_held(&reader, CacheKind::Kv, 2, || {
        assert_eq!(reader.kv().get("k").unwrap(), Some(json!("cached")));
        assert_eq!(reader.kv().get("other").unwrap(), Some(json!(1)));
    });
    // This manager's own near cache too (read-your-writes).
    assert_held(&db.cache, CacheKind::Kv, 1, || {
        db.cache.kv().get("k").unwrap();
    });
    db.cache.kv().invalidate_tag("user:42").unwrap();
    assert_eq!(db.cache.kv().get("k").unwrap(), None, "at once here");
    std::thread::sleep(BOUND);
    assert_eq!(reader.kv().get("k").unwrap(), None);
    assert_eq!(reader.kv().get_many(&["k"]).unwrap(), vec![None]);
    assert_eq!(reader.kv().get("other").unwrap(), Some(json!(1)));
}

/// The schema of the child of the process test, which it is run with.
const CHILD_SCHEMA_VAR: &str = "PGCACHE_TAGS_CHILD_SCHEMA";
/// What the child prints once it holds the entry in memory.
const HELD: &str = "pgcache-tags-child: held";
const PROCESS_TEST: &str =
    "tags::a_near_cached_tagged_entry_in_another_process_stops_being_served_within_the_bound";

#[test]
fn a_near_cached_tagged_entry_in_another_process_stops_being_served_within_the_bound() {
    if let Ok(schema) = std::env::var(CHILD_SCHEMA_VAR) {
        return near_reader_process(&schema);
    }
    let db = TestDb::with(near);
    db.cache
        .kv()
        .set_tagged("k", &json!("cached"), &["user:42"])
        .unwrap();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([PROCESS_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_SCHEMA_VAR, &db.schema)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let held = lines.find(|line| matches!(line, Ok(line) if line.contains(HELD)));
    assert!(
        held.is_some(),
        "the child never held the entry: {:?}",
        child.wait_with_output()
    );
    db.cache.kv().invalidate_tag("user:42").unwrap();
    // Committed: the child reads after the bound.
    writeln!(child.stdin.take().unwrap(), "invalidated").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the child failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The child: holds the tagged entry in its near cache, says so, and once told the
/// invalidation committed, waits the bound and reads.
fn near_reader_process(schema: &str) {
    let cache = CacheManager::new(
        near(
            CacheConfig::builder()
                .database_url(common::database_url())
                .schema(schema)
                .pool_max_size(2)
                .pool_min_idle(0),
        )
        .build()
        .unwrap(),
    )
    .unwrap();
    wait_current(&cache);
    assert_held(&cache, CacheKind::Kv, 1, || {
        assert_eq!(cache.kv().get("k").unwrap(), Some(json!("cached")));
    });
    // On a line of its own: the test harness writes on stdout too.
    println!("\n{HELD}");
    let mut told = String::new();
    std::io::stdin().read_line(&mut told).unwrap();
    assert_eq!(told.trim(), "invalidated");
    std::thread::sleep(BOUND);
    assert_eq!(cache.kv().get("k").unwrap(), None);
}

#[test]
fn reads_and_writes_probe_the_tag_table_by_index_however_many_tags_it_holds() {
    let db = TestDb::new();
    // Many invalidated tags: a plan joining an entry's tags with the whole table
    // (a hash join over a sequential scan) would cost more as it grows.
    db.exec(
        "INSERT INTO cache_tags (tag) SELECT 'p:' || g FROM generate_series(1, 1000) g; \
         ANALYZE cache_tags",
    );
    let kv = db.cache.kv();
    let mut conn = db.cache.connection().unwrap();
    let tags = ["p:1", "p:2", "new"];
    for _ in 0..10 {
        kv.tagged(&tags)
            .set_in(&mut conn, "k", &json!(1), HOUR)
            .unwrap();
        assert_eq!(kv.get_in(&mut conn, "k").unwrap(), Some(json!(1)));
    }
    // This backend's table statistics, flushed, read from another.
    diesel::RunQueryDsl::execute(
        diesel::sql_query("SELECT pg_stat_force_next_flush()"),
        &mut conn,
    )
    .unwrap();
    diesel::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), &mut conn).unwrap();
    let scans = |kind: &str| {
        db.count(&format!(
            "SELECT {kind} AS n FROM pg_stat_user_tables WHERE schemaname = '{}' AND relname = 'cache_tags'",
            db.schema
        ))
    };
    // (Its index builds at migrate time scanned it empty.)
    assert_eq!(scans("seq_tup_read"), 0, "the tag table was scanned whole");
    assert!(scans("idx_scan") >= 20, "{} index scans", scans("idx_scan"));
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_work_as_futures() {
    let db = TestDb::with(near);
    let cache = db.cache.to_async();
    let kv = cache.kv();
    kv.set_tagged("k", json!(1), &["user:42"]).await.unwrap();
    kv.set_tagged("other", json!(2), &["user:43"])
        .await
        .unwrap();
    // Held in this process's near cache, read on the calling task.
    assert_eq!(kv.get("k").await.unwrap(), Some(json!(1)));
    assert_eq!(kv.get("k").await.unwrap(), Some(json!(1)));
    kv.invalidate_tags(&["user:42"]).await.unwrap();
    assert_eq!(kv.get("k").await.unwrap(), None);
    assert_eq!(kv.get("other").await.unwrap(), Some(json!(2)));
}
