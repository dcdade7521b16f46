//! The axum example service (`examples/axum_service.rs`, its router included here),
//! driven over HTTP on a free port: cache-aside reads, transactional invalidation,
//! rate limiting, LLM single flight, Prometheus metrics.

#[path = "integration/common/mod.rs"]
mod common;

#[allow(dead_code)]
#[path = "../examples/axum_service.rs"]
mod service;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::FreshDatabase;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request on a connection of its own; the status and the body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    client: &str,
    body: Option<Value>,
) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         x-client-id: {client}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_caches_invalidates_limits_and_reports_over_http() {
    let db = FreshDatabase::new();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let url = db.url.clone();
    let state = tokio::task::spawn_blocking(move || service::start(&url, 3, metrics))
        .await
        .unwrap()
        .unwrap();
    let state = Arc::new(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = service::router(state.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // Profile: missing, created, read (cached), updated, read again.
    assert_eq!(http(addr, "GET", "/users/7", "a", None).await.0, 404);
    let ada = json!({"name": "Ada", "email": "ada@example.com"});
    let (status, _) = http(addr, "PUT", "/users/7", "a", Some(ada)).await;
    assert_eq!(status, 200);
    let (status, body) = http(addr, "GET", "/users/7", "a", None).await;
    assert_eq!(
        (status, json_of(&body)["name"].clone()),
        (200, json!("Ada"))
    );
    let hit = http(addr, "GET", "/users/7", "a", None).await;
    assert_eq!(json_of(&hit.1)["name"], json!("Ada"));
    let grace = json!({"name": "Grace", "email": "grace@example.com"});
    assert_eq!(http(addr, "PUT", "/users/7", "a", Some(grace)).await.0, 200);
    let (status, body) = http(addr, "GET", "/users/7", "a", None).await;
    assert_eq!(
        (status, json_of(&body)["name"].clone()),
        (200, json!("Grace")),
        "the update's transaction deleted the cached profile"
    );

    // Two identical questions at once: one model call, the same answer.
    let question = json!({"question": "What is AI?"});
    let (first, second) = tokio::join!(
        http(addr, "POST", "/ask", "llm-1", Some(question.clone())),
        http(addr, "POST", "/ask", "llm-2", Some(question.clone())),
    );
    assert_eq!((first.0, second.0), (200, 200), "{first:?} {second:?}");
    assert_eq!(json_of(&first.1), json_of(&second.1));
    assert_eq!(state.llm_calls.load(Ordering::SeqCst), 1);

    // The rate limit: 3 questions a minute per client, the 4th refused.
    for _ in 0..3 {
        assert_eq!(
            http(addr, "POST", "/ask", "busy", Some(question.clone()))
                .await
                .0,
            200
        );
    }
    assert_eq!(
        http(addr, "POST", "/ask", "busy", Some(question.clone()))
            .await
            .0,
        429
    );
    assert_eq!(
        http(addr, "POST", "/ask", "calm", Some(question)).await.0,
        200,
        "other clients are not limited"
    );

    // Metrics: pgcache's counters, as Prometheus reads them.
    let (status, body) = http(addr, "GET", "/metrics", "a", None).await;
    assert_eq!(status, 200);
    for metric in [
        "pgcache_hits_total",
        "pgcache_misses_total",
        "pgcache_sets_total",
    ] {
        assert!(body.contains(metric), "no {metric} in {body}");
    }
    server.abort();
}
