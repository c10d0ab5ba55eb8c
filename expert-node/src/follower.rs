//! Follows the placement in etcd: when a new epoch assigns this node experts, load exactly those
//! (sharing the ones already held), install them, and announce `ready/<node> = epoch`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use moe_cluster::placement::PlacementStore;
use moe_cluster::{ClusterKeys, NodeRegistration, NodeState};
use moe_model::checkpoint::Checkpoint;
use moe_model::experts::ExpertSet;
use moe_model::ModelConfig;
use moe_proto::v1::expert_data_server::ExpertDataServer;
use tonic_health::server::HealthReporter;

use crate::data_plane::DataPlane;
use crate::served::ServedExperts;

pub struct FollowerContext {
    pub endpoints: Vec<String>,
    pub keys: ClusterKeys,
    pub node_id: String,
    pub fingerprint: String,
    pub model_dir: PathBuf,
    pub config: ModelConfig,
    pub served: Arc<ServedExperts>,
    pub registration: Arc<NodeRegistration>,
    pub health: HealthReporter,
    pub poll: Duration,
}

pub async fn follow_placement(ctx: FollowerContext) {
    let mut store: Option<PlacementStore> = None;
    let mut loaded_epoch = 0u64;
    loop {
        if store.is_none() {
            match Client::connect(&ctx.endpoints, None).await {
                Ok(client) => store = Some(PlacementStore::new(client, ctx.keys.clone())),
                Err(e) => {
                    tracing::warn!(error = %e, "etcd unreachable; serving the last placement")
                }
            }
        }
        if let Some(s) = store.as_mut() {
            match s.read().await {
                Ok((Some(placement), _)) if placement.epoch > loaded_epoch => {
                    if placement.fingerprint != ctx.fingerprint {
                        tracing::error!("placement is for another checkpoint; not loading");
                    } else {
                        let wanted: Vec<(usize, usize)> = placement
                            .experts_of(&ctx.node_id)
                            .iter()
                            .map(|&(l, e)| (l as usize, e as usize))
                            .collect();
                        match load(&ctx, &wanted).await {
                            Ok(set) => {
                                tracing::info!(
                                    epoch = placement.epoch,
                                    experts = set.len(),
                                    "loaded experts"
                                );
                                ctx.served.install(placement.epoch, Arc::new(set));
                                loaded_epoch = placement.epoch;
                                ctx.registration.set_ready_epoch(loaded_epoch);
                                ctx.registration.set_state(NodeState::Ready);
                                ctx.health
                                    .set_serving::<ExpertDataServer<DataPlane>>()
                                    .await;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "could not load assigned experts")
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read placement; keeping the current one");
                    store = None;
                }
            }
        }
        tokio::time::sleep(ctx.poll).await;
    }
}

async fn load(ctx: &FollowerContext, wanted: &[(usize, usize)]) -> anyhow::Result<ExpertSet> {
    let dir = ctx.model_dir.clone();
    let config = ctx.config.clone();
    let previous = ctx.served.latest().map(|(_, s)| s);
    let hidden = ctx.config.hidden_size;
    let wanted = wanted.to_vec();
    let set = tokio::task::spawn_blocking(move || -> moe_model::Result<ExpertSet> {
        let ckpt = Checkpoint::open(&dir)?;
        let base = previous.unwrap_or_else(|| Arc::new(ExpertSet::empty(hidden)));
        base.with_experts(&ckpt, &config, &wanted)
    })
    .await??;
    Ok(set)
}
