//! What every request goes through before its first router, whichever API it came by: a
//! seed for an unseeded sampled request (so another router can resume it drawing what the
//! first would have), its span, and its prompt's block hashes for prefix-aware routing.

use std::sync::Arc;
use std::time::Instant;

use moe_model::tokenizer::Tokenizer;
use moe_proto::v1::GenerateRequest;
use tonic::Status;

use crate::policy::{prefix_blocks, RoutingPolicy};
use crate::relay::{Answers, ForwardHeaders, Journey, Relay};

pub struct Intake {
    pub relay: Arc<Relay>,
    pub tokenizer: Arc<Tokenizer>,
    /// `--max-prompt-bytes`.
    pub max_prompt_bytes: usize,
}

/// Whether the request samples (so it needs a seed to be resumable).
pub(crate) fn samples(request: &GenerateRequest) -> bool {
    request.temperature.is_none_or(|t| t > 0.0)
}

impl Intake {
    /// Opens `request` on a router; returns that router's id and the answers, relayed across
    /// routers until the answer ends.
    pub async fn start(
        &self,
        mut request: GenerateRequest,
        forward: ForwardHeaders,
        deadline: Option<Instant>,
    ) -> Result<(String, Answers), Status> {
        if request.seed.is_none() && samples(&request) {
            request.seed = Some(u64::from_le_bytes(moe_cluster::auth::random_bytes()));
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
        let ids = if self.relay.chooser.policy() == RoutingPolicy::CacheAware {
            self.prompt_ids(&request).await?
        } else {
            request.input_ids.clone()
        };
        let blocks = prefix_blocks(&ids, &request.cache_salt);
        let mut journey = Journey::new(request, forward, span);
        journey.blocks = blocks;
        journey.prompt_tokens = ids.len() as u32;
        journey.deadline = deadline;
        self.relay.start(journey).await
    }

    /// The prompt's ids: tokenized here when it came as text (off the async runtime), as the
    /// router will tokenize it.
    async fn prompt_ids(&self, request: &GenerateRequest) -> Result<Vec<u32>, Status> {
        let Some(text) = &request.prompt else {
            return Ok(request.input_ids.clone());
        };
        if text.len() > self.max_prompt_bytes {
            return Err(Status::invalid_argument(format!(
                "prompt is {} bytes; the limit is {} bytes (--max-prompt-bytes)",
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

#[cfg(test)]
mod tests {
    use super::*;

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
