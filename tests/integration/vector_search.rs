//! The vector-search cache through the public API.

use crate::common;

use common::TestDb;
use pgcache::{Cache, Error, VectorSearchQuery};
use serde_json::json;
use uuid::Uuid;

fn query(user: Uuid) -> VectorSearchQuery {
    VectorSearchQuery::new(user, vec![0.1, 0.2, 0.3], 5).with_filters(json!({"lang": "en"}))
}

#[test]
fn a_hit_returns_the_results_with_their_metadata() {
    let db = TestDb::new();
    let user = Uuid::new_v4();
    let results = json!([{"id": 7, "score": 0.93}]);
    db.cache
        .vector_search()
        .set(&query(user), &results)
        .unwrap();
    let hit = db.cache.vector_search().get(&query(user)).unwrap().unwrap();
    assert_eq!(hit.results, results);
    assert_eq!(hit.user_id, user);
    assert_eq!(hit.top_k, 5);
    assert_eq!(hit.filters, json!({"lang": "en"}));
}

#[test]
fn user_b_never_sees_user_a_results_for_the_same_query() {
    let db = TestDb::new();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let cache = db.cache.vector_search();
    cache.set(&query(a), &json!(["a's document"])).unwrap();
    assert!(cache.get(&query(b)).unwrap().is_none());
    assert_eq!(cache.get_many(&[&query(b), &query(a)]).unwrap()[0], None);
    cache.set(&query(b), &json!(["b's document"])).unwrap();
    assert_eq!(
        cache.get(&query(a)).unwrap().unwrap().results,
        json!(["a's document"])
    );
    assert_eq!(
        cache.get(&query(b)).unwrap().unwrap().results,
        json!(["b's document"])
    );
}

#[test]
fn reads_also_filter_on_the_user_column() {
    let db = TestDb::new();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    db.cache
        .vector_search()
        .set(&query(a), &json!([1]))
        .unwrap();
    // Even a row whose digest matches is not served to another user.
    db.exec(&format!("UPDATE vector_search_cache SET user_id = '{b}'"));
    assert!(db.cache.vector_search().get(&query(a)).unwrap().is_none());
}

#[test]
fn expired_results_read_as_misses() {
    let db = TestDb::new();
    let user = Uuid::new_v4();
    db.cache
        .vector_search()
        .set(&query(user), &json!([1]))
        .unwrap();
    db.expire_all("vector_search_cache");
    assert!(db
        .cache
        .vector_search()
        .get(&query(user))
        .unwrap()
        .is_none());
}

#[test]
fn overwrite_replaces_results_and_keeps_one_row() {
    let db = TestDb::new();
    let user = Uuid::new_v4();
    let cache = db.cache.vector_search();
    cache.set(&query(user), &json!([1])).unwrap();
    cache.set(&query(user), &json!([2])).unwrap();
    assert_eq!(
        cache.get(&query(user)).unwrap().unwrap().results,
        json!([2])
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM vector_search_cache"), 1);
}

#[test]
fn nan_in_the_query_embedding_and_zero_top_k_are_rejected() {
    let db = TestDb::new();
    let user = Uuid::new_v4();
    let cache = db.cache.vector_search();
    let nan = VectorSearchQuery::new(user, vec![0.1, f32::NAN], 5);
    let err = cache.set(&nan, &json!([])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                what: "embedding",
                ..
            }
        ),
        "{err}"
    );
    assert!(cache.get(&nan).is_err());
    let zero = VectorSearchQuery::new(user, vec![0.1], 0);
    let err = cache.set(&zero, &json!([])).unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { what: "top_k", .. }),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM vector_search_cache"), 0);
}

#[test]
fn filters_are_stored_in_canonical_form() {
    let db = TestDb::new();
    let user = Uuid::new_v4();
    let q = VectorSearchQuery::new(user, vec![1.0], 3)
        .with_filters(serde_json::from_str(r#"{"b": 1, "a": {"d": 2, "c": 3}}"#).unwrap());
    db.cache.vector_search().set(&q, &json!([])).unwrap();
    let stored = db.cache.vector_search().get(&q).unwrap().unwrap().filters;
    assert_eq!(
        serde_json::to_string(&stored).unwrap(),
        r#"{"a":{"c":3,"d":2},"b":1}"#
    );
}

#[test]
fn float_results_round_trip_bit_exactly() {
    // Scores computed in f32 and widened to f64 need every digit: a parser that is
    // off by one unit in the last place would make cached results differ from fresh
    // ones, and so every key derived from them.
    let db = TestDb::new();
    let user = Uuid::new_v4();
    let scores: Vec<f64> = [1.950_326_8_f32, 0.1, 2.925_490_1, 5.850_980_3]
        .iter()
        .map(|&s| f64::from(s))
        .collect();
    let results = json!(scores);
    db.cache
        .vector_search()
        .set(&query(user), &results)
        .unwrap();
    let hit = db.cache.vector_search().get(&query(user)).unwrap().unwrap();
    assert_eq!(hit.results, results);
}
