//! The router's view of the cluster: the placement it serves on, a link to each of its nodes,
//! the latest membership, and per-expert dispatch counters. The planner task writes it; the step
//! loop and the Admin service read it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use moe_cluster::collective::{EpochLink, Transport};
use moe_cluster::discovery::Membership;
use moe_cluster::placement::{ExpertId, Placement};

use crate::node_link::NodeLink;

/// A placement ready to dispatch on.
pub struct ServingPlacement {
    pub placement: Placement,
    /// Expert to the indices of the nodes in `links` that hold it (several when replicated).
    pub holders: HashMap<ExpertId, Vec<usize>>,
    pub links: Vec<Arc<NodeLink>>,
    /// The epoch's collective (rank `i + 1` is `links[i]`), once every node has joined it.
    pub collective: EpochCollective,
}

/// An epoch's collective, re-formed after a failure. A failure that names no dead node (a
/// node paused past the timeout, a dropped connection) leaves the epoch itself in place, and
/// a stable cluster keeps one epoch for hours: without a new communicator one hiccup would
/// leave it on gRPC for good. Attempts back off (250 ms doubling to 30 s) and stop after
/// [`EpochCollective::MAX_FAILURES`], so a node that keeps failing costs little.
///
/// A communicator lives exactly as long as a dispatch can use it: dropping the last
/// reference (the slot's and any in-flight dispatch's) closes or aborts it, which releases
/// the nodes' side too.
#[derive(Default)]
pub struct EpochCollective {
    link: Mutex<Option<Arc<Mutex<EpochLink>>>>,
    failures: AtomicU32,
    reform_at: Mutex<Option<Instant>>,
}

impl EpochCollective {
    /// Failures (mid-layer or while forming) after which the epoch stays on gRPC.
    pub const MAX_FAILURES: u32 = 8;

    pub fn install(&self, link: EpochLink) {
        if let Ok(mut slot) = self.link.lock() {
            *slot = Some(Arc::new(Mutex::new(link)));
        }
    }

    /// The communicator to dispatch on, if one is formed and has not failed.
    pub fn live(&self) -> Option<Arc<Mutex<EpochLink>>> {
        self.link.lock().ok()?.clone()
    }

