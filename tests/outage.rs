//! A database outage, on a scratch cluster of this test's own: fail-open start-up
//! while the server is down, bad input reported as such while it is down, and
//! writes skipped in fail-open mode undone once it is back.

mod scratch;

use std::time::{Duration, Instant};

use pgcache::{Cache, CacheConfig, CacheConfigBuilder, CacheManager, Error, LlmPrompt};
use scratch::ScratchCluster;
use serde_json::json;

fn config(cluster: &ScratchCluster) -> CacheConfigBuilder {
    CacheConfig::builder()
        .database_url(cluster.url())
        .schema("outage")
        .pool_max_size(4)
        .pool_connection_timeout(Duration::from_millis(500))
        .stats_flush_interval(Duration::from_millis(50))
}

/// Polls `check` for up to `limit`; true as soon as it holds.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn fail_open_starts_while_the_database_is_down_and_migrates_once_it_answers() {
    let cluster = ScratchCluster::start();
    cluster.stop();
    let cache = CacheManager::new(config(&cluster).fail_open(true).build().unwrap())
        .expect("fail-open starts with the database down");
    assert_eq!(cache.kv().get("k").unwrap(), None);
    cache.kv().set("k", &json!(1)).unwrap();
    assert!(cache.failed_open_count() >= 2);

    cluster.start_again();
    // The tables did not exist; the first operation after recovery creates them.
    assert!(
        eventually(Duration::from_secs(5), || cache
            .kv()
            .set("k", &json!(2))
            .is_ok()
            && cache.kv().get("k").unwrap() == Some(json!(2))),
        "the cache works once the database answers"
    );
    assert!(cache.stats().is_ok(), "migrated: stats finds every table");
}

#[test]
fn bad_input_is_reported_as_bad_input_while_the_database_is_down() {
    let cluster = ScratchCluster::start();
    let strict = CacheManager::new(config(&cluster).build().unwrap()).unwrap();
    let lenient = CacheManager::new(config(&cluster).fail_open(true).build().unwrap()).unwrap();
    cluster.stop();
    // One real operation each, so the pools hold no idle connection: a check made
    // only once a connection is in hand would now wait for the pool's timeout.
    assert!(strict.kv().get("warm").is_err());
    assert_eq!(lenient.kv().get("warm").unwrap(), None);
    let failed_open = lenient.failed_open_count();
    for cache in [&strict, &lenient] {
        let kv = cache.kv();
        let started = Instant::now();
        let errors = [
            kv.set("", &json!(1)).unwrap_err(),
            kv.set("k\0", &json!(1)).unwrap_err(),
            kv.set("k", &json!("\u{0}")).unwrap_err(),
            kv.set_with_ttl("k", &json!(1), Duration::ZERO).unwrap_err(),
            kv.get("").unwrap_err(),
            kv.delete("").unwrap_err(),
            kv.set_many(&[("a", &json!(1)), ("", &json!(2))], Duration::from_secs(1))
                .unwrap_err(),
            cache
                .llm_response()
                .set(&LlmPrompt::new("p", ""), &"r".to_owned())
                .unwrap_err(),
            cache
                .llm_response()
                .get(&LlmPrompt::new("p", ""))
                .unwrap_err(),
        ];
        for error in errors {
            assert!(matches!(error, Error::InvalidInput { .. }), "{error}");
        }
        // Nothing waited for a connection.
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        lenient.failed_open_count(),
        failed_open,
        "no bad input was failed open"
    );
}

#[test]
fn writes_skipped_in_fail_open_mode_leave_nothing_stale_after_recovery() {
    let cluster = ScratchCluster::start();
    let cache = CacheManager::new(config(&cluster).fail_open(true).build().unwrap()).unwrap();
    let other = CacheManager::new(config(&cluster).build().unwrap()).unwrap();
    let kv = cache.kv();
    kv.set_many(
        &[
            ("deleted", &json!("old")),
            ("overwritten", &json!("old")),
            ("user:1:a", &json!("old")),
            ("kept", &json!("old")),
        ],
        Duration::from_secs(600),
    )
    .unwrap();
    let prompt = LlmPrompt::new("p", "provider");
    cache
        .llm_response()
        .set(&prompt, &"old".to_owned())
        .unwrap();

    cluster.stop();
    assert!(!kv.delete("deleted").unwrap(), "skipped");
    kv.set("overwritten", &json!("new")).unwrap();
    kv.delete_prefix("user:1:").unwrap();
    cache.llm_response().delete(&prompt).unwrap();
    assert_eq!(cache.failed_open_count(), 4);

    cluster.start_again();
    // Another process sees the old values gone without this one doing anything:
    // the background flusher replays the skipped writes as deletes.
    assert!(
        eventually(Duration::from_secs(5), || {
            other.kv().get("deleted").ok() == Some(None)
        }),
        "the skipped delete was replayed"
    );
    assert_eq!(other.kv().get("overwritten").unwrap(), None);
    assert_eq!(other.kv().get("user:1:a").unwrap(), None);
    assert_eq!(other.llm_response().get(&prompt).unwrap(), None);
    assert_eq!(other.kv().get("kept").unwrap(), Some(json!("old")));
}

