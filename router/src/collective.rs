//! The per-epoch collective on the router's side: when the router starts serving an epoch and
//! every node of it can join the chosen transport, open rank 0, publish where to join
//! (`collective/<epoch>/<router>`), and install the communicator in the epoch's
//! [`ServingPlacement`] once all nodes are in. Until then, for mixed clusters, and after a
//! failure, the epoch's layers go over the gRPC streams.

use std::sync::Arc;
use std::time::Duration;

use moe_cluster::collective::{open_root, RootSettings, Transport};
use moe_cluster::discovery::Membership;
use moe_cluster::RouterRegistration;

use crate::cluster_view::ServingPlacement;

/// `--transport` and what it needs.
#[derive(Clone)]
pub struct CollectiveSettings {
    pub transport: Transport,
    pub root: RootSettings,
    /// Bound on joining and on each step of a layer's exchange.
    pub timeout: Duration,
}

/// The transport an epoch over `nodes` can use: the preferred one if every node advertises
/// it (a mixed cluster, or a node that left the registry, stays on gRPC).
pub fn epoch_transport(
    preferred: Transport,
    nodes: &[String],
    membership: &Membership,
) -> Transport {
    if preferred == Transport::Grpc || nodes.is_empty() {
        return Transport::Grpc;
    }
    let all_can = nodes.iter().all(|id| {
        membership
            .nodes
            .get(id)
            .is_some_and(|r| r.collectives.contains(&preferred))
    });
    if all_can {
        preferred
    } else {
        Transport::Grpc
    }
}

