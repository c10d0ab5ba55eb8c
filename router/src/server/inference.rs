//! `moe.v1.Inference`: Generate (streamed), Tokenize, ModelInfo.

use crate::request_trace::TraceOrigin;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use moe_cluster::shutdown::Shutdown;
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_proto::v1::inference_server::Inference;
use moe_proto::v1::{
    GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse, TokenizeRequest,
    TokenizeResponse,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::admission::{Admission, Answers};
use crate::error::RouterError;
use crate::inference_access::ViaGateway;

/// What a gateway's stream ends with when this router drains: the gateway resumes it on
/// another router, exactly where it stopped.
pub const DRAINING: &str = moe_proto::ROUTER_DRAINING;

pub struct InferenceService {
    pub config: ModelConfig,
    pub model_dir: String,
    pub tokenizer: Arc<Tokenizer>,
    pub admission: Arc<Admission>,
    pub eos_ids: Vec<u32>,
    /// Fires when the router drains (SIGTERM, `DrainRouter`).
    pub draining: Shutdown,
    /// How long a gateway's stream may go on once the router drains (`--drain-grace-ms`): one
    /// about to end finishes here instead of being prefilled again elsewhere.
    pub drain_grace: Duration,
}

/// A gateway's stream: this router's answers until it drains (plus `grace`), then
/// `UNAVAILABLE` (dropping `answers` cancels the request here). A direct client's stream is
/// left to finish.
fn until_drained(mut answers: Answers, mut draining: Shutdown, grace: Duration) -> GenerateStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let cut = async move {
            draining.wait().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(cut);
        loop {
            tokio::select! {
                biased;
                answer = answers.recv() => {
                    let Some(answer) = answer else { return };
                    if tx.send(answer.map_err(Status::from)).await.is_err() {
                        return;
                    }
                }
                () = &mut cut => {
                    let _ = tx.send(Err(Status::unavailable(DRAINING))).await;
                    return;
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let origin = TraceOrigin::from_grpc(request.metadata(), "text_completion");
        let via_gateway = request.extensions().get::<ViaGateway>().is_some();
        if via_gateway && self.draining.is_shutdown() {
            return Err(Status::unavailable(DRAINING));
        }
        let answers = self.admission.submit(request.into_inner(), origin).await?;
        if via_gateway {
            let draining = self.draining.clone();
            return Ok(Response::new(until_drained(
                answers,
                draining,
                self.drain_grace,
            )));
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(answers)
            .map(|answer| answer.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let text = request.into_inner().text;
        self.admission.check_prompt_bytes(text.len(), "text")?;
        let ids = self
            .admission
            .tokenizing
            .tokenize(move |t| t.encode_prompt(&text))
            .await?
            .map_err(|e| RouterError::invalid("text", e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(token: u32) -> Result<GenerateResponse, RouterError> {
        Ok(GenerateResponse {
            token_ids: vec![token],
            ..Default::default()
        })
    }

    /// Answers pass until the drain, and for the grace after it; then the stream ends with
    /// the draining status, whatever the request still had to say.
    #[tokio::test(start_paused = true)]
    async fn a_gateway_stream_runs_for_the_grace_after_a_drain_then_ends_draining() {
        let (tx, answers) = tokio::sync::mpsc::channel(8);
        let (stopper, draining) = Shutdown::new();
        let grace = Duration::from_millis(2_000);
        let mut stream = until_drained(answers, draining, grace);
        tx.send(answer(1)).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().token_ids, [1]);
        stopper.stop();
        tokio::time::sleep(Duration::from_millis(1_900)).await;
        tx.send(answer(2)).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().token_ids, [2]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = tx.send(answer(3)).await;
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), DRAINING);
        assert!(stream.next().await.is_none());
    }

    /// A request that ends within the grace ends as it would have: no draining status.
    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_within_the_grace_ends_cleanly() {
        let (tx, answers) = tokio::sync::mpsc::channel(8);
        let (stopper, draining) = Shutdown::new();
        let mut stream = until_drained(answers, draining, Duration::from_millis(500));
        stopper.stop();
        tx.send(answer(7)).await.unwrap();
        drop(tx);
        assert_eq!(stream.next().await.unwrap().unwrap().token_ids, [7]);
        assert!(stream.next().await.is_none());
    }
}
