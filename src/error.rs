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
    /// A timeout carries the cause of the last failed connection attempt, if any.
    #[error("cannot get a database connection: {0}")]
    Connection(#[source] ConnectionError),
    /// A cache table is missing. Named with its schema (`pgcache.cache_entries`, as
    /// every cache statement names it): migrations have not been run into that
    /// schema. Named bare (`cache_entries`, from SQL of your own on a connection):
    /// the cache's schema is not on that connection's search path.
    #[error("{}", missing_table_message(table))]
    MissingTable {
        /// The missing table, with its schema (`pgcache.cache_entries`): every
        /// cache statement names the cache's schema, so this is the table missing
        /// there, whatever the connection's search path.
        table: String,
    },
    /// Running the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] MigrationError),
    /// A value could not be serialized to, or deserialized from, JSON.
    #[error("JSON (de)serialization failed: {0}")]
    Json(#[from] serde_json::Error),
    /// A query failed in the database.
    #[error("database error: {0}")]
    Database(#[source] diesel::result::Error),
    /// The database server did not answer a statement within `statement_timeout` plus
    /// a margin of one second, so pgcache closed that connection: the server is
    /// frozen (stopped processes, a paused machine) and cannot enforce its own
    /// timeout, or the network path to it swallows traffic. Transient.
    #[error(
        "the database did not answer a statement within {waited_ms} ms; its connection \
         was closed: the server is frozen or the network path to it drops traffic \
         (the limit is PGCACHE_STATEMENT_TIMEOUT_MS, `statement_timeout`, plus 1000 ms)"
    )]
    Unresponsive {
        /// How long the statement went unanswered before it was cut.
        waited_ms: u64,
    },
    /// A key/value entry holds the other kind of value than the operation reads
    /// (Redis `WRONGTYPE`): JSON read as bytes, bytes read as JSON or incremented.
    /// The entry is left as it was.
    #[error("wrong type: `{key}` holds a {stored} value, not {requested}")]
    WrongType {
        /// The key.
        key: String,
        /// What the entry holds: `json` or `bytes`.
        stored: &'static str,
        /// What the operation wanted: `json`, `bytes` or `integer`.
        requested: &'static str,
    },
    /// A warmup statement ran past its statement timeout; the warmup was rolled back
    /// and nothing of it stored.
    #[error(
        "the warmup was cancelled by its statement timeout ({timeout_ms} ms) and nothing \
         was stored: raise the warmup's `statement_timeout_ms` (`pgcache warmup \
         --statement-timeout-ms`)"
    )]
    WarmupTimeout {
        /// The statement timeout the warmup ran under.
        timeout_ms: u64,
    },
    /// An operation over every shard of a sharded cache (cleanup, invalidation,
    /// warmup, ...) failed on this shard; the other shards did their part.
    #[error("shard `{shard}`: {source}")]
    Shard {
        /// The shard's name.
        shard: String,
        /// What went wrong there.
        source: Box<Error>,
    },
    /// The operation cannot run under this configuration: prefix deletes and
    /// containment queries on key/value keys stored as keyed hashes
    /// (`hash_kv_keys`), which have no prefixes and no text to return, or
    /// containment queries on values stored sealed. Nothing was changed.
    #[error("{operation} is not available: {reason}")]
    Unsupported {
        /// The operation refused, e.g. `delete_prefix`.
        operation: &'static str,
        /// Why, and what to do instead.
        reason: &'static str,
    },
    /// Waiting for another caller's computation of the same key took too long.
    #[error(
        "timed out after {waited_ms} ms waiting for another caller to compute the same \
         key: raise PGCACHE_COMPUTE_WAIT_MS (`compute_wait_timeout`) above the slowest \
         computation"
    )]
    ComputeTimeout {
        /// How long this caller waited.
        waited_ms: u64,
    },
}

/// A boxed cause, as Diesel, r2d2 and the migration harness give them.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Defines an error type made of a one-line message and an optional cause.
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name {
            message: String,
            source: Option<Cause>,
        }

        impl $name {
            /// An error with this message and no underlying cause.
            pub fn new(message: impl Into<String>) -> Self {
                $name {
                    message: message.into(),
                    source: None,
                }
            }

            /// An error with this message, caused by `source` (returned by
            /// [`std::error::Error::source`]).
            pub fn caused_by(message: impl Into<String>, source: impl Into<Cause>) -> Self {
                $name {
                    message: message.into(),
                    source: Some(source.into()),
                }
            }

            /// The message, without the cause's type.
            pub fn message(&self) -> &str {
                &self.message
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.message)
            }
        }

        // By hand: the cause is shown by its message, which, like ours, never holds
        // the password (a derived `Debug` would show the type's fields instead).
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("message", &self.message)
                    .field("source", &self.source.as_ref().map(ToString::to_string))
                    .finish()
            }
        }

        impl std::error::Error for $name {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.source.as_deref().map(|e| e as _)
            }
        }

        impl From<String> for $name {
            fn from(message: String) -> Self {
                $name::new(message)
            }
        }

        impl From<&str> for $name {
            fn from(message: &str) -> Self {
                $name::new(message)
            }
        }
    };
}

