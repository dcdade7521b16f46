//! Progress display for long operations: a spinner on a terminal, nothing otherwise
//! (cron mails and log files stay clean).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pgcache::CleanupProgress;

pub(crate) struct Spinner(ProgressBar);

impl Spinner {
    /// A spinner when `show` and stderr is a terminal, else nothing.
    pub(crate) fn new(show: bool) -> Self {
        if !show || !std::io::stderr().is_terminal() {
            return Spinner(ProgressBar::hidden());
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        Spinner(bar)
    }

    pub(crate) fn message(&self, message: &str) {
        self.0.set_message(message.to_owned());
    }

    pub(crate) fn update(&self, progress: &CleanupProgress) {
        self.0.set_message(format!(
            "cleaning {}: {} rows removed ({} in total)",
            progress.table, progress.table_rows_removed, progress.rows_removed
        ));
    }

    pub(crate) fn finish(self) {
        self.0.finish_and_clear();
    }
}
