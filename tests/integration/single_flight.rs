//! Single flight in `get_or_compute`: one computation per missing key, whatever the
//! number of threads and managers ("processes") asking at once.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use common::TestDb;
use pgcache::{Cache, CacheManager, Error};
use serde_json::{json, Value};

fn leases(db: &TestDb) -> i64 {
    db.count("SELECT count(*) AS n FROM cache_leases")
}

#[test]
fn concurrent_misses_across_threads_and_managers_compute_once() {
    let db = TestDb::new();
    // Two managers with their own pools stand for two processes.
    let managers = [db.cache.clone(), db.another_manager()];
    let calls = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (cache, calls, barrier) = (managers[i % 2].clone(), calls.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                cache.kv().get_or_compute("report", || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Long enough that every other thread misses meanwhile.
                    std::thread::sleep(Duration::from_millis(300));
                    Ok::<_, Error>(json!({"total": 42}))
                })
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), json!({"total": 42}));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        leases(&db),
        0,
        "the lease is released after the value is stored"
    );
}

#[test]
fn different_keys_do_not_wait_for_each_other() {
    let db = TestDb::new();
    let (tx, rx) = mpsc::channel::<()>();
    let cache = db.cache.clone();
    let slow = std::thread::spawn(move || {
        cache.kv().get_or_compute("slow", || {
            rx.recv().unwrap();
            Ok::<_, Error>(json!("slow"))
        })
    });
    // Computed while "slow" is still being computed: not blocked by its lease.
    let fast = db
        .cache
        .kv()
        .get_or_compute("fast", || Ok::<_, Error>(json!("fast")))
        .unwrap();
    assert_eq!(fast, json!("fast"));
    tx.send(()).unwrap();
    assert_eq!(slow.join().unwrap().unwrap(), json!("slow"));
}

#[derive(Debug, PartialEq)]
enum AppError {
    Model,
    Cache(String),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Cache(e.to_string())
    }
}

#[test]
fn failed_computation_releases_the_key_and_a_waiter_computes() {
    let db = TestDb::new();
    let (started_tx, started_rx) = mpsc::channel();
    let (fail_tx, fail_rx) = mpsc::channel::<()>();
    let cache = db.cache.clone();
    let first = std::thread::spawn(move || {
        cache
            .kv()
            .get_or_compute("k", || -> Result<Value, AppError> {
                started_tx.send(()).unwrap();
                fail_rx.recv().unwrap();
                Err(AppError::Model)
            })
    });
    started_rx.recv().unwrap();
    assert_eq!(leases(&db), 1);
    let cache = db.cache.clone();
    let second = std::thread::spawn(move || {
        cache
            .kv()
            .get_or_compute("k", || Ok::<_, AppError>(json!("second")))
    });
    // The second caller is waiting on the first one's lease; fail the first.
    std::thread::sleep(Duration::from_millis(100));
    fail_tx.send(()).unwrap();
    assert_eq!(first.join().unwrap(), Err(AppError::Model));
    assert_eq!(second.join().unwrap(), Ok(json!("second")));
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("second")));
    assert_eq!(leases(&db), 0);
}

