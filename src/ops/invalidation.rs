//! "Forget this user" and "retire this model" across the AI caches.

use diesel::prelude::*;
use uuid::Uuid;

use crate::caches::common::check_name;
use crate::caches::{audio_chunk, embedding, llm_response, vector_search};
use crate::error::Result;
use crate::manager::CacheManager;

/// What [`CacheManager::invalidate_user`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

impl CacheManager {
    /// Deletes every cache row that belongs to `user`: their vector searches and the
    /// embeddings, LLM responses and audio chunks owned by them. One indexed delete
    /// per table, all in one transaction. Unlike reads and writes, this never fails
    /// open: forgetting a user must not be skipped silently. With caching disabled
    /// there is nothing to delete.
    ///
    /// # Errors
    /// A connection or database error; then nothing was deleted.
    pub fn invalidate_user(&self, user: Uuid) -> Result<InvalidationReport> {
        if !self.is_enabled() {
            return Ok(InvalidationReport::default());
        }
        self.maintain(|conn| {
            Ok(conn.transaction(|conn| {
                let audio = audio_chunk::delete_owner(conn, user)?;
                QueryResult::Ok(InvalidationReport {
                    embeddings: embedding::delete_owner(conn, user)? as u64,
                    vector_searches: vector_search::delete_owner(conn, user)? as u64,
                    llm_responses: llm_response::delete_owner(conn, user)? as u64,
                    audio_chunks: audio.len() as u64,
                    released_paths: audio.into_iter().flatten().collect(),
                })
            })?)
        })
    }

    /// Deletes every cached embedding of `model` (a retired embedding model); returns
    /// the rows removed. Never fails open, like [`invalidate_user`](Self::invalidate_user).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for an empty model or one
    /// with a NUL character; a connection or database error.
    pub fn invalidate_model(&self, model: &str) -> Result<u64> {
        check_name("model", model)?;
        if !self.is_enabled() {
            return Ok(0);
        }
        self.maintain(|conn| Ok(embedding::delete_model(conn, model)? as u64))
    }
}
