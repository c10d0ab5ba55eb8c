//! The OpenAI HTTP API through the gateway: the API code routers serve too (`moe-openai`:
//! parsing, chat templates, tool calls, structured-output parameters, answers, SSE), with
//! each parsed request sent through the [`Intake`] and the relay, so an HTTP stream moves
//! between routers exactly as a gRPC one does. The routers apply their own limits; the
//! gateway checks only the prompt's bytes before tokenizing.

use std::sync::Arc;

use moe_openai::error::RouterError;
use moe_openai::generator::Answers;
use moe_openai::prompt_bytes::check_prompt_bytes;
use moe_openai::sibling::SiblingPrefill;
use moe_openai::tokenizing::Tokenizing;
use moe_openai::trace_origin::TraceOrigin;
use moe_openai::Generator;
use moe_proto::v1::GenerateRequest;
use tokio::sync::mpsc;

use crate::intake::Intake;
use crate::metrics::GatewayMetrics;
use crate::relay::ForwardHeaders;

pub struct GatewayGenerator {
    pub intake: Arc<Intake>,
    /// The gateway's tokenizer (chat templates, `n` choices' prompts) on a bounded pool.
    pub tokenizing: Tokenizing,
    pub metrics: Arc<GatewayMetrics>,
}

#[tonic::async_trait]
impl Generator for GatewayGenerator {
    /// Choices go separately: each is routed by its prompt, so cache-aware routing sends them
    /// to one router, whose prefix cache shares their prompt blocks.
    async fn submit(
        &self,
        request: GenerateRequest,
        origin: TraceOrigin,
        _sibling: Option<SiblingPrefill>,
    ) -> Result<Answers, RouterError> {
        let forward = ForwardHeaders {
            authorization: None,
            traceparent: origin.traceparent,
            tracestate: origin.tracestate,
        };
        let (_, mut relayed) = self.intake.start(request, forward, None).await?;
        // The API reads router errors; the relay speaks gRPC statuses. A client that leaves
        // drops `answers`, which ends this task and, through the relay, the router's request.
        let (tx, answers) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(answer) = relayed.recv().await {
                if tx.send(answer.map_err(RouterError::from)).await.is_err() {
                    return;
                }
            }
        });
        Ok(answers)
    }

    fn check_prompt_bytes(&self, bytes: usize, field: &'static str) -> Result<(), RouterError> {
        check_prompt_bytes(bytes, self.intake.max_prompt_bytes, field)
    }

    fn tokenizing(&self) -> &Tokenizing {
        &self.tokenizing
    }

    fn ready(&self) -> bool {
        !self.intake.relay.routers.available().is_empty()
    }

    fn metrics(&self) -> String {
        self.metrics.render(&self.intake.relay.routers)
    }
}
