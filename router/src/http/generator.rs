//! Where the OpenAI API's requests go once parsed: this router's own admission, or, in
//! `moe-gateway`, the routers behind it. Parsing, chat templates, tokenizing and the rendering
//! of answers are the same either way.

use std::sync::Arc;

use moe_proto::v1::GenerateRequest;

use crate::admission::{Admission, Answers, Tokenizing};
use crate::cluster_view::ClusterView;
use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::request_trace::TraceOrigin;
use crate::validation::SiblingPrefill;

#[tonic::async_trait]
pub trait Generator: Send + Sync {
    /// Submits one choice of a request; `sibling` lets choices share choice 0's prefill where
    /// they run together.
    async fn submit(
        &self,
        request: GenerateRequest,
        origin: TraceOrigin,
        sibling: Option<SiblingPrefill>,
    ) -> Result<Answers, RouterError>;
    /// Refuses a text over the prompt byte limit, naming `field`; called before tokenizing.
    fn check_prompt_bytes(&self, bytes: usize, field: &'static str) -> Result<(), RouterError>;
    /// The tokenizer behind its bounded blocking pool.
    fn tokenizing(&self) -> &Tokenizing;
    /// Whether requests can be served now (`GET /health`).
    fn ready(&self) -> bool;
    /// The Prometheus page (`GET /metrics`).
    fn metrics(&self) -> String;
}

/// A router's own: admission, then its scheduler.
pub struct RouterGenerator {
    pub admission: Arc<Admission>,
    pub view: Arc<ClusterView>,
    pub metrics: Arc<RouterMetrics>,
}

#[tonic::async_trait]
impl Generator for RouterGenerator {
    async fn submit(
        &self,
        request: GenerateRequest,
        origin: TraceOrigin,
        sibling: Option<SiblingPrefill>,
    ) -> Result<Answers, RouterError> {
        self.admission.submit_choice(request, origin, sibling).await
    }

    fn check_prompt_bytes(&self, bytes: usize, field: &'static str) -> Result<(), RouterError> {
        self.admission.check_prompt_bytes(bytes, field)
    }

    fn tokenizing(&self) -> &Tokenizing {
        &self.admission.tokenizing
    }

    fn ready(&self) -> bool {
        self.view.serving().is_some()
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}
