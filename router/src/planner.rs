//! Membership, placement epochs and load balance, run by every router; only the elected one
//! writes placements.
//!
//! Each round (every `poll`, at once when discovery reports a change of the members, the
//! placement or the drains, or when a dispatch reports a failed node) it reads one discovery
//! [`Snapshot`]. The elected planner (holder of the `planner` key on its lease) plans the next
//! epoch when the usable nodes differ from the placement's (joined, drained, draining on
//! SIGTERM, suspect after a failed dispatch, lease expired), or when the measured load is
//! imbalanced past the threshold (replicating hot experts), and writes it in a transaction
//! guarded by both its planner key and the placement revision it read. Every router switches
//! to an epoch once all its nodes report `ready >= epoch`, and publishes the epoch it serves so
//! nodes know when old experts can go. With etcd down everything keeps serving the last
//! placement; for a grace period after etcd returns, nodes missing from it are not dropped,
//! since they are re-registering.
//!
//! A round reads top to bottom: [`Planner::observe`] what the snapshot says, [`Planner::plan`]
//! the next epoch if one is due, [`Planner::commit`] it, [`Planner::clear_finished_drains`],
//! then [`Planner::follow`] the newest epoch once its nodes are ready.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_cluster::discovery::{
    Discovery, DiscoveryError, LoadReport, Membership, NodeState, Outage, RouterRegistration,
    Snapshot, Topic,
};
use moe_cluster::placement::{ExpertId, Placement, RebalanceBudget};
use moe_cluster::shutdown::Shutdown;
use moe_cluster::ClusterError;
use moe_proto::v1::inference_server::InferenceServer;
use tonic_health::server::HealthReporter;

use crate::cluster_view::{ClusterView, ServingPlacement};
use crate::load_window::{DispatchCounts, LoadShape, PeerLoads, WindowLoad};
use crate::node_link::NodeLink;
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
    /// Extra copies and exchanges of copies per MoE layer a rebalance may make.
    pub budget: RebalanceBudget,
}

pub struct PlannerContext {
    /// Where the router registers, reads the cluster and writes placements.
    pub discovery: Discovery,
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
    pub links: crate::node_link::LinkSettings,
    /// The router's own batch bound, for nodes that publish none.
    pub max_batch_rows: usize,
    /// `--transport`: the per-epoch collective, if any.
    pub collective: crate::collective::CollectiveSettings,
    pub rebalance: RebalancePolicy,
    /// Its OpenAI address, model name and load, published beside its gRPC address.
    pub profile: crate::published_load::PublishedProfile,
}

/// This router's dispatch counters when the window started.
struct LoadWindow {
    started: Instant,
    counts: DispatchCounts,
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Plan(#[from] ClusterError),
}

/// The next epoch a round decided on, and why.
struct Planned {
    placement: Placement,
    why: Why,
}

enum Why {
    /// The usable nodes differ from the placement's.
    Membership {
        joined: Vec<String>,
        left: Vec<String>,
        /// Of `left`, the nodes still registered that a router saw fail.
        suspected: Vec<String>,
    },
    /// The measured load was imbalanced past the threshold: hot experts get replicas, and
    /// copies are exchanged between nodes.
    Rebalance {
        measured: f64,
        before: f64,
        after: f64,
        replicas: usize,
    },
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Membership {
                joined,
                left,
                suspected,
            } => write!(
                f,
                "membership: joined {joined:?}, left {left:?} (suspect {suspected:?})"
            ),
            Why::Rebalance {
                measured,
                before,
                after,
                replicas,
            } => write!(
                f,
                "rebalance: measured imbalance {measured:.2}, expected {before:.2} -> \
                 {after:.2}, {replicas} replicas"
            ),
        }
    }
}