#[test]
fn a_skipped_delete_is_replayed_before_the_next_read_of_this_process() {
    let cluster = ScratchCluster::start();
    // A flusher that never runs during the test: only the request path replays.
    let cache = CacheManager::new(
        config(&cluster)
            .fail_open(true)
            .stats_flush_interval(Duration::from_secs(3600))
            .build()
            .unwrap(),
    )
    .unwrap();
    cache.kv().set("k", &json!("old")).unwrap();
    cluster.stop();
    cache.kv().delete("k").unwrap();
    cluster.start_again();
    // Until the cache has seen the server back, reads fail open (misses); the first
    // read that reaches the server must not find the deleted value.
    assert!(eventually(Duration::from_secs(5), || {
        let failed_open = cache.failed_open_count();
        let found = cache.kv().get("k").unwrap();
        if cache.failed_open_count() > failed_open {
            return false;
        }
        assert_eq!(found, None, "the skipped delete was replayed first");
        true
    }));
}

#[test]
fn fail_open_does_not_start_on_a_role_without_connect() {
    let cluster = ScratchCluster::start();
    let admin = CacheManager::new(config(&cluster).run_migrations(false).build().unwrap()).unwrap();
    {
        use diesel::connection::SimpleConnection;
        let mut conn = admin.connection().unwrap();
        conn.batch_execute(
            "CREATE ROLE no_connect LOGIN; REVOKE CONNECT ON DATABASE postgres FROM PUBLIC",
        )
        .unwrap();
    }
    let url = format!("postgres://no_connect@127.0.0.1:{}/postgres", cluster.port);
    for run_migrations in [true, false] {
        let err = CacheManager::new(
            config(&cluster)
                .database_url(url.clone())
                .fail_open(true)
                .run_migrations(run_migrations)
                .build()
                .unwrap(),
        )
        .unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert!(err.to_string().contains("permission denied"), "{err}");
    }
}

#[test]
fn once_the_database_is_known_down_operations_fail_at_once_until_it_answers() {
    let cluster = ScratchCluster::start();
    let strict = CacheManager::new(config(&cluster).build().unwrap()).unwrap();
    let lenient = CacheManager::new(config(&cluster).fail_open(true).build().unwrap()).unwrap();
    strict.kv().set("k", &json!(1)).unwrap();
    cluster.stop();
    // The first operation after the stop learns it: up to the connection timeout.
    assert!(strict.kv().get("k").is_err());
    assert_eq!(lenient.kv().get("k").unwrap(), None);

    // Then operations fail (or miss) at once: a background thread, not a caller,
    // tries the server again.
    let mut slow = 0;
    for _ in 0..100 {
        let started = Instant::now();
        let error = strict.kv().get("k").unwrap_err();
        assert!(error.is_transient(), "{error}");
        assert_eq!(lenient.kv().get("k").unwrap(), None, "a miss, failing open");
        if started.elapsed() < Duration::from_millis(100) {
            assert!(error.to_string().contains("not answering"), "{error}");
        } else {
            slow += 1;
        }
    }
    assert!(slow <= 2, "{slow} of 100 operations waited");

    cluster.start_again();
    assert!(
        eventually(Duration::from_secs(2), || strict.kv().get("k").is_ok()),
        "served again within a retry interval or so of the server's return"
    );
    assert_eq!(strict.kv().get("k").unwrap(), Some(json!(1)));
}

