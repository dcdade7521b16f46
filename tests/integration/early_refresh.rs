//! Early refresh in `get_or_compute`: stale-while-revalidate (callers in an entry's
//! stale window get the old value at once while one caller, across processes,
//! recomputes) and XFetch (recomputing before expiry with a probability weighted by
//! the last computation's time), both single flight.

use crate::common;
use crate::near_support::{assert_held, wait_current};

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Barrier};
use std::time::{Duration, Instant};

use common::TestDb;
use diesel::RunQueryDsl;
use pgcache::{Cache, CacheKind, CacheManager, EmbeddingKey, Error, NearCache};
use serde_json::{json, Value};

/// A stale window far longer than any test: an entry past its freshness is in it.
const WINDOW: Duration = Duration::from_secs(600);
/// A TTL no test outlives.
const HOUR: Duration = Duration::from_secs(3600);
/// How long a test waits for something the feature promises happens at once
/// before calling it broken (a bound against hanging, not a measure of speed).
const HANG: Duration = Duration::from_secs(60);

/// Stale-while-revalidate on, XFetch off (so nothing is recomputed early by
/// chance), leases no test outlives.
fn stale_db() -> TestDb {
    TestDb::with(|b| {
        b.stale_while_revalidate(WINDOW)
            .early_refresh_beta(0.0)
            .lease_ttl(HOUR)
            .compute_wait_timeout(HOUR)
    })
}

/// Ends the freshness of every entry of `table` now, inside its stale window, as if
/// its TTL had passed.
fn end_freshness(db: &TestDb, table: &str) {
    db.exec(&format!(
        "UPDATE {table} SET fresh_until = now() - interval '1 second' \
         WHERE fresh_expiry = expires_at"
    ));
}

/// `get_or_compute` of `key` on `cache` computing `value` and counting in `calls`.
fn ask(cache: &CacheManager, key: &str, value: &str, calls: &AtomicUsize) -> Value {
    cache
        .kv()
        .get_or_compute_with_ttl(key, HOUR, || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(json!(value))
        })
        .unwrap()
}

#[test]
fn within_the_stale_window_callers_get_the_old_value_at_once_and_one_recomputes() {
    let db = stale_db();
    let calls = AtomicUsize::new(0);
    assert_eq!(ask(&db.cache, "hot", "old", &calls), json!("old"));
    end_freshness(&db, "cache_entries");
    // The computing caller holds its computation until every other caller has
    // answered: they cannot be waiting for it.
    let (release, held) = mpsc::channel::<()>();
    let held = std::sync::Mutex::new(held);
    let (answers, answered) = mpsc::channel();
    let computations = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (cache, answers, computations, held) =
                (&db.cache, answers.clone(), &computations, &held);
            s.spawn(move || {
                let value = cache
                    .kv()
                    .get_or_compute_with_ttl("hot", HOUR, || {
                        computations.fetch_add(1, Ordering::SeqCst);
                        held.lock().unwrap().recv_timeout(HANG).unwrap();
                        Ok::<_, Error>(json!("new"))
                    })
                    .unwrap();
                answers.send(value).unwrap();
            });
        }
        for _ in 0..7 {
            let value = answered
                .recv_timeout(HANG)
                .expect("the other callers answer while one recomputes");
            assert_eq!(value, json!("old"));
        }
        release.send(()).unwrap();
        assert_eq!(answered.recv_timeout(HANG).unwrap(), json!("new"));
    });
    assert_eq!(computations.load(Ordering::SeqCst), 1);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
    // Stored fresh again: served without computing.
    assert_eq!(ask(&db.cache, "hot", "newer", &calls), json!("new"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn past_the_window_callers_wait_for_one_computation() {
    let db = stale_db();
    let calls = AtomicUsize::new(0);
    ask(&db.cache, "hot", "old", &calls);
    db.expire_all("cache_entries");
    let computations = AtomicUsize::new(0);
    let start = Barrier::new(8);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    db.cache
                        .kv()
                        .get_or_compute_with_ttl("hot", HOUR, || {
                            computations.fetch_add(1, Ordering::SeqCst);
                            // Long enough that every caller finds the key missing.
                            std::thread::sleep(Duration::from_millis(300));
                            Ok::<_, Error>(json!("new"))
                        })
                        .unwrap()
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(
                handle.join().unwrap(),
                json!("new"),
                "nobody got the expired value"
            );
        }
    });
    assert_eq!(computations.load(Ordering::SeqCst), 1);
}

