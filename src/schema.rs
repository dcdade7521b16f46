// @generated automatically by Diesel CLI.

diesel::table! {
    audio_chunk_cache (key_hash) {
        key_hash -> Bytea,
        voice_model_id -> Text,
        provider -> Text,
        audio_data -> Nullable<Bytea>,
        storage_path -> Nullable<Text>,
        format -> Text,
        duration_ms -> Int4,
        sample_rate -> Int4,
        channels -> Int2,
        compression -> Nullable<Text>,
        byte_size -> Int8,
        owner_id -> Nullable<Uuid>,
        hit_count -> Int8,
        last_accessed_at -> Timestamptz,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        changed_xid -> Nullable<Int8>,
        fresh_until -> Nullable<Timestamptz>,
        fresh_expiry -> Nullable<Timestamptz>,
        compute_us -> Nullable<Int8>,
        packed -> Nullable<Bytea>,
    }
}

diesel::table! {
    cache_cleanup_runs (id) {
        id -> Int8,
        started_at -> Timestamptz,
        finished_at -> Timestamptz,
        succeeded -> Bool,
        rows_removed -> Int8,
        error_message -> Nullable<Text>,
    }
}

diesel::table! {
    cache_counters (cache_name) {
        cache_name -> Text,
        hits -> Int8,
        misses -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    cache_entries (key) {
        key -> Text,
        value -> Nullable<Jsonb>,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        bytes -> Nullable<Bytea>,
        changed_xid -> Nullable<Int8>,
        tags -> Nullable<Array<Nullable<Text>>>,
        tag_generations -> Nullable<Array<Nullable<Int8>>>,
        fresh_until -> Nullable<Timestamptz>,
        fresh_expiry -> Nullable<Timestamptz>,
        compute_us -> Nullable<Int8>,
        packed -> Nullable<Bytea>,
        bytes_packed -> Bool,
    }
}

diesel::table! {
    cache_leases (lease_key) {
        lease_key -> Bytea,
        holder -> Uuid,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    cache_tags (tag) {
        tag -> Text,
        generation -> Int8,
        swept_generation -> Nullable<Int8>,
        invalidated_at -> Timestamptz,
    }
}

diesel::table! {
    embedding_cache (key_hash) {
        key_hash -> Bytea,
        model -> Text,
        dimensions -> Int4,
        embedding -> Nullable<Bytea>,
        owner_id -> Nullable<Uuid>,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        changed_xid -> Nullable<Int8>,
        fresh_until -> Nullable<Timestamptz>,
        fresh_expiry -> Nullable<Timestamptz>,
        compute_us -> Nullable<Int8>,
        packed -> Nullable<Bytea>,
    }
}

diesel::table! {
    llm_response_cache (key_hash) {
        key_hash -> Bytea,
        provider -> Text,
        model -> Nullable<Text>,
        response -> Nullable<Text>,
        owner_id -> Nullable<Uuid>,
        hit_count -> Int8,
        last_accessed_at -> Timestamptz,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        changed_xid -> Nullable<Int8>,
        fresh_until -> Nullable<Timestamptz>,
        fresh_expiry -> Nullable<Timestamptz>,
        compute_us -> Nullable<Int8>,
        packed -> Nullable<Bytea>,
    }
}

diesel::table! {
    vector_search_cache (key_hash) {
        key_hash -> Bytea,
        user_id -> Uuid,
        top_k -> Int4,
        filters -> Nullable<Jsonb>,
        results -> Nullable<Jsonb>,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        changed_xid -> Nullable<Int8>,
        fresh_until -> Nullable<Timestamptz>,
        fresh_expiry -> Nullable<Timestamptz>,
        compute_us -> Nullable<Int8>,
        packed -> Nullable<Bytea>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    audio_chunk_cache,
    cache_cleanup_runs,
    cache_counters,
    cache_entries,
    cache_leases,
    cache_tags,
    embedding_cache,
    llm_response_cache,
    vector_search_cache,
);
