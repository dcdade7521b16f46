//! Cache writes on the application's own connections: from its r2d2 pool or a
//! plain `PgConnection`, whatever their search path (here the application's
//! `public`, the cache in a schema of its own), on a connection's first use, inside
//! the application's own transaction, for every `*_in` operation of every cache.
//! And a standalone manager's `cache.connection()` still reaches the application's
//! tables.

use crate::common;

use std::time::Duration;

use common::{database_url, TestDb};
use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::{Connection, PgConnection, RunQueryDsl};
use pgcache::{
    AudioChunk, AudioChunkKey, Cache, CacheManager, EmbeddingKey, LlmPrompt, VectorSearchQuery,
};
use serde_json::json;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(60);

/// An application table in `public`, dropped afterwards.
struct AppTable {
    name: String,
}

impl AppTable {
    fn new() -> Self {
        let name = format!("app_users_{}", Uuid::new_v4().simple());
        PgConnection::establish(&database_url())
            .unwrap()
            .batch_execute(&format!(
                "CREATE TABLE public.{name} (id int PRIMARY KEY, name text NOT NULL); \
                 INSERT INTO public.{name} VALUES (1, 'ada')"
            ))
            .unwrap();
        AppTable { name }
    }

    /// The application's own write, naming its table as an application does:
    /// unqualified, found on its search path.
    fn update(&self, conn: &mut PgConnection, name: &str) {
        let updated = diesel::sql_query(format!(
            "UPDATE {} SET name = '{name}' WHERE id = 1",
            self.name
        ))
        .execute(conn)
        .unwrap();
        assert_eq!(updated, 1);
    }
}

impl Drop for AppTable {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&database_url()) {
            let _ = conn.batch_execute(&format!("DROP TABLE IF EXISTS public.{}", self.name));
        }
    }
}

/// The application's connections: their search path is the application's own.
#[derive(Debug)]
struct AppSession;

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for AppSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute("SET search_path TO public")
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

fn app_pool(size: u32) -> Pool<ConnectionManager<PgConnection>> {
    Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_customizer(Box::new(AppSession))
        .build(ConnectionManager::new(database_url()))
        .unwrap()
}

/// Every `*_in` operation of the `Cache` trait on `conn`, with two keys.
fn every_in_operation<C: Cache>(
    cache: &C,
    conn: &mut PgConnection,
    keys: [&C::Key; 2],
    value: &C::Value,
) {
    cache.set_in(conn, keys[0], value, TTL).unwrap();
    assert!(cache.get_in(conn, keys[0]).unwrap().is_some());
    cache
        .set_many_in(conn, &[(keys[0], value), (keys[1], value)], TTL)
        .unwrap();
    let found = cache.get_many_in(conn, &keys).unwrap();
    assert!(found.iter().all(Option::is_some));
    assert!(cache.delete_in(conn, keys[0]).unwrap());
    assert_eq!(cache.delete_many_in(conn, &keys).unwrap(), 1);
}

/// Every `*_in` operation of every cache on `conn` (`n` keeps keys apart).
fn every_cache_in(cache: &CacheManager, conn: &mut PgConnection, n: usize) {
    let (a, b) = (format!("user:{n}:a"), format!("user:{n}:b"));
    let kv = cache.kv();
    every_in_operation(&kv, conn, [a.as_str(), b.as_str()], &json!({"n": n}));
    kv.set_bytes_in(conn, &a, b"bytes", TTL).unwrap();
    assert_eq!(
        kv.get_bytes_in(conn, &a).unwrap().as_deref(),
        Some(&b"bytes"[..])
    );
    assert_eq!(kv.delete_prefix_in(conn, &format!("user:{n}:")).unwrap(), 1);

    let (p, q) = (
        LlmPrompt::new(format!("prompt {n}"), "model"),
        LlmPrompt::new(format!("other {n}"), "model"),
    );
    every_in_operation(&cache.llm_response(), conn, [&p, &q], &"answer".to_owned());
    let (p, q) = (
        EmbeddingKey::new(format!("text {n}"), "model"),
        EmbeddingKey::new(format!("other {n}"), "model"),
    );
    every_in_operation(&cache.embedding(), conn, [&p, &q], &vec![0.5; 8]);
    let (p, q) = (
        AudioChunkKey::new(format!("text {n}"), "voice", "tts"),
        AudioChunkKey::new(format!("other {n}"), "voice", "tts"),
    );
    every_in_operation(
        &cache.audio_chunk(),
        conn,
        [&p, &q],
        &AudioChunk::inline(vec![7; 16], "opus"),
    );
    let user = Uuid::new_v4();
    let (p, q) = (
        VectorSearchQuery::new(user, vec![n as f32, 1.0], 5),
        VectorSearchQuery::new(user, vec![n as f32, 2.0], 5),
    );
    every_in_operation(&cache.vector_search(), conn, [&p, &q], &json!([{"id": 1}]));
}

