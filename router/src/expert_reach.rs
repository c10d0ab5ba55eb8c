//! Where a step's routed experts are: the placement's expert nodes (through etcd's epochs and
//! the data plane), or expert nodes running as threads of this process (`--in-process-nodes`:
//! one process serves the whole model, with no etcd; on a GPU the layer's rows stay on the
//! device). The scheduler and the micro-batches see one interface either way.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use moe_cluster::collective::in_process::NodeLiveness;
use moe_cluster::shutdown::{Shutdown, Stopper};
use moe_model::experts::ExpertBackend;

use crate::cluster_view::ClusterView;
use crate::dispatch::{MicroBatchExperts, RemoteExperts};

pub enum ExpertReach {
    Cluster(RemoteExperts),
    InProcess(InProcessExperts),
}

/// The in-process nodes, how many there are (for the logs and the status) and whether their
/// threads are alive.
pub struct InProcessExperts {
    pub nodes: usize,
    pub backend: Box<dyn ExpertBackend + Send + Sync>,
    pub liveness: NodeLiveness,
}

/// One micro-batch's experts (see [`RemoteExperts::micro_batch`]).
pub enum MicroBatchReach<'a> {
    Cluster(MicroBatchExperts<'a>),
    InProcess(&'a (dyn ExpertBackend + Send + Sync)),
}

impl MicroBatchReach<'_> {
    pub fn backend(&self) -> &dyn ExpertBackend {
        match self {
            MicroBatchReach::Cluster(experts) => experts,
            MicroBatchReach::InProcess(backend) => *backend,
        }
    }
}

impl ExpertReach {
    /// Called once per model step (dispatches carry the step number and its span).
    pub fn next_step(&self, span: tracing::Span) {
        if let ExpertReach::Cluster(remote) = self {
            remote.next_step(span);
        }
    }

    /// The step's forward is done.
    pub fn end_step(&self) {
        if let ExpertReach::Cluster(remote) = self {
            remote.end_step();
        }
    }

    pub fn micro_batch(&self, micro_batch: u32) -> MicroBatchReach<'_> {
        match self {
            ExpertReach::Cluster(remote) => {
                MicroBatchReach::Cluster(remote.micro_batch(micro_batch))
            }
            ExpertReach::InProcess(local) => MicroBatchReach::InProcess(local.backend.as_ref()),
        }
    }

    /// The whole step's experts, when it is not split.
    pub fn backend(&self) -> &dyn ExpertBackend {
        match self {
            ExpertReach::Cluster(remote) => remote,
            ExpertReach::InProcess(local) => local.backend.as_ref(),
        }
    }
}

/// A router serving through in-process nodes cannot serve once one of their threads has ended
/// on its own (only a bug ends one; every later step would fail): from then on health says
/// NOT_SERVING, new requests are refused as unavailable, and the router stops (and exits
/// non-zero: `main`) for its supervisor to start it again. Checks every `every` until the
/// router stops for another reason. `service` is the inference service's health name.
pub async fn stop_when_a_node_ends(
    stopped: impl Fn() -> usize,
    view: Arc<ClusterView>,
    health: tonic_health::server::HealthReporter,
    service: &'static str,
    stopper: Arc<Stopper>,
    mut shutdown: Shutdown,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        let ended = stopped();
        if ended == 0 {
            continue;
        }
        tracing::error!(
            ended,
            "an in-process expert node has stopped: this router can no longer serve; stopping"
        );
        view.in_process_nodes.store(0, Ordering::Relaxed);
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
        stopper.stop();
        return;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn a_node_that_ends_stops_the_router_and_refuses_new_requests() {
        let view = Arc::new(ClusterView::new("router-test".into()));
        view.in_process_nodes.store(2, Ordering::Relaxed);
        let (health, _service) = tonic_health::server::health_reporter();
        let (stopper, shutdown) = moe_cluster::shutdown::Shutdown::new();
        let stopper = Arc::new(stopper);
        let ended = Arc::new(AtomicUsize::new(0));
        let watch = tokio::spawn(stop_when_a_node_ends(
            {
                let ended = Arc::clone(&ended);
                move || ended.load(Ordering::Relaxed)
            },
            Arc::clone(&view),
            health,
            "moe.v1.Inference",
            Arc::clone(&stopper),
            shutdown.clone(),
            Duration::from_millis(5),
        ));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!shutdown.is_shutdown() && view.can_serve());
        ended.store(1, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .expect("the watch ends")
            .unwrap();
        assert!(shutdown.is_shutdown());
        assert!(!view.can_serve());
    }

    #[tokio::test]
    async fn the_watch_ends_with_the_router() {
        let view = Arc::new(ClusterView::new("router-test".into()));
        let (health, _service) = tonic_health::server::health_reporter();
        let (stopper, shutdown) = moe_cluster::shutdown::Shutdown::new();
        let stopper = Arc::new(stopper);
        let watch = tokio::spawn(stop_when_a_node_ends(
            || 0,
            view,
            health,
            "moe.v1.Inference",
            Arc::clone(&stopper),
            shutdown,
            Duration::from_millis(5),
        ));
        stopper.stop();
        tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .expect("the watch ends")
            .unwrap();
    }
}
