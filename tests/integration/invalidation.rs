//! Forgetting a user and retiring an embedding model.

use crate::common;

use common::TestDb;
use pgcache::{
    AudioChunk, AudioChunkKey, Cache, EmbeddingKey, Error, LlmPrompt, VectorSearchQuery,
};
use serde_json::json;
use uuid::Uuid;

/// One row per cache for `user`, plus a shared LLM response.
fn fill(db: &TestDb, user: Uuid, tag: &str) {
    let c = &db.cache;
    c.embedding()
        .set(&EmbeddingKey::new(tag, "m1").owned_by(user), &vec![1.0])
        .unwrap();
    c.vector_search()
        .set(&VectorSearchQuery::new(user, vec![1.0], 3), &json!([tag]))
        .unwrap();
    c.llm_response()
        .set(&LlmPrompt::new(tag, "p").owned_by(user), &tag.to_owned())
        .unwrap();
    c.audio_chunk()
        .set(
            &AudioChunkKey::new(tag, "v", "p").owned_by(user),
            &AudioChunk::stored(format!("audio/{tag}.opus"), 10, "opus"),
        )
        .unwrap();
    c.audio_chunk()
        .set(
            &AudioChunkKey::new(format!("{tag} inline"), "v", "p").owned_by(user),
            &AudioChunk::inline(vec![1], "opus"),
        )
        .unwrap();
}

#[test]
fn invalidate_user_removes_that_users_rows_in_every_cache_and_nothing_else() {
    let db = TestDb::new();
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    fill(&db, alice, "alice");
    fill(&db, bob, "bob");
    db.cache
        .llm_response()
        .set(&LlmPrompt::new("shared", "p"), &"for all".to_owned())
        .unwrap();

    let report = db.cache.invalidate_user(alice).unwrap();
    assert_eq!(
        (
            report.embeddings,
            report.vector_searches,
            report.llm_responses,
            report.audio_chunks
        ),
        (1, 1, 1, 2)
    );
    assert_eq!(report.total(), 5);
    assert_eq!(report.released_paths, vec!["audio/alice.opus".to_owned()]);

    let c = &db.cache;
    assert!(c
        .vector_search()
        .get(&VectorSearchQuery::new(alice, vec![1.0], 3))
        .unwrap()
        .is_none());
    assert!(c
        .llm_response()
        .get(&LlmPrompt::new("alice", "p").owned_by(alice))
        .unwrap()
        .is_none());
    // Bob and the shared entries are untouched.
    assert!(c
        .embedding()
        .get(&EmbeddingKey::new("bob", "m1").owned_by(bob))
        .unwrap()
        .is_some());
    assert!(c
        .vector_search()
        .get(&VectorSearchQuery::new(bob, vec![1.0], 3))
        .unwrap()
        .is_some());
    assert!(c
        .llm_response()
        .get(&LlmPrompt::new("bob", "p").owned_by(bob))
        .unwrap()
        .is_some());
    assert!(c
        .audio_chunk()
        .get(&AudioChunkKey::new("bob", "v", "p").owned_by(bob))
        .unwrap()
        .is_some());
    assert!(c
        .llm_response()
        .get(&LlmPrompt::new("shared", "p"))
        .unwrap()
        .is_some());
    assert_eq!(db.cache.invalidate_user(alice).unwrap().total(), 0);
}

#[test]
fn invalidate_model_drops_only_that_models_embeddings() {
    let db = TestDb::new();
    let e = db.cache.embedding();
    e.set(&EmbeddingKey::new("a", "old-model"), &vec![1.0])
        .unwrap();
    e.set(
        &EmbeddingKey::new("b", "old-model").owned_by(Uuid::new_v4()),
        &vec![1.0],
    )
    .unwrap();
    e.set(&EmbeddingKey::new("a", "new-model"), &vec![2.0])
        .unwrap();
    assert_eq!(db.cache.invalidate_model("old-model").unwrap(), 2);
    assert!(e
        .get(&EmbeddingKey::new("a", "old-model"))
        .unwrap()
        .is_none());
    assert!(e
        .get(&EmbeddingKey::new("a", "new-model"))
        .unwrap()
        .is_some());
    let err = db.cache.invalidate_model("").unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "model", .. }),
        "{err}"
    );
}
