//! The gateway's public gRPC services: `moe.v1.Inference` (what a router serves, for all of
//! them) and `moe.v1.Gateway` (its routers, and router drains).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_cluster::api_keys::AdminAccess;
use moe_model::tokenizer::Tokenizer;
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

use crate::policy::{prefix_blocks, RoutingPolicy};
use crate::relay::{ForwardHeaders, Journey, Relay};

/// Response header naming the router a stream started on.
pub const ROUTER_HEADER: &str = "moe-router";

pub struct InferenceGateway {
    pub relay: Arc<Relay>,
    pub tokenizer: Arc<Tokenizer>,
    /// `--max-prompt-bytes`.
    pub max_prompt_bytes: usize,
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

/// Whether the request samples (so it needs a seed to be resumable).
fn samples(request: &GenerateRequest) -> bool {
    request.temperature.is_none_or(|t| t > 0.0)
}

impl InferenceGateway {
    /// A one-off call (Tokenize, ModelInfo) for the least loaded router: its client, and the
    /// request authorized for it.
    fn one_off<T>(
        &self,
        request: Request<T>,
    ) -> Result<(InferenceClient<tonic::transport::Channel>, Request<T>), Status> {
        let forward = ForwardHeaders::from_metadata(request.metadata());
        let router = self.relay.any_router()?;
        let mut call = Request::new(request.into_inner());
        self.relay.authorize(&router, &mut call, &forward);
        Ok((InferenceClient::new(router.channel.clone()), call))
    }

    /// The prompt's ids, for prefix-aware routing: tokenized here when it came as text (off
    /// the async runtime), as the router will tokenize it.
    async fn prompt_ids(&self, request: &GenerateRequest) -> Result<Vec<u32>, Status> {
        let Some(text) = &request.prompt else {
            return Ok(request.input_ids.clone());
        };
        if text.len() > self.max_prompt_bytes {
            return Err(Status::invalid_argument(format!(
                "the prompt has {} bytes, more than --max-prompt-bytes {}",
                text.len(),
                self.max_prompt_bytes
            )));
        }
        let tokenizer = Arc::clone(&self.tokenizer);
        let text = text.clone();
        tokio::task::spawn_blocking(move || tokenizer.encode_prompt(&text))
            .await
            .map_err(|_| Status::internal("the tokenizer task failed"))?
            .map_err(|e| Status::invalid_argument(format!("prompt: {e}")))
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
        let mut generate = request.into_inner();
        // The gateway seeds an unseeded sampled request, so another router can resume it
        // drawing exactly what the first would have.
        if generate.seed.is_none() && samples(&generate) {
            generate.seed = Some(u64::from_le_bytes(moe_cluster::auth::random_bytes()));
        }
        let span = tracing::info_span!(
            "gateway.generate",
            otel.name = "gateway.generate",
            router = tracing::field::Empty,
        );
        moe_cluster::telemetry::set_remote_parent(
            &span,
            forward.traceparent.as_deref(),
            forward.tracestate.as_deref(),
        );
        let policy = self.relay.chooser.policy();
        let ids = if policy == RoutingPolicy::CacheAware {
            self.prompt_ids(&generate).await?
        } else {
            generate.input_ids.clone()
        };
        let mut journey = Journey::new(generate, forward, span);
        journey.blocks = prefix_blocks(&ids);
        journey.prompt_tokens = ids.len() as u32;
        journey.deadline = deadline;
        let (router, answers) = self.relay.start(journey).await?;
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

    #[test]
    fn only_sampled_requests_need_a_seed() {
        let mut r = GenerateRequest::default();
        assert!(samples(&r));
        r.temperature = Some(0.0);
        assert!(!samples(&r));
        r.temperature = Some(0.7);
        assert!(samples(&r));
    }
}
