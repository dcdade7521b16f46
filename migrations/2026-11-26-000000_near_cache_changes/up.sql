-- pgcache near cache: the change log its listeners poll, and the trigger that
-- writes it.
--
-- A statement that changes live rows of a cache table with a near cache (triggers
-- are installed only when a manager with a near cache for the table starts, see
-- src/migrations.rs) appends ONE row naming the changed keys, in its own
-- transaction: nothing is visible for a rollback, and no cluster-wide lock is taken
-- (NOTIFY would serialise every writer's commit, WAL flush included).
-- A poller asks for the rows of every transaction that was running at its previous
-- poll's snapshot or took its id after it, which finds every change committed since
-- that poll whatever order the transactions committed in. Unlogged: after a crash
-- every near cache starts empty anyway.
CREATE UNLOGGED TABLE cache_changes (
    -- The writer's transaction id (xid8, as a number): what polls and pruning find
    -- rows by, through the one index.
    xid        BIGINT NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    cache_name TEXT NOT NULL,
    -- The changed keys (digests as hex); NULL for every entry (TRUNCATE).
    keys       TEXT[],
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX cache_changes_xid_idx ON cache_changes (xid);
COMMENT ON TABLE cache_changes IS 'pgcache near cache: keys changed per statement, polled by near-cache pollers and kept a few seconds.';

-- Arguments: the cache's name. Named: the live rows a statement deleted, and the
-- live rows it updated whose payload changed or whose expiry came earlier (an
-- overwrite with the same value and a later expiry changes nothing a near cache
-- holds; the AI caches, keyed by a digest of their inputs, normally write the same
-- payload again, and hit counting changes neither). Rows that had already expired
-- are never named: no near cache can hold them. The function runs with the
-- search_path it was created with, so it logs into its own schema's table whatever
-- the writer's search_path.
CREATE FUNCTION pgcache_near_invalidate() RETURNS trigger
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
          AND (o.value IS DISTINCT FROM n.value OR n.expires_at < o.expires_at);
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
COMMENT ON FUNCTION pgcache_near_invalidate() IS
    'pgcache near cache: logs the keys a statement changed in cache_changes.';
