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

CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON cache_entries
    FOR EACH STATEMENT WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0)
    EXECUTE FUNCTION pgcache_relaxed_commit();
CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON embedding_cache
    FOR EACH STATEMENT WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0)
    EXECUTE FUNCTION pgcache_relaxed_commit();
CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON vector_search_cache
    FOR EACH STATEMENT WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0)
    EXECUTE FUNCTION pgcache_relaxed_commit();
CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON llm_response_cache
    FOR EACH STATEMENT WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0)
    EXECUTE FUNCTION pgcache_relaxed_commit();
CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON audio_chunk_cache
    FOR EACH STATEMENT WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0)
    EXECUTE FUNCTION pgcache_relaxed_commit();
CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON cache_leases
    FOR EACH STATEMENT WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0)
    EXECUTE FUNCTION pgcache_relaxed_commit();
CREATE TRIGGER pgcache_relaxed_commit BEFORE INSERT OR UPDATE OR DELETE ON cache_counters
    FOR EACH STATEMENT WHEN (strpos(current_query(), '/* pgcache: relaxed commit */') > 0)
    EXECUTE FUNCTION pgcache_relaxed_commit();
