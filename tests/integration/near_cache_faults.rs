//! The near cache's staleness bound under faults, each on a scratch cluster of its
//! own: a poller whose server process is frozen (its polls held), for a
//! while or for good, a server restart, and a server stopped under a fail-open
//! manager. In every case no read that starts more than the bound `S` after a write
//! committed (or after the server went away) returns what L1 held before, and the
//! near cache serves from memory again within a second of the fault ending (for a
//! poller frozen for good: of its poll being cut, as any unanswered
//! statement is).

use crate::near_support;
use crate::scratch;

use near_support::{kv_stats, recovery_limit, wait_current};
use std::process::Command;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use pgcache::{Cache, CacheConfig, CacheConfigBuilder, CacheKind, CacheManager, NearCache};
use scratch::ScratchCluster;
use serde_json::{json, Value};

/// The staleness bound the tests run with.
const BOUND: Duration = Duration::from_millis(100);

/// Generous limits for waits that are not guarantees (a noisy machine).
const PATIENCE: Duration = Duration::from_secs(10);

const SCHEMA: &str = "near_faults";
const APPLICATION: &str = "pgcache-near-faults";

fn manager(cluster: &ScratchCluster, fail_open: bool) -> CacheManager {
    manager_with(cluster, |b| b.fail_open(fail_open))
}

fn manager_with(
    cluster: &ScratchCluster,
    tweak: impl FnOnce(CacheConfigBuilder) -> CacheConfigBuilder,
) -> CacheManager {
    let config = CacheConfig::builder()
        .database_url(cluster.url())
        .schema(SCHEMA)
        .application_name(APPLICATION)
        .pool_max_size(4)
        // Connecting takes long on a busy machine (a refused connection still
        // fails a checkout within milliseconds while the server is down).
        .pool_connection_timeout(Duration::from_secs(15))
        .near_cache(CacheKind::Kv, Some(NearCache::new()))
        .near_cache_staleness(BOUND);
    let config = tweak(config).build().unwrap();
    CacheManager::new(config).unwrap()
}

/// A plain connection to the scratch cluster, on the tests' schema.
fn plain_sql(cluster: &ScratchCluster) -> PgConnection {
    let mut conn = PgConnection::establish(&cluster.url()).unwrap();
    conn.batch_execute(&format!("SET search_path TO {SCHEMA}"))
        .unwrap();
    conn
}

/// Reads `key` until a read is served from memory; panics if none is within
/// `PATIENCE`. Returns the value served.
fn warm(cache: &CacheManager, key: &str) -> Option<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let hits = kv_stats(cache).hits;
        let value = cache.kv().get(key).unwrap();
        if kv_stats(cache).hits > hits {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{key} is never served from memory"
        );
    }
}

/// One `get` of a key: when it started (after the test's reference instant), what
/// it returned, and whether it was answered from memory.
#[derive(Debug)]
struct Read {
    started: Duration,
    value: Option<Value>,
    from_memory: bool,
}

/// Reads `keys` round-robin from `reference` on, until `done` holds for the reads
/// so far (or `PATIENCE` has passed); reads that fail count as misses, as in
/// fail-open mode, but only if `allow_errors`.
fn read_until(
    cache: &CacheManager,
    keys: &[String],
    reference: Instant,
    allow_errors: bool,
    mut done: impl FnMut(&[Read]) -> bool,
) -> Vec<Read> {
    let mut reads = Vec::new();
    for key in keys.iter().cycle() {
        if done(&reads) || reference.elapsed() > PATIENCE {
            break;
        }
        let hits = kv_stats(cache).hits;
        let started = reference.elapsed();
        let value = match cache.kv().get(key) {
            Ok(value) => value,
            Err(error) if allow_errors => {
                eprintln!("get {key} failed: {error}");
                None
            }
            Err(error) => panic!("get {key}: {error}"),
        };
        reads.push(Read {
            started,
            value,
            from_memory: kv_stats(cache).hits > hits,
        });
    }
    reads
}

/// The reads that started at least `BOUND` after the reference instant.
fn after_bound(reads: &[Read]) -> impl Iterator<Item = &Read> {
    after(reads, BOUND)
}

/// The reads that started at least `since` after the reference instant.
fn after(reads: &[Read], since: Duration) -> impl Iterator<Item = &Read> {
    reads.iter().filter(move |r| r.started >= since)
}

