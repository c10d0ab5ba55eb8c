//! Membership watcher and placement planner.
//!
//! Every `poll` it lists the live nodes of this checkpoint; when they differ from the latest
//! placement's, it plans the next epoch (moving as few experts as possible) and writes it in a
//! transaction guarded by the revision it read. It switches the router to an epoch only once
//! every node of that epoch reports `ready >= epoch`; until then requests keep flowing on the
//! previous one. With etcd down it keeps serving the last placement.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use moe_cluster::membership::{list_nodes, Membership};
use moe_cluster::placement::{Placement, PlacementStore};
use moe_cluster::{ClusterKeys, NodeState};
use moe_proto::v1::inference_server::InferenceServer;
use tonic_health::server::HealthReporter;

use crate::cluster_view::{ClusterView, ServingPlacement};
use crate::dispatch::NodeLink;
use crate::server::inference::InferenceService;

pub struct PlannerContext {
    pub endpoints: Vec<String>,
    pub keys: ClusterKeys,
    pub fingerprint: String,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub view: Arc<ClusterView>,
    pub health: HealthReporter,
    pub poll: Duration,
    pub max_message_bytes: usize,
}

pub async fn run_planner(ctx: PlannerContext) {
    let mut client: Option<Client> = None;
    let mut links: BTreeMap<String, Arc<NodeLink>> = BTreeMap::new();
    loop {
        if client.is_none() {
            match Client::connect(&ctx.endpoints, None).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "etcd unreachable; serving the last placement")
                }
            }
        }
        if let Some(c) = client.as_mut() {
            if let Err(e) = plan_once(&ctx, c, &mut links).await {
                tracing::warn!(error = %e, "planning round failed; serving the last placement");
                client = None;
            }
        }
        tokio::time::sleep(ctx.poll).await;
    }
}

/// Live nodes of this checkpoint that may hold experts: id to address.
fn eligible(ctx: &PlannerContext, membership: &Membership) -> BTreeMap<String, String> {
    let drained = ctx.view.drained();
    membership
        .nodes
        .iter()
        .filter(|(id, r)| {
            r.fingerprint == ctx.fingerprint
                && r.state != NodeState::Draining
                && !drained.contains(id)
        })
        .map(|(id, r)| (id.clone(), r.address.clone()))
        .collect()
}

async fn plan_once(
    ctx: &PlannerContext,
    client: &mut Client,
    links: &mut BTreeMap<String, Arc<NodeLink>>,
) -> Result<(), moe_cluster::ClusterError> {
    let membership = list_nodes(client, &ctx.keys).await?;
    let live = eligible(ctx, &membership);
    ctx.view.set_membership(membership.clone());
    let mut store = PlacementStore::new(client.clone(), ctx.keys.clone());
    let (mut current, revision) = store.read().await?;
    let current_nodes: Option<BTreeMap<String, String>> = current.as_ref().map(|p| {
        p.nodes
            .iter()
            .map(|(id, a)| (id.clone(), a.address.clone()))
            .collect()
    });
    let stale = current
        .as_ref()
        .is_some_and(|p| p.fingerprint != ctx.fingerprint);
    if !live.is_empty() && (stale || current_nodes.as_ref() != Some(&live)) {
        let epoch = current.as_ref().map(|p| p.epoch).unwrap_or(0) + 1;
        let previous = current.as_ref().filter(|_| !stale);
        let next = Placement::plan(
            epoch,
            &ctx.fingerprint,
            &ctx.moe_layers,
            ctx.num_experts,
            &live,
            previous,
        )?;
        match store.write(&next, revision).await {
            Ok(()) => {
                tracing::info!(epoch, nodes = live.len(), "planned placement");
                current = Some(next);
            }
            Err(moe_cluster::ClusterError::PlacementConflict(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    let Some(latest) = current else { return Ok(()) };
    ctx.view.set_latest(latest.clone());
    let serving_epoch = ctx.view.serving().map(|s| s.placement.epoch).unwrap_or(0);
    if latest.epoch == serving_epoch || latest.fingerprint != ctx.fingerprint {
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
        let link = match links.get(id) {
            Some(l) if l.address == assignment.address => Arc::clone(l),
            _ => {
                let l = NodeLink::connect(
                    id.clone(),
                    assignment.address.clone(),
                    ctx.max_message_bytes,
                );
                links.insert(id.clone(), Arc::clone(&l));
                l
            }
        };
        epoch_links.push(link);
    }
    links.retain(|id, _| latest.nodes.contains_key(id));
    tracing::info!(epoch = latest.epoch, "serving on new placement");
    ctx.view
        .set_serving(ServingPlacement::new(latest, epoch_links));
    ctx.health
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    ctx.health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    Ok(())
}