#[test]
fn every_in_operation_works_in_the_apps_transaction_on_each_fresh_pooled_connection() {
    // Migrated into a schema of its own; the application's tables are in `public`.
    let db = TestDb::new();
    let app = AppTable::new();
    let pool = app_pool(8);
    let cache = CacheManager::with_pool(pool.clone(), db.config().build().unwrap()).unwrap();
    // Eight connections at once: each one new, most never used by the cache.
    let mut conns: Vec<_> = (0..8).map(|_| pool.get().unwrap()).collect();
    for (n, conn) in conns.iter_mut().enumerate() {
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            app.update(conn, &format!("ada {n}"));
            every_cache_in(&cache, conn, n);
            Ok(())
        })
        .unwrap();
    }
    // The application's search path is left as it was.
    for conn in &mut conns {
        #[derive(diesel::QueryableByName)]
        struct Path {
            #[diesel(sql_type = diesel::sql_types::Text)]
            path: String,
        }
        let path: Path = diesel::sql_query("SELECT current_setting('search_path') AS path")
            .get_result(&mut **conn)
            .unwrap();
        assert_eq!(path.path, "public");
    }
}

#[test]
fn every_in_operation_works_on_a_plain_connection_of_the_app() {
    let db = TestDb::new();
    let app = AppTable::new();
    let mut conn = PgConnection::establish(&database_url()).unwrap();
    conn.batch_execute("SET search_path TO public").unwrap();
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        app.update(conn, "grace");
        every_cache_in(&db.cache, conn, 0);
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_standalone_managers_connection_reaches_the_apps_tables_in_one_transaction() {
    let db = TestDb::new();
    let app = AppTable::new();
    let mut conn = db.cache.connection().unwrap();
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        app.update(conn, "linus");
        db.cache
            .kv()
            .set_in(conn, "user:1", &json!("linus"), TTL)
            .unwrap();
        Ok(())
    })
    .unwrap();
    assert_eq!(db.cache.kv().get("user:1").unwrap(), Some(json!("linus")));
}

#[test]
fn two_managers_with_different_schemas_on_one_connection_read_their_own_tables() {
    let (first, second) = (TestDb::new(), TestDb::new());
    let mut conn = PgConnection::establish(&database_url()).unwrap();
    // Alternately, several times: each statement was prepared on this connection
    // by the other manager too.
    for round in 0..3 {
        first
            .cache
            .kv()
            .set_in(&mut conn, "k", &json!(["first", round]), TTL)
            .unwrap();
        second
            .cache
            .kv()
            .set_in(&mut conn, "k", &json!(["second", round]), TTL)
            .unwrap();
        let prompt = LlmPrompt::new("same prompt", "model");
        let llm = (first.cache.llm_response(), second.cache.llm_response());
        llm.0
            .set_in(&mut conn, &prompt, &format!("first {round}"), TTL)
            .unwrap();
        llm.1
            .set_in(&mut conn, &prompt, &format!("second {round}"), TTL)
            .unwrap();
        assert_eq!(
            first.cache.kv().get_in(&mut conn, "k").unwrap(),
            Some(json!(["first", round]))
        );
        assert_eq!(
            second.cache.kv().get_in(&mut conn, "k").unwrap(),
            Some(json!(["second", round]))
        );
        assert_eq!(
            llm.0.get_in(&mut conn, &prompt).unwrap().unwrap().response,
            format!("first {round}")
        );
        assert_eq!(
            llm.1.get_in(&mut conn, &prompt).unwrap().unwrap().response,
            format!("second {round}")
        );
    }
    // And through their pools, which never shared a connection.
    assert_eq!(
        first.cache.kv().get("k").unwrap(),
        Some(json!(["first", 2]))
    );
    assert_eq!(
        second.cache.kv().get("k").unwrap(),
        Some(json!(["second", 2]))
    );
}

#[test]
fn every_maintenance_operation_works_over_the_apps_pool() {
    // The manager's own statements on the application's connections: no search
    // path of the cache's, and none is added.
    let db = TestDb::new();
    let pool = app_pool(2);
    let cache = CacheManager::with_pool(pool.clone(), db.config().build().unwrap()).unwrap();
    let user = Uuid::new_v4();
    let prompt = LlmPrompt::new("q", "p").owned_by(user);
    cache.llm_response().set(&prompt, &"a".to_owned()).unwrap();
    let key = EmbeddingKey::new("text", "model-a").owned_by(user);
    cache.embedding().set(&key, &vec![0.5]).unwrap();
    let other = EmbeddingKey::new("text", "model-b");
    cache.embedding().set(&other, &vec![0.5]).unwrap();
    cache.kv().set("k", &json!(1)).unwrap();

    let report = cache.invalidate_user(user).unwrap();
    assert_eq!((report.llm_responses, report.embeddings), (1, 1));
    assert_eq!(cache.invalidate_model("model-b").unwrap(), 1);
    cache.cleanup().unwrap();
    cache.flush_stats().unwrap();
    assert!(cache.stats().unwrap().shards_down.is_empty());
    cache.health(&pgcache::HealthThresholds::default()).unwrap();
    let cleared: u64 = cache.clear(None).unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(cleared, 1, "the kv entry");
    let mut conn = pool.get().unwrap();
    #[derive(diesel::QueryableByName)]
    struct Path {
        #[diesel(sql_type = diesel::sql_types::Text)]
        path: String,
    }
    let path: Path = diesel::sql_query("SELECT current_setting('search_path') AS path")
        .get_result(&mut *conn)
        .unwrap();
    assert_eq!(path.path, "public");
}
