//! pgcache inside an existing Diesel application: its own schema and migration
//! history by default, and a manager over the application's own pool.

use crate::common;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use pgcache::{Cache, CacheConfig, CacheManager, Error};
use serde_json::json;

use common::{database_url, FreshDatabase};

/// The host application's own migrations.
const APP_MIGRATIONS: EmbeddedMigrations = embed_migrations!("tests/integration/app_migrations");
const APP_MIGRATION: &str = "20200101000000";

#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = Text)]
    line: String,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn text(conn: &mut PgConnection, sql: &str) -> String {
    diesel::sql_query(sql)
        .get_result::<Line>(conn)
        .unwrap()
        .line
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
}

#[test]
fn default_schema_leaves_the_apps_migration_history_alone() {
    let db = FreshDatabase::new();
    let mut app = PgConnection::establish(&db.url).unwrap();
    app.run_pending_migrations(APP_MIGRATIONS).unwrap();

    // No schema configured: pgcache's default.
    let config = CacheConfig::builder()
        .database_url(db.url.as_str())
        .pool_max_size(2)
        .pool_min_idle(0)
        .build()
        .unwrap();
    assert_eq!(config.schema(), pgcache::DEFAULT_SCHEMA);
    let cache = CacheManager::new(config).unwrap();
    cache.kv().set("k", &json!(1)).unwrap();
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)));

    // The app's history lists only the app's migration; pgcache's is in its schema.
    assert_eq!(
        count(
            &mut app,
            "SELECT count(*) AS n FROM public.__diesel_schema_migrations"
        ),
        1
    );
    assert!(
        count(
            &mut app,
            "SELECT count(*) AS n FROM pgcache.__diesel_schema_migrations"
        ) >= 2
    );
    assert_eq!(
        count(
            &mut app,
            "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE '%cache%'"
        ),
        0,
        "no cache table in the app's schema"
    );

    // The app's next revert reverts the app's own migration.
    let reverted = app.revert_last_migration(APP_MIGRATIONS).unwrap();
    assert_eq!(reverted.to_string(), APP_MIGRATION);
    assert_eq!(
        count(
            &mut app,
            "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'posts'"
        ),
        0
    );
    // And the cache is untouched by it.
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)));
    drop(cache);
}

#[test]
fn run_migrations_from_the_apps_step_restores_its_search_path() {
    let db = FreshDatabase::new();
    let mut app = PgConnection::establish(&db.url).unwrap();
    app.batch_execute("SET search_path TO public").unwrap();
    app.run_pending_migrations(APP_MIGRATIONS).unwrap();
    let applied = pgcache::run_migrations(&mut app, "cache_tables").unwrap();
    assert!(!applied.is_empty());
    assert_eq!(
        text(&mut app, "SELECT current_setting('search_path') AS line"),
        "public"
    );
    assert_eq!(
        count(
            &mut app,
            "SELECT count(*) AS n FROM cache_tables.__diesel_schema_migrations"
        ),
        applied.len() as i64
    );
    // Already applied: nothing to do, and a manager that does not migrate starts on it.
    assert!(pgcache::run_migrations(&mut app, "cache_tables")
        .unwrap()
        .is_empty());
    let cache = CacheManager::new(
        CacheConfig::builder()
            .database_url(db.url.as_str())
            .schema("cache_tables")
            .run_migrations(false)
            .pool_max_size(2)
            .pool_min_idle(0)
            .build()
            .unwrap(),
    )
    .unwrap();
    cache.kv().set("k", &json!("v")).unwrap();
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!("v")));
    assert_eq!(
        app.revert_last_migration(APP_MIGRATIONS)
            .unwrap()
            .to_string(),
        APP_MIGRATION
    );
    drop(cache);
}

#[test]
fn run_migrations_rejects_an_empty_schema_name() {
    let mut conn = PgConnection::establish(&database_url()).unwrap();
    let err = pgcache::run_migrations(&mut conn, "").unwrap_err();
    assert!(
        matches!(&err, Error::Config { setting, .. } if setting == "schema"),
        "{err}"
    );
}

/// The host application's pool: its connections have its own schema on their
/// search path and a statement timeout of their own.
#[derive(Debug)]
struct AppSession(String);

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for AppSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&format!(
            "SET search_path TO \"{}\"; SET statement_timeout = 12345",
            self.0
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// An application schema with a `posts` table, and a pool onto it; dropped
/// afterwards with the cache's schema (`cache_schema`).
struct App {
    schema: String,
    cache_schema: String,
    pool: Pool<ConnectionManager<PgConnection>>,
}

impl App {
    fn new(tables: &str) -> Self {
        let schema = format!("pgcache_app_{}", uuid::Uuid::new_v4().simple());
        PgConnection::establish(&database_url())
            .unwrap()
            .batch_execute(&format!(
                "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\"; {tables}"
            ))
            .unwrap();
        let pool = Pool::builder()
            .max_size(3)
            .connection_customizer(Box::new(AppSession(schema.clone())))
            .build(ConnectionManager::new(database_url()))
            .unwrap();
        App {
            cache_schema: format!("{schema}_cache"),
            schema,
            pool,
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&database_url()) {
            let _ = conn.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema, self.cache_schema
            ));
        }
    }
}

fn cache_config(schema: &str) -> pgcache::CacheConfigBuilder {
    CacheConfig::builder()
        .database_url(database_url())
        .schema(schema)
}