struct Planner {
    ctx: PlannerContext,
    /// When etcd last became reachable again (or the planner started): placed nodes missing
    /// from the membership are kept for `membership_grace` after it.
    connected_at: Instant,
    registration: Option<RouterRegistration>,
    links: BTreeMap<String, Arc<NodeLink>>,
    window: LoadWindow,
    /// Random per process start, named in the load reports.
    instance: String,
    /// As the planner: the other routers' last load reports, read first when it is elected
    /// (their baselines, so that its first window counts their traffic too).
    peers: Option<PeerLoads>,
    last_rebalance: Option<Instant>,
    was_planner: bool,
    outage: Outage,
    /// The last closed window's load (this router's), until a round uses it.
    pending_load: Option<WindowLoad>,
}

/// Pause after a wake-up, so that a burst of changes costs one round.
const COALESCE: Duration = Duration::from_millis(5);

/// Plans until `shutdown`, then withdraws the router's registration (and its planner key, so
/// another router takes over at once rather than after the lease's time-to-live).
pub async fn run_planner(ctx: PlannerContext, mut shutdown: Shutdown) {
    let changes = ctx
        .discovery
        .watch(&[Topic::Members, Topic::Placement, Topic::Drains]);
    let mut planner = Planner::new(ctx);
    while !shutdown.is_shutdown() {
        // A stop does not wait for the round: the registration is withdrawn at once, so
        // another router plans without waiting for this one (nothing half-written matters
        // then: a placement write is one guarded transaction).
        tokio::select! {
            () = planner.round() => {}
            _ = shutdown.wait() => break,
        }
        let view = Arc::clone(&planner.ctx.view);
        tokio::select! {
            _ = tokio::time::sleep(planner.ctx.poll) => {}
            _ = view.wake_planner.notified() => {}
            _ = changes.changed() => {}
            _ = shutdown.wait() => break,
        }
        // Coalesce bursts of changes (several keys of one transition) into one round.
        tokio::time::sleep(COALESCE).await;
    }
    if let Some(registration) = planner.registration.take() {
        registration.shutdown().await;
    }
}

impl Planner {
    fn new(ctx: PlannerContext) -> Self {
        Self {
            ctx,
            connected_at: Instant::now(),
            registration: None,
            links: BTreeMap::new(),
            window: LoadWindow {
                started: Instant::now(),
                counts: DispatchCounts::default(),
            },
            instance: moe_cluster::discovery::new_instance_id(),
            peers: None,
            last_rebalance: None,
            was_planner: false,
            outage: Default::default(),
            pending_load: None,
        }
    }

    async fn round(&mut self) {
        let registered = self.register().await;
        if let Some(r) = &self.registration {
            self.ctx.profile.refresh(r);
        }
        self.measure_load();
        if registered {
            match self.plan_once().await {
                Ok(()) => {
                    if self.outage.is_down() {
                        // Nodes re-register after an outage: give them a grace period.
                        self.connected_at = Instant::now();
                    }
                    self.outage.ok("planner");
                }
                Err(e) => self.outage.failed("planner", &e),
            }
        }
        self.reform_collective();
    }

