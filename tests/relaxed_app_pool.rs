//! Relaxed durability on the application's pool: pgcache's own writes there carry a
//! marker that has a trigger turn `synchronous_commit` off for their transaction
//! alone, so each commits relaxed in its one round trip; the application's
//! sessions keep `synchronous_commit = on`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use pgcache::{Cache, CacheConfig, CacheManager, Durability, Error};
use serde_json::json;

use common::database_url;

const POOL_SIZE: u32 = 3;

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    synchronous_commit: String,
}

fn synchronous_commit(conn: &mut PgConnection) -> String {
    diesel::sql_query("SHOW synchronous_commit")
        .get_result::<Setting>(conn)
        .unwrap()
        .synchronous_commit
}

/// The comment that asks the cache tables' trigger for a relaxed commit: part of
/// the schema's contract (migration `relaxed_commit`), spelled out here so that both
/// halves of it are checked against one text.
const RELAXED_COMMIT: &str = "/* pgcache: relaxed commit */";

thread_local! {
    /// Whether this thread's statements are the writes under test (not, say, the
    /// counters' flush, a transaction of its own in the background).
    static WRITER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts the statements marked for a relaxed commit, and every statement a writer
/// thread sends that opens, ends or configures a transaction (a relaxed write
/// needs none).
#[derive(Clone, Default)]
struct RelaxedStatements {
    marked: Arc<AtomicUsize>,
    transaction_control: Arc<AtomicUsize>,
}

impl Instrumentation for RelaxedStatements {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartQuery { query, .. } => {
                let query = query.to_string();
                if query.contains(RELAXED_COMMIT) {
                    self.marked.fetch_add(1, Ordering::SeqCst);
                }
                let upper = query.trim_start().to_uppercase();
                if WRITER.with(std::cell::Cell::get)
                    && [
                        "BEGIN",
                        "COMMIT",
                        "ROLLBACK",
                        "SAVEPOINT",
                        "SET LOCAL",
                        "SET SYNC",
                    ]
                    .iter()
                    .any(|word| upper.starts_with(word))
                {
                    self.transaction_control.fetch_add(1, Ordering::SeqCst);
                }
            }
            InstrumentationEvent::BeginTransaction { .. }
            | InstrumentationEvent::CommitTransaction { .. }
            | InstrumentationEvent::RollbackTransaction { .. }
                if WRITER.with(std::cell::Cell::get) =>
            {
                self.transaction_control.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// The application's sessions: its own schema, every statement watched.
#[derive(Debug)]
struct AppSession {
    schema: String,
    watched: RelaxedStatements,
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for AppSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.set_instrumentation(self.watched.clone());
        conn.batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

impl std::fmt::Debug for RelaxedStatements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelaxedStatements")
    }
}

struct App {
    schema: String,
    watched: RelaxedStatements,
    pool: Pool<ConnectionManager<PgConnection>>,
}

impl App {
    fn new() -> Self {
        let schema = format!("pgcache_app_{}", uuid::Uuid::new_v4().simple());
        PgConnection::establish(&database_url())
            .unwrap()
            .batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
            .unwrap();
        let watched = RelaxedStatements::default();
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .connection_customizer(Box::new(AppSession {
                schema: schema.clone(),
                watched: watched.clone(),
            }))
            .build(ConnectionManager::new(database_url()))
            .unwrap();
        App {
            schema,
            watched,
            pool,
        }
    }

    fn config(&self) -> pgcache::CacheConfigBuilder {
        CacheConfig::builder()
            .database_url(database_url())
            .schema(format!("{}_cache", self.schema))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&database_url()) {
            let _ = conn.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{0}\" CASCADE; DROP SCHEMA IF EXISTS \"{0}_cache\" CASCADE",
                self.schema
            ));
        }
    }
}

#[test]
fn relaxed_writes_on_the_apps_pool_leave_its_sessions_synchronous() {
    let app = App::new();
    let cache = CacheManager::with_pool(
        app.pool.clone(),
        app.config()
            .durability(Durability::Relaxed)
            .build()
            .unwrap(),
    )
    .expect("relaxed durability is accepted on the application's pool");
    // From here on, the writes alone (start-up ran the migrations in transactions).
    let controls_before = app.watched.transaction_control.load(Ordering::SeqCst);
    std::thread::scope(|scope| {
        for t in 0..POOL_SIZE {
            let cache = &cache;
            scope.spawn(move || {
                WRITER.with(|writer| writer.set(true));
                let kv = cache.kv();
                for i in 0..20 {
                    let key = format!("t{t}:{i}");
                    kv.set(&key, &json!(i)).unwrap();
                    assert_eq!(
                        kv.incr(&format!("count:{t}"), 1, Duration::from_secs(60))
                            .unwrap(),
                        i + 1
                    );
                    assert_eq!(kv.get(&key).unwrap(), Some(json!(i)));
                    assert!(kv.delete(&key).unwrap());
                }
            });
        }
    });
    // A write that fails leaves no transaction open behind it.
    cache.kv().set("text", &json!("not a number")).unwrap();
    let err = cache
        .kv()
        .incr("text", 1, Duration::from_secs(60))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    // Each write is one statement, marked: no transaction of its own around it.
    assert!(
        app.watched.marked.load(Ordering::SeqCst) >= (POOL_SIZE * 20 * 3) as usize,
        "the writes were marked for a relaxed commit"
    );
    assert_eq!(
        app.watched.transaction_control.load(Ordering::SeqCst),
        controls_before
    );
    // Every connection of the application's pool, all checked out at once.
    let mut conns: Vec<_> = (0..POOL_SIZE).map(|_| app.pool.get().unwrap()).collect();
    for conn in &mut conns {
        assert_eq!(synchronous_commit(conn), "on");
        // Not inside a transaction pgcache left open.
        conn.batch_execute("BEGIN; COMMIT").unwrap();
    }
    assert_eq!(app.pool.state().connections, POOL_SIZE);
}