/// Opens and publishes the collective of the newly served epoch when its nodes can all join
/// it; the joining finishes on a blocking thread. Records of older epochs are withdrawn.
/// Called again for the same epoch to re-form it after a failure: the record is replaced (a
/// new rendezvous and nonce), which the nodes take as a new communicator to join.
pub fn start_for_epoch(
    settings: &CollectiveSettings,
    serving: Arc<ServingPlacement>,
    membership: &Membership,
    registration: Option<&RouterRegistration>,
) {
    let epoch = serving.placement.epoch;
    let nodes: Vec<String> = serving.links.iter().map(|l| l.node_id.clone()).collect();
    let transport = epoch_transport(settings.transport, &nodes, membership);
    if transport == Transport::Grpc {
        if settings.transport != Transport::Grpc {
            tracing::info!(
                epoch,
                preferred = %settings.transport,
                "not every node of the epoch can join the collective: gRPC data plane"
            );
        }
        if let Some(r) = registration {
            r.retire_collectives_below(epoch.saturating_add(1));
        }
        return;
    }
    let Some(registration) = registration else {
        return;
    };
    let (joining, record) = match open_root(
        transport,
        &settings.root,
        epoch,
        nodes,
        settings.timeout,
    ) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!(epoch, %transport, error = %e, "cannot open the epoch's collective: gRPC data plane");
            return;
        }
    };
    registration.set_collective(&record);
    let timeout = settings.timeout;
    tokio::task::spawn_blocking(move || match joining.complete(timeout) {
        Ok(link) => {
            tracing::info!(epoch, %transport, nodes = serving.links.len(), "collective ready: layers of this epoch go over it");
            serving.collective.install(link);
        }
        Err(e) => {
            let retry = serving.collective.fail(std::time::Instant::now());
            tracing::warn!(epoch, %transport, error = %e, ?retry, "the epoch's collective did not form: gRPC data plane");
        }
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use moe_cluster::collective::communicator::{Communicator, Pending};
    use moe_cluster::collective::tcp::{TcpCommunicator, TcpLimits, TcpRoot, TcpSettings};
    use moe_cluster::collective::{CommError, EpochLink};
    use moe_cluster::{NodeRecord, NodeState, Placement};

    use super::*;

    /// The communicator lives exactly as long as something can dispatch on it: once a failure
    /// takes it out of its epoch and the last dispatch lets go, its socket closes and a node
    /// waiting on it is released at once (no timeout).
    #[test]
    fn an_epochs_collective_closes_with_its_placement() {
        let settings = TcpSettings {
            limits: TcpLimits::for_frames(1 << 20),
            token: None,
        };
        let root = TcpRoot::bind("127.0.0.1:0", None, 2, settings.clone()).unwrap();
        let at = root.rendezvous().clone();
        let member = std::thread::spawn(move || {
            TcpCommunicator::connect(&at, 1, 2, Duration::from_secs(5), &settings)
        });
        let link = root.accept_all(Duration::from_secs(5)).unwrap();
        let mut node = member.join().unwrap().unwrap();
        let placement = Placement {
            epoch: 4,
            fingerprint: String::new(),
            nodes: BTreeMap::new(),
        };
        let serving = Arc::new(ServingPlacement::new(placement, vec![]));
        assert_eq!(
            serving.transport(),
            Transport::Grpc,
            "gRPC until the collective forms"
        );
        serving.collective.install(EpochLink::Tcp(link));
        assert_eq!(serving.transport(), Transport::Tcp);
        let in_flight = serving.live_collective().expect("installed");
        // A failure takes it out of the epoch; a dispatch still holding it keeps it open.
        assert!(serving.collective.fail(std::time::Instant::now()).is_some());
        assert_eq!(
            serving.transport(),
            Transport::Grpc,
            "after a failure: gRPC"
        );
        drop(serving);
        node.post(Pending {
            sends: vec![],
            recvs: vec![(0, 4)],
        })
        .unwrap();
        assert_eq!(node.wait(Duration::from_millis(50)), Ok(None));
        // The last holder lets go: the node is told at once.
        drop(in_flight);
        let started = std::time::Instant::now();
        let closed = node.wait(Duration::from_secs(10));
        assert!(matches!(closed, Err(CommError::Failed(_))), "{closed:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    fn node(collectives: Vec<Transport>) -> NodeRecord {
        NodeRecord {
            address: "127.0.0.1:1".into(),
            device: "cpu".into(),
            memory_bytes: 0,
            state: NodeState::Ready,
            fingerprint: String::new(),
            instance: String::new(),
            collectives,
            max_batch_rows: 512,
            rows_on_wire: Default::default(),
        }
    }

    #[test]
    fn an_epoch_uses_the_collective_only_if_every_node_can_join_it() {
        let mut membership = Membership::default();
        membership
            .nodes
            .insert("a".into(), node(vec![Transport::Tcp]));
        membership
            .nodes
            .insert("b".into(), node(vec![Transport::Tcp, Transport::Nccl]));
        membership.nodes.insert("old".into(), node(vec![]));
        let both = ["a".to_string(), "b".to_string()];
        assert_eq!(
            epoch_transport(Transport::Tcp, &both, &membership),
            Transport::Tcp
        );
        assert_eq!(
            epoch_transport(Transport::Grpc, &both, &membership),
            Transport::Grpc
        );
        // `a` has no GPU: the epoch stays on gRPC.
        assert_eq!(
            epoch_transport(Transport::Nccl, &both, &membership),
            Transport::Grpc
        );
        assert_eq!(
            epoch_transport(Transport::Nccl, &["b".to_string()], &membership),
            Transport::Nccl
        );
        // A node of an older build (no `collectives` field) or one gone from etcd: gRPC.
        let mixed = ["a".to_string(), "old".to_string()];
        assert_eq!(
            epoch_transport(Transport::Tcp, &mixed, &membership),
            Transport::Grpc
        );
        let gone = ["a".to_string(), "z".to_string()];
        assert_eq!(
            epoch_transport(Transport::Tcp, &gone, &membership),
            Transport::Grpc
        );
        assert_eq!(
            epoch_transport(Transport::Tcp, &[], &membership),
            Transport::Grpc
        );
        // An old node record without the field still parses.
        let legacy: NodeRecord = serde_json::from_str(
            r#"{"address":"x:1","device":"cpu","memory_bytes":0,"state":"ready","fingerprint":""}"#,
        )
        .unwrap();
        assert!(legacy.collectives.is_empty());
    }
}
