-- pgcache: exact values in the key/value cache.
--
-- A kv entry holds either JSONB (`value`: normalised by PostgreSQL, queryable with
-- @>) or opaque bytes (`bytes`: stored and returned byte for byte), never both, in
-- the same table so expiry, cleanup, eviction, deletes, invalidation, statistics
-- and the near cache's change log treat both alike.

ALTER TABLE cache_entries ADD COLUMN bytes BYTEA;
ALTER TABLE cache_entries ALTER COLUMN value DROP NOT NULL;
ALTER TABLE cache_entries ADD CONSTRAINT cache_entries_one_payload CHECK (num_nonnulls(value, bytes) = 1);
COMMENT ON COLUMN cache_entries.value IS 'Cached value as JSONB, serialized from any serde type (exactly one of value and bytes is set).';
COMMENT ON COLUMN cache_entries.bytes IS 'Cached value as opaque bytes, returned exactly as written (exactly one of value and bytes is set).';

-- The near cache's trigger function, unchanged but for the kv branch: a changed
-- bytes payload is a change too.
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
