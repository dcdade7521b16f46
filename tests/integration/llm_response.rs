//! The LLM response cache through the public API.

use crate::common;

use common::TestDb;
use pgcache::{Cache, Error, LlmPrompt};
use serde_json::json;

fn prompt(text: &str) -> LlmPrompt {
    LlmPrompt::new(text, "gemini-flash").with_context("User is a beginner")
}

#[test]
fn a_hit_returns_the_response_with_provider_and_model() {
    let db = TestDb::new();
    let cache = db.cache.llm_response();
    let p = prompt("Explain AI").with_model("flash-2");
    cache.set(&p, &"AI is...".to_owned()).unwrap();
    let hit = cache.get(&p).unwrap().unwrap();
    assert_eq!(hit.response, "AI is...");
    assert_eq!(hit.provider, "gemini-flash");
    assert_eq!(hit.model.as_deref(), Some("flash-2"));
    assert!(cache.get(&prompt("Explain ML")).unwrap().is_none());
}

#[test]
fn expired_responses_read_as_misses() {
    let db = TestDb::new();
    db.cache
        .llm_response()
        .set(&prompt("q"), &"a".to_owned())
        .unwrap();
    db.expire_all("llm_response_cache");
    assert!(db.cache.llm_response().get(&prompt("q")).unwrap().is_none());
}

#[test]
fn hits_are_counted_in_deferred_batches_and_top_orders_by_hits() {
    let db = TestDb::new();
    let cache = db.cache.llm_response();
    for (text, hits) in [("popular", 3), ("once", 1), ("never", 0)] {
        cache
            .set(&prompt(text), &format!("answer to {text}"))
            .unwrap();
        for _ in 0..hits {
            assert!(cache.get(&prompt(text)).unwrap().is_some());
        }
    }
    cache.get(&prompt("missing")).unwrap();
    let top = cache.top(2).unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!((top[0].hits, top[1].hits), (3, 1));
    assert_eq!(top[0].provider, "gemini-flash");
    assert_eq!(top[0].model, None, "the prompt named no model");
    assert_eq!(
        cache.top(10).unwrap().len(),
        2,
        "a response never hit is not among the top"
    );
    assert_eq!(
        top[0].hash_prefix(),
        &prompt("popular").digest().unwrap().to_hex()[..16]
    );
    assert_eq!(
        db.count("SELECT sum(hit_count)::bigint AS n FROM llm_response_cache"),
        4,
        "the flushed counts are in the table"
    );
    // A hit after the flush reads the flushed count.
    assert_eq!(cache.get(&prompt("popular")).unwrap().unwrap().hit_count, 3);
}

#[test]
fn top_leaves_out_expired_responses() {
    let db = TestDb::new();
    let cache = db.cache.llm_response();
    cache.set(&prompt("q"), &"a".to_owned()).unwrap();
    cache.get(&prompt("q")).unwrap();
    db.cache.flush_stats().unwrap();
    db.expire_all("llm_response_cache");
    assert!(cache.top(10).unwrap().is_empty());
}

#[test]
fn overwrite_replaces_the_response_and_restarts_the_hit_count() {
    let db = TestDb::new();
    let cache = db.cache.llm_response();
    cache.set(&prompt("q"), &"old".to_owned()).unwrap();
    cache.get(&prompt("q")).unwrap();
    db.cache.flush_stats().unwrap();
    cache.set(&prompt("q"), &"new".to_owned()).unwrap();
    let hit = cache.get(&prompt("q")).unwrap().unwrap();
    assert_eq!((hit.response.as_str(), hit.hit_count), ("new", 0));
    assert_eq!(db.count("SELECT count(*) AS n FROM llm_response_cache"), 1);
}

#[test]
fn nul_in_prompt_or_params_is_rejected() {
    let db = TestDb::new();
    let cache = db.cache.llm_response();
    let err = cache.set(&prompt("a\0b"), &"x".to_owned()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "prompt", .. }),
        "{err}"
    );
    let err = cache
        .set(
            &prompt("q").with_params(json!({"stop": "\u{0}"})),
            &"x".to_owned(),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "params", .. }),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM llm_response_cache"), 0);
}

#[test]
fn get_or_compute_calls_the_model_once() {
    let db = TestDb::new();
    let mut calls = 0;
    for _ in 0..3 {
        let answer = db
            .cache
            .llm_response()
            .get_or_compute(&prompt("q"), || {
                calls += 1;
                Ok::<_, Error>("answer".to_owned())
            })
            .unwrap();
        assert_eq!(answer, "answer");
    }
    assert_eq!(calls, 1);
}

#[test]
fn set_many_keeps_the_last_value_of_a_key_given_twice_in_any_batch_size() {
    let db = TestDb::new();
    let cache = db.cache.llm_response();
    // Well over the size the upsert was once split at, in one statement now.
    let prompts: Vec<LlmPrompt> = (0..2500).map(|i| prompt(&format!("q{i}"))).collect();
    let (first, last) = ("first".to_owned(), "last".to_owned());
    let mut entries: Vec<(&LlmPrompt, &String)> = prompts.iter().map(|p| (p, &first)).collect();
    entries.push((&prompts[7], &last));
    cache
        .set_many(&entries, std::time::Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        db.count("SELECT count(*) AS n FROM llm_response_cache"),
        2500
    );
    let hit = cache.get(&prompts[7]).unwrap().unwrap();
    assert_eq!(
        (hit.response.as_str(), hit.provider.as_str(), hit.model),
        ("last", "gemini-flash", None)
    );
    assert_eq!(cache.get(&prompts[8]).unwrap().unwrap().response, "first");
}
