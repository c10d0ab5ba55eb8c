//! Admission, shared by the gRPC and HTTP APIs: validate a request, check that the cluster can
//! serve, bound the queue, and hand it to the scheduler. Returns the stream of its answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_proto::v1::{GenerateRequest, GenerateResponse};
use tokio::sync::mpsc;
use tonic::Status;

use crate::cluster_view::ClusterView;
use crate::request_trace::{RequestTrace, TraceOrigin};
use crate::scheduler::{SchedulerStats, Submission};
use crate::validation::{validate, RequestLimits};

pub type Answers = mpsc::Receiver<Result<GenerateResponse, Status>>;

pub struct Admission {
    pub config: ModelConfig,
    pub tokenizer: Arc<Tokenizer>,
    pub submissions: mpsc::Sender<Submission>,
    pub stats: Arc<SchedulerStats>,
    pub view: Arc<ClusterView>,
    pub max_waiting: usize,
    pub limits: RequestLimits,
    /// The served model name (trace attributes).
    pub model_name: String,
}

impl Admission {
    pub async fn submit(
        &self,
        request: GenerateRequest,
        origin: TraceOrigin,
    ) -> Result<Answers, Status> {
        let valid = validate(request, &self.config, &self.tokenizer, &self.limits)?;
        let trace = RequestTrace::start(&origin, &self.model_name, &valid);
        if self.view.serving().is_none() {
            return Err(Status::unavailable("no expert placement is ready yet"));
        }
        if self.stats.waiting.load(Ordering::Relaxed) >= self.max_waiting {
            return Err(Status::resource_exhausted(format!(
                "{} requests are already waiting (the limit)",
                self.max_waiting
            )));
        }
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        // Room for every message of the answer, so the step loop never waits on a slow reader.
        let (tx, rx) = mpsc::channel(valid.max_new_tokens + 2);
        self.submissions
            .send(Submission {
                request: valid,
                responses: tx,
                trace,
            })
            .await
            .map_err(|_| Status::unavailable("the scheduler has stopped"))?;
        Ok(rx)
    }
}
