//! The near caches' own tests: fills, invalidations, the epoch, expiry by the
//! database's clock, the staleness bound, each thread's front.
use super::*;
use crate::config::CacheConfig;

/// Near caches for kv whose poller has not connected yet.
fn kv_only() -> NearCaches {
    let config = CacheConfig::builder()
        .near_cache(CacheKind::Kv, Some(NearCache::new()))
        .build()
        .unwrap();
    NearCaches::new(&config).unwrap()
}

/// Now by this machine's clock, microseconds since the Unix epoch: the
/// database's clock in these tests.
fn clock_now_us() -> i64 {
    Utc::now().timestamp_micros()
}

/// Near caches for kv whose poller has its baseline and is current, as if it
/// had just polled.
fn current() -> Arc<NearCaches> {
    let near = Arc::new(kv_only());
    near.polled(Instant::now(), Some(clock_now_us()));
    near.has_baseline.store(true, Ordering::SeqCst);
    near.fresh_until.store(u64::MAX, Ordering::SeqCst);
    near
}

fn value(text: &str) -> NearValue {
    Arc::new(text.to_owned())
}

fn held(near: &NearCaches, key: &[u8]) -> Option<String> {
    near.get(CacheKind::Kv, key, |v| v.downcast_ref::<String>().cloned())
        .flatten()
}

fn in_an_hour() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::hours(1)
}

/// Near caches as [`current`], holding kv `key` with `text`.
fn holding(key: &[u8], text: &str) -> Arc<NearCaches> {
    let near = current();
    let ticket = near.ticket(CacheKind::Kv, key).unwrap();
    fill(&near, ticket, key, text);
    near
}

/// A fill of kv `key` with `text`, live for an hour, read after `ticket`.
fn fill(near: &NearCaches, ticket: Ticket, key: &[u8], text: &str) {
    near.fill(
        CacheKind::Kv,
        ticket,
        key.into(),
        value(text),
        in_an_hour(),
        1,
    );
}

#[test]
fn a_fill_serves_until_its_key_is_invalidated() {
    let near = holding(b"k", "v1");
    assert_eq!(held(&near, b"k").as_deref(), Some("v1"));
    near.invalidate(CacheKind::Kv, [&b"k"[..]]);
    assert_eq!(held(&near, b"k"), None);
}

#[test]
fn a_read_that_raced_an_invalidation_is_not_kept() {
    let near = current();
    // The reader notes the generation, then SELECTs the old value; the
    // invalidation of the write that replaced it lands before the fill...
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    near.invalidate(CacheKind::Kv, [&b"k"[..]]);
    fill(&near, ticket, b"k", "old");
    assert_eq!(held(&near, b"k"), None, "landed before the fill");
    // ...or between the fill's last check and its insert.
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    let weak = Arc::downgrade(&near);
    near.set_before_insert(Some(Box::new(move || {
        weak.upgrade()
            .unwrap()
            .invalidate(CacheKind::Kv, [&b"k"[..]]);
    })));
    fill(&near, ticket, b"k", "old");
    near.set_before_insert(None);
    assert_eq!(held(&near, b"k"), None, "landed before the insert");
}

#[test]
fn a_lost_channel_drops_everything_and_refuses_fills_taken_before() {
    let near = current();
    let early = near.ticket(CacheKind::Kv, b"a").unwrap();
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    fill(&near, ticket, b"k", "v");
    near.lost();
    assert_eq!(held(&near, b"k"), None, "not served while not current");
    near.has_baseline.store(true, Ordering::SeqCst);
    near.fresh_until.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(held(&near, b"k"), None, "dropped, not just hidden");
    fill(&near, early, b"a", "v");
    assert_eq!(
        held(&near, b"a"),
        None,
        "a read from before the loss is not kept"
    );
}

#[test]
fn what_is_filled_right_after_the_baseline_is_served() {
    let near = kv_only();
    assert!(
        near.ticket(CacheKind::Kv, b"k").is_none(),
        "no baseline yet"
    );
    near.baseline_taken(Instant::now(), Some(clock_now_us()));
    // No poll after the baseline yet: the fill is served all the same.
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    fill(&near, ticket, b"k", "v");
    assert_eq!(held(&near, b"k").as_deref(), Some("v"));
    assert_eq!(near.stats()[0].bypasses, 0);
}

#[test]
fn no_fill_without_a_baseline_and_no_serving_once_the_last_poll_is_old() {
    let near = current();
    near.has_baseline.store(false, Ordering::SeqCst);
    assert!(near.ticket(CacheKind::Kv, b"k").is_none());
    near.has_baseline.store(true, Ordering::SeqCst);
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    fill(&near, ticket, b"k", "v");
    near.fresh_until.store(0, Ordering::SeqCst);
    assert_eq!(held(&near, b"k"), None);
    assert_eq!(near.stats()[0].bypasses, 1);
}

#[test]
fn the_byte_bound_evicts_and_counts_it() {
    let config = CacheConfig::builder()
        .near_cache(CacheKind::Kv, Some(NearCache::new().max_bytes(10_000)))
        .build()
        .unwrap();
    let near = NearCaches::new(&config).unwrap();
    near.baseline_taken(Instant::now(), Some(clock_now_us()));
    near.fresh_until.store(u64::MAX, Ordering::SeqCst);
    for i in 0..100u32 {
        let key = i.to_be_bytes();
        let ticket = near.ticket(CacheKind::Kv, &key).unwrap();
        near.fill(
            CacheKind::Kv,
            ticket,
            key[..].into(),
            value("v"),
            in_an_hour(),
            1_000,
        );
    }
    let stats = &near.stats()[0];
    assert!(stats.bytes <= 10_000, "{stats:?}");
    assert!(stats.evictions >= 90, "{stats:?}");
    assert_eq!(stats.entries + stats.evictions, 100, "{stats:?}");
}

