//! Cache keys: same meaning hits, any changed field misses, and the digest format is
//! pinned.

use crate::common;

use common::TestDb;
use pgcache::{AudioChunk, AudioChunkKey, Cache, EmbeddingKey, LlmPrompt, VectorSearchQuery};
use serde_json::json;
use uuid::Uuid;

/// Stores `base`, then reads each variant through the cache and checks it hits
/// exactly when it means the same thing.
fn check_variants<C: Cache>(
    cache: C,
    base: &C::Key,
    value: &C::Value,
    cases: &[(&str, C::Key, bool)],
) where
    C::Key: Sized,
{
    cache.set(base, value).unwrap();
    for (name, variant, should_hit) in cases {
        let hit = cache.get(variant).unwrap().is_some();
        assert_eq!(hit, *should_hit, "{name}: expected hit = {should_hit}");
    }
}

#[test]
fn embedding_keys_hit_only_for_the_same_text_and_model() {
    let db = TestDb::new();
    let base = EmbeddingKey::new("What is AI?", "m1");
    let cases = [
        ("same", EmbeddingKey::new("What is AI?", "m1"), true),
        ("other text", EmbeddingKey::new("What is AI", "m1"), false),
        ("other case", EmbeddingKey::new("what is ai?", "m1"), false),
        ("other model", EmbeddingKey::new("What is AI?", "m2"), false),
        (
            "fields shifted",
            EmbeddingKey::new("What is AI?m", "1"),
            false,
        ),
        (
            "owned",
            EmbeddingKey::new("What is AI?", "m1").owned_by(Uuid::nil()),
            false,
        ),
    ];
    check_variants(db.cache.embedding(), &base, &vec![1.0], &cases);
}

