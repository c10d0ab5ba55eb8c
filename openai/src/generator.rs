//! Where the OpenAI API's requests go once parsed: a router's own admission, or, in
//! `moe-gateway`, the routers behind it. Parsing, chat templates, tokenizing and the rendering
//! of answers are the same either way.

use moe_proto::v1::{GenerateRequest, GenerateResponse};
use tokio::sync::mpsc;

use crate::error::RouterError;
use crate::sibling::SiblingPrefill;
use crate::tokenizing::Tokenizing;
use crate::trace_origin::TraceOrigin;

/// A request's answers, as the router's scheduler streams them.
pub type Answers = mpsc::Receiver<Result<GenerateResponse, RouterError>>;

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
