//! Follows the placement in etcd: when a new epoch assigns this node experts, load exactly those
//! (sharing the ones already held), install them, and announce `ready/<node> = epoch`. It also
//! watches the routers' serving epochs (old experts are released only once every router has
//! moved past them) and drain requests for this node, and reports both to `main` through
//! [`NodeProgress`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use moe_cluster::membership::list_nodes;
use moe_cluster::placement::PlacementStore;
use moe_cluster::{ClusterKeys, NodeRegistration, NodeState};
use moe_model::checkpoint::Checkpoint;
use moe_model::experts::{ExpertDevice, ExpertSet};
use moe_model::ModelConfig;
use moe_proto::v1::expert_data_server::ExpertDataServer;
use tonic_health::server::HealthReporter;

use crate::data_plane::DataPlane;
use crate::served::ServedExperts;

/// What the node's exit decision needs, as of the last round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeProgress {
    /// Newest placement epoch seen.
    pub latest_epoch: u64,
    /// Whether that epoch gives this node any experts.
    pub placed_here: bool,
    /// Lowest epoch a live router still serves (None: no routers registered).
    pub min_router_epoch: Option<u64>,
    /// An operator asked this node to drain.
    pub drain_requested: bool,
}

impl NodeProgress {
    /// No router can still send this node work: the newest epoch leaves it out and every
    /// router serves that epoch or a later one.
    pub fn can_leave(&self) -> bool {
        self.latest_epoch > 0
            && !self.placed_here
            && self.min_router_epoch.is_none_or(|m| m >= self.latest_epoch)
    }
}

pub struct FollowerContext {
    pub etcd: moe_cluster::EtcdConnection,
    pub keys: ClusterKeys,
    pub node_id: String,
    pub fingerprint: String,
    pub model_dir: PathBuf,
    pub config: ModelConfig,
    /// Where loaded experts live (the CPU or this node's GPU).
    pub device: ExpertDevice,
    pub served: Arc<ServedExperts>,
    pub registration: Arc<NodeRegistration>,
    pub health: HealthReporter,
    pub poll: Duration,
    pub progress: tokio::sync::watch::Sender<NodeProgress>,
}

pub async fn follow_placement(ctx: FollowerContext) {
    let mut client: Option<Client> = None;
    let mut loaded_epoch = 0u64;
    let mut outage = moe_cluster::config::EtcdOutage::default();
    let changes =
        moe_cluster::watch::spawn_change_waker(ctx.etcd.clone(), ctx.keys.root().to_string());
    loop {
        if client.is_none() {
            match ctx.etcd.connect().await {
                Ok(c) => client = Some(c),
                Err(e) => outage.failed("follower", &e),
            }
        }
        if let Some(c) = client.as_mut() {
            match follow_once(&ctx, c, &mut loaded_epoch).await {
                Ok(()) => outage.ok("follower"),
                Err(e) => {
                    outage.failed("follower", &e);
                    client = None;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.poll) => {}
            _ = changes.notified() => {}
        }
        // Coalesce bursts of changes (several keys of one transition) into one round.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn follow_once(
    ctx: &FollowerContext,
    client: &mut Client,
    loaded_epoch: &mut u64,
) -> Result<(), moe_cluster::ClusterError> {
    let membership = list_nodes(client, &ctx.keys).await?;
    let min_router_epoch = membership.min_router_epoch();
    let (placement, _) = PlacementStore::new(client.clone(), ctx.keys.clone())
        .read()
        .await?;
    if let Some(placement) = placement.as_ref().filter(|p| p.epoch > *loaded_epoch) {
        if placement.fingerprint != ctx.fingerprint {
            tracing::error!(
                epoch = placement.epoch,
                "placement is for another checkpoint; not loading"
            );
        } else {
            let wanted: Vec<(usize, usize)> = placement
                .experts_of(&ctx.node_id)
                .iter()
                .map(|&(l, e)| (l as usize, e as usize))
                .collect();
            match load(ctx, &wanted).await {
                Ok(set) => {
                    tracing::info!(
                        node_id = %ctx.node_id,
                        epoch = placement.epoch,
                        experts = set.len(),
                        "loaded experts"
                    );
                    ctx.served.install(placement.epoch, Arc::new(set));
                    *loaded_epoch = placement.epoch;
                    ctx.registration.set_ready_epoch(*loaded_epoch);
                    ctx.registration.set_state(NodeState::Ready);
                    ctx.health
                        .set_serving::<ExpertDataServer<DataPlane>>()
                        .await;
                }
                Err(e) => tracing::error!(error = %e, "could not load assigned experts"),
            }
        }
    }
    if let Some(min) = min_router_epoch {
        ctx.served.release_before(min);
    }
    let latest = placement.as_ref().map(|p| p.epoch).unwrap_or(0);
    let progress = NodeProgress {
        latest_epoch: latest.min(*loaded_epoch),
        placed_here: placement
            .as_ref()
            .is_some_and(|p| p.nodes.contains_key(&ctx.node_id)),
        min_router_epoch,
        drain_requested: ctx.progress.borrow().drain_requested
            || membership.drains.contains(&ctx.node_id),
    };
    ctx.progress.send_if_modified(|p| {
        let changed = *p != progress;
        *p = progress;
        changed
    });
    Ok(())
}

async fn load(ctx: &FollowerContext, wanted: &[(usize, usize)]) -> anyhow::Result<ExpertSet> {
    let dir = ctx.model_dir.clone();
    let config = ctx.config.clone();
    let previous = ctx.served.latest().map(|(_, s)| s);
    let hidden = ctx.config.hidden_size;
    let wanted = wanted.to_vec();
    let device = ctx.device.clone();
    let set = tokio::task::spawn_blocking(move || -> moe_model::Result<ExpertSet> {
        let ckpt = Checkpoint::open(&dir)?;
        let base = previous.unwrap_or_else(|| Arc::new(ExpertSet::empty_on(hidden, device)));
        base.with_experts(&ckpt, &config, &wanted)
    })
    .await??;
    Ok(set)
}