#[test]
fn vector_search_keys_ignore_json_key_order_and_negative_zero_only() {
    let db = TestDb::new();
    let user = Uuid::from_u128(1);
    let filters = serde_json::from_str(r#"{"lang":"en","tags":{"a":1,"b":[1,2]}}"#).unwrap();
    let reordered = serde_json::from_str(r#"{"tags":{"b":[1,2],"a":1},"lang":"en"}"#).unwrap();
    let base = VectorSearchQuery::new(user, vec![0.0, 0.5, -1.0], 5).with_filters(filters);
    let q = |e: Vec<f32>, k: u32, f: serde_json::Value, u: Uuid| {
        VectorSearchQuery::new(u, e, k).with_filters(f)
    };
    let f = || base.filters.clone();
    let cases = [
        ("same", base.clone(), true),
        (
            "reordered filter keys",
            q(vec![0.0, 0.5, -1.0], 5, reordered, user),
            true,
        ),
        ("-0.0 for 0.0", q(vec![-0.0, 0.5, -1.0], 5, f(), user), true),
        (
            "other component",
            q(vec![0.0, 0.5, -1.000_001], 5, f(), user),
            false,
        ),
        (
            "extra dimension",
            q(vec![0.0, 0.5, -1.0, 0.0], 5, f(), user),
            false,
        ),
        ("other top_k", q(vec![0.0, 0.5, -1.0], 6, f(), user), false),
        (
            "other filter value",
            q(vec![0.0, 0.5, -1.0], 5, json!({"lang": "fr"}), user),
            false,
        ),
        (
            "array order matters",
            q(
                vec![0.0, 0.5, -1.0],
                5,
                json!({"lang":"en","tags":{"a":1,"b":[2,1]}}),
                user,
            ),
            false,
        ),
        (
            "other user",
            q(vec![0.0, 0.5, -1.0], 5, f(), Uuid::from_u128(2)),
            false,
        ),
    ];
    check_variants(db.cache.vector_search(), &base, &json!([]), &cases);
}

#[test]
fn llm_keys_cover_prompt_context_provider_model_and_params() {
    let db = TestDb::new();
    let base = LlmPrompt::new("Explain AI", "gemini-flash")
        .with_context("beginner")
        .with_params(json!({"temperature": 0.2, "max_tokens": 100}));
    let p = || LlmPrompt::new("Explain AI", "gemini-flash").with_context("beginner");
    let cases = [
        (
            "same, params reordered",
            p().with_params(json!({"max_tokens": 100, "temperature": 0.2})),
            true,
        ),
        (
            "other prompt",
            LlmPrompt::new("Explain ML", "gemini-flash")
                .with_context("beginner")
                .with_params(json!({"temperature": 0.2, "max_tokens": 100})),
            false,
        ),
        (
            "no context",
            LlmPrompt::new("Explain AI", "gemini-flash")
                .with_params(json!({"temperature": 0.2, "max_tokens": 100})),
            false,
        ),
        (
            "empty context",
            LlmPrompt::new("Explain AI", "gemini-flash")
                .with_context("")
                .with_params(json!({"temperature": 0.2, "max_tokens": 100})),
            false,
        ),
        (
            "other provider",
            LlmPrompt::new("Explain AI", "gpt-4-turbo")
                .with_context("beginner")
                .with_params(json!({"temperature": 0.2, "max_tokens": 100})),
            false,
        ),
        (
            "with model",
            p().with_model("flash-2")
                .with_params(json!({"temperature": 0.2, "max_tokens": 100})),
            false,
        ),
        (
            "other params",
            p().with_params(json!({"temperature": 0.3, "max_tokens": 100})),
            false,
        ),
        ("no params", p(), false),
        (
            "owned",
            p().with_params(json!({"temperature": 0.2, "max_tokens": 100}))
                .owned_by(Uuid::nil()),
            false,
        ),
    ];
    check_variants(
        db.cache.llm_response(),
        &base,
        &"AI is...".to_owned(),
        &cases,
    );
}

#[test]
fn audio_keys_cover_text_voice_provider_and_settings() {
    let db = TestDb::new();
    let k = |text: &str, voice: &str, provider: &str, settings| {
        AudioChunkKey::new(text, voice, provider).with_settings(settings)
    };
    let base = k("Hello", "v1", "xtts-v2", json!({"speed": 1.0, "pitch": 0}));
    let cases = [
        (
            "settings reordered",
            k("Hello", "v1", "xtts-v2", json!({"pitch": 0, "speed": 1.0})),
            true,
        ),
        (
            "other text",
            k("Hello!", "v1", "xtts-v2", json!({"speed": 1.0, "pitch": 0})),
            false,
        ),
        (
            "other voice",
            k("Hello", "v2", "xtts-v2", json!({"speed": 1.0, "pitch": 0})),
            false,
        ),
        (
            "other provider",
            k(
                "Hello",
                "v1",
                "elevenlabs",
                json!({"speed": 1.0, "pitch": 0}),
            ),
            false,
        ),
        (
            "other settings",
            k("Hello", "v1", "xtts-v2", json!({"speed": 1.1, "pitch": 0})),
            false,
        ),
        (
            "fields shifted",
            k("Hellov", "1", "xtts-v2", json!({"speed": 1.0, "pitch": 0})),
            false,
        ),
    ];
    check_variants(
        db.cache.audio_chunk(),
        &base,
        &AudioChunk::inline(vec![1, 2], "wav"),
        &cases,
    );
}

#[test]
fn digests_are_pinned_so_a_format_change_fails() {
    // The embedding digest was also computed independently from the documented
    // encoding: sha256("pgcache" 0x01 'd' len "embedding" 's' len text 's' len model 'n'),
    // lengths as 8 little-endian bytes.
    let user = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    let golden = [
        (
            "embedding",
            EmbeddingKey::new("What is AI?", "text-embedding-3-small").digest(),
            "5f787bf6e9461c36ada3add4bdf5f27329ec91b678824e597a745d3b7378edf7",
        ),
        (
            "vector_search",
            VectorSearchQuery::new(user, vec![0.1, -0.0, 2.5], 5)
                .with_filters(json!({"lang": "en"}))
                .digest(),
            "32ab0cd7a386c76d0c723d6b08fca688b7d3ddfcdc5a57776f18ce26f1bb23bf",
        ),
        (
            "llm_response",
            LlmPrompt::new("Explain quantum computing", "gemini-flash")
                .with_context("User is a beginner")
                .digest(),
            "04908026083b181a0530bf8448c7cfb400ace30263979f4c76a5f91de09379d5",
        ),
        (
            "audio_chunk",
            AudioChunkKey::new("Hello world", "voice-123", "xtts-v2").digest(),
            "9fce9f837d607462917c657481c3319408a3ea1ec336fba467591706bd734dd2",
        ),
    ];
    for (name, digest, expected) in golden {
        assert_eq!(digest.unwrap().to_hex(), expected, "{name} digest changed");
    }
}

#[test]
fn the_same_text_in_two_caches_has_two_digests() {
    let a = EmbeddingKey::new("Hello", "xtts-v2").digest().unwrap();
    let b = LlmPrompt::new("Hello", "xtts-v2").digest().unwrap();
    assert_ne!(a, b);
}
