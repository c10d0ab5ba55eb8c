//! The router's side of the OpenAI API (`moe-openai`): parsed requests go to this router's
//! admission.

use std::sync::Arc;

use moe_proto::v1::GenerateRequest;

use moe_openai::Generator;

use crate::admission::{Admission, Answers, Tokenizing};
use crate::cluster_view::ClusterView;
use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::request_trace::TraceOrigin;
use crate::validation::SiblingPrefill;

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
        self.view.can_serve()
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}
