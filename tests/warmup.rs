//! Cache warmup: everything or nothing.

mod common;

use common::TestDb;
use pgcache::{
    AudioChunk, AudioChunkKey, Cache, EmbeddingKey, Error, LlmPrompt, VectorSearchQuery, Warmup,
    WarmupAudioChunk, WarmupEmbedding, WarmupLlmResponse,
};
use serde_json::json;

const ALL_TABLES: [&str; 5] = [
    "cache_entries",
    "embedding_cache",
    "vector_search_cache",
    "llm_response_cache",
    "audio_chunk_cache",
];

fn rows(db: &TestDb) -> i64 {
    ALL_TABLES
        .iter()
        .map(|t| db.count(&format!("SELECT count(*) AS n FROM {t}")))
        .sum()
}

fn spec_warmup() -> Warmup {
    serde_json::from_value(json!({
        "kv": [{"key": "config:v1", "value": {"theme": "dark"}}],
        "embeddings": [
            {"text": "What is AI?", "model": "m1", "embedding": [0.1, 0.2]},
            {"text": "How does ML work?", "model": "m1", "embedding": [0.3, 0.4]}
        ],
        "vector_searches": [{
            "user_id": "00000000-0000-0000-0000-000000000001",
            "embedding": [0.1, 0.2], "top_k": 5, "filters": {"lang": "en"},
            "results": [{"id": 1}]
        }],
        "llm_responses": [
            {"prompt": "Explain AI", "provider": "gemini-flash", "response": "AI is..."}
        ],
        "audio_chunks": [{
            "text": "Hello", "voice_model_id": "v1", "provider": "xtts-v2",
            "data": {"stored": {"path": "audio/hello.opus", "byte_size": 1200}},
            "format": "opus", "duration_ms": 500
        }]
    }))
    .unwrap()
}

#[test]
fn warmup_from_json_stores_every_section_and_reports_counts() {
    let db = TestDb::new();
    let report = db.cache.warmup(&spec_warmup()).unwrap();
    assert_eq!(
        (
            report.kv,
            report.embeddings,
            report.vector_searches,
            report.llm_responses,
            report.audio_chunks
        ),
        (1, 2, 1, 1, 1)
    );
    assert_eq!(report.total(), 6);
    assert_eq!(rows(&db), 6);
    let hit = db
        .cache
        .embedding()
        .get(&EmbeddingKey::new("How does ML work?", "m1"))
        .unwrap()
        .unwrap();
    assert_eq!(hit.embedding, vec![0.3, 0.4]);
    let answer = db
        .cache
        .llm_response()
        .get(&LlmPrompt::new("Explain AI", "gemini-flash"))
        .unwrap()
        .unwrap();
    assert_eq!(answer.response, "AI is...");
    let search = VectorSearchQuery::new(uuid::Uuid::from_u128(1), vec![0.1, 0.2], 5)
        .with_filters(json!({"lang": "en"}));
    assert!(db.cache.vector_search().get(&search).unwrap().is_some());
    assert!(db
        .cache
        .audio_chunk()
        .get(&AudioChunkKey::new("Hello", "v1", "xtts-v2"))
        .unwrap()
        .is_some());
    assert_eq!(
        db.cache.kv().get("config:v1").unwrap(),
        Some(json!({"theme": "dark"}))
    );
}

#[test]
fn one_bad_item_rejects_the_whole_warmup_and_names_it() {
    let db = TestDb::new();
    let mut warmup = spec_warmup();
    warmup.llm_responses.push(WarmupLlmResponse {
        prompt: LlmPrompt::new("fine", "p"),
        response: "ok".into(),
    });
    warmup.llm_responses.push(WarmupLlmResponse {
        prompt: LlmPrompt::new("bad\0prompt", "p"),
        response: "never stored".into(),
    });
    let err = db.cache.warmup(&warmup).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, Error::InvalidInput { what: "warmup", .. }),
        "{message}"
    );
    assert!(
        message.contains("llm_responses[2]: invalid prompt"),
        "{message}"
    );
    assert_eq!(rows(&db), 0, "nothing of the warmup is stored");
}