    /// Registers the router (and its planner campaign) once discovery answers; false while
    /// it does not.
    async fn register(&mut self) -> bool {
        if self.registration.is_some() {
            return true;
        }
        let ctx = &self.ctx;
        let registered = ctx
            .discovery
            .register_router(&ctx.view.router_id, &ctx.router_address, ctx.lease_ttl)
            .await;
        match registered {
            Ok(r) => {
                self.ctx.profile.register(&r);
                self.registration = Some(r);
                true
            }
            Err(e) => {
                self.outage.failed("planner", &e);
                ctx.view.is_planner.store(false, Ordering::Relaxed);
                false
            }
        }
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

    /// Closes the load window when due: the imbalance ratio of what this router dispatched,
    /// and its counts published for the planner (when rebalancing is on).
    fn measure_load(&mut self) {
        let policy = &self.ctx.rebalance;
        if self.window.started.elapsed() < policy.window {
            return;
        }
        let now = DispatchCounts {
            node_pairs: self
                .links
                .iter()
                .flat_map(|(id, l)| {
                    l.pairs_by_layer()
                        .into_iter()
                        .map(move |(layer, n)| ((layer, id.clone()), n))
                })
                .collect(),
            expert_tokens: self.ctx.view.expert_token_counts(),
        };
        let window = now.since(&self.window.counts);
        let ratio = window.imbalance(&self.serving_nodes(), policy.min_pairs);
        self.ctx
            .view
            .imbalance_milli
            .store((ratio * 1000.0).round() as u64, Ordering::Relaxed);
        if let Some(r) = self
            .registration
            .as_ref()
            .filter(|_| policy.threshold > 0.0)
        {
            r.set_load_report(&now.to_report(&self.instance, self.ctx.num_experts));
        }
        self.window = LoadWindow {
            started: Instant::now(),
            counts: now,
        };
        self.pending_load = Some(window);
    }

    /// Every router's load report, or None (logged) when they cannot be read: the planner
    /// then balances on its own load.
    async fn load_reports(&self) -> Option<BTreeMap<String, (i64, LoadReport)>> {
        match self.ctx.discovery.load_reports().await {
            Ok(reports) => Some(reports),
            Err(e) => {
                tracing::warn!(error = %e, "load reports unreadable; balancing on this router's load");
                None
            }
        }
    }

    fn load_shape(&self) -> LoadShape {
        LoadShape {
            moe_layers: self.ctx.moe_layers.iter().map(|&l| l as u32).collect(),
            num_experts: self.ctx.num_experts,
        }
    }

    /// The nodes of the epoch this router serves.
    fn serving_nodes(&self) -> Vec<String> {
        self.ctx
            .view
            .serving()
            .iter()
            .flat_map(|s| s.links.iter().map(|l| l.node_id.clone()))
            .collect()
    }

    /// As the planner, at the end of its window: its own load plus what every other router
    /// reported since (their reports unreadable: its own only). Returns the imbalance ratio
    /// over all of it, and the load per expert.
    async fn cluster_load(&mut self, own: WindowLoad) -> (f64, HashMap<ExpertId, u64>) {
        let mut load = own;
        let mut routers = 1;
        if let Some(reports) = self.load_reports().await {
            let shape = self.load_shape();
            let peers = self.peers.get_or_insert_with(PeerLoads::default);
            let window = peers.window(&reports, &self.ctx.view.router_id, &shape);
            for (router, e) in &window.refused {
                tracing::warn!(router, error = %e, "ignoring a router's load report");
            }
            load.add(&window.load);
            routers += window.counted;
            self.ctx.view.set_peer_expert_tokens(peers.expert_totals());
        }
        let nodes = self.serving_nodes();
        let ratio = load.imbalance(&nodes, self.ctx.rebalance.min_pairs);
        let view = &self.ctx.view;
        view.cluster_imbalance_milli
            .store((ratio * 1000.0).round() as u64, Ordering::Relaxed);
        view.load_reporting_routers
            .store(routers as u64, Ordering::Relaxed);
        (ratio, load.expert_tokens)
    }

    /// Reads the cluster; as the planner, plans and commits the next epoch; then follows the
    /// newest epoch.
    async fn plan_once(&mut self) -> Result<(), RoundError> {
        let snapshot = self.ctx.discovery.snapshot().await?;
        let (local_suspects, is_planner) = self.observe(&snapshot.members);
        if !is_planner {
            if self.peers.take().is_some() {
                self.ctx.view.set_peer_expert_tokens(HashMap::new());
            }
        } else if self.peers.is_none() {
            let mut peers = PeerLoads::default();
            if let Some(reports) = self.load_reports().await {
                peers.window(&reports, &self.ctx.view.router_id, &self.load_shape());
            }
            self.ctx.view.set_peer_expert_tokens(peers.expert_totals());
            self.peers = Some(peers);
        }
        let pending_load = match self.pending_load.take() {
            Some(own) if is_planner => Some(self.cluster_load(own).await),
            _ => None,
        };
        let mut latest = snapshot.placement.clone();
        if is_planner {
            if let Some(planned) = self.plan(&snapshot, &local_suspects, pending_load)? {
                match self.commit(planned, &snapshot).await? {
                    Some(committed) => latest = Some(committed),
                    None => return Ok(()),
                }
            }
            self.clear_finished_drains(&snapshot.members, latest.as_ref())
                .await?;
        }
        if let Some(latest) = latest {
            self.follow(latest, &snapshot.members).await;
        }
        Ok(())
    }

    /// Publishes what the snapshot says: the membership to the view, this router's suspect
    /// reports and planner role. Returns the local suspects and whether this is the planner.
    fn observe(&mut self, membership: &Membership) -> (Vec<(String, String)>, bool) {
        let view = &self.ctx.view;
        view.set_membership(membership.clone());
        let local_suspects = view.suspects(self.ctx.suspect_ttl, membership);
        let is_planner = self.registration.as_ref().is_some_and(|r| r.is_planner());
        if let Some(r) = &self.registration {
            r.set_suspects(&local_suspects);
            if membership.planner.is_none() && !is_planner {
                r.campaign_soon();
            }
        }
        if is_planner != self.was_planner {
            tracing::info!(router_id = %view.router_id, is_planner, "planner role changed");
            self.was_planner = is_planner;
        }
        view.is_planner.store(is_planner, Ordering::Relaxed);
        if let Ok(mut p) = view.planner_id.write() {
            *p = membership.planner.clone();
        }
        (local_suspects, is_planner)
    }

    /// The next epoch, if one is due: the usable nodes changed, or else the closed load
    /// window was imbalanced enough to replicate hot experts.
    fn plan(
        &self,
        snapshot: &Snapshot,
        local_suspects: &[(String, String)],
        pending_load: Option<(f64, HashMap<ExpertId, u64>)>,
    ) -> Result<Option<Planned>, ClusterError> {
        if let Some(planned) = self.membership_change(snapshot, local_suspects)? {
            return Ok(Some(planned));
        }
        Ok(match (pending_load, snapshot.placement.as_ref()) {
            (Some((measured, load)), Some(current)) => self.rebalance(current, measured, &load),
            _ => None,
        })
    }

    /// A placement over the usable nodes when they differ from the current placement's (or
    /// it is for another checkpoint).
    fn membership_change(
        &self,
        snapshot: &Snapshot,
        local_suspects: &[(String, String)],
    ) -> Result<Option<Planned>, ClusterError> {
        let ctx = &self.ctx;
        let membership = &snapshot.members;
        let current = snapshot.placement.as_ref();
        let stale = current.is_some_and(|p| p.fingerprint != ctx.fingerprint);
        let previous = current.filter(|_| !stale);
        let mut live = eligible(ctx, membership, local_suspects);
        if self.connected_at.elapsed() < ctx.membership_grace || self.outage.is_down() {
            // Just back in touch with etcd: nodes of the placement that have not
            // re-registered yet are probably doing so; do not move their experts away.
            for (id, a) in previous.iter().flat_map(|p| &p.nodes) {
                if !membership.nodes.contains_key(id) {
                    live.entry(id.clone()).or_insert_with(|| a.address.clone());
                }
            }
        }
        let current_nodes: Option<BTreeMap<String, String>> = current.map(|p| {
            p.nodes
                .iter()
                .map(|(id, a)| (id.clone(), a.address.clone()))
                .collect()
        });
        if live.is_empty() || (!stale && current_nodes.as_ref() == Some(&live)) {
            return Ok(None);
        }
        let joined: Vec<String> = live
            .keys()
            .filter(|id| current_nodes.as_ref().is_none_or(|c| !c.contains_key(*id)))
            .cloned()
            .collect();
        let left: Vec<String> = current_nodes
            .iter()
            .flat_map(|c| c.keys())
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        // Nodes the next epoch leaves out because a router saw them fail while their lease
        // still lives (the crash path that does not wait for the lease TTL).
        let suspected = suspects_left(membership, local_suspects, &left);
        let epoch = current.map(|p| p.epoch).unwrap_or(0) + 1;
        let placement = Placement::plan(
            epoch,
            &ctx.fingerprint,
            &ctx.moe_layers,
            ctx.num_experts,
            &live,
            previous,
        )?;
        let why = Why::Membership {
            joined,
            left,
            suspected,
        };
        Ok(Some(Planned { placement, why }))
    }

    /// The current placement with replicas of the hottest experts, when the measured
    /// imbalance passed the threshold, the last rebalance is two windows old, this router
    /// serves the current epoch, and the replicas would cut the expected imbalance by 5 %.
    fn rebalance(
        &self,
        current: &Placement,
        measured: f64,
        load: &HashMap<ExpertId, u64>,
    ) -> Option<Planned> {
        let policy = &self.ctx.rebalance;
        let serving_epoch = self.ctx.view.serving().map(|s| s.placement.epoch);
        let due = self
            .last_rebalance
            .is_none_or(|t| t.elapsed() >= policy.window * 2);
        let wanted = policy.threshold > 0.0
            && measured > policy.threshold
            && due
            && serving_epoch == Some(current.epoch);
        if !wanted {
            return None;
        }
        let candidate = current.rebalance(current.epoch + 1, load, policy.budget);
        let before = current.expected_imbalance(load);
        let after = candidate.expected_imbalance(load);
        if after >= before * 0.95 || candidate == *current {
            return None;
        }
        let why = Why::Rebalance {
            measured,
            before,
            after,
            replicas: candidate.replica_count(),
        };
        Some(Planned {
            placement: candidate,
            why,
        })
    }

    /// Writes `planned`, guarded by the placement revision of `snapshot` and this router's
    /// planner key. None when another planner wrote first (this round then follows it).
    async fn commit(
        &mut self,
        planned: Planned,
        snapshot: &Snapshot,
    ) -> Result<Option<Placement>, DiscoveryError> {
        let Planned {
            placement: next,
            why,
        } = planned;
        let written = self
            .ctx
            .discovery
            .write_placement(&next, snapshot.placement_revision, &self.ctx.view.router_id)
            .await;
        match written {
            Ok(()) => {}
            Err(DiscoveryError::PlacementConflict(epoch)) => {
                tracing::info!(epoch, "another planner wrote first; following it");
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let moved = snapshot.placement.as_ref().map(|c| c.moves_to(&next));
        tracing::info!(
            epoch = next.epoch,
            nodes = ?next.nodes.keys().collect::<Vec<_>>(),
            experts_moved = ?moved,
            reason = %why,
            "planned placement"
        );
        let view = &self.ctx.view;
        match &why {
            Why::Rebalance { .. } => {
                self.last_rebalance = Some(Instant::now());
                view.rebalances.fetch_add(1, Ordering::Relaxed);
                let loads = moved.unwrap_or_default() as u64;
                view.rebalance_expert_loads
                    .fetch_add(loads, Ordering::Relaxed);
            }
            Why::Membership { suspected, .. } if !suspected.is_empty() => {
                view.suspect_replans.fetch_add(1, Ordering::Relaxed);
            }
            Why::Membership { .. } => {}
        }
        Ok(Some(next))
    }

    /// Drain requests for nodes that are gone and placed nowhere are done.
    async fn clear_finished_drains(
        &self,
        membership: &Membership,
        latest: Option<&Placement>,
    ) -> Result<(), DiscoveryError> {
        for id in &membership.drains {
            let placed = latest.is_some_and(|p| p.nodes.contains_key(id));
            if !membership.nodes.contains_key(id) && !placed {
                self.ctx.discovery.clear_drain(id).await?;
            }
        }
        Ok(())
    }

    /// Records the newest placement and switches to it once every node of it is ready:
    /// links, the epoch's collective, the serving epoch published, health SERVING.
    async fn follow(&mut self, latest: Placement, membership: &Membership) {
        self.ctx.view.set_latest(latest.clone());
        let serving_epoch = self
            .ctx
            .view
            .serving()
            .map(|s| s.placement.epoch)
            .unwrap_or(0);
        if let Some(r) = &self.registration {
            r.set_serving_epoch(serving_epoch);
        }
        if latest.epoch <= serving_epoch || latest.fingerprint != self.ctx.fingerprint {
            return;
        }
        let all_ready = latest
            .nodes
            .keys()
            .all(|id| membership.ready.get(id).is_some_and(|&e| e >= latest.epoch));
        if !all_ready {
            return;
        }
        let epoch_links = self.epoch_links(&latest, membership);
        tracing::info!(
            epoch = latest.epoch,
            previous = serving_epoch,
            nodes = ?latest.nodes.keys().collect::<Vec<_>>(),
            "serving on new placement"
        );
        let ctx = &self.ctx;
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
                membership,
                self.registration.as_ref(),
            );
        }
        ctx.health
            .set_serving::<InferenceServer<InferenceService>>()
            .await;
        ctx.health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    }

    /// A link to each node of `placement`, reusing those whose address and batch bound did
    /// not change; links to nodes it leaves out are dropped.
    fn epoch_links(
        &mut self,
        placement: &Placement,
        membership: &Membership,
    ) -> Vec<Arc<NodeLink>> {
        let mut epoch_links = Vec::with_capacity(placement.nodes.len());
        for (id, assignment) in &placement.nodes {
            // The node's published batch bound (0 from nodes before it: then the router's).
            let max_rows = membership
                .nodes
                .get(id)
                .map(|r| r.max_batch_rows as usize)
                .filter(|&rows| rows > 0)
                .unwrap_or(self.ctx.max_batch_rows);
            let rows_on_wire = membership
                .nodes
                .get(id)
                .map(|r| r.rows_on_wire)
                .unwrap_or_default();
            let link = match self.links.get(id) {
                Some(l)
                    if l.address == assignment.address
                        && l.max_rows == max_rows
                        && l.rows_on_wire == rows_on_wire =>
                {
                    Arc::clone(l)
                }
                _ => {
                    let l = NodeLink::connect(
                        id.clone(),
                        assignment.address.clone(),
                        max_rows,
                        rows_on_wire,
                        &self.ctx.links,
                    );
                    self.links.insert(id.clone(), Arc::clone(&l));
                    l
                }
            };
            epoch_links.push(link);
        }
        self.links.retain(|id, _| placement.nodes.contains_key(id));
        epoch_links
    }
}

/// Of the nodes `left` out of the next epoch, those still registered (lease alive) whose
/// current instance this router or another reported failing.
fn suspects_left(
    membership: &Membership,
    local_suspects: &[(String, String)],
    left: &[String],
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
    use moe_cluster::collective::{RootSettings, Transport};
    use moe_cluster::discovery::{MemoryStore, NodeRecord, NodeRegistration};

    const TTL: Duration = Duration::from_secs(3);

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
        assert_eq!(suspects_left(&m, &local, &ids), vec!["local", "remote"]);
        assert!(suspects_left(&m, &local, &[]).is_empty());
    }

