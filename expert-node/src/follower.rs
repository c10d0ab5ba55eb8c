//! Follows the placement: when a new epoch assigns this node experts, load exactly those
//! (sharing the ones already held), install them, and announce `ready/<node> = epoch`. It also
//! follows the routers' serving epochs (old experts are released only once every router has
//! moved past them) and drain requests for this node, and reports both to `main` through
//! [`NodeProgress`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moe_cluster::discovery::{
    Discovery, DiscoveryError, NodeRegistration, NodeState, Outage, Topic,
};
use moe_cluster::Placement;
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
    /// Where the placement, the routers' serving epochs and drain requests are read.
    pub discovery: Discovery,
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

/// Pause after a wake-up, so that a burst of changes (several keys of one transition) costs
/// one round.
const COALESCE: Duration = Duration::from_millis(5);

pub async fn follow_placement(ctx: FollowerContext) {
    let mut loaded_epoch = 0u64;
    let mut outage = Outage::default();
    let changes = ctx
        .discovery
        .watch(&[Topic::Placement, Topic::Routers, Topic::Drains]);
    loop {
        match follow_once(&ctx, &mut loaded_epoch).await {
            Ok(()) => outage.ok("follower"),
            Err(e) => outage.failed("follower", &e),
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.poll) => {}
            _ = changes.changed() => {}
        }
        tokio::time::sleep(COALESCE).await;
    }
}

/// One round: load a newer epoch, release epochs no router serves, report progress.
async fn follow_once(ctx: &FollowerContext, loaded_epoch: &mut u64) -> Result<(), DiscoveryError> {
    let snapshot = ctx.discovery.snapshot().await?;
    let min_router_epoch = snapshot.members.min_router_epoch();
    let placement = snapshot.placement;
    if let Some(placement) = placement.as_ref().filter(|p| p.epoch > *loaded_epoch) {
        if load_epoch(ctx, placement).await {
            *loaded_epoch = placement.epoch;
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
            || snapshot.members.drains.contains(&ctx.node_id),
    };
    ctx.progress.send_if_modified(|p| {
        let changed = *p != progress;
        *p = progress;
        changed
    });
    Ok(())
}

/// Loads and installs this node's experts of `placement`, then announces it ready for that
/// epoch; false when they could not be loaded (tried again next round).
async fn load_epoch(ctx: &FollowerContext, placement: &Placement) -> bool {
    if placement.fingerprint != ctx.fingerprint {
        tracing::error!(
            epoch = placement.epoch,
            "placement is for another checkpoint; not loading"
        );
        return false;
    }
    let wanted: Vec<(usize, usize)> = placement
        .experts_of(&ctx.node_id)
        .iter()
        .map(|&(l, e)| (l as usize, e as usize))
        .collect();
    let set = match load(ctx, wanted).await {
        Ok(set) => set,
        Err(e) => {
            tracing::error!(error = %e, "could not load assigned experts");
            return false;
        }
    };
    tracing::info!(
        node_id = %ctx.node_id,
        epoch = placement.epoch,
        experts = set.len(),
        "loaded experts"
    );
    ctx.served.install(placement.epoch, Arc::new(set));
    ctx.registration.set_ready_epoch(placement.epoch);
    ctx.registration.set_state(NodeState::Ready);
    ctx.health
        .set_serving::<ExpertDataServer<DataPlane>>()
        .await;
    true
}

/// Why assigned experts could not be loaded.
#[derive(Debug)]
enum LoadError {
    Model(moe_model::ModelError),
    /// The blocking loader panicked.
    Task(tokio::task::JoinError),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Model(e) => e.fmt(f),
            LoadError::Task(e) => write!(f, "the loading task failed: {e}"),
        }
    }
}

