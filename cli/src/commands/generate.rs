//! `moe generate`: one request, through the offline engine or over a router's gRPC API; the
//! same output either way.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use moe_cluster::DeviceArgs;
use moe_model::offline_drafts::DraftCounts;
use moe_model::speculative::SpeculativeConfig;
use moe_model::{Engine, FinishReason, GenerateRequest, LogitAdjustments, SamplingParams};
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::TokenizeRequest;
use serde::Serialize;

use crate::router_client::{channel, rpc_error, runtime, with_key};

#[derive(Args, Clone)]
pub struct GenerateArgs {
    /// Checkpoint directory (Hugging Face layout), for the offline engine.
    #[arg(long, env = "MOE_MODEL", required_unless_present = "router")]
    model: Option<PathBuf>,
    /// A router's gRPC address (host:port): generate on the cluster instead of offline (the
    /// cluster's processes have their own device: `--device` is then ignored).
    #[arg(long, env = "MOE_ROUTER", conflicts_with = "model")]
    router: Option<String>,
    /// Prompt text, tokenized with the checkpoint's tokenizer.
    #[arg(
        long,
        conflicts_with = "input_ids",
        required_unless_present = "input_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt token ids, comma-separated (e.g. 0,5,7).
    #[arg(long, value_delimiter = ',')]
    pub input_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Only tokens at least this fraction as likely as the likeliest (vLLM's `min_p`; 0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// OpenAI's penalty on tokens already generated (-2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI's penalty per time a token was generated (-2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// vLLM's penalty on prompt and generated tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// End-of-sequence (and stop strings) held back until this many tokens.
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// With --json, add the full-vocabulary logits of every step.
    #[arg(long)]
    pub emit_logits: bool,
    /// Stop strings (cluster only), repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Speculative decoding offline, as vLLM's `--speculative-config` JSON (`ngram` prompt
    /// lookup, or `deepseek_mtp` with a checkpoint that has the layer): the same tokens and
    /// logprobs, in fewer steps where drafts agree; `--json` adds `spec_decode` (drafts, draft
    /// tokens, accepted tokens, steps). Offline only: over a cluster, the router's flag.
    #[arg(long, env = "MOE_SPECULATIVE_CONFIG", conflicts_with = "router")]
    pub speculative_config: Option<SpeculativeConfig>,
    #[command(flatten)]
    pub engine: DeviceArgs,
    #[command(flatten)]
    pub in_process: super::in_process_nodes::InProcessNodesArgs,
}

/// What `--json` prints.
#[derive(Serialize)]
struct GenerateJson<'a> {
    input_ids: &'a [u32],
    output_ids: &'a [u32],
    logprobs: &'a [f32],
    text: String,
    finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_logits: Option<&'a [Vec<f32>]>,
    /// How the drafts went, with `--speculative-config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    spec_decode: Option<DraftCounts>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    match (&args.router, &args.model) {
        (Some(router), _) => over_router(router, &args),
        (None, Some(model)) => offline(model, &args),
        (None, None) => bail!("give --model or --router"),
    }
}

fn offline(model: &Path, args: &GenerateArgs) -> anyhow::Result<()> {
    if !args.stop.is_empty() {
        bail!("--stop is supported with --router only");
    }
    let device = args.engine.open()?;
    let mut engine =
        Engine::load_on(model, &device).with_context(|| format!("loading {}", model.display()))?;
    if let Some(config) = args.speculative_config {
        engine = engine
            .speculating(model, config)
            .context("--speculative-config")?;
    }
    let engine = args.in_process.apply(engine, &device)?;
    let input_ids = match (&args.prompt, &args.input_ids) {
        (Some(text), _) => engine.tokenizer().encode_prompt(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --input-ids"),
    };
    let request = GenerateRequest {
        input_ids,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            seed: args.seed,
            adjust: LogitAdjustments {
                presence_penalty: args.presence_penalty,
                frequency_penalty: args.frequency_penalty,
                repetition_penalty: args.repetition_penalty,
                min_tokens: args.min_tokens,
                ..Default::default()
            },
        },
        ignore_eos: args.ignore_eos,
        emit_logits: args.emit_logits,
    };
    let out = engine.generate(&request)?;
    let text = engine.tokenizer().decode(&out.output_ids)?;
    print(
        args.json,
        GenerateJson {
            input_ids: &out.input_ids,
            output_ids: &out.output_ids,
            logprobs: &out.logprobs,
            text,
            finish_reason: out.finish_reason,
            step_logits: out.step_logits.as_deref(),
            spec_decode: args.speculative_config.map(|_| out.drafts),
        },
    )
}

/// The same request through a router: the prompt tokenized there, the tokens streamed back.
fn over_router(router: &str, args: &GenerateArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = channel(router)
            .await
            .map(InferenceClient::new)
            .with_context(|| format!("connecting to {router}"))?;
        let input_ids = match (&args.prompt, &args.input_ids) {
            (Some(text), _) => {
                client
                    .tokenize(with_key(TokenizeRequest { text: text.clone() }))
                    .await
                    .map_err(rpc_error)?
                    .into_inner()
                    .input_ids
            }
            (None, Some(ids)) => ids.clone(),
            (None, None) => bail!("give --prompt or --input-ids"),
        };
        let request = moe_proto::v1::GenerateRequest {
            top_logprobs: None,
            prompt: None,
            input_ids: input_ids.clone(),
            max_new_tokens: args.max_new_tokens as u32,
            temperature: Some(args.temperature),
            top_p: Some(args.top_p),
            min_p: Some(args.min_p),
            top_k: args.top_k.map(|k| k as u32),
            seed: args.seed,
            stop: args.stop.clone(),
            ignore_eos: args.ignore_eos,
            logprobs: true,
            presence_penalty: Some(args.presence_penalty),
            frequency_penalty: Some(args.frequency_penalty),
            repetition_penalty: Some(args.repetition_penalty),
            min_tokens: args.min_tokens as u32,
            ..Default::default()
        };
        let mut stream = client
            .generate(with_key(request))
            .await
            .map_err(rpc_error)?
            .into_inner();
        let (mut ids, mut logprobs, mut text, mut finish) =
            (Vec::new(), Vec::new(), String::new(), None);
        while let Some(msg) = stream.message().await.map_err(rpc_error)? {
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
        print(
            args.json,
            GenerateJson {
                input_ids: &input_ids,
                output_ids: &ids,
                logprobs: &logprobs,
                text,
                finish_reason,
                step_logits: None,
                spec_decode: None,
            },
        )
    })
}

/// The text, or with `--json` the whole answer on one line.
fn print(json: bool, answer: GenerateJson<'_>) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(&answer)?);
    } else {
        println!("{}", answer.text);
    }
    Ok(())
}
