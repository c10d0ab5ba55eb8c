//! One lease kept alive by one task, with the keys a process publishes on it and, optionally,
//! a campaign for a leader key.
//!
//! Nodes publish their record and ready epoch; routers their record, the epoch they serve,
//! their suspect reports and collective records; the planner election is a create-if-absent
//! key on the lease. When the lease is lost (etcd restarted, or keep-alives starved past the
//! TTL) the task grants a new one and puts every key again, so a process re-registers by
//! itself when etcd returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::error::{DiscoveryError, Result};
use super::kv::CALL_TIMEOUT;
use super::outage::Outage;
use super::store::LeaseClient;

/// What the task keeps in the store.
#[derive(Debug, Clone, Default, PartialEq)]
struct Wanted {
    values: BTreeMap<String, Vec<u8>>,
    /// `(key, id)`: hold `key` with value `id` on the lease whenever it is free.
    campaign: Option<(String, String)>,
}

/// A live lease and its keys: dropping it (or [`LeasedKeys::shutdown`]) revokes the lease, so
/// the keys vanish at once instead of at the TTL.
pub(crate) struct LeasedKeys {
    wanted: watch::Sender<Wanted>,
    /// Asks the keeper to campaign now rather than at its next keep-alive.
    campaign_now: Arc<Notify>,
    leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LeasedKeys {
    /// Grants a lease of `ttl`, puts `initial` on it and keeps it alive. The first put happens
    /// before returning, so callers know they are visible.
    pub(crate) async fn start(
        mut client: LeaseClient,
        ttl: Duration,
        initial: BTreeMap<String, Vec<u8>>,
        campaign: Option<(String, String)>,
    ) -> Result<Self> {
        let wanted = Wanted {
            values: initial,
            campaign,
        };
        let lease = bounded(grant_and_put(&mut client, ttl, &wanted)).await?;
        let (wanted_tx, wanted_rx) = watch::channel(wanted.clone());
        let (leader_tx, leader_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel();
        let campaign_now = Arc::new(Notify::new());
        let keeper = Keeper {
            campaign_now: Arc::clone(&campaign_now),
            client,
            ttl,
            lease,
            wanted: wanted_rx,
            published: wanted,
            lost: false,
            leader: leader_tx,
            outage: Outage::default(),
        };
        let task = tokio::spawn(keeper.run(stop_rx));
        Ok(Self {
            wanted: wanted_tx,
            campaign_now,
            leader: leader_rx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Puts (or replaces) `key` on the lease; a no-op when the value is unchanged.
    pub(crate) fn set(&self, key: String, value: Vec<u8>) {
        self.wanted.send_if_modified(|w| {
            if w.values.get(&key) == Some(&value) {
                return false;
            }
            w.values.insert(key, value);
            true
        });
    }

    /// Deletes `key` if this lease put it.
    pub(crate) fn remove(&self, key: &str) {
        self.wanted
            .send_if_modified(|w| w.values.remove(key).is_some());
    }

    /// Keys this lease currently publishes.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.wanted.borrow().values.keys().cloned().collect()
    }

    /// Whether the campaign key is ours on a live lease, as of the last keep-alive.
    /// Campaigns at once (the owner saw the campaign key free) instead of at the next
    /// keep-alive, up to TTL/3 away.
    pub(crate) fn campaign_soon(&self) {
        self.campaign_now.notify_one();
    }

    pub(crate) fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Returns once the campaign key is ours (at once if it is).
    pub(crate) async fn leading(&self) {
        let mut leader = self.leader.clone();
        let _ = leader.wait_for(|l| *l).await;
    }

    /// Revokes the lease and waits for the task to end.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeasedKeys {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Bounds a store call: the lease client has no request timeout of its own (it would cut the
/// keep-alive stream).
async fn bounded<T>(call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| DiscoveryError::Timeout)?
}

async fn grant_and_put(client: &mut LeaseClient, ttl: Duration, wanted: &Wanted) -> Result<i64> {
    let lease = client.grant(ttl).await?;
    for (key, value) in &wanted.values {
        client.put(key, value.clone(), lease).await?;
    }
    Ok(lease)
}

/// Brings the store from `published` to `wanted`: puts what changed, deletes what was dropped.
async fn sync(
    client: &mut LeaseClient,
    lease: i64,
    published: &Wanted,
    wanted: &Wanted,
) -> Result<()> {
    for (key, value) in &wanted.values {
        if published.values.get(key) != Some(value) {
            client.put(key, value.clone(), lease).await?;
        }
    }
    for key in published.values.keys() {
        if !wanted.values.contains_key(key) {
            client.delete(key).await?;
        }
    }
    Ok(())
}

/// What woke the keeper.
enum Wake {
    Stop,
    Changed,
    Tick,
    Campaign,
}

/// The task's state: the lease it keeps and what it should hold.
struct Keeper {
    client: LeaseClient,
    campaign_now: Arc<Notify>,
    ttl: Duration,
    lease: i64,
    wanted: watch::Receiver<Wanted>,
    /// What the store holds on the lease (a change made before the task first ran is not
    /// in it yet).
    published: Wanted,
    /// A failed update left the store in an unknown state: register again at the next tick.
    lost: bool,
    leader: watch::Sender<bool>,
    outage: Outage,
}

impl Keeper {
    /// Keep-alives every TTL/3, re-puts on change, re-registers after the lease is lost.
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let interval = (self.ttl / 3).max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                _ = &mut stop => Wake::Stop,
                changed = self.wanted.changed() => match changed {
                    Ok(()) => Wake::Changed,
                    // The owner is gone.
                    Err(_) => Wake::Stop,
                },
                _ = ticker.tick() => Wake::Tick,
                () = self.campaign_now.notified() => Wake::Campaign,
            };
            // A stop does not wait for a store call under way: a keep-alive may wait up to
            // TTL/3 for its answer, and the keys must go now (another router plans at once).
            let stopped = match wake {
                Wake::Stop => true,
                Wake::Changed => tokio::select! {
                    _ = &mut stop => true,
                    () = self.publish_change() => false,
                },
                Wake::Tick => tokio::select! {
                    _ = &mut stop => true,
                    () = self.tick(interval) => false,
                },
                Wake::Campaign if self.lost => false,
                Wake::Campaign => tokio::select! {
                    _ = &mut stop => true,
                    () = self.campaign() => false,
                },
            };
            if stopped {
                let _ = self.leader.send(false);
                let revoked = self.client.revoke(self.lease);
                let _ = tokio::time::timeout(CALL_TIMEOUT, revoked).await;
                return;
            }
        }
    }

    /// Puts what the owner changed.
    async fn publish_change(&mut self) {
        let next = self.wanted.borrow_and_update().clone();
        if next.values != self.published.values {
            let synced = sync(&mut self.client, self.lease, &self.published, &next);
            match bounded(synced).await {
                Ok(()) => self.published.values = next.values.clone(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not update leased keys; will retry");
                    self.lost = true;
                }
            }
        }
        self.published.campaign = next.campaign;
    }

    /// One keep-alive; a lost lease is granted again with every key. Then a campaign round.
    async fn tick(&mut self, interval: Duration) {
        if self.lost || !self.client.renew(self.lease, interval).await {
            let _ = self.leader.send(false);
            let current = self.wanted.borrow().clone();
            match bounded(grant_and_put(&mut self.client, self.ttl, &current)).await {
                Ok(lease) => {
                    self.outage.ok("lease");
                    self.lease = lease;
                    self.lost = false;
                    self.published = current;
                    let keys = self.published.values.len();
                    tracing::info!(lease, keys, "registered again in etcd");
                }
                Err(e) => {
                    self.outage.failed("lease", &e);
                    self.lost = true;
                    return;
                }
            }
        } else if self.published.values != self.wanted.borrow().values {
            // A previous update failed while the lease stayed alive: retry it.
            let current = self.wanted.borrow().clone();
            let synced = sync(&mut self.client, self.lease, &self.published, &current);
            if bounded(synced).await.is_ok() {
                self.published.values = current.values;
            }
        }
        self.campaign().await;
    }

    /// Takes the campaign key if it is free, and publishes whether this lease holds it.
    async fn campaign(&mut self) {
        let Some((key, id)) = self.wanted.borrow().campaign.clone() else {
            return;
        };
        let won = match bounded(self.client.campaign(&key, &id, self.lease)).await {
            Ok(won) => won,
            Err(e) => {
                tracing::warn!(error = %e, "election round failed");
                false
            }
        };
        self.leader.send_if_modified(|l| {
            let changed = *l != won;
            *l = won;
            changed
        });
    }
}