    /// Router `r1`'s planner over `discovery`: 2 MoE layers of 8 experts, gRPC data plane.
    fn context(discovery: &Discovery) -> PlannerContext {
        PlannerContext {
            profile: crate::published_load::PublishedProfile::new(
                moe_cluster::discovery::RouterProfile {
                    model: "m".into(),
                    max_model_len: 4096,
                    ..Default::default()
                },
                Default::default(),
                Arc::new(crate::kv_blocks::KvBlocks::new(1 << 20, 64, 16)),
            ),
            discovery: discovery.clone(),
            router_address: "127.0.0.1:2".into(),
            fingerprint: "f".into(),
            moe_layers: vec![1, 2],
            num_experts: 8,
            view: Arc::new(ClusterView::new("r1".into())),
            health: tonic_health::server::health_reporter().0,
            poll: Duration::from_millis(50),
            lease_ttl: TTL,
            suspect_ttl: Duration::from_secs(30),
            membership_grace: Duration::ZERO,
            links: crate::node_link::LinkSettings {
                max_dispatch_bytes: 1 << 20,
                max_combine_bytes: 1 << 20,
                timeout: Duration::from_secs(1),
                tls: None,
                token: None,
            },
            max_batch_rows: 64,
            collective: crate::collective::CollectiveSettings {
                transport: Transport::Grpc,
                root: RootSettings::new("127.0.0.1:0".into(), None, None, 1 << 20),
                timeout: Duration::from_secs(1),
            },
            rebalance: RebalancePolicy {
                threshold: 0.0,
                window: Duration::from_secs(30),
                min_pairs: 1,
                budget: RebalanceBudget {
                    replicas_per_layer: 1,
                    swaps_per_layer: 1,
                },
            },
        }
    }

