//! Size bounds per cache: cleanup evicts the oldest or least recently used entries of
//! a cache over its bound, down to the low watermark.

use crate::common;
use crate::ops_support;

use common::TestDb;
use ops_support::{fill, TABLES};
use pgcache::{
    AudioChunk, AudioChunkKey, Cache, CacheConfig, CacheKind, CleanupReport, Error, LlmPrompt,
    TableCleanup, CLEANUP_BATCH_SIZE,
};

fn table(report: &CleanupReport, cache: CacheKind) -> &TableCleanup {
    report.tables.iter().find(|t| t.cache == cache).unwrap()
}

fn rows(db: &TestDb, table: &str) -> i64 {
    db.count(&format!("SELECT count(*) AS n FROM {table}"))
}

fn prompt(i: usize) -> LlmPrompt {
    LlmPrompt::new(format!("question {i}"), "gemini-flash")
}

#[test]
fn kv_over_its_entry_bound_loses_the_oldest_entries_down_to_the_watermark() {
    let db = TestDb::with(|b| {
        b.max_entries(CacheKind::Kv, Some(10))
            .eviction_low_watermark(0.5)
    });
    let kv = db.cache.kv();
    for i in 0..15 {
        kv.set(&format!("k{i:02}"), &serde_json::json!(i)).unwrap();
    }
    // k00 is the oldest write, k14 the newest.
    db.exec(
        "UPDATE cache_entries SET created_at = \
         now() - interval '1 minute' * (100 - substring(key from 2)::int)",
    );

    let report = db.cache.cleanup().unwrap();

    assert_eq!(table(&report, CacheKind::Kv).evicted_rows, 10);
    assert_eq!(report.evicted_rows(), 10);
    for i in 0..15 {
        let kept = kv.get(&format!("k{i:02}")).unwrap().is_some();
        assert_eq!(kept, i >= 10, "k{i:02}");
    }
}

#[test]
fn llm_over_its_entry_bound_keeps_the_recently_hit_and_the_newest() {
    let db = TestDb::with(|b| {
        b.max_entries(CacheKind::LlmResponse, Some(8))
            .eviction_low_watermark(0.5)
    });
    let llm = db.cache.llm_response();
    for i in 0..10 {
        llm.set(&prompt(i), &format!("answer {i}")).unwrap();
    }
    // Entry 0 was used longest ago, entry 9 most recently.
    db.exec(
        "UPDATE llm_response_cache SET last_accessed_at = \
         now() - interval '1 minute' * (100 - substring(response from 8)::int)",
    );
    // Hits on the two oldest make them recent. They are still pending in memory:
    // cleanup must flush them before ranking.
    assert!(llm.get(&prompt(0)).unwrap().is_some());
    assert!(llm.get(&prompt(1)).unwrap().is_some());

    let report = db.cache.cleanup().unwrap();

    assert_eq!(table(&report, CacheKind::LlmResponse).evicted_rows, 6);
    let kept: Vec<usize> = (0..10)
        .filter(|&i| llm.get(&prompt(i)).unwrap().is_some())
        .collect();
    assert_eq!(kept, vec![0, 1, 8, 9]);
}

#[test]
fn llm_over_its_byte_bound_is_brought_to_the_watermark_in_bytes() {
    let db = TestDb::with(|b| b.max_bytes(CacheKind::LlmResponse, Some(1000)));
    let llm = db.cache.llm_response();
    for i in 0..20 {
        // 100 bytes each, 2000 in all.
        llm.set(&prompt(i), &format!("{i:0>100}")).unwrap();
    }
    db.exec(
        "UPDATE llm_response_cache SET last_accessed_at = \
         now() - interval '1 minute' * (100 - response::int)",
    );

    let report = db.cache.cleanup().unwrap();

    let llm_report = table(&report, CacheKind::LlmResponse);
    // Down to 80 % of 1000 bytes: the 12 least recently used go.
    assert_eq!(
        (llm_report.evicted_rows, llm_report.evicted_bytes),
        (12, 1200)
    );
    let kept: Vec<usize> = (0..20)
        .filter(|&i| llm.get(&prompt(i)).unwrap().is_some())
        .collect();
    assert_eq!(kept, (12..20).collect::<Vec<_>>());
}