#[test]
fn a_nan_embedding_in_a_warmup_is_named_by_its_index() {
    let db = TestDb::new();
    let mut warmup = spec_warmup();
    warmup.embeddings.push(WarmupEmbedding {
        key: EmbeddingKey::new("q", "m1"),
        embedding: vec![f32::NAN],
    });
    let message = db.cache.warmup(&warmup).unwrap_err().to_string();
    assert!(
        message.contains("embeddings[2]: invalid embedding"),
        "{message}"
    );
    assert_eq!(rows(&db), 0);
}

#[test]
fn a_database_failure_rolls_back_every_section() {
    let db = TestDb::new();
    // A valid warmup that the database refuses half way: the audio table is gone.
    db.exec("ALTER TABLE audio_chunk_cache RENAME TO audio_chunk_cache_gone");
    assert!(db.cache.warmup(&spec_warmup()).is_err());
    db.exec("ALTER TABLE audio_chunk_cache_gone RENAME TO audio_chunk_cache");
    assert_eq!(rows(&db), 0);
}

#[test]
fn duplicate_keys_in_a_warmup_keep_the_last_item() {
    let db = TestDb::new();
    let item = |v: f32| WarmupEmbedding {
        key: EmbeddingKey::new("q", "m1"),
        embedding: vec![v],
    };
    let warmup = Warmup {
        embeddings: vec![item(1.0), item(2.0)],
        audio_chunks: vec![WarmupAudioChunk {
            key: AudioChunkKey::new(
                "x".repeat(pgcache::DEFAULT_MAX_AUDIO_TEXT_CHARS + 1),
                "v",
                "p",
            ),
            chunk: AudioChunk::inline(vec![1], "wav"),
        }],
        ..Warmup::default()
    };
    let report = db.cache.warmup(&warmup).unwrap();
    assert_eq!(
        (
            report.embeddings,
            report.skipped_audio_chunks,
            report.audio_chunks
        ),
        (1, 1, 0)
    );
    let hit = db
        .cache
        .embedding()
        .get(&EmbeddingKey::new("q", "m1"))
        .unwrap()
        .unwrap();
    assert_eq!(hit.embedding, vec![2.0]);
}

#[test]
fn unknown_sections_are_rejected() {
    let err = serde_json::from_value::<Warmup>(json!({"llmResponses": []})).unwrap_err();
    assert!(err.to_string().contains("llmResponses"), "{err}");
}

#[test]
fn with_caching_disabled_warmup_still_validates_and_the_ai_caches_miss() {
    let config = pgcache::CacheConfig::builder()
        .database_url("postgres://nobody@127.0.0.1:1/nothing")
        .enabled(false)
        .build()
        .unwrap();
    let cache = pgcache::CacheManager::new(config).unwrap();
    assert_eq!(cache.warmup(&spec_warmup()).unwrap().total(), 0);
    let mut bad = spec_warmup();
    bad.embeddings[1].embedding = vec![f32::INFINITY];
    assert!(
        cache.warmup(&bad).is_err(),
        "bad input is reported even when disabled"
    );
    let key = EmbeddingKey::new("What is AI?", "m1");
    cache.embedding().set(&key, &vec![1.0]).unwrap();
    assert!(cache.embedding().get(&key).unwrap().is_none());
    assert_eq!(
        cache.invalidate_user(uuid::Uuid::new_v4()).unwrap().total(),
        0
    );
    assert_eq!(
        cache
            .audio_chunk()
            .evict_to_budget(0, 0.5)
            .unwrap()
            .rows_removed,
        0
    );
}

/// One valid item per section, each with one misspelt field added (`section`,
/// index of the item in a two-item section, the misspelt field, the item).
fn items_with_unknown_fields() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    let owner = "00000000-0000-0000-0000-000000000007";
    vec![
        ("kv", "vlaue", json!({"key": "k", "value": 1, "vlaue": 2})),
        (
            "embeddings",
            "owner",
            json!({"text": "t", "model": "m", "embedding": [0.1], "owner": owner}),
        ),
        (
            "vector_searches",
            "filter",
            json!({"user_id": owner, "embedding": [0.1], "top_k": 1,
                   "filter": {"lang": "en"}, "results": []}),
        ),
        (
            "llm_responses",
            "contxt",
            json!({"prompt": "p", "provider": "x", "contxt": "secret plan", "response": "r"}),
        ),
        (
            "audio_chunks",
            "sample_rte",
            json!({"text": "t", "voice_model_id": "v", "provider": "x",
                   "data": {"inline": [1]}, "format": "wav", "sample_rte": 8000}),
        ),
        (
            "audio_chunks",
            "bytesize",
            json!({"text": "t", "voice_model_id": "v", "provider": "x",
                   "data": {"stored": {"path": "a.wav", "byte_size": 1, "bytesize": 2}},
                   "format": "wav"}),
        ),
    ]
}

