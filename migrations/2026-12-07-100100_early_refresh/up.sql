-- pgcache: early refresh in get_or_compute (stale-while-revalidate and XFetch).
--
-- What every process must see to decide whether an entry is due for a refresh,
-- beside the entry itself so the read that finds it reads them too: when the value
-- stops being fresh, and how long its last computation took. Nullable, no
-- default: adding them rewrites nothing, and rows written by a plain set (or
-- before this migration) have none. `fresh_until` counts only while `expires_at`
-- still equals `fresh_expiry`, the expiry it was written with: any later write or
-- touch of the row changes `expires_at` and so voids it without having to clear
-- it. On a hash-partitioned table the columns reach every partition.

DO $do$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['cache_entries', 'embedding_cache', 'vector_search_cache',
        'llm_response_cache', 'audio_chunk_cache']
    LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN fresh_until TIMESTAMPTZ, '
            'ADD COLUMN fresh_expiry TIMESTAMPTZ, ADD COLUMN compute_us BIGINT', t);
        EXECUTE format('COMMENT ON COLUMN %I.fresh_until IS %L', t,
            'When the value get_or_compute wrote stops being fresh (later, up to expires_at, it is served stale while one caller recomputes); void unless expires_at = fresh_expiry.');
        EXECUTE format('COMMENT ON COLUMN %I.fresh_expiry IS %L', t,
            'The expires_at fresh_until was written with: a later write or touch of the row voids fresh_until.');
        EXECUTE format('COMMENT ON COLUMN %I.compute_us IS %L', t,
            'How long the last get_or_compute computation of this key took, in microseconds (the delta of early recomputation).');
    END LOOP;
END
$do$;