#[test]
fn every_cache_is_brought_to_the_watermark_of_its_entry_bound() {
    let db = TestDb::with(|mut b| {
        for cache in CacheKind::ALL {
            b = b.max_entries(cache, Some(20));
        }
        b
    });
    for table in TABLES {
        fill(&db, table, "live", 30, "1 hour");
    }

    let report = db.cache.cleanup().unwrap();

    for cache in CacheKind::ALL {
        assert_eq!(rows(&db, cache.table()), 16, "{cache}");
        assert_eq!(table(&report, cache).evicted_rows, 14, "{cache}");
    }
    // Leases are not a cache: never evicted.
    assert_eq!(rows(&db, "cache_leases"), 30);
}

#[test]
fn expired_entries_are_removed_before_anything_live_is_evicted() {
    let db = TestDb::with(|b| b.max_entries(CacheKind::Embedding, Some(20)));
    fill(&db, "embedding_cache", "old", 10, "-1 minute");
    fill(&db, "embedding_cache", "new", 15, "1 hour");

    let report = db.cache.cleanup().unwrap();

    let t = table(&report, CacheKind::Embedding);
    assert_eq!((t.rows_removed, t.evicted_rows), (10, 0));
    assert_eq!(rows(&db, "embedding_cache"), 15);
}

#[test]
fn eviction_of_many_rows_runs_in_several_batches() {
    let db = TestDb::with(|b| b.max_entries(CacheKind::Kv, Some(1000)));
    // 2 full batches and a part to evict, down to 800 rows.
    let n = CLEANUP_BATCH_SIZE as u32 * 2 + 1500;
    fill(&db, "cache_entries", "bulk", n, "1 hour");
    let mut batches = 0;

    let report = db
        .cache
        .cleanup_with_progress(|p| {
            if p.table == "cache_entries" && p.table_rows_removed > 0 {
                batches += 1;
            }
        })
        .unwrap();

    assert_eq!(rows(&db, "cache_entries"), 800);
    assert_eq!(
        table(&report, CacheKind::Kv).evicted_rows,
        u64::from(n) - 800
    );
    assert_eq!(batches, 3);
}

