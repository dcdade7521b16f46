//! The standard traits: settings types parse from text with `str::parse` (errors
//! naming what was wrong), and reports serialize to JSON.

use pgcache::{CacheKind, DatabaseUrl, Durability, Error, InvalidationReport, WarmupReport};

#[test]
fn durability_parses_its_two_names_in_any_case() {
    assert_eq!(
        "relaxed".parse::<Durability>().unwrap(),
        Durability::Relaxed
    );
    assert_eq!(" FULL ".parse::<Durability>().unwrap(), Durability::Full);
    let error = "fast".parse::<Durability>().unwrap_err();
    assert!(matches!(error, Error::Config { .. }), "{error}");
    assert!(error.to_string().contains("`full` or `relaxed`"), "{error}");
}

#[test]
fn cache_kinds_parse_by_name_and_a_wrong_name_lists_the_right_ones() {
    for kind in CacheKind::ALL {
        assert_eq!(kind.name().parse::<CacheKind>().unwrap(), kind);
        assert_eq!(kind.to_string().parse::<CacheKind>().unwrap(), kind);
    }
    let error = "llm".parse::<CacheKind>().unwrap_err();
    assert!(matches!(error, Error::InvalidInput { .. }), "{error}");
    assert!(error.to_string().contains("llm_response"), "{error}");
}

#[test]
fn a_database_url_parses_and_keeps_its_password_out_of_display() {
    let url: DatabaseUrl = "postgres://app:s3cret@db.internal:5432/app"
        .parse()
        .unwrap();
    assert!(!url.to_string().contains("s3cret"), "{url}");
    assert!(!format!("{url:?}").contains("s3cret"), "{url:?}");
    assert!("postgres://app@db.internal:notaport/app"
        .parse::<DatabaseUrl>()
        .is_err());
}

#[test]
fn warmup_and_invalidation_reports_serialize_to_json() {
    let warmup = serde_json::to_value(WarmupReport::default()).unwrap();
    assert_eq!(warmup["kv"], 0, "{warmup}");
    assert_eq!(warmup["skipped_audio_chunks"], 0, "{warmup}");
    let invalidation = serde_json::to_value(InvalidationReport::default()).unwrap();
    assert!(invalidation.is_object(), "{invalidation}");
}

#[test]
fn cache_keys_work_as_hash_set_members() {
    use std::collections::HashSet;
    let prompts: HashSet<pgcache::LlmPrompt> = [
        pgcache::LlmPrompt::new("q", "p"),
        pgcache::LlmPrompt::new("q", "p"),
        pgcache::LlmPrompt::new("q", "p").with_model("m"),
    ]
    .into_iter()
    .collect();
    assert_eq!(prompts.len(), 2);
    let chunks: HashSet<pgcache::AudioChunkKey> = [
        pgcache::AudioChunkKey::new("hi", "voice", "tts"),
        pgcache::AudioChunkKey::new("hi", "voice", "tts"),
        pgcache::AudioChunkKey::new("ho", "voice", "tts"),
    ]
    .into_iter()
    .collect();
    assert_eq!(chunks.len(), 2);
    let embeddings: HashSet<pgcache::EmbeddingKey> = [
        pgcache::EmbeddingKey::new("text", "model"),
        pgcache::EmbeddingKey::new("text", "model"),
    ]
    .into_iter()
    .collect();
    assert_eq!(embeddings.len(), 1);
}