#[test]
fn relaxed_durability_on_the_caches_own_pool_stays_the_sessions_setting() {
    let app = App::new();
    let cache = CacheManager::new(
        app.config()
            .durability(Durability::Relaxed)
            .build()
            .unwrap(),
    )
    .unwrap();
    cache.kv().incr("n", 1, Duration::from_secs(60)).unwrap();
    let mut conn = cache.connection().unwrap();
    assert_eq!(synchronous_commit(&mut conn), "off");
}

#[derive(QueryableByName)]
struct Committed {
    #[diesel(sql_type = Text)]
    synchronous_commit: String,
}

/// What `synchronous_commit` the transaction of `sql` (an INSERT into the cache
/// table returning the setting) commits with.
fn commits_with(conn: &mut PgConnection, sql: &str, key: &str) -> String {
    diesel::sql_query(sql)
        .bind::<Text, _>(key)
        .get_result::<Committed>(conn)
        .unwrap()
        .synchronous_commit
}

#[test]
fn a_marked_statement_commits_relaxed_and_leaves_the_session_synchronous() {
    let app = App::new();
    let cache = CacheManager::with_pool(app.pool.clone(), app.config().build().unwrap()).unwrap();
    cache.kv().set("warm", &json!(1)).unwrap();
    let insert = |marker: &str| {
        format!(
            "{marker} INSERT INTO \"{}_cache\".cache_entries (key, value, expires_at) \
             VALUES ($1, '1', now() + interval '1 hour') \
             RETURNING current_setting('synchronous_commit') AS synchronous_commit",
            app.schema
        )
    };
    let mut conn = app.pool.get().unwrap();
    // Prepared and executed through the extended protocol, as pgcache's are.
    assert_eq!(commits_with(&mut conn, &insert(RELAXED_COMMIT), "a"), "off");
    assert_eq!(synchronous_commit(&mut conn), "on");
    assert_eq!(commits_with(&mut conn, &insert(""), "b"), "on");
    // In the application's transaction, only a marked statement would relax it:
    // pgcache's `*_in` statements carry no marker.
    conn.transaction(|conn| {
        assert_eq!(commits_with(conn, &insert(""), "c"), "on");
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(synchronous_commit(&mut conn), "on");
}

#[test]
fn writes_to_partitioned_tables_still_commit_relaxed() {
    let app = App::new();
    let cache = CacheManager::with_pool(
        app.pool.clone(),
        app.config()
            .durability(Durability::Relaxed)
            .build()
            .unwrap(),
    )
    .unwrap();
    cache.kv().set("before", &json!(1)).unwrap();
    cache.partition_tables(4).unwrap();
    let mut conn = app.pool.get().unwrap();
    let insert = format!(
        "{RELAXED_COMMIT} INSERT INTO \"{}_cache\".cache_entries (key, value, expires_at) \
         VALUES ($1, '1', now() + interval '1 hour') \
         RETURNING current_setting('synchronous_commit') AS synchronous_commit",
        app.schema
    );
    assert_eq!(commits_with(&mut conn, &insert, "after"), "off");
    // pgcache's own writes go on, marked, and read back.
    let controls_before = app.watched.transaction_control.load(Ordering::SeqCst);
    let marked_before = app.watched.marked.load(Ordering::SeqCst);
    WRITER.with(|writer| writer.set(true));
    cache.kv().set("written", &json!(2)).unwrap();
    WRITER.with(|writer| writer.set(false));
    assert!(app.watched.marked.load(Ordering::SeqCst) > marked_before);
    assert_eq!(
        app.watched.transaction_control.load(Ordering::SeqCst),
        controls_before
    );
    assert_eq!(cache.kv().get("before").unwrap(), Some(json!(1)));
    assert_eq!(cache.kv().get("written").unwrap(), Some(json!(2)));
}
