//! [`CacheKind`] and every fact about each cache table, in one place: its
//! [`Descriptor`].
//!
//! Adding a cache is compiler-guided: a new variant in `cache_kinds!` is a new entry
//! of [`CacheKind::ALL`] and a new slot of every per-cache array
//! (`[_; CacheKind::COUNT]`), and [`CacheKind::descriptor`] does not compile until
//! the new table's descriptor is written.

use serde::{Deserialize, Serialize};

/// What pgcache knows about one cache table.
#[derive(Debug)]
pub(crate) struct Descriptor {
    /// Short name in counters, the CLI and reports (`kv`, `embedding`, ...).
    pub(crate) name: &'static str,
    /// The table.
    pub(crate) table: &'static str,
    /// Heading in the statistics report.
    pub(crate) title: &'static str,
    /// The table's key column.
    pub(crate) key: &'static str,
    /// How hits are counted per entry (`hit_count`, `last_accessed_at`), for
    /// popularity reports and least-recently-used eviction; an overwrite resets them.
    /// `None` where the table does not count them.
    pub(crate) hits: Option<HitTracking>,
    /// SQL for a row's payload bytes, as stored (never fetches a TOASTed value).
    pub(crate) payload_bytes: &'static str,
    /// SQL for external storage a row holds (`text`, may be NULL), released on
    /// eviction or invalidation.
    pub(crate) external_path: &'static str,
}

/// What a table that counts hits per entry adds to its [`Descriptor`].
#[derive(Debug)]
pub(crate) struct HitTracking {
    /// SQL for the provider and the model (`text`, may be NULL) that produced a row:
    /// what popularity reports show beside its hits.
    pub(crate) made_by: [&'static str; 2],
}

impl Descriptor {
    /// Whether hits are counted per entry.
    pub(crate) fn tracks_hits(&self) -> bool {
        self.hits.is_some()
    }

    /// The column ordering rows from least to most recently used: last access where
    /// hits are tracked, last write elsewhere.
    pub(crate) fn recency(&self) -> &'static str {
        if self.tracks_hits() {
            "last_accessed_at"
        } else {
            "created_at"
        }
    }
}

/// Declares [`CacheKind`] and [`CacheKind::ALL`] from one list, so neither can miss
/// a cache.
macro_rules! cache_kinds {
    ($($(#[$doc:meta])* $variant:ident,)+) => {
        /// The caches, one table each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[non_exhaustive]
        pub enum CacheKind {
            $($(#[$doc])* $variant,)+
        }

        impl CacheKind {
            /// Every cache, in a fixed order.
            pub const ALL: [CacheKind; [$(CacheKind::$variant),+].len()] = [$(CacheKind::$variant),+];
        }
    };
}

cache_kinds! {
    /// The generic key/value cache (`cache_entries`).
    Kv,
    /// Query embeddings (`embedding_cache`).
    Embedding,
    /// Vector-search results per user (`vector_search_cache`).
    VectorSearch,
    /// LLM responses with hit counts (`llm_response_cache`).
    LlmResponse,
    /// TTS audio chunks (`audio_chunk_cache`).
    AudioChunk,
}

impl CacheKind {
    /// How many caches there are: the size of every per-cache array.
    pub const COUNT: usize = Self::ALL.len();

    /// Everything known about this cache's table.
    pub(crate) const fn descriptor(self) -> &'static Descriptor {
        match self {
            CacheKind::Kv => &Descriptor {
                name: "kv",
                table: "cache_entries",
                title: "Key/Value Cache",
                key: "key",
                hits: None,
                payload_bytes: "octet_length(key) \
                    + coalesce(pg_column_size(value), pg_column_size(bytes), pg_column_size(packed))",
                external_path: "NULL::text",
            },
            CacheKind::Embedding => &Descriptor {
                name: "embedding",
                table: "embedding_cache",
                title: "Embedding Cache",
                key: "key_hash",
                hits: None,
                payload_bytes: "coalesce(octet_length(embedding), octet_length(packed))",
                external_path: "NULL::text",
            },
            CacheKind::VectorSearch => &Descriptor {
                name: "vector_search",
                table: "vector_search_cache",
                title: "Vector Search Cache",
                key: "key_hash",
                hits: None,
                payload_bytes: "coalesce(pg_column_size(results), octet_length(packed))",
                external_path: "NULL::text",
            },
            CacheKind::LlmResponse => &Descriptor {
                name: "llm_response",
                table: "llm_response_cache",
                title: "LLM Response Cache",
                key: "key_hash",
                hits: Some(HitTracking {
                    made_by: ["provider", "model"],
                }),
                payload_bytes: "coalesce(octet_length(response), octet_length(packed))",
                external_path: "NULL::text",
            },
            CacheKind::AudioChunk => &Descriptor {
                name: "audio_chunk",
                table: "audio_chunk_cache",
                title: "Audio Chunk Cache",
                key: "key_hash",
                hits: Some(HitTracking {
                    made_by: ["provider", "voice_model_id"],
                }),
                payload_bytes: "byte_size",
                external_path: "storage_path",
            },
        }
    }

    /// Short name used in counters, the CLI and reports (`kv`, `embedding`, ...).
    pub fn name(self) -> &'static str {
        self.descriptor().name
    }

    /// The table holding this cache.
    pub fn table(self) -> &'static str {
        self.descriptor().table
    }

    /// Looks a cache up by [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// This cache's slot in a `[_; CacheKind::COUNT]` array.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

// `index` is the position in `ALL`.
const _: () = {
    let mut i = 0;
    while i < CacheKind::COUNT {
        assert!(CacheKind::ALL[i] as usize == i);
        i += 1;
    }
};

/// By [`name`](CacheKind::name): `kv`, `embedding`, `vector_search`, `llm_response`,
/// `audio_chunk`.
impl std::str::FromStr for CacheKind {
    type Err = crate::error::Error;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        CacheKind::from_name(name).ok_or_else(|| {
            let names: Vec<&str> = CacheKind::ALL.iter().map(|k| k.name()).collect();
            crate::error::Error::invalid(
                "cache",
                format!(
                    "no cache named `{name}`; the caches are {}",
                    names.join(", ")
                ),
            )
        })
    }
}

impl std::fmt::Display for CacheKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
