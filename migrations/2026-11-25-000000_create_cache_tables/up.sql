-- pgcache: every cache table, designed once.
--
-- Shared rules (see the crate docs, "Schema"):
-- * Each row is found by a unique key. Free text is never indexed raw: the AI caches
--   index a 32-byte SHA-256 digest, and key/value keys are capped at 1024 bytes.
-- * Writes are upserts (INSERT ... ON CONFLICT DO UPDATE), so concurrent sets of one
--   key can never leave two rows.
-- * Expiry is judged by the database clock (now()), so every process agrees; readers
--   filter on expires_at > now(), cleanup deletes the rest. expires_at is indexed
--   (a plain index: a partial index on now() is invalid because now() is not immutable).
-- * Hit counters and last access are deliberately NOT indexed, and the tables keep
--   free space on each page (fillfactor), so counting a hit is a HOT update that
--   touches no index. Autovacuum runs earlier than the default on these high-churn
--   tables so dead rows from overwrites and cleanup are reclaimed quickly.

CREATE TABLE cache_entries (
    key        TEXT COLLATE "C" PRIMARY KEY CHECK (octet_length(key) BETWEEN 1 AND 1024),
    value      JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
CREATE INDEX cache_entries_expires_at_idx ON cache_entries (expires_at);
COMMENT ON TABLE cache_entries IS 'pgcache key/value cache (the Redis GET/SET/DEL replacement).';
COMMENT ON COLUMN cache_entries.key IS 'Caller''s key, 1 to 1024 bytes, C collation so prefix deletes are index range scans.';
COMMENT ON COLUMN cache_entries.value IS 'Cached value, serialized from any serde type.';
COMMENT ON COLUMN cache_entries.created_at IS 'When the value was last written.';
COMMENT ON COLUMN cache_entries.expires_at IS 'Database time after which the entry reads as a miss and cleanup may delete it.';

CREATE TABLE embedding_cache (
    key_hash    BYTEA PRIMARY KEY CHECK (octet_length(key_hash) = 32),
    model       TEXT NOT NULL,
    dimensions  INTEGER NOT NULL CHECK (dimensions > 0),
    embedding   BYTEA NOT NULL CHECK (octet_length(embedding) = 4 * dimensions),
    owner_id    UUID,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
CREATE INDEX embedding_cache_expires_at_idx ON embedding_cache (expires_at);
CREATE INDEX embedding_cache_model_idx ON embedding_cache (model);
CREATE INDEX embedding_cache_owner_id_idx ON embedding_cache (owner_id) WHERE owner_id IS NOT NULL;
COMMENT ON TABLE embedding_cache IS 'pgcache embedding cache: query text + model -> embedding vector.';
COMMENT ON COLUMN embedding_cache.key_hash IS 'SHA-256 of the versioned, length-prefixed key (domain tag, query text, model).';
COMMENT ON COLUMN embedding_cache.model IS 'Embedding model that produced the vector (invalidate_model deletes by it).';
COMMENT ON COLUMN embedding_cache.dimensions IS 'Number of components of the vector.';
COMMENT ON COLUMN embedding_cache.embedding IS 'The vector as little-endian IEEE-754 f32 components, 4 bytes each.';
COMMENT ON COLUMN embedding_cache.owner_id IS 'Optional user the entry belongs to, for invalidate_user.';
COMMENT ON COLUMN embedding_cache.created_at IS 'When the entry was last written.';
COMMENT ON COLUMN embedding_cache.expires_at IS 'Database time after which the entry reads as a miss.';

CREATE TABLE vector_search_cache (
    key_hash    BYTEA PRIMARY KEY CHECK (octet_length(key_hash) = 32),
    user_id     UUID NOT NULL,
    top_k       INTEGER NOT NULL CHECK (top_k > 0),
    filters     JSONB NOT NULL,
    results     JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
CREATE INDEX vector_search_cache_expires_at_idx ON vector_search_cache (expires_at);
CREATE INDEX vector_search_cache_user_id_idx ON vector_search_cache (user_id);
COMMENT ON TABLE vector_search_cache IS 'pgcache vector-search results cache, per user.';
COMMENT ON COLUMN vector_search_cache.key_hash IS 'SHA-256 of the versioned key (domain tag, embedding bits, top_k, canonical filters, user id).';
COMMENT ON COLUMN vector_search_cache.user_id IS 'User whose search this is; reads also filter on it, invalidate_user deletes by it.';
COMMENT ON COLUMN vector_search_cache.top_k IS 'Number of results the search asked for.';
COMMENT ON COLUMN vector_search_cache.filters IS 'Search filters in canonical form (object keys sorted).';
COMMENT ON COLUMN vector_search_cache.results IS 'The cached search results.';
COMMENT ON COLUMN vector_search_cache.created_at IS 'When the entry was last written.';
COMMENT ON COLUMN vector_search_cache.expires_at IS 'Database time after which the entry reads as a miss.';

CREATE TABLE llm_response_cache (
    key_hash         BYTEA PRIMARY KEY CHECK (octet_length(key_hash) = 32),
    provider         TEXT NOT NULL,
    model            TEXT,
    response         TEXT NOT NULL,
    owner_id         UUID,
    hit_count        BIGINT NOT NULL DEFAULT 0,
    last_accessed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at       TIMESTAMPTZ NOT NULL
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
CREATE INDEX llm_response_cache_expires_at_idx ON llm_response_cache (expires_at);
CREATE INDEX llm_response_cache_owner_id_idx ON llm_response_cache (owner_id) WHERE owner_id IS NOT NULL;
COMMENT ON TABLE llm_response_cache IS 'pgcache LLM response cache with hit counting.';
COMMENT ON COLUMN llm_response_cache.key_hash IS 'SHA-256 of the versioned key (domain tag, prompt, context, provider, model, canonical params).';
COMMENT ON COLUMN llm_response_cache.provider IS 'LLM provider that produced the response.';
COMMENT ON COLUMN llm_response_cache.model IS 'Model name, when the caller gave one.';
COMMENT ON COLUMN llm_response_cache.response IS 'The cached response text.';
COMMENT ON COLUMN llm_response_cache.owner_id IS 'Optional user the entry belongs to, for invalidate_user.';
COMMENT ON COLUMN llm_response_cache.hit_count IS 'Number of cache hits served (not indexed, so counting stays a HOT update).';
COMMENT ON COLUMN llm_response_cache.last_accessed_at IS 'Time of the last hit or write (not indexed, see hit_count).';
COMMENT ON COLUMN llm_response_cache.created_at IS 'When the entry was last written.';
COMMENT ON COLUMN llm_response_cache.expires_at IS 'Database time after which the entry reads as a miss.';

CREATE TABLE audio_chunk_cache (
    key_hash         BYTEA PRIMARY KEY CHECK (octet_length(key_hash) = 32),
    voice_model_id   TEXT NOT NULL,
    provider         TEXT NOT NULL,
    audio_data       BYTEA,
    storage_path     TEXT,
    format           TEXT NOT NULL,
    duration_ms      INTEGER NOT NULL CHECK (duration_ms >= 0),
    sample_rate      INTEGER NOT NULL CHECK (sample_rate > 0),
    channels         SMALLINT NOT NULL CHECK (channels > 0),
    compression      TEXT,
    byte_size        BIGINT NOT NULL CHECK (byte_size >= 0),
    owner_id         UUID,
    hit_count        BIGINT NOT NULL DEFAULT 0,
    last_accessed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at       TIMESTAMPTZ NOT NULL,
    CHECK ((audio_data IS NULL) <> (storage_path IS NULL))
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
CREATE INDEX audio_chunk_cache_expires_at_idx ON audio_chunk_cache (expires_at);
CREATE INDEX audio_chunk_cache_owner_id_idx ON audio_chunk_cache (owner_id) WHERE owner_id IS NOT NULL;
COMMENT ON TABLE audio_chunk_cache IS 'pgcache TTS audio chunk cache: inline bytes or a storage path, with LRU eviction.';
COMMENT ON COLUMN audio_chunk_cache.key_hash IS 'SHA-256 of the versioned key (domain tag, text, voice model, provider, canonical settings).';
COMMENT ON COLUMN audio_chunk_cache.voice_model_id IS 'Voice model that spoke the text.';
COMMENT ON COLUMN audio_chunk_cache.provider IS 'TTS provider that produced the audio.';
COMMENT ON COLUMN audio_chunk_cache.audio_data IS 'Audio bytes, when stored inline (exactly one of audio_data and storage_path is set).';
COMMENT ON COLUMN audio_chunk_cache.storage_path IS 'Where the audio lives outside the database, when not stored inline.';
COMMENT ON COLUMN audio_chunk_cache.format IS 'Container or codec format, e.g. opus, wav.';
COMMENT ON COLUMN audio_chunk_cache.duration_ms IS 'Duration of the chunk in milliseconds.';
COMMENT ON COLUMN audio_chunk_cache.sample_rate IS 'Sample rate in Hz.';
COMMENT ON COLUMN audio_chunk_cache.channels IS 'Number of audio channels.';
COMMENT ON COLUMN audio_chunk_cache.compression IS 'Compression applied, if any.';
COMMENT ON COLUMN audio_chunk_cache.byte_size IS 'Size of the audio in bytes (inline or at the storage path); sums give cache size without reading the bytes.';
COMMENT ON COLUMN audio_chunk_cache.owner_id IS 'Optional user the entry belongs to, for invalidate_user.';
COMMENT ON COLUMN audio_chunk_cache.hit_count IS 'Number of cache hits served (not indexed, so counting stays a HOT update).';
COMMENT ON COLUMN audio_chunk_cache.last_accessed_at IS 'Time of the last hit or write; LRU eviction removes the oldest first.';
COMMENT ON COLUMN audio_chunk_cache.created_at IS 'When the entry was last written.';
COMMENT ON COLUMN audio_chunk_cache.expires_at IS 'Database time after which the entry reads as a miss.';

CREATE TABLE cache_counters (
    cache_name TEXT PRIMARY KEY,
    hits       BIGINT NOT NULL DEFAULT 0,
    misses     BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
COMMENT ON TABLE cache_counters IS 'pgcache hit and miss totals per cache, flushed in batches by every running CacheManager.';
COMMENT ON COLUMN cache_counters.cache_name IS 'Cache the counters belong to (kv, embedding, vector_search, llm_response, audio_chunk).';
COMMENT ON COLUMN cache_counters.hits IS 'Reads that found a live entry.';
COMMENT ON COLUMN cache_counters.misses IS 'Reads that found nothing or an expired entry.';
COMMENT ON COLUMN cache_counters.updated_at IS 'Last flush that changed the counters.';

CREATE TABLE cache_cleanup_runs (
    id            BIGSERIAL PRIMARY KEY,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    succeeded     BOOLEAN NOT NULL,
    rows_removed  BIGINT NOT NULL DEFAULT 0,
    error_message TEXT
);
COMMENT ON TABLE cache_cleanup_runs IS 'pgcache cleanup history; health reads the latest run to spot failed or overdue cleanups.';
COMMENT ON COLUMN cache_cleanup_runs.id IS 'Run number.';
COMMENT ON COLUMN cache_cleanup_runs.started_at IS 'When the cleanup started.';
COMMENT ON COLUMN cache_cleanup_runs.finished_at IS 'When the cleanup ended.';
COMMENT ON COLUMN cache_cleanup_runs.succeeded IS 'Whether every table was cleaned without error.';
COMMENT ON COLUMN cache_cleanup_runs.rows_removed IS 'Rows deleted over all cache tables.';
COMMENT ON COLUMN cache_cleanup_runs.error_message IS 'Why the run failed, when it did.';

CREATE TABLE cache_leases (
    lease_key  BYTEA PRIMARY KEY,
    holder     UUID NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
COMMENT ON TABLE cache_leases IS 'pgcache single-flight leases: the caller computing a missing entry holds its key; others wait for the result.';
COMMENT ON COLUMN cache_leases.lease_key IS 'Cache name and key digest of the entry being computed.';
COMMENT ON COLUMN cache_leases.holder IS 'Random id of the computing caller, so only it releases the lease.';
COMMENT ON COLUMN cache_leases.expires_at IS 'When the lease lapses if its holder dies without releasing it.';
