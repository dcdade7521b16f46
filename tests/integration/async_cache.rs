//! The async face (`AsyncCacheManager`): its operations, near-cache hits answered on
//! the calling task, the bound on blocking calls, and spans across the thread hop.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use common::TestDb;
use pgcache::{AsyncCacheManager, CacheKind, LlmPrompt, NearCache};
use serde_json::json;
use tracing::Instrument;

fn near_db() -> TestDb {
    TestDb::with(|b| {
        b.near_cache(CacheKind::Kv, Some(NearCache::new()))
            .near_cache(CacheKind::LlmResponse, Some(NearCache::new()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_operations_work_as_futures() {
    let db = TestDb::new();
    let cache = db.cache.to_async();
    let kv = cache.kv();
    let ttl = Duration::from_secs(60);

    assert_eq!(kv.get("a").await.unwrap(), None);
    kv.set("a", json!({"n": 1})).await.unwrap();
    assert_eq!(kv.get("a").await.unwrap(), Some(json!({"n": 1})));

    kv.set_many(vec![("b".into(), json!(2)), ("c".into(), json!(3))], ttl)
        .await
        .unwrap();
    assert_eq!(
        kv.get_many(&["a", "b", "missing", "c"]).await.unwrap(),
        vec![Some(json!({"n": 1})), Some(json!(2)), None, Some(json!(3))]
    );

    assert!(kv.delete("a").await.unwrap());
    assert!(!kv.delete("a").await.unwrap());
    assert_eq!(kv.delete_many(&["b", "c", "missing"]).await.unwrap(), 2);

    assert_eq!(kv.incr("hits", 1, ttl).await.unwrap(), 1);
    assert_eq!(kv.incr("hits", 5, ttl).await.unwrap(), 6);
    assert_eq!(kv.decr("hits", 2, ttl).await.unwrap(), 4);

    assert!(kv.set_nx("lock", json!("me"), ttl).await.unwrap());
    assert!(!kv.set_nx("lock", json!("you"), ttl).await.unwrap());
    assert_eq!(kv.get_del("lock").await.unwrap(), Some(json!("me")));
    assert!(!kv.exists("lock").await.unwrap());

    kv.set_bytes("raw", vec![0, 159, 146, 150], ttl)
        .await
        .unwrap();
    assert_eq!(
        kv.get_bytes("raw").await.unwrap(),
        Some(vec![0, 159, 146, 150])
    );

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Profile {
        name: String,
    }
    let profiles = kv.typed::<Profile>();
    profiles
        .set("user:1", Profile { name: "Ada".into() })
        .await
        .unwrap();
    assert_eq!(
        profiles.get("user:1").await.unwrap(),
        Some(Profile { name: "Ada".into() })
    );
    assert!(kv.ttl("user:1").await.unwrap().is_some());
    assert_eq!(kv.delete_prefix("user:").await.unwrap(), 1);

    let err = kv.get("").await.unwrap_err();
    assert!(matches!(err, pgcache::Error::InvalidInput { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_ai_caches_get_and_set_as_futures() {
    let db = TestDb::new();
    let cache = db.cache.to_async();
    let prompt = LlmPrompt::new("What is AI?", "fake-llm");
    assert!(cache.llm_response().get(&prompt).await.unwrap().is_none());
    cache
        .llm_response()
        .set(&prompt, "Artificial intelligence.".to_owned())
        .await
        .unwrap();
    let hit = cache.llm_response().get(&prompt).await.unwrap().unwrap();
    assert_eq!(hit.response, "Artificial intelligence.");
    // A table's own calls with no async form, through `run`.
    let top = cache.llm_response().run(|llm| llm.top(5)).await.unwrap();
    assert_eq!(top.len(), 1);
}

/// The kv near cache's hits and misses so far.
fn kv_near_counts(db: &TestDb) -> (u64, u64) {
    let stats = db.cache.near_cache_stats();
    let kv = stats.iter().find(|s| s.cache == CacheKind::Kv).unwrap();
    (kv.hits, kv.misses)
}

/// Reads `key` (stored) until the near cache serves it: it keeps reads once its
/// poller is current.
async fn until_held(db: &TestDb, cache: &AsyncCacheManager, key: &str) {
    let served = async {
        loop {
            let (hits, _) = kv_near_counts(db);
            assert!(cache.kv().get(key).await.unwrap().is_some());
            if kv_near_counts(db).0 > hits {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the near cache never served the key");
}

/// The only blocking permit of a manager made with `max_blocking(1)`, held by a
/// blocking call until released.
struct HeldPermit {
    release: mpsc::Sender<()>,
    holder: tokio::task::JoinHandle<()>,
}

impl HeldPermit {
    async fn take(cache: &AsyncCacheManager) -> Self {
        let (release, held) = mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel();
        let cache = cache.clone();
        let holder = tokio::spawn(async move {
            cache
                .run(move |_| {
                    started.send(()).unwrap();
                    held.recv().unwrap();
                })
                .await
        });
        running.await.unwrap();
        HeldPermit { release, holder }
    }

    async fn release(self) {
        self.release.send(()).unwrap();
        self.holder.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_hit_is_answered_without_a_blocking_thread() {
    let db = near_db();
    // One blocking call at a time, and the test holds it.
    let cache = db.cache.to_async().max_blocking(1);
    cache.kv().set("hot", json!("value")).await.unwrap();
    until_held(&db, &cache, "hot").await;
    let (hits_before, _) = kv_near_counts(&db);

    let permit = HeldPermit::take(&cache).await;
    // The only permit is taken: a get that needed a blocking thread would wait.
    let hit = tokio::time::timeout(Duration::from_secs(30), cache.kv().get("hot")).await;
    let miss = tokio::time::timeout(Duration::from_millis(200), cache.kv().get("cold")).await;
    permit.release().await;
    assert_eq!(
        hit.expect("the hit did not wait").unwrap(),
        Some(json!("value"))
    );
    assert!(miss.is_err(), "a miss waits for a blocking call's permit");
    assert_eq!(
        kv_near_counts(&db).0,
        hits_before + 1,
        "the hit is counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_near_cache_holds_is_answered_without_a_blocking_thread() {
    let db = near_db();
    let cache = db.cache.to_async().max_blocking(1);
    let kv = cache.kv();
    for key in ["a", "b", "later"] {
        kv.set(key, json!(key)).await.unwrap();
    }
    until_held(&db, &cache, "a").await;
    until_held(&db, &cache, "b").await;

    let permit = HeldPermit::take(&cache).await;
    // The only permit is taken: a batch that needed a blocking thread would wait.
    let all_held =
        tokio::time::timeout(Duration::from_secs(30), kv.get_many(&["b", "a", "b"])).await;
    let one_missing =
        tokio::time::timeout(Duration::from_millis(200), kv.get_many(&["a", "later"])).await;
    permit.release().await;
    assert_eq!(
        all_held.expect("the batch held in memory waited").unwrap(),
        vec![Some(json!("b")), Some(json!("a")), Some(json!("b"))]
    );
    assert!(
        one_missing.is_err(),
        "a batch with a key to read waits for a permit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_held_batch_reads_only_its_misses_and_counts_each_lookup_once() {
    let db = near_db();
    let cache = db.cache.to_async();
    let kv = cache.kv();
    kv.set("held", json!(1)).await.unwrap();
    kv.set("stored", json!(2)).await.unwrap();
    until_held(&db, &cache, "held").await;
    let lookups_before = db.cache.stats().unwrap().lookups;
    let (hits, misses) = kv_near_counts(&db);

    let found = kv
        .get_many(&["stored", "held", "absent", "held"])
        .await
        .unwrap();

    assert_eq!(
        found,
        vec![Some(json!(2)), Some(json!(1)), None, Some(json!(1))]
    );
    assert_eq!(
        kv_near_counts(&db),
        (hits + 2, misses + 2),
        "each key looked up in memory once: two hits, two misses"
    );
    let lookups = db.cache.stats().unwrap().lookups;
    assert_eq!(
        (lookups.hits, lookups.misses),
        (lookups_before.hits + 3, lookups_before.misses + 1),
        "four lookups counted, each once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_are_bounded_by_the_pool_size() {
    // The test pool holds 4 connections.
    let db = TestDb::new();
    let cache = db.cache.to_async();
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (cache, running, most) = (cache.clone(), running.clone(), most.clone());
            tokio::spawn(async move {
                cache
                    .run(move |_| {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 4, "{most} blocking calls ran at once");
    assert!(most >= 1);
}

/// A span's name, and its parent's.
type Opened = (String, Option<String>);

/// Every span opened in this process.
fn spans() -> &'static Mutex<Vec<Opened>> {
    static SPANS: OnceLock<Mutex<Vec<Opened>>> = OnceLock::new();
    SPANS.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        struct Parents;
        impl<S> tracing_subscriber::Layer<S> for Parents
        where
            S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
        {
            fn on_new_span(
                &self,
                attrs: &tracing::span::Attributes<'_>,
                id: &tracing::span::Id,
                ctx: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let parent = ctx
                    .span(id)
                    .and_then(|span| span.parent())
                    .map(|parent| parent.name().to_owned());
                spans()
                    .lock()
                    .unwrap()
                    .push((attrs.metadata().name().to_owned(), parent));
            }
        }
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Parents))
            .unwrap();
        Mutex::new(Vec::new())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgcache_spans_are_children_of_the_callers_span_across_the_hop() {
    spans();
    let db = near_db();
    let cache = db.cache.to_async();
    async {
        // A miss and a write (blocking threads), then a near-cache hit (this task).
        cache.kv().get("span-key").await.unwrap();
        cache.kv().set("span-key", json!(1)).await.unwrap();
        cache.kv().get("span-key").await.unwrap();
        cache.kv().get("span-key").await.unwrap();
    }
    .instrument(tracing::info_span!("async_request_handler"))
    .await;
    let spans = spans().lock().unwrap().clone();
    let ours: Vec<_> = spans
        .iter()
        .filter(|(_, parent)| parent.as_deref() == Some("async_request_handler"))
        .collect();
    assert!(
        ours.len() >= 4 && ours.iter().all(|(name, _)| name == "pgcache"),
        "every operation's span is the handler's child: {ours:?}"
    );
}