#[test]
fn an_unknown_field_in_any_item_rejects_the_warmup_naming_the_item_and_the_field() {
    let db = TestDb::new();
    for (section, field, bad) in items_with_unknown_fields() {
        // The bad item second, after a valid one, so the index must be counted.
        let mut good = bad.clone();
        good.as_object_mut().unwrap().remove(field);
        if let Some(stored) = good.pointer_mut("/data/stored") {
            stored.as_object_mut().unwrap().remove(field);
        }
        let ok: Warmup = serde_json::from_value(json!({ section: [good.clone()] }))
            .unwrap_or_else(|e| panic!("{section} without {field}: {e}"));
        assert_eq!(db.cache.warmup(&ok).unwrap().total(), 1, "{section}");
        db.cache.clear(None).unwrap();

        let text = serde_json::to_string_pretty(&json!({ section: [good, bad] })).unwrap();
        let message = serde_json::from_str::<Warmup>(&text)
            .expect_err(&format!("{section} with `{field}` must be rejected"))
            .to_string();
        assert!(
            message.contains(&format!("{section}[1]")) && message.contains(field),
            "{message}"
        );
        assert!(message.contains("line "), "the position is kept: {message}");
    }
    assert_eq!(rows(&db), 0);
}

#[test]
fn a_misspelt_owner_or_context_never_stores_a_shared_entry() {
    let db = TestDb::new();
    for item in [
        json!({"prompt": "p", "provider": "x", "owner": "00000000-0000-0000-0000-000000000007",
               "response": "private"}),
        json!({"prompt": "p", "provider": "x", "contxt": "ctx", "response": "for ctx only"}),
    ] {
        let parsed = serde_json::from_value::<Warmup>(json!({ "llm_responses": [item] }));
        assert!(parsed.is_err(), "{item}");
    }
    assert!(db
        .cache
        .llm_response()
        .get(&LlmPrompt::new("p", "x"))
        .unwrap()
        .is_none());
}

#[test]
fn the_report_counts_each_duplicated_key_once_in_every_section() {
    let db = TestDb::new();
    let warmup: Warmup = serde_json::from_value(json!({
        "kv": [{"key": "k", "value": 1}, {"key": "other", "value": 0}, {"key": "k", "value": 2}],
        "embeddings": [
            {"text": "q", "model": "m", "embedding": [1.0]},
            {"text": "q", "model": "m", "embedding": [2.0]}
        ],
        "llm_responses": [
            {"prompt": "p", "provider": "x", "response": "first"},
            {"prompt": "p", "provider": "x", "response": "last"}
        ]
    }))
    .unwrap();
    let report = db.cache.warmup(&warmup).unwrap();
    assert_eq!(
        (report.kv, report.embeddings, report.llm_responses),
        (2, 1, 1)
    );
    assert_eq!(report.total(), rows(&db) as u64, "the report counts rows");
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!(2)), "last wins");
}

fn audio_item(data: serde_json::Value) -> serde_json::Value {
    json!({"text": "Hello", "voice_model_id": "v1", "provider": "xtts-v2",
           "data": data, "format": "wav"})
}

