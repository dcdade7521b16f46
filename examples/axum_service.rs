//! An axum service on the async face of the cache (feature `tokio`):
//!
//! - `GET /users/{id}`: a user's profile, cache-aside over the app's own table
//!   `user_profiles` (in `public`, on the app's own r2d2 pool, which the cache
//!   shares through `CacheManager::with_pool`);
//! - `PUT /users/{id}`: updates the profile and deletes its cached copy in the same
//!   transaction (`delete_in`): the invalidation commits or rolls back with the data;
//! - `POST /ask`: an LLM answer, cached, with async single flight (concurrent
//!   identical questions call the slow model once), rate limited per client
//!   (`x-client-id`) with `incr`: `429 Too Many Requests` past the limit per minute;
//! - `GET /metrics`: the cache's metrics (and any others) for Prometheus.
//!
//! ```text
//! cargo run --example axum_service --features tokio
//! curl -X PUT localhost:3000/users/1 -H 'content-type: application/json' -d '{"name":"Ada","email":"ada@example.com"}'
//! curl localhost:3000/users/1
//! curl -X POST localhost:3000/ask -H 'content-type: application/json' -d '{"question":"What is AI?"}'
//! curl localhost:3000/metrics
//! ```
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@localhost:5432/postgres`),
//! listens on `127.0.0.1:3000` unless `LISTEN` says otherwise.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Text};
use metrics_exporter_prometheus::PrometheusHandle;
use pgcache::{AsyncCacheManager, Cache, CacheConfig, CacheManager, LlmPrompt};
use serde::{Deserialize, Serialize};

/// The app's own pool.
pub type AppPool = Pool<ConnectionManager<PgConnection>>;

/// What every handler shares.
pub struct AppState {
    /// The app's pool (the cache shares it).
    pub db: AppPool,
    /// The cache, async face.
    pub cache: AsyncCacheManager,
    /// The metrics recorder's handle, for `/metrics`.
    pub metrics: PrometheusHandle,
    /// Requests to `/ask` a client may make per minute.
    pub asks_per_minute: i64,
    /// How often the fake model was called.
    pub llm_calls: AtomicUsize,
}

/// A user's profile, as stored and as cached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, QueryableByName)]
pub struct Profile {
    /// The user's id.
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// Display name.
    #[diesel(sql_type = Text)]
    pub name: String,
    /// Email address.
    #[diesel(sql_type = Text)]
    pub email: String,
}

/// The body of `PUT /users/{id}`.
#[derive(Debug, Deserialize)]
pub struct ProfileUpdate {
    name: String,
    email: String,
}

/// The body of `POST /ask`.
#[derive(Debug, Deserialize)]
pub struct Question {
    question: String,
}

/// The answer of `POST /ask`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    /// The model's answer.
    pub answer: String,
}

/// The cache key of user `id`'s profile. The version is part of it: a new profile
/// shape gets new keys instead of misreading old entries.
fn profile_key(id: i64) -> String {
    format!("user:{id}:profile:v1")
}

/// An error as a response: the cache's and the database's become `500`s.
pub struct AppError(StatusCode, String);

impl<E: std::fmt::Display> From<E> for AppError {
    fn from(error: E) -> Self {
        AppError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        tracing::warn!(status = %self.0, error = %self.1, "request failed");
        (self.0, self.1).into_response()
    }
}

/// Opens the app's pool, creates its table, and starts the cache on the same pool.
/// Blocking: call it before the runtime, or through `spawn_blocking`.
///
/// # Errors
/// When the database cannot be reached or the cache cannot start.
pub fn start(
    database_url: &str,
    asks_per_minute: i64,
    metrics: PrometheusHandle,
) -> Result<AppState, Box<dyn std::error::Error + Send + Sync>> {
    let db = Pool::builder()
        .max_size(8)
        .build(ConnectionManager::<PgConnection>::new(database_url))?;
    db.get()?.batch_execute(
        "CREATE TABLE IF NOT EXISTS public.user_profiles (
             id BIGINT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL)",
    )?;
    let config = CacheConfig::builder().database_url(database_url).build()?;
    let cache = CacheManager::with_pool(db.clone(), config)?.to_async();
    Ok(AppState {
        db,
        cache,
        metrics,
        asks_per_minute,
        llm_calls: AtomicUsize::new(0),
    })
}

/// The service's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/users/{id}", get(read_profile).put(update_profile))
        .route("/ask", post(ask))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Cache-aside: the cached profile, or the table's row (cached for five minutes).
/// Concurrent misses on one user read the table once.
#[tracing::instrument(skip(state))]
async fn read_profile(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
) -> Result<Json<Profile>, AppError> {
    let profiles = state.cache.kv().typed::<Option<Profile>>();
    let found = profiles
        .get_or_set(&profile_key(id), Duration::from_secs(300), || async {
            let db = state.db.clone();
            // The app's own query has no async form: off the async threads.
            tokio::task::spawn_blocking(move || -> Result<Option<Profile>, AppError> {
                Ok(diesel::sql_query(
                    "SELECT id, name, email FROM public.user_profiles WHERE id = $1",
                )
                .bind::<BigInt, _>(id)
                .get_result::<Profile>(&mut db.get()?)
                .optional()?)
            })
            .await?
        })
        .await?;
    found
        .map(Json)
        .ok_or_else(|| AppError(StatusCode::NOT_FOUND, format!("no user {id}")))
}

/// Writes the profile and invalidates its cached copy in one transaction.
#[tracing::instrument(skip(state, update))]
async fn update_profile(
    State(state): State<Arc<AppState>>,
    Path(id): Path<i64>,
    Json(update): Json<ProfileUpdate>,
) -> Result<Json<Profile>, AppError> {
    let profile = Profile {
        id,
        name: update.name,
        email: update.email,
    };
    let stored = profile.clone();
    // `delete_in` runs on the app's connection: a blocking call, through `run`.
    let db = state.db.clone();
    state
        .cache
        .run(move |cache| -> Result<(), AppError> {
            let mut pooled = db.get()?;
            let conn: &mut PgConnection = &mut pooled;
            conn.transaction(|conn| {
                diesel::sql_query(
                    "INSERT INTO public.user_profiles (id, name, email) VALUES ($1, $2, $3)
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email",
                )
                .bind::<BigInt, _>(stored.id)
                .bind::<Text, _>(&stored.name)
                .bind::<Text, _>(&stored.email)
                .execute(conn)?;
                cache
                    .kv()
                    .delete_in(conn, &profile_key(stored.id))
                    .map_err(AppError::from)?;
                Ok::<_, AppError>(())
            })
        })
        .await?;
    Ok(Json(profile))
}

/// Counts a client's request in this minute's window; false past the limit.
async fn within_limit(state: &AppState, client: &str) -> Result<bool, AppError> {
    let minute = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60;
    let count = state
        .cache
        .kv()
        .incr(
            &format!("rate:ask:{client}:{minute}"),
            1,
            Duration::from_secs(60),
        )
        .await?;
    Ok(count <= state.asks_per_minute)
}

/// A fake LLM: slow, and counts its calls.
async fn call_llm(state: &AppState, question: &str) -> String {
    state.llm_calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    format!("An answer to {question:?}.")
}

/// The model's answer, cached; one call per question however many ask at once.
#[tracing::instrument(skip(state, headers, question))]
async fn ask(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(question): Json<Question>,
) -> Result<Json<Answer>, AppError> {
    let client = headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous");
    if !within_limit(&state, client).await? {
        return Err(AppError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many questions this minute".into(),
        ));
    }
    let prompt = LlmPrompt::new(question.question.as_str(), "fake-llm");
    let answer = state
        .cache
        .llm_response()
        .get_or_compute(&prompt, || async {
            Ok::<_, AppError>(call_llm(&state, &question.question).await)
        })
        .await?;
    Ok(Json(Answer { answer }))
}

/// Prometheus's text format.
async fn metrics(State(state): State<Arc<AppState>>) -> String {
    state.metrics.render()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt().init();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| pgcache::DEFAULT_DATABASE_URL.to_owned());
    let state = tokio::task::spawn_blocking(move || start(&url, 10, metrics)).await??;
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "serving");
    axum::serve(listener, router(Arc::new(state))).await?;
    Ok(())
}
