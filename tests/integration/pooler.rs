//! Transaction-pooler mode (`PGCACHE_POOLER=transaction`) through a real PgBouncer
//! in `pool_mode = transaction`, whose few server connections every client shares:
//! every operation works, nothing pgcache sets stays on a server connection, and
//! without the mode the same operations fail (so these tests can).
//!
//! Each test logs in as a role of its own whose default search path is its schema,
//! so that statements relying on the search path find the cache's tables through
//! the pooler without any session `SET` of pgcache's; the tests marked as needing
//! schema-qualified statements log in with the default search path, which does not
//! name the cache's schema.

use crate::common;
use crate::near_support;
use crate::pgbouncer;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use diesel::connection::{CacheSize, SimpleConnection};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use near_support::wait_current;
use pgbouncer::{PgBouncer, SERVER_CONNECTIONS};
use pgcache::{
    Cache, CacheConfig, CacheConfigBuilder, CacheKind, CacheManager, EmbeddingKey, Error,
    HealthThresholds, LlmPrompt, NearCache, Pooler, Warmup,
};
use serde_json::json;

/// The near caches' staleness bound in these tests.
const BOUND: Duration = Duration::from_millis(100);

/// A test's role, schema and PgBouncer, and a manager in transaction-pooler mode.
struct Pooled {
    cache: Option<CacheManager>,
    bouncer: PgBouncer,
    /// The role the test logs in as.
    role: String,
    /// The cache's schema.
    schema: String,
}

impl Pooled {
    fn new() -> Self {
        Self::with(|b| b)
    }

    fn with(tweak: impl FnOnce(CacheConfigBuilder) -> CacheConfigBuilder) -> Self {
        Self::on_path(true, tweak)
    }

    /// With `on_path`, the role's default search path is the cache's schema;
    /// without, PostgreSQL's default (`"$user", public`), which does not name it.
    fn on_path(
        on_path: bool,
        tweak: impl FnOnce(CacheConfigBuilder) -> CacheConfigBuilder,
    ) -> Self {
        let schema = format!("pgcache_test_{}", uuid::Uuid::new_v4().simple());
        let role = format!("{schema}_role");
        let mut sql = format!("CREATE ROLE \"{role}\" LOGIN SUPERUSER;");
        if on_path {
            sql.push_str(&format!(
                "ALTER ROLE \"{role}\" SET search_path = \"{schema}\""
            ));
        }
        PgConnection::establish(&common::database_url())
            .unwrap()
            .batch_execute(&sql)
            .unwrap();
        let bouncer = PgBouncer::start(&[&role]);
        let mut pooled = Pooled {
            cache: None,
            bouncer,
            role,
            schema,
        };
        let config = tweak(pooled.config()).build().unwrap();
        pooled.cache = Some(CacheManager::new(config).expect("a manager through PgBouncer"));
        pooled
    }

    fn cache(&self) -> &CacheManager {
        self.cache.as_ref().unwrap()
    }

    /// Through PgBouncer, in transaction-pooler mode, the direct URL given; more
    /// connections than PgBouncer has server connections.
    fn config(&self) -> CacheConfigBuilder {
        CacheConfig::builder()
            .database_url(self.pooled_url())
            .pooler(Pooler::Transaction)
            .direct_url(self.direct_url())
            .schema(&self.schema)
            .application_name(format!("pgcache-test-{}", self.schema))
            .pool_max_size(2 * SERVER_CONNECTIONS)
            .pool_min_idle(0)
    }

    fn pooled_url(&self) -> String {
        self.bouncer.url(&self.role, "postgres")
    }

    fn direct_url(&self) -> String {
        format!("postgres://{}@127.0.0.1:5432/postgres", self.role)
    }

    /// An application's connection through PgBouncer: Diesel's statement cache off,
    /// as any client of a transaction pooler must have it.
    fn app_connection(&self) -> PgConnection {
        let mut conn = PgConnection::establish(&self.pooled_url()).unwrap();
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        conn
    }

