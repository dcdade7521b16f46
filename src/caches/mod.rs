//! One module per cache table. Each holds the table's storage code (functions on a
//! `&mut PgConnection` returning `QueryResult`) and the public handle that implements
//! [`Cache`](crate::Cache) on top of it.

/// Writes a key type's `owned_by` builder: the same key, owned by a user (the `owner`
/// field). `$what` names the key in the doc comment ("key", "prompt").
macro_rules! owned_by_builder {
    ($what:literal) => {
        #[doc = concat!("The same ", $what, ", owned by `user`.")]
        #[must_use]
        pub fn owned_by(mut self, user: ::uuid::Uuid) -> Self {
            self.owner = Some(user);
            self
        }
    };
}

pub(crate) mod audio_chunk;
pub(crate) mod common;
pub(crate) mod embedding;
pub(crate) mod kv;
pub(crate) mod llm_response;
pub(crate) mod vector_search;

pub use audio_chunk::{
    AudioChunk, AudioChunkCache, AudioChunkKey, AudioChunkTable, AudioData, CachedAudioChunk,
    DEFAULT_MAX_AUDIO_TEXT_CHARS, MAX_AUDIO_BYTES,
};
pub use embedding::{CachedEmbedding, EmbeddingCache, EmbeddingKey, EmbeddingTable};
pub use kv::KvCache;
pub use llm_response::{CachedLlmResponse, LlmPrompt, LlmResponseCache, LlmResponseTable};
pub use vector_search::{
    CachedVectorSearch, VectorSearchCache, VectorSearchQuery, VectorSearchTable,
};
