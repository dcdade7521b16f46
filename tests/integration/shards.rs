//! One cache over several PostgreSQL databases (shards `a`, `b`, `c`): every key
//! lives on the shard its digest names, batches make one statement per shard,
//! maintenance reaches every shard, and a shard that is down fails (or, fail-open,
//! misses) only its own keys.
//!
//! Each test creates databases of its own (on the local server, or on a scratch
//! cluster for the tests that count statements or stop a server) and drops them
//! afterwards.

use crate::common;
use crate::near_support;
use crate::scratch;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use pgcache::{
    Alert, Cache, CacheConfig, CacheConfigBuilder, CacheKind, CacheManager, EmbeddingKey,
    HealthThresholds, LlmPrompt, NearCache, Warmup,
};
use scratch::ScratchCluster;
use serde_json::{json, Value};

/// The schema every shard's tables go to (not the default, so that a shard
/// migrating into the wrong schema shows).
const SCHEMA: &str = "sharded";

const SHARDS: [&str; 3] = ["a", "b", "c"];

const TTL: Duration = Duration::from_secs(600);

/// The connection timeout of the tests that stop a shard.
const CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);

/// How much longer than the connection timeout a down shard's key may take to fail
/// (a noisy machine).
const MARGIN: Duration = Duration::from_secs(2);

// ----------------------------------------------------------------------------
// Databases and managers
// ----------------------------------------------------------------------------

/// A database of a test's own that holds one shard, dropped with this value (so a
/// manager using it must be dropped first: declare it before the databases).
struct ShardDb {
    shard: String,
    /// The database's name.
    name: String,
    /// A URL of the same server, to an existing database, for creating and dropping.
    admin_url: String,
    url: String,
}

impl ShardDb {
    fn create(admin_url: &str, shard: &str, tag: &str) -> Self {
        let name = format!("pgcache_shard_{tag}_{shard}");
        PgConnection::establish(admin_url)
            .expect("the server is reachable")
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        ShardDb {
            shard: shard.to_owned(),
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
        }
    }

    /// A plain connection (not the cache's) to this database, the cache's schema on
    /// its path.
    fn sql(&self) -> PgConnection {
        let mut conn = PgConnection::establish(&self.url).expect("connect to a shard");
        conn.batch_execute(&format!("SET search_path TO {SCHEMA}"))
            .unwrap();
        conn
    }

    fn exec(&self, sql: &str) {
        self.sql().batch_execute(sql).unwrap();
    }

    fn count(&self, table: &str) -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
            .get_result::<N>(&mut self.sql())
            .unwrap()
            .n
    }

    /// The keys of the kv entries stored in this database.
    fn kv_keys(&self) -> Vec<String> {
        #[derive(QueryableByName)]
        struct K {
            #[diesel(sql_type = Text)]
            key: String,
        }
        diesel::sql_query("SELECT key FROM cache_entries")
            .load::<K>(&mut self.sql())
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect()
    }
}

impl Drop for ShardDb {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.admin_url) {
            let _ = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// `url` with its database replaced by `database` (query parameters kept).
fn with_database(url: &str, database: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let (head, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let server_end = head[after_scheme..]
        .find('/')
        .map_or(head.len(), |i| after_scheme + i);
    format!("{}/{database}{query}", &head[..server_end])
}

/// One database per shard name on the server `admin_url` points at.
fn databases(admin_url: &str, shards: &[&str]) -> Vec<ShardDb> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    shards
        .iter()
        .map(|shard| ShardDb::create(admin_url, shard, &tag))
        .collect()
}

/// A builder over these databases as shards (in this order), with the stats
/// flusher and the janitor out of the way.
fn config(dbs: &[&ShardDb]) -> CacheConfigBuilder {
    let mut builder = CacheConfig::builder()
        .schema(SCHEMA)
        .application_name("pgcache-shards-test")
        .pool_max_size(3)
        .pool_min_idle(0)
        .stats_flush_interval(Duration::from_secs(3600))
        .no_janitor();
    for db in dbs {
        builder = builder.shard(db.shard.as_str(), db.url.as_str());
    }
    builder
}

fn manager(
    dbs: &[&ShardDb],
    tweak: impl FnOnce(CacheConfigBuilder) -> CacheConfigBuilder,
) -> CacheManager {
    CacheManager::new(tweak(config(dbs)).build().expect("valid config"))
        .expect("the shards are reachable")
}

/// A manager over three databases of the local server as shards `a`, `b`, `c`.
struct Sharded {
    // Declared first: dropped before the databases it uses.
    cache: CacheManager,
    dbs: Vec<ShardDb>,
}

impl Sharded {
    fn new() -> Self {
        let dbs = databases(&common::database_url(), &SHARDS);
        let cache = manager(&dbs.iter().collect::<Vec<_>>(), |b| b);
        Sharded { cache, dbs }
    }