/// Sends `signal` (`-STOP`, `-CONT`) to one process.
fn signal(signal: &str, pid: i32) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[derive(QueryableByName)]
struct Backend {
    #[diesel(sql_type = Integer)]
    pid: i32,
    #[diesel(sql_type = Text)]
    state: String,
}

/// The server process of the near-cache poller of `APPLICATION`: the connection
/// whose last statement polled the change log.
fn poller_backend(conn: &mut PgConnection) -> Backend {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found: Vec<Backend> = diesel::sql_query(
            "SELECT pid, coalesce(state, '') AS state FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE '%pg_current_snapshot%'",
        )
        .bind::<Text, _>(APPLICATION)
        .load(conn)
        .unwrap();
        match <[Backend; 1]>::try_from(found) {
            Ok([backend]) => return backend,
            Err(found) => assert!(
                Instant::now() < deadline,
                "expected one poller, found {}",
                found.len()
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server processes of every near-cache poller of `APPLICATION`.
fn poller_pids(conn: &mut PgConnection) -> Vec<i32> {
    diesel::sql_query(
        "SELECT pid, coalesce(state, '') AS state FROM pg_stat_activity \
         WHERE application_name = $1 AND query LIKE '%pg_current_snapshot%'",
    )
    .bind::<Text, _>(APPLICATION)
    .load::<Backend>(conn)
    .unwrap()
    .into_iter()
    .map(|b| b.pid)
    .collect()
}

/// Thaws a frozen process when dropped, so that a failing test does not leave the
/// poller frozen (dropping the manager would wait for it).
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Freezes the poller's server process while it is idle between polls, so the
/// freeze holds back its next poll, not one already answered.
fn freeze_poller(conn: &mut PgConnection) -> i32 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pid = poller_backend(conn).pid;
        signal("-STOP", pid);
        // pg_stat_activity is read afresh by each statement outside a transaction.
        if poller_backend(conn).state == "idle" {
            return pid;
        }
        signal("-CONT", pid);
        assert!(
            Instant::now() < deadline,
            "the poller is never idle to freeze"
        );
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// Reads `keys` from `reference` until a read is answered from memory again and
/// returns how long after `reference` that read started; every value read must be
/// `expected` (or a miss, if `fail_open`: a read may fail open while the pool
/// finds its connections dead).
fn time_to_memory(
    cache: &CacheManager,
    keys: &[String],
    reference: Instant,
    expected: &Value,
    fail_open: bool,
) -> Duration {
    let reads = read_until(cache, keys, reference, false, |reads| {
        reads.last().is_some_and(|r| r.from_memory)
    });
    for read in &reads {
        if !(fail_open && read.value.is_none()) {
            assert_eq!(read.value.as_ref(), Some(expected), "{read:?}");
        }
    }
    let last = reads.last().expect("reads were made");
    assert!(
        last.from_memory,
        "never served from memory again: {} reads",
        reads.len()
    );
    last.started
}

/// Stores `value` under `n` keys and reads each into the near cache; the keys.
fn hold(cache: &CacheManager, n: usize, value: &Value) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    for key in &keys {
        cache.kv().set(key, value).unwrap();
        assert_eq!(warm(cache, key).as_ref(), Some(value), "{key}");
    }
    keys
}

#[test]
fn a_frozen_poller_turns_the_near_cache_off_within_the_bound_and_it_serves_again_after() {
    let cluster = ScratchCluster::start();
    let cache = manager(&cluster, false);
    let mut sql = plain_sql(&cluster);
    wait_current(&cache);
    let key = vec!["k".to_owned()];
    cache.kv().set("k", &json!("old")).unwrap();
    assert_eq!(warm(&cache, "k"), Some(json!("old")));

    // Changes stop reaching this process: the poller's server process is
    // frozen, its connection stays open.
    let pid = freeze_poller(&mut sql);
    let _thaw = Thaw(pid);
    let bypasses = kv_stats(&cache).bypasses;
    sql.batch_execute("UPDATE cache_entries SET value = '\"new\"' WHERE key = 'k'")
        .unwrap();
    let committed = Instant::now();
    // Read for several bounds while the poller stays frozen.
    let reads = read_until(&cache, &key, committed, false, |reads| {
        reads.last().is_some_and(|r| r.started > BOUND * 4)
    });
    let frozen_for = committed.elapsed();
    let early_old = reads
        .iter()
        .filter(|r| r.value == Some(json!("old")))
        .count();
    let violations: Vec<&Read> = after_bound(&reads)
        .filter(|r| r.value != Some(json!("new")))
        .collect();
    let late = after_bound(&reads).count();
    eprintln!(
        "frozen poller: {} reads over {frozen_for:?}, {early_old} old within the bound, \
         {late} after it, {} violations",
        reads.len(),
        violations.len()
    );
    assert!(late > 0, "no read after the bound: {reads:?}");
    assert!(
        violations.is_empty(),
        "stale after the bound: {violations:?}"
    );
    assert!(
        after_bound(&reads).all(|r| !r.from_memory),
        "served from memory while the channel was frozen: {reads:?}"
    );
    let bypassed = kv_stats(&cache).bypasses - bypasses;
    assert!(
        bypassed >= late as u64,
        "{bypassed} bypasses for {late} reads"
    );
    assert!(
        kv_stats(&cache).poll_lag_ms.is_none(),
        "the channel counts as current while frozen"
    );

    // Thawed: the poller reads the log again, and L1 serves the
    // new value from memory again.
    signal("-CONT", pid);
    let thawed = Instant::now();
    let back = time_to_memory(&cache, &key, thawed, &json!("new"), false);
    eprintln!("frozen poller: served from memory {back:?} after the thaw");
    let limit = recovery_limit(&cluster.url());
    assert!(
        back < limit,
        "served from memory only {back:?} after the thaw"
    );
}

#[test]
fn after_a_server_restart_no_entry_from_before_is_served_past_the_bound() {
    let cluster = ScratchCluster::start();
    let cache = manager(&cluster, false);
    wait_current(&cache);
    let keys = hold(&cache, 8, &json!("old"));
    assert_eq!(kv_stats(&cache).entries, keys.len() as u64);

    cluster.restart();
    let answering = Instant::now();
    // A write committed as soon as the server is back, before the poller may be.
    plain_sql(&cluster)
        .batch_execute("UPDATE cache_entries SET value = '\"new\"'")
        .unwrap();
    let committed = answering.elapsed();
    let bound = committed + BOUND;
    // Read for a few bounds, and on until reads come from memory again.
    let reads = read_until(&cache, &keys, answering, false, |reads| {
        reads.last().is_some_and(|r| r.started > bound + BOUND * 2)
            && reads.iter().any(|r| r.from_memory)
    });
    let late = after(&reads, bound).count();
    let not_new: Vec<&Read> = reads
        .iter()
        .filter(|r| r.value != Some(json!("new")))
        .collect();
    let back = reads.iter().find(|r| r.from_memory).map(|r| r.started);
    eprintln!(
        "restart: write committed {committed:?} after the server answered; {} reads, \
         {late} after the bound, {} not the new value (any time); first served from \
         memory {back:?} after the server answered",
        reads.len(),
        not_new.len()
    );
    assert!(late > 0, "no read after the bound");
    assert!(
        after(&reads, bound).all(|r| r.value == Some(json!("new"))),
        "stale after the bound: {not_new:?}"
    );

    // Within a second of the server answering, reads come from memory again.
    let back = back.expect("never served from memory again");
    let limit = recovery_limit(&cluster.url());
    assert!(
        back < limit,
        "served from memory only {back:?} after the server answered"
    );
}

#[test]
fn fail_open_with_the_server_stopped_misses_instead_of_serving_memory_past_the_bound() {
    let cluster = ScratchCluster::start();
    let cache = manager(&cluster, true);
    wait_current(&cache);
    let keys = hold(&cache, 4, &json!("held"));
    let failed_open = cache.failed_open_count();
    let bypasses = kv_stats(&cache).bypasses;

    // `stop` returns once the server is gone; it went away some time before.
    cluster.stop();
    let stopped = Instant::now();
    let reads = read_until(&cache, &keys, stopped, true, |reads| {
        after_bound(reads).count() >= 2 * keys.len()
    });
    let served: Vec<&Read> = reads.iter().filter(|r| r.value.is_some()).collect();
    eprintln!(
        "fail-open, server stopped: {} reads over {:?}, {} after the bound, {} answered \
         with a value (any time), {} failed open, {} bypasses",
        reads.len(),
        stopped.elapsed(),
        after_bound(&reads).count(),
        served.len(),
        cache.failed_open_count() - failed_open,
        kv_stats(&cache).bypasses - bypasses
    );
    assert!(
        after_bound(&reads).count() >= 2 * keys.len(),
        "too few reads after the bound: {reads:?}"
    );
    assert!(
        after_bound(&reads).all(|r| r.value.is_none() && !r.from_memory),
        "memory served past the bound with the server down: {served:?}"
    );
    assert!(
        cache.failed_open_count() - failed_open >= after_bound(&reads).count() as u64,
        "reads past the bound were failed open"
    );
    assert!(
        kv_stats(&cache).bypasses - bypasses >= after_bound(&reads).count() as u64,
        "reads past the bound bypassed the near cache"
    );
    assert_eq!(kv_stats(&cache).entries, 0, "the lost channel emptied L1");

    // Back up: the entries are still in the table, and once the poller is current
    // again they are served from memory.
    cluster.start_again();
    let answering = Instant::now();
    let back = time_to_memory(&cache, &keys, answering, &json!("held"), true);
    eprintln!("fail-open: served from memory {back:?} after the server answered");
    let limit = recovery_limit(&cluster.url());
    assert!(
        back < limit,
        "served from memory only {back:?} after the server answered"
    );
}

/// The statement timeout of the tests of a poller frozen for good, and how long
/// after a statement is sent pgcache cuts it when the server cannot answer.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
const NO_ANSWER_LIMIT: Duration = Duration::from_secs(2);

#[test]
fn a_poller_frozen_for_good_is_replaced_and_the_near_cache_serves_again() {
    let cluster = ScratchCluster::start();
    let cache = manager_with(&cluster, |b| b.statement_timeout(STATEMENT_TIMEOUT));
    let mut sql = plain_sql(&cluster);
    wait_current(&cache);
    let key = vec!["k".to_owned()];
    cache.kv().set("k", &json!("old")).unwrap();
    assert_eq!(warm(&cache, "k"), Some(json!("old")));

    // The poller's server process is frozen and stays frozen: its poll is
    // never answered, and only a new connection can bring the channel back.
    let pid = freeze_poller(&mut sql);
    let _thaw = Thaw(pid);
    sql.batch_execute("UPDATE cache_entries SET value = '\"new\"' WHERE key = 'k'")
        .unwrap();
    let committed = Instant::now();
    let reads = read_until(&cache, &key, committed, false, |reads| {
        reads
            .last()
            .is_some_and(|r| r.from_memory && r.started >= BOUND)
    });
    let late = after_bound(&reads).count();
    let stale: Vec<&Read> = after_bound(&reads)
        .filter(|r| r.value != Some(json!("new")))
        .collect();
    let back = after_bound(&reads)
        .find(|r| r.from_memory)
        .map(|r| r.started);
    eprintln!(
        "poller frozen for good: {} reads, {late} after the bound, {} stale after it; \
         served from memory again {back:?} after the write",
        reads.len(),
        stale.len()
    );
    assert!(late > 0, "no read after the bound");
    assert!(stale.is_empty(), "stale after the bound: {stale:?}");
    let back = back.expect("never served from memory again while the poller is frozen");
    // The frozen poll is cut at the no-answer limit; the new poller must be
    // current within the recovery guarantee after that.
    let limit = NO_ANSWER_LIMIT + recovery_limit(&cluster.url());
    assert!(
        back < limit,
        "served from memory only {back:?} after the write"
    );
    let pids = poller_pids(&mut sql);
    assert!(
        pids.iter().any(|&p| p != pid),
        "no new poller connection: {pids:?}"
    );
}

#[test]
fn a_manager_whose_poller_is_frozen_drops_within_the_no_answer_limit() {
    let cluster = ScratchCluster::start();
    let cache = manager_with(&cluster, |b| b.statement_timeout(STATEMENT_TIMEOUT));
    let mut sql = plain_sql(&cluster);
    wait_current(&cache);
    let pid = freeze_poller(&mut sql);
    let _thaw = Thaw(pid);
    // Let the poller send its next poll to the frozen process.
    std::thread::sleep(BOUND);
    let (dropped, done) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        drop(cache);
        let _ = dropped.send(());
    });
    // Scheduling and teardown slack on a busy machine.
    let limit = NO_ANSWER_LIMIT + Duration::from_secs(2);
    let outcome = done.recv_timeout(limit);
    eprintln!(
        "poller frozen: manager dropped {:?} after {:?}",
        outcome.is_ok(),
        started.elapsed()
    );
    assert!(
        outcome.is_ok(),
        "dropping the manager waited more than {limit:?} for a frozen poller"
    );
}
