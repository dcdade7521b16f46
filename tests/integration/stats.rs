//! Cache statistics and hit rates.

use crate::common;
use crate::ops_support;

use common::TestDb;
use ops_support::fill;
use pgcache::{Cache, CacheKind};
use serde_json::json;

#[test]
fn stats_counts_match_what_was_stored() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    for key in ["a", "b", "c"] {
        kv.set(key, &json!(key)).unwrap();
    }
    fill(&db, "cache_entries", "old", 2, "-1 minute");
    fill(&db, "llm_response_cache", "llm", 4, "1 hour"); // hit counts 1..=4
    fill(&db, "llm_response_cache", "gone", 9, "-1 minute");
    fill(&db, "audio_chunk_cache", "audio", 3, "1 hour"); // 1000 bytes, hits 1..=3

    let stats = db.cache.stats().unwrap();

    let by_kind = |kind| stats.caches.iter().find(|c| c.cache == kind).unwrap();
    let kv_stats = by_kind(CacheKind::Kv);
    assert_eq!(
        (
            kv_stats.entries,
            kv_stats.active_entries,
            kv_stats.expired_entries
        ),
        (5, 3, 2)
    );
    let llm = by_kind(CacheKind::LlmResponse);
    assert_eq!(
        (llm.entries, llm.active_entries, llm.expired_entries),
        (13, 4, 9)
    );
    assert_eq!(by_kind(CacheKind::AudioChunk).entries, 3);
    assert_eq!(by_kind(CacheKind::Embedding).entries, 0);
    assert_eq!(stats.total_entries, 5 + 13 + 3);
    assert!(stats.caches.iter().all(|c| c.size_bytes > 0));

    // Expired responses (hit counts up to 9) are not "top cached".
    let top: Vec<(u64, &str)> = stats
        .top_llm_responses
        .iter()
        .map(|e| (e.hits, e.provider.as_str()))
        .collect();
    assert_eq!(
        top,
        vec![
            (4, "gemini-flash"),
            (3, "gemini-flash"),
            (2, "gemini-flash"),
            (1, "gemini-flash")
        ]
    );
    assert!(stats
        .top_llm_responses
        .iter()
        .all(|e| e.key_hash.len() == 64));
    assert_eq!(stats.audio.total_bytes, 3000);
    assert!((stats.audio.average_hit_count - 2.0).abs() < 1e-9);
    let most: Vec<u64> = stats.audio.most_accessed.iter().map(|e| e.hits).collect();
    assert_eq!(most, vec![3, 2, 1]);

    let report = stats.to_string();
    for line in [
        "=== Cache Statistics ===",
        "LLM Response Cache:",
        "  Total Entries: 13 (4 active, 9 expired)",
        " hits, gemini-flash)",
        "  Total Size: 2.93 kB",
        "  Average Hit Count: 2.00",
        "Total Cache Entries: 21",
    ] {
        assert!(report.contains(line), "missing {line:?} in\n{report}");
    }
}

#[test]
fn hit_rate_reflects_lookups_of_another_manager_after_its_flush() {
    let db = TestDb::new();
    let service = db.another_manager();
    service.kv().set("present", &json!(1)).unwrap();
    for _ in 0..3 {
        assert!(service.kv().get("present").unwrap().is_some());
    }
    assert!(service.kv().get("absent").unwrap().is_none());
    service.flush_stats().unwrap();

    let stats = db.cache.stats().unwrap();
    let kv = stats
        .caches
        .iter()
        .find(|c| c.cache == CacheKind::Kv)
        .unwrap();
    assert_eq!((kv.lookups.hits, kv.lookups.misses), (3, 1));
    assert_eq!(kv.lookups.hit_rate(), Some(0.75));
    assert_eq!(stats.lookups.hit_rate(), Some(0.75));
    assert!(stats
        .to_string()
        .contains("Hits: 3, Misses: 1, Hit Rate: 75.0%"));
}

#[test]
fn own_lookups_are_included_without_an_explicit_flush() {
    let db = TestDb::new();
    let kv = db.cache.kv();
    let keys = ["x", "y", "z", "w"];
    kv.set("x", &json!(1)).unwrap();
    kv.get_many(&keys).unwrap();
    let stats = db.cache.stats().unwrap();
    assert_eq!(stats.lookups.hits, 1);
    assert_eq!(stats.lookups.misses, 3);
}

#[test]
fn stats_without_lookups_has_no_hit_rate() {
    let db = TestDb::new();
    let stats = db.cache.stats().unwrap();
    assert_eq!(stats.lookups.hit_rate(), None);
    assert!(stats.to_string().contains("Hit Rate: n/a"));
}

#[test]
fn stats_serialize_to_json_for_monitoring() {
    let db = TestDb::new();
    fill(&db, "audio_chunk_cache", "audio", 2, "1 hour");
    let value = serde_json::to_value(db.cache.stats().unwrap()).unwrap();
    assert_eq!(value["caches"][0]["cache"], "kv");
    assert_eq!(value["caches"][4]["table"], "audio_chunk_cache");
    assert_eq!(value["audio"]["total_bytes"], 2000);
    assert_eq!(value["total_entries"], 2);
    assert_eq!(value["lookups"]["hits"], 0);
}
