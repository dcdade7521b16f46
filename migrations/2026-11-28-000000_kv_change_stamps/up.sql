-- pgcache near cache: the key/value cache's own updates stamp the row instead of
-- writing a change-log row.
--
-- An update of cache_entries made by a pgcache connection with a key/value near
-- cache (session setting `pgcache.kv_self_logged` on; the update trigger skips
-- those statements) sets `changed_xid` to its transaction id. Pollers read the rows
-- whose stamp falls in their window through the partial index, next to
-- `cache_changes`: the same window rule, one index entry per update instead of a
-- second row, index entry and CTE per statement (which cost a quarter of a
-- relaxed-durability write). Every other update goes through the trigger and keeps
-- the stamp (one no poller has read yet must survive an update the trigger does
-- not log); a row never stamped stays NULL, out of the index. Deletes and TRUNCATE
-- always go through the trigger.
ALTER TABLE cache_entries ADD COLUMN changed_xid BIGINT;
CREATE INDEX cache_entries_changed_xid_idx ON cache_entries (changed_xid) WHERE changed_xid IS NOT NULL;
COMMENT ON COLUMN cache_entries.changed_xid IS 'pgcache near cache: the transaction id (xid8 as a number) of the last update made by a pgcache connection with a key/value near cache, NULL otherwise.';