    /// Rows of `table` per shard.
    fn rows(&self, table: &str) -> BTreeMap<String, i64> {
        rows_per_shard(&self.dbs, table)
    }
}

fn rows_per_shard(dbs: &[ShardDb], table: &str) -> BTreeMap<String, i64> {
    dbs.iter()
        .map(|db| (db.shard.clone(), db.count(table)))
        .collect()
}

// ----------------------------------------------------------------------------
// Keys and where they belong
// ----------------------------------------------------------------------------

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn refs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

/// The shard a kv key belongs on.
fn shard_of(cache: &CacheManager, key: &str) -> String {
    let digest = cache.kv().key_digest(key).unwrap();
    cache.shard_map().name_of(&digest).to_owned()
}

/// How many of these digests belong on each shard (every shard listed, even with 0).
fn expected(
    cache: &CacheManager,
    digests: impl IntoIterator<Item = pgcache::KeyDigest>,
) -> BTreeMap<String, i64> {
    let mut counts: BTreeMap<String, i64> = SHARDS.iter().map(|s| (s.to_string(), 0)).collect();
    for digest in digests {
        *counts
            .entry(cache.shard_map().name_of(&digest).to_owned())
            .or_default() += 1;
    }
    counts
}

fn expected_kv(cache: &CacheManager, keys: &[String]) -> BTreeMap<String, i64> {
    expected(
        cache,
        keys.iter().map(|k| cache.kv().key_digest(k).unwrap()),
    )
}

/// Asserts that every shard gets a fair part of `counts` (the keys are fixed, so
/// this checks the routing spreads, not luck).
fn assert_spread(counts: &BTreeMap<String, i64>) {
    let total: i64 = counts.values().sum();
    assert_eq!(counts.len(), SHARDS.len(), "{counts:?}");
    assert!(
        counts.values().all(|&n| n * 5 >= total),
        "every shard holds at least a fifth: {counts:?}"
    );
}

fn prompts(n: usize, owner: Option<uuid::Uuid>) -> Vec<LlmPrompt> {
    (0..n)
        .map(|i| {
            let prompt = LlmPrompt::new(format!("question {i}"), "provider");
            match owner {
                Some(user) => prompt.owned_by(user),
                None => prompt,
            }
        })
        .collect()
}

// ----------------------------------------------------------------------------
// Routing
// ----------------------------------------------------------------------------

#[test]
fn every_kv_key_lives_in_the_database_its_shard_names() {
    let s = Sharded::new();
    let kv = s.cache.kv();
    let keys = keys("key:", 300);
    for (i, key) in keys.iter().enumerate() {
        kv.set(key, &json!(i)).unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(kv.get(key).unwrap(), Some(json!(i)), "{key}");
    }
    let mut stored = 0;
    for db in &s.dbs {
        let held = db.kv_keys();
        for key in &held {
            assert_eq!(
                shard_of(&s.cache, key),
                db.shard,
                "{key} is in {}",
                db.shard
            );
        }
        stored += held.len();
    }
    assert_eq!(stored, keys.len(), "each key is stored exactly once");
    assert_spread(&s.rows("cache_entries"));

    for key in &keys {
        assert!(kv.delete(key).unwrap(), "{key}");
    }
    assert!(s.rows("cache_entries").values().all(|&n| n == 0));
    assert_eq!(kv.get(&keys[0]).unwrap(), None);
}

#[test]
fn typed_entries_spread_over_the_shards_their_digests_name() {
    let s = Sharded::new();
    let llm = s.cache.llm_response();
    let prompts = prompts(90, None);
    for (i, prompt) in prompts.iter().enumerate() {
        llm.set(prompt, &format!("answer {i}")).unwrap();
    }
    let table = CacheKind::LlmResponse.table();
    let rows = s.rows(table);
    assert_eq!(
        rows,
        expected(&s.cache, prompts.iter().map(|p| p.digest().unwrap()))
    );
    assert_spread(&rows);
    for (i, prompt) in prompts.iter().enumerate() {
        let hit = llm.get(prompt).unwrap().expect("a hit");
        assert_eq!(hit.response, format!("answer {i}"));
    }
}

#[test]
fn reports_and_single_key_operations_work_across_shards() {
    let s = Sharded::new();
    let kv = s.cache.kv();
    let keys = keys("user:", 30);
    for (i, key) in keys.iter().enumerate() {
        let plan = if i % 3 == 0 { "pro" } else { "free" };
        kv.set(key, &json!({ "plan": plan, "n": i })).unwrap();
    }
    // Containment over every shard, in key order, limited after the merge.
    let found = kv.find_containing(&json!({"plan": "pro"}), 4).unwrap();
    let mut pro: Vec<&String> = keys.iter().step_by(3).collect();
    pro.sort();
    let names: Vec<&String> = found.iter().map(|(k, _)| k).collect();
    assert_eq!(names, pro[..4].to_vec());

    // Redis-style operations land on the key's own shard.
    let on = |key: &str| {
        s.dbs
            .iter()
            .find(|db| db.shard == shard_of(&s.cache, key))
            .unwrap()
    };
    for i in 0..10 {
        let key = format!("counter:{i}");
        assert_eq!(kv.incr(&key, 5, TTL).unwrap(), 5);
        assert!(on(&key).kv_keys().contains(&key), "{key}");
        assert!(kv.set_nx(&format!("lock:{i}"), &json!(1), TTL).unwrap());
        assert!(!kv.set_nx(&format!("lock:{i}"), &json!(2), TTL).unwrap());
        assert_eq!(kv.get_del(&format!("lock:{i}")).unwrap(), Some(json!(1)));
    }

    // Hit counts go to each entry's own shard; `top` merges the shards' lists.
    let llm = s.cache.llm_response();
    let prompts = prompts(12, None);
    for (i, prompt) in prompts.iter().enumerate() {
        llm.set(prompt, &format!("answer {i}")).unwrap();
        for _ in 0..i {
            llm.get(prompt).unwrap().expect("a hit");
        }
    }
    let top = llm.top(3).unwrap();
    let hits: Vec<u64> = top.iter().map(|t| t.hits).collect();
    assert_eq!(hits, [11, 10, 9], "the most hit over every shard");
    let stats = s.cache.stats().unwrap();
    assert_eq!(stats.top_llm_responses[0].hits, 11);
    assert_eq!(stats.total_entries, 30 + 10 + 12);
}

#[test]
fn batches_across_shards_answer_in_key_order() {
    let s = Sharded::new();
    let kv = s.cache.kv();
    let keys = keys("key:", 100);
    let values: Vec<Value> = (0..100).map(|i| json!(i)).collect();
    let mut entries: Vec<(&str, &Value)> = keys.iter().map(String::as_str).zip(&values).collect();
    // A key given twice keeps its last value.
    let overwritten = json!("last");
    entries.push((keys[7].as_str(), &overwritten));
    kv.set_many(&entries, TTL).unwrap();
    assert_eq!(s.rows("cache_entries"), expected_kv(&s.cache, &keys));

    let value_of = |key: &str| -> Option<Value> {
        match keys.iter().position(|k| k == key) {
            Some(7) => Some(overwritten.clone()),
            Some(i) => Some(json!(i)),
            None => None,
        }
    };
    // Every key backwards, with missing keys and repeats between them.
    let mut asked: Vec<String> = keys.iter().rev().cloned().collect();
    asked.insert(10, "missing:1".to_owned());
    asked.insert(40, keys[3].clone());
    asked.push(keys[3].clone());
    asked.push("missing:2".to_owned());
    let asked = refs(&asked);
    let expected_values: Vec<Option<Value>> = asked.iter().map(|k| value_of(k)).collect();
    assert_eq!(kv.get_many(&asked).unwrap(), expected_values);

    // The even keys, each twice, plus missing ones: each live key counts once.
    let mut doomed: Vec<&str> = refs(&keys).into_iter().step_by(2).collect();
    doomed.extend(doomed.clone());
    doomed.push("missing:3");
    assert_eq!(kv.delete_many(&doomed).unwrap(), 50);
    let left: Vec<Option<Value>> = kv.get_many(&refs(&keys)).unwrap();
    for (i, value) in left.iter().enumerate() {
        let want = if i % 2 == 0 { None } else { value_of(&keys[i]) };
        assert_eq!(value, &want, "{}", keys[i]);
    }
    let odd: Vec<String> = keys.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(s.rows("cache_entries"), expected_kv(&s.cache, &odd));
}

#[test]
fn a_connection_comes_from_one_named_shard() {
    let s = Sharded::new();
    assert!(
        s.cache.connection().is_err(),
        "several shards have no single connection"
    );
    for db in &s.dbs {
        let mut conn = s.cache.shard_connection(&db.shard).unwrap();
        #[derive(QueryableByName)]
        struct Db {
            #[diesel(sql_type = Text)]
            name: String,
        }
        let current = diesel::sql_query("SELECT current_database() AS name")
            .get_result::<Db>(&mut conn)
            .unwrap();
        assert_eq!(current.name, db.name);
    }
    assert!(s.cache.shard_connection("nope").is_err());
}

// ----------------------------------------------------------------------------
// One statement per shard
// ----------------------------------------------------------------------------

#[derive(QueryableByName, Debug)]
struct Statement {
    #[diesel(sql_type = Text)]
    datname: String,
    #[diesel(sql_type = Text)]
    query: String,
    #[diesel(sql_type = BigInt)]
    calls: i64,
}

/// Runs `op`, then asserts that it made exactly one statement on the cache's table
/// in each database, of the kind `verb` (`SELECT`, `INSERT`, `DELETE`).
fn assert_one_statement_per_shard(
    stats: &mut PgConnection,
    dbs: &[ShardDb],
    verb: &str,
    op: impl FnOnce(),
) {
    stats
        .batch_execute("SELECT pg_stat_statements_reset()")
        .unwrap();
    op();
    let statements: Vec<Statement> = diesel::sql_query(
        "SELECT d.datname::text AS datname, s.query, s.calls \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE s.query ILIKE '%cache_entries%'",
    )
    .load(stats)
    .unwrap();
    for db in dbs {
        let here: Vec<&Statement> = statements.iter().filter(|s| s.datname == db.name).collect();
        let calls: i64 = here.iter().map(|s| s.calls).sum();
        assert_eq!(calls, 1, "{verb} on shard {}: {here:#?}", db.shard);
        assert!(
            here[0].query.trim_start().to_uppercase().starts_with(verb),
            "{verb} on shard {}: {here:#?}",
            db.shard
        );
    }
}

#[test]
fn a_batch_makes_one_statement_per_shard() {
    let cluster =
        ScratchCluster::start_configured(&["shared_preload_libraries=pg_stat_statements"]);
    let dbs = databases(&cluster.url(), &SHARDS);
    let cache = manager(&dbs.iter().collect::<Vec<_>>(), |b| b);
    // The view shows every database's statements from the one it is created in.
    let mut stats = PgConnection::establish(&cluster.url()).unwrap();
    stats
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .unwrap();

    let keys = keys("key:", 100);
    let keys = refs(&keys);
    let value = json!("v");
    let entries: Vec<(&str, &Value)> = keys.iter().map(|k| (*k, &value)).collect();
    let kv = cache.kv();
    assert_one_statement_per_shard(&mut stats, &dbs, "INSERT", || {
        kv.set_many(&entries, TTL).unwrap()
    });
    assert_one_statement_per_shard(&mut stats, &dbs, "SELECT", || {
        assert!(kv.get_many(&keys).unwrap().iter().all(Option::is_some))
    });
    assert_one_statement_per_shard(&mut stats, &dbs, "DELETE", || {
        assert_eq!(kv.delete_many(&keys).unwrap(), 100)
    });
}

// ----------------------------------------------------------------------------
// Operations over every shard
// ----------------------------------------------------------------------------

#[test]
fn delete_prefix_and_clear_reach_every_shard() {
    let s = Sharded::new();
    let kv = s.cache.kv();
    let (mine, theirs) = (keys("user:1:", 60), keys("user:2:", 60));
    for key in mine.iter().chain(&theirs) {
        kv.set(key, &json!(key)).unwrap();
    }
    assert_spread(&expected_kv(&s.cache, &mine));

    assert_eq!(kv.delete_prefix("user:1:").unwrap(), 60);
    assert!(kv
        .get_many(&refs(&mine))
        .unwrap()
        .iter()
        .all(Option::is_none));
    assert_eq!(s.rows("cache_entries"), expected_kv(&s.cache, &theirs));

    assert_eq!(kv.clear().unwrap(), 60);
    assert!(s.rows("cache_entries").values().all(|&n| n == 0));

    for (i, prompt) in prompts(30, None).iter().enumerate() {
        s.cache.llm_response().set(prompt, &i.to_string()).unwrap();
    }
    kv.set_many(&[("x", &json!(1)), ("y", &json!(2)), ("z", &json!(3))], TTL)
        .unwrap();
    let cleared: BTreeMap<CacheKind, u64> = s.cache.clear(None).unwrap().into_iter().collect();
    assert_eq!(cleared[&CacheKind::LlmResponse], 30);
    assert_eq!(cleared[&CacheKind::Kv], 3);
    for table in [CacheKind::LlmResponse.table(), "cache_entries"] {
        assert!(s.rows(table).values().all(|&n| n == 0), "{table}");
    }
}

#[test]
fn cleanup_removes_expired_rows_from_every_shard() {
    let s = Sharded::new();
    let kv = s.cache.kv();
    let keys = keys("key:", 90);
    for (i, key) in keys.iter().enumerate() {
        kv.set(key, &json!(i)).unwrap();
    }
    for db in &s.dbs {
        db.exec(
            "UPDATE cache_entries SET expires_at = now() - interval '1 second' \
             WHERE substring(key from 5)::int % 2 = 0",
        );
    }
    let report = s.cache.cleanup().unwrap();
    assert_eq!(report.rows_removed(), 45);
    let odd: Vec<String> = keys.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(s.rows("cache_entries"), expected_kv(&s.cache, &odd));
    for key in &odd {
        assert!(kv.get(key).unwrap().is_some(), "{key}");
    }
}

#[test]
fn invalidation_reaches_every_shard() {
    let s = Sharded::new();
    // Fixed owners: the owner is in each digest, and random ones would make the
    // spread asserted below a matter of luck.
    let (user, other) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
    let llm = s.cache.llm_response();
    let (owned, kept) = (prompts(45, Some(user)), prompts(15, Some(other)));
    for prompt in owned.iter().chain(&kept) {
        llm.set(prompt, &"answer".to_owned()).unwrap();
    }
    let embedding = |i: usize, model: &str, owner: uuid::Uuid| {
        EmbeddingKey::new(format!("text {i}"), model).owned_by(owner)
    };
    for i in 0..45 {
        s.cache
            .embedding()
            .set(&embedding(i, "m", user), &vec![0.5; 4])
            .unwrap();
        s.cache
            .embedding()
            .set(&embedding(i, "retired", other), &vec![0.5; 4])
            .unwrap();
    }
    assert_spread(&expected(
        &s.cache,
        owned.iter().map(|p| p.digest().unwrap()),
    ));

    let report = s.cache.invalidate_user(user).unwrap();
    assert_eq!((report.llm_responses, report.embeddings), (45, 45));
    assert_eq!(
        s.rows(CacheKind::LlmResponse.table()),
        expected(&s.cache, kept.iter().map(|p| p.digest().unwrap()))
    );
    assert_eq!(s.cache.invalidate_model("retired").unwrap(), 45);
    assert!(s
        .rows(CacheKind::Embedding.table())
        .values()
        .all(|&n| n == 0));
}

#[test]
fn stats_sum_the_entries_of_every_shard() {
    let s = Sharded::new();
    let keys = keys("key:", 90);
    for key in &keys {
        s.cache.kv().set(key, &json!(1)).unwrap();
    }
    for prompt in &prompts(30, None) {
        s.cache.llm_response().set(prompt, &"a".to_owned()).unwrap();
    }
    assert_spread(&s.rows("cache_entries"));
    for key in &keys {
        assert!(s.cache.kv().get(key).unwrap().is_some(), "{key}");
    }
    let missing = self::keys("missing:", 12);
    assert!(s
        .cache
        .kv()
        .get_many(&refs(&missing))
        .unwrap()
        .iter()
        .all(Option::is_none));
    s.cache.flush_stats().unwrap();
    let stats = s.cache.stats().unwrap();
    assert_eq!((stats.lookups.hits, stats.lookups.misses), (90, 12));
    assert!(stats.shards_down.is_empty(), "{:?}", stats.shards_down);
    assert_eq!(stats.total_entries, 120);
    let kv = stats
        .caches
        .iter()
        .find(|t| t.cache == CacheKind::Kv)
        .unwrap();
    assert_eq!(kv.entries, 90);
}

#[test]
fn warmup_puts_each_entry_on_its_own_shard() {
    let s = Sharded::new();
    let keys = keys("warm:", 60);
    let prompts = prompts(30, None);
    let warmup: Warmup = serde_json::from_value(json!({
        "kv": keys.iter().map(|k| json!({"key": k, "value": k})).collect::<Vec<_>>(),
        "llm_responses": prompts
            .iter()
            .map(|p| {
                let mut item = serde_json::to_value(p).unwrap();
                item["response"] = json!("warm");
                item
            })
            .collect::<Vec<_>>(),
    }))
    .unwrap();
    let report = s.cache.warmup(&warmup).unwrap();
    assert_eq!((report.kv, report.llm_responses), (60, 30));
    assert_eq!(s.rows("cache_entries"), expected_kv(&s.cache, &keys));
    assert_eq!(
        s.rows(CacheKind::LlmResponse.table()),
        expected(&s.cache, prompts.iter().map(|p| p.digest().unwrap()))
    );
    assert_eq!(s.cache.kv().get(&keys[0]).unwrap(), Some(json!(keys[0])));
}

// ----------------------------------------------------------------------------
// A shard that is down
// ----------------------------------------------------------------------------

/// Shards `a` and `b` on the local server, `c` on a scratch cluster of the test's own.
struct PartlyScratch {
    dbs: Vec<ShardDb>,
    // Dropped after the databases on it.
    cluster: ScratchCluster,
}

impl PartlyScratch {
    fn new() -> Self {
        let cluster = ScratchCluster::start();
        let mut dbs = databases(&common::database_url(), &SHARDS[..2]);
        dbs.extend(databases(&cluster.url(), &SHARDS[2..]));
        PartlyScratch { dbs, cluster }
    }

