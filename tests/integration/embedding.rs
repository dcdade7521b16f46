//! The embedding cache through the public API.

use crate::common;

use common::TestDb;
use pgcache::{Cache, EmbeddingKey, Error};

const MODEL: &str = "text-embedding-3-small";

fn key(text: &str) -> EmbeddingKey {
    EmbeddingKey::new(text, MODEL)
}

#[test]
fn set_then_get_returns_the_vector_with_its_metadata() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    cache
        .set(&key("What is AI?"), &vec![0.25, -1.5, 3.0])
        .unwrap();
    let hit = cache.get(&key("What is AI?")).unwrap().expect("a hit");
    assert_eq!(hit.embedding, vec![0.25, -1.5, 3.0]);
    assert_eq!(hit.dimensions, 3);
    assert_eq!(hit.model, MODEL);
    assert_eq!(hit.owner, None);
    assert!(hit.expires_at > hit.created_at);
}

#[test]
fn other_text_or_other_model_is_a_miss() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    cache.set(&key("What is AI?"), &vec![1.0]).unwrap();
    assert!(cache.get(&key("What is ML?")).unwrap().is_none());
    assert!(cache
        .get(&EmbeddingKey::new("What is AI?", "other-model"))
        .unwrap()
        .is_none());
}

#[test]
fn expired_embeddings_read_as_misses() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    cache.set(&key("q"), &vec![1.0]).unwrap();
    db.expire_all("embedding_cache");
    assert!(cache.get(&key("q")).unwrap().is_none());
    assert_eq!(cache.get_many(&[&key("q")]).unwrap(), vec![None]);
}

#[test]
fn overwrite_replaces_the_vector_and_keeps_one_row() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    cache.set(&key("q"), &vec![1.0, 2.0]).unwrap();
    cache.set(&key("q"), &vec![3.0, 4.0, 5.0]).unwrap();
    let hit = cache.get(&key("q")).unwrap().unwrap();
    assert_eq!(hit.embedding, vec![3.0, 4.0, 5.0]);
    assert_eq!(db.count("SELECT count(*) AS n FROM embedding_cache"), 1);
}

#[test]
fn vectors_are_stored_as_four_bytes_per_component() {
    let db = TestDb::new();
    let vector: Vec<f32> = (0..1536).map(|i| i as f32 / 7.0).collect();
    db.cache.embedding().set(&key("long"), &vector).unwrap();
    assert_eq!(
        db.count("SELECT octet_length(embedding)::bigint AS n FROM embedding_cache"),
        4 * 1536
    );
    let hit = db.cache.embedding().get(&key("long")).unwrap().unwrap();
    assert_eq!(hit.embedding, vector, "bit-exact round trip");
}

#[test]
fn nan_infinite_and_empty_embeddings_are_rejected_and_nothing_is_stored() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    for bad in [
        vec![1.0, f32::NAN],
        vec![f32::INFINITY],
        vec![f32::NEG_INFINITY],
        vec![],
    ] {
        let err = cache.set(&key("q"), &bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "embedding",
                    ..
                }
            ),
            "{bad:?}: {err}"
        );
    }
    // A bad entry in a batch rejects the whole batch.
    let (good, bad) = (vec![1.0], vec![f32::NAN]);
    let (a, b) = (key("a"), key("b"));
    assert!(cache
        .set_many(
            &[(&a, &good), (&b, &bad)],
            std::time::Duration::from_secs(60)
        )
        .is_err());
    assert_eq!(db.count("SELECT count(*) AS n FROM embedding_cache"), 0);
}

#[test]
fn nul_in_text_is_rejected() {
    let db = TestDb::new();
    let err = db
        .cache
        .embedding()
        .set(&key("a\0b"), &vec![1.0])
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "text", .. }),
        "{err}"
    );
    let err = db.cache.embedding().get(&key("a\0b")).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
}

#[test]
fn get_or_compute_many_computes_only_the_misses() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    cache.set(&key("cached"), &vec![9.0]).unwrap();
    let mut asked: Vec<Vec<String>> = Vec::new();
    let mut embed = |texts: &[&str]| {
        asked.push(texts.iter().map(|t| t.to_string()).collect());
        Ok::<_, Error>(texts.iter().map(|t| vec![t.len() as f32]).collect())
    };
    let got = cache
        .get_or_compute_many(&["cached", "ab", "abc", "ab"], MODEL, &mut embed)
        .unwrap();
    assert_eq!(got, vec![vec![9.0], vec![2.0], vec![3.0], vec![2.0]]);
    let again = cache
        .get_or_compute_many(&["abc", "cached", "ab"], MODEL, &mut embed)
        .unwrap();
    assert_eq!(again, vec![vec![3.0], vec![9.0], vec![2.0]]);
    assert_eq!(asked, vec![vec!["ab".to_string(), "abc".to_string()]]);
}

#[test]
fn get_or_compute_many_rejects_a_wrong_number_of_vectors() {
    let db = TestDb::new();
    let err = db
        .cache
        .embedding()
        .get_or_compute_many(&["a", "b"], MODEL, |_| Ok::<_, Error>(vec![vec![1.0]]))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert_eq!(db.count("SELECT count(*) AS n FROM embedding_cache"), 0);
}

#[test]
fn a_failed_computation_is_returned_and_not_cached() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    #[derive(Debug)]
    enum AppError {
        Provider,
        Cache,
    }
    impl From<Error> for AppError {
        fn from(_: Error) -> Self {
            AppError::Cache
        }
    }
    let r = cache.get_or_compute(&key("q"), || Err::<Vec<f32>, _>(AppError::Provider));
    assert!(matches!(r, Err(AppError::Provider)));
    assert_eq!(db.count("SELECT count(*) AS n FROM embedding_cache"), 0);
    let v = cache
        .get_or_compute(&key("q"), || Ok::<_, AppError>(vec![1.0]))
        .unwrap();
    assert_eq!(v, vec![1.0]);
}

#[test]
fn an_owned_entry_is_found_only_with_its_owner() {
    let db = TestDb::new();
    let cache = db.cache.embedding();
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    cache.set(&key("q").owned_by(alice), &vec![1.0]).unwrap();
    assert_eq!(
        cache.get(&key("q").owned_by(alice)).unwrap().unwrap().owner,
        Some(alice)
    );
    assert!(cache.get(&key("q").owned_by(bob)).unwrap().is_none());
    assert!(cache.get(&key("q")).unwrap().is_none());
}
