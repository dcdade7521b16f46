//! Async single flight: `get_or_compute` with a future computes once per missing key
//! across tasks and processes, and a cancelled or panicking computation hands the key
//! to a waiter at once.

use crate::common;

use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDb;
use pgcache::{AsyncCacheManager, CacheManager, Error};
use serde_json::{json, Value};

/// Names the schema for [`child_process_runs_twenty_tasks`].
const CHILD_SCHEMA: &str = "PGCACHE_TEST_ASYNC_CHILD_SCHEMA";
/// What the child prints once its manager is up.
const READY: &str = "child ready";

/// `n` tasks asking `cache` for the key `report`; the one computing records it in
/// the table `computations` (shared by every process) and takes a while.
fn ask(cache: &AsyncCacheManager, n: usize) -> Vec<tokio::task::JoinHandle<Result<Value, Error>>> {
    (0..n)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .kv()
                    .get_or_compute("report", || async {
                        cache
                            .run(|cache| {
                                use diesel::connection::SimpleConnection;
                                cache
                                    .connection()?
                                    .batch_execute("INSERT INTO computations DEFAULT VALUES")
                                    .map_err(Error::from)
                            })
                            .await?;
                        // Long enough that every other task, in both processes, misses.
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        Ok::<_, Error>(json!({"total": 42}))
                    })
                    .await
            })
        })
        .collect()
}

/// Not a test on its own: the body of the child process started by
/// `forty_tasks_in_two_processes_compute_once` (this test binary run again with only
/// this test selected). Does nothing in a normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_runs_twenty_tasks() {
    let Ok(schema) = std::env::var(CHILD_SCHEMA) else {
        return;
    };
    let config = pgcache::CacheConfig::builder()
        .database_url(common::database_url())
        .schema(schema)
        .run_migrations(false)
        .pool_max_size(4)
        .pool_connection_timeout(common::CONNECTION_TIMEOUT)
        .build()
        .unwrap();
    let cache = tokio::task::spawn_blocking(|| CacheManager::new(config))
        .await
        .unwrap()
        .unwrap()
        .to_async();
    println!("{READY}");
    for task in ask(&cache, 20) {
        assert_eq!(task.await.unwrap().unwrap(), json!({"total": 42}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_tasks_in_two_processes_compute_once() {
    let db = TestDb::new();
    db.exec("CREATE TABLE computations (at TIMESTAMPTZ NOT NULL DEFAULT now())");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "async_single_flight::child_process_runs_twenty_tasks",
            "--nocapture",
        ])
        .env(CHILD_SCHEMA, &db.schema)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both processes start asking together.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while stdout.read_line(&mut line).unwrap() > 0 {
            if line.trim() == READY {
                return Some(stdout);
            }
            line.clear();
        }
        None
    })
    .await
    .unwrap();
    // Fewer blocking calls than tasks: waiters must not hold one while they wait.
    let cache = db.cache.to_async().max_blocking(2);
    let ours = ask(&cache, 20);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        ready.is_some() && out.status.success(),
        "the child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for task in ours {
        assert_eq!(task.await.unwrap().unwrap(), json!({"total": 42}));
    }
    assert_eq!(db.count("SELECT count(*) AS n FROM computations"), 1);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
}

/// A computation that signals it started, then never finishes.
async fn stuck(started: tokio::sync::oneshot::Sender<()>) -> Result<Value, Error> {
    started.send(()).unwrap();
    std::future::pending().await
}

/// With a lease TTL far beyond the test's length, only a release hands the key over.
fn long_lease_db() -> TestDb {
    TestDb::with(|b| {
        b.lease_ttl(Duration::from_secs(120))
            .compute_wait_timeout(Duration::from_secs(120))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_computation_releases_the_key_and_a_waiter_computes() {
    let db = long_lease_db();
    let cache = db.cache.to_async();
    let (started, running) = tokio::sync::oneshot::channel();
    let computing = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.kv().get_or_compute("slow", || stuck(started)).await })
    };
    running.await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let waiter = {
        let (cache, calls) = (cache.clone(), calls.clone());
        tokio::spawn(async move {
            cache
                .kv()
                .get_or_compute("slow", || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(json!("from the waiter"))
                })
                .await
        })
    };
    // Let the waiter find the key taken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the waiter waits");
    let cancelled = Instant::now();
    computing.abort();
    assert!(computing.await.unwrap_err().is_cancelled());
    let value = waiter.await.unwrap().unwrap();
    assert_eq!(value, json!("from the waiter"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let took = cancelled.elapsed();
    assert!(
        took < Duration::from_secs(120),
        "taken over after {took:?}, not at the lease's lapse"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_computation_releases_the_key() {
    let db = long_lease_db();
    let cache = db.cache.to_async();
    let panicked = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .kv()
                .get_or_compute("boom", || async {
                    tokio::task::yield_now().await;
                    panic!("the model crashed");
                    #[allow(unreachable_code)]
                    Ok::<Value, Error>(json!(null))
                })
                .await
        })
    };
    assert!(panicked.await.unwrap_err().is_panic());
    let started = Instant::now();
    let value = cache
        .kv()
        .get_or_compute("boom", || async { Ok::<_, Error>(json!("second try")) })
        .await
        .unwrap();
    assert_eq!(value, json!("second try"));
    assert!(started.elapsed() < Duration::from_secs(120));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_computation_caches_nothing_and_the_error_is_returned() {
    let db = TestDb::new();
    let cache = db.cache.to_async();
    let failed = cache
        .kv()
        .get_or_set("flaky", Duration::from_secs(60), || async {
            Err::<Value, _>(Error::from(serde_json::from_str::<Value>("{").unwrap_err()))
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(cache.kv().get("flaky").await.unwrap(), None);
    let value = cache
        .kv()
        .get_or_set("flaky", Duration::from_secs(60), || async {
            Ok::<_, Error>(json!(7))
        })
        .await
        .unwrap();
    assert_eq!(value, json!(7));
    // A hit now: the computation is not run.
    let again = cache
        .kv()
        .get_or_set("flaky", Duration::from_secs(60), || async {
            Ok::<_, Error>(json!("not this"))
        })
        .await
        .unwrap();
    assert_eq!(again, json!(7));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
}
