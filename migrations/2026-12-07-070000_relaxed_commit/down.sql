DROP TRIGGER pgcache_relaxed_commit ON cache_entries;
DROP TRIGGER pgcache_relaxed_commit ON embedding_cache;
DROP TRIGGER pgcache_relaxed_commit ON vector_search_cache;
DROP TRIGGER pgcache_relaxed_commit ON llm_response_cache;
DROP TRIGGER pgcache_relaxed_commit ON audio_chunk_cache;
DROP TRIGGER pgcache_relaxed_commit ON cache_leases;
DROP TRIGGER pgcache_relaxed_commit ON cache_counters;
DROP FUNCTION pgcache_relaxed_commit();
