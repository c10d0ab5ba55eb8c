//! Logs a discovery outage once when it starts and once when it ends, instead of at every
//! retry.

use std::time::Instant;

#[derive(Debug, Default)]
pub struct Outage {
    /// When the first failed call of the current outage happened.
    since: Option<Instant>,
}

impl Outage {
    pub fn failed(&mut self, who: &str, error: &dyn std::fmt::Display) {
        if self.since.is_none() {
            tracing::warn!(who, %error, "etcd unreachable; serving the last placement, retrying");
            self.since = Some(Instant::now());
        } else {
            tracing::debug!(who, %error, "etcd still unreachable");
        }
    }

    pub fn ok(&mut self, who: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(who, down_for = ?since.elapsed(), "etcd reachable again");
        }
    }

    pub fn is_down(&self) -> bool {
        self.since.is_some()
    }
}