#[test]
fn the_first_operation_after_the_server_stops_fails_when_a_connection_is_refused() {
    let cluster = ScratchCluster::start();
    // A long connection timeout: before, the first operation after the stop waited
    // all of it while r2d2 retried the refused connection.
    let timeout = Duration::from_secs(20);
    let strict = CacheManager::new(
        config(&cluster)
            .pool_connection_timeout(timeout)
            .build()
            .unwrap(),
    )
    .unwrap();
    let lenient = CacheManager::new(
        config(&cluster)
            .pool_connection_timeout(timeout)
            .fail_open(true)
            .build()
            .unwrap(),
    )
    .unwrap();
    strict.kv().set("k", &json!(1)).unwrap();
    assert_eq!(lenient.kv().get("k").unwrap(), Some(json!(1)));
    cluster.stop();

    let started = Instant::now();
    let error = strict.kv().get("k").unwrap_err();
    let waited = started.elapsed();
    assert!(error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("refused"),
        "the refused attempt is the cause: {error}"
    );
    assert!(waited < timeout / 4, "waited {waited:?}");
    let started = Instant::now();
    assert_eq!(lenient.kv().get("k").unwrap(), None, "a miss, failing open");
    assert!(
        started.elapsed() < timeout / 4,
        "waited {:?}",
        started.elapsed()
    );
}

/// A manager on `cluster` whose role may open two connections (the server refuses
/// a third), with this connection timeout.
fn limited_to_two_connections(cluster: &ScratchCluster, timeout: Duration) -> CacheManager {
    let admin = CacheManager::new(config(cluster).build().unwrap()).unwrap();
    {
        use diesel::connection::SimpleConnection;
        admin
            .connection()
            .unwrap()
            .batch_execute(
                "CREATE ROLE limited LOGIN CONNECTION LIMIT 2; \
                 GRANT USAGE ON SCHEMA outage TO limited; \
                 GRANT ALL ON ALL TABLES IN SCHEMA outage TO limited",
            )
            .unwrap();
    }
    let url = format!("postgres://limited@127.0.0.1:{}/postgres", cluster.port);
    CacheManager::new(
        config(cluster)
            .database_url(url)
            .run_migrations(false)
            .pool_min_idle(0)
            .pool_connection_timeout(timeout)
            .build()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn a_refused_connection_does_not_end_the_wait_while_the_pool_has_connections_out() {
    let cluster = ScratchCluster::start();
    let cache = limited_to_two_connections(&cluster, Duration::from_secs(10));
    // The role's two connections, both out of the pool: a third is refused (the
    // server is at the role's limit), and one of the two comes back later.
    let (first, second) = (cache.connection().unwrap(), cache.connection().unwrap());
    let started = Instant::now();
    let got = std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            drop(first);
        });
        cache.kv().get("k")
    });
    assert_eq!(got.unwrap(), None, "served once a connection came back");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    drop(second);
}

/// How often the cache tries the database again while it is known to be down
/// (docs/operations.md: every 500 ms).
const OUTAGE_RETRY: Duration = Duration::from_millis(500);

/// Room for a connection attempt and its test query on a busy machine.
const RECONNECT: Duration = Duration::from_millis(1500);

#[test]
fn the_first_call_of_an_idle_process_after_an_outage_succeeds() {
    let cluster = ScratchCluster::start();
    let strict = CacheManager::new(config(&cluster).build().unwrap()).unwrap();
    let lenient = CacheManager::new(config(&cluster).fail_open(true).build().unwrap()).unwrap();
    strict.kv().set("k", &json!(1)).unwrap();
    assert_eq!(lenient.kv().get("k").unwrap(), Some(json!(1)));
    cluster.stop();
    assert!(strict.kv().get("k").is_err());
    assert_eq!(lenient.kv().get("k").unwrap(), None, "a miss, failing open");
    let error = strict.kv().get("k").unwrap_err();
    assert!(error.to_string().contains("not answering"), "{error}");

    cluster.start_again();
    // The process is idle while the database comes back.
    std::thread::sleep(OUTAGE_RETRY + RECONNECT);
    assert_eq!(strict.kv().get("k").unwrap(), Some(json!(1)));
    let failed_open = lenient.failed_open_count();
    assert_eq!(lenient.kv().get("k").unwrap(), Some(json!(1)));
    assert_eq!(
        lenient.failed_open_count(),
        failed_open,
        "served, not failed open"
    );
}

