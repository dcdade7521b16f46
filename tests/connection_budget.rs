//! The connections a manager opens: a fresh one with the defaults keeps one, and
//! `pool_status` (also in `stats`) says what each shard's pool holds.

mod common;
mod proxy;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::BigInt;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use pgcache::{Cache, CacheConfig, CacheManager, PoolSource, PoolStatus};
use serde_json::json;

use common::{database_url, TestDb};

/// Server connections with `application_name` = `name`, as the server sees them.
fn server_connections(name: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(&database_url()).unwrap();
    diesel::sql_query("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1")
        .bind::<diesel::sql_types::Text, _>(name)
        .get_result::<N>(&mut conn)
        .unwrap()
        .n
}

fn only(cache: &CacheManager) -> PoolStatus {
    let mut pools = cache.pool_status();
    assert_eq!(pools.len(), 1, "{pools:?}");
    pools.pop().unwrap()
}

/// Waits (at most 10 s) until `cache`'s pool satisfies `done`.
fn wait_for(cache: &CacheManager, what: &str, done: impl Fn(&PoolStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = only(cache);
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {status:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_fresh_manager_with_the_defaults_keeps_one_server_connection() {
    let name = format!("budget-{}", uuid::Uuid::new_v4().simple());
    let defaults = CacheConfig::builder().build().unwrap().pool();
    let db = TestDb::with(|b| {
        b.pool_max_size(defaults.max_size)
            .pool_min_idle(defaults.min_idle)
            .application_name(&name)
    });
    let status = only(&db.cache);
    // The start-up check and migrations took one pooled connection; nothing idle
    // is opened ahead of need.
    assert_eq!(status.source, PoolSource::Own);
    assert_eq!(status.max_size, defaults.max_size);
    assert_eq!(status.open, 1, "{status:?}");
    assert_eq!(server_connections(&name), 1);
}

#[test]
fn a_checkout_waiting_for_a_slow_connection_opens_only_one() {
    // Every reply 30 ms late: opening a connection (its start-up, its session
    // settings) takes longer than a checkout's 20 ms look at failed attempts.
    let proxy = proxy::DelayProxy::start(&database_url(), Duration::from_millis(30));
    let config = CacheConfig::builder()
        .database_url(proxy.url(&database_url()))
        .pool_max_size(10)
        .pool_connection_timeout(Duration::from_secs(30))
        .run_migrations(false)
        .build()
        .unwrap();
    // Start-up checks a connection out of the empty pool.
    let cache = CacheManager::new(config).unwrap();
    // Attempts started meanwhile would open now.
    std::thread::sleep(Duration::from_millis(500));
    let status = only(&cache);
    assert_eq!(status.open, 1, "{status:?}");
}

#[test]
fn pool_status_counts_open_idle_parked_in_use_and_waiting() {
    let db = TestDb::with(|b| {
        b.pool_max_size(2)
            .pool_connection_timeout(Duration::from_secs(30))
    });
    let cache = &db.cache;
    cache.kv().set("k", &json!(1)).unwrap();
    // This thread's connection stays parked for its next operation.
    let status = only(cache);
    assert_eq!(
        (
            status.open,
            status.parked,
            status.idle,
            status.in_use(),
            status.waiting
        ),
        (1, 1, 0, 0, 0),
        "{status:?}"
    );
    // Both connections handed out: none left.
    let first = cache.connection().unwrap();
    let second = cache.connection().unwrap();
    let status = only(cache);
    assert_eq!(
        (status.open, status.parked, status.idle, status.in_use()),
        (2, 0, 0, 2),
        "{status:?}"
    );
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| cache.kv().get("k").unwrap());
        wait_for(cache, "a checkout waiting", |s| s.waiting == 1);
        drop(first);
        assert_eq!(reader.join().unwrap(), Some(json!(1)));
    });
    drop(second);
    let status = only(cache);
    assert_eq!(status.waiting, 0, "{status:?}");
    assert_eq!(status.open, 2, "{status:?}");
    // `stats` shows the same figures.
    let stats = cache.stats().unwrap();
    assert_eq!(stats.pools.len(), 1);
    assert_eq!(stats.pools[0].shard, pgcache::DEFAULT_SHARD);
    assert_eq!(stats.pools[0].open, 2);
    let text = stats.to_string();
    assert!(
        text.contains("Connection Pool (default):\n  2 open of 2 (own):"),
        "{text}"
    );
}

#[test]
fn pool_status_of_a_manager_over_the_apps_pool_is_the_apps_pool() {
    let db = TestDb::new();
    let app_pool = Pool::builder()
        .max_size(3)
        .min_idle(Some(0))
        .build(ConnectionManager::<PgConnection>::new(database_url()))
        .unwrap();
    let cache = CacheManager::with_pool(app_pool.clone(), db.config().build().unwrap()).unwrap();
    cache.kv().set("k", &json!(1)).unwrap();
    let held = app_pool.get().unwrap();
    let status = only(&cache);
    assert_eq!(status.source, PoolSource::Application);
    assert_eq!(status.max_size, 3);
    assert_eq!(
        status.parked, 0,
        "the application's connections go straight back"
    );
    assert_eq!(status.open, app_pool.state().connections);
    assert_eq!(status.idle, app_pool.state().idle_connections);
    assert!(status.in_use() >= 1, "{status:?}");
    drop(held);
}

#[test]
fn pool_status_with_caching_disabled_counts_the_plain_connections() {
    let config = CacheConfig::builder()
        .database_url(database_url())
        .enabled(false)
        .build()
        .unwrap();
    let cache = CacheManager::new(config).unwrap();
    let status = only(&cache);
    assert_eq!(status.source, PoolSource::Disabled);
    assert_eq!(status.open, 0, "nothing opened before it is asked for");
    let mut conn = cache.connection().unwrap();
    conn.batch_execute("SELECT 1").unwrap();
    let status = only(&cache);
    assert_eq!((status.open, status.in_use()), (1, 1), "{status:?}");
    drop(conn);
    assert_eq!(only(&cache).idle, 1);
}

#[test]
fn a_managers_debug_is_one_line_showing_the_apps_pool_as_it_is() {
    let db = TestDb::new();
    let app_pool = Pool::builder()
        .max_size(5)
        .min_idle(Some(0))
        .build(ConnectionManager::<PgConnection>::new(database_url()))
        .unwrap();
    let cache = CacheManager::with_pool(app_pool, db.config().build().unwrap()).unwrap();
    let debug = format!("{cache:?}");
    assert!(!debug.contains('\n'), "{debug}");
    assert!(debug.len() < 400, "compact: {debug}");
    assert!(debug.contains("of 5 (the application's)"), "{debug}");
    assert!(
        !debug.contains("of 20"),
        "not the default pool size: {debug}"
    );
    assert!(debug.contains(&db.schema), "{debug}");
    // The cache's own pool, with its configured size.
    let own = TestDb::with(|b| b.pool_max_size(7));
    let debug = format!("{:?}", own.cache);
    assert!(debug.contains("of 7 (own)"), "{debug}");
}
