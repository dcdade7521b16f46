-- pgcache: compressed and sealed payloads (compression and encryption at rest).
--
-- A payload pgcache compresses (over the compression threshold) or seals (with an
-- encryption key configured) is an envelope: a flags byte (compressed, sealed),
-- then, when sealed, the key id, the nonce and the ciphertext (see src/codec/).
-- Entries written before keep their columns as they were and still read.
--
-- * cache_entries: a JSON value as an envelope cannot stay JSONB; it goes to
--   `packed` (exactly one of value, bytes and packed is set, so a JSON entry is
--   still one whose `bytes` is NULL). A bytes value as an envelope stays in
--   `bytes`, with `bytes_packed` saying so: bytes written before have no header
--   to tell them apart.
-- * llm_response_cache: the response as an envelope goes to `packed` (exactly one
--   of response and packed is set).
-- * embedding_cache, vector_search_cache, audio_chunk_cache: sealed (never
--   compressed alone), the vector, the filters and results together, or the inline
--   audio go to `packed`.
--
-- Envelopes are compressed or encrypted already: PostgreSQL's own compression
-- (STORAGE EXTENDED) would only spend time on them, so `packed` is EXTERNAL.

ALTER TABLE cache_entries ADD COLUMN packed BYTEA;
ALTER TABLE cache_entries ALTER COLUMN packed SET STORAGE EXTERNAL;
ALTER TABLE cache_entries ADD COLUMN bytes_packed BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE cache_entries DROP CONSTRAINT cache_entries_one_payload;
ALTER TABLE cache_entries ADD CONSTRAINT cache_entries_one_payload CHECK (num_nonnulls(value, bytes, packed) = 1);
ALTER TABLE cache_entries ADD CONSTRAINT cache_entries_packed_bytes CHECK (NOT bytes_packed OR bytes IS NOT NULL);
COMMENT ON COLUMN cache_entries.packed IS 'Cached JSON value as a pgcache envelope (compressed and/or sealed JSON text); exactly one of value, bytes and packed is set.';
COMMENT ON COLUMN cache_entries.bytes_packed IS 'Whether bytes holds a pgcache envelope (compressed and/or sealed) rather than the bytes as written.';

ALTER TABLE llm_response_cache ADD COLUMN packed BYTEA;
ALTER TABLE llm_response_cache ALTER COLUMN packed SET STORAGE EXTERNAL;
ALTER TABLE llm_response_cache ALTER COLUMN response DROP NOT NULL;
ALTER TABLE llm_response_cache ADD CONSTRAINT llm_response_cache_one_payload CHECK (num_nonnulls(response, packed) = 1);
COMMENT ON COLUMN llm_response_cache.response IS 'The cached response text, when stored plain (exactly one of response and packed is set).';
COMMENT ON COLUMN llm_response_cache.packed IS 'The cached response as a pgcache envelope (compressed and/or sealed text), when not stored plain.';

ALTER TABLE embedding_cache ADD COLUMN packed BYTEA;
ALTER TABLE embedding_cache ALTER COLUMN packed SET STORAGE EXTERNAL;
ALTER TABLE embedding_cache ALTER COLUMN embedding DROP NOT NULL;
ALTER TABLE embedding_cache ADD CONSTRAINT embedding_cache_one_payload CHECK (num_nonnulls(embedding, packed) = 1);
COMMENT ON COLUMN embedding_cache.embedding IS 'The vector as little-endian IEEE-754 f32 components, 4 bytes each, when stored plain (exactly one of embedding and packed is set).';
COMMENT ON COLUMN embedding_cache.packed IS 'The vector as a pgcache envelope (sealed), when encryption is on.';

ALTER TABLE vector_search_cache ADD COLUMN packed BYTEA;
ALTER TABLE vector_search_cache ALTER COLUMN packed SET STORAGE EXTERNAL;
ALTER TABLE vector_search_cache ALTER COLUMN filters DROP NOT NULL;
ALTER TABLE vector_search_cache ALTER COLUMN results DROP NOT NULL;
ALTER TABLE vector_search_cache ADD CONSTRAINT vector_search_cache_one_payload
    CHECK (num_nonnulls(results, packed) = 1 AND (filters IS NULL) = (results IS NULL));
