-- pgcache near cache: the change log its listeners poll, and the trigger that
-- writes it.
--
-- A statement that changes live rows of a cache table with a near cache (triggers
-- are installed only when a manager with a near cache for the table starts, see
-- src/migrations.rs) appends ONE row naming the changed keys, in its own
-- transaction: nothing is visible for a rollback, and no cluster-wide lock is taken
-- (NOTIFY would serialise every writer's commit, WAL flush included).
-- Listeners poll `xid >= <xmin of their previous poll's snapshot>`, which finds
-- every change committed since that poll whatever order the transactions took ids
-- in. Unlogged: after a crash every near cache starts empty anyway.
CREATE UNLOGGED TABLE cache_changes (
    id         BIGSERIAL PRIMARY KEY,
    -- The writer's transaction id (xid8, as a number).
    xid        BIGINT NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    cache_name TEXT NOT NULL,
    -- The changed keys (digests as hex); NULL for every entry (TRUNCATE).
    keys       TEXT[],
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX cache_changes_xid_idx ON cache_changes (xid);
COMMENT ON TABLE cache_changes IS 'pgcache near cache: keys changed per statement, polled by near-cache listeners and kept a minute.';

-- Arguments: the cache's name. Rows that had already expired are not named: no near
-- cache can hold them. For the AI caches (keyed by a digest of their inputs) an
-- overwrite that writes the same payload again, and hit counting, name nothing.
CREATE FUNCTION pgcache_near_invalidate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    changed TEXT[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO cache_changes (cache_name, keys) VALUES (TG_ARGV[0], NULL);
        RETURN NULL;
    END IF;
    IF TG_ARGV[0] = 'kv' THEN
        SELECT array_agg(o.key) INTO changed FROM old_rows o
        WHERE o.expires_at > statement_timestamp();
    ELSIF TG_OP = 'DELETE' OR TG_ARGV[0] = 'vector_search' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed FROM old_rows o
        WHERE o.expires_at > statement_timestamp();
    ELSIF TG_ARGV[0] = 'embedding' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed
        FROM old_rows o JOIN new_rows n USING (key_hash)
        WHERE o.expires_at > statement_timestamp() AND o.embedding IS DISTINCT FROM n.embedding;
    ELSIF TG_ARGV[0] = 'llm_response' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed
        FROM old_rows o JOIN new_rows n USING (key_hash)
        WHERE o.expires_at > statement_timestamp() AND o.response IS DISTINCT FROM n.response;
    ELSIF TG_ARGV[0] = 'audio_chunk' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed
        FROM old_rows o JOIN new_rows n USING (key_hash)
        WHERE o.expires_at > statement_timestamp()
          AND (o.audio_data, o.storage_path) IS DISTINCT FROM (n.audio_data, n.storage_path);
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
COMMENT ON FUNCTION pgcache_near_invalidate() IS
    'pgcache near cache: logs the keys a statement changed in cache_changes.';
