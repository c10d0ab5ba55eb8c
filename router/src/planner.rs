//! Membership, placement epochs and load balance, run by every router; only the elected one
//! writes placements.
//!
//! Each round (every `poll`, or at once when a dispatch reports a failed node) it reads the
//! cluster snapshot from etcd. The elected planner (holder of the `planner` key on its lease)
//! plans the next epoch when the usable nodes differ from the placement's (joined, drained,
//! draining on SIGTERM, suspect after a failed dispatch, lease expired), or when the measured
//! load is imbalanced past the threshold (replicating hot experts), and writes it in a
//! transaction guarded by both its planner key and the placement revision it read. Every router
//! switches to an epoch once all its nodes report `ready >= epoch`, and publishes the epoch it
//! serves so nodes know when old experts can go. With etcd down everything keeps serving the
//! last placement; for a grace period after etcd returns, nodes missing from it are not
//! dropped, since they are re-registering.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use moe_cluster::membership::{clear_drain, list_nodes, Membership};
use moe_cluster::placement::{ExpertId, Placement, PlacementStore};
use moe_cluster::{ClusterKeys, NodeState, RouterRegistration};
use moe_proto::v1::inference_server::InferenceServer;
use tonic_health::server::HealthReporter;

use crate::cluster_view::{ClusterView, ServingPlacement};
use crate::dispatch::NodeLink;
use crate::server::inference::InferenceService;

/// When and how the planner replicates hot experts.
#[derive(Debug, Clone)]
pub struct RebalancePolicy {
    /// Re-plan when max node load / mean node load over a window exceeds this (0: never).
    pub threshold: f64,
    /// Length of the load window.
    pub window: Duration,
    /// Fewest dispatched pairs in a window for its ratio to count.
    pub min_pairs: u64,
    /// Extra expert copies per MoE layer a rebalance may place.
    pub redundant_per_layer: usize,
}

pub struct PlannerContext {
    pub etcd: moe_cluster::EtcdConnection,
    pub keys: ClusterKeys,
    pub router_address: String,
    pub fingerprint: String,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub view: Arc<ClusterView>,
    pub health: HealthReporter,
    pub poll: Duration,
    pub lease_ttl: Duration,
    /// How long a failed node stays out of placements while its lease lives on.
    pub suspect_ttl: Duration,
    /// After (re)connecting to etcd, nodes missing from it are kept this long.
    pub membership_grace: Duration,
    pub links: crate::dispatch::LinkSettings,
    /// The router's own batch bound, for nodes that publish none.
    pub max_batch_rows: usize,
    /// `--transport`: the per-epoch collective, if any.
    pub collective: crate::collective::CollectiveSettings,
    pub rebalance: RebalancePolicy,
}

/// Dispatched load since the window started.
struct LoadWindow {
    started: Instant,
    experts: HashMap<ExpertId, u64>,
    /// Pairs dispatched per (layer, node) at the window's start.
    nodes: BTreeMap<(u32, String), u64>,
}

struct Planner {
    ctx: PlannerContext,
    client: Option<Client>,
    connected_at: Instant,
    registration: Option<RouterRegistration>,
    links: BTreeMap<String, Arc<NodeLink>>,
    window: LoadWindow,
    last_rebalance: Option<Instant>,
    was_planner: bool,
    outage: moe_cluster::config::EtcdOutage,
    /// The last closed window's imbalance ratio and per-expert load, until a round uses it.
    pending_load: Option<(f64, HashMap<ExpertId, u64>)>,
}

/// Pause after a wake-up, so that a burst of etcd events costs one round.
const COALESCE: Duration = Duration::from_millis(5);

pub async fn run_planner(ctx: PlannerContext) {
    let window = LoadWindow {
        started: Instant::now(),
        experts: HashMap::new(),
        nodes: BTreeMap::new(),
    };
    let mut planner = Planner {
        ctx,
        client: None,
        connected_at: Instant::now(),
        registration: None,
        links: BTreeMap::new(),
        window,
        last_rebalance: None,
        was_planner: false,
        outage: Default::default(),
        pending_load: None,
    };
    let changes = moe_cluster::watch::spawn_change_waker(
        planner.ctx.etcd.clone(),
        planner.ctx.keys.root().to_string(),
    );
    loop {
        planner.round().await;
        let view = Arc::clone(&planner.ctx.view);
        tokio::select! {
            _ = tokio::time::sleep(planner.ctx.poll) => {}
            _ = view.wake_planner.notified() => {}
            _ = changes.notified() => {}
        }
        // Coalesce bursts of changes (several keys of one transition) into one round.
        tokio::time::sleep(COALESCE).await;
    }
}

