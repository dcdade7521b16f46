//! The cache's tables named with their schema: every statement pgcache sends names
//! its table schema-qualified (`"pgcache"."cache_entries"`), so it runs on any
//! connection whatever its search path (an application's own, in its own
//! transaction, on its first use). The names are built once, at start, from the
//! configured schema ([`Tables::new`]); statements take them from here.
//!
//! A statement whose text holds a table name is cached by Diesel by its text, not
//! by a static query id: two managers with different schemas may share one
//! application connection, and each must find its own statement (see
//! `statement.rs`, `Prepared`).

use crate::kind::CacheKind;

/// Quotes an SQL identifier the way PostgreSQL's `quote_ident` does (always).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The schema-qualified, quoted names of one schema's tables.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    caches: [String; CacheKind::COUNT],
    leases: String,
    counters: String,
    cleanup_runs: String,
    changes: String,
    tags: String,
}

impl Tables {
    /// The tables of `schema` (unquoted, as configured).
    pub(crate) fn new(schema: &str) -> Self {
        let quoted = quote_ident(schema);
        let name = |table: &str| format!("{quoted}.{}", quote_ident(table));
        Tables {
            caches: CacheKind::ALL.map(|kind| name(kind.table())),
            leases: name("cache_leases"),
            counters: name("cache_counters"),
            cleanup_runs: name("cache_cleanup_runs"),
            changes: name("cache_changes"),
            tags: name("cache_tags"),
        }
    }

    /// The table of cache `kind`.
    pub(crate) fn of(&self, kind: CacheKind) -> &str {
        &self.caches[kind.index()]
    }

    /// `cache_leases` (single flight).
    pub(crate) fn leases(&self) -> &str {
        &self.leases
    }

    /// `cache_counters` (statistics).
    pub(crate) fn counters(&self) -> &str {
        &self.counters
    }

    /// `cache_cleanup_runs` (cleanup's history).
    pub(crate) fn cleanup_runs(&self) -> &str {
        &self.cleanup_runs
    }

    /// `cache_changes` (the near caches' change log).
    pub(crate) fn changes(&self) -> &str {
        &self.changes
    }

    /// `cache_tags` (the key/value cache's tag generations).
    pub(crate) fn tags(&self) -> &str {
        &self.tags
    }
}

#[cfg(test)]
mod tests {
    use super::Tables;
    use crate::kind::CacheKind;

    #[test]
    fn table_names_are_qualified_and_quoted() {
        let tables = Tables::new("my \"odd\" schema");
        assert_eq!(
            tables.of(CacheKind::Kv),
            "\"my \"\"odd\"\" schema\".\"cache_entries\""
        );
        assert_eq!(
            tables.leases(),
            "\"my \"\"odd\"\" schema\".\"cache_leases\""
        );
    }
}
