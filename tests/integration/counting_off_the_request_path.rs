//! Hit and miss counters are written by a background thread: a get never waits for
//! a second connection or for a counter write.

use crate::common;

use std::time::{Duration, Instant};

use common::TestDb;
use diesel::connection::SimpleConnection;
use pgcache::{Cache, LlmPrompt};

/// The slowest of `n` calls of `op`.
fn slowest(n: usize, mut op: impl FnMut()) -> Duration {
    (0..n)
        .map(|_| {
            let started = Instant::now();
            op();
            started.elapsed()
        })
        .max()
        .unwrap()
}

#[test]
fn gets_on_a_one_connection_pool_never_wait_for_a_flush_of_many_entry_hits() {
    let db = TestDb::with(|b| {
        b.pool_max_size(1)
            .pool_connection_timeout(Duration::from_millis(800))
    });
    let llm = db.cache.llm_response();
    let prompts: Vec<LlmPrompt> = (0..12_000)
        .map(|i| LlmPrompt::new(format!("prompt {i}"), "p"))
        .collect();
    let response = "r".to_owned();
    let entries: Vec<_> = prompts.iter().map(|p| (p, &response)).collect();
    llm.set_many(&entries, Duration::from_secs(600)).unwrap();
    // Over ten thousand entries with a pending hit: a flush is due at once.
    let all: Vec<&LlmPrompt> = prompts.iter().collect();
    assert!(llm.get_many(&all).unwrap().iter().all(Option::is_some));
    let worst = slowest(20, || {
        assert!(llm.get(&prompts[0]).unwrap().is_some());
    });
    assert!(worst < Duration::from_millis(400), "a get took {worst:?}");
    // The hits still arrive, written off the request path.
    db.cache.flush_stats().unwrap();
    assert_eq!(
        db.count("SELECT sum(hit_count)::bigint AS n FROM llm_response_cache"),
        12_020
    );
}

#[test]
fn gets_never_wait_for_a_locked_counter_table() {
    let db = TestDb::with(|b| {
        b.stats_flush_interval(Duration::from_millis(50))
            .statement_timeout(Duration::from_millis(1500))
    });
    let kv = db.cache.kv();
    kv.set("k", &serde_json::json!(1)).unwrap();
    let mut locker = db.raw_connection();
    locker
        .batch_execute("BEGIN; LOCK TABLE cache_counters IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let worst = slowest(20, || {
        assert!(kv.get("k").unwrap().is_some());
        std::thread::sleep(Duration::from_millis(60));
    });
    locker.batch_execute("ROLLBACK").unwrap();
    assert!(
        worst < Duration::from_millis(60 + 400),
        "a get took {worst:?}"
    );
}
