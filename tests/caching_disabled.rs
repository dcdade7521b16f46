//! `ENABLE_CACHING=false` never breaks the application: every `*_in` call is a
//! no-op that leaves the caller's connection alone, and `cache.connection()` still
//! hands out a connection (the application's pool's, or a plain one).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::{Connection, PgConnection, RunQueryDsl};
use pgcache::{Cache, CacheConfig, CacheManager, LlmPrompt};
use serde_json::json;

use common::database_url;

/// Counts the statements a connection starts.
#[derive(Clone, Default)]
struct Statements(Arc<AtomicUsize>);

impl Instrumentation for Statements {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { .. } = event {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Statements {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The application's sessions: its own schema first, a statement timeout of its own.
#[derive(Debug)]
struct AppSession(String);

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for AppSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&format!(
            "SET search_path TO \"{}\"; SET statement_timeout = 23456",
            self.0
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// An application schema with a `users` table (no cache tables anywhere: caching
/// is off, nothing was migrated), and its pool.
struct App {
    schema: String,
    pool: Pool<ConnectionManager<PgConnection>>,
}

impl App {
    fn new() -> Self {
        let schema = format!("pgcache_app_{}", uuid::Uuid::new_v4().simple());
        PgConnection::establish(&database_url())
            .unwrap()
            .batch_execute(&format!(
                "CREATE SCHEMA \"{schema}\"; \
                 CREATE TABLE \"{schema}\".users (id INT PRIMARY KEY, name TEXT); \
                 INSERT INTO \"{schema}\".users VALUES (42, 'Ada');"
            ))
            .unwrap();
        let pool = Pool::builder()
            .max_size(2)
            .connection_customizer(Box::new(AppSession(schema.clone())))
            .build(ConnectionManager::new(database_url()))
            .unwrap();
        App { schema, pool }
    }

    /// The config of a disabled cache, its schema one that does not exist.
    fn disabled(&self) -> CacheConfig {
        CacheConfig::builder()
            .database_url(database_url())
            .schema(format!("{}_cache", self.schema))
            .enabled(false)
            .build()
            .unwrap()
    }

    fn name_of_42(&self, conn: &mut PgConnection) -> String {
        #[derive(diesel::QueryableByName)]
        struct Name {
            #[diesel(sql_type = diesel::sql_types::Text)]
            name: String,
        }
        diesel::sql_query(format!(
            "SELECT name FROM \"{}\".users WHERE id = 42",
            self.schema
        ))
        .get_result::<Name>(conn)
        .unwrap()
        .name
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&database_url()) {
            let _ = conn.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ));
        }
    }
}

/// Every `*_in` operation of every kind of cache, on `conn`, asserting what a
/// disabled cache answers.
fn every_in_call_answers_as_disabled(cache: &CacheManager, conn: &mut PgConnection) {
    let ttl = Duration::from_secs(60);
    let kv = cache.kv();
    assert_eq!(kv.get_in(conn, "user:42").unwrap(), None);
    assert_eq!(kv.get_many_in(conn, &["a", "b"]).unwrap(), vec![None, None]);
    kv.set_in(conn, "user:42", &json!({"name": "Ada"}), ttl)
        .unwrap();
    kv.set_many_in(conn, &[("a", &json!(1)), ("b", &json!(2))], ttl)
        .unwrap();
    assert!(!kv.delete_in(conn, "user:42").unwrap());
    assert_eq!(kv.delete_many_in(conn, &["a", "b"]).unwrap(), 0);
    assert_eq!(kv.delete_prefix_in(conn, "user:").unwrap(), 0);
    kv.set_bytes_in(conn, "blob", b"bytes", ttl).unwrap();
    assert_eq!(kv.get_bytes_in(conn, "blob").unwrap(), None);

    let prompt = LlmPrompt::new("prompt", "model");
    let llm = cache.llm_response();
    llm.set_in(conn, &prompt, &"answer".to_owned(), ttl)
        .unwrap();
    assert!(llm.get_in(conn, &prompt).unwrap().is_none());
    assert!(!llm.delete_in(conn, &prompt).unwrap());
    assert_eq!(llm.get_many_in(conn, &[&prompt]).unwrap().len(), 1);
    assert_eq!(llm.delete_many_in(conn, &[&prompt]).unwrap(), 0);
    let emb = cache.embedding();
    let key = pgcache::EmbeddingKey::new("text", "model");
    assert!(emb.get_in(conn, &key).unwrap().is_none());
    assert!(!emb.delete_in(conn, &key).unwrap());
}

#[test]
fn with_caching_disabled_in_calls_are_no_ops_that_never_touch_the_connection() {
    let app = App::new();
    let cache = CacheManager::new(app.disabled()).unwrap();
    let mut conn = PgConnection::establish(&database_url()).unwrap();
    let statements = Statements::default();
    conn.set_instrumentation(statements.clone());
    every_in_call_answers_as_disabled(&cache, &mut conn);
    assert_eq!(
        statements.count(),
        0,
        "no statement ran on the caller's connection"
    );
}

#[test]
fn with_caching_disabled_in_calls_inside_the_apps_transaction_let_it_commit() {
    let app = App::new();
    let cache = CacheManager::with_pool(app.pool.clone(), app.disabled()).unwrap();
    let mut conn = app.pool.get().unwrap();
    conn.transaction(|conn| {
        diesel::sql_query("UPDATE users SET name = 'Grace' WHERE id = 42").execute(conn)?;
        every_in_call_answers_as_disabled(&cache, conn);
        Ok::<_, diesel::result::Error>(())
    })
    .unwrap();
    assert_eq!(app.name_of_42(&mut conn), "Grace");
}

#[test]
fn with_caching_disabled_connection_hands_out_one_of_the_apps_pool() {
    let app = App::new();
    let cache = CacheManager::with_pool(app.pool.clone(), app.disabled()).unwrap();
    let mut conn = cache.connection().unwrap();
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    let timeout = diesel::sql_query("SELECT current_setting('statement_timeout') AS value")
        .get_result::<Setting>(&mut *conn)
        .unwrap()
        .value;
    assert_eq!(timeout, "23456ms", "the application's own session");
    // The app's own tables, unqualified, on its own search path.
    diesel::sql_query("UPDATE users SET name = 'Grace' WHERE id = 42")
        .execute(&mut *conn)
        .unwrap();
    assert_eq!(
        app.pool.state().connections - app.pool.state().idle_connections,
        1
    );
}

#[test]
fn with_caching_disabled_a_standalone_manager_hands_out_a_plain_connection() {
    let app = App::new();
    let cache = CacheManager::new(app.disabled()).unwrap();
    let mut conn = cache.connection().unwrap();
    // A plain session: the server's defaults, the application's tables reachable.
    assert_eq!(app.name_of_42(&mut conn), "Ada");
    diesel::sql_query(format!(
        "UPDATE \"{}\".users SET name = 'Grace' WHERE id = 42",
        app.schema
    ))
    .execute(&mut *conn)
    .unwrap();
    drop(conn);
    // Several at once, like any pool.
    let a = cache.connection().unwrap();
    let b = cache.connection().unwrap();
    drop((a, b));
}

/// The guide's "Cache writes inside your transaction" example, verbatim but for
/// how the manager is made.
fn readme_transaction_example(cache: &CacheManager) -> Result<(), pgcache::Error> {
    use diesel::Connection;
    use pgcache::Cache;
    let mut conn = cache.connection()?;
    conn.transaction(|conn| {
        // ... update the user's row with Diesel ...
        cache.kv().delete_in(conn, "user:42:profile:v2")?;
        Ok::<_, pgcache::Error>(())
    })?;
    Ok(())
}

#[test]
fn with_caching_disabled_the_readme_transaction_example_runs_unchanged() {
    let app = App::new();
    let standalone = CacheManager::new(app.disabled()).unwrap();
    readme_transaction_example(&standalone).unwrap();
    let shared = CacheManager::with_pool(app.pool.clone(), app.disabled()).unwrap();
    readme_transaction_example(&shared).unwrap();
}
