//! `--in-process-nodes N` of `moe generate` and `moe bench`: the offline engine reaches its
//! routed experts through N expert nodes running as threads of the process, over the layer
//! exchange, instead of calling them. On a GPU a layer's rows are then gathered per node,
//! handed over by pointer and placed back in pair order without leaving the device (the
//! router's device-resident path, on one GPU); the tokens are the same either way.

use clap::Args;
use moe_cluster::collective::in_process::reach;
use moe_model::experts::ExpertDevice;
use moe_model::Engine;

#[derive(Args, Clone, Debug)]
pub struct InProcessNodesArgs {
    /// Reach the routed experts through this many expert nodes in this process, over the
    /// layer exchange (experts dealt round-robin), instead of calling them; 0 calls them.
    #[arg(
        long,
        env = "MOE_IN_PROCESS_NODES",
        default_value_t = 0,
        conflicts_with = "router"
    )]
    pub in_process_nodes: usize,
}

impl InProcessNodesArgs {
    /// `engine` as asked: unchanged for 0 nodes.
    pub fn apply(&self, engine: Engine, device: &ExpertDevice) -> anyhow::Result<Engine> {
        let n = self.in_process_nodes;
        if n == 0 {
            return Ok(engine);
        }
        let config = engine.config().clone();
        let nodes = reach(&config, engine.experts(), n, device)?.backend;
        tracing::info!(nodes = n, "routed experts reached through in-process nodes");
        Ok(engine.reaching_experts_through(nodes))
    }
}
