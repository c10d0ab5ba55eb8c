//! `moe generate`: one request through the offline engine.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use moe_model::{Engine, FinishReason, GenerateRequest, SamplingParams};
use serde::Serialize;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Prompt text, tokenized with the checkpoint's tokenizer.
    #[arg(
        long,
        conflicts_with = "input_ids",
        required_unless_present = "input_ids"
    )]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated (e.g. 0,5,7).
    #[arg(long, value_delimiter = ',')]
    input_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// With --json, add the full-vocabulary logits of every step.
    #[arg(long)]
    emit_logits: bool,
}

#[derive(Serialize)]
struct GenerateJson<'a> {
    input_ids: &'a [u32],
    output_ids: &'a [u32],
    logprobs: &'a [f32],
    text: String,
    finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_logits: Option<&'a [Vec<f32>]>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let engine =
        Engine::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
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
