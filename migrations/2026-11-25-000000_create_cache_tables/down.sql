DROP TABLE cache_leases;
DROP TABLE cache_cleanup_runs;
DROP TABLE cache_counters;
DROP TABLE audio_chunk_cache;
DROP TABLE llm_response_cache;
DROP TABLE vector_search_cache;
DROP TABLE embedding_cache;
DROP TABLE cache_entries;
