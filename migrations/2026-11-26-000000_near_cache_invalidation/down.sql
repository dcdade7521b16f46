DROP FUNCTION IF EXISTS pgcache_near_invalidate() CASCADE;
