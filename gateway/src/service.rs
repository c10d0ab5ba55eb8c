//! The gateway's public gRPC services: `moe.v1.Inference` (what a router serves, for all of
//! them) and `moe.v1.Gateway` (its routers, and router drains).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_cluster::api_keys::AdminAccess;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::gateway_server::Gateway;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::inference_server::Inference;
use moe_proto::v1::{
    DrainRouterRequest, DrainRouterResponse, GatewayRouter, GenerateRequest, GenerateResponse,
    ModelInfoRequest, ModelInfoResponse, RoutersRequest, RoutersResponse, TokenizeRequest,
    TokenizeResponse,
};
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::intake::Intake;
use crate::relay::{ForwardHeaders, Relay};

/// Response header naming the router a stream started on.
pub const ROUTER_HEADER: &str = "moe-router";

pub struct InferenceGateway {
    pub intake: Arc<Intake>,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// A gRPC `grpc-timeout` header (`<digits><unit>`, unit one of `HMSmun`).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl InferenceGateway {
    /// A one-off call (Tokenize, ModelInfo) for the least loaded router: its client, and the
    /// request authorized for it.
    fn one_off<T>(
        &self,
        request: Request<T>,
    ) -> Result<(InferenceClient<tonic::transport::Channel>, Request<T>), Status> {
        let forward = ForwardHeaders::from_metadata(request.metadata());
        let router = self.intake.relay.any_router()?;
        let mut call = Request::new(request.into_inner());
        self.intake.relay.authorize(&router, &mut call, &forward);
        Ok((InferenceClient::new(router.channel.clone()), call))
    }
}

#[tonic::async_trait]
impl Inference for InferenceGateway {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let forward = ForwardHeaders::from_metadata(request.metadata());
        let deadline = grpc_timeout(request.metadata()).map(|d| Instant::now() + d);
        let (router, answers) = self
            .intake
            .start(request.into_inner(), forward, deadline)
            .await?;
        let mut response: Response<GenerateStream> = Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(answers),
        ));
        if let Ok(value) = router.parse() {
            response.metadata_mut().insert(ROUTER_HEADER, value);
        }
        Ok(response)
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let (mut client, call) = self.one_off(request)?;
        client.tokenize(call).await
    }

    async fn model_info(
        &self,
        request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let (mut client, call) = self.one_off(request)?;
        client.model_info(call).await
    }
}

/// `moe.v1.Gateway`.
pub struct GatewayService {
    pub relay: Arc<Relay>,
    /// Routers: an API or admin key; DrainRouter: an admin key, or loopback without one.
    pub access: AdminAccess,
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn routers(
        &self,
        request: Request<RoutersRequest>,
    ) -> Result<Response<RoutersResponse>, Status> {
        self.access.read(&request)?;
        use std::sync::atomic::Ordering::Relaxed;
        let routers = self
            .relay
            .routers
            .all()
            .values()
            .map(|r| GatewayRouter {
                router_id: r.id.clone(),
                address: r.record.address.clone(),
                http_address: r.record.http_address.clone(),
                model: r.record.model.clone(),
                running: r.record.load.running,
                waiting: r.record.load.waiting,
                kv_blocks_free: r.record.load.kv_blocks_free,
                kv_blocks_cached: r.record.load.kv_blocks_cached,
                kv_blocks_total: r.record.load.kv_blocks_total,
                in_flight: r.counters.in_flight.load(Relaxed),
                requests_total: r.counters.requests.load(Relaxed),
                migrations_from: r.counters.migrations_from.load(Relaxed),
                healthy: r.healthy(),
                serving_epoch: r.record.serving_epoch,
            })
            .collect();
        Ok(Response::new(RoutersResponse {
            policy: self.relay.chooser.policy().as_str().to_string(),
            routers,
            migrations_total: self.relay.metrics.migrations_total(),
        }))
    }

    async fn drain_router(
        &self,
        request: Request<DrainRouterRequest>,
    ) -> Result<Response<DrainRouterResponse>, Status> {
        self.access.mutate(&request)?;
        let forward = ForwardHeaders::from_metadata(request.metadata());
        let router_id = request.into_inner().router_id;
        let Some(router) = self.relay.routers.all().get(&router_id).cloned() else {
            return Err(Status::not_found(format!(
                "no router {router_id:?} is registered"
            )));
        };
        // The router checks the operator's key itself (or that the gateway is on its host).
        let mut call = Request::new(DrainRouterRequest { router_id });
        if let Some(key) = forward.authorization {
            call.metadata_mut().insert("authorization", key);
        }
        AdminClient::new(router.channel.clone())
            .drain_router(call)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let at = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(at("250m"), Some(Duration::from_millis(250)));
        assert_eq!(at("3S"), Some(Duration::from_secs(3)));
        assert_eq!(at("2M"), Some(Duration::from_secs(120)));
        assert_eq!(at("7u"), Some(Duration::from_micros(7)));
        assert_eq!(at("123456789S"), None);
        assert_eq!(at("m"), None);
        assert_eq!(at("5x"), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
