//! Relaxed durability on the application's pool: pgcache's own writes there each
//! run in a transaction of their own with `SET LOCAL synchronous_commit = off`;
//! the application's sessions keep `synchronous_commit = on`.

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

/// Counts the statements that turn synchronous commit off for their transaction.
#[derive(Clone, Default)]
struct RelaxedStatements(Arc<AtomicUsize>);

impl Instrumentation for RelaxedStatements {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            if query
                .to_string()
                .contains("SET LOCAL synchronous_commit = off")
            {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// The application's sessions: its own schema, every statement watched.
#[derive(Debug)]
struct AppSession {
    schema: String,
    relaxed: Arc<AtomicUsize>,
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for AppSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.set_instrumentation(RelaxedStatements(Arc::clone(&self.relaxed)));
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
    relaxed: Arc<AtomicUsize>,
    pool: Pool<ConnectionManager<PgConnection>>,
}

impl App {
    fn new() -> Self {
        let schema = format!("pgcache_app_{}", uuid::Uuid::new_v4().simple());
        PgConnection::establish(&database_url())
            .unwrap()
            .batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
            .unwrap();
        let relaxed = Arc::new(AtomicUsize::new(0));
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .connection_customizer(Box::new(AppSession {
                schema: schema.clone(),
                relaxed: Arc::clone(&relaxed),
            }))
            .build(ConnectionManager::new(database_url()))
            .unwrap();
        App {
            schema,
            relaxed,
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
    std::thread::scope(|scope| {
        for t in 0..POOL_SIZE {
            let cache = &cache;
            scope.spawn(move || {
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
    assert!(
        app.relaxed.load(Ordering::SeqCst) > 0,
        "the writes ran relaxed"
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