#[test]
fn a_manager_over_the_apps_pool_caches_and_leaves_the_apps_names_first() {
    let app = App::new("CREATE TABLE posts (id INT PRIMARY KEY); INSERT INTO posts VALUES (7);");
    let cache_schema = &app.cache_schema;
    let cache = CacheManager::with_pool(
        app.pool.clone(),
        cache_config(cache_schema).build().unwrap(),
    )
    .unwrap();

    cache.kv().set("k", &json!({"n": 1})).unwrap();
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!({"n": 1})));
    let prompt = pgcache::LlmPrompt::new("prompt", "gpt-x");
    cache
        .llm_response()
        .set(&prompt, &"answer".to_owned())
        .unwrap();
    assert_eq!(
        cache.llm_response().get(&prompt).unwrap().unwrap().response,
        "answer"
    );
    assert!(cache.kv().delete("k").unwrap());
    assert_eq!(cache.kv().get("k").unwrap(), None);
    let stats = cache.stats().unwrap();
    assert_eq!(stats.caches.iter().map(|t| t.entries).sum::<u64>(), 1);

    // The tables are in the cache's schema, not the app's.
    let mut conn = app.pool.get().unwrap();
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM pg_tables WHERE schemaname = '{}' AND tablename = 'cache_entries'",
                cache_schema
            )
        ),
        1
    );
    // Every app connection keeps its own settings, its search path untouched:
    // the cache's statements name their schema.
    for _ in 0..3 {
        let mut conn = app.pool.get().unwrap();
        let path = text(&mut conn, "SELECT current_setting('search_path') AS line");
        assert_eq!(path.trim_matches('"'), app.schema);
        assert_eq!(
            text(
                &mut conn,
                "SELECT current_setting('statement_timeout') AS line"
            ),
            "12345ms"
        );
        assert_eq!(count(&mut conn, "SELECT id::bigint AS n FROM posts"), 7);
    }
    drop(conn);

    // A connection handed to the caller finds the cache tables, for `*_in`.
    let mut conn = cache.connection().unwrap();
    cache
        .kv()
        .set_in(
            &mut conn,
            "in",
            &json!(2),
            std::time::Duration::from_secs(60),
        )
        .unwrap();
    drop(conn);
    assert_eq!(cache.kv().get("in").unwrap(), Some(json!(2)));
}

#[test]
fn an_app_table_named_like_a_cache_table_is_left_alone_by_a_manager_over_the_apps_pool() {
    let app =
        App::new("CREATE TABLE cache_entries (id INT); INSERT INTO cache_entries VALUES (1);");
    let cache = CacheManager::with_pool(
        app.pool.clone(),
        cache_config(&app.cache_schema).build().unwrap(),
    )
    .unwrap();
    cache.kv().set("k", &json!(1)).unwrap();
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)));
    assert_eq!(
        cache
            .clear(None)
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>(),
        1
    );
    let mut conn = app.pool.get().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM cache_entries"),
        1
    );
}

#[test]
fn a_manager_over_the_apps_pool_finds_its_tables_again_after_the_app_resets_a_connection() {
    let app = App::new("");
    let cache_schema = &app.cache_schema;
    let cache = CacheManager::with_pool(
        app.pool.clone(),
        cache_config(cache_schema).build().unwrap(),
    )
    .unwrap();
    cache.kv().set("k", &json!(1)).unwrap();
    // The app resets the search path of every pooled connection.
    let conns: Vec<_> = (0..3).map(|_| app.pool.get().unwrap()).collect();
    for mut conn in conns {
        conn.batch_execute(&format!("SET search_path TO \"{}\"", app.schema))
            .unwrap();
    }
    for _ in 0..6 {
        assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)));
    }
}

#[test]
fn partitioning_through_the_apps_pool_keeps_every_table_in_the_cache_schema() {
    // A database of its own: partitioning into the wrong schema would leave cache
    // tables in its `public`.
    let db = FreshDatabase::new();
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(AppSession("public".to_owned())))
        .build(ConnectionManager::new(db.url.as_str()))
        .unwrap();
    let config = CacheConfig::builder()
        .database_url(db.url.as_str())
        .schema("cache_tables")
        .build()
        .unwrap();
    let cache = CacheManager::with_pool(pool.clone(), config).unwrap();
    cache.kv().set("kept", &json!(1)).unwrap();

    let done = cache.partition_tables(4).unwrap();
    assert!(done.iter().all(|p| p.converted && p.partitions == 4));

    let mut conn = PgConnection::establish(&db.url).unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
        ),
        0,
        "no table in the app's schema"
    );
    for kind in pgcache::CacheKind::ALL {
        let table = kind.table();
        assert_eq!(
            count(
                &mut conn,
                &format!(
                    "SELECT count(*) AS n FROM pg_partition_tree('cache_tables.{table}') t \
                     JOIN pg_class c ON c.oid = t.relid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE t.isleaf AND n.nspname = 'cache_tables'"
                )
            ),
            4,
            "{table}'s partitions in the cache's schema"
        );
    }
    drop(conn);
    assert_eq!(cache.kv().get("kept").unwrap(), Some(json!(1)));
    cache.kv().set("after", &json!(2)).unwrap();
    assert_eq!(cache.kv().get("after").unwrap(), Some(json!(2)));
    drop(cache);
}