#[test]
fn panicking_computation_releases_the_key() {
    let db = TestDb::new();
    let cache = db.cache.clone();
    let panicked = std::thread::spawn(move || {
        cache
            .kv()
            .get_or_compute("k", || -> Result<Value, Error> { panic!("model crashed") })
    })
    .join();
    assert!(panicked.is_err());
    assert_eq!(leases(&db), 0, "the drop guard released the lease");
    let started = Instant::now();
    let value = db
        .cache
        .kv()
        .get_or_compute("k", || Ok::<_, Error>(json!("recomputed")))
        .unwrap();
    assert_eq!(value, json!("recomputed"));
    // Generous bound far below the lease TTL (30 s): no waiting on a stale lease.
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A lease left by a process that died mid-computation, expiring in `ms`.
fn orphan_lease(db: &TestDb, key: &str, ms: u64) {
    let digest = db.cache.kv().key_digest(key).unwrap();
    db.exec(&format!(
        "INSERT INTO cache_leases (lease_key, holder, expires_at) \
         VALUES (convert_to('kv:', 'UTF8') || '\\x{}'::bytea, gen_random_uuid(), \
                 now() + interval '{ms} milliseconds')",
        digest.to_hex()
    ));
}

#[test]
fn lease_of_a_dead_process_lapses_and_the_next_caller_computes() {
    let db = TestDb::new();
    orphan_lease(&db, "k", 400);
    let calls = AtomicUsize::new(0);
    let value = db
        .cache
        .kv()
        .get_or_compute("k", || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(json!("after the lease lapsed"))
        })
        .unwrap();
    assert_eq!(value, json!("after the lease lapsed"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(leases(&db), 0);
}

#[test]
fn waiters_give_up_with_compute_timeout() {
    let db = TestDb::with(|b| b.compute_wait_timeout(Duration::from_millis(300)));
    orphan_lease(&db, "k", 60_000);
    let mut computed = false;
    let err = db
        .cache
        .kv()
        .get_or_compute("k", || {
            computed = true;
            Ok::<_, Error>(json!(1))
        })
        .unwrap_err();
    assert!(matches!(err, Error::ComputeTimeout { .. }), "{err}");
    assert!(!computed);
    assert_eq!(db.cache.kv().get("k").unwrap(), None);
}

#[test]
fn bad_ttl_is_rejected_before_computing() {
    let db = TestDb::new();
    let mut computed = false;
    let err = db
        .cache
        .kv()
        .get_or_compute_with_ttl("k", Duration::ZERO, || {
            computed = true;
            Ok::<_, Error>(json!(1))
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "ttl", .. }),
        "{err}"
    );
    assert!(!computed);
    assert_eq!(leases(&db), 0);
}

#[test]
fn many_waiters_do_not_starve_unrelated_gets() {
    // Waiters that held connections while they sleep would leave the gets below
    // none until the pool's timeout: each get fails, however slow the machine. The
    // timeouts leave room for a machine running the whole suite beside other work,
    // with this test's 64 threads on top: there, with the default statement
    // timeout, one waiter's poll went unanswered past it plus the watchdog's margin
    // (6 s) and was cut, as documented; this test is not about that bound.
    let db = TestDb::with(|b| {
        b.pool_max_size(8)
            .pool_connection_timeout(Duration::from_secs(20))
            .compute_wait_timeout(Duration::from_secs(120))
            .statement_timeout(Duration::from_secs(30))
    });
    db.cache.kv().set("other", &json!("unrelated")).unwrap();
    let (started_tx, started_rx) = mpsc::channel();
    let (finish_tx, finish_rx) = mpsc::channel::<()>();
    let calls = Arc::new(AtomicUsize::new(0));
    type Signal = Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>;
    let spawn = |cache: CacheManager, calls: Arc<AtomicUsize>, signal: Signal| {
        std::thread::spawn(move || {
            cache.kv().get_or_compute("slow", || {
                calls.fetch_add(1, Ordering::SeqCst);
                // Only the first caller blocks, until the unrelated gets are done.
                if let Some((started_tx, finish_rx)) = signal {
                    started_tx.send(()).unwrap();
                    finish_rx.recv().unwrap();
                }
                Ok::<_, Error>(json!("slow value"))
            })
        })
    };
    let holder = spawn(
        db.cache.clone(),
        calls.clone(),
        Some((started_tx, finish_rx)),
    );
    started_rx.recv().unwrap();
    let waiters: Vec<_> = (0..63)
        .map(|_| spawn(db.cache.clone(), calls.clone(), None))
        .collect();
    // Let the waiters settle into polling.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for i in 0..50 {
        assert_eq!(
            db.cache.kv().get("other").unwrap(),
            Some(json!("unrelated")),
            "get {i}"
        );
        db.cache.kv().set(&format!("other:{i}"), &json!(i)).unwrap();
    }
    // Generous, far below the wait timeout: the gets were not queued behind waiters.
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(leases(&db), 1, "the slow computation is still running");
    finish_tx.send(()).unwrap();
    assert_eq!(holder.join().unwrap().unwrap(), json!("slow value"));
    for w in waiters {
        assert_eq!(w.join().unwrap().unwrap(), json!("slow value"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Names the schema for [`child_process_computes_the_report`].
const CHILD_SCHEMA: &str = "PGCACHE_TEST_CHILD_SCHEMA";

/// Not a test on its own: the body of the child processes started by
/// `concurrent_misses_in_separate_processes_compute_once` (this test binary run
/// again with only this test selected). Does nothing in a normal run.
#[test]
fn child_process_computes_the_report() {
    let Ok(schema) = std::env::var(CHILD_SCHEMA) else {
        return;
    };
    let cache = common::child_manager(schema, |b| b);
    let value = cache
        .kv()
        .get_or_compute("report", || {
            use diesel::connection::SimpleConnection;
            cache
                .connection()?
                .batch_execute("INSERT INTO computations DEFAULT VALUES")?;
            // Long enough that the other processes miss meanwhile.
            std::thread::sleep(Duration::from_millis(1000));
            Ok::<_, Error>(json!("from a child"))
        })
        .unwrap();
    assert_eq!(value, json!("from a child"));
}

#[test]
fn concurrent_misses_in_separate_processes_compute_once() {
    let db = TestDb::new();
    db.exec("CREATE TABLE computations (at TIMESTAMPTZ NOT NULL DEFAULT now())");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "single_flight::child_process_computes_the_report",
                ])
                .env(CHILD_SCHEMA, &db.schema)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a child failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(db.count("SELECT count(*) AS n FROM computations"), 1);
    assert_eq!(leases(&db), 0);
}

#[test]
fn typed_caches_share_single_flight_an_llm_is_called_once() {
    let db = TestDb::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (cache, calls, barrier) = (db.cache.clone(), calls.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let prompt = pgcache::LlmPrompt::new("Explain quantum computing", "gemini-flash");
                cache.llm_response().get_or_compute(&prompt, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                    Ok::<_, Error>("Qubits...".to_owned())
                })
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), "Qubits...");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(leases(&db), 0);
}

