//! Hash-partitioned cache tables (`partition_tables`, `pgcache migrate
//! --partitions N`): every operation works on them, prepared reads prune to one
//! partition, cleanup and eviction work per partition, and near caches learn of
//! every change, whichever table a statement names.

mod common;
mod near_support;

use std::time::{Duration, Instant};

use common::TestDb;
use near_support::{assert_held, hits_and_misses, wait_current, wait_polled_since};
use pgcache::{Cache, CacheKind, CacheManager, EmbeddingKey, Error, LlmPrompt, NearCache};
use serde_json::json;

const PARTITIONS: u32 = 4;

fn partitioned(db: &TestDb) {
    let done = db.cache.partition_tables(PARTITIONS).unwrap();
    assert_eq!(done.len(), CacheKind::ALL.len());
    assert!(done
        .iter()
        .all(|p| p.converted && p.partitions == PARTITIONS));
}

fn partitions_of(db: &TestDb, table: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) AS n FROM pg_partition_tree('{table}') WHERE isleaf"
    ))
}

#[test]
fn partitioned_tables_serve_every_cache_operation() {
    let db = TestDb::new();
    partitioned(&db);
    for kind in CacheKind::ALL {
        assert_eq!(
            partitions_of(&db, kind.table()),
            i64::from(PARTITIONS),
            "{kind}"
        );
    }
    let kv = db.cache.kv();
    kv.set("user:1:a", &json!(1)).unwrap();
    kv.set("user:1:a", &json!(2)).unwrap(); // an upsert overwrite
    let (b, c) = (json!("b"), json!("c"));
    kv.set_many(
        &[("user:1:b", &b), ("user:2:c", &c)],
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(
        kv.get_many(&["user:1:a", "user:1:b", "user:2:c", "none"])
            .unwrap(),
        vec![Some(json!(2)), Some(b), Some(c.clone()), None]
    );
    assert_eq!(kv.incr("counter", 5, Duration::from_secs(60)).unwrap(), 5);
    assert!(kv
        .set_nx("lock", &json!("me"), Duration::from_secs(60))
        .unwrap());
    assert_eq!(kv.delete_prefix("user:1:").unwrap(), 2);
    assert_eq!(kv.get("user:2:c").unwrap(), Some(c));
    assert!(kv.delete("user:2:c").unwrap());

    let prompt = LlmPrompt::new("q", "p");
    db.cache
        .llm_response()
        .set(&prompt, &"a".to_owned())
        .unwrap();
    assert_eq!(
        db.cache
            .llm_response()
            .get(&prompt)
            .unwrap()
            .unwrap()
            .response,
        "a"
    );
    let key = EmbeddingKey::new("text", "model");
    db.cache.embedding().set(&key, &vec![0.5; 8]).unwrap();
    assert_eq!(
        db.cache.embedding().get(&key).unwrap().unwrap().embedding,
        vec![0.5; 8]
    );

    let stats = db.cache.stats().unwrap();
    let kv_stats = stats
        .caches
        .iter()
        .find(|t| t.cache == CacheKind::Kv)
        .unwrap();
    assert_eq!(kv_stats.entries, 2, "counter and lock");
    assert!(kv_stats.size_bytes > 0, "sizes count the partitions");
}

#[test]
fn partitioning_keeps_the_rows_and_runs_again_safely() {
    let db = TestDb::new();
    for i in 0..100 {
        db.cache.kv().set(&format!("k{i}"), &json!(i)).unwrap();
    }
    partitioned(&db);
    for i in 0..100 {
        assert_eq!(db.cache.kv().get(&format!("k{i}")).unwrap(), Some(json!(i)));
    }
    // Rows are spread over every partition.
    assert_eq!(
        db.count("SELECT count(DISTINCT tableoid) AS n FROM cache_entries"),
        i64::from(PARTITIONS)
    );
    let again = db.cache.partition_tables(PARTITIONS).unwrap();
    assert!(again.iter().all(|p| !p.converted));

    for wrong in [0, PARTITIONS * 2, pgcache::MAX_PARTITIONS + 1] {
        let err = db.cache.partition_tables(wrong).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { what, .. } if *what == "partitions"),
            "{wrong}: {err}"
        );
    }
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 100);
}

