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
    /// timeout, statement or lock timeout, serialization failure, deadlock): what
    /// fail-open mode turns into misses. Bad input, configuration errors (including
    /// refused credentials and unknown databases or roles), missing tables, missing
    /// privileges and constraint violations are never transient.
    ///
    /// A lost connection and a serialization failure are recognised by Diesel's
    /// [`DatabaseErrorKind`](diesel::result::DatabaseErrorKind), in any server
    /// language. Diesel exposes no SQLSTATE for the others (statement and lock
    /// timeouts, deadlocks, shutdowns), so those are recognised by PostgreSQL's
    /// English messages: with `lc_messages` set to another language they are not
    /// transient.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match self {
            Error::Connection(message) => !is_configuration_failure(message),
            Error::Database(D::DatabaseError(kind, info)) => match kind {
                // Diesel maps SQLSTATE 08xxx and a dead socket to ClosedConnection and
                // 40001 to SerializationFailure: judged by kind, whatever the
                // server's language.
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::SerializationFailure => {
                    true
                }
                // Diesel 2.3 exposes no SQLSTATE (`DatabaseErrorInformation` has none),
                // and maps 57014, 55P03, 40P01 and 57P0x to Unknown; a failed send is
                // libpq's. Only for these is the (English) message the fallback.
                DatabaseErrorKind::Unknown | DatabaseErrorKind::UnableToSendCommand => {
                    is_transient_message(info.message())
                }
                // Constraint violations, read-only transactions: the same statement
                // fails the same way again.
                _ => false,
            },
            Error::Database(D::BrokenTransactionManager) => true,
            _ => false,
        }
    }

    /// True for an error the database (or libpq) reported, after which the
    /// connection may be dead: worth a probe before it goes back to the pool.
    pub(crate) fn is_database_failure(&self) -> bool {
        matches!(self, Error::Database(_))
    }

    /// True when PostgreSQL aborted the statement to resolve a conflict with another
    /// transaction (40P01 deadlock, 40001 serialization failure); it rolled back
    /// whole, so running it again is safe.
    pub(crate) fn is_retryable_conflict(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match self {
            Error::Database(D::DatabaseError(DatabaseErrorKind::SerializationFailure, _)) => true,
            // 40P01 is Unknown to Diesel: the message is all there is.
            Error::Database(D::DatabaseError(DatabaseErrorKind::Unknown, info)) => {
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
/// invalid_authorization_specification, 3D000 invalid_catalog_name, 42501
/// insufficient_privilege (a role without CONNECT).
fn is_configuration_failure(message: &str) -> bool {
    const CONFIGURATION: [&str; 6] = [
        "password authentication failed",
        "no pg_hba.conf entry",
        "does not exist",
        "no password supplied",
        "is not permitted to log in",
        "permission denied",
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

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error as D};

    fn database(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::Database(D::DatabaseError(kind, Box::new(message.to_owned())))
    }

    #[test]
    fn a_closed_connection_is_transient_in_any_language() {
        let error = database(
            DatabaseErrorKind::ClosedConnection,
            "Server hat die Verbindung unerwartet geschlossen",
        );
        assert!(error.is_transient());
    }

    #[test]
    fn a_serialization_failure_is_transient_and_retried_in_any_language() {
        let error = database(
            DatabaseErrorKind::SerializationFailure,
            "konnte Zugriff nicht serialisieren",
        );
        assert!(error.is_transient());
        assert!(error.is_retryable_conflict());
    }

    #[test]
    fn constraint_violations_are_never_transient_whatever_the_message() {
        for kind in [
            DatabaseErrorKind::UniqueViolation,
            DatabaseErrorKind::ForeignKeyViolation,
            DatabaseErrorKind::NotNullViolation,
            DatabaseErrorKind::CheckViolation,
        ] {
            let error = database(kind, "deadlock detected");
            assert!(!error.is_transient(), "{kind:?}");
            assert!(!error.is_retryable_conflict(), "{kind:?}");
        }
    }

    #[test]
    fn unmapped_sqlstates_fall_back_to_the_message() {
        for message in [
            "canceling statement due to statement timeout",
            "canceling statement due to lock timeout",
            "deadlock detected",
            "terminating connection due to administrator command",
        ] {
            assert!(
                database(DatabaseErrorKind::Unknown, message).is_transient(),
                "{message}"
            );
        }
        assert!(!database(DatabaseErrorKind::Unknown, "syntax error").is_transient());
    }
}
