//! The audio chunk cache through the public API.

use crate::common;

use common::TestDb;
use pgcache::{AudioChunk, AudioChunkKey, AudioData, Cache, Error, MAX_AUDIO_BYTES};
use serde_json::json;

fn key(text: &str) -> AudioChunkKey {
    AudioChunkKey::new(text, "voice-123", "xtts-v2").with_settings(json!({"speed": 1.0}))
}

#[test]
fn inline_audio_round_trips_with_its_metadata() {
    let db = TestDb::new();
    let chunk = AudioChunk::inline(vec![1, 2, 3, 4], "opus")
        .duration_ms(1000)
        .sample_rate(24_000)
        .channels(2)
        .compression("opus");
    db.cache
        .audio_chunk()
        .set(&key("Hello world"), &chunk)
        .unwrap();
    let hit = db
        .cache
        .audio_chunk()
        .get(&key("Hello world"))
        .unwrap()
        .unwrap();
    assert_eq!(hit.chunk, chunk);
    assert!(db
        .cache
        .audio_chunk()
        .get(&key("Goodbye"))
        .unwrap()
        .is_none());
}

#[test]
fn path_based_audio_round_trips() {
    let db = TestDb::new();
    let chunk = AudioChunk::stored("audio/hello.opus", 1200, "opus");
    db.cache.audio_chunk().set(&key("Hello"), &chunk).unwrap();
    let hit = db.cache.audio_chunk().get(&key("Hello")).unwrap().unwrap();
    assert_eq!(
        hit.chunk.data,
        AudioData::Stored {
            path: "audio/hello.opus".into(),
            byte_size: 1200
        }
    );
    assert_eq!(
        db.count("SELECT byte_size AS n FROM audio_chunk_cache"),
        1200
    );
}

#[test]
fn expired_chunks_read_as_misses() {
    let db = TestDb::new();
    db.cache
        .audio_chunk()
        .set(&key("Hi"), &AudioChunk::inline(vec![0; 8], "wav"))
        .unwrap();
    db.expire_all("audio_chunk_cache");
    assert!(db.cache.audio_chunk().get(&key("Hi")).unwrap().is_none());
}

#[test]
fn overwrite_replaces_the_audio_and_keeps_one_row() {
    let db = TestDb::new();
    let audio = db.cache.audio_chunk();
    audio
        .set(&key("Hi"), &AudioChunk::inline(vec![1], "wav"))
        .unwrap();
    audio
        .set(&key("Hi"), &AudioChunk::stored("a.wav", 10, "wav"))
        .unwrap();
    assert_eq!(
        audio.get(&key("Hi")).unwrap().unwrap().chunk.byte_size(),
        10
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM audio_chunk_cache"), 1);
}

#[test]
fn text_over_the_maximum_length_is_not_cached() {
    let db = TestDb::new();
    let short = db.cache.audio_chunk().with_max_text_chars(Some(10));
    let chunk = AudioChunk::inline(vec![1], "wav");
    short.set(&key("0123456789"), &chunk).unwrap();
    short.set(&key("0123456789X"), &chunk).unwrap();
    assert_eq!(db.count("SELECT count(*) AS n FROM audio_chunk_cache"), 1);
    assert!(short.get(&key("0123456789")).unwrap().is_some());
    assert!(short.get(&key("0123456789X")).unwrap().is_none());
    let long_text = "x".repeat(pgcache::DEFAULT_MAX_AUDIO_TEXT_CHARS + 1);
    db.cache
        .audio_chunk()
        .set(&key(&long_text), &chunk)
        .unwrap();
    assert_eq!(db.count("SELECT count(*) AS n FROM audio_chunk_cache"), 1);
    let unlimited = db.cache.audio_chunk().with_max_text_chars(None);
    unlimited.set(&key(&long_text), &chunk).unwrap();
    assert!(unlimited.get(&key(&long_text)).unwrap().is_some());
}

#[test]
fn inline_audio_over_the_byte_limit_is_an_error() {
    let db = TestDb::new();
    let err = db
        .cache
        .audio_chunk()
        .set(
            &key("big"),
            &AudioChunk::inline(vec![0; MAX_AUDIO_BYTES + 1], "wav"),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "audio", .. }),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM audio_chunk_cache"), 0);
}