/// The error of a computation that failed.
#[derive(Debug)]
struct ModelDown;

/// No cache error is expected where it is used.
impl From<Error> for ModelDown {
    fn from(error: Error) -> Self {
        panic!("a cache error: {error}")
    }
}

#[test]
fn a_failed_refresh_keeps_serving_the_old_value_and_releases_the_lease() {
    let db = stale_db();
    let calls = AtomicUsize::new(0);
    ask(&db.cache, "hot", "old", &calls);
    end_freshness(&db, "cache_entries");
    let failed = db
        .cache
        .kv()
        .get_or_compute_with_ttl("hot", HOUR, || Err::<Value, _>(ModelDown));
    assert_eq!(failed.unwrap(), json!("old"), "the old value is served");
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        db.cache
            .kv()
            .get_or_compute_with_ttl("hot", HOUR, || -> Result<Value, Error> {
                panic!("the model crashed")
            })
    }));
    assert!(panicked.is_err());
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
    assert_eq!(db.cache.kv().get("hot").unwrap(), Some(json!("old")));
    // Still stale: the next caller takes the lease at once and refreshes.
    assert_eq!(ask(&db.cache, "hot", "new", &calls), json!("new"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn a_plain_get_serves_a_value_in_its_stale_window_until_its_hard_expiry() {
    let db = stale_db();
    let calls = AtomicUsize::new(0);
    ask(&db.cache, "hot", "old", &calls);
    // Stored for its TTL and the window.
    let left = db.cache.kv().ttl("hot").unwrap().unwrap();
    assert!(left > HOUR, "{left:?}");
    end_freshness(&db, "cache_entries");
    assert_eq!(db.cache.kv().get("hot").unwrap(), Some(json!("old")));
    db.expire_all("cache_entries");
    assert_eq!(db.cache.kv().get("hot").unwrap(), None);
}

#[test]
fn a_plain_set_voids_the_freshness_get_or_compute_wrote() {
    let db = stale_db();
    let calls = AtomicUsize::new(0);
    ask(&db.cache, "hot", "computed", &calls);
    db.cache
        .kv()
        .set_with_ttl("hot", &json!("set"), HOUR)
        .unwrap();
    // The freshness written for the computed value is now past; the set's value is
    // fresh until its own expiry all the same.
    db.exec("UPDATE cache_entries SET fresh_until = now() - interval '1 second'");
    assert_eq!(ask(&db.cache, "hot", "recomputed", &calls), json!("set"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn get_or_compute_stores_the_freshness_and_how_long_the_computation_took() {
    let db = stale_db();
    db.cache
        .kv()
        .get_or_compute_with_ttl("slow", HOUR, || {
            std::thread::sleep(Duration::from_millis(30));
            Ok::<_, Error>(json!(1))
        })
        .unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM cache_entries WHERE compute_us >= 30000 \
             AND fresh_expiry = expires_at AND fresh_until = expires_at - interval '600 seconds'"
        ),
        1
    );
}

/// Makes the last computation of every entry of `table` seem to have taken years:
/// XFetch then draws an early refresh at almost every read (any beta above zero).
fn seem_slow(db: &TestDb, table: &str) {
    db.exec(&format!("UPDATE {table} SET compute_us = 1000000000000000"));
}

#[test]
fn xfetch_with_a_positive_beta_recomputes_before_expiry_once() {
    let db = TestDb::with(|b| b.early_refresh_beta(1.0).lease_ttl(HOUR));
    let calls = AtomicUsize::new(0);
    ask(&db.cache, "hot", "old", &calls);
    seem_slow(&db, "cache_entries");
    let values: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| ask(&db.cache, "hot", "new", &calls)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // One early recomputation among eight callers, long before the hour is out;
    // the others served the old value or, after it, the new one.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(values
        .iter()
        .all(|v| *v == json!("old") || *v == json!("new")));
    assert_eq!(db.cache.kv().get("hot").unwrap(), Some(json!("new")));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
}

#[test]
fn with_beta_zero_a_fresh_value_is_never_recomputed_early() {
    let db = TestDb::with(|b| b.early_refresh_beta(0.0));
    let calls = AtomicUsize::new(0);
    ask(&db.cache, "hot", "old", &calls);
    seem_slow(&db, "cache_entries");
    for _ in 0..50 {
        assert_eq!(ask(&db.cache, "hot", "new", &calls), json!("old"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_typed_cache_refreshes_in_its_stale_window() {
    let db = stale_db();
    let key = EmbeddingKey::new("What is AI?", "text-embedding-3-small");
    let embed = |v: f32| {
        db.cache
            .embedding()
            .get_or_compute_with_ttl(&key, HOUR, || Ok::<_, Error>(vec![v; 4]))
            .unwrap()
    };
    assert_eq!(embed(1.0), vec![1.0; 4]);
    assert_eq!(embed(2.0), vec![1.0; 4], "fresh: served");
    end_freshness(&db, "embedding_cache");
    assert_eq!(embed(3.0), vec![3.0; 4], "the one caller recomputes inline");
    assert_eq!(embed(4.0), vec![3.0; 4]);
}

#[test]
fn a_near_cached_value_is_not_served_past_its_freshness() {
    let db = TestDb::with(|b| {
        b.stale_while_revalidate(WINDOW)
            .early_refresh_beta(0.0)
            .near_cache(CacheKind::Kv, Some(NearCache::new()))
    });
    wait_current(&db.cache);
    // Long enough for a loaded machine to see this process's memory answer first.
    let ttl = Duration::from_secs(3);
    let calls = AtomicUsize::new(0);
    let compute = |value: &'static str| {
        db.cache
            .kv()
            .get_or_compute_with_ttl("hot", ttl, || {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(json!(value))
            })
            .unwrap()
    };
    let stored = Instant::now();
    compute("old");
    // While fresh, this process's memory answers.
    assert_held(&db.cache, CacheKind::Kv, 1, || {
        compute("unused");
    });
    std::thread::sleep(
        (stored + ttl + Duration::from_millis(100)).saturating_duration_since(Instant::now()),
    );
    // Past its freshness, memory no longer answers get_or_compute: it refreshes.
    assert_eq!(compute("new"), json!("new"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn hash_partitioned_tables_carry_the_freshness() {
    let db = stale_db();
    db.cache.partition_tables(4).unwrap();
    let calls = AtomicUsize::new(0);
    ask(&db.cache, "hot", "old", &calls);
    end_freshness(&db, "cache_entries");
    assert_eq!(ask(&db.cache, "hot", "new", &calls), json!("new"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_face_serves_the_old_value_while_one_task_refreshes() {
    let db = stale_db();
    let cache = db.cache.to_async();
    let old = cache
        .kv()
        .get_or_compute_with_ttl("hot", HOUR, || async { Ok::<_, Error>(json!("old")) })
        .await
        .unwrap();
    assert_eq!(old, json!("old"));
    end_freshness(&db, "cache_entries");
    let (started, running) = tokio::sync::oneshot::channel();
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let computing = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .kv()
                .get_or_compute_with_ttl("hot", HOUR, || async move {
                    started.send(()).unwrap();
                    held.await.unwrap();
                    Ok::<_, Error>(json!("new"))
                })
                .await
        })
    };
    running.await.unwrap();
    let other = cache
        .kv()
        .get_or_compute_with_ttl("hot", HOUR, || async { Ok::<_, Error>(json!("other")) })
        .await
        .unwrap();
    assert_eq!(other, json!("old"), "served at once while the refresh runs");
    release.send(()).unwrap();
    assert_eq!(computing.await.unwrap().unwrap(), json!("new"));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
}

/// Names the schema for [`child_process_asks_for_the_hot_key`].
const CHILD_SCHEMA: &str = "PGCACHE_TEST_EARLY_REFRESH_CHILD_SCHEMA";
/// What the child prints once its manager is up; it then waits for a line.
const READY: &str = "child ready";
/// The hot key's TTL in the two-process test.
const HOT_TTL: Duration = Duration::from_millis(300);
/// How long each process asks for it.
const ASKING: Duration = Duration::from_secs(3);

/// The two-process test's settings: a stale window past the test, XFetch off (its
/// early refreshes would come more often than the TTL and blur the count of
/// expiries by time; the generations count below covers it too).
fn hot_config(b: pgcache::CacheConfigBuilder) -> pgcache::CacheConfigBuilder {
    b.stale_while_revalidate(Duration::from_secs(10))
        .early_refresh_beta(0.0)
        .pool_max_size(9)
}

/// Eight threads asking `cache` for the key `hot` for [`ASKING`]. A computation
/// records the generation it replaces in `computations` (shared by every process)
/// and takes 20 ms: two computations of one generation are one expiry computed
/// twice.
fn ask_hot(cache: &CacheManager) {
    #[derive(diesel::QueryableByName)]
    struct Gen {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        generation: i32,
    }
    let until = Instant::now() + ASKING;
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                while Instant::now() < until {
                    cache
                        .kv()
                        .get_or_compute_with_ttl("hot", HOT_TTL, || {
                            let replaced: Gen = diesel::sql_query(
                                "INSERT INTO computations (generation) SELECT coalesce(\
                                 (SELECT (value->>'generation')::int FROM cache_entries \
                                  WHERE key = 'hot'), 0) RETURNING generation",
                            )
                            .get_result(&mut cache.connection()?)?;
                            std::thread::sleep(Duration::from_millis(20));
                            Ok::<_, Error>(json!({"generation": replaced.generation + 1}))
                        })
                        .unwrap();
                }
            });
        }
    });
}

/// Not a test on its own: the body of the child process started by
/// `two_processes_of_eight_threads_compute_once_per_expiry` (this test binary run
/// again with only this test selected). Does nothing in a normal run.
#[test]
fn child_process_asks_for_the_hot_key() {
    let Ok(schema) = std::env::var(CHILD_SCHEMA) else {
        return;
    };
    let cache = common::child_manager(schema, hot_config);
    println!("{READY}");
    std::io::stdout().flush().unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    ask_hot(&cache);
}

#[test]
fn two_processes_of_eight_threads_compute_once_per_expiry() {
    let db = TestDb::with(hot_config);
    db.exec("CREATE TABLE computations (generation INT NOT NULL)");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "early_refresh::child_process_asks_for_the_hot_key",
            "--nocapture",
        ])
        .env(CHILD_SCHEMA, &db.schema)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 && line.trim() != READY {
        line.clear();
    }
    assert_eq!(line.trim(), READY, "the child never started");
    // Both processes start asking together.
    let started = Instant::now();
    writeln!(child.stdin.take().unwrap()).unwrap();
    ask_hot(&db.cache);
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "the child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let computations = db.count("SELECT count(*) AS n FROM computations");
    let generations = db.count("SELECT count(DISTINCT generation) AS n FROM computations");
    // Each value lives at least its TTL from its store, so the run saw at most
    // elapsed / TTL expiries, plus the first miss.
    let expiries = elapsed.as_secs_f64() / HOT_TTL.as_secs_f64() + 1.0;
    assert!(
        computations as f64 <= 1.05 * expiries,
        "{computations} computations in {elapsed:?} ({expiries:.1} expiries)"
    );
    assert!(
        computations as f64 <= 1.05 * generations as f64,
        "{computations} computations of {generations} generations"
    );
    assert!(
        generations >= 2,
        "the key expired and was refreshed during the run"
    );
}

#[test]
fn a_bad_beta_is_refused_naming_the_setting_or_the_variable() {
    for beta in [-1.0, f64::NAN, f64::INFINITY] {
        let refused = pgcache::CacheConfig::builder()
            .early_refresh_beta(beta)
            .build()
            .unwrap_err();
        assert!(
            refused.to_string().contains("early_refresh_beta"),
            "{refused}"
        );
    }
    for value in ["-0.5", "fast"] {
        let refused =
            pgcache::CacheConfig::from_vars([("PGCACHE_EARLY_REFRESH_BETA", value)]).unwrap_err();
        assert!(
            refused.to_string().contains("PGCACHE_EARLY_REFRESH_BETA"),
            "{refused}"
        );
    }
    let config = pgcache::CacheConfig::from_vars([
        ("PGCACHE_EARLY_REFRESH_BETA", "0"),
        ("PGCACHE_STALE_WHILE_REVALIDATE_MS", "1500"),
    ])
    .unwrap();
    assert_eq!(config.early_refresh_beta(), 0.0);
    assert_eq!(config.stale_while_revalidate(), Duration::from_millis(1500));
    let defaults = pgcache::CacheConfig::builder().build().unwrap();
    assert_eq!(
        defaults.early_refresh_beta(),
        pgcache::DEFAULT_EARLY_REFRESH_BETA
    );
    assert_eq!(defaults.stale_while_revalidate(), Duration::ZERO);
}

#[test]
fn a_refresh_through_a_tagged_handle_keeps_the_entrys_tags() {
    let db = stale_db();
    let tagged = db.cache.kv();
    let tagged = tagged.tagged(&["product:7"]);
    let compute = |value: &'static str| move || Ok::<_, Error>(json!(value));
    assert_eq!(
        tagged
            .get_or_compute_with_ttl("page", HOUR, compute("old"))
            .unwrap(),
        json!("old")
    );
    end_freshness(&db, "cache_entries");
    // The one caller refreshes (no other is waiting) and gets the new value.
    assert_eq!(
        tagged
            .get_or_compute_with_ttl("page", HOUR, compute("new"))
            .unwrap(),
        json!("new")
    );
    assert_eq!(db.cache.kv().get("page").unwrap(), Some(json!("new")));
    db.cache.kv().invalidate_tag("product:7").unwrap();
    assert_eq!(
        db.cache.kv().get("page").unwrap(),
        None,
        "the refreshed entry kept its tag"
    );
}

#[test]
fn a_lease_found_taken_in_one_cache_does_not_hold_up_another_caches_refresh() {
    let (first, second) = (stale_db(), stale_db());
    let calls = AtomicUsize::new(0);
    for db in [&first, &second] {
        ask(&db.cache, "shared", "old", &calls);
        end_freshness(db, "cache_entries");
    }
    // Someone else refreshes `shared` in the first cache: its callers serve "old"
    // and this process notes the lease taken...
    let digest = first.cache.kv().key_digest("shared").unwrap();
    first.exec(&format!(
        "INSERT INTO cache_leases (lease_key, holder, expires_at) \
         VALUES (convert_to('kv:', 'UTF8') || '\\x{}'::bytea, gen_random_uuid(), \
                 now() + interval '1 hour')",
        digest.to_hex()
    ));
    assert_eq!(ask(&first.cache, "shared", "new", &calls), json!("old"));
    // ...which says nothing of the same key in another cache: refreshed at once.
    assert_eq!(ask(&second.cache, "shared", "new", &calls), json!("new"));
}
