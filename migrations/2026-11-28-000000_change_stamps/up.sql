-- pgcache near cache: pgcache's own updates stamp the rows they change instead of
-- going through the update trigger.
--
-- An update of a cache table made by a pgcache connection of a manager with a near
-- cache (session setting `pgcache.stamps_changes` on, which the update triggers'
-- WHEN skips, see src/migrations.rs) sets `changed_xid` to its transaction id on
-- the rows whose cached content it changed. Pollers read the rows whose stamp falls
-- in their window through the partial index, next to `cache_changes`: the same
-- window rule, one index entry per changed row instead of a trigger, a second row
-- and its index entry per statement (which cost a quarter of a relaxed-durability
-- write). Every other update goes through the trigger and keeps the stamp (one no
-- poller has read yet must survive an update the trigger does not log); a row never
-- stamped stays NULL, out of the index. Deletes and TRUNCATE always go through the
-- triggers.
ALTER TABLE cache_entries ADD COLUMN changed_xid BIGINT;
ALTER TABLE embedding_cache ADD COLUMN changed_xid BIGINT;
ALTER TABLE vector_search_cache ADD COLUMN changed_xid BIGINT;
ALTER TABLE llm_response_cache ADD COLUMN changed_xid BIGINT;
ALTER TABLE audio_chunk_cache ADD COLUMN changed_xid BIGINT;
CREATE INDEX cache_entries_changed_xid_idx ON cache_entries (changed_xid) WHERE changed_xid IS NOT NULL;
CREATE INDEX embedding_cache_changed_xid_idx ON embedding_cache (changed_xid) WHERE changed_xid IS NOT NULL;
CREATE INDEX vector_search_cache_changed_xid_idx ON vector_search_cache (changed_xid) WHERE changed_xid IS NOT NULL;
CREATE INDEX llm_response_cache_changed_xid_idx ON llm_response_cache (changed_xid) WHERE changed_xid IS NOT NULL;
CREATE INDEX audio_chunk_cache_changed_xid_idx ON audio_chunk_cache (changed_xid) WHERE changed_xid IS NOT NULL;
COMMENT ON COLUMN cache_entries.changed_xid IS 'pgcache near cache: the transaction id (xid8 as a number) of the last update by a pgcache connection with near caches that changed the entry; NULL if none ever did.';
COMMENT ON COLUMN embedding_cache.changed_xid IS 'pgcache near cache: the transaction id (xid8 as a number) of the last update by a pgcache connection with near caches that changed the entry; NULL if none ever did.';
COMMENT ON COLUMN vector_search_cache.changed_xid IS 'pgcache near cache: the transaction id (xid8 as a number) of the last update by a pgcache connection with near caches that changed the entry; NULL if none ever did.';
COMMENT ON COLUMN llm_response_cache.changed_xid IS 'pgcache near cache: the transaction id (xid8 as a number) of the last update by a pgcache connection with near caches that changed the entry; NULL if none ever did.';
COMMENT ON COLUMN audio_chunk_cache.changed_xid IS 'pgcache near cache: the transaction id (xid8 as a number) of the last update by a pgcache connection with near caches that changed the entry; NULL if none ever did.';
