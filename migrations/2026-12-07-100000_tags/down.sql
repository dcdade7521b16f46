-- Tagged entries go first: without their tags they would outlive an invalidation.
-- They are cache entries, so dropping them is a miss, not a loss.
DELETE FROM cache_entries WHERE tags IS NOT NULL;
ALTER TABLE cache_entries DROP COLUMN tags, DROP COLUMN tag_generations;
DROP TABLE cache_tags;
DROP FUNCTION pgcache_tags_changed();

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
                   ELSE (o.value, o.bytes) IS DISTINCT FROM (n.value, n.bytes) OR n.expires_at < o.expires_at END;
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
