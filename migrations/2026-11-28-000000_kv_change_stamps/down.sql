ALTER TABLE cache_entries DROP COLUMN changed_xid;