#[test]
fn a_replaced_entry_is_not_counted_as_an_eviction() {
    let near = current();
    for round in 0..50 {
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        fill(&near, ticket, b"k", &format!("v{round}"));
    }
    let stats = &near.stats()[0];
    assert_eq!(stats.entries, 1, "{stats:?}");
    assert_eq!(stats.evictions, 0, "{stats:?}");
}

#[test]
fn a_late_poll_reply_never_extends_an_entry() {
    let near = current();
    // The server read its clock as the poll was sent; the reply came back 200 ms
    // later. Guessing that the clock was read halfway would put the database
    // 100 ms behind and keep the entry 100 ms past its expiry.
    let sent = Instant::now();
    let db_clock = clock_now_us();
    std::thread::sleep(Duration::from_millis(200));
    near.polled(sent, Some(db_clock));
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    let expiry = Utc::now() + chrono::Duration::milliseconds(40);
    near.fill(
        CacheKind::Kv,
        ticket,
        b"k"[..].into(),
        value("v"),
        expiry,
        1,
    );
    loop {
        let asked = Utc::now();
        if held(&near, b"k").is_none() {
            break;
        }
        assert!(asked < expiry, "served past its database expiry");
    }
}

#[test]
fn nothing_is_kept_before_the_database_clock_is_known() {
    let near = kv_only();
    near.has_baseline.store(true, Ordering::SeqCst);
    near.fresh_until.store(u64::MAX, Ordering::SeqCst);
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    fill(&near, ticket, b"k", "v");
    assert_eq!(held(&near, b"k"), None);
}

#[test]
fn an_entry_lives_at_most_its_remaining_ttl() {
    let near = current();
    let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
    let soon = Utc::now() + chrono::Duration::milliseconds(30);
    near.fill(CacheKind::Kv, ticket, b"k"[..].into(), value("v"), soon, 1);
    assert!(held(&near, b"k").is_some());
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(held(&near, b"k"), None);
    let ticket = near.ticket(CacheKind::Kv, b"gone").unwrap();
    let past = Utc::now() - chrono::Duration::seconds(1);
    near.fill(
        CacheKind::Kv,
        ticket,
        b"gone"[..].into(),
        value("v"),
        past,
        1,
    );
    assert_eq!(held(&near, b"gone"), None);
}

#[test]
fn a_poll_keeps_the_near_cache_serving_for_the_bound_only() {
    let config = CacheConfig::builder()
        .near_cache(CacheKind::Kv, Some(NearCache::new()))
        .near_cache_staleness(Duration::from_millis(20))
        .build()
        .unwrap();
    let near = NearCaches::new(&config).unwrap();
    assert!(!near.current(), "not before the first poll");
    near.polled(Instant::now(), Some(clock_now_us()));
    assert!(near.current());
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        !near.current(),
        "a poll older than the bound proves nothing"
    );
}

#[test]
fn logged_changes_name_keys_or_the_whole_cache() {
    let near = current();
    for key in [&b"a"[..], b"b", b"c"] {
        let ticket = near.ticket(CacheKind::Kv, key).unwrap();
        near.fill(
            CacheKind::Kv,
            ticket,
            key.into(),
            value("v"),
            in_an_hour(),
            1,
        );
    }
    near.apply("kv", Some(&["a".to_owned(), "x".to_owned()]));
    assert_eq!(held(&near, b"a"), None);
    assert!(held(&near, b"b").is_some());
    near.apply("kv", None);
    assert_eq!(held(&near, b"b"), None);
    assert_eq!(held(&near, b"c"), None);
}

#[test]
fn an_entry_whose_slot_moved_before_the_lookup_is_not_copied_to_the_front() {
    let near = holding(b"k", "old");
    // An invalidation half done: its bump landed, its removal from L1 not yet.
    near.generations[near.slot(CacheKind::Kv, b"k")].fetch_add(1, Ordering::SeqCst);
    // L1 still holds it, and serves it; the front must not keep a copy.
    assert_eq!(held(&near, b"k").as_deref(), Some("old"));
    let l1 = &near.tables[CacheKind::Kv.index()].as_ref().unwrap().entries;
    l1.remove(&b"k"[..]);
    assert_eq!(held(&near, b"k"), None, "no copy under the new generation");
}

#[test]
fn a_whole_cache_invalidation_stops_the_fronts_copies() {
    let near = holding(b"k", "v");
    assert_eq!(held(&near, b"k").as_deref(), Some("v"));
    assert_eq!(held(&near, b"k").as_deref(), Some("v"), "from the front");
    near.invalidate_all(CacheKind::Kv);
    assert_eq!(held(&near, b"k"), None);
}

#[test]
fn two_managers_on_one_thread_never_see_each_others_copies() {
    let (a, b) = (current(), current());
    for (near, text) in [(&a, "a"), (&b, "b")] {
        let ticket = near.ticket(CacheKind::Kv, b"k").unwrap();
        fill(near, ticket, b"k", text);
    }
    for _ in 0..2 {
        assert_eq!(held(&a, b"k").as_deref(), Some("a"));
        assert_eq!(held(&b, b"k").as_deref(), Some("b"));
    }
    b.invalidate(CacheKind::Kv, [&b"k"[..]]);
    assert_eq!(held(&a, b"k").as_deref(), Some("a"));
    assert_eq!(held(&b, b"k"), None);
}
