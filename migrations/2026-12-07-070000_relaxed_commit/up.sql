-- pgcache relaxed durability on an application's pool: a statement of pgcache's own
-- that carries the marker comment `/* pgcache: relaxed commit */` turns
-- `synchronous_commit` off for its transaction, so an autocommit write commits
-- without waiting for the disk in one round trip (no BEGIN, SET LOCAL, COMMIT),
-- and the application's session keeps its setting. Statements without the marker
-- (the application's, pgcache's inside the application's transactions) are
-- untouched. The WHEN condition is evaluated per statement, not per row.

CREATE FUNCTION pgcache_relaxed_commit() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN NULL;
END
$fn$;

-- Every table pgcache writes: the five caches, single flight's leases, the counters.
DO $do$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['cache_entries', 'embedding_cache', 'vector_search_cache',
        'llm_response_cache', 'audio_chunk_cache', 'cache_leases', 'cache_counters']
    LOOP
        EXECUTE format(
            'CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON %I '
            'FOR EACH STATEMENT '
            'WHEN (strpos(current_query(), ''/* pgcache: relaxed commit */'') > 0) '
            'EXECUTE FUNCTION pgcache_relaxed_commit()', t);
    END LOOP;
END
$do$;