    fn count(&self, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let mut conn = PgConnection::establish(&self.direct_url()).unwrap();
        conn.batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .unwrap();
        diesel::sql_query(sql).get_result::<N>(&mut conn).unwrap().n
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        drop(self.cache.take());
        let (role, schema) = (&self.role, &self.schema);
        let cleanup = format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; DROP OWNED BY \"{role}\"; \
             DROP ROLE IF EXISTS \"{role}\""
        );
        for _ in 0..5 {
            let dropped = PgConnection::establish(&common::database_url())
                .map_err(|e| e.to_string())
                .and_then(|mut c| c.batch_execute(&cleanup).map_err(|e| e.to_string()));
            if dropped.is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot drop test role and schema {role}");
    }
}

/// Runs `work` on `threads` threads at once, so that their statements interleave
/// on PgBouncer's server connections.
fn on_threads(threads: usize, work: impl Fn(usize) + Send + Sync) {
    let start = Barrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (start, work) = (&start, &work);
            s.spawn(move || {
                start.wait();
                work(t);
            });
        }
    });
}

#[test]
fn every_kv_operation_works_through_a_transaction_pooler() {
    let db = Pooled::new();
    let other = CacheManager::new(db.config().build().unwrap()).unwrap();
    let ttl = Duration::from_secs(60);
    on_threads(8, |t| {
        let cache = if t % 2 == 0 { db.cache() } else { &other };
        let kv = cache.kv();
        for i in 0..25 {
            let key = format!("t{t}:k{i}");
            kv.set(&key, &json!({"i": i})).unwrap();
            assert_eq!(kv.get(&key).unwrap(), Some(json!({"i": i})));
            let (a, b) = (format!("{key}:a"), format!("{key}:b"));
            kv.set_many(&[(&a, &json!(1)), (&b, &json!(2))], ttl)
                .unwrap();
            assert_eq!(
                kv.get_many(&[&a, &b, "none"]).unwrap(),
                vec![Some(json!(1)), Some(json!(2)), None]
            );
            assert_eq!(kv.delete_many(&[&a, &b]).unwrap(), 2);
            assert_eq!(kv.incr(&format!("t{t}:n"), 1, ttl).unwrap(), i + 1);
            assert!(kv.set_nx(&format!("{key}:nx"), &json!("x"), ttl).unwrap());
            assert!(!kv.set_nx(&format!("{key}:nx"), &json!("y"), ttl).unwrap());
            assert_eq!(kv.get_del(&format!("{key}:nx")).unwrap(), Some(json!("x")));
            kv.set_bytes(&format!("{key}:bytes"), b"raw", ttl).unwrap();
            assert_eq!(
                kv.get_bytes(&format!("{key}:bytes")).unwrap(),
                Some(b"raw".to_vec())
            );
            assert!(kv.delete(&key).unwrap());
        }
        assert_eq!(kv.delete_prefix(&format!("t{t}:")).unwrap(), 26);
    });
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 0);
}

#[test]
fn typed_caches_warmup_and_invalidation_work_through_a_transaction_pooler() {
    let db = Pooled::new();
    let cache = db.cache();
    let warmup: Warmup = serde_json::from_value(json!({
        "kv": [{"key": "config:v1", "value": {"theme": "dark"}}],
        "embeddings": [{"text": "What is AI?", "model": "m1", "embedding": [0.1, 0.2]}],
        "vector_searches": [{
            "user_id": "00000000-0000-0000-0000-000000000001",
            "embedding": [0.1, 0.2], "top_k": 5, "filters": {"lang": "en"},
            "results": [{"id": 1}]
        }],
        "llm_responses": [
            {"prompt": "Explain AI", "provider": "gemini-flash", "response": "AI is..."}
        ],
        "audio_chunks": [{
            "text": "Hello", "voice_model_id": "v1", "provider": "xtts-v2",
            "data": {"stored": {"path": "audio/hello.opus", "byte_size": 1200}},
            "format": "opus", "duration_ms": 500
        }]
    }))
    .unwrap();
    cache.warmup(&warmup).unwrap();
    assert_eq!(
        cache.kv().get("config:v1").unwrap(),
        Some(json!({"theme": "dark"}))
    );
    let key = EmbeddingKey::new("What is AI?", "m1");
    assert!(cache.embedding().get(&key).unwrap().is_some());
    let prompt = LlmPrompt::new("Explain AI", "gemini-flash");
    assert!(cache.llm_response().get(&prompt).unwrap().is_some());
    on_threads(4, |t| {
        let key = EmbeddingKey::new(format!("text {t}"), "m2");
        for i in 0..20 {
            cache.embedding().set(&key, &vec![i as f32, 1.0]).unwrap();
            let entry = cache.embedding().get(&key).unwrap();
            assert!(entry.is_some());
        }
        assert!(cache.embedding().delete(&key).unwrap());
    });
    assert_eq!(cache.invalidate_model("m1").unwrap(), 1);
    assert!(cache.embedding().get(&key).unwrap().is_none());
}