#[test]
fn outage_errors_are_one_line_and_give_the_cause_of_the_last_attempt() {
    let cluster = ScratchCluster::start();
    let cache = CacheManager::new(config(&cluster).build().unwrap()).unwrap();
    cache.kv().set("k", &json!(1)).unwrap();
    cluster.stop();
    let first = cache.kv().get("k").unwrap_err().to_string();
    // Known down; one the background attempts have answered too.
    let known = cache.kv().get("k").unwrap_err().to_string();
    std::thread::sleep(OUTAGE_RETRY * 3);
    let later = cache.kv().get("k").unwrap_err().to_string();
    eprintln!("first: {first}\nknown down: {known}\nlater: {later}");
    for message in [&first, &known, &later] {
        // libpq's message, several lines ending in a newline, as one line: its
        // lines joined by "; ", nothing left before the closing parenthesis.
        assert!(
            !message.contains('\n') && !message.contains('\t'),
            "{message:?}"
        );
        assert!(
            message.contains("Connection refused; Is the server running"),
            "names the cause: {message:?}"
        );
        assert!(
            !message.contains(" )") && !message.contains("; )"),
            "{message:?}"
        );
    }
    for message in [&known, &later] {
        assert!(
            message.contains("not answering (last attempt: connection to server"),
            "{message:?}"
        );
    }
}

#[test]
fn a_pool_at_the_servers_connection_limit_is_not_taken_for_a_database_down() {
    let cluster = ScratchCluster::start();
    let cache = limited_to_two_connections(&cluster, Duration::from_millis(300));
    // Both of the role's connections out of the pool: a third is refused until the
    // checkout times out.
    let (first, second) = (cache.connection().unwrap(), cache.connection().unwrap());
    let error = cache.kv().get("k").unwrap_err();
    assert!(error.is_transient(), "{error}");
    // One comes back: the database was never down, the next call is served.
    drop(first);
    assert_eq!(cache.kv().get("k").unwrap(), None);
    drop(second);
}

/// Waits until the cache serves kv reads from the database again (a read that does
/// not fail open); panics after 10 s.
fn until_served(cache: &CacheManager, key: &str) {
    assert!(
        eventually(Duration::from_secs(10), || {
            let failed_open = cache.failed_open_count();
            cache.kv().get(key).is_ok() && cache.failed_open_count() == failed_open
        }),
        "served again after the outage"
    );
}

