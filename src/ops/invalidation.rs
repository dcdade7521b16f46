//! "Forget this user" and "retire this model" across the AI caches.

use diesel::prelude::*;
use uuid::Uuid;

use crate::caches::common::check_name;
use crate::caches::{audio_chunk, embedding, llm_response, vector_search};
use crate::cluster::Cluster;
use crate::engine::Engine;
use crate::error::Result;
use crate::kind::CacheKind;

/// What [`CacheManager::invalidate_user`](crate::CacheManager::invalidate_user) removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct InvalidationReport {
    /// Embeddings owned by the user.
    pub embeddings: u64,
    /// The user's cached vector searches.
    pub vector_searches: u64,
    /// LLM responses owned by the user.
    pub llm_responses: u64,
    /// Audio chunks owned by the user.
    pub audio_chunks: u64,
    /// Storage paths of the removed audio chunks: the caller deletes those files.
    pub released_paths: Vec<String>,
}

impl InvalidationReport {
    /// Rows removed over every cache.
    pub fn total(&self) -> u64 {
        self.embeddings + self.vector_searches + self.llm_responses + self.audio_chunks
    }
}

/// Another shard's removals added in: the sums.
impl std::ops::AddAssign for InvalidationReport {
    fn add_assign(&mut self, other: InvalidationReport) {
        add_counts!(self, other; embeddings, vector_searches, llm_responses, audio_chunks);
        self.released_paths.extend(other.released_paths);
    }
}

impl std::iter::Sum for InvalidationReport {
    fn sum<I: Iterator<Item = InvalidationReport>>(reports: I) -> InvalidationReport {
        reports.fold(InvalidationReport::default(), |mut all, report| {
            all += report;
            all
        })
    }
}

/// [`CacheManager::invalidate_user`](crate::CacheManager::invalidate_user): every
/// shard at once (a user's entries are spread by key), each in one transaction.
pub(crate) fn invalidate_user(cluster: &Cluster, user: Uuid) -> Result<InvalidationReport> {
    let reports = cluster.all(|engine| invalidate_user_on(engine, user))?;
    Ok(reports.into_iter().sum())
}

fn invalidate_user_on(engine: &Engine, user: Uuid) -> Result<InvalidationReport> {
    if !engine.is_enabled() {
        return Ok(InvalidationReport::default());
    }
    let tables = engine.tables();
    engine.maintain(|conn| {
        Ok(conn.transaction(|conn| {
            let audio = audio_chunk::delete_owner(conn, tables.of(CacheKind::AudioChunk), user)?;
            QueryResult::Ok(InvalidationReport {
                embeddings: embedding::delete_owner(conn, tables.of(CacheKind::Embedding), user)?
                    as u64,
                vector_searches: vector_search::delete_owner(
                    conn,
                    tables.of(CacheKind::VectorSearch),
                    user,
                )? as u64,
                llm_responses: llm_response::delete_owner(
                    conn,
                    tables.of(CacheKind::LlmResponse),
                    user,
                )? as u64,
                audio_chunks: audio.len() as u64,
                released_paths: audio.into_iter().flatten().collect(),
            })
        })?)
    })
}

/// [`CacheManager::invalidate_model`](crate::CacheManager::invalidate_model): every
/// shard at once.
pub(crate) fn invalidate_model(cluster: &Cluster, model: &str) -> Result<u64> {
    check_name("model", model)?;
    let removed = cluster.all(|engine| {
        if !engine.is_enabled() {
            return Ok(0);
        }
        let table = engine.tables().of(CacheKind::Embedding);
        engine.maintain(|conn| Ok(embedding::delete_model(conn, table, model)? as u64))
    })?;
    Ok(removed.into_iter().sum())
}