#[test]
fn single_flight_computes_once_across_two_managers_through_a_pooler() {
    let db = Pooled::new();
    let other = CacheManager::new(db.config().build().unwrap()).unwrap();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    on_threads(6, |t| {
        let cache = if t % 2 == 0 { db.cache() } else { &other };
        let value = cache
            .kv()
            .get_or_compute("report", || {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
                Ok::<_, Error>(json!({"total": 42}))
            })
            .unwrap();
        assert_eq!(value, json!({"total": 42}));
    });
    assert_eq!(calls.into_inner(), 1);
}

#[test]
fn cleanup_stats_and_health_work_through_a_transaction_pooler() {
    let db = Pooled::with(|b| b.max_entries(CacheKind::Kv, Some(10)));
    let cache = db.cache();
    let busy = CacheManager::new(db.config().build().unwrap()).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // Other clients keep PgBouncer's server connections changing hands, so a
        // statement that relied on its predecessor's session would meet another.
        for t in 0..(2 * SERVER_CONNECTIONS) {
            let (busy, done) = (&busy, &done);
            s.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = busy.kv().get(&format!("busy{t}"));
                }
            });
        }
        /// Stops the busy clients however the rounds end (a failed assertion too).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(&done);
        for round in 0..5 {
            let entries: Vec<(String, serde_json::Value)> = (0..200)
                .map(|i| (format!("r{round}:k{i}"), json!(i)))
                .collect();
            let refs: Vec<(&str, &serde_json::Value)> =
                entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
            cache.kv().set_many(&refs, Duration::from_secs(60)).unwrap();
            let report = cache.cleanup().unwrap();
            assert!(report.evicted_rows() >= 190, "{report:?}");
            assert!(db.count("SELECT count(*) AS n FROM cache_entries") <= 10);
        }
    });
    cache.kv().get("r4:k199").unwrap();
    cache.flush_stats().unwrap();
    let stats = cache.stats().unwrap();
    assert!(format!("{stats:?}").contains("cache_entries"));
    cache
        .health(&HealthThresholds::new().size_budget_bytes(1 << 30))
        .unwrap();
}