/// Partitioning moves every row in one statement per table: with the tables the
/// scaling docs sell partitions for, far longer than an ordinary statement timeout, which
/// must not cut it (the migration timeout, 10 minutes by default, applies).
#[test]
fn partitioning_a_million_rows_is_not_cut_by_the_statement_timeout() {
    const ROWS: i64 = 1_000_000;
    let statement_timeout = Duration::from_millis(500);
    let db = TestDb::with(|b| b.statement_timeout(statement_timeout));
    db.exec(&format!(
        "INSERT INTO cache_entries (key, value, expires_at) \
         SELECT 'key:' || g, to_jsonb(g), now() + interval '1 hour' \
         FROM generate_series(1, {ROWS}) AS g"
    ));
    let done = db.cache.partition_tables(8).unwrap();
    assert!(done.iter().all(|p| p.converted && p.partitions == 8));
    assert_eq!(partitions_of(&db, "cache_entries"), 8);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), ROWS);
    assert_eq!(db.cache.kv().get("key:777").unwrap(), Some(json!(777)));
    // The longer timeout was the partitioning's only: the connections keep theirs.
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    use diesel::RunQueryDsl;
    let mut conn = db.cache.connection().unwrap();
    let setting: Setting =
        diesel::sql_query("SELECT current_setting('statement_timeout') AS value")
            .get_result(&mut *conn)
            .unwrap();
    assert_eq!(setting.value, "500ms");
}

#[test]
fn an_invalid_partition_count_is_refused_before_the_database_is_asked() {
    // Nothing listens at this port: a check that needed the database would fail
    // with a connection error instead.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let cache = pgcache::CacheManager::new(
        pgcache::CacheConfig::builder()
            .database_url(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .fail_open(true)
            .pool_connection_timeout(Duration::from_millis(200))
            .build()
            .unwrap(),
    )
    .unwrap();
    for wrong in [0, pgcache::MAX_PARTITIONS + 1] {
        let err = cache.partition_tables(wrong).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { what, .. } if *what == "partitions"),
            "{wrong}: {err}"
        );
    }
}

#[test]
fn cleanup_removes_expired_rows_from_every_partition() {
    let db = TestDb::new();
    partitioned(&db);
    for i in 0..200 {
        db.cache.kv().set(&format!("k{i}"), &json!(i)).unwrap();
    }
    db.exec(
        "UPDATE cache_entries SET expires_at = now() - interval '1 second' \
         WHERE substring(key from 2)::int % 2 = 0",
    );
    let report = db.cache.cleanup().unwrap();
    assert_eq!(report.rows_removed(), 100);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 100);
    for i in (1..200).step_by(2) {
        assert_eq!(db.cache.kv().get(&format!("k{i}")).unwrap(), Some(json!(i)));
    }
}

#[test]
fn eviction_takes_the_oldest_entries_across_partitions() {
    let db = TestDb::with(|b| {
        b.max_entries(CacheKind::Kv, Some(40))
            .eviction_low_watermark(0.5)
    });
    partitioned(&db);
    for i in 0..60 {
        db.cache.kv().set(&format!("k{i:02}"), &json!(i)).unwrap();
    }
    // k00 is the oldest write, k59 the newest.
    db.exec(
        "UPDATE cache_entries SET created_at = \
         now() - interval '1 minute' * (100 - substring(key from 2)::int)",
    );
    let report = db.cache.cleanup().unwrap();
    assert_eq!(report.evicted_rows(), 40);
    for i in 0..60 {
        let kept = db.cache.kv().get(&format!("k{i:02}")).unwrap().is_some();
        assert_eq!(kept, i >= 40, "k{i:02}");
    }
}

#[test]
fn a_prepared_get_on_a_cache_connection_reads_one_partition() {
    let db = TestDb::new();
    partitioned(&db);
    // The cache's own session settings: generic plans, pruned as they start.
    let mut conn = db.cache.connection().unwrap();
    for (table, key, value) in [
        ("cache_entries", "key", "'k'::text"),
        ("llm_response_cache", "key_hash", "'\\x00'::bytea"),
    ] {
        let plan = explain_generic(&mut conn, table, key, value);
        assert!(
            plan.contains(&format!("Subplans Removed: {}", PARTITIONS - 1)),
            "{table}:\n{plan}"
        );
    }
}