#[test]
fn audio_over_its_byte_bound_evicts_least_recently_used_and_reports_released_paths() {
    let db = TestDb::with(|b| {
        b.max_bytes(CacheKind::AudioChunk, Some(400))
            .eviction_low_watermark(0.5)
    });
    let audio = db.cache.audio_chunk();
    let key = |i: usize| AudioChunkKey::new(format!("t{i}"), "voice-123", "xtts-v2");
    for i in 0..5 {
        audio
            .set(&key(i), &AudioChunk::stored(format!("p{i}"), 100, "opus"))
            .unwrap();
    }
    // p0 is the least recently used, p4 the most; reading p1 makes it the most.
    db.exec(
        "UPDATE audio_chunk_cache SET last_accessed_at = \
         now() - interval '1 hour' * (10 - substring(storage_path from 2)::int)",
    );
    assert!(audio.get(&key(1)).unwrap().is_some());

    let report = db.cache.cleanup().unwrap();

    let mut paths: Vec<&str> = report.released_paths().collect();
    paths.sort_unstable();
    assert_eq!(paths, vec!["p0", "p2", "p3"]);
    let t = table(&report, CacheKind::AudioChunk);
    assert_eq!((t.evicted_rows, t.evicted_bytes), (3, 300));
    assert!(audio.get(&key(1)).unwrap().is_some());
    assert!(audio.get(&key(4)).unwrap().is_some());

    let text = report.to_string();
    assert!(
        text.contains("3 evicted over size bounds (300 bytes)"),
        "{text}"
    );
    assert!(text.contains("\n  p2"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    let audio_json = &json["tables"][4];
    assert_eq!(audio_json["cache"], "audio_chunk");
    assert_eq!(audio_json["evicted_rows"], 3);
    assert_eq!(audio_json["evicted_bytes"], 300);
    assert_eq!(audio_json["released_paths"].as_array().unwrap().len(), 3);
}

#[test]
fn without_bounds_cleanup_evicts_nothing() {
    let db = TestDb::new();
    for table in TABLES {
        fill(&db, table, "live", 200, "1 hour");
    }

    let report = db.cache.cleanup().unwrap();

    assert_eq!(report.evicted_rows(), 0);
    assert_eq!(report.released_paths().count(), 0);
    assert!(!report.to_string().contains("evicted"));
    for table in TABLES {
        assert_eq!(rows(&db, table), 200, "{table}");
    }
}

#[test]
fn a_cache_under_its_bound_loses_nothing() {
    let db = TestDb::with(|b| b.max_entries(CacheKind::Kv, Some(50)));
    fill(&db, "cache_entries", "live", 50, "1 hour");
    let report = db.cache.cleanup().unwrap();
    assert_eq!(report.evicted_rows(), 0);
    assert_eq!(rows(&db, "cache_entries"), 50);
}

#[test]
fn bounds_are_read_from_the_environment() {
    let c = CacheConfig::from_vars([
        ("PGCACHE_KV_MAX_ENTRIES", "1000"),
        ("PGCACHE_AUDIO_CHUNK_MAX_BYTES", "536870912"),
        ("PGCACHE_VECTOR_SEARCH_MAX_ENTRIES", "0"),
        ("PGCACHE_EVICTION_LOW_WATERMARK", "0.6"),
    ])
    .unwrap();
    assert_eq!(c.size_bounds(CacheKind::Kv).max_entries, Some(1000));
    assert_eq!(c.size_bounds(CacheKind::Kv).max_bytes, None);
    assert_eq!(
        c.size_bounds(CacheKind::AudioChunk).max_bytes,
        Some(536_870_912)
    );
    // 0 means no bound, as unset.
    assert!(!c.size_bounds(CacheKind::VectorSearch).is_bounded());
    assert!(!c.size_bounds(CacheKind::Embedding).is_bounded());
    assert_eq!(c.eviction_low_watermark(), 0.6);

    let defaults = CacheConfig::from_vars(Vec::<(String, String)>::new()).unwrap();
    assert_eq!(
        defaults.eviction_low_watermark(),
        pgcache::DEFAULT_EVICTION_LOW_WATERMARK
    );
    assert!(CacheKind::ALL
        .into_iter()
        .all(|k| !defaults.size_bounds(k).is_bounded()));
}

#[test]
fn a_malformed_bound_variable_is_a_config_error_naming_it() {
    for (name, value) in [
        ("PGCACHE_LLM_RESPONSE_MAX_ENTRIES", "ten"),
        ("PGCACHE_EMBEDDING_MAX_BYTES", "-5"),
        ("PGCACHE_KV_MAX_BYTES", "18446744073709551615"),
        ("PGCACHE_EVICTION_LOW_WATERMARK", "high"),
        ("PGCACHE_EVICTION_LOW_WATERMARK", "1.5"),
    ] {
        let err = CacheConfig::from_vars([(name, value)]).unwrap_err();
        match &err {
            Error::Config {
                setting, value: v, ..
            } => {
                assert_eq!((setting.as_str(), v.as_str()), (name, value), "{err}");
            }
            other => panic!("{name}={value}: expected a config error, got {other}"),
        }
    }
}

#[test]
fn a_zero_bound_set_in_code_is_a_config_error() {
    let err = CacheConfig::builder()
        .max_bytes(CacheKind::AudioChunk, Some(0))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config { setting, .. } if setting == "max_bytes(audio_chunk)"),
        "{err}"
    );
}
