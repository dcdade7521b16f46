//! Managers starting: replicas together on a fresh database, beside a long
//! partitioning (of another schema, or of their own with nothing left for them to
//! migrate), and while their own migrations wait longer than the statement timeout.
//! Each schema has its own migration lock, waited for under the migration timeout.

use crate::common;

use std::sync::Barrier;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use pgcache::{Cache, CacheConfig, CacheConfigBuilder, CacheManager};
use serde_json::json;

/// A statement timeout far shorter than the waits below.
const SHORT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long the migrations below are held up once a manager waits on them: longer
/// than the statement timeout plus the watchdog's 1 s margin.
const HOLD: Duration = Duration::from_secs(2);

/// A schema name of a test's own (short enough for the application name below),
/// the schema dropped with it.
struct Fresh(String);

impl Fresh {
    fn new() -> Self {
        Fresh(format!("pgcache_start_{}", uuid::Uuid::new_v4().simple()))
    }
}

impl std::ops::Deref for Fresh {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&common::database_url()) {
            let _ = conn.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0));
        }
    }
}

/// The application name of the managers on `schema` (as `TestDb`'s).
fn application_name(schema: &str) -> String {
    format!("pgcache-test-{schema}")
}

fn config(schema: &str) -> CacheConfigBuilder {
    CacheConfig::builder()
        .database_url(common::database_url())
        .schema(schema)
        .application_name(application_name(schema))
        .pool_max_size(1)
        .pool_min_idle(0)
}

fn connect() -> PgConnection {
    PgConnection::establish(&common::database_url()).unwrap()
}

/// Starts `count` managers on `schema` at once, each with `tweak` applied to its
/// configuration; every start's result.
fn start_at_once(
    count: usize,
    schema: &str,
    tweak: impl Fn(CacheConfigBuilder) -> CacheConfigBuilder + Sync,
) -> Vec<pgcache::Result<CacheManager>> {
    let barrier = Barrier::new(count);
    std::thread::scope(|scope| {
        let starts: Vec<_> = (0..count)
            .map(|_| {
                let (barrier, tweak) = (&barrier, &tweak);
                scope.spawn(move || {
                    let config = tweak(config(schema)).build().unwrap();
                    barrier.wait();
                    CacheManager::new(config)
                })
            })
            .collect();
        starts.into_iter().map(|s| s.join().unwrap()).collect()
    })
}

/// Waits (at most a minute) until a connection named `application_name` waits for a
/// lock.
fn wait_until_blocked(observer: &mut PgConnection, application_name: &str) {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let waiting: N = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind::<Text, _>(application_name)
        .get_result(observer)
        .unwrap();
        if waiting.n > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing named {application_name} ever waited for a lock");
}

/// Holds up migrations into `schema`, created empty here: a session that has begun
/// to drop it holds the lock every statement creating a table in it needs, until
/// [`HOLD`] after a manager started waiting for it (then rolls back). Joined: the
/// migrations may go on.
fn hold_migrations(schema: &str) -> JoinHandle<()> {
    let mut holder = connect();
    holder
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\"; BEGIN; DROP SCHEMA \"{schema}\""
        ))
        .unwrap();
    let name = application_name(schema);
    std::thread::spawn(move || {
        wait_until_blocked(&mut connect(), &name);
        std::thread::sleep(HOLD);
        holder.batch_execute("ROLLBACK").unwrap();
    })
}

/// A partitioning of `db`'s tables kept waiting for a table another session holds:
/// it holds `db`'s migration lock meanwhile.
struct HeldPartitioning {
    holder: PgConnection,
    partitioning: JoinHandle<pgcache::Result<Vec<pgcache::Partitioning>>>,
}

impl HeldPartitioning {
    fn start(db: &TestDb) -> Self {
        let mut holder = db.raw_connection();
        holder
            .batch_execute("BEGIN; LOCK TABLE cache_entries IN ACCESS EXCLUSIVE MODE")
            .unwrap();
        let cache = db.cache.clone();
        let partitioning = std::thread::spawn(move || cache.partition_tables(2));
        wait_until_blocked(&mut connect(), &application_name(&db.schema));
        HeldPartitioning {
            holder,
            partitioning,
        }
    }

    /// Lets the partitioning go on; its result.
    fn finish(mut self) -> pgcache::Result<Vec<pgcache::Partitioning>> {
        self.holder.batch_execute("ROLLBACK").unwrap();
        self.partitioning.join().unwrap()
    }
}

#[test]
fn managers_starting_at_once_on_a_schema_that_does_not_exist_yet_all_start() {
    const MANAGERS: usize = 8;
    for round in 0..6 {
        let schema = Fresh::new();
        for result in start_at_once(MANAGERS, &schema, |b| b) {
            result.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}

#[test]
fn managers_start_while_a_long_partitioning_holds_a_migration_lock() {
    let partitioned = TestDb::new();
    let migrated = TestDb::new();
    let held = HeldPartitioning::start(&partitioned);
    let short = |b: CacheConfigBuilder| b.statement_timeout(SHORT_TIMEOUT).build().unwrap();
    let fresh = Fresh::new();
    // Another schema, with every migration pending (so its own lock taken) ...
    let on_fresh = CacheManager::new(short(config(&fresh)));
    // ... another schema, migrated ...
    let on_migrated = CacheManager::new(short(migrated.config()));
    // ... and the schema being partitioned: nothing to migrate, so nothing to wait for.
    let on_same = CacheManager::new(short(partitioned.config()));
    let partitioning = held.finish();
    for (what, started) in [
        ("a fresh schema", on_fresh),
        ("a migrated schema", on_migrated),
        ("the schema being partitioned", on_same),
    ] {
        let cache = started.unwrap_or_else(|e| panic!("{what}: {e}"));
        cache
            .kv()
            .set("k", &json!(what))
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(cache.kv().get("k").unwrap(), Some(json!(what)), "{what}");
    }
    partitioning.unwrap();
}

#[test]
fn managers_starting_at_once_wait_for_a_slow_migration_past_their_statement_timeout() {
    const MANAGERS: usize = 16;
    let schema = Fresh::new();
    let held = hold_migrations(&schema);
    let results = start_at_once(MANAGERS, &schema, |b| b.statement_timeout(SHORT_TIMEOUT));
    held.join().unwrap();
    for (i, result) in results.into_iter().enumerate() {
        result.unwrap_or_else(|e| panic!("manager {i}: {e}"));
    }
}

#[test]
fn a_fail_open_manager_migrates_at_start_past_its_statement_timeout_so_its_first_write_is_stored() {
    let schema = Fresh::new();
    let held = hold_migrations(&schema);
    let started = CacheManager::new(
        config(&schema)
            .fail_open(true)
            .statement_timeout(Duration::from_millis(200))
            .build()
            .unwrap(),
    );
    held.join().unwrap();
    let cache = started.unwrap();
    cache.kv().set("first", &json!(1)).unwrap();
    assert_eq!(cache.kv().get("first").unwrap(), Some(json!(1)));
    assert_eq!(cache.failed_open_count(), 0, "nothing failed open");
}