    /// Records a failure: the communicator is dropped (layers go over gRPC) and a new one is
    /// scheduled after the backoff. Returns the backoff, or `None` once the epoch gives up.
    pub fn fail(&self, now: Instant) -> Option<Duration> {
        if let Ok(mut slot) = self.link.lock() {
            slot.take();
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let backoff = reform_backoff(failures);
        if let Ok(mut at) = self.reform_at.lock() {
            *at = backoff.map(|b| now + b);
        }
        backoff
    }

    /// Whether a re-formation is due at `now`; taking it clears the schedule.
    pub fn reform_due(&self, now: Instant) -> bool {
        let Ok(mut at) = self.reform_at.lock() else {
            return false;
        };
        match *at {
            Some(when) if when <= now => {
                *at = None;
                true
            }
            _ => false,
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Wait before forming a new communicator after the `failures`-th failure of an epoch's.
pub fn reform_backoff(failures: u32) -> Option<Duration> {
    if failures == 0 || failures > EpochCollective::MAX_FAILURES {
        return None;
    }
    let millis = 250u64.saturating_mul(1 << (failures - 1).min(16));
    Some(Duration::from_millis(millis.min(30_000)))
}

impl ServingPlacement {
    pub fn new(placement: Placement, links: Vec<Arc<NodeLink>>) -> Self {
        let index: HashMap<&str, usize> = links
            .iter()
            .enumerate()
            .map(|(i, l)| (l.node_id.as_str(), i))
            .collect();
        let holders = placement
            .holders()
            .into_iter()
            .map(|(e, nodes)| {
                let mut at: Vec<usize> =
                    nodes.iter().filter_map(|n| index.get(n).copied()).collect();
                at.sort_unstable();
                (e, at)
            })
            .filter(|(_, at)| !at.is_empty())
            .collect();
        Self {
            placement,
            holders,
            links,
            collective: EpochCollective::default(),
        }
    }

    /// The collective to dispatch on, unless there is none (yet, or again) or it failed.
    pub fn live_collective(&self) -> Option<Arc<Mutex<EpochLink>>> {
        self.collective.live()
    }

    /// What the epoch's layers go over now.
    pub fn transport(&self) -> Transport {
        match self
            .live_collective()
            .and_then(|l| l.lock().ok().map(|l| l.transport()))
        {
            Some(t) => t,
            None => Transport::Grpc,
        }
    }
}

/// Where MoE-layer time goes, in nanoseconds (see the Admin proto).
#[derive(Default, Debug)]
pub struct LayerTimes {
    pub calls: AtomicU64,
    pub encode_nanos: AtomicU64,
    pub wait_nanos: AtomicU64,
    /// The slowest node's compute per layer call (what the wait could not be shorter than).
    pub compute_nanos: AtomicU64,
    pub combine_nanos: AtomicU64,
}

#[derive(Default)]
pub struct ClusterView {
    pub layer_times: LayerTimes,
    serving: RwLock<Option<Arc<ServingPlacement>>>,
    latest: RwLock<Option<Placement>>,
    membership: RwLock<Membership>,
    /// Tokens dispatched per `(layer, expert)` since start.
    expert_tokens: RwLock<BTreeMap<ExpertId, Arc<AtomicU64>>>,
    /// On the planner: the other routers' tokens per expert, as of their last load reports.
    peer_expert_tokens: RwLock<HashMap<ExpertId, u64>>,
    /// Nodes whose data plane failed here: node id to (instance, when). The planner leaves
    /// them out of the next epoch until their lease ends, they restart, or the report expires.
    suspects: Mutex<HashMap<String, (String, Instant)>>,
    /// Wakes the planner at once (a node failed, an operator asked for a drain).
    pub wake_planner: Notify,
    /// Wakes dispatches waiting for a new serving epoch.
    pub epoch_changed: Notify,
    /// This router's id and whether it is the elected planner.
    pub router_id: String,
    pub is_planner: AtomicBool,
    pub planner_id: RwLock<Option<String>>,
    /// max node load / mean node load over the last load window, times 1000 (0: no traffic).
    pub imbalance_milli: AtomicU64,
    /// On the planner: the same over every router's pairs (see `load_window`), and how many
    /// routers that window counted.
    pub cluster_imbalance_milli: AtomicU64,
    pub load_reporting_routers: AtomicU64,
    pub rebalances: AtomicU64,
    /// Expert copies those rebalances had nodes load (replicas, and both sides of exchanges):
    /// what rebalancing cost in loading.
    pub rebalance_expert_loads: AtomicU64,
    /// MoE layers that had to be re-dispatched after a node failed.
    pub layer_retries: AtomicU64,
    /// MoE layers sent over a collective, and collectives that failed mid-layer.
    pub collective_layers: AtomicU64,
    pub collective_failures: AtomicU64,
    /// Of the collective's layers, those whose rows stayed on the router's GPU (gathered per
    /// node and placed back there).
    pub device_resident_layers: AtomicU64,
    /// Nodes reported suspect here (fresh reports only), and epochs the planner wrote to leave
    /// out a node still registered but suspect (here or at another router).
    pub suspect_reports: AtomicU64,
    pub suspect_replans: AtomicU64,
    /// Expert nodes running as threads of this router (`--in-process-nodes`), which then
    /// serves without etcd, placements or a data plane; 0 on a cluster.
    pub in_process_nodes: AtomicUsize,
}

impl ClusterView {
    pub fn serving(&self) -> Option<Arc<ServingPlacement>> {
        self.serving.read().ok()?.clone()
    }

    /// Whether a step can run now: a placement serves, or the experts are in this process.
    pub fn can_serve(&self) -> bool {
        self.in_process_nodes.load(Ordering::Relaxed) > 0 || self.serving().is_some()
    }

    pub fn set_serving(&self, serving: ServingPlacement) {
        if let Ok(mut s) = self.serving.write() {
            *s = Some(Arc::new(serving));
        }
        self.epoch_changed.notify_waiters();
    }

    pub fn latest(&self) -> Option<Placement> {
        self.latest.read().ok()?.clone()
    }

    pub fn set_latest(&self, placement: Placement) {
        if let Ok(mut l) = self.latest.write() {
            *l = Some(placement);
        }
    }

    pub fn membership(&self) -> Membership {
        self.membership
            .read()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn set_membership(&self, membership: Membership) {
        if let Ok(mut m) = self.membership.write() {
            *m = membership;
        }
    }

    pub fn count_tokens(&self, expert: ExpertId, tokens: u64) {
        if let Some(counter) = self
            .expert_tokens
            .read()
            .ok()
            .and_then(|m| m.get(&expert).cloned())
        {
            counter.fetch_add(tokens, Ordering::Relaxed);
            return;
        }
        if let Ok(mut m) = self.expert_tokens.write() {
            m.entry(expert)
                .or_default()
                .fetch_add(tokens, Ordering::Relaxed);
        }
    }

    pub fn expert_tokens(&self, expert: ExpertId) -> u64 {
        self.expert_tokens
            .read()
            .ok()
            .and_then(|m| m.get(&expert).map(|c| c.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }

    /// Every router's tokens to `expert` as the planner knows them (0 where no peer counts
    /// were given: on routers that do not plan).
    pub fn cluster_expert_tokens(&self, expert: ExpertId) -> u64 {
        let peers = self
            .peer_expert_tokens
            .read()
            .ok()
            .and_then(|m| m.get(&expert).copied());
        match peers {
            Some(n) => n + self.expert_tokens(expert),
            None if self.is_planner.load(Ordering::Relaxed) => self.expert_tokens(expert),
            None => 0,
        }
    }

    pub fn set_peer_expert_tokens(&self, tokens: HashMap<ExpertId, u64>) {
        if let Ok(mut m) = self.peer_expert_tokens.write() {
            *m = tokens;
        }
    }

    pub fn new(router_id: String) -> Self {
        Self {
            router_id,
            ..Self::default()
        }
    }

    /// Reports a node whose data plane failed; returns true the first time.
    pub fn suspect(&self, node_id: &str, reason: &str) -> bool {
        let instance = self
            .membership()
            .nodes
            .get(node_id)
            .map(|r| r.instance.clone())
            .unwrap_or_default();
        let Ok(mut suspects) = self.suspects.lock() else {
            return false;
        };
        let fresh = !suspects.contains_key(node_id);
        if fresh {
            self.suspect_reports.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                node_id,
                instance,
                reason,
                "node suspect: its data plane failed"
            );
        }
        suspects.insert(node_id.to_string(), (instance, Instant::now()));
        drop(suspects);
        self.wake_planner.notify_one();
        fresh
    }

    /// Current suspects `(node id, instance)`, dropping reports older than `ttl` and those for
    /// nodes that left or restarted.
    pub fn suspects(&self, ttl: Duration, membership: &Membership) -> Vec<(String, String)> {
        let Ok(mut suspects) = self.suspects.lock() else {
            return Vec::new();
        };
        suspects.retain(|id, (instance, since)| {
            since.elapsed() < ttl
                && membership
                    .nodes
                    .get(id)
                    .is_some_and(|r| r.instance == *instance)
        });
        suspects
            .iter()
            .map(|(id, (instance, _))| (id.clone(), instance.clone()))
            .collect()
    }

    pub fn is_suspect(&self, node_id: &str) -> bool {
        self.suspects
            .lock()
            .map(|s| s.contains_key(node_id))
            .unwrap_or(false)
    }

    /// Dispatched-token counts per expert since start (the planner diffs them into windows).
    pub fn expert_token_counts(&self) -> HashMap<ExpertId, u64> {
        self.expert_tokens
            .read()
            .map(|m| {
                m.iter()
                    .map(|(e, c)| (*e, c.load(Ordering::Relaxed)))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn imbalance(&self) -> f64 {
        self.imbalance_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub fn cluster_imbalance(&self) -> f64 {
        self.cluster_imbalance_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_collective_is_re_formed_after_a_growing_backoff_then_given_up() {
        assert_eq!(reform_backoff(1), Some(Duration::from_millis(250)));
        assert_eq!(reform_backoff(2), Some(Duration::from_millis(500)));
        assert_eq!(reform_backoff(8), Some(Duration::from_millis(30_000)));
        assert_eq!(reform_backoff(EpochCollective::MAX_FAILURES + 1), None);

        let c = EpochCollective::default();
        let t0 = Instant::now();
        assert!(!c.reform_due(t0), "nothing failed");
        assert_eq!(c.fail(t0), Some(Duration::from_millis(250)));
        assert!(c.live().is_none());
        assert!(!c.reform_due(t0 + Duration::from_millis(249)));
        assert!(c.reform_due(t0 + Duration::from_millis(250)));
        assert!(
            !c.reform_due(t0 + Duration::from_secs(60)),
            "taken once per failure"
        );
        for _ in 1..EpochCollective::MAX_FAILURES {
            assert!(c.fail(t0).is_some());
        }
        assert_eq!(c.fail(t0), None, "gives up: the epoch stays on gRPC");
        assert_eq!(c.failures(), EpochCollective::MAX_FAILURES + 1);
    }
}