#[test]
fn operations_in_the_applications_transaction_commit_and_roll_back_with_it_through_a_pooler() {
    let db = Pooled::new();
    let kv = db.cache().kv();
    kv.set("user:1", &json!("old")).unwrap();
    let mut conn = db.app_connection();
    conn.batch_execute("CREATE TABLE app_users (id int PRIMARY KEY, name text)")
        .unwrap();
    let ttl = Duration::from_secs(60);
    // Rolled back: neither the application's row nor the cache's changes stay.
    let rolled_back = conn.transaction(|conn| {
        conn.batch_execute("INSERT INTO app_users VALUES (1, 'new')")?;
        assert!(kv.delete_in(conn, "user:1")?);
        kv.set_in(conn, "user:2", &json!("two"), ttl)?;
        assert_eq!(kv.get_in(conn, "user:2")?, Some(json!("two")));
        Err::<(), _>(Error::Connection("the application gives up".into()))
    });
    assert!(rolled_back.is_err());
    assert_eq!(kv.get("user:1").unwrap(), Some(json!("old")));
    assert_eq!(kv.get("user:2").unwrap(), None);
    assert_eq!(db.count("SELECT count(*) AS n FROM app_users"), 0);
    conn.transaction(|conn| {
        conn.batch_execute("INSERT INTO app_users VALUES (1, 'new')")?;
        kv.delete_many_in(conn, &["user:1"])?;
        kv.set_many_in(conn, &[("user:2", &json!("two"))], ttl)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(kv.get("user:1").unwrap(), None);
    assert_eq!(kv.get("user:2").unwrap(), Some(json!("two")));
    assert_eq!(db.count("SELECT count(*) AS n FROM app_users"), 1);
}

fn near(b: CacheConfigBuilder) -> CacheConfigBuilder {
    b.near_cache(CacheKind::Kv, Some(NearCache::new()))
        .near_cache_staleness(BOUND)
}

/// A near-cached reader talking to the server directly (another process).
fn direct_reader(db: &Pooled) -> CacheManager {
    let reader = CacheManager::new(
        near(db.config())
            .pooler(Pooler::None)
            .database_url(db.direct_url())
            .build()
            .unwrap(),
    )
    .unwrap();
    wait_current(&reader);
    reader
}

/// Reads `key` twice on `reader`, so the second read may come from memory.
fn warm(reader: &CacheManager, key: &str) {
    reader.kv().get(key).unwrap();
    reader.kv().get(key).unwrap();
}

/// What the server connections behind PgBouncer say of the stamping setting, asked
/// through PgBouncer by more clients at once than it has server connections, with
/// `plan_cache_mode` (pgcache's session setting without a pooler) when it is not
/// the server's default.
fn stamping_seen_through(db: &Pooled) -> Vec<Option<String>> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Nullable<Text>)]
        value: Option<String>,
        #[diesel(sql_type = Text)]
        plan: String,
    }
    let seen = std::sync::Mutex::new(Vec::new());
    on_threads(2 * SERVER_CONNECTIONS as usize, |_| {
        let mut conn = db.app_connection();
        for _ in 0..10 {
            let setting: Setting = diesel::sql_query(
                "SELECT current_setting('pgcache.stamps_changes', true) AS value, \
                   current_setting('plan_cache_mode') AS plan \
                 FROM pg_sleep(0.002)",
            )
            .get_result(&mut conn)
            .unwrap();
            let mut seen = seen.lock().unwrap();
            seen.push(setting.value);
            if setting.plan != "auto" {
                seen.push(Some(format!("plan_cache_mode={}", setting.plan)));
            }
        }
    });
    seen.into_inner().unwrap()
}

#[test]
fn a_near_cache_evicts_what_a_writer_through_the_pooler_changes_within_its_bound() {
    let db = Pooled::with(near);
    wait_current(db.cache());
    let reader = direct_reader(&db);
    for round in 0..5 {
        db.cache().kv().set("hot", &json!(round)).unwrap();
        warm(&reader, "hot");
        db.cache().kv().set("hot", &json!(round + 100)).unwrap();
        // The promise: a read starting more than the bound after the write
        // committed sees it.
        std::thread::sleep(BOUND);
        assert_eq!(reader.kv().get("hot").unwrap(), Some(json!(round + 100)));
        warm(&reader, "hot");
        assert!(db.cache().kv().delete("hot").unwrap());
        std::thread::sleep(BOUND);
        assert_eq!(reader.kv().get("hot").unwrap(), None);
    }
}

#[test]
fn plain_sql_through_the_same_pooler_is_still_logged_nothing_leaks() {
    let db = Pooled::with(near);
    wait_current(db.cache());
    let reader = direct_reader(&db);
    // pgcache's writes through the pooler, spread over its server connections.
    on_threads(8, |t| {
        for i in 0..20 {
            db.cache()
                .kv()
                .set(&format!("t{t}:{i}"), &json!(i))
                .unwrap();
        }
    });
    let seen: Vec<_> = stamping_seen_through(&db).into_iter().flatten().collect();
    assert!(
        seen.is_empty(),
        "session state left on server connections: {seen:?}"
    );
    db.cache().kv().set("shared", &json!("old")).unwrap();
    warm(&reader, "shared");
    let logged_before = db.count("SELECT count(*) AS n FROM cache_changes");
    let mut other = db.app_connection();
    for _ in 0..(2 * SERVER_CONNECTIONS) {
        other
            .batch_execute("UPDATE cache_entries SET value = '\"new\"' WHERE key = 'shared'")
            .unwrap();
    }
    assert!(db.count("SELECT count(*) AS n FROM cache_changes") > logged_before);
    std::thread::sleep(BOUND);
    assert_eq!(reader.kv().get("shared").unwrap(), Some(json!("new")));
}

