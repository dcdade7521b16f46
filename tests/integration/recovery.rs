//! Every operation recovers after the server restarts or its connections are killed:
//! maintenance operations, `cache.connection()` and migrations as well as get/set.
//!
//! The restart runs on a scratch cluster of this test's own, never the main one.

use crate::scratch;

use std::time::Duration;

use diesel::Connection;
use pgcache::{Cache, CacheConfig, CacheManager, HealthThresholds};
use scratch::ScratchCluster;
use serde_json::json;

fn manager(cluster: &ScratchCluster, pool: u32) -> CacheManager {
    let config = CacheConfig::builder()
        .database_url(cluster.url())
        .schema("recovery")
        .pool_max_size(pool)
        .pool_connection_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    CacheManager::new(config).unwrap()
}

/// Opens `n` connections at once so the pool holds `n` idle connections.
fn fill_pool(cache: &CacheManager, n: usize) {
    let held: Vec<_> = (0..n).map(|_| cache.connection().unwrap()).collect();
    drop(held);
}

#[test]
fn every_operation_recovers_after_a_fast_restart() {
    let cluster = ScratchCluster::start();
    let cache = manager(&cluster, 4);
    cache.kv().set("k", &json!(1)).unwrap();
    let thresholds = HealthThresholds::new().no_cleanup_age_check();

    // Each round kills every pooled connection, then runs every operation twice:
    // none may fail, and the second call of each proves no dead connection was put
    // back into the pool by the first.
    for round in 0..2 {
        fill_pool(&cache, 4);
        cluster.restart();
        for attempt in 0..2 {
            let at = format!("round {round}, attempt {attempt}");
            cache
                .health(&thresholds)
                .unwrap_or_else(|e| panic!("health, {at}: {e}"));
            cache.stats().unwrap_or_else(|e| panic!("stats, {at}: {e}"));
            cache
                .cleanup()
                .unwrap_or_else(|e| panic!("cleanup, {at}: {e}"));
            cache
                .invalidate_user(uuid::Uuid::new_v4())
                .unwrap_or_else(|e| panic!("invalidate_user, {at}: {e}"));
            cache
                .invalidate_model("m")
                .unwrap_or_else(|e| panic!("invalidate_model, {at}: {e}"));
            cache
                .warmup(&serde_json::from_value(json!({"kv": [{"key": "w", "value": 1}]})).unwrap())
                .unwrap_or_else(|e| panic!("warmup, {at}: {e}"));
            cache
                .run_migrations()
                .unwrap_or_else(|e| panic!("run_migrations, {at}: {e}"));
            cache
                .clear(Some(pgcache::CacheKind::Embedding))
                .unwrap_or_else(|e| panic!("clear, {at}: {e}"));
            let mut conn = cache
                .connection()
                .unwrap_or_else(|e| panic!("connection, {at}: {e}"));
            conn.transaction(|conn| cache.kv().delete_in(conn, "nothing"))
                .unwrap_or_else(|e| panic!("transaction on connection(), {at}: {e}"));
            drop(conn);
            assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)), "{at}");
        }
    }
}

#[test]
fn a_dead_connection_is_never_handed_out_twice() {
    let cluster = ScratchCluster::start();
    let cache = manager(&cluster, 8);
    fill_pool(&cache, 8);
    cluster.restart();
    // Eight maintenance calls in a row after the restart: with dead connections going
    // back into the pool, each would fail in turn.
    for i in 0..8 {
        cache
            .stats()
            .unwrap_or_else(|e| panic!("stats call {i} after the restart: {e}"));
    }
}

#[test]
fn your_own_transactions_on_connection_fail_at_most_once_after_a_restart() {
    let cluster = ScratchCluster::start();
    let cache = manager(&cluster, 4);
    fill_pool(&cache, 4);
    cluster.restart();
    let mut failures = 0;
    for _ in 0..8 {
        let mut conn = cache.connection().unwrap();
        if conn
            .transaction(|conn| cache.kv().delete_in(conn, "nothing"))
            .is_err()
        {
            failures += 1;
        }
    }
    // The first may meet a connection that died idle; it is probed, found dead, and
    // every other pooled connection is probed at its next checkout.
    assert!(failures <= 1, "{failures} transactions failed");
}
