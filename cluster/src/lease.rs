//! One etcd lease kept alive by one task, with the keys a process publishes on it and,
//! optionally, a campaign for a leader key.
//!
//! Nodes publish their record and ready epoch; routers their record, the epoch they serve and
//! their suspect reports; the planner election is a create-if-absent key on the lease. When the
//! lease is lost (etcd restarted, or keep-alives starved past the TTL) the task grants a new one
//! and puts every key again, so a process re-registers by itself when etcd returns.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::ClusterError;

/// What the task keeps in etcd.
#[derive(Debug, Clone, Default, PartialEq)]
struct Wanted {
    values: BTreeMap<String, Vec<u8>>,
    /// `(key, id)`: hold `key` with value `id` on the lease whenever it is free.
    campaign: Option<(String, String)>,
}

/// A live lease and its keys: dropping it (or [`LeasedKeys::shutdown`]) revokes the lease, so
/// the keys vanish at once instead of at the TTL.
pub struct LeasedKeys {
    wanted: watch::Sender<Wanted>,
    leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LeasedKeys {
    /// Grants a lease of `ttl`, puts `initial` on it and keeps it alive. The first put happens
    /// before returning, so callers know they are visible.
    pub async fn start(
        etcd: &crate::config::EtcdConnection,
        ttl: Duration,
        initial: BTreeMap<String, Vec<u8>>,
    ) -> Result<Self, ClusterError> {
        let mut client = etcd.connect_for_streams().await?;
        let wanted = Wanted {
            values: initial,
            campaign: None,
        };
        let lease = grant_and_put(&mut client, ttl, &wanted).await?;
        let (wanted_tx, wanted_rx) = watch::channel(wanted);
        let (leader_tx, leader_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(keep_alive(
            client, ttl, lease, wanted_rx, leader_tx, stop_rx,
        ));
        Ok(Self {
            wanted: wanted_tx,
            leader: leader_rx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Puts (or replaces) `key` on the lease; a no-op when the value is unchanged.
    pub fn set(&self, key: String, value: Vec<u8>) {
        self.wanted.send_if_modified(|w| {
            if w.values.get(&key) == Some(&value) {
                return false;
            }
            w.values.insert(key, value);
            true
        });
    }

    /// Deletes `key` if this lease put it.
    pub fn remove(&self, key: &str) {
        self.wanted
            .send_if_modified(|w| w.values.remove(key).is_some());
    }

    /// Keys this lease currently publishes.
    pub fn keys(&self) -> Vec<String> {
        self.wanted.borrow().values.keys().cloned().collect()
    }

    /// Holds `key` = `id` on this lease whenever nobody else does (create-if-absent election).
    pub fn campaign(&self, key: String, id: String) {
        self.wanted.send_modify(|w| w.campaign = Some((key, id)));
    }

    /// Whether the campaign key is ours on a live lease, as of the last keep-alive.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Revokes the lease and waits for the task to end.
    pub async fn shutdown(mut self) {
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

/// Bounds an etcd call: the keep-alive client has no request timeout of its own (it would cut
/// the keep-alive stream).
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    tokio::time::timeout(crate::config::ETCD_CALL_TIMEOUT, call)
        .await
        .map_err(|_| ClusterError::Timeout)?
}

async fn grant_and_put(
    client: &mut Client,
    ttl: Duration,
    wanted: &Wanted,
) -> Result<i64, ClusterError> {
    bounded(grant_and_put_unbounded(client, ttl, wanted)).await
}

async fn grant_and_put_unbounded(
    client: &mut Client,
    ttl: Duration,
    wanted: &Wanted,
) -> Result<i64, ClusterError> {
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await?
        .id();
    for (key, value) in &wanted.values {
        client
            .put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
    }
    Ok(lease)
}

/// Brings etcd from `published` to `wanted`: puts what changed, deletes what was dropped.
async fn sync(
    client: &mut Client,
    lease: i64,
    published: &Wanted,
    wanted: &Wanted,
) -> Result<(), ClusterError> {
    for (key, value) in &wanted.values {
        if published.values.get(key) != Some(value) {
            client
                .put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
        }
    }
    for key in published.values.keys() {
        if !wanted.values.contains_key(key) {
            client.delete(key.clone(), None).await?;
        }
    }
    Ok(())
}

/// Takes the campaign key if it is free (or already ours from an older lease of this process).
async fn campaign(
    client: &mut Client,
    lease: i64,
    key: &str,
    id: &str,
) -> Result<bool, ClusterError> {
    let put = TxnOp::put(key, id, Some(PutOptions::new().with_lease(lease)));
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([put.clone()])
        .or_else([TxnOp::get(key, None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        return Ok(true);
    }
    let holder = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())),
        _ => None,
    });
    match holder {
        Some((value, held_on)) if value == id.as_bytes() => {
            if held_on != lease {
                // Ours from before a re-grant: move it onto the live lease.
                let txn = Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, id)])
                    .and_then([put]);
                return Ok(client.txn(txn).await?.succeeded());
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Keep-alives every TTL/3, re-puts on change, re-registers after the lease is lost.
async fn keep_alive(
    mut client: Client,
    ttl: Duration,
    mut lease: i64,
    mut wanted: watch::Receiver<Wanted>,
    leader: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let interval = (ttl / 3).max(Duration::from_millis(100));
    let mut keeper = tokio::time::timeout(interval, client.lease_keep_alive(lease))
        .await
        .ok()
        .and_then(Result::ok);
    let mut published = wanted.borrow().clone();
    let mut outage = crate::config::EtcdOutage::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => {
                let _ = leader.send(false);
                let _ = tokio::time::timeout(crate::config::ETCD_CALL_TIMEOUT, client.lease_revoke(lease)).await;
                return;
            }
            changed = wanted.changed() => {
                if changed.is_err() {
                    let _ = client.lease_revoke(lease).await;
                    return;
                }
                let next = wanted.borrow_and_update().clone();
                if next.values != published.values {
                    match bounded(sync(&mut client, lease, &published, &next)).await {
                        Ok(()) => published.values = next.values.clone(),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not update leased keys; will retry");
                            keeper = None;
                        }
                    }
                }
                published.campaign = next.campaign.clone();
            }
            _ = ticker.tick() => {
                let alive = match keeper.as_mut() {
                    Some((k, stream)) => match tokio::time::timeout(interval, k.keep_alive()).await.unwrap_or(Err(etcd_client::Error::InvalidArgs("keep-alive timed out".into()))) {
                        // A keep-alive answered with TTL 0 means the lease already expired.
                        Ok(()) => matches!(
                            tokio::time::timeout(interval, stream.message()).await,
                            Ok(Ok(Some(r))) if r.ttl() > 0
                        ),
                        Err(_) => false,
                    },
                    None => false,
                };
                if !alive {
                    let _ = leader.send(false);
                    let current = wanted.borrow().clone();
                    match grant_and_put(&mut client, ttl, &current).await {
                        Ok(new_lease) => {
                            outage.ok("lease");
                            lease = new_lease;
                            keeper = tokio::time::timeout(interval, client.lease_keep_alive(lease)).await.ok().and_then(Result::ok);
                            published = current;
                            tracing::info!(lease, keys = published.values.len(), "registered again in etcd");
                        }
                        Err(e) => {
                            outage.failed("lease", &e);
                            continue;
                        }
                    }
                } else if published.values != wanted.borrow().values {
                    // A previous update failed while the lease stayed alive: retry it.
                    let current = wanted.borrow().clone();
                    if bounded(sync(&mut client, lease, &published, &current)).await.is_ok() {
                        published.values = current.values;
                    }
                }
                let campaign_key = wanted.borrow().campaign.clone();
                if let Some((key, id)) = campaign_key {
                    let won = match bounded(campaign(&mut client, lease, &key, &id)).await {
                        Ok(won) => won,
                        Err(e) => {
                            tracing::warn!(error = %e, "election round failed");
                            false
                        }
                    };
                    leader.send_if_modified(|l| {
                        let changed = *l != won;
                        *l = won;
                        changed
                    });
                }
            }
        }
    }
}
