\set k random(1, 10000000)
SELECT value, expires_at FROM cache_entries WHERE key = 'key:' || :k::text AND expires_at > statement_timestamp();