    fn manager(&self, fail_open: bool) -> CacheManager {
        manager(&self.dbs.iter().collect::<Vec<_>>(), |b| {
            b.fail_open(fail_open)
                .pool_connection_timeout(CONNECTION_TIMEOUT)
        })
    }
}

/// Keys split by whether they live on shard `c`.
fn split_on_c(cache: &CacheManager, keys: &[String]) -> (Vec<String>, Vec<String>) {
    keys.iter()
        .cloned()
        .partition(|k| shard_of(cache, k) == "c")
}

/// Asserts that `get(key)` fails with a transient error within the connection
/// timeout (plus a margin).
fn assert_fails_fast(cache: &CacheManager, key: &str) {
    let started = Instant::now();
    let err = cache
        .kv()
        .get(key)
        .expect_err("a key on a down shard fails");
    let took = started.elapsed();
    assert!(err.is_transient(), "{key}: {err:?}");
    assert!(
        took < CONNECTION_TIMEOUT + MARGIN,
        "{key} took {took:?} to fail"
    );
}

/// Whether `health` alerts that shard `c` is down (and no other shard).
fn has_shard_down_alert(cache: &CacheManager) -> bool {
    let health = cache.health(&HealthThresholds::new()).unwrap();
    let down: Vec<&str> = health
        .alerts
        .iter()
        .filter_map(|a| match a {
            Alert::ShardDown { shard, .. } => Some(shard.as_str()),
            _ => None,
        })
        .collect();
    assert!(down.iter().all(|s| *s == "c"), "{:?}", health.alerts);
    !down.is_empty()
}

#[test]
fn a_down_shard_fails_only_its_own_keys() {
    let p = PartlyScratch::new();
    let strict = p.manager(false);
    let open = p.manager(true);
    let keys = keys("key:", 60);
    for (i, key) in keys.iter().enumerate() {
        strict.kv().set(key, &json!(i)).unwrap();
    }
    let (on_c, elsewhere) = split_on_c(&strict, &keys);
    assert!(!on_c.is_empty() && !elsewhere.is_empty());
    let value_of = |key: &str| json!(keys.iter().position(|k| k == key).unwrap());

    p.cluster.stop();
    assert_fails_fast(&strict, &on_c[0]);
    let err = strict
        .kv()
        .set(&on_c[0], &json!("new"))
        .expect_err("a write to a down shard fails");
    assert!(err.is_transient(), "{err:?}");
    for key in &elsewhere {
        assert_eq!(strict.kv().get(key).unwrap(), Some(value_of(key)), "{key}");
    }
    let err = strict.kv().get_many(&refs(&keys)).unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("shard `c`"), "{err}");
    // Operations over every shard (ones that change nothing on a and b here).
    let err = strict.kv().delete_prefix("absent:").unwrap_err();
    assert!(err.to_string().contains("shard `c`"), "{err}");
    let err = strict.cleanup().unwrap_err();
    assert!(err.to_string().contains("shard `c`"), "{err}");
    // A warmup whose entries all live on a and b does not need c; one with an entry
    // for c fails naming it, after a and b stored theirs.
    let warm = |keys: &[String]| -> Warmup {
        let kv: Vec<Value> = keys
            .iter()
            .map(|k| json!({"key": k, "value": "warm"}))
            .collect();
        serde_json::from_value(json!({ "kv": kv })).unwrap()
    };
    assert_eq!(strict.warmup(&warm(&elsewhere[..2])).unwrap().kv, 2);
    let err = strict
        .warmup(&warm(&[elsewhere[2].clone(), on_c[0].clone()]))
        .unwrap_err();
    assert!(err.to_string().contains("shard `c`"), "{err}");
    assert_eq!(strict.kv().get(&elsewhere[2]).unwrap(), Some(json!("warm")));
    for key in &elsewhere[..3] {
        strict.kv().set(key, &value_of(key)).unwrap();
    }