impl Planner {
    async fn round(&mut self) {
        if self.client.is_none() {
            match self.ctx.etcd.connect().await {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    self.outage.failed("planner", &e);
                    self.ctx.view.is_planner.store(false, Ordering::Relaxed);
                }
            }
        }
        if self.registration.is_none() && self.client.is_some() {
            match RouterRegistration::start(
                &self.ctx.etcd,
                self.ctx.keys.clone(),
                self.ctx.view.router_id.clone(),
                self.ctx.router_address.clone(),
                self.ctx.lease_ttl,
            )
            .await
            {
                Ok(r) => self.registration = Some(r),
                Err(e) => tracing::warn!(error = %e, "cannot register the router in etcd yet"),
            }
        }
        self.measure_load();
        if self.client.is_some() {
            match self.plan_once().await {
                Ok(()) => {
                    if self.outage.is_down() {
                        // Nodes re-register after an outage: give them a grace period.
                        self.connected_at = Instant::now();
                    }
                    self.outage.ok("planner");
                }
                Err(e) => {
                    self.outage.failed("planner", &e);
                    self.client = None;
                }
            }
        }
        self.reform_collective();
    }

    /// A new communicator for the served epoch when its last one failed and the backoff is
    /// over (see `EpochCollective`): the epoch did not change, so neither did its nodes.
    fn reform_collective(&self) {
        let Some(serving) = self.ctx.view.serving() else {
            return;
        };
        if !serving.collective.reform_due(Instant::now()) {
            return;
        }
        tracing::info!(
            epoch = serving.placement.epoch,
            failures = serving.collective.failures(),
            "re-forming the epoch's collective"
        );
        crate::collective::start_for_epoch(
            &self.ctx.collective,
            serving,
            &self.ctx.view.membership(),
            self.registration.as_ref(),
        );
    }

    /// Closes the load window when due: the imbalance ratio of what this router dispatched.
    fn measure_load(&mut self) {
        let policy = &self.ctx.rebalance;
        if self.window.started.elapsed() < policy.window {
            return;
        }
        // Pairs per (layer, node) dispatched in the window.
        let now: BTreeMap<(u32, String), u64> = self
            .links
            .iter()
            .flat_map(|(id, l)| {
                l.pairs_by_layer()
                    .into_iter()
                    .map(move |(layer, n)| ((layer, id.clone()), n))
            })
            .collect();
        let serving = self.ctx.view.serving();
        let serving_nodes: Vec<&str> = serving
            .iter()
            .flat_map(|s| s.links.iter().map(|l| l.node_id.as_str()))
            .collect();
        let mut per_layer: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        let mut total = 0u64;
        for layer in now
            .keys()
            .map(|(l, _)| *l)
            .collect::<std::collections::BTreeSet<_>>()
        {
            let loads = serving_nodes
                .iter()
                .map(|id| {
                    let key = (layer, id.to_string());
                    let n = now.get(&key).copied().unwrap_or(0);
                    let delta = n - self.window.nodes.get(&key).copied().unwrap_or(0).min(n);
                    total += delta;
                    delta as f64
                })
                .collect();
            per_layer.insert(layer, loads);
        }
        let ratio = if total >= policy.min_pairs.max(1) {
            moe_cluster::placement::imbalance_ratio(per_layer.into_values())
        } else {
            0.0
        };
        drop(serving);
        self.window.nodes = now;
        self.ctx
            .view
            .imbalance_milli
            .store((ratio * 1000.0).round() as u64, Ordering::Relaxed);
        self.window.started = Instant::now();
        let counts = self.ctx.view.expert_token_counts();
        let window_load: HashMap<ExpertId, u64> = counts
            .iter()
            .map(|(e, c)| {
                (
                    *e,
                    c - self.window.experts.get(e).copied().unwrap_or(0).min(*c),
                )
            })
            .collect();
        self.window.experts = counts;
        self.pending_load = Some((ratio, window_load));
    }

    async fn plan_once(&mut self) -> Result<(), moe_cluster::ClusterError> {
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        let ctx = &self.ctx;
        let membership = list_nodes(client, &ctx.keys).await?;
        ctx.view.set_membership(membership.clone());
        let local_suspects = ctx.view.suspects(ctx.suspect_ttl, &membership);
        let is_planner = self.registration.as_ref().is_some_and(|r| r.is_planner());
        if let Some(r) = &self.registration {
            r.set_suspects(&local_suspects);
        }
        if is_planner != self.was_planner {
            tracing::info!(
                router_id = %ctx.view.router_id,
                is_planner,
                "planner role changed"
            );
            self.was_planner = is_planner;
        }
        ctx.view.is_planner.store(is_planner, Ordering::Relaxed);
        if let Ok(mut p) = ctx.view.planner_id.write() {
            *p = membership.planner.clone();
        }
        let mut store = PlacementStore::new(client.clone(), ctx.keys.clone());
        let (mut current, revision) = store.read().await?;
        let pending_load = self.pending_load.take();
        if is_planner {
            let planner_id = ctx.view.router_id.as_str();
            let stale = current
                .as_ref()
                .is_some_and(|p| p.fingerprint != ctx.fingerprint);
            let mut live = eligible(ctx, &membership, &local_suspects);
            if self.connected_at.elapsed() < ctx.membership_grace || self.outage.is_down() {
                // Just back in touch with etcd: nodes of the placement that have not
                // re-registered yet are probably doing so; do not move their experts away.
                if let Some(p) = current.as_ref().filter(|_| !stale) {
                    for (id, a) in &p.nodes {
                        if !membership.nodes.contains_key(id) {
                            live.entry(id.clone()).or_insert_with(|| a.address.clone());
                        }
                    }
                }
            }
            let current_nodes: Option<BTreeMap<String, String>> = current.as_ref().map(|p| {
                p.nodes
                    .iter()
                    .map(|(id, a)| (id.clone(), a.address.clone()))
                    .collect()
            });
            let epoch = current.as_ref().map(|p| p.epoch).unwrap_or(0) + 1;
            let mut next = None;
            let mut reason = String::new();
            // Nodes the next epoch leaves out because a router saw them fail while their
            // lease still lives (the crash path that does not wait for the lease TTL).
            let mut suspected = Vec::new();
            if !live.is_empty() && (stale || current_nodes.as_ref() != Some(&live)) {
                let previous = current.as_ref().filter(|_| !stale);
                let joined: Vec<&String> = live
                    .keys()
                    .filter(|id| current_nodes.as_ref().is_none_or(|c| !c.contains_key(*id)))
                    .collect();
                let left: Vec<&String> = current_nodes
                    .iter()
                    .flat_map(|c| c.keys())
                    .filter(|id| !live.contains_key(*id))
                    .collect();
                suspected = suspects_left(&membership, &local_suspects, &left);
                reason =
                    format!("membership: joined {joined:?}, left {left:?} (suspect {suspected:?})");
                next = Some(Placement::plan(
                    epoch,
                    &ctx.fingerprint,
                    &ctx.moe_layers,
                    ctx.num_experts,
                    &live,
                    previous,
                )?);
            } else if let (Some((ratio, load)), Some(p)) = (&pending_load, current.as_ref()) {
                let serving_epoch = ctx.view.serving().map(|s| s.placement.epoch);
                let policy = &ctx.rebalance;
                let due = self
                    .last_rebalance
                    .is_none_or(|t| t.elapsed() >= policy.window * 2);
                if policy.threshold > 0.0
                    && *ratio > policy.threshold
                    && due
                    && serving_epoch == Some(p.epoch)
                {
                    let candidate = p.rebalance(epoch, load, policy.redundant_per_layer);
                    let before = p.expected_imbalance(load);
                    let after = candidate.expected_imbalance(load);
                    if after < before * 0.95 && candidate != *p {
                        reason = format!(
                            "rebalance: measured imbalance {ratio:.2}, expected {before:.2} -> {after:.2}, {} replicas",
                            candidate.replica_count()
                        );
                        next = Some(candidate);
                    }
                }
            }
            if let Some(next) = next {
                match store.write(&next, revision, Some(planner_id)).await {
                    Ok(()) => {
                        let moved = current.as_ref().map(|c| c.moves_to(&next));
                        tracing::info!(
                            epoch = next.epoch,
                            nodes = ?next.nodes.keys().collect::<Vec<_>>(),
                            experts_moved = ?moved,
                            %reason,
                            "planned placement"
                        );
                        if reason.starts_with("rebalance") {
                            self.last_rebalance = Some(Instant::now());
                            ctx.view.rebalances.fetch_add(1, Ordering::Relaxed);
                        }
                        if !suspected.is_empty() {
                            ctx.view.suspect_replans.fetch_add(1, Ordering::Relaxed);
                        }
                        current = Some(next);
                    }
                    Err(moe_cluster::ClusterError::PlacementConflict(_)) => {
                        tracing::info!(epoch, "another planner wrote first; following it");
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            // Drain requests for nodes that are gone and placed nowhere are done.
            for id in &membership.drains {
                let placed = current.as_ref().is_some_and(|p| p.nodes.contains_key(id));
                if !membership.nodes.contains_key(id) && !placed {
                    clear_drain(client, &ctx.keys, id).await?;
                }
            }
        }
        let Some(latest) = current else { return Ok(()) };
        ctx.view.set_latest(latest.clone());
        let serving_epoch = ctx.view.serving().map(|s| s.placement.epoch).unwrap_or(0);
        if let Some(r) = &self.registration {
            r.set_serving_epoch(serving_epoch);
        }
        if latest.epoch <= serving_epoch || latest.fingerprint != ctx.fingerprint {
            return Ok(());
        }
        let all_ready = latest
            .nodes
            .keys()
            .all(|id| membership.ready.get(id).is_some_and(|&e| e >= latest.epoch));
        if !all_ready {
            return Ok(());
        }
        let mut epoch_links = Vec::with_capacity(latest.nodes.len());
        for (id, assignment) in &latest.nodes {
            // The node's published batch bound (0 from nodes before it: then the router's).
            let max_rows = membership
                .nodes
                .get(id)
                .map(|r| r.max_batch_rows as usize)
                .filter(|&rows| rows > 0)
                .unwrap_or(ctx.max_batch_rows);
            let link = match self.links.get(id) {
                Some(l) if l.address == assignment.address && l.max_rows == max_rows => {
                    Arc::clone(l)
                }
                _ => {
                    let l = NodeLink::connect(
                        id.clone(),
                        assignment.address.clone(),
                        max_rows,
                        &ctx.links,
                    );
                    self.links.insert(id.clone(), Arc::clone(&l));
                    l
                }
            };
            epoch_links.push(link);
        }
        self.links.retain(|id, _| latest.nodes.contains_key(id));
        tracing::info!(
            epoch = latest.epoch,
            previous = serving_epoch,
            nodes = ?latest.nodes.keys().collect::<Vec<_>>(),
            "serving on new placement"
        );
        let epoch = latest.epoch;
        ctx.view
            .set_serving(ServingPlacement::new(latest, epoch_links));
        if let Some(r) = &self.registration {
            r.set_serving_epoch(epoch);
        }
        if let Some(serving) = ctx.view.serving() {
            crate::collective::start_for_epoch(
                &ctx.collective,
                serving,
                &membership,
                self.registration.as_ref(),
            );
        }
        ctx.health
            .set_serving::<InferenceServer<InferenceService>>()
            .await;
        ctx.health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        Ok(())
    }
}

/// Of the nodes `left` out of the next epoch, those still registered (lease alive) whose
/// current instance this router or another reported failing.
fn suspects_left(
    membership: &Membership,
    local_suspects: &[(String, String)],
    left: &[&String],
) -> Vec<String> {
    left.iter()
        .map(|id| id.as_str())
        .filter(|id| {
            membership.nodes.get(*id).is_some_and(|r| {
                membership.is_suspect(id)
                    || local_suspects
                        .iter()
                        .any(|(s, i)| s == id && *i == r.instance)
            })
        })
        .map(String::from)
        .collect()
}

/// Live nodes of this checkpoint that may hold experts: id to address. Draining nodes, nodes
/// an operator asked to drain and nodes some router saw fail are left out.
fn eligible(
    ctx: &PlannerContext,
    membership: &Membership,
    local_suspects: &[(String, String)],
) -> BTreeMap<String, String> {
    membership
        .nodes
        .iter()
        .filter(|(id, r)| {
            r.fingerprint == ctx.fingerprint
                && r.state != NodeState::Draining
                && !membership.drains.contains(id)
                && !membership.is_suspect(id)
                && !local_suspects
                    .iter()
                    .any(|(s, i)| s == *id && *i == r.instance)
        })
        .map(|(id, r)| (id.clone(), r.address.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_cluster::membership::NodeRecord;

    /// A registered node (from its JSON, so that fields added later keep their defaults).
    fn record(instance: &str) -> NodeRecord {
        serde_json::from_value(serde_json::json!({
            "address": "127.0.0.1:1",
            "device": "cpu",
            "memory_bytes": 0,
            "state": "ready",
            "fingerprint": "f",
            "instance": instance,
        }))
        .expect("a node record")
    }

    #[test]
    fn only_registered_nodes_reported_failing_count_as_suspect_departures() {
        let mut m = Membership::default();
        m.nodes.insert("local".into(), record("a"));
        m.nodes.insert("remote".into(), record("b"));
        m.nodes.insert("restarted".into(), record("new"));
        m.nodes.insert("drained".into(), record("d"));
        m.suspects.insert("remote".into(), vec!["b".into()]);
        let local = vec![
            ("local".to_string(), "a".to_string()),
            ("restarted".to_string(), "old".to_string()),
            // Its lease expired: gone from the membership, not a suspect departure.
            ("expired".to_string(), "e".to_string()),
        ];
        let ids = ["local", "remote", "restarted", "drained", "expired"].map(String::from);
        let left: Vec<&String> = ids.iter().collect();
        assert_eq!(suspects_left(&m, &local, &left), vec!["local", "remote"]);
        assert!(suspects_left(&m, &local, &[]).is_empty());
    }
}
