//! Periodic work off the request path (flushing counters, the janitor), one thread
//! per task.
//!
//! The thread holds only a weak reference to what it works on, and the owner holds
//! the sending half of a channel the thread sleeps on: dropping the owner
//! disconnects the channel, which wakes the thread and ends it at once.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Owns a background thread: [`nudge`](Self::nudge) runs its task early, dropping
/// this stops it.
#[derive(Debug)]
pub(crate) struct Worker {
    wake: SyncSender<()>,
}

impl Worker {
    /// Starts a thread named `name` that runs `task` every `interval` (and when
    /// nudged) while `target` is alive. `None` if the thread cannot be started.
    pub(crate) fn spawn<T: Send + Sync + 'static>(
        name: &str,
        interval: Duration,
        target: Weak<T>,
        task: impl Fn(&Arc<T>) + Send + 'static,
    ) -> Option<Self> {
        // One pending nudge is enough: the task handles everything pending.
        let (wake, woken) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || loop {
                match woken.recv_timeout(interval) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {
                        // Not upgradable while the owner is still being built.
                        if let Some(target) = target.upgrade() {
                            task(&target);
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            });
        match spawned {
            Ok(_) => Some(Worker { wake }),
            Err(error) => {
                tracing::error!(%error, thread = name, "pgcache: cannot start a background thread");
                None
            }
        }
    }

    /// Runs the task as soon as the thread is free, without waiting for it.
    pub(crate) fn nudge(&self) {
        // Full: a nudge is already pending, which is all this asks for.
        let _ = self.wake.try_send(());
    }
}