COMMENT ON COLUMN vector_search_cache.filters IS 'Search filters in canonical form (object keys sorted), when stored plain (with results).';
COMMENT ON COLUMN vector_search_cache.results IS 'The cached search results, when stored plain (exactly one of results and packed is set).';
COMMENT ON COLUMN vector_search_cache.packed IS 'Filters and results as a pgcache envelope (sealed JSON [filters, results]), when encryption is on.';

ALTER TABLE audio_chunk_cache ADD COLUMN packed BYTEA;
ALTER TABLE audio_chunk_cache ALTER COLUMN packed SET STORAGE EXTERNAL;
ALTER TABLE audio_chunk_cache DROP CONSTRAINT audio_chunk_cache_check;
ALTER TABLE audio_chunk_cache ADD CONSTRAINT audio_chunk_cache_one_payload CHECK (num_nonnulls(audio_data, packed, storage_path) = 1);
COMMENT ON COLUMN audio_chunk_cache.audio_data IS 'Audio bytes, when stored inline and plain (exactly one of audio_data, packed and storage_path is set).';
COMMENT ON COLUMN audio_chunk_cache.packed IS 'Inline audio as a pgcache envelope (sealed), when encryption is on.';

-- The near cache's trigger function, unchanged but for the branches of the caches
-- above: a changed envelope is a changed payload too.
CREATE OR REPLACE FUNCTION pgcache_near_invalidate() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
DECLARE
    changed TEXT[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO cache_changes (cache_name, keys) VALUES (TG_ARGV[0], NULL);
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' AND TG_ARGV[0] = 'kv' THEN
        SELECT array_agg(o.key) INTO changed FROM old_rows o
        WHERE o.expires_at > statement_timestamp();
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(encode(o.key_hash, 'hex')) INTO changed FROM old_rows o
        WHERE o.expires_at > statement_timestamp();
    ELSIF TG_ARGV[0] = 'kv' THEN
        -- A key only in new_rows appeared, one only in old_rows went: an update
        -- of the key itself, which moves the row from one key to another.
        SELECT array_agg(key) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key)
        WHERE CASE WHEN o.key IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key IS NULL THEN true
                   ELSE (o.value, o.bytes, o.packed, o.bytes_packed, o.tags, o.tag_generations) IS DISTINCT FROM (n.value, n.bytes, n.packed, n.bytes_packed, n.tags, n.tag_generations) OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'vector_search' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE (o.results, o.filters, o.top_k, o.user_id, o.packed) IS DISTINCT FROM (n.results, n.filters, n.top_k, n.user_id, n.packed) OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'embedding' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE (o.embedding, o.packed) IS DISTINCT FROM (n.embedding, n.packed) OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'llm_response' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE (o.response, o.packed) IS DISTINCT FROM (n.response, n.packed) OR n.expires_at < o.expires_at END;
    ELSIF TG_ARGV[0] = 'audio_chunk' THEN
        SELECT array_agg(encode(key_hash, 'hex')) INTO changed
        FROM old_rows o FULL JOIN new_rows n USING (key_hash)
        WHERE CASE WHEN o.key_hash IS NULL THEN true
                   WHEN o.expires_at <= statement_timestamp() THEN false
                   WHEN n.key_hash IS NULL THEN true
                   ELSE (o.audio_data, o.storage_path, o.packed) IS DISTINCT FROM (n.audio_data, n.storage_path, n.packed) OR n.expires_at < o.expires_at END;
    ELSE
        -- A cache this function does not know: everything.
        INSERT INTO cache_changes (cache_name, keys) VALUES (TG_ARGV[0], NULL);
        RETURN NULL;
    END IF;
    IF changed IS NOT NULL THEN
        INSERT INTO cache_changes (cache_name, keys) VALUES (TG_ARGV[0], changed);
    END IF;
    RETURN NULL;
END
$fn$;
