-- Envelopes cannot be read without pgcache's codec: they are cache entries, so
-- dropping them is a miss, not a loss.
DELETE FROM cache_entries WHERE packed IS NOT NULL OR bytes_packed;
ALTER TABLE cache_entries DROP CONSTRAINT cache_entries_packed_bytes;
ALTER TABLE cache_entries DROP CONSTRAINT cache_entries_one_payload;
ALTER TABLE cache_entries DROP COLUMN bytes_packed;
ALTER TABLE cache_entries DROP COLUMN packed;
ALTER TABLE cache_entries ADD CONSTRAINT cache_entries_one_payload CHECK (num_nonnulls(value, bytes) = 1);
COMMENT ON COLUMN cache_entries.value IS 'Cached value as JSONB, serialized from any serde type (exactly one of value and bytes is set).';
COMMENT ON COLUMN cache_entries.bytes IS 'Cached value as opaque bytes, returned exactly as written (exactly one of value and bytes is set).';

DELETE FROM llm_response_cache WHERE packed IS NOT NULL;
ALTER TABLE llm_response_cache DROP CONSTRAINT llm_response_cache_one_payload;
ALTER TABLE llm_response_cache DROP COLUMN packed;
ALTER TABLE llm_response_cache ALTER COLUMN response SET NOT NULL;
COMMENT ON COLUMN llm_response_cache.response IS 'The cached response text.';

DELETE FROM embedding_cache WHERE packed IS NOT NULL;
ALTER TABLE embedding_cache DROP CONSTRAINT embedding_cache_one_payload;
ALTER TABLE embedding_cache DROP COLUMN packed;
ALTER TABLE embedding_cache ALTER COLUMN embedding SET NOT NULL;
COMMENT ON COLUMN embedding_cache.embedding IS 'The vector as little-endian IEEE-754 f32 components, 4 bytes each.';

DELETE FROM vector_search_cache WHERE packed IS NOT NULL;
ALTER TABLE vector_search_cache DROP CONSTRAINT vector_search_cache_one_payload;
ALTER TABLE vector_search_cache DROP COLUMN packed;
ALTER TABLE vector_search_cache ALTER COLUMN filters SET NOT NULL;
ALTER TABLE vector_search_cache ALTER COLUMN results SET NOT NULL;
COMMENT ON COLUMN vector_search_cache.filters IS 'Search filters in canonical form (object keys sorted).';
COMMENT ON COLUMN vector_search_cache.results IS 'The cached search results.';

DELETE FROM audio_chunk_cache WHERE packed IS NOT NULL;
ALTER TABLE audio_chunk_cache DROP CONSTRAINT audio_chunk_cache_one_payload;
ALTER TABLE audio_chunk_cache DROP COLUMN packed;
ALTER TABLE audio_chunk_cache ADD CONSTRAINT audio_chunk_cache_check CHECK ((audio_data IS NULL) <> (storage_path IS NULL));
COMMENT ON COLUMN audio_chunk_cache.audio_data IS 'Audio bytes, when stored inline (exactly one of audio_data and storage_path is set).';

-- The near cache's trigger function as the previous migration created it.
CREATE OR REPLACE FUNCTION pgcache_near_invalidate() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    changed TEXT[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO cache_changes (cache_name, keys) VALUES (TG_ARGV[0], NULL);
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' AND TG_ARGV[0] = 'kv' THEN
        SELECT array_agg(o.key) INTO changed FROM old_rows o
        WHERE o.expires_at > statement_timestamp();
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed FROM old_rows o
        WHERE o.expires_at > statement_timestamp();
    ELSIF TG_ARGV[0] = 'kv' THEN
        -- A key only in new_rows appeared, one only in old_rows went: an update
        -- of the key itself, which moves the row from one key to another.
        SELECT array_agg(key) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key)
        WHERE CASE WHEN o.key IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key IS NULL THEN true
                   ELSE (o.value, o.bytes, o.tags, o.tag_generations) IS DISTINCT FROM (n.value, n.bytes, n.tags, n.tag_generations)
                        OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'vector_search' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE (o.results, o.filters, o.top_k, o.user_id) IS DISTINCT FROM (n.results, n.filters, n.top_k, n.user_id) OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'embedding' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE o.embedding IS DISTINCT FROM n.embedding OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'llm_response' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE o.response IS DISTINCT FROM n.response OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'audio_chunk' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE (o.audio_data, o.storage_path) IS DISTINCT FROM (n.audio_data, n.storage_path) OR n.expires_at < o.expires_at END;
    ELSE
        -- A cache this function does not know: everything.
        INSERT INTO cache_changes (cache_name, keys) VALUES (TG_ARGV[0], NULL);
        RETURN NULL;
    END IF;
    IF changed IS NOT NULL THEN
        INSERT INTO cache_changes (cache_name, keys) VALUES (TG_ARGV[0], changed);
    END IF;
    RETURN NULL;
END
$fn$;
