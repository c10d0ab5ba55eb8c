//! `moe.v1.Admin`: cluster status and node drains.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use moe_cluster::placement::Placement;
use moe_proto::v1::admin_server::Admin;
use moe_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, DrainRequest, DrainResponse, DrainRouterRequest,
    DrainRouterResponse, ExpertRef, NodeStatus,
};
use tonic::{Request, Response, Status};

use crate::cluster_view::ClusterView;
use crate::error::RouterError;
use crate::kv_blocks::KvBlocks;
use crate::scheduler::SchedulerStats;

fn seconds(nanos: &std::sync::atomic::AtomicU64) -> f64 {
    nanos.load(Ordering::Relaxed) as f64 / 1e9
}

pub struct AdminService {
    pub cluster: String,
    /// Where drain requests are written; none when the experts are in this process
    /// (`--in-process-nodes`: no node to drain).
    pub discovery: Option<moe_cluster::Discovery>,
    pub view: Arc<ClusterView>,
    pub stats: Arc<SchedulerStats>,
    pub kv: Arc<KvBlocks>,
    /// Where the dense part runs (`DenseStep::placement`).
    pub dense_device: String,
    /// Who may read and who may drain.
    pub access: crate::api_keys::AdminAccess,
    /// Stops this router (`DrainRouter`), as SIGTERM does.
    pub stopper: Arc<moe_cluster::shutdown::Stopper>,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.access.read(&request)?;
        let membership = self.view.membership();
        let latest = self.view.latest();
        let serving = self.view.serving();
        let in_process_nodes = self.view.in_process_nodes.load(Ordering::Relaxed);
        let placement = serving.as_ref().map(|s| &s.placement).or(latest.as_ref());
        let mut ids: Vec<String> = membership.nodes.keys().cloned().collect();
        if let Some(p) = placement {
            for id in p.nodes.keys() {
                if !ids.contains(id) {
                    ids.push(id.clone());
                }
            }
        }
        ids.sort();
        let nodes = ids
            .into_iter()
            .map(|id| {
                let record = membership.nodes.get(&id);
                let experts = placement
                    .map(|p| {
                        p.experts_of(&id)
                            .iter()
                            .map(|&(layer, expert)| ExpertRef {
                                layer,
                                expert,
                                tokens: self.view.expert_tokens((layer, expert)),
                                cluster_tokens: self.view.cluster_expert_tokens((layer, expert)),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let link = serving
                    .as_ref()
                    .and_then(|s| s.links.iter().find(|l| l.node_id == id));
                let counter =
                    |f: fn(&crate::node_link::NodeLink) -> u64| link.map(|l| f(l)).unwrap_or(0);
                NodeStatus {
                    rows_on_wire: record
                        .map(|r| r.rows_on_wire.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    dispatched_rows: counter(|l| l.rows_sent.load(Ordering::Relaxed)),
                    dispatched_pairs: counter(|l| l.pairs_sent.load(Ordering::Relaxed)),
                    address: record
                        .map(|r| r.address.clone())
                        .or_else(|| {
                            placement.and_then(|p| p.nodes.get(&id).map(|a| a.address.clone()))
                        })
                        .unwrap_or_default(),
                    state: if record.is_some()
                        && (self.view.is_suspect(&id) || membership.is_suspect(&id))
                    {
                        "suspect".to_string()
                    } else {
                        record
                            .map(|r| r.state.as_str())
                            .unwrap_or("gone")
                            .to_string()
                    },
                    ready_epoch: membership.ready.get(&id).copied().unwrap_or(0),
                    node_id: id,
                    experts,
                }
            })
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            cluster: self.cluster.clone(),
            serving_epoch: serving.as_ref().map(|s| s.placement.epoch).unwrap_or(0),
            latest_epoch: latest.map(|p| p.epoch).unwrap_or(0),
            nodes,
            requests_running: self.stats.running.load(Ordering::Relaxed) as u32,
            requests_waiting: self.stats.waiting.load(Ordering::Relaxed) as u32,
            kv_blocks_used: self.kv.used() as u64,
            kv_blocks_cached: self.stats.prefix_cache_blocks.load(Ordering::Relaxed) as u64,
            kv_blocks_total: self.kv.total() as u64,
            moe_layer_calls: self.view.layer_times.calls.load(Ordering::Relaxed),
            dispatch_encode_seconds: seconds(&self.view.layer_times.encode_nanos),
            dispatch_wait_seconds: seconds(&self.view.layer_times.wait_nanos),
            expert_compute_seconds: seconds(&self.view.layer_times.compute_nanos),
            combine_seconds: seconds(&self.view.layer_times.combine_nanos),
            router_id: self.view.router_id.clone(),
            planner_id: self
                .view
                .planner_id
                .read()
                .ok()
                .and_then(|p| p.clone())
                .unwrap_or_default(),
            is_planner: self.view.is_planner.load(Ordering::Relaxed),
            imbalance_ratio: self.view.imbalance(),
            rebalances: self.view.rebalances.load(Ordering::Relaxed),
            cluster_imbalance_ratio: self.view.cluster_imbalance(),
            load_reporting_routers: self.view.load_reporting_routers.load(Ordering::Relaxed) as u32,
            replicas: serving
                .as_ref()
                .map(|s| s.placement.replica_count() as u64)
                .unwrap_or(0),
            layer_retries: self.view.layer_retries.load(Ordering::Relaxed),
            serving_transport: if in_process_nodes > 0 {
                "in-process".into()
            } else {
                serving
                    .as_ref()
                    .map(|s| s.transport().to_string())
                    .unwrap_or_default()
            },
            in_process_nodes: in_process_nodes as u32,
            collective_layers: self.view.collective_layers.load(Ordering::Relaxed),
            collective_failures: self.view.collective_failures.load(Ordering::Relaxed),
            dense_device: self.dense_device.clone(),
            micro_batched_steps: self.stats.micro_batched_steps.load(Ordering::Relaxed),
            suspect_replans: self.view.suspect_replans.load(Ordering::Relaxed),
            suspect_reports: self.view.suspect_reports.load(Ordering::Relaxed),
        }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.access.mutate(&request)?;
        let node_id = request.into_inner().node_id;
        let discovery = match &self.discovery {
            Some(d) if self.view.membership().nodes.contains_key(&node_id) => d,
            _ => return Err(RouterError::NodeNotFound(node_id).into()),
        };
        // Read before the request is written: the planner may see the request and write the
        // epoch without the node before the write's answer comes back here.
        let before = self.view.latest();
        discovery
            .request_drain(&node_id)
            .await
            .map_err(|e| RouterError::Store(e.to_string()))?;
        tracing::info!(node_id, "drain requested");
        self.view.wake_planner.notify_one();
        // The planner writes the next epoch within a poll interval.
        for _ in 0..200 {
            let latest = self.view.latest();
            if let Some(epoch) = drained_epoch(before.as_ref(), latest.as_ref(), &node_id) {
                return Ok(Response::new(DrainResponse { epoch }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(RouterError::DrainTimedOut.into())
    }

    /// Stops taking requests and exits once the open ones are done: a gateway's streams end
    /// at once with `UNAVAILABLE` and move on; its registration leaves etcd.
    async fn drain_router(
        &self,
        request: Request<DrainRouterRequest>,
    ) -> Result<Response<DrainRouterResponse>, Status> {
        self.access.mutate(&request)?;
        let router_id = request.into_inner().router_id;
        if !router_id.is_empty() && router_id != self.view.router_id {
            return Err(RouterError::RouterNotFound(router_id).into());
        }
        let running =
            self.stats.running.load(Ordering::Relaxed) + self.stats.waiting.load(Ordering::Relaxed);
        tracing::info!(running, "router drain requested");
        self.stopper.stop();
        Ok(Response::new(DrainRouterResponse {
            running: running as u32,
        }))
    }
}

/// The first epoch without `node` since the drain was asked for, given the newest placement
/// `before` the request and the newest one now: `before`'s own when it already left the node
/// out (a node registered but never placed: no epoch will be written for it).
fn drained_epoch(
    before: Option<&Placement>,
    latest: Option<&Placement>,
    node: &str,
) -> Option<u64> {
    let before = match before {
        Some(p) if p.nodes.contains_key(node) => p.epoch,
        Some(p) => return Some(p.epoch),
        None => return Some(0),
    };
    latest
        .filter(|p| p.epoch > before && !p.nodes.contains_key(node))
        .map(|p| p.epoch)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn placement(epoch: u64, nodes: &[&str]) -> Placement {
        Placement {
            epoch,
            fingerprint: String::new(),
            nodes: nodes
                .iter()
                .map(|id| {
                    let assignment = moe_cluster::placement::NodeAssignment {
                        address: String::new(),
                        experts: vec![],
                    };
                    (id.to_string(), assignment)
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    /// A drain is done once an epoch newer than the request's leaves the node out, however
    /// soon the planner wrote it (even before the request's write returned); a node that no
    /// placement holds is drained at once.
    #[test]
    fn a_drain_ends_at_the_first_epoch_without_the_node() {
        let before = placement(1, &["n0", "n1"]);
        assert_eq!(drained_epoch(Some(&before), Some(&before), "n0"), None);
        let next = placement(2, &["n1"]);
        assert_eq!(drained_epoch(Some(&before), Some(&next), "n0"), Some(2));
        // Another node's epoch is not this drain's.
        let other = placement(2, &["n0"]);
        assert_eq!(drained_epoch(Some(&before), Some(&other), "n0"), None);
        assert_eq!(drained_epoch(Some(&next), Some(&next), "n0"), Some(2));
        assert_eq!(drained_epoch(None, None, "n0"), Some(0));
    }
}
