//! `moe generate`: one request through the offline engine.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use moe_model::{Engine, FinishReason, GenerateRequest, SamplingParams};
use serde::Serialize;

#[derive(Args, Clone)]
pub struct GenerateArgs {
    /// Checkpoint directory (Hugging Face layout), for the offline engine.
    #[arg(long, env = "MOE_MODEL", required_unless_present = "router")]
    model: Option<PathBuf>,
    /// A router's gRPC address (host:port): generate on the cluster instead of offline.
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
    #[arg(long)]
    pub seed: Option<u64>,
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
    #[command(flatten)]
    pub engine: super::engine_device::EngineDeviceArgs,
}

#[derive(Serialize)]
pub struct GenerateJson<'a> {
    pub input_ids: &'a [u32],
    pub output_ids: &'a [u32],
    pub logprobs: &'a [f32],
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_logits: Option<&'a [Vec<f32>]>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(router) = args.router.clone() {
        return super::remote::generate(&router, args);
    }
    let Some(model) = args.model.clone() else {
        bail!("give --model or --router")
    };
    if !args.stop.is_empty() {
        bail!("--stop is supported with --router only");
    }
    let device = args.engine.open()?;
    let engine =
        Engine::load_on(&model, &device).with_context(|| format!("loading {}", model.display()))?;
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
            seed: args.seed,
        },
        ignore_eos: args.ignore_eos,
        emit_logits: args.emit_logits,
    };
    let out = engine.generate(&request)?;
    let text = engine.tokenizer().decode(&out.output_ids)?;
    if args.json {
        let json = GenerateJson {
            input_ids: &out.input_ids,
            output_ids: &out.output_ids,
            logprobs: &out.logprobs,
            text,
            finish_reason: out.finish_reason,
            step_logits: out.step_logits.as_deref(),
        };
        println!("{}", serde_json::to_string(&json)?);
    } else {
        println!("{text}");
    }
    Ok(())
}