/// The plan of a prepared `SELECT ... WHERE key = $1` on `conn`, planned as its
/// session settings say.
fn explain_generic(conn: &mut diesel::PgConnection, table: &str, key: &str, value: &str) -> String {
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::Text;
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }
    conn.batch_execute(&format!(
        "PREPARE get_{table} AS SELECT * FROM {table} \
           WHERE {key} = $1 AND expires_at > statement_timestamp()"
    ))
    .unwrap();
    let lines: Vec<Line> =
        diesel::sql_query(format!("EXPLAIN (COSTS OFF) EXECUTE get_{table}({value})"))
            .load(conn)
            .unwrap();
    lines
        .into_iter()
        .map(|l| l.line)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn near_cache_triggers_move_to_the_partitioned_table_and_evict() {
    let db = TestDb::with(|b| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_millis(100))
    });
    wait_current(&db.cache);
    partitioned(&db);
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_trigger \
             WHERE tgrelid = 'cache_entries'::regclass AND tgname LIKE 'pgcache_near_%'"
        ),
        3
    );
    db.cache.kv().set("k", &json!("cached")).unwrap();
    db.cache.kv().get("k").unwrap();
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("cached")));
    db.exec("UPDATE cache_entries SET value = '\"outside\"' WHERE key = 'k'");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("outside")));
}

/// The staleness bound of the near caches here.
const BOUND: Duration = Duration::from_millis(100);

/// Another process's manager on `db`'s tables, with a kv near cache, current.
fn near_reader(db: &TestDb) -> CacheManager {
    let reader = CacheManager::new(
        db.config()
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(BOUND)
            .build()
            .unwrap(),
    )
    .unwrap();
    wait_current(&reader);
    reader
}

/// The leaf partitions of `table`, as SQL names.
fn leaves_of(db: &TestDb, table: &str) -> Vec<String> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Leaf {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    diesel::sql_query(format!(
        "SELECT relid::regclass::text AS name FROM pg_partition_tree('{table}') WHERE isleaf"
    ))
    .load::<Leaf>(&mut db.raw_connection())
    .unwrap()
    .into_iter()
    .map(|l| l.name)
    .collect()
}

/// `cache_entries` and each of its partitions carry the three near-cache triggers:
/// a statement fires only the statement triggers of the table it names.
fn assert_near_triggers_on_every_partition(db: &TestDb) {
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_trigger t \
             JOIN pg_partition_tree('cache_entries') p ON p.relid = t.tgrelid \
             WHERE t.tgname LIKE 'pgcache_near_%'"
        ),
        3 * (1 + i64::from(PARTITIONS))
    );
}

#[test]
fn eviction_on_partitioned_tables_reaches_other_processes_near_caches() {
    // The triggers come first (this manager's near cache), the partitions after.
    let db = TestDb::with(|b| {
        b.max_entries(CacheKind::Kv, Some(40))
            .eviction_low_watermark(0.5)
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(BOUND)
    });
    wait_current(&db.cache);
    partitioned(&db);
    assert_near_triggers_on_every_partition(&db);
    let reader = near_reader(&db);
    let keys: Vec<String> = (0..60).map(|i| format!("k{i:02}")).collect();
    for (i, key) in keys.iter().enumerate() {
        db.cache.kv().set(key, &json!(i)).unwrap();
    }
    // k00 is the oldest write, k59 the newest (not logged: no near cache holds
    // created_at).
    db.exec(
        "UPDATE cache_entries SET created_at = \
         now() - interval '1 minute' * (100 - substring(key from 2)::int)",
    );
    let read_all = |expect_evicted: bool| {
        for (i, key) in keys.iter().enumerate() {
            let expected = (!expect_evicted || i >= 40).then(|| json!(i));
            assert_eq!(reader.kv().get(key).unwrap(), expected, "{key}");
        }
    };
    assert_held(&reader, CacheKind::Kv, 60, || read_all(false));
    // Cleanup evicts partition by partition.
    assert_eq!(db.cache.cleanup().unwrap().evicted_rows(), 40);
    wait_polled_since(&reader, CacheKind::Kv, Instant::now());
    let (hits, misses) = hits_and_misses(&reader, CacheKind::Kv, || read_all(true));
    assert_eq!(
        (hits, misses),
        (20, 40),
        "the evicted keys went to the database"
    );
}