#[test]
fn keys_rewritten_through_a_long_outage_never_read_an_older_value() {
    const THREADS: usize = 8;
    const KEYS: usize = 40;
    // More skipped writes than the bound: it counts distinct keys, not writes.
    const WRITES: usize = 2 * pgcache::MAX_SKIPPED_KEYS / THREADS;
    let cluster = ScratchCluster::start();
    let cache = CacheManager::new(config(&cluster).fail_open(true).build().unwrap()).unwrap();
    let key = |t: usize, k: usize| format!("t{t}:k{k}");
    let before: Vec<(String, serde_json::Value)> = (0..THREADS)
        .flat_map(|t| (0..KEYS).map(move |k| (key(t, k), json!(-1))))
        .collect();
    let entries: Vec<(&str, &serde_json::Value)> =
        before.iter().map(|(k, v)| (k.as_str(), v)).collect();
    cache
        .kv()
        .set_many(&entries, Duration::from_secs(600))
        .unwrap();

    cluster.stop();
    // Each thread writes every key of its own once, then keeps writing them as a
    // real workload does, hot and cold: key j about every 2^(j+1)-th write.
    let last: Vec<Vec<i64>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, key) = (&cache, &key);
                s.spawn(move || {
                    let mut last = vec![-1; KEYS];
                    for n in 0..WRITES {
                        let k = if n < KEYS {
                            n
                        } else {
                            (n.trailing_zeros() as usize).min(KEYS - 1)
                        };
                        cache.kv().set(&key(t, k), &json!(n)).unwrap();
                        last[k] = n as i64;
                    }
                    last
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(cache.failed_open_count() >= (THREADS * WRITES) as u64);

    cluster.start_again();
    // The first write that reaches the server, while the replay may still be due
    // or running: no replay deletes it afterwards.
    assert!(eventually(Duration::from_secs(10), || {
        let failed_open = cache.failed_open_count();
        cache.kv().set(&key(0, 0), &json!("first")).unwrap();
        cache.failed_open_count() == failed_open
    }));
    assert_eq!(cache.kv().get(&key(0, 0)).unwrap(), Some(json!("first")));
    until_served(&cache, "probe");
    for (t, last) in last.iter().enumerate().skip(1) {
        for (k, &value) in last.iter().enumerate() {
            let found = cache.kv().get(&key(t, k)).unwrap();
            assert!(
                found.is_none() || found == Some(json!(value)),
                "{}: last acknowledged {value}, read {found:?}",
                key(t, k)
            );
        }
    }
    // Writes after the recovery are kept: no late replay deletes them.
    for (t, _) in last.iter().enumerate() {
        for k in 0..KEYS {
            cache.kv().set(&key(t, k), &json!("after")).unwrap();
        }
    }
    for (t, _) in last.iter().enumerate() {
        for k in 0..KEYS {
            assert_eq!(
                cache.kv().get(&key(t, k)).unwrap(),
                Some(json!("after")),
                "{}",
                key(t, k)
            );
        }
    }
}

#[test]
fn past_the_skipped_key_bound_the_whole_cache_is_cleared_and_nothing_stale_is_read() {
    let cluster = ScratchCluster::start();
    let cache = CacheManager::new(config(&cluster).fail_open(true).build().unwrap()).unwrap();
    let kv = cache.kv();
    kv.set("early", &json!("old")).unwrap();
    kv.set("untouched", &json!("old")).unwrap();
    let prompt = LlmPrompt::new("p", "provider");
    cache
        .llm_response()
        .set(&prompt, &"other cache".to_owned())
        .unwrap();

    cluster.stop();
    kv.set("early", &json!("new")).unwrap();
    let bulk: Vec<String> = (0..=pgcache::MAX_SKIPPED_KEYS)
        .map(|i| format!("bulk:{i}"))
        .collect();
    let value = json!(1);
    let entries: Vec<(&str, &serde_json::Value)> =
        bulk.iter().map(|k| (k.as_str(), &value)).collect();
    kv.set_many(&entries, Duration::from_secs(600)).unwrap();
    assert_eq!(cache.failed_open_count(), 2, "both skipped");

    cluster.start_again();
    until_served(&cache, "probe");
    assert_eq!(
        kv.get("early").unwrap(),
        None,
        "never the value before the outage"
    );
    assert_eq!(
        kv.get("untouched").unwrap(),
        None,
        "the whole key/value cache was cleared"
    );
    assert_eq!(
        cache
            .llm_response()
            .get(&prompt)
            .unwrap()
            .map(|e| e.response),
        Some("other cache".to_owned()),
        "other caches are left alone"
    );
}

/// The messages of the events at `INFO` or above logged on the threads it is set
/// for.
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl tracing::Subscriber for Lines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if *event.metadata().level() <= tracing::Level::INFO {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn an_outage_logs_a_few_lines_about_failing_open_not_one_per_write() {
    const THREADS: usize = 4;
    let cluster = ScratchCluster::start();
    let cache = CacheManager::new(config(&cluster).fail_open(true).build().unwrap()).unwrap();
    let lines = Lines::default();
    cache.kv().set("k", &json!(0)).unwrap();
    cluster.stop();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (cache, lines) = (&cache, lines.clone());
            s.spawn(move || {
                tracing::subscriber::with_default(lines, || {
                    for n in 0..pgcache::MAX_SKIPPED_KEYS {
                        cache
                            .kv()
                            .set(&format!("t{t}:{}", n % 100), &json!(n))
                            .unwrap();
                        cache.kv().get(&format!("t{t}:{}", n % 100)).unwrap();
                    }
                })
            });
        }
    });
    assert!(cache.failed_open_count() >= (2 * THREADS * pgcache::MAX_SKIPPED_KEYS) as u64);
    cluster.start_again();
    tracing::subscriber::with_default(lines.clone(), || until_served(&cache, "k"));
    let lines = lines.0.lock().unwrap();
    let about_failing_open: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("fail") || l.contains("skipped"))
        .collect();
    // A warning as the cache starts failing open, one for the first skipped write:
    // per cache and outage, whatever the number of operations.
    assert!(
        about_failing_open.len() <= 4,
        "{} lines: {:?}",
        about_failing_open.len(),
        &about_failing_open[..about_failing_open.len().min(10)]
    );
}
