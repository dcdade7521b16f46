//! The opt-in background janitor: a thread per shard that runs its cleanup every
//! `janitor_interval`, for services that do not run `pgcache cleanup` from cron. It
//! stops when the last clone of the manager is dropped.

use crate::engine::Engine;

/// One janitor run: cleanup, logged.
pub(crate) fn run(engine: &Engine) {
    match super::cleanup::cleanup_shard(engine, |_| {}) {
        Ok(report) => tracing::debug!(
            rows_removed = report.rows_removed(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "pgcache: janitor cleanup done"
        ),
        Err(error) => tracing::warn!(%error, "pgcache: janitor cleanup failed"),
    }
}
