-- The near cache's trigger function as the previous migration created it (an
-- update that changes a key logs neither the old key nor the new one).
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
        SELECT array_agg(o.key) INTO changed
        FROM old_rows o JOIN new_rows n USING (key)
        WHERE o.expires_at > statement_timestamp()
          AND ((o.value, o.bytes) IS DISTINCT FROM (n.value, n.bytes) OR n.expires_at < o.expires_at);
    ELSIF TG_ARGV[0] = 'vector_search' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed
        FROM old_rows o JOIN new_rows n USING (key_hash)
        WHERE o.expires_at > statement_timestamp()
          AND ((o.results, o.filters, o.top_k, o.user_id) IS DISTINCT FROM (n.results, n.filters, n.top_k, n.user_id)
               OR n.expires_at < o.expires_at);
    ELSIF TG_ARGV[0] = 'embedding' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed
        FROM old_rows o JOIN new_rows n USING (key_hash)
        WHERE o.expires_at > statement_timestamp()
          AND (o.embedding IS DISTINCT FROM n.embedding OR n.expires_at < o.expires_at);
    ELSIF TG_ARGV[0] = 'llm_response' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed
        FROM old_rows o JOIN new_rows n USING (key_hash)
        WHERE o.expires_at > statement_timestamp()
          AND (o.response IS DISTINCT FROM n.response OR n.expires_at < o.expires_at);
    ELSIF TG_ARGV[0] = 'audio_chunk' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed
        FROM old_rows o JOIN new_rows n USING (key_hash)
        WHERE o.expires_at > statement_timestamp()
          AND ((o.audio_data, o.storage_path) IS DISTINCT FROM (n.audio_data, n.storage_path)
               OR n.expires_at < o.expires_at);
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
