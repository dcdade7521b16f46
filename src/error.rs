//! The crate's error type.

use std::fmt;

/// Result alias used throughout pgcache.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in pgcache.
///
/// Messages name what was wrong (the setting, the key, the table) and never contain
/// the database password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value (environment variable or builder setting) is malformed.
    #[error("invalid configuration: {setting} = `{value}`: {reason}")]
    Config {
        /// The variable or setting, e.g. `CACHE_TTL_SHORT`.
        setting: String,
        /// The offending value (a URL is shown with its password redacted).
        value: String,
        /// What a valid value looks like.
        reason: String,
    },
    /// A key, value or TTL given to a cache operation was rejected before anything was
    /// stored.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was rejected, e.g. `key`, `ttl`, `embedding`.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// No connection could be had: the database is unreachable, refused the
    /// credentials, or every pooled connection stayed busy past the connection timeout.
    #[error("cannot get a database connection: {0}")]
    Connection(String),
    /// A cache table is missing: migrations have not been run into this schema.
    #[error(
        "cache table `{table}` does not exist: run `pgcache migrate` (or enable run_migrations)"
    )]
    MissingTable {
        /// The missing table.
        table: String,
    },
    /// Running the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A value could not be serialized to, or deserialized from, JSON.
    #[error("JSON (de)serialization failed: {0}")]
    Json(#[from] serde_json::Error),
    /// A query failed in the database.
    #[error("database error: {0}")]
    Database(diesel::result::Error),
    /// Waiting for another caller's computation of the same key took too long.
    #[error("timed out after {waited_ms} ms waiting for another caller to compute the same key")]
    ComputeTimeout {
        /// How long this caller waited.
        waited_ms: u64,
    },
}

impl Error {
    pub(crate) fn invalid(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidInput {
            what,
            reason: reason.to_string(),
        }
    }

    pub(crate) fn config(
        setting: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config {
            setting: setting.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// True for failures that may pass on their own (connection refused or lost, pool
    /// timeout, statement timeout, serialization failure): what fail-open mode turns
    /// into misses. Bad input, configuration errors and missing tables are never
    /// transient.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match self {
            Error::Connection(_) => true,
            Error::Database(D::DatabaseError(kind, info)) => match kind {
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::SerializationFailure => {
                    true
                }
                // 57014 query_canceled (statement_timeout), 40P01 deadlock, 57P0x admin
                // shutdown / crash, 08xxx connection exceptions.
                _ => {
                    let message = info.message();
                    message.contains("canceling statement due to statement timeout")
                        || message.contains("terminating connection")
                        || message.contains("deadlock detected")
                        || message.contains("server closed the connection")
                        || message.contains("no connection to the server")
                        || message.contains("could not receive data from server")
                }
            },
            Error::Database(D::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}

impl From<diesel::result::Error> for Error {
    fn from(error: diesel::result::Error) -> Self {
        if let diesel::result::Error::DatabaseError(_, info) = &error {
            // 42P01 undefined_table: PostgreSQL says `relation "x" does not exist`.
            let message = info.message();
            if let Some(rest) = message.strip_prefix("relation \"") {
                if let Some(table) = rest.strip_suffix("\" does not exist") {
                    return Error::MissingTable {
                        table: table.to_owned(),
                    };
                }
            }
        }
        if let diesel::result::Error::DeserializationError(cause) = &error {
            // A stored value that does not fit the requested type (decoded straight
            // from the row): the same error as decoding it outside the database.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(cause.as_ref());
            while let Some(e) = source {
                if let Some(json) = e.downcast_ref::<serde_json::Error>() {
                    return Error::Json(serde::de::Error::custom(json));
                }
                source = e.source();
            }
        }
        Error::Database(error)
    }
}

impl From<diesel::r2d2::PoolError> for Error {
    fn from(error: diesel::r2d2::PoolError) -> Self {
        // libpq's messages span several lines; keep the error to one.
        let message = error.to_string();
        Error::Connection(message.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}
