//! Memoised functions on the key/value cache (feature `cached`): the `cached` crate's
//! `#[concurrent_cached]` macro over a `Memo`, and `Memo::get_or_compute`. Built only
//! with the feature (`required-features` in Cargo.toml).

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use cached::macros::concurrent_cached;
use cached::ConcurrentCached;
use common::TestDb;
use pgcache::{Cache, CacheManager, Error, Memo};
use serde_json::json;

/// The manager `square`'s memo is made on: the macro's store is a static, made on
/// first call from this test's manager.
static SQUARE_CACHE: OnceLock<CacheManager> = OnceLock::new();
/// How many times `square`'s body ran.
static SQUARE_RUNS: AtomicUsize = AtomicUsize::new(0);

#[concurrent_cached(
    ty = "Memo<u64, u64>",
    create = r#"{ SQUARE_CACHE.get().expect("set by the test").memo("square", Duration::from_secs(60)).expect("a valid memo") }"#,
    map_error = r#"|e| e"#
)]
fn square(n: u64) -> Result<u64, Error> {
    SQUARE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(n * n)
}

#[test]
fn macro_memoised_function_runs_once_per_argument_until_its_result_expires() {
    let db = TestDb::new();
    SQUARE_CACHE.set(db.cache.clone()).unwrap();
    let runs = || SQUARE_RUNS.load(Ordering::SeqCst);

    assert_eq!(square(7).unwrap(), 49);
    assert_eq!(square(7).unwrap(), 49);
    assert_eq!(
        runs(),
        1,
        "a repeated argument is read back, not recomputed"
    );
    assert_eq!(
        db.cache.kv().get("square:7").unwrap(),
        Some(json!(49)),
        "the result is the kv entry `name:key`"
    );
    let ttl = db.cache.kv().ttl("square:7").unwrap().unwrap();
    assert!(
        ttl <= Duration::from_secs(60) && ttl > Duration::from_secs(50),
        "{ttl:?}"
    );

    assert_eq!(square(8).unwrap(), 64);
    assert_eq!(runs(), 2, "a different argument is computed");

    db.expire_all("cache_entries");
    assert_eq!(square(7).unwrap(), 49);
    assert_eq!(runs(), 3, "an expired result is computed again");
    assert_eq!(square(7).unwrap(), 49);
    assert_eq!(runs(), 3);
}

#[test]
fn get_or_compute_runs_once_per_key_until_expiry() {
    let db = TestDb::new();
    let memo = db
        .cache
        .memo::<&str, String>("greet:v1", Duration::from_secs(60))
        .unwrap();
    let runs = AtomicUsize::new(0);
    let greet = |name: &'static str| {
        memo.get_or_compute(&name, || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(format!("hello {name}"))
        })
        .unwrap()
    };
    assert_eq!(greet("ada"), "hello ada");
    assert_eq!(greet("ada"), "hello ada");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(greet("grace"), "hello grace");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    db.expire_all("cache_entries");
    assert_eq!(greet("ada"), "hello ada");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[test]
fn concurrent_callers_of_one_key_compute_once() {
    let db = TestDb::new();
    // Two managers with their own pools stand for two processes.
    let managers = [db.cache.clone(), db.another_manager()];
    let calls = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let memo = managers[i % 2]
                .memo::<u32, u32>("report", Duration::from_secs(60))
                .unwrap();
            let (calls, barrier) = (calls.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                memo.get_or_compute(&1, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Long enough that every other thread misses meanwhile.
                    std::thread::sleep(Duration::from_millis(300));
                    Ok::<_, Error>(42)
                })
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), 42);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn failed_computations_are_not_stored() {
    let db = TestDb::new();
    let memo = db
        .cache
        .memo::<u32, u32>("flaky", Duration::from_secs(60))
        .unwrap();
    let failed: Result<u32, Error> =
        memo.get_or_compute(&1, || Err(Error::ComputeTimeout { waited_ms: 0 }));
    assert!(failed.is_err());
    assert_eq!(memo.cache_get(&1).unwrap(), None);
    assert_eq!(memo.get_or_compute(&1, || Ok::<_, Error>(5)).unwrap(), 5);
}

#[test]
fn store_trait_sets_gets_and_removes_through_the_kv_cache() {
    let db = TestDb::new();
    let memo = db
        .cache
        .memo::<u32, String>("store", Duration::from_secs(60))
        .unwrap();
    assert_eq!(memo.cache_set(1, "one".into()).unwrap(), None);
    assert_eq!(
        memo.cache_set(1, "uno".into()).unwrap(),
        Some("one".into()),
        "the replaced result is returned"
    );
    assert_eq!(memo.cache_get(&1).unwrap(), Some("uno".into()));
    assert_eq!(memo.cache_remove(&1).unwrap(), Some("uno".into()));
    assert_eq!(memo.cache_get(&1).unwrap(), None);

    memo.cache_set(2, "two".into()).unwrap();
    assert_eq!(
        memo.cache_remove_entry(&2).unwrap(),
        Some((2, "two".into()))
    );
    memo.cache_set(3, "three".into()).unwrap();
    assert!(memo.cache_delete(&3).unwrap());
    assert!(!memo.cache_delete(&3).unwrap());

    memo.cache_set(4, "four".into()).unwrap();
    memo.cache_set(5, "five".into()).unwrap();
    db.cache
        .kv()
        .set("storefront", &json!("not this memo's"))
        .unwrap();
    assert_eq!(memo.clear().unwrap(), 2, "only `store:` entries");
    assert!(db.cache.kv().get("storefront").unwrap().is_some());
}

#[test]
fn ttl_changes_apply_to_later_writes_and_refresh_restarts_it_on_hits() {
    let db = TestDb::new();
    let memo = db
        .cache
        .memo::<u32, u32>("ttl", Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        memo.set_ttl(Duration::from_secs(3600)),
        Some(Duration::from_secs(60))
    );
    memo.cache_set(1, 1).unwrap();
    let kv = db.cache.kv();
    assert!(kv.ttl("ttl:1").unwrap().unwrap() > Duration::from_secs(3000));

    kv.touch("ttl:1", Duration::from_secs(10)).unwrap();
    assert_eq!(memo.cache_get(&1).unwrap(), Some(1));
    assert!(
        kv.ttl("ttl:1").unwrap().unwrap() <= Duration::from_secs(10),
        "a plain hit keeps the TTL"
    );
    assert!(!memo.set_refresh_on_hit(true));
    assert_eq!(memo.cache_get(&1).unwrap(), Some(1));
    assert!(
        kv.ttl("ttl:1").unwrap().unwrap() > Duration::from_secs(3000),
        "a hit restarts it"
    );
}

#[test]
fn bad_names_and_ttls_are_refused_up_front() {
    let db = TestDb::new();
    let err = db
        .cache
        .memo::<u32, u32>("", Duration::from_secs(60))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                what: "memo name",
                ..
            }
        ),
        "{err}"
    );
    let err = db.cache.memo::<u32, u32>("m", Duration::ZERO).unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "ttl", .. }),
        "{err}"
    );
}