#[test]
fn eviction_removes_least_recently_used_down_to_the_watermark() {
    let db = TestDb::new();
    let audio = db.cache.audio_chunk();
    for i in 0..5 {
        audio
            .set(
                &key(&format!("t{i}")),
                &AudioChunk::stored(format!("p{i}"), 100, "opus"),
            )
            .unwrap();
    }
    // p0 is the least recently used, p4 the most.
    db.exec(
        "UPDATE audio_chunk_cache SET last_accessed_at = \
         now() - interval '1 hour' * (10 - substring(storage_path from 2)::int)",
    );
    // Reading p1 makes it the most recently used.
    assert!(audio.get(&key("t1")).unwrap().is_some());

    let nothing = audio.evict_to_budget(500, 0.5).unwrap();
    assert_eq!(nothing.rows_removed, 0, "not over budget: nothing evicted");

    let report = audio.evict_to_budget(400, 0.5).unwrap();
    let mut paths = report.released_paths.clone();
    paths.sort();
    assert_eq!(paths, vec!["p0", "p2", "p3"]);
    assert_eq!((report.rows_removed, report.bytes_freed), (3, 300));
    assert!(audio.get(&key("t1")).unwrap().is_some());
    assert!(audio.get(&key("t4")).unwrap().is_some());
    assert_eq!(
        db.count("SELECT sum(byte_size)::bigint AS n FROM audio_chunk_cache"),
        200
    );
}

#[test]
fn eviction_rejects_a_watermark_outside_zero_to_one() {
    let db = TestDb::new();
    let err = db
        .cache
        .audio_chunk()
        .evict_to_budget(100, 1.5)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
}

#[test]
fn stats_report_entries_bytes_average_hits_and_most_accessed() {
    let db = TestDb::new();
    let audio = db.cache.audio_chunk();
    audio
        .set(&key("a"), &AudioChunk::inline(vec![0; 100], "wav"))
        .unwrap();
    audio
        .set(&key("b"), &AudioChunk::stored("b.wav", 300, "wav"))
        .unwrap();
    for _ in 0..3 {
        audio.get(&key("b")).unwrap();
    }
    audio.get(&key("a")).unwrap();
    let stats = audio.stats(1).unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(stats.total_bytes, 400);
    assert!((stats.average_hit_count - 2.0).abs() < 1e-9, "{stats:?}");
    assert_eq!(stats.most_accessed.len(), 1);
    assert_eq!(stats.most_accessed[0].hits, 3);
    assert_eq!(
        (
            stats.most_accessed[0].provider.as_str(),
            stats.most_accessed[0].model.as_deref()
        ),
        ("xtts-v2", Some("voice-123"))
    );
    assert_eq!(
        stats.most_accessed[0].hash_prefix(),
        &key("b").digest().unwrap().to_hex()[..16]
    );
}

#[test]
fn overwrite_restarts_the_hit_count_and_writes_every_column() {
    let db = TestDb::new();
    let audio = db.cache.audio_chunk();
    let owner = uuid::Uuid::new_v4();
    let key = key("Hi").owned_by(owner);
    audio
        .set(&key, &AudioChunk::inline(vec![1], "wav"))
        .unwrap();
    audio.get(&key).unwrap().unwrap();
    db.cache.flush_stats().unwrap();
    assert_eq!(db.count("SELECT hit_count AS n FROM audio_chunk_cache"), 1);
    audio
        .set(
            &key,
            &AudioChunk::stored("a.wav", 10, "wav").compression("zstd"),
        )
        .unwrap();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM audio_chunk_cache WHERE hit_count = 0 \
             AND voice_model_id = 'voice-123' AND provider = 'xtts-v2' AND format = 'wav' \
             AND audio_data IS NULL AND storage_path = 'a.wav' AND compression = 'zstd' \
             AND byte_size = 10 AND owner_id = '{owner}' \
             AND last_accessed_at = created_at AND expires_at > now()"
        )),
        1
    );
}