/// Reads `wanted` from the checkpoint on a blocking thread, sharing the experts the newest
/// installed set already holds.
async fn load(ctx: &FollowerContext, wanted: Vec<(usize, usize)>) -> Result<ExpertSet, LoadError> {
    let dir = ctx.model_dir.clone();
    let config = ctx.config.clone();
    let previous = ctx.served.latest().map(|(_, s)| s);
    let hidden = ctx.config.hidden_size;
    let device = ctx.device.clone();
    tokio::task::spawn_blocking(move || -> moe_model::Result<ExpertSet> {
        let ckpt = Checkpoint::open(&dir)?;
        let base = previous.unwrap_or_else(|| Arc::new(ExpertSet::empty_on(hidden, device)));
        base.with_experts(&ckpt, &config, &wanted)
    })
    .await
    .map_err(LoadError::Task)?
    .map_err(LoadError::Model)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use moe_cluster::discovery::{MemoryStore, NodeRecord, RouterRegistration, Snapshot};

    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn record() -> NodeRecord {
        NodeRecord {
            fingerprint: "f".into(),
            instance: "i1".into(),
            ..NodeRecord::default()
        }
    }

    /// Node `n1`'s follower over `discovery`, on the tiny Mixtral fixture.
    async fn follower(discovery: &Discovery) -> FollowerContext {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-tiny");
        let registration = discovery.register_node("n1", record(), TTL).await.unwrap();
        FollowerContext {
            discovery: discovery.clone(),
            node_id: "n1".into(),
            fingerprint: "f".into(),
            config: ModelConfig::from_dir(&dir).unwrap(),
            model_dir: dir,
            device: ExpertDevice::Cpu,
            served: Arc::new(ServedExperts::new()),
            registration: Arc::new(registration),
            health: tonic_health::server::health_reporter().0,
            poll: Duration::from_millis(50),
            progress: tokio::sync::watch::channel(NodeProgress::default()).0,
        }
    }

    /// A router that holds the planner key (its campaign runs at the lease's first
    /// keep-alive).
    async fn planner(discovery: &Discovery) -> RouterRegistration {
        let router = discovery
            .register_router("r1", "127.0.0.1:2", TTL)
            .await
            .unwrap();
        let elected = tokio::time::timeout(Duration::from_secs(5), router.elected());
        elected.await.expect("elected at the first keep-alive");
        router
    }

    /// A placement of every expert over `nodes`.
    fn placement(
        ctx: &FollowerContext,
        epoch: u64,
        nodes: &[&str],
        fingerprint: &str,
    ) -> Placement {
        let nodes: BTreeMap<String, String> = nodes
            .iter()
            .map(|id| (id.to_string(), format!("{id}:1")))
            .collect();
        let layers: Vec<usize> = ctx.config.moe_layer_indices().collect();
        let experts = ctx.config.moe.num_experts;
        Placement::plan(epoch, fingerprint, &layers, experts, &nodes, None).unwrap()
    }

    /// Waits until the snapshot satisfies `check` (published keys go through the lease task).
    async fn eventually(discovery: &Discovery, check: impl Fn(&Snapshot) -> bool) {
        for _ in 0..500 {
            if check(&discovery.snapshot().await.unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not reached");
    }

    #[tokio::test]
    async fn a_new_epoch_is_loaded_installed_and_reported_ready_then_released() {
        let discovery = Discovery::in_memory(&MemoryStore::new(), "c");
        let ctx = follower(&discovery).await;
        let router = planner(&discovery).await;
        let first = placement(&ctx, 1, &["n1", "n2"], "f");
        discovery.write_placement(&first, 0, "r1").await.unwrap();

        let mut loaded = 0;
        follow_once(&ctx, &mut loaded).await.unwrap();
        assert_eq!(loaded, 1);
        let set = ctx.served.for_epoch(1).expect("epoch 1 installed");
        let mine = first.experts_of("n1");
        assert!(!mine.is_empty());
        assert_eq!(set.len(), mine.len());
        assert!(mine
            .iter()
            .all(|&(l, e)| set.contains(l as usize, e as usize)));
        eventually(&discovery, |s| {
            s.members.ready.get("n1") == Some(&1) && s.members.nodes["n1"].state == NodeState::Ready
        })
        .await;
        assert_eq!(
            *ctx.progress.borrow(),
            NodeProgress {
                latest_epoch: 1,
                placed_here: true,
                min_router_epoch: Some(0),
                drain_requested: false,
            }
        );

        // The next epoch leaves n1 out; it may leave once the router serves that epoch.
        discovery.request_drain("n1").await.unwrap();
        let revision = discovery.snapshot().await.unwrap().placement_revision;
        let second = placement(&ctx, 2, &["n2"], "f");
        discovery
            .write_placement(&second, revision, "r1")
            .await
            .unwrap();
        follow_once(&ctx, &mut loaded).await.unwrap();
        assert_eq!(loaded, 2);
        assert_eq!(
            ctx.served.epochs(),
            [1, 2],
            "epoch 1 kept while a router serves it"
        );
        assert!(ctx.progress.borrow().drain_requested);
        assert!(!ctx.progress.borrow().can_leave());
        router.set_serving_epoch(2);
        eventually(&discovery, |s| s.members.min_router_epoch() == Some(2)).await;
        follow_once(&ctx, &mut loaded).await.unwrap();
        assert_eq!(ctx.served.epochs(), [2]);
        assert!(ctx.progress.borrow().can_leave());
    }

    #[tokio::test]
    async fn a_placement_for_another_checkpoint_is_not_loaded() {
        let discovery = Discovery::in_memory(&MemoryStore::new(), "c");
        let ctx = follower(&discovery).await;
        let _router = planner(&discovery).await;
        let other = placement(&ctx, 1, &["n1"], "another model");
        discovery.write_placement(&other, 0, "r1").await.unwrap();
        let mut loaded = 0;
        follow_once(&ctx, &mut loaded).await.unwrap();
        assert_eq!(loaded, 0);
        assert!(ctx.served.epochs().is_empty());
        assert_eq!(ctx.progress.borrow().latest_epoch, 0);
    }
}