message_error! {
    /// Why no connection could be had ([`Error::Connection`]): a one-line message that
    /// never holds the password and, when there is one, the r2d2 or Diesel error
    /// behind it.
    ConnectionError
}

message_error! {
    /// Why the migrations failed ([`Error::Migration`]): a message and, when there is
    /// one, the migration harness's error behind it.
    MigrationError
}

impl Error {
    /// The variant's name in snake case: the `error` label of
    /// [`ERRORS`](crate::metrics::ERRORS).
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Error::Config { .. } => "config",
            Error::InvalidInput { .. } => "invalid_input",
            Error::Connection(_) => "connection",
            Error::MissingTable { .. } => "missing_table",
            Error::Migration(_) => "migration",
            Error::Json(_) => "json",
            Error::Database(_) => "database",
            Error::Unresponsive { .. } => "unresponsive",
            Error::ComputeTimeout { .. } => "compute_timeout",
            Error::WrongType { .. } => "wrong_type",
            Error::WarmupTimeout { .. } => "warmup_timeout",
            Error::Unsupported { .. } => "unsupported",
            Error::Shard { source, .. } => source.kind_name(),
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidInput {
            what,
            reason: reason.to_string(),
        }
    }

    /// An [`Error::Connection`] of one line (see [`one_line`]).
    pub(crate) fn connection(message: &str) -> Self {
        Error::Connection(one_line(message).into())
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
    /// refused credentials, unknown databases or roles and connection options libpq
    /// refuses, such as `sslmode=bogus`), missing tables, missing privileges and
    /// constraint violations are never transient.
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
            Error::Connection(error) => !is_configuration_failure(error.message()),
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
            Error::Database(D::BrokenTransactionManager) | Error::Unresponsive { .. } => true,
            Error::Shard { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// This error as it happened on the shard named `shard`.
    pub(crate) fn on_shard(self, shard: &str) -> Self {
        Error::Shard {
            shard: shard.to_owned(),
            source: Box::new(self),
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

/// What [`Error::MissingTable`] says: a qualified name was not migrated into its
/// schema; a bare one is not on the connection's search path.
fn missing_table_message(table: &str) -> String {
    match table.rsplit_once('.') {
        Some((schema, _)) => format!(
            "cache table `{table}` does not exist: the schema `{schema}` is not migrated; \
             run `pgcache migrate` (or start with PGCACHE_RUN_MIGRATIONS=true)"
        ),
        None => format!(
            "table `{table}` is not on this connection's search path: name it with the \
             cache's schema (`pgcache.{table}`, PGCACHE_SCHEMA) or add that schema to \
             the search path"
        ),
    }
}

/// Messages of failures that waiting may cure: 57014 query_canceled
/// (statement_timeout), 55P03 lock_not_available (lock_timeout), 40P01
/// deadlock_detected, 57P03 cannot_connect_now; and a lost connection: 57P01 admin
/// shutdown, 57P02 crash shutdown, and libpq's own.
const TRANSIENT: [&str; 10] = [
    "canceling statement due to statement timeout",
    "canceling statement due to lock timeout",
    "deadlock detected",
    "the database system is",
    "terminating connection",
    "server closed the connection",
    "connection has been closed unexpectedly",
    "no connection to the server",
    "could not receive data from server",
    "could not send data to server",
];

/// libpq's message (several lines, each ending in a newline, some indented) as
/// one line: its lines trimmed and joined by "; ", runs of whitespace as one space.
pub(crate) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn is_transient_message(message: &str) -> bool {
    TRANSIENT.iter().any(|m| message.contains(m))
}

/// Connection failures that waiting will not cure: 28P01 invalid_password, 28000
/// invalid_authorization_specification, 3D000 invalid_catalog_name, 42501
/// insufficient_privilege (a role without CONNECT), and libpq refusing the
/// connection string's options before connecting (`invalid sslmode value:
/// "bogus"`, an unknown option, a bad port or service).
fn is_configuration_failure(message: &str) -> bool {
    const CONFIGURATION: [&str; 15] = [
        "password authentication failed",
        "no pg_hba.conf entry",
        "does not exist",
        "no password supplied",
        "is not permitted to log in",
        "permission denied",
        // libpq's `invalid <option> value: "..."` (sslmode, channel_binding,
        // gssencmode, target_session_attrs, ...).
        " value: \"",
        "invalid connection option",
        "invalid integer value",
        "invalid port number",
        "invalid URI query parameter",
        "invalid SSL protocol version range",
        "could not match",
        "definition of service",
        // The server refusing a setting given in `options`.
        "invalid value for parameter",
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

/// For pools of your own. pgcache's pool converts its errors itself, scrubbing
/// them of the password (which this conversion does not know).
impl From<diesel::r2d2::PoolError> for Error {
    fn from(error: diesel::r2d2::PoolError) -> Self {
        // libpq's messages span several lines; keep the error to one.
        Error::Connection(ConnectionError::caused_by(
            one_line(&error.to_string()),
            error,
        ))
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
    fn a_database_error_keeps_the_diesel_error_as_its_source() {
        let error = Error::from(D::NotFound);
        let source = std::error::Error::source(&error).expect("a source");
        assert!(matches!(source.downcast_ref::<D>(), Some(D::NotFound)));
    }

    #[test]
    fn a_migration_error_keeps_its_cause() {
        let cause = std::io::Error::other("no such migration");
        let error = Error::Migration(MigrationError::caused_by("failed", cause));
        let source = std::error::Error::source(&error).expect("the MigrationError");
        let cause = source.source().expect("the harness's error");
        assert!(cause.downcast_ref::<std::io::Error>().is_some());
        assert_eq!(cause.to_string(), "no such migration");
    }

    #[test]
    fn a_pool_error_keeps_the_r2d2_error_and_a_one_line_message() {
        use diesel::r2d2::{ConnectionManager, Pool};
        let pool = Pool::builder()
            .connection_timeout(std::time::Duration::from_millis(50))
            .build_unchecked(ConnectionManager::<diesel::PgConnection>::new(
                "postgres://app:s3cr3t@127.0.0.1:1/app",
            ));
        let Err(error) = pool.get().map(drop) else {
            panic!("nothing listens on port 1")
        };
        let error = Error::from(error);
        let Error::Connection(connection) = &error else {
            panic!("{error:?}")
        };
        assert!(!connection.message().contains('\n'), "{connection}");
        let cause = std::error::Error::source(connection).expect("the pool error");
        assert!(cause.downcast_ref::<diesel::r2d2::PoolError>().is_some());
        assert!(!format!("{error:?}").contains("s3cr3t"), "{error:?}");
    }

    #[test]
    fn a_libpq_message_becomes_one_line_with_its_lines_joined() {
        let libpq = "connection to server at \"127.0.0.1\", port 5 failed: Connection refused\n\
                     \tIs the server running on that host and accepting TCP/IP connections?\n";
        assert_eq!(
            one_line(libpq),
            "connection to server at \"127.0.0.1\", port 5 failed: Connection refused; \
             Is the server running on that host and accepting TCP/IP connections?"
        );
        assert_eq!(one_line("timeout expired\n"), "timeout expired");
        assert_eq!(
            Error::connection("timed out waiting for connection:  timeout expired\n").to_string(),
            "cannot get a database connection: timed out waiting for connection: timeout expired"
        );
    }

    #[test]
    fn connection_errors_are_still_written_from_text() {
        let error = Error::Connection("connection refused".into());
        assert_eq!(
            error.to_string(),
            "cannot get a database connection: connection refused"
        );
        assert!(std::error::Error::source(&error)
            .and_then(std::error::Error::source)
            .is_none());
        assert!(error.is_transient());
    }

    #[test]
    fn closed_connections_and_serialization_failures_are_transient_in_any_language() {
        let closed = database(
            DatabaseErrorKind::ClosedConnection,
            "Server hat die Verbindung unerwartet geschlossen",
        );
        assert!(closed.is_transient());
        assert!(!closed.is_retryable_conflict());
        let conflict = database(
            DatabaseErrorKind::SerializationFailure,
            "konnte Zugriff nicht serialisieren",
        );
        assert!(conflict.is_transient());
        assert!(conflict.is_retryable_conflict());
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
