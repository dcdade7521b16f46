ALTER TABLE cache_entries DROP COLUMN changed_xid;
ALTER TABLE embedding_cache DROP COLUMN changed_xid;
ALTER TABLE vector_search_cache DROP COLUMN changed_xid;
ALTER TABLE llm_response_cache DROP COLUMN changed_xid;
ALTER TABLE audio_chunk_cache DROP COLUMN changed_xid;