    // Fail-open: the down shard's keys miss, the others hit.
    let got = open.kv().get_many(&refs(&keys)).unwrap();
    for (key, value) in keys.iter().zip(got) {
        let want = (!on_c.contains(key)).then(|| value_of(key));
        assert_eq!(value, want, "{key}");
    }
    assert_eq!(open.kv().get(&on_c[0]).unwrap(), None);

    let stats = strict.stats().unwrap();
    let down: Vec<&str> = stats.shards_down.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(down, ["c"]);
    assert!(!stats.shards_down[0].error.is_empty());
    assert_eq!(
        stats.total_entries,
        elsewhere.len() as u64,
        "a and b summed"
    );
    assert!(has_shard_down_alert(&strict));

    p.cluster.start_again();
    // Each manager learns within about a reconnect interval that c is back.
    let back = Instant::now();
    for cache in [&strict, &open] {
        while cache.kv().get(&on_c[0]).ok() != Some(Some(value_of(&on_c[0]))) {
            assert!(
                back.elapsed() < Duration::from_secs(3),
                "shard c never served again"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for key in &on_c {
        assert_eq!(strict.kv().get(key).unwrap(), Some(value_of(key)), "{key}");
    }
    let stats = strict.stats().unwrap();
    assert!(stats.shards_down.is_empty(), "{:?}", stats.shards_down);
    assert_eq!(stats.total_entries, keys.len() as u64);
    assert!(!has_shard_down_alert(&strict), "c is back");
}

#[test]
fn a_manager_starts_while_a_shard_is_down_and_uses_it_once_back() {
    let p = PartlyScratch::new();
    p.cluster.stop();
    let cache = p.manager(false);
    let keys = keys("key:", 30);
    let (on_c, elsewhere) = split_on_c(&cache, &keys);
    assert!(!on_c.is_empty() && !elsewhere.is_empty());
    for key in &elsewhere {
        cache.kv().set(key, &json!(key)).unwrap();
        assert_eq!(cache.kv().get(key).unwrap(), Some(json!(key)));
    }
    assert_fails_fast(&cache, &on_c[0]);

    p.cluster.start_again();
    // Its tables do not exist yet: the first operations after it answers create them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.kv().set(&on_c[0], &json!("back")).is_err() {
        assert!(Instant::now() < deadline, "shard c never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cache.kv().get(&on_c[0]).unwrap(), Some(json!("back")));
    assert_eq!(p.dbs[2].count("cache_entries"), 1);
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_batch_over_every_shards_near_cache_answers_in_key_order() {
    let dbs = databases(&common::database_url(), &SHARDS);
    let all: Vec<&ShardDb> = dbs.iter().collect();
    let cache = manager(&all, |b| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_secs(10))
    });
    near_support::wait_current(&cache);
    let keys = keys("hot:", 30);
    for (i, key) in keys.iter().enumerate() {
        cache.kv().set(key, &json!(i)).unwrap();
        // Read once: kept by the near cache of the key's shard.
        assert_eq!(cache.kv().get(key).unwrap(), Some(json!(i)));
    }
    let hits =
        |cache: &CacheManager| -> u64 { cache.near_cache_stats().iter().map(|s| s.hits).sum() };
    let before = hits(&cache);
    let mut asked: Vec<&str> = refs(&keys).into_iter().rev().collect();
    asked.insert(5, "missing:1");
    let found = cache.to_async().kv().get_many(&asked).await.unwrap();
    let expected: Vec<Option<Value>> = asked
        .iter()
        .map(|k| keys.iter().position(|key| key == k).map(|i| json!(i)))
        .collect();
    assert_eq!(found, expected);
    assert_eq!(
        hits(&cache),
        before + keys.len() as u64,
        "every held key served from its shard's near cache"
    );
    let spread = expected_kv(&cache, &keys);
    assert!(
        spread.len() == SHARDS.len() && spread.values().all(|&n| n > 0),
        "the keys span every shard: {spread:?}"
    );
}

#[test]
fn each_shards_near_cache_learns_of_writes_to_that_shard() {
    let dbs = databases(&common::database_url(), &SHARDS);
    let all: Vec<&ShardDb> = dbs.iter().collect();
    // A bound far above the deadline below: a poll slowed by a loaded machine must
    // not turn the near cache off (a bypass, not a hit), and a change that never
    // arrived cannot hide behind one.
    let near = |b: CacheConfigBuilder| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache_staleness(Duration::from_secs(10))
    };
    let (writer, reader) = (manager(&all, near), manager(&all, near));
    // Every shard's poller connected and has its baseline: a read before that goes
    // to the database and is not kept (a bypass, and no hit later).
    near_support::wait_current(&reader);
    let keys = keys("hot:", 30);
    for key in &keys {
        writer.kv().set(key, &json!(0)).unwrap();
        assert_eq!(reader.kv().get(key).unwrap(), Some(json!(0)));
    }
    // Held in the reader's memory: these gets are near-cache hits.
    for key in &keys {
        assert_eq!(reader.kv().get(key).unwrap(), Some(json!(0)));
    }
    let hits =
        |cache: &CacheManager| -> u64 { cache.near_cache_stats().iter().map(|s| s.hits).sum() };
    assert!(
        hits(&reader) >= keys.len() as u64,
        "{:?}",
        reader.near_cache_stats()
    );
    // A write to every shard reaches the reader through that shard's change log.
    for key in &keys {
        writer.kv().set(key, &json!(1)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for key in &keys {
        while reader.kv().get(key).unwrap() != Some(json!(1)) {
            assert!(
                Instant::now() < deadline,
                "{key} ({}) stayed stale",
                shard_of(&reader, key)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let pollers = reader.near_cache_stats();
    assert_eq!(
        pollers.len(),
        1,
        "one entry per cache, over the shards: {pollers:?}"
    );
    drop((writer, reader));
}

#[test]
fn an_applications_pool_cannot_hold_several_shards() {
    use diesel::r2d2::{ConnectionManager, Pool};
    let dbs = databases(&common::database_url(), &SHARDS[..2]);
    let pool = Pool::builder()
        .max_size(1)
        .build_unchecked(ConnectionManager::<PgConnection>::new(
            common::database_url(),
        ));
    let config = config(&dbs.iter().collect::<Vec<_>>()).build().unwrap();
    let err = CacheManager::with_pool(pool, config).unwrap_err();
    assert!(matches!(err, pgcache::Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("shard"), "{err}");
}

// ----------------------------------------------------------------------------
// Configuration
// ----------------------------------------------------------------------------

#[test]
fn shards_from_the_environment_route_by_name_not_position() {
    let dbs = databases(&common::database_url(), &SHARDS);
    let from_vars = |order: [usize; 3]| {
        let shards: Vec<String> = order
            .iter()
            .map(|&i| format!("{}={}", dbs[i].shard, dbs[i].url))
            .collect();
        let config = CacheConfig::from_vars([
            ("PGCACHE_SHARDS", shards.join(",")),
            ("PGCACHE_SCHEMA", SCHEMA.to_owned()),
            ("PGCACHE_POOL_MAX_SIZE", "3".to_owned()),
            ("PGCACHE_POOL_MIN_IDLE", "0".to_owned()),
        ])
        .unwrap();
        CacheManager::new(config).unwrap()
    };
    let (abc, cab) = (from_vars([0, 1, 2]), from_vars([2, 0, 1]));
    assert_eq!(abc.shard_map().names(), ["a", "b", "c"]);
    assert_eq!(cab.shard_map().names(), ["c", "a", "b"]);

    let keys = keys("key:", 60);
    for key in &keys {
        assert_eq!(shard_of(&abc, key), shard_of(&cab, key), "{key}");
        abc.kv().set(key, &json!(key)).unwrap();
    }
    assert_spread(&rows_per_shard(&dbs, "cache_entries"));
    let expected_values: Vec<Option<Value>> = keys.iter().map(|k| Some(json!(k))).collect();
    assert_eq!(cab.kv().get_many(&refs(&keys)).unwrap(), expected_values);
}

/// A URL of the local server at a port nothing listens on: a shard that is down
/// without stopping any server.
fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

#[test]
fn a_manager_starts_unless_every_shard_is_down() {
    let dbs = databases(&common::database_url(), &SHARDS[..1]);
    let builder = || {
        config(&[])
            .pool_connection_timeout(CONNECTION_TIMEOUT)
            .shard("b", closed_port_url())
    };
    let cache = CacheManager::new(builder().shard("a", dbs[0].url.as_str()).build().unwrap())
        .expect("one shard answering is enough to start");
    let keys = keys("key:", 20);
    let (on_a, on_b): (Vec<String>, Vec<String>) = keys
        .iter()
        .cloned()
        .partition(|k| shard_of(&cache, k) == "a");
    cache.kv().set(&on_a[0], &json!(1)).unwrap();
    assert_eq!(cache.kv().get(&on_a[0]).unwrap(), Some(json!(1)));
    let err = cache.kv().get(&on_b[0]).unwrap_err();
    assert!(err.is_transient(), "{err:?}");

    let none_up = || builder().shard("c", closed_port_url());
    let err = CacheManager::new(none_up().build().unwrap()).expect_err("no shard answers");
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("shard `"), "{err}");
    let open = CacheManager::new(none_up().fail_open(true).build().unwrap())
        .expect("fail-open starts with every shard down");
    assert_eq!(open.kv().get("k").unwrap(), None);
}

#[test]
fn a_manager_that_does_not_migrate_starts_unless_every_shard_is_down() {
    let dbs = databases(&common::database_url(), &SHARDS[..1]);
    let builder = || {
        config(&[])
            .run_migrations(false)
            .pool_connection_timeout(CONNECTION_TIMEOUT)
            .shard("b", closed_port_url())
    };
    let err = CacheManager::new(builder().shard("c", closed_port_url()).build().unwrap())
        .expect_err("no shard answers");
    assert!(err.is_transient(), "{err:?}");
    assert!(
        err.to_string().contains("shard `b`") || err.to_string().contains("shard `c`"),
        "{err}"
    );
    CacheManager::new(builder().shard("a", dbs[0].url.as_str()).build().unwrap())
        .expect("one shard answering is enough to start");
}

#[test]
fn shard_settings_are_checked_without_showing_passwords() {
    let url = |db: &str| format!("postgres://user:sekret@127.0.0.1:5432/{db}");
    let settings = format!("a={},b={}", url("one"), url("two"));
    let config = CacheConfig::from_vars([("PGCACHE_SHARDS", settings.as_str())]).unwrap();
    let names: Vec<&str> = config.shards().iter().map(|s| s.name()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(!format!("{config:?}").contains("sekret"), "{config:?}");

    for (bad, value) in [
        (format!("a={},a={}", url("one"), url("two")), Some("a")),
        (format!("a={},{}", url("one"), url("two")), None),
        (format!("a b={}", url("one")), Some("a b")),
        (String::new(), Some("")),
    ] {
        let err = CacheConfig::from_vars([("PGCACHE_SHARDS", bad.as_str())]).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("sekret"), "{err:?}");
        match &err {
            pgcache::Error::Config {
                setting,
                value: shown,
                ..
            } => {
                assert_eq!(setting, "PGCACHE_SHARDS", "{bad}");
                if let Some(value) = value {
                    assert_eq!(shown, value, "{bad}");
                }
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}
