DO $do$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['cache_entries', 'embedding_cache', 'vector_search_cache',
        'llm_response_cache', 'audio_chunk_cache', 'cache_leases', 'cache_counters']
    LOOP
        EXECUTE format('DROP TRIGGER pgcache_relaxed_commit ON %I', t);
    END LOOP;
END
$do$;
DROP FUNCTION pgcache_relaxed_commit();