/// Runs `compute` (taking `ms`) through `get_or_compute` on four threads at once;
/// returns each caller's result and the time the slowest took.
fn four_callers<T: Send + 'static>(
    ms: u64,
    call: impl Fn(&CacheManager, &dyn Fn() -> Result<T, Error>) -> Result<T, Error>
        + Send
        + Sync
        + 'static,
    value: impl Fn() -> T + Send + Sync + 'static,
    db: &TestDb,
) -> (Vec<Result<T, Error>>, Duration) {
    let (call, value) = (Arc::new(call), Arc::new(value));
    let barrier = Arc::new(Barrier::new(4));
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (cache, barrier) = (db.cache.clone(), barrier.clone());
            let (call, value) = (call.clone(), value.clone());
            std::thread::spawn(move || {
                barrier.wait();
                call(&cache, &|| {
                    std::thread::sleep(Duration::from_millis(ms));
                    Ok(value())
                })
            })
        })
        .collect();
    let results = threads.into_iter().map(|t| t.join().unwrap()).collect();
    (results, started.elapsed())
}

#[test]
fn audio_too_long_to_cache_takes_no_lease_and_callers_do_not_queue() {
    let db = TestDb::with(|b| b.compute_wait_timeout(Duration::from_millis(1200)));
    let key = pgcache::AudioChunkKey::new("x".repeat(600), "voice", "tts");
    let (results, elapsed) = four_callers(
        500,
        move |cache, compute| cache.audio_chunk().get_or_compute(&key, compute),
        || pgcache::AudioChunk::inline(vec![1, 2, 3], "opus"),
        &db,
    );
    for result in results {
        result.expect("no caller waits for a lease on uncacheable text");
    }
    // Four 500 ms syntheses side by side, not one after another.
    assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
    assert_eq!(leases(&db), 0);
}

#[test]
fn a_value_the_cache_refuses_does_not_queue_the_waiters_behind_each_other() {
    let db = TestDb::new();
    let (results, elapsed) = four_callers(
        500,
        |cache, compute| cache.kv().get_or_compute("k", compute),
        || json!("NUL \u{0} cannot be stored"),
        &db,
    );
    for result in results {
        assert!(
            matches!(result, Err(Error::InvalidInput { .. })),
            "{result:?}"
        );
    }
    // One computation, then the three waiters side by side (serially: 2 s).
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}
