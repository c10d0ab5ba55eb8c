//! `moe generate --router`: the same request and the same output as offline, over gRPC.

use anyhow::{bail, Context};
use moe_model::FinishReason;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, TokenizeRequest};

use super::generate::{GenerateArgs, GenerateJson};

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn endpoint(router: &str) -> String {
    if router.contains("://") {
        router.to_string()
    } else {
        format!("http://{router}")
    }
}

/// A request carrying `MOE_API_KEY` as a bearer token, for routers started with
/// `--api-key-file`.
pub fn with_key<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(key) = std::env::var("MOE_API_KEY") {
        if let Ok(value) = format!("Bearer {key}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
    }
    request
}

pub fn generate(router: &str, args: GenerateArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = InferenceClient::connect(endpoint(router))
            .await
            .with_context(|| format!("connecting to {router}"))?;
        let input_ids = match (&args.prompt, &args.input_ids) {
            (Some(text), _) => {
                client
                    .tokenize(with_key(TokenizeRequest { text: text.clone() }))
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                    .into_inner()
                    .input_ids
            }
            (None, Some(ids)) => ids.clone(),
            (None, None) => bail!("give --prompt or --input-ids"),
        };
        let request = GenerateRequest {
            top_logprobs: None,
            prompt: None,
            input_ids: input_ids.clone(),
            max_new_tokens: args.max_new_tokens as u32,
            temperature: Some(args.temperature),
            top_p: Some(args.top_p),
            top_k: args.top_k.map(|k| k as u32),
            seed: args.seed,
            stop: args.stop.clone(),
            ignore_eos: args.ignore_eos,
            logprobs: true,
        };
        let mut stream = client
            .generate(with_key(request))
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let (mut ids, mut logprobs, mut text, mut finish) =
            (Vec::new(), Vec::new(), String::new(), None);
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        {
            ids.extend_from_slice(&msg.token_ids);
            logprobs.extend_from_slice(&msg.logprobs);
            text.push_str(&msg.text);
            if !msg.finish_reason.is_empty() {
                finish = Some(if msg.finish_reason == "stop" {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                });
            }
        }
        let Some(finish_reason) = finish else {
            bail!("the stream ended without a finish reason")
        };
        if args.json {
            let json = GenerateJson {
                input_ids: &input_ids,
                output_ids: &ids,
                logprobs: &logprobs,
                text,
                finish_reason,
                step_logits: None,
            };
            println!("{}", serde_json::to_string(&json)?);
        } else {
            println!("{text}");
        }
        Ok(())
    })
}
