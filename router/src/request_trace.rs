//! The spans of one request: `request` (gen_ai attributes, the client's `traceparent` as its
//! parent) with `queue` and then `prefill` as children; the scheduler's sampled `step` spans hang
//! under one request of their batch and link the others. All are `Span::none()` when tracing
//! is off, which costs nothing.

use moe_cluster::telemetry;
use tracing::{field, Span};

use crate::validation::ValidRequest;
pub use moe_openai::trace_origin::TraceOrigin;

/// The open spans of one request; dropping it ends them.
pub struct RequestTrace {
    request: Span,
    /// `queue` until scheduled, then `prefill` until the first token, then none.
    phase: Span,
}

impl RequestTrace {
    pub fn disabled() -> Self {
        Self {
            request: Span::none(),
            phase: Span::none(),
        }
    }

    pub fn start(origin: &TraceOrigin, model: &str, request: &ValidRequest) -> Self {
        if !telemetry::enabled() {
            return Self::disabled();
        }
        let span = tracing::info_span!(
            target: "moe_router",
            "request",
            otel.name = format!("{} {model}", origin.operation),
            otel.kind = "server",
            otel.status_code = field::Empty,
            otel.status_message = field::Empty,
            gen_ai.operation.name = origin.operation,
            gen_ai.request.model = model,
            gen_ai.request.max_tokens = request.max_new_tokens as u64,
            gen_ai.request.temperature = request.sampling.temperature as f64,
            gen_ai.request.top_p = request.sampling.top_p as f64,
            gen_ai.usage.input_tokens = request.input_ids.len() as u64,
            gen_ai.usage.output_tokens = field::Empty,
            gen_ai.response.finish_reasons = field::Empty,
        );
        telemetry::set_remote_parent(
            &span,
            origin.traceparent.as_deref(),
            origin.tracestate.as_deref(),
        );
        let phase = tracing::info_span!(target: "moe_router", parent: &span, "queue");
        Self {
            request: span,
            phase,
        }
    }

    pub fn span(&self) -> &Span {
        &self.request
    }

    /// Left the queue: KV blocks reserved, prefill starts.
    pub fn scheduled(&mut self, prompt_tokens: usize) {
        if self.request.is_none() {
            return;
        }
        self.phase = tracing::info_span!(
            target: "moe_router",
            parent: &self.request,
            "prefill",
            prompt_tokens = prompt_tokens as u64
        );
    }

    /// Preempted by a more urgent request (`--scheduling-policy priority`): back in the
    /// queue, to prefill again what its cached blocks do not hold.
    pub fn preempted(&mut self, generated: usize) {
        if self.request.is_none() {
            return;
        }
        self.phase = tracing::info_span!(
            target: "moe_router",
            parent: &self.request,
            "queue",
            preempted_after_tokens = generated as u64
        );
    }

    /// The first token went out: prefill is over.
    pub fn first_token(&mut self) {
        self.phase = Span::none();
    }

    pub fn finished(&mut self, reason: &str, output_tokens: usize) {
        self.phase = Span::none();
        self.request
            .record("gen_ai.usage.output_tokens", output_tokens as u64);
        self.request
            .record("gen_ai.response.finish_reasons", format!("[\"{reason}\"]"));
    }

    pub fn failed(&mut self, message: &str) {
        self.phase = Span::none();
        self.request.record("otel.status_code", "ERROR");
        self.request.record("otel.status_message", message);
    }
}
