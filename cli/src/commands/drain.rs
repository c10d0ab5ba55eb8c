//! `moe drain --router ADDR NODE_ID`: Admin Drain. The planner writes an epoch without the node
//! and the node exits once every router serves it; prints that epoch. Sends `MOE_ADMIN_KEY`
//! (routers with `--admin-key-file` require it; without one they drain only for clients on
//! their own host).

use clap::Args;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::DrainRequest;

use crate::router_client::{channel, rpc_error, runtime, with_key_from};

#[derive(Args)]
pub struct DrainArgs {
    /// The router's gRPC address.
    #[arg(long, env = "MOE_ROUTER")]
    router: String,
    /// The node to drain.
    node_id: String,
}

pub fn run(args: DrainArgs) -> anyhow::Result<()> {
    let epoch = runtime()?.block_on(async {
        let mut client = channel(&args.router)
            .await
            .map(AdminClient::new)
            .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", args.router))?;
        client
            .drain(with_key_from(
                DrainRequest {
                    node_id: args.node_id.clone(),
                },
                "MOE_ADMIN_KEY",
            ))
            .await
            .map(|r| r.into_inner().epoch)
            .map_err(rpc_error)
    })?;
    println!(
        "{} drained: placement epoch {epoch} leaves it out",
        args.node_id
    );
    Ok(())
}
