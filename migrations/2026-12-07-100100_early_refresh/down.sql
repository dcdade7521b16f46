DO $do$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['cache_entries', 'embedding_cache', 'vector_search_cache',
        'llm_response_cache', 'audio_chunk_cache']
    LOOP
        EXECUTE format('ALTER TABLE %I DROP COLUMN fresh_until, DROP COLUMN fresh_expiry, '
            'DROP COLUMN compute_us', t);
    END LOOP;
END
$do$;