    async fn register(discovery: &Discovery, id: &str, instance: &str) -> NodeRegistration {
        let mut record = record(instance);
        record.state = NodeState::Joining;
        discovery.register_node(id, record, TTL).await.unwrap()
    }

    /// A planner registered and elected (its campaign runs at the lease's first keep-alive).
    async fn elected(discovery: &Discovery) -> Planner {
        let mut planner = Planner::new(context(discovery));
        assert!(planner.register().await);
        let registration = planner.registration.as_ref().unwrap();
        let elected = tokio::time::timeout(Duration::from_secs(5), registration.elected());
        elected.await.expect("elected at the first keep-alive");
        planner
    }

    async fn placed_nodes(discovery: &Discovery) -> (u64, Vec<String>) {
        let placement = discovery.snapshot().await.unwrap().placement.unwrap();
        (placement.epoch, placement.nodes.keys().cloned().collect())
    }

    #[tokio::test]
    async fn a_round_places_every_expert_on_the_registered_nodes_but_a_suspect_one() {
        let discovery = Discovery::in_memory(&MemoryStore::new(), "c");
        let _nodes = [
            register(&discovery, "n1", "a").await,
            register(&discovery, "n2", "b").await,
            register(&discovery, "n3", "c").await,
        ];
        let mut planner = elected(&discovery).await;
        // Another router saw n3 fail.
        let other = discovery
            .register_router("r2", "127.0.0.1:3", TTL)
            .await
            .unwrap();
        other.set_suspects(&[("n3".into(), "c".into())]);
        let mut published = false;
        for _ in 0..500 {
            published = discovery.snapshot().await.unwrap().members.is_suspect("n3");
            if published {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(published, "the suspect report is published");

        planner.round().await;
        let snapshot = discovery.snapshot().await.unwrap();
        let placement = snapshot.placement.clone().expect("a first placement");
        assert_eq!(placement.epoch, 1);
        assert_eq!(placement.nodes.keys().collect::<Vec<_>>(), ["n1", "n2"]);
        assert_eq!(placement.holders().len(), 2 * 8, "every expert placed");
        let view = &planner.ctx.view;
        assert!(view.is_planner.load(Ordering::Relaxed));
        assert_eq!(view.latest(), Some(placement));
        assert!(view.serving().is_none(), "no node is ready yet");
        assert_eq!(view.suspect_replans.load(Ordering::Relaxed), 0);

        // Nothing changed: the next round writes nothing.
        planner.round().await;
        let again = discovery.snapshot().await.unwrap();
        assert_eq!(again.placement_revision, snapshot.placement_revision);
    }

    #[tokio::test]
    async fn a_failed_node_is_planned_out_and_a_router_not_planner_only_follows() {
        let discovery = Discovery::in_memory(&MemoryStore::new(), "c");
        let _nodes = [
            register(&discovery, "n1", "a").await,
            register(&discovery, "n2", "b").await,
        ];
        let mut planner = elected(&discovery).await;
        planner.round().await;
        assert_eq!(
            placed_nodes(&discovery).await,
            (1, vec!["n1".into(), "n2".into()])
        );
        let mut follower = Planner::new(PlannerContext {
            view: Arc::new(ClusterView::new("r2".into())),
            ..context(&discovery)
        });

        // This router's data plane saw n2 fail: the next epoch leaves it out at once.
        planner
            .ctx
            .view
            .set_membership(discovery.snapshot().await.unwrap().members);
        assert!(planner.ctx.view.suspect("n2", "stream broken"));
        planner.round().await;
        assert_eq!(placed_nodes(&discovery).await, (2, vec!["n1".into()]));
        assert_eq!(planner.ctx.view.suspect_replans.load(Ordering::Relaxed), 1);

        follower.round().await;
        assert!(!follower.ctx.view.is_planner.load(Ordering::Relaxed));
        assert_eq!(follower.ctx.view.latest().map(|p| p.epoch), Some(2));
        assert_eq!(
            placed_nodes(&discovery).await.0,
            2,
            "the follower wrote nothing"
        );
    }

    #[tokio::test]
    async fn a_drained_node_is_planned_out_and_its_request_cleared_once_it_is_gone() {
        let discovery = Discovery::in_memory(&MemoryStore::new(), "c");
        let n1 = register(&discovery, "n1", "a").await;
        let _n2 = register(&discovery, "n2", "b").await;
        let mut planner = elected(&discovery).await;
        planner.round().await;
        discovery.request_drain("n1").await.unwrap();
        planner.round().await;
        assert_eq!(placed_nodes(&discovery).await, (2, vec!["n2".into()]));
        let drains = || async { discovery.snapshot().await.unwrap().members.drains };
        assert_eq!(drains().await, ["n1"], "kept while the node is registered");
        n1.shutdown().await;
        planner.round().await;
        assert!(drains().await.is_empty());
        assert_eq!(placed_nodes(&discovery).await.0, 2);
    }

    /// An elected planner reads the other routers' reports at once, so its first closed
    /// window already counts what they dispatched since; a follower reads none.
    #[tokio::test]
    async fn a_new_planner_counts_other_routers_from_its_first_window() {
        let discovery = Discovery::in_memory(&MemoryStore::new(), "c");
        let _nodes = [register(&discovery, "n1", "a").await];
        let mut planner = elected(&discovery).await;
        let peer = discovery
            .register_router("r2", "127.0.0.1:3", TTL)
            .await
            .unwrap();
        // Publishes r2's counts and waits until they can be read.
        let publish = |pairs: u64| {
            let counts = crate::load_window::DispatchCounts {
                node_pairs: [((1, "n1".to_string()), pairs)].into(),
                expert_tokens: [((1, 3), pairs)].into(),
            };
            let report = counts.to_report("peer-instance", 8);
            peer.set_load_report(&report);
            let discovery = discovery.clone();
            async move {
                for _ in 0..500 {
                    let reports = discovery.load_reports().await.unwrap();
                    if reports.get("r2").is_some_and(|(_, r)| *r == report) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("r2's report not published");
            }
        };
        publish(100).await;
        planner.round().await;
        assert!(planner.peers.is_some(), "baselines read at election");
        publish(160).await;
        planner.pending_load = Some(WindowLoad::default());
        planner.plan_once().await.unwrap();
        let view = &planner.ctx.view;
        assert_eq!(view.load_reporting_routers.load(Ordering::Relaxed), 2);

        let mut follower = Planner::new(PlannerContext {
            view: Arc::new(ClusterView::new("r3".into())),
            ..context(&discovery)
        });
        follower.pending_load = Some(WindowLoad::default());
        follower.round().await;
        assert!(follower.peers.is_none());
        let view = &follower.ctx.view;
        assert_eq!(view.load_reporting_routers.load(Ordering::Relaxed), 0);
    }
}
