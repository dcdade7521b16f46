//! The opt-in background janitor: a thread that runs
//! [`CacheManager::cleanup`] every `janitor_interval`, for services that do not run
//! `pgcache cleanup` from cron.
//!
//! The thread holds only a weak reference to the manager, and the manager holds the
//! sending half of a channel the thread sleeps on: dropping the last clone of the
//! manager disconnects the channel, which wakes the thread and ends it at once.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use crate::config::CacheConfig;
use crate::manager::{CacheManager, WeakManager};

/// Kept by the manager; its drop stops the janitor.
#[derive(Debug)]
pub(crate) struct JanitorStop {
    _sender: Sender<()>,
}

/// A janitor configured but not started yet (the manager does not exist yet).
#[derive(Debug)]
pub(crate) struct Janitor {
    interval: Duration,
    stopped: Receiver<()>,
}

/// The two halves of a janitor, when `config` asks for one and caching is enabled.
pub(crate) fn prepare(
    config: &CacheConfig,
    enabled: bool,
) -> (Option<JanitorStop>, Option<Janitor>) {
    match config.janitor_interval() {
        Some(interval) if enabled => {
            let (stop, stopped) = mpsc::channel();
            (
                Some(JanitorStop { _sender: stop }),
                Some(Janitor { interval, stopped }),
            )
        }
        _ => (None, None),
    }
}

impl Janitor {
    /// Starts the thread; the first cleanup runs one interval from now.
    pub(crate) fn start(self, manager: &CacheManager) {
        let manager = manager.downgrade();
        let spawned = std::thread::Builder::new()
            .name("pgcache-janitor".to_owned())
            .spawn(move || self.run(&manager));
        if let Err(error) = spawned {
            tracing::error!(%error, "pgcache: cannot start the janitor thread; run `pgcache cleanup` from cron instead");
        }
    }

    fn run(self, manager: &WeakManager) {
        // Nothing is ever sent: the wait ends by timeout (time to clean) or by
        // disconnection (the last manager clone is gone).
        while let Err(RecvTimeoutError::Timeout) = self.stopped.recv_timeout(self.interval) {
            let Some(manager) = manager.upgrade() else {
                return;
            };
            match manager.cleanup() {
                Ok(report) => tracing::debug!(
                    rows_removed = report.rows_removed(),
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "pgcache: janitor cleanup done"
                ),
                Err(error) => tracing::warn!(%error, "pgcache: janitor cleanup failed"),
            }
        }
    }
}
