//! `moe drain-router ROUTER_ID (--gateway ADDR | --router ADDR)`: the router stops taking
//! requests, the streams a gateway sent it move to other routers (resumed exactly), the others
//! finish, then it exits 0: a rolling restart's step. Sends `MOE_ADMIN_KEY` (routers and
//! gateways with `--admin-key-file` require it; without one they drain only for clients on
//! their own host).

use clap::Args;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::gateway_client::GatewayClient;
use moe_proto::v1::DrainRouterRequest;

use crate::router_client::{channel, rpc_error, runtime, with_key_from};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("through").required(true).args(["router", "gateway"])))]
pub struct DrainRouterArgs {
    /// A gateway that sees the router (it passes the call on).
    #[arg(long, env = "MOE_GATEWAY")]
    gateway: Option<String>,
    /// The router's own gRPC address.
    #[arg(long, env = "MOE_ROUTER")]
    router: Option<String>,
    /// The router to drain (`moe status --gateway ADDR` lists them).
    router_id: String,
}

pub fn run(args: DrainRouterArgs) -> anyhow::Result<()> {
    let request = || {
        with_key_from(
            DrainRouterRequest {
                router_id: args.router_id.clone(),
            },
            "MOE_ADMIN_KEY",
        )
    };
    let running = runtime()?.block_on(async {
        let response = match (&args.gateway, &args.router) {
            (Some(gateway), _) => {
                let mut client = channel(gateway)
                    .await
                    .map(GatewayClient::new)
                    .map_err(|e| anyhow::anyhow!("connecting to {gateway}: {e}"))?;
                client.drain_router(request()).await
            }
            (None, Some(router)) => {
                let mut client = channel(router)
                    .await
                    .map(AdminClient::new)
                    .map_err(|e| anyhow::anyhow!("connecting to {router}: {e}"))?;
                client.drain_router(request()).await
            }
            (None, None) => anyhow::bail!("give --gateway or --router"),
        };
        response.map(|r| r.into_inner().running).map_err(rpc_error)
    })?;
    println!(
        "{} draining: {running} requests move to other routers or finish, then it exits",
        args.router_id
    );
    Ok(())
}
