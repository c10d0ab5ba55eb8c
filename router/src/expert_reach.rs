//! Where a step's routed experts are: the placement's expert nodes (through etcd's epochs and
//! the data plane), or expert nodes running as threads of this process (`--in-process-nodes`:
//! one process serves the whole model, with no etcd; on a GPU the layer's rows stay on the
//! device). The scheduler and the micro-batches see one interface either way.

use moe_model::experts::ExpertBackend;

use crate::dispatch::{MicroBatchExperts, RemoteExperts};

pub enum ExpertReach {
    Cluster(RemoteExperts),
    InProcess(InProcessExperts),
}

/// The in-process nodes and how many there are (for the logs and the status).
pub struct InProcessExperts {
    pub nodes: usize,
    pub backend: Box<dyn ExpertBackend + Send + Sync>,
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
