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
    /// The database server did not answer a statement within `statement_timeout` plus
    /// a margin of one second, so pgcache closed that connection: the server is
    /// frozen (stopped processes, a paused machine) and cannot enforce its own
    /// timeout, or the network path to it swallows traffic. Transient.
    #[error(
        "the database did not answer a statement within {waited_ms} ms; its connection was closed"
    )]
    Unresponsive {
        /// How long the statement went unanswered before it was cut.
        waited_ms: u64,
    },
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
    /// timeout, statement or lock timeout, an unanswered statement, serialization
    /// failure, deadlock): what
    /// fail-open mode turns into misses. Bad input, configuration errors (including
    /// refused credentials and unknown databases or roles), missing tables and
    /// missing privileges are never transient.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match self {
            Error::Connection(message) => !is_configuration_failure(message),
            Error::Database(D::DatabaseError(kind, info)) => match kind {
                // Diesel maps SQLSTATE 08xxx and a dead socket to ClosedConnection and
                // 40001 to SerializationFailure.
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::SerializationFailure => {
                    true
                }
                // Diesel does not expose the other SQLSTATEs, so recognise PostgreSQL's
                // (and libpq's) messages for them.
                _ => is_transient_message(info.message()),
            },
            Error::Database(D::BrokenTransactionManager) | Error::Unresponsive { .. } => true,
            _ => false,
        }
    }

    /// True when the connection under the failed operation is gone (killed backend,
    /// server restart, network cut): retrying on another connection may succeed.
    pub(crate) fn is_connection_lost(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match self {
            Error::Database(D::DatabaseError(DatabaseErrorKind::ClosedConnection, _)) => true,
            Error::Database(D::DatabaseError(_, info)) => {
                CONNECTION_LOST.iter().any(|m| info.message().contains(m))
            }
            _ => false,
        }
    }

    /// True when PostgreSQL aborted the statement to resolve a conflict with another
    /// transaction (40P01 deadlock, 40001 serialization failure); it rolled back
    /// whole, so running it again is safe.
    pub(crate) fn is_retryable_conflict(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match self {
            Error::Database(D::DatabaseError(DatabaseErrorKind::SerializationFailure, _)) => true,
            Error::Database(D::DatabaseError(_, info)) => {
                info.message().contains("deadlock detected")
            }
            _ => false,
        }
    }
}

/// Messages of a lost connection: 57P01 admin shutdown, 57P02 crash shutdown, 57P03
/// cannot connect now, and libpq's own.
const CONNECTION_LOST: [&str; 6] = [
    "terminating connection",
    "server closed the connection",
    "connection has been closed unexpectedly",
    "no connection to the server",
    "could not receive data from server",
    "could not send data to server",
];

fn is_transient_message(message: &str) -> bool {
    // 57014 query_canceled (statement_timeout), 55P03 lock_not_available
    // (lock_timeout), 40P01 deadlock_detected, 57P03 cannot_connect_now.
    const TRANSIENT: [&str; 4] = [
        "canceling statement due to statement timeout",
        "canceling statement due to lock timeout",
        "deadlock detected",
        "the database system is",
    ];
    TRANSIENT
        .iter()
        .chain(CONNECTION_LOST.iter())
        .any(|m| message.contains(m))
}

/// Connection failures that waiting will not cure: 28P01 invalid_password, 28000
/// invalid_authorization_specification, 3D000 invalid_catalog_name.
fn is_configuration_failure(message: &str) -> bool {
    const CONFIGURATION: [&str; 5] = [
        "password authentication failed",
        "no pg_hba.conf entry",
        "does not exist",
        "no password supplied",
        "is not permitted to log in",
    ];
    CONFIGURATION.iter().any(|m| message.contains(m))
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
