DROP FUNCTION IF EXISTS pgcache_near_invalidate() CASCADE;
DROP TABLE IF EXISTS cache_changes;
