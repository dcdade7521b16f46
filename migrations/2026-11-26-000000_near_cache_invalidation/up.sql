-- pgcache near cache: the invalidation trigger function.
--
-- Tables get their triggers only when a manager with a near cache for them starts
-- (src/near_triggers.rs), so a database without near caches pays nothing. Each
-- statement that changes rows sends ONE notification per ~7 kB of keys on the
-- channel 'pgcache.<schema>', delivered at commit (and never for a rollback):
--   '<cache> ["key", ...]'   keys as JSON strings (digests as hex)
--   '<cache> *'              everything (TRUNCATE)
-- Arguments: the cache's name, its key column, and the payload columns whose change
-- counts ('' for any change). Rows that had already expired are not named: no near
-- cache can hold them.
CREATE FUNCTION pgcache_near_invalidate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    channel text := left('pgcache.' || TG_TABLE_SCHEMA, 63);
    cache text := TG_ARGV[0];
    key_json text := CASE TG_ARGV[1]
        WHEN 'key_hash' THEN 'to_jsonb(encode(o.key_hash, ''hex''))::text'
        ELSE format('to_jsonb(o.%I)::text', TG_ARGV[1])
    END;
    changed text := coalesce(nullif(TG_ARGV[2], ''), '');
    source text;
    key text;
    batch text := '';
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify(channel, cache || ' *');
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        source := 'old_rows o';
    ELSIF changed = '' THEN
        source := format('old_rows o JOIN new_rows n USING (%I)', TG_ARGV[1]);
    ELSE
        source := format(
            'old_rows o JOIN new_rows n USING (%I) WHERE (%s) IS DISTINCT FROM (%s)',
            TG_ARGV[1],
            regexp_replace(changed, '(\w+)', 'o.\1', 'g'),
            regexp_replace(changed, '(\w+)', 'n.\1', 'g'));
    END IF;
    source := source || CASE WHEN position('WHERE' IN source) > 0 THEN ' AND ' ELSE ' WHERE ' END
        || 'o.expires_at > statement_timestamp()';
    FOR key IN EXECUTE format('SELECT %s FROM %s', key_json, source) LOOP
        IF length(batch) + length(key) > 7000 THEN
            PERFORM pg_notify(channel, cache || ' [' || batch || ']');
            batch := '';
        END IF;
        batch := batch || CASE WHEN batch = '' THEN '' ELSE ',' END || key;
    END LOOP;
    IF batch <> '' THEN
        PERFORM pg_notify(channel, cache || ' [' || batch || ']');
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION pgcache_near_invalidate() IS
    'pgcache near cache: notifies the keys a statement changed on channel pgcache.<schema>.';