#[test]
fn inline_audio_in_base64_is_stored_byte_for_byte_and_written_back_as_base64() {
    use base64::Engine as _;
    let db = TestDb::new();
    let bytes: Vec<u8> = (0..=255u8).chain([0, 255, 0]).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let warmup: Warmup = serde_json::from_value(json!({
        "audio_chunks": [audio_item(json!({"inline": encoded}))]
    }))
    .unwrap();
    assert_eq!(db.cache.warmup(&warmup).unwrap().audio_chunks, 1);
    let stored = db
        .cache
        .audio_chunk()
        .get(&AudioChunkKey::new("Hello", "v1", "xtts-v2"))
        .unwrap()
        .expect("warmed");
    assert_eq!(stored.chunk.data, pgcache::AudioData::Inline(bytes));

    let written = serde_json::to_value(&warmup).unwrap();
    assert_eq!(written["audio_chunks"][0]["data"]["inline"], json!(encoded));
    assert_eq!(serde_json::from_value::<Warmup>(written).unwrap(), warmup);
}

#[test]
fn inline_audio_as_an_array_of_bytes_is_still_read() {
    let warmup: Warmup = serde_json::from_value(json!({
        "audio_chunks": [audio_item(json!({"inline": [1, 2, 255]}))]
    }))
    .unwrap();
    assert_eq!(
        warmup.audio_chunks[0].chunk.data,
        pgcache::AudioData::Inline(vec![1, 2, 255])
    );
}

#[test]
fn bad_base64_audio_rejects_the_warmup_naming_the_item_and_the_field() {
    for bad in ["not base64!", "AQI", "AQID=="] {
        let text = serde_json::to_string_pretty(&json!({
            "audio_chunks": [
                audio_item(json!({"inline": "AQID"})),
                audio_item(json!({"inline": bad})),
            ]
        }))
        .unwrap();
        let message = serde_json::from_str::<Warmup>(&text)
            .expect_err(bad)
            .to_string();
        assert!(
            message.contains("audio_chunks[1]") && message.contains("data.inline"),
            "{bad}: {message}"
        );
        assert!(message.contains("base64"), "{message}");
    }
}

#[test]
fn a_warmup_with_its_own_generous_statement_timeout_is_stored() {
    let db = TestDb::new();
    let mut warmup = spec_warmup();
    warmup.statement_timeout_ms = Some(60_000);
    assert_eq!(db.cache.warmup(&warmup).unwrap().total(), 6);
    assert_eq!(rows(&db), 6);
}

#[test]
fn a_zero_statement_timeout_is_rejected_before_anything_is_stored() {
    let db = TestDb::new();
    let mut warmup = spec_warmup();
    warmup.statement_timeout_ms = Some(0);
    let error = db.cache.warmup(&warmup).unwrap_err();
    assert!(matches!(error, Error::InvalidInput { .. }), "{error}");
    assert!(
        error.to_string().contains("statement_timeout_ms"),
        "{error}"
    );
    assert_eq!(rows(&db), 0);
}

/// The warmup example of the guide (docs/guide.md), as written there.
fn readme_example() -> &'static str {
    let readme = include_str!("../docs/guide.md");
    let marker = "<!-- warmup-example";
    let after = &readme[readme
        .find(marker)
        .expect("the guide marks its warmup example")..];
    let start = after
        .find("```json\n")
        .expect("a json block after the marker")
        + 8;
    let end = after[start..].find("```").expect("the block ends");
    &after[start..start + end]
}

/// Every object key in `value`, at any depth.
fn keys(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn the_readme_warmup_example_is_complete_and_warms_every_cache() {
    let db = TestDb::new();
    let text = readme_example();
    let warmup: Warmup = serde_json::from_str(text).unwrap();
    // Every field the format has (as written back, with every option set) is shown.
    let shown: serde_json::Value = serde_json::from_str(text).unwrap();
    let (mut documented, mut format) = Default::default();
    keys(&shown, &mut documented);
    keys(&serde_json::to_value(&warmup).unwrap(), &mut format);
    let missing: Vec<_> = format.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "not in the guide's example: {missing:?}"
    );

    let report = db.cache.warmup(&warmup).unwrap();
    assert_eq!(
        (
            report.kv,
            report.embeddings,
            report.vector_searches,
            report.llm_responses,
            report.audio_chunks
        ),
        (1, 1, 1, 1, 2)
    );
    let hello = db
        .cache
        .audio_chunk()
        .get(&warmup.audio_chunks[0].key)
        .unwrap()
        .expect("warmed");
    assert_eq!(
        hello.chunk.data,
        pgcache::AudioData::Inline(b"RIFF$\0\0\0WAVEfmt ".to_vec())
    );
}