#[test]
fn plain_sql_naming_a_partition_reaches_other_processes_near_caches() {
    // The partitions come first, the triggers after (the reader's start).
    let db = TestDb::new();
    partitioned(&db);
    let reader = near_reader(&db);
    assert_near_triggers_on_every_partition(&db);
    let leaves = leaves_of(&db, "cache_entries");
    let statements = [
        (
            "UPDATE {leaf} SET value = '\"updated\"' WHERE key = 'k'",
            Some(json!("updated")),
        ),
        ("DELETE FROM {leaf} WHERE key = 'k'", None),
        ("TRUNCATE {leaf}", None),
    ];
    for (sql, expected) in statements {
        db.cache.kv().set("k", &json!("cached")).unwrap();
        // The reader may hold the last round's value until it polls.
        wait_polled_since(&reader, CacheKind::Kv, Instant::now());
        assert_held(&reader, CacheKind::Kv, 1, || {
            assert_eq!(
                reader.kv().get("k").unwrap(),
                Some(json!("cached")),
                "{sql}"
            );
        });
        // Naming each partition: one of them holds `k`.
        for leaf in &leaves {
            db.exec(&sql.replace("{leaf}", leaf));
        }
        wait_polled_since(&reader, CacheKind::Kv, Instant::now());
        let (_, misses) = hits_and_misses(&reader, CacheKind::Kv, || {
            assert_eq!(reader.kv().get("k").unwrap(), expected, "{sql}");
        });
        assert_eq!(misses, 1, "{sql}: read through the near cache");
    }
}

#[test]
fn near_cache_triggers_missing_on_a_partition_are_installed_at_start() {
    // As an earlier version left a partitioned table: triggers on the table only.
    let db = TestDb::with(|b| b.near_cache(CacheKind::Kv, Some(NearCache::new())));
    wait_current(&db.cache);
    partitioned(&db);
    for leaf in leaves_of(&db, "cache_entries") {
        db.exec(&format!(
            "DROP TRIGGER pgcache_near_update ON {leaf}; \
             DROP TRIGGER pgcache_near_delete ON {leaf}; \
             DROP TRIGGER pgcache_near_truncate ON {leaf}"
        ));
    }
    near_reader(&db);
    assert_near_triggers_on_every_partition(&db);
}

#[test]
fn unlogged_switches_every_partition() {
    let db = TestDb::new();
    partitioned(&db);
    db.cache.set_tables_logged(false).unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_partition_tree('cache_entries') t \
             JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf AND c.relpersistence = 'u'"
        ),
        i64::from(PARTITIONS)
    );
    db.cache.set_tables_logged(true).unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_partition_tree('cache_entries') t \
             JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf AND c.relpersistence = 'u'"
        ),
        0
    );
}

/// Partitioning and distributed tables (Citus) both need every unique index of a
/// table to contain its partition/distribution column: the key, which is the whole
/// primary key.
#[test]
fn every_unique_index_of_a_cache_table_contains_its_key() {
    let db = TestDb::new();
    for kind in CacheKind::ALL {
        let t = kind.table();
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) AS n FROM pg_index WHERE indrelid = '{t}'::regclass \
                 AND indisprimary AND indnatts = 1"
            )),
            1,
            "{kind}: a one-column primary key"
        );
        let without_key = db.count(&format!(
            "SELECT count(*) AS n FROM pg_index x, pg_index pk \
             WHERE x.indrelid = '{t}'::regclass AND x.indisunique \
               AND pk.indrelid = x.indrelid AND pk.indisprimary \
               AND NOT pk.indkey[0] = ANY (x.indkey::int2[])"
        ));
        assert_eq!(without_key, 0, "{kind}: a unique index without the key");
    }
}
