//! `moe.v1.Inference`: Generate (streamed), Tokenize, ModelInfo.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_proto::v1::inference_server::Inference;
use moe_proto::v1::{
    GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse, TokenizeRequest,
    TokenizeResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::cluster_view::ClusterView;
use crate::scheduler::{SchedulerStats, Submission};
use crate::validation::{validate, RequestLimits};

pub struct InferenceService {
    pub config: ModelConfig,
    pub model_dir: String,
    pub tokenizer: Arc<Tokenizer>,
    pub submissions: mpsc::Sender<Submission>,
    pub stats: Arc<SchedulerStats>,
    pub view: Arc<ClusterView>,
    pub max_waiting: usize,
    pub limits: RequestLimits,
    pub eos_ids: Vec<u32>,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let valid = validate(
            request.into_inner(),
            &self.config,
            &self.tokenizer,
            &self.limits,
        )?;
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
            })
            .await
            .map_err(|_| Status::unavailable("the scheduler has stopped"))?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let ids = self
            .tokenizer
            .encode_prompt(&request.into_inner().text)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(TokenizeResponse { input_ids: ids }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(ModelInfoResponse {
            model_type: self.config.family.model_type().to_string(),
            model_dir: self.model_dir.clone(),
            vocab_size: self.config.vocab_size as u32,
            max_position_embeddings: self.config.max_position_embeddings as u32,
            num_layers: self.config.num_layers as u32,
            num_experts: self.config.moe.num_experts as u32,
            experts_per_token: self.config.moe.top_k as u32,
            eos_token_ids: self.eos_ids.clone(),
        }))
    }
}