#[test]
fn without_pooler_mode_prepared_statements_fail_through_pgbouncer() {
    let db = Pooled::new();
    let config = db
        .config()
        .pooler(Pooler::None)
        .run_migrations(false)
        .build()
        .unwrap();
    let sessionful = Arc::new(CacheManager::new(config).unwrap());
    let failures = std::sync::Mutex::new(Vec::new());
    on_threads(8, |t| {
        for i in 0..25 {
            let key = format!("t{t}:{i}");
            let done = sessionful
                .kv()
                .set(&key, &json!(i))
                .and_then(|()| sessionful.kv().get(&key));
            if let Err(error) = done {
                failures.lock().unwrap().push(error.to_string());
            }
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.iter().any(|f| f.contains("prepared statement")),
        "{failures:?}"
    );
}

#[test]
fn without_pooler_mode_the_stamping_setting_leaks_to_other_clients() {
    let db = Pooled::new();
    let config = near(db.config())
        .pooler(Pooler::None)
        .run_migrations(false)
        .build()
        .unwrap();
    let sessionful = CacheManager::new(config).unwrap();
    // Each new pooled connection's session set-up runs through PgBouncer on some
    // server connection, and stays there.
    on_threads(2 * SERVER_CONNECTIONS as usize, |_| {
        let _ = sessionful.kv().get("k");
        std::thread::sleep(Duration::from_millis(20));
    });
    assert!(stamping_seen_through(&db)
        .iter()
        .any(|v| v.as_deref() == Some("on")));
}

#[test]
fn a_pooler_without_a_direct_url_fails_at_start_saying_why() {
    let db = Pooled::new();
    let without = |b: CacheConfigBuilder| {
        let mut config = b.build().unwrap();
        // The builder cannot unset the direct URL: a fresh builder without it.
        let url = db.pooled_url();
        config = CacheConfig::builder()
            .database_url(url)
            .pooler(Pooler::Transaction)
            .schema(config.schema())
            .run_migrations(config.run_migrations())
            .near_cache(CacheKind::Kv, config.near_cache(CacheKind::Kv))
            .build()
            .unwrap();
        CacheManager::new(config)
    };
    let migrating = without(db.config()).unwrap_err().to_string();
    assert!(
        migrating.contains("PGCACHE_DIRECT_URL") && migrating.contains("migrations"),
        "{migrating}"
    );
    let near_cached = without(near(db.config()).run_migrations(false))
        .unwrap_err()
        .to_string();
    assert!(
        near_cached.contains("PGCACHE_DIRECT_URL") && near_cached.contains("near cache"),
        "{near_cached}"
    );
    // Neither: nothing needs a session.
    let plain = without(db.config().run_migrations(false)).unwrap();
    plain.kv().set("k", &json!(1)).unwrap();
    assert_eq!(plain.kv().get("k").unwrap(), Some(json!(1)));
}

#[test]
fn the_direct_url_is_as_secret_as_the_database_url() {
    let config = CacheConfig::from_vars([
        ("PGCACHE_POOLER", "transaction"),
        (
            "PGCACHE_DIRECT_URL",
            "postgres://app:s3cret-direct@db:5432/app",
        ),
    ])
    .unwrap();
    assert_eq!(config.pooler(), Pooler::Transaction);
    assert!(!format!("{config:?}").contains("s3cret-direct"));
    let builder = pgcache::CacheConfigBuilder::from_vars([(
        "PGCACHE_DIRECT_URL",
        "postgres://app:s3cret-direct@db:5432/app",
    )])
    .unwrap();
    assert!(!format!("{builder:?}").contains("s3cret-direct"));
    assert!(!config
        .direct_url()
        .unwrap()
        .to_string()
        .contains("s3cret-direct"));
    let malformed = CacheConfig::from_vars([("PGCACHE_DIRECT_URL", "postgres://app:s3cret@[db")])
        .unwrap_err()
        .to_string();
    assert!(malformed.contains("PGCACHE_DIRECT_URL"), "{malformed}");
    assert!(!malformed.contains("s3cret"), "{malformed}");
    let relaxed = CacheConfig::from_vars([
        ("PGCACHE_POOLER", "transaction"),
        ("PGCACHE_DURABILITY", "relaxed"),
    ])
    .unwrap_err()
    .to_string();
    assert!(relaxed.contains("PGCACHE_DURABILITY"), "{relaxed}");
    assert!(CacheConfig::from_vars([("PGCACHE_POOLER", "statement")]).is_err());
}

#[test]
fn the_harness_leaves_no_pgbouncer_running() {
    let bouncer = PgBouncer::start(&[]);
    let port = bouncer.port;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(bouncer);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "PgBouncer still listens");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_statement_through_the_pooler_left_waiting_is_cut_without_a_server_timeout() {
    // No `statement_timeout` is set through the pooler: the watchdog's cancel,
    // which PgBouncer forwards to the server connection, ends the wait.
    let timeout = Duration::from_millis(300);
    let db = Pooled::with(|b| b.statement_timeout(timeout));
    let kv = db.cache().kv();
    kv.set("locked", &json!(1)).unwrap();
    let mut holder = PgConnection::establish(&db.direct_url()).unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM cache_entries WHERE key = 'locked' FOR UPDATE")
        .unwrap();
    let started = Instant::now();
    let blocked = kv.set("locked", &json!(2));
    let waited = started.elapsed();
    holder.batch_execute("ROLLBACK").unwrap();
    assert!(
        blocked.is_err(),
        "the update waited for the lock and was cut"
    );
    // At least the limit; the upper bound is generous for a busy machine, and
    // far below "for as long as the lock is held".
    assert!(waited >= timeout, "{waited:?}");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    kv.set("locked", &json!(3)).unwrap();
    assert_eq!(kv.get("locked").unwrap(), Some(json!(3)));
}

#[test]
fn every_operation_works_through_a_pooler_whatever_the_search_path() {
    let db = Pooled::on_path(false, near);
    wait_current(db.cache());
    let reader = direct_reader(&db);
    let (cache, ttl) = (db.cache(), Duration::from_secs(60));
    on_threads(4, |t| {
        let kv = cache.kv();
        for i in 0..10 {
            let key = format!("t{t}:k{i}");
            kv.set(&key, &json!(i)).unwrap();
            assert_eq!(kv.get(&key).unwrap(), Some(json!(i)));
            kv.set_many(&[(&key, &json!(i + 1))], ttl).unwrap();
            assert_eq!(kv.get_many(&[&key]).unwrap(), vec![Some(json!(i + 1))]);
            assert_eq!(kv.incr(&format!("t{t}:n"), 1, ttl).unwrap(), i + 1);
            let embedding = EmbeddingKey::new(key.clone(), "m");
            cache.embedding().set(&embedding, &vec![1.0, 2.0]).unwrap();
            assert!(cache.embedding().get(&embedding).unwrap().is_some());
        }
        assert_eq!(kv.delete_prefix(&format!("t{t}:")).unwrap(), 11);
    });
    cache.kv().set("hot", &json!(1)).unwrap();
    warm(&reader, "hot");
    let mut conn = db.app_connection();
    conn.transaction(|conn| kv_delete_in(cache, conn, "hot"))
        .unwrap();
    std::thread::sleep(BOUND);
    assert_eq!(reader.kv().get("hot").unwrap(), None);
    cache.cleanup().unwrap();
    cache.stats().unwrap();
}

/// `delete_in` on the application's connection, which must find the cache's table
/// whatever that connection's search path.
fn kv_delete_in(cache: &CacheManager, conn: &mut PgConnection, key: &str) -> Result<(), Error> {
    assert!(cache.kv().delete_in(conn, key)?);
    Ok(())
}
