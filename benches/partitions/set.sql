\set k random(1, 10000000)
\set v random(1, 1000000000)
INSERT INTO cache_entries (key, value, expires_at) VALUES ('key:' || :k::text, jsonb_build_object('v', :v::int), statement_timestamp() + interval '1 hour') ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at;
